"""Parse services.toml once, at the edge, into frozen values.

Every problem is collected with its TOML key path (`services.api.restart: ...`) and raised
together as one ConfigError; unknown keys are errors, never silently ignored. Values of
environment variables and DSNs never appear in error text.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from supervisor.core.datatypes import (
    interpolate,
    parse_env_file,
    parse_listen,
    priority_number,
    signal_number,
)
from supervisor.core.errors import ConfigError
from supervisor.core.policy import RESTART_POLICIES, Backoff, Policy, RestartPolicy
from supervisor.core.redact import config_secrets, interpolated_values, url_problem

if TYPE_CHECKING:
    from supervisor.web.webconfig import WebConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_S = TypeVar("_S", bound=str)  # one of a fixed set of strings (Parser.choice)
# Bounds on every number, so that what check-config accepts, run and reload can run: NaN and
# infinities are refused everywhere (TOML accepts them); durations are at most a week, loops
# (scrape, stats and check intervals) at least 10 ms apart, backoff_factor at most 100.
MAX_SECONDS = 7 * 24 * 3600.0
MIN_INTERVAL = 0.01
MAX_BACKOFF_FACTOR = 100.0
MAX_RETRIES = 1_000_000_000
MAX_CONNECTIONS = 65_536
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, with the terminating NUL
CHECK_TYPES = ("postgres", "redis", "http", "tcp")
# Service probes ([services.NAME.liveness|readiness|startup]), named as in Kubernetes.
PROBE_KINDS = ("startup", "liveness", "readiness")
PROBE_TYPES = ("http", "tcp", "exec")
MAX_PROBE_THRESHOLD = 10_000
MAX_PROBE_TIMEOUT = 3600.0
# Variables that belong to the daemon's own relation with systemd; a child must never see them.
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
               "LISTEN_FDNAMES")
# Seed story's constitutional metrics (FR52): never exposed, in any disguise. Globs over the
# normalised names, labels and HELP of a family (see supervisor/observe/denylist.py): the exact
# names, then the same words (and `constitutional`) anywhere.
DEFAULT_DENY_METRICS = (
    "constitutional_breach_count",
    "halt_state",
    "dissent_health_ratio",
    "witness_coverage_percent",
    "override_frequency",
    "*constitutional*",
    "*breach_count*",
    "*halt_state*",
    "*dissent_health*",
    "*witness_coverage*",
    "*override_frequency*",
)


@dataclass(frozen=True)
class ProbeSpec:
    """One probe of a service (liveness, readiness or startup), as in Kubernetes."""

    kind: str  # "liveness" | "readiness" | "startup"
    type: str  # "http" | "tcp" | "exec"
    target: str = field(default="", repr=False)  # URL (http) or host:port (tcp); may hold a secret
    command: tuple[str, ...] = field(default=(), repr=False)  # exec
    period: float = 10.0
    timeout: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1
    initial_delay: float = 0.0


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    command: tuple[str, ...]
    # env_file values overlaid by `env`; the daemon's environ is added at spawn
    env: Mapping[str, str]
    cwd: str
    restart: RestartPolicy = "always"
    stop_signal: int = 15
    stop_timeout: float = 10.0
    start_seconds: float = 1.0
    autostart: bool = True
    depends_on: tuple[str, ...] = ()
    wait_for: tuple[str, ...] = ()
    wait_timeout: float = 60.0
    success_exit_codes: frozenset[int] = frozenset({0})
    backoff: Backoff = field(default_factory=Backoff)
    metrics_url: str | None = None
    scrape_timeout: float = 2.0
    inherit_env: bool = True
    env_files: tuple[str, ...] = ()
    stdout_priority: int = 6  # syslog priority of an output line without a <N> prefix: info
    stderr_priority: int = 4  # warning
    # Globs of the metric families this service may expose; None: the [supervisor] list.
    # Not compared: a reload that changes only what passes re-screens the service's metrics
    # (daemon._scrape_targets) without restarting its process.
    allow_metrics: tuple[str, ...] | None = field(default=None, compare=False)
    liveness: ProbeSpec | None = None
    readiness: ProbeSpec | None = None
    startup: ProbeSpec | None = None

    def policy(self) -> Policy:
        """What the service's lifecycle decides with (core/policy.py)."""
        return Policy(name=self.name, restart=self.restart, stop_signal=self.stop_signal,
                      stop_timeout=self.stop_timeout, start_seconds=self.start_seconds,
                      success_exit_codes=self.success_exit_codes, backoff=self.backoff)

    def probes(self) -> dict[str, ProbeSpec]:
        """The configured probes by kind, startup first."""
        found = {"startup": self.startup, "liveness": self.liveness, "readiness": self.readiness}
        return {kind: probe for kind, probe in found.items() if probe is not None}


@dataclass(frozen=True)
class CheckSpec:
    name: str
    type: str
    target: str = field(repr=False)  # DSN / URL / host:port; may hold a password: never print
    query: str = "SELECT 1"
    timeout: float = 1.0
    interval: float = 5.0


@dataclass(frozen=True)
class Settings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 9464
    environment: str = "development"
    scrape_interval: float = 5.0
    stats_interval: float = 15.0
    control_socket: str | None = None
    control_socket_group: str | None = None
    log_level: str = "info"
    deny_metrics: tuple[str, ...] = DEFAULT_DENY_METRICS
    max_connections: int = 128
    stdout_priority: int = 6  # the services' default (see ServiceSpec)
    stderr_priority: int = 4
    web_config_file: str | None = None
    # TLS and basic auth, read from web_config_file at load (and reload)
    web_config: WebConfig | None = field(default=None, compare=False, repr=False)
    # Globs of the metric families services may expose (strict mode); None: any family.
    allow_metrics: tuple[str, ...] | None = None
    cgroups: str = "auto"  # "auto": a cgroup per service where possible; "off": never
    # /v1/ready also requires every service with a readiness probe to be ready.
    ready_includes_services: bool = False


@dataclass(frozen=True)
class Config:
    path: str
    settings: Settings
    services: Mapping[str, ServiceSpec]  # in start order: dependencies first
    checks: Mapping[str, CheckSpec] = field(default_factory=dict)
    # Every form of every credential above (see redact.config_secrets): masked by value in
    # whatever leaves the daemon. Never printed, never compared.
    secrets: frozenset[str] = field(default=frozenset(), repr=False, compare=False)


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate services.toml; raise ConfigError listing every problem."""
    path_text = os.fspath(path)
    try:
        raw = Path(path_text).read_bytes()
    except OSError as exc:
        raise ConfigError(path_text, [f"cannot read file: {exc.strerror or exc}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(path_text, ["file is not valid UTF-8"]) from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already says "(at line N, column M)".
        raise ConfigError(path_text, [f"TOML syntax error: {exc}"]) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(path_text, [f"TOML value error: {str(exc).split(';')[0]}"]) from None
    env = dict(os.environ if environ is None else environ)
    return _Parser(path_text, env).parse(data)


class _Parser:
    def __init__(self, path: str, environ: dict[str, str]) -> None:
        self.defaults = Settings()
        self.path = path
        self.base = Path(path).resolve().parent
        self.environ = environ
        # What redact.config_secrets needs: targets holding credentials, environment values
        # interpolated into them, and dsn_file contents.
        self.secret_targets: list[str] = []
        self.secret_env: set[str] = set()
        self.secret_whole: list[str] = []
        self.problems: list[str] = []

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    # -- generic typed getters -------------------------------------------------
    def table(self, data: Mapping[str, Any], allowed: set[str], where: str) -> None:
        for key in data:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.problem(f"{where}.{key}" if where else key,
                             f"unknown key (expected one of {hint})")

    def string(self, data: Mapping[str, Any], key: str, where: str, default: Any = None,
               interpolated: bool = True) -> Any:
        if key not in data:
            return default
        value = data[key]
        if not isinstance(value, str):
            self.problem(f"{where}.{key}", f"expected a string, got {_kind(value)}")
            return default
        text = self.expand(value, f"{where}.{key}") if interpolated else value
        return text if self.no_nul(text, f"{where}.{key}") else default

    def no_nul(self, text: str, where: str, what: str = "") -> bool:
        """Strings reach the OS (argv, environ, paths): a NUL byte cannot. Never echoes."""
        if "\0" in text:
            self.problem(where, f"{what or 'value'} contains a NUL byte")
            return False
        return True

    def number(self, data: Mapping[str, Any], key: str, where: str, default: float,
               minimum: float = 0.0, strictly: bool = False,
               maximum: float = MAX_SECONDS) -> float:
        if key not in data:
            return default
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problem(f"{where}.{key}", f"expected a number of seconds, got {_kind(value)}")
            return default
        if isinstance(value, float) and not math.isfinite(value):
            self.problem(f"{where}.{key}", f"must be a finite number, got {value}")
            return default
        if value < minimum or (strictly and value == minimum):
            relation = ">" if strictly else ">="
            self.problem(f"{where}.{key}",
                         f"must be {relation} {minimum:g}, got {_number_text(value)}")
            return default
        if value > maximum:
            self.problem(f"{where}.{key}", f"must be <= {maximum:g}, got {_number_text(value)}")
            return default
        return float(value)

    def integer(self, data: Mapping[str, Any], key: str, where: str, default: Any,
                minimum: int = 0, maximum: int = MAX_RETRIES) -> Any:
        if key not in data:
            return default
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(f"{where}.{key}", f"expected an integer, got {_kind(value)}")
            return default
        if value < minimum or value > maximum:
            self.problem(f"{where}.{key}",
                         f"must be {minimum}..{maximum}, got {_number_text(value)}")
            return default
        return value

    def boolean(self, data: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
        if key not in data:
            return default
        value = data[key]
        if not isinstance(value, bool):
            self.problem(f"{where}.{key}", f"expected true or false, got {_kind(value)}")
            return default
        return value

    def strings(self, data: Mapping[str, Any], key: str, where: str,
                interpolated: bool = True) -> tuple[str, ...]:
        if key not in data:
            return ()
        value = data[key]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(f"{where}.{key}", "expected a list of strings")
            return ()
        texts = tuple(self.expand(v, f"{where}.{key}[{i}]") if interpolated else v
                      for i, v in enumerate(value))
        if not all([self.no_nul(v, f"{where}.{key}[{i}]") for i, v in enumerate(texts)]):
            return ()
        return texts

    def deny_entries(self, data: Mapping[str, Any], where: str) -> tuple[str, ...]:
        from supervisor.observe.denylist import normalise

        entries = self.strings(data, "deny_metrics", where, False)
        for index, entry in enumerate(entries):
            if not normalise(entry.replace("*", "").replace("?", "")):
                self.problem(f"{where}.deny_metrics[{index}]", "an entry needs at least one "
                             "letter or digit (it would deny every metric)")
        return entries

    def globs(self, data: Mapping[str, Any], key: str, where: str) -> tuple[str, ...] | None:
        """A list of metric-name globs, or None when the key is absent."""
        if key not in data:
            return None
        value = data[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(f"{where}.{key}", "expected a list of metric-name globs (strings)")
            return None
        for index, glob in enumerate(value):
            if not glob or not all(c.isascii() and (c.isalnum() or c in "_:*?[]!")
                                   for c in glob):
                self.problem(f"{where}.{key}[{index}]", "expected a metric-name glob: letters, "
                             "digits, '_', ':' and the wildcards * ? [...]")
        return tuple(value)

    def choice(self, data: Mapping[str, Any], key: str, where: str, options: tuple[_S, ...],
               default: _S) -> _S:
        value = self.string(data, key, where, default, interpolated=False)
        if value not in options:
            self.problem(f"{where}.{key}", f"expected one of {', '.join(options)}")
            return default
        return options[options.index(value)]  # typed as the options are

    def priority(self, data: Mapping[str, Any], key: str, where: str, default: int) -> int:
        if key not in data:
            return default
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.problem(f"{where}.{key}", f"expected a syslog priority name, got {_kind(value)}")
            return default
        try:
            return priority_number(str(value))
        except ValueError as exc:
            self.problem(f"{where}.{key}", str(exc))
            return default

    def expand(self, text: str, where: str, secret: bool = False) -> str:
        try:
            return interpolate(text, self.environ)
        except KeyError as exc:
            self.problem(where, f"environment variable {exc.args[0]} is not set "
                                f"(use ${{{exc.args[0]}:-default}} for a fallback)")
        except ValueError as exc:
            # The malformed reference is part of the value: not shown for a secret.
            self.problem(where, "malformed variable reference (use ${NAME} or $$)" if secret
                         else str(exc))
        return text

    def socket_path(self, text: str | None, where: str) -> str | None:
        if not text:
            return None
        path = self.resolve(text)
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            self.problem(where, f"path {path} is longer than a Unix socket allows "
                                f"({MAX_SOCKET_PATH} bytes)")
        return path

    def resolve(self, text: str) -> str:
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # ~user of an unknown user: left as written, reported as missing
            path = Path(text)
        return str(path if path.is_absolute() else self.base / path)

    # -- sections --------------------------------------------------------------
    def parse(self, data: Mapping[str, Any]) -> Config:
        self.table(data, {"supervisor", "services", "checks"}, "")
        settings = self.settings(self.section(data, "supervisor"))
        self.defaults = settings
        checks = {
            name: self.check(name, spec)
            for name, spec in self.section(data, "checks").items()
            if self.is_table(spec, f"checks.{name}")
        }
        services_table = self.section(data, "services")
        if not services_table:
            self.problem("services", "no services defined (add a [services.NAME] table)")
        services = {
            name: self.service(name, spec)
            for name, spec in services_table.items()
            if self.is_table(spec, f"services.{name}")
        }
        self.label_values(settings, services, checks)
        ordered = self.start_order(services, checks)
        if self.problems:
            raise ConfigError(self.path, self.problems)
        secrets = config_secrets(self.secret_targets, self.secret_env, self.secret_whole)
        return Config(self.path, settings, ordered, checks, secrets)

    def secret_url(self, data: Mapping[str, Any], key: str, value: str) -> None:
        """Note `value` (the interpolated `data[key]`) as holding credentials."""
        self.secret_targets.append(value)
        raw = data.get(key)
        if isinstance(raw, str):
            self.secret_env.update(interpolated_values(raw, self.environ))

    def url_ok(self, where: str, url: str, *, path_at_ok: bool = False) -> None:
        why = url_problem(url, path_at_ok=path_at_ok)
        if why is not None:
            self.problem(where, why)  # never the URL itself: it may hold a password

    def label_values(self, settings: Settings, services: Mapping[str, ServiceSpec],
                     checks: Mapping[str, CheckSpec]) -> None:
        """The names the daemon writes as label values on its own series (`service`, `check`,
        `environment`) must pass the FR52 guard too: only scraped families are judged label by
        label at run time."""
        from supervisor.observe.denylist import DenyList

        deny = DenyList(settings.deny_metrics)
        for kind, names in (("services", services), ("checks", checks)):
            for name in names:
                if deny.denies(name):
                    self.problem(f"{kind}.{name}", "the name matches the FR52 deny list "
                                 "(deny_metrics); it would be a label value on every series")
        if deny.denies(settings.environment):
            self.problem("supervisor.environment", "the value (or $ENVIRONMENT) matches the "
                         "FR52 deny list (deny_metrics); it is a label on every series")

    def section(self, data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.problem(key, f"expected a table, got {_kind(value)}")
            return {}
        return value

    def is_table(self, value: Any, where: str) -> bool:
        if isinstance(value, dict):
            return True
        self.problem(where, f"expected a table, got {_kind(value)}")
        return False

    def settings(self, data: Mapping[str, Any]) -> Settings:
        where = "supervisor"
        self.table(data, {"listen", "environment", "scrape_interval", "stats_interval",
                          "control_socket", "control_socket_group", "log_level",
                          "deny_metrics", "allow_metrics", "max_connections",
                          "stdout_priority", "stderr_priority", "web_config_file", "cgroups",
                          "ready_includes_services"},
                   where)
        defaults = Settings()
        host, port = defaults.listen_host, defaults.listen_port
        listen = self.string(data, "listen", where)
        if listen is not None:
            try:
                host, port = parse_listen(listen)
            except ValueError as exc:
                self.problem(f"{where}.listen", str(exc))
        environment = self.environ.get("ENVIRONMENT") or self.string(
            data, "environment", where, defaults.environment)
        control_socket = self.string(data, "control_socket", where)
        web_config_file = self.string(data, "web_config_file", where)
        web_config = None
        if web_config_file:
            from supervisor.web.webconfig import WebConfigError, load_web_config

            web_config_file = self.resolve(web_config_file)
            try:
                web_config = load_web_config(web_config_file)
            except WebConfigError as exc:
                for problem in exc.problems:
                    self.problem(f"{where}.web_config_file", f"{web_config_file}: {problem}")
        return Settings(
            listen_host=host,
            listen_port=port,
            environment=environment,
            scrape_interval=self.number(data, "scrape_interval", where, 5.0, MIN_INTERVAL),
            stats_interval=self.number(data, "stats_interval", where, 15.0, MIN_INTERVAL),
            control_socket=self.socket_path(control_socket, f"{where}.control_socket"),
            control_socket_group=self.string(data, "control_socket_group", where),
            log_level=self.choice(data, "log_level", where,
                                  ("debug", "info", "warning", "error"), "info"),
            deny_metrics=DEFAULT_DENY_METRICS + self.deny_entries(data, where),
            allow_metrics=self.globs(data, "allow_metrics", where),
            max_connections=self.integer(data, "max_connections", where, 128, minimum=1,
                                         maximum=MAX_CONNECTIONS),
            stdout_priority=self.priority(data, "stdout_priority", where, 6),
            stderr_priority=self.priority(data, "stderr_priority", where, 4),
            web_config_file=web_config_file or None,
            web_config=web_config,
            cgroups=self.choice(data, "cgroups", where, ("auto", "off"), "auto"),
            ready_includes_services=self.boolean(data, "ready_includes_services", where, False),
        )

    def service(self, name: str, data: Mapping[str, Any]) -> ServiceSpec:
        where = f"services.{name}"
        self.table(data, {
            "command", "env", "env_file", "inherit_env", "cwd", "restart", "stop_signal",
            "stop_timeout", "start_seconds", "autostart", "depends_on", "wait_for",
            "wait_timeout", "success_exit_codes", "backoff_initial", "backoff_max",
            "backoff_factor", "backoff_jitter", "backoff_reset_after", "max_retries",
            "metrics_url", "scrape_timeout", "stdout_priority", "stderr_priority",
            "allow_metrics", *PROBE_KINDS,
        }, where)
        if name == "supervisor":
            self.problem(where, "the name 'supervisor' is reserved for the daemon's own metrics")
        elif not _valid_name(name):
            self.problem(where, "service names may hold letters, digits, '-', '_' and '.'")
        command = self.strings(data, "command", where)
        if "command" not in data:
            self.problem(f"{where}.command",
                         "required (an argv list, e.g. [\"python3\", \"app.py\"])")
        elif (not command or not command[0]) and not any(
                p.startswith(f"{where}.command") for p in self.problems):
            self.problem(f"{where}.command", "must be a non-empty list of strings")
        env_files = tuple(self.resolve(p.lstrip("-")) if not p.startswith("-")
                          else "-" + self.resolve(p[1:])
                          for p in self.strings(data, "env_file", where))
        env = self.environment(data, where, env_files)
        cwd = self.resolve(self.string(data, "cwd", where, "."))
        if not _is(Path.is_dir, cwd):
            # As written: an interpolated environment value is a secret (name it, not its value).
            self.problem(f"{where}.cwd", f"directory {_as_written(data, 'cwd', cwd)} does not "
                                         "exist")
        if command and command[0]:
            search_path = env.get("PATH") or self.environ.get("PATH", os.defpath)
            exe = command[0]
            if "/" in exe:
                exe = str(Path(cwd) / exe) if not Path(exe).is_absolute() else exe
                found = os.access(exe, os.X_OK) and _is(Path.is_file, exe)
            else:
                found = shutil.which(exe, path=search_path) is not None
            if not found:
                self.problem(f"{where}.command", f"executable "
                             f"{_as_written(data, 'command', command[0])!r} not found or not "
                             "executable")
        stop_signal = 15
        stop_signal_text = self.string(data, "stop_signal", where, interpolated=False)
        if stop_signal_text is not None:
            try:
                stop_signal = signal_number(stop_signal_text)
            except ValueError as exc:
                self.problem(f"{where}.stop_signal", str(exc))
        codes = data.get("success_exit_codes", [0])
        if not isinstance(codes, list) or not all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in codes):
            self.problem(f"{where}.success_exit_codes", "expected a list of integers 0..255")
            codes = [0]
        backoff = Backoff(
            initial=self.number(data, "backoff_initial", where, 1.0),
            max=self.number(data, "backoff_max", where, 60.0),
            factor=self.number(data, "backoff_factor", where, 2.0, 1.0,
                               maximum=MAX_BACKOFF_FACTOR),
            jitter=self.number(data, "backoff_jitter", where, 0.2, maximum=1.0),
            reset_after=self.number(data, "backoff_reset_after", where, 10.0),
            max_retries=self.integer(data, "max_retries", where, None),
        )
        if backoff.max < backoff.initial:
            self.problem(f"{where}.backoff_max", "must be >= backoff_initial")
        metrics_url = self.string(data, "metrics_url", where)
        if metrics_url is not None and not metrics_url.startswith(("http://", "https://")):
            self.problem(f"{where}.metrics_url", "expected an http:// or https:// URL")
        elif metrics_url is not None:
            self.secret_url(data, "metrics_url", metrics_url)
            self.url_ok(f"{where}.metrics_url", metrics_url, path_at_ok=True)
        return ServiceSpec(
            name=name,
            command=command,
            env=env,
            cwd=cwd,
            restart=self.choice(data, "restart", where, RESTART_POLICIES, "always"),
            stop_signal=stop_signal,
            stop_timeout=self.number(data, "stop_timeout", where, 10.0),
            start_seconds=self.number(data, "start_seconds", where, 1.0),
            autostart=self.boolean(data, "autostart", where, True),
            depends_on=self.strings(data, "depends_on", where, False),
            wait_for=self.strings(data, "wait_for", where, False),
            wait_timeout=self.number(data, "wait_timeout", where, 60.0),
            success_exit_codes=frozenset(codes),
            backoff=backoff,
            metrics_url=metrics_url,
            scrape_timeout=self.number(data, "scrape_timeout", where, 2.0, 0.0, strictly=True),
            inherit_env=self.boolean(data, "inherit_env", where, True),
            env_files=env_files,
            stdout_priority=self.priority(data, "stdout_priority", where,
                                          self.defaults.stdout_priority),
            stderr_priority=self.priority(data, "stderr_priority", where,
                                          self.defaults.stderr_priority),
            allow_metrics=self.globs(data, "allow_metrics", where),
            **self.probes(data, where, env, cwd),
        )

    def probes(self, data: Mapping[str, Any], where: str, env: Mapping[str, str],
               cwd: str) -> dict[str, ProbeSpec | None]:
        """The service's probe tables; an exec probe's program must exist, as the service's
        (a typo would otherwise fail the probe, and restart the service, forever)."""
        probes = {kind: self.probe(kind, data[kind], where)
                  for kind in PROBE_KINDS if kind in data}
        for kind, probe in probes.items():
            if probe is None or probe.type != "exec" or not probe.command:
                continue
            exe = probe.command[0]
            if "/" in exe:
                exe = str(Path(cwd) / exe) if not Path(exe).is_absolute() else exe
                found = os.access(exe, os.X_OK) and _is(Path.is_file, exe)
            else:
                search_path = env.get("PATH") or self.environ.get("PATH", os.defpath)
                found = shutil.which(exe, path=search_path) is not None
            if not found:
                written = _as_written(data[kind], "command", probe.command[0])
                self.problem(f"{where}.{kind}.command", f"executable {written!r} not found or "
                             "not executable")
        return probes

    def probe(self, kind: str, data: Any, where: str) -> ProbeSpec | None:
        """[services.NAME.liveness] and its siblings; every key checked, bounded and typed."""
        where = f"{where}.{kind}"
        if not self.is_table(data, where):
            return None
        self.table(data, {"type", "url", "address", "command", "period", "timeout",
                          "failure_threshold", "success_threshold", "initial_delay"}, where)
        kind_type = self.choice(data, "type", where, PROBE_TYPES, "tcp")
        if "type" not in data:
            self.problem(f"{where}.type", f"required (one of {', '.join(PROBE_TYPES)})")
        key = {"http": "url", "tcp": "address", "exec": "command"}[kind_type]
        for other in ("url", "address", "command"):
            if other != key and other in data:
                self.problem(f"{where}.{other}", f"not used by type {kind_type!r} (use {key})")
        target = ""
        command: tuple[str, ...] = ()
        if kind_type == "exec":
            command = self.strings(data, "command", where)
            if "command" in data and (not command or not command[0]) and not any(
                    p.startswith(f"{where}.command") for p in self.problems):
                self.problem(f"{where}.command", "must be a non-empty list of strings")
        else:
            target = self.string(data, key, where, "")
            if key in data and not target and not any(
                    p.startswith(f"{where}.{key}") for p in self.problems):
                self.problem(f"{where}.{key}", "must not be empty")
            elif target and kind_type == "tcp":
                try:
                    parse_listen(target)
                except ValueError as exc:
                    self.problem(f"{where}.address", str(exc))
            elif target and not target.startswith(("http://", "https://")):
                self.problem(f"{where}.url", "expected an http:// or https:// URL")
            elif target:  # like metrics_url: its credentials are masked wherever they show
                self.secret_url(data, "url", target)
                self.url_ok(f"{where}.url", target, path_at_ok=True)
        if key not in data and "type" in data:
            self.problem(f"{where}.{key}", "required")
        success_threshold = self.integer(data, "success_threshold", where, 1, minimum=1,
                                         maximum=MAX_PROBE_THRESHOLD)
        if kind != "readiness" and success_threshold != 1:
            self.problem(f"{where}.success_threshold", "must be 1 for a liveness or startup "
                         "probe (as in Kubernetes)")
        return ProbeSpec(
            kind=kind, type=kind_type, target=target, command=command,
            period=self.number(data, "period", where, 10.0, MIN_INTERVAL),
            timeout=self.number(data, "timeout", where, 1.0, 0.0, strictly=True,
                                maximum=MAX_PROBE_TIMEOUT),
            failure_threshold=self.integer(data, "failure_threshold", where, 3, minimum=1,
                                           maximum=MAX_PROBE_THRESHOLD),
            success_threshold=success_threshold,
            initial_delay=self.number(data, "initial_delay", where, 0.0),
        )

    def environment(self, data: Mapping[str, Any], where: str,
                    env_files: tuple[str, ...]) -> dict[str, str]:
        env: dict[str, str] = {}
        origin: dict[str, str] = {}  # variable -> the key path it came from
        for index, entry in enumerate(env_files):
            optional = entry.startswith("-")
            file_path = entry[1:] if optional else entry
            try:
                text = Path(file_path).read_text(encoding="utf-8")
            except OSError as exc:
                if not optional:
                    raw = data.get("env_file")
                    shown = (raw[index] if isinstance(raw, list) and index < len(raw)
                             and isinstance(raw[index], str) else
                             raw if isinstance(raw, str) else file_path)
                    self.problem(f"{where}.env_file[{index}]",
                                 f"cannot read {shown}: {exc.strerror or exc}")
                continue
            values, problems = parse_env_file(text)
            for line, message in problems:
                self.problem(f"{where}.env_file[{index}]", f"{file_path} line {line}: {message}")
            env.update(values)
            origin.update(dict.fromkeys(values, f"{where}.env_file[{index}] ({file_path})"))
        table = data.get("env", {})
        if not isinstance(table, dict):
            self.problem(f"{where}.env", f"expected a table of strings, got {_kind(table)}")
            return env
        for key, value in table.items():
            if not key or "=" in key or "\0" in key:
                self.problem(f"{where}.env.{key!r}" if key else f"{where}.env",
                             "a variable name must be non-empty, without '=' or NUL bytes")
                continue
            if not isinstance(value, (str, int, float, bool)) or isinstance(value, bool):
                self.problem(f"{where}.env.{key}", f"expected a string, got {_kind(value)}")
                continue
            env[key] = self.expand(str(value), f"{where}.env.{key}", secret=True)
            origin[key] = f"{where}.env.{key}"
            if "://" in env[key]:
                self.secret_targets.append(env[key])
        for key, value in env.items():
            # After ${VAR} interpolation and env files; the value itself is never shown.
            self.no_nul(value, origin.get(key, f"{where}.env.{key}"), f"the value of {key}")
        for key in PRIVATE_ENV:
            if key in env:
                self.problem(f"{where}.env.{key}", "reserved for the daemon's own use by systemd")
        return env

    def check(self, name: str, data: Mapping[str, Any]) -> CheckSpec:
        where = f"checks.{name}"
        self.table(data, {"type", "dsn", "dsn_file", "url", "address", "query", "timeout",
                          "interval"}, where)
        kind = self.choice(data, "type", where, CHECK_TYPES, "tcp")
        if "type" not in data:
            self.problem(f"{where}.type", f"required (one of {', '.join(CHECK_TYPES)})")
        key = {"postgres": "dsn", "redis": "url", "http": "url", "tcp": "address"}[kind]
        target = self.string(data, key, where)
        if kind == "postgres" and "dsn_file" in data:
            if target is not None:
                self.problem(f"{where}.dsn_file", "give either dsn or dsn_file, not both")
            dsn_file = self.resolve(self.string(data, "dsn_file", where, ""))
            try:
                target = Path(dsn_file).read_text(encoding="utf-8").strip()
                self.secret_whole.append(target)
            except OSError as exc:
                self.problem(f"{where}.dsn_file", f"cannot read "
                             f"{_as_written(data, 'dsn_file', dsn_file)}: {exc.strerror or exc}")
            except UnicodeDecodeError:
                self.problem(f"{where}.dsn_file", "is not valid UTF-8")
        for other in ("dsn", "url", "address"):
            if other != key and other in data:
                self.problem(f"{where}.{other}", f"not used by type {kind!r} (use {key})")
        if target is not None and kind != "tcp":
            self.secret_url(data, key, target)
        if target is None:
            if "type" in data:
                self.problem(f"{where}.{key}", "required")
            target = ""
        elif kind == "tcp":
            try:
                parse_listen(target)
            except ValueError as exc:
                self.problem(f"{where}.address", str(exc))
        elif kind == "postgres" and not target.startswith(("postgres://", "postgresql://")):
            self.problem(f"{where}.dsn", "expected a postgresql:// URL")
        elif kind == "redis" and not target.startswith(("redis://", "rediss://", "unix://")):
            self.problem(f"{where}.url", "expected a redis:// URL")
        elif kind == "http" and not target.startswith(("http://", "https://")):
            self.problem(f"{where}.url", "expected an http:// or https:// URL")
        else:
            source = "dsn_file" if kind == "postgres" and "dsn_file" in data else key
            self.url_ok(f"{where}.{source}", target, path_at_ok=kind == "http")
        if "query" in data and kind != "postgres":
            self.problem(f"{where}.query", "only postgres checks take a query")
        return CheckSpec(
            name=name,
            type=kind,
            target=target,
            query=self.string(data, "query", where, "SELECT 1", interpolated=False),
            timeout=self.number(data, "timeout", where, 1.0, 0.0, strictly=True),
            interval=self.number(data, "interval", where, 5.0, MIN_INTERVAL),
        )

    def start_order(self, services: dict[str, ServiceSpec],
                    checks: Mapping[str, CheckSpec]) -> dict[str, ServiceSpec]:
        for spec in services.values():
            for dep in spec.depends_on:
                if dep not in services:
                    self.problem(f"services.{spec.name}.depends_on", f"unknown service {dep!r}")
                elif dep == spec.name:
                    self.problem(f"services.{spec.name}.depends_on",
                                 "a service cannot depend on itself")
            for check in spec.wait_for:
                if check not in checks:
                    self.problem(f"services.{spec.name}.wait_for", f"unknown check {check!r}")
        ordered: dict[str, ServiceSpec] = {}
        visiting: list[str] = []

        def visit(name: str) -> None:
            if name in ordered or name not in services:
                return
            if name in visiting:
                cycle = " -> ".join(visiting[visiting.index(name):] + [name])
                self.problem(f"services.{name}.depends_on", f"dependency cycle: {cycle}")
                return
            visiting.append(name)
            for dep in services[name].depends_on:
                visit(dep)
            visiting.pop()
            ordered[name] = services[name]

        for name in services:
            visit(name)
        return ordered


def _is(test: Callable[[Path], bool], path: str) -> bool:
    """Path.is_dir / is_file, False for a name the OS refuses (too long, ...)."""
    try:
        return test(Path(path))
    except (OSError, ValueError):
        return False


def _number_text(value: float) -> str:
    """A number for an error message; TOML integers have no size limit, floats' text has."""
    if isinstance(value, int):
        return str(value) if abs(value) < 10**30 else "a number of more than 30 digits"
    return f"{value:g}"


def _as_written(data: Mapping[str, Any], key: str, expanded: str) -> str:
    """The config's own text for `data[key]` (its first item for a list), `${VAR}` references
    unexpanded; `expanded` when the key holds nothing usable."""
    raw = data.get(key)
    if isinstance(raw, list) and raw:
        raw = raw[0]
    return raw if isinstance(raw, str) else expanded


def _valid_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_." for c in name)


def _kind(value: Any) -> str:
    names: dict[type, str] = {str: "a string", bool: "a boolean", int: "an integer",
                              float: "a number", list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def load_toml_file(path: str) -> dict[str, Any]:
    """Raw TOML, for callers that need one key of a file that may be otherwise invalid."""
    with open(path, "rb") as f:
        return tomllib.load(f)


def child_environment(spec: ServiceSpec, daemon_environ: Mapping[str, str]) -> dict[str, str]:
    """The complete environment a service's process starts with."""
    env = ({k: v for k, v in daemon_environ.items() if k not in PRIVATE_ENV}
           if spec.inherit_env else {})
    env.update(spec.env)
    return env

