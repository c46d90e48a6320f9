"""Parse services.toml once, at the edge, into the frozen values of schema.py.

Every problem is collected with its TOML key path (`services.api.restart: ...`) and raised
together as one ConfigError; unknown keys are errors, never silently ignored. Values of
environment variables and DSNs never appear in error text. A key that is absent takes the
schema's default, read from the dataclasses (never written here a second time); checks and
probes are validated from the table of check kinds (kinds.py).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from supervisor.config.deny import DenyPatterns, denies_everything
from supervisor.config.kinds import CHECK_TYPES, KIND, KINDS, PROBE_TYPES
from supervisor.config.reader import Reader, as_written, path_is, type_name
from supervisor.config.schema import (
    CGROUP_MODES,
    LOG_LEVELS,
    MAX_BACKOFF_FACTOR,
    MAX_CONNECTIONS,
    MAX_PROBE_THRESHOLD,
    MAX_PROBE_TIMEOUT,
    MAX_SOCKET_PATH,
    MIN_INTERVAL,
    PRIVATE_ENV,
    PROBE_KINDS,
    CheckSpec,
    Config,
    ProbeSpec,
    ServiceSpec,
    Settings,
)
from supervisor.core.datatypes import parse_env_file, parse_listen, signal_number
from supervisor.core.errors import ConfigError
from supervisor.core.policy import RESTART_POLICIES, Backoff
from supervisor.core.redact import config_secrets, interpolated_values, url_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The schema's defaults, read from its dataclasses. The required fields of the last three
# are placeholders: only the defaults of these instances are ever read.
_SETTINGS = Settings()
_BACKOFF = Backoff()
_SERVICE = ServiceSpec(name="", command=(), env={}, cwd="")
_PROBE = ProbeSpec(kind="", type="")
_CHECK = CheckSpec(name="", type="", target="")


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


class _Parser(Reader):
    def __init__(self, path: str, environ: dict[str, str]) -> None:
        super().__init__(path, environ)
        self.defaults = _SETTINGS  # then the [supervisor] table's, for the services
        # What redact.config_secrets needs: targets holding credentials, environment values
        # interpolated into them, and dsn_file contents.
        self.secret_targets: list[str] = []
        self.secret_env: set[str] = set()
        self.secret_whole: list[str] = []

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
        deny = DenyPatterns(settings.deny_metrics)
        for kind, names in (("services", services), ("checks", checks)):
            for name in names:
                if deny.denies(name):
                    self.problem(f"{kind}.{name}", "the name matches the FR52 deny list "
                                 "(deny_metrics); it would be a label value on every series")
        if deny.denies(settings.environment):
            self.problem("supervisor.environment", "the value (or $ENVIRONMENT) matches the "
                         "FR52 deny list (deny_metrics); it is a label on every series")

    def settings(self, data: Mapping[str, Any]) -> Settings:
        where = "supervisor"
        self.table(data, {"listen", "environment", "scrape_interval", "stats_interval",
                          "control_socket", "control_socket_group", "log_level",
                          "deny_metrics", "allow_metrics", "max_connections",
                          "stdout_priority", "stderr_priority", "web_config_file", "cgroups",
                          "ready_includes_services"},
                   where)
        defaults = _SETTINGS
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
            from supervisor.config.webconfig import WebConfigError, load_web_config

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
            scrape_interval=self.number(data, "scrape_interval", where,
                                        defaults.scrape_interval, MIN_INTERVAL),
            stats_interval=self.number(data, "stats_interval", where, defaults.stats_interval,
                                       MIN_INTERVAL),
            control_socket=self.socket_path(control_socket, f"{where}.control_socket"),
            control_socket_group=self.string(data, "control_socket_group", where),
            log_level=self.choice(data, "log_level", where, LOG_LEVELS, defaults.log_level),
            deny_metrics=defaults.deny_metrics + self.deny_entries(data, where),
            allow_metrics=self.globs(data, "allow_metrics", where),
            max_connections=self.integer(data, "max_connections", where,
                                         defaults.max_connections, minimum=1,
                                         maximum=MAX_CONNECTIONS),
            stdout_priority=self.priority(data, "stdout_priority", where,
                                          defaults.stdout_priority),
            stderr_priority=self.priority(data, "stderr_priority", where,
                                          defaults.stderr_priority),
            web_config_file=web_config_file or None,
            web_config=web_config,
            cgroups=self.choice(data, "cgroups", where, CGROUP_MODES, defaults.cgroups),
            ready_includes_services=self.boolean(data, "ready_includes_services", where,
                                                 defaults.ready_includes_services),
        )

    def deny_entries(self, data: Mapping[str, Any], where: str) -> tuple[str, ...]:
        entries = self.strings(data, "deny_metrics", where, False)
        for index, entry in enumerate(entries):
            if denies_everything(entry):
                self.problem(f"{where}.deny_metrics[{index}]", "an entry needs at least one "
                             "letter or digit (it would deny every metric)")
        return entries

    def socket_path(self, text: str | None, where: str) -> str | None:
        if not text:
            return None
        path = self.resolve(text)
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            self.problem(where, f"path {path} is longer than a Unix socket allows "
                                f"({MAX_SOCKET_PATH} bytes)")
        return path

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
        if not path_is(Path.is_dir, cwd):
            # As written: an interpolated environment value is a secret (name it, not its value).
            self.problem(f"{where}.cwd", f"directory {as_written(data, 'cwd', cwd)} does not "
                                         "exist")
        if command and command[0]:
            self.executable(command[0], data, f"{where}.command", env, cwd)
        stop_signal = _SERVICE.stop_signal
        stop_signal_text = self.string(data, "stop_signal", where, interpolated=False)
        if stop_signal_text is not None:
            try:
                stop_signal = signal_number(stop_signal_text)
            except ValueError as exc:
                self.problem(f"{where}.stop_signal", str(exc))
        codes = _SERVICE.success_exit_codes
        if "success_exit_codes" in data:
            given = data["success_exit_codes"]
            if isinstance(given, list) and all(isinstance(c, int) and not isinstance(c, bool)
                                               and 0 <= c <= 255 for c in given):
                codes = frozenset(given)
            else:
                self.problem(f"{where}.success_exit_codes", "expected a list of integers 0..255")
        backoff = Backoff(
            initial=self.number(data, "backoff_initial", where, _BACKOFF.initial),
            max=self.number(data, "backoff_max", where, _BACKOFF.max),
            factor=self.number(data, "backoff_factor", where, _BACKOFF.factor, 1.0,
                               maximum=MAX_BACKOFF_FACTOR),
            jitter=self.number(data, "backoff_jitter", where, _BACKOFF.jitter, maximum=1.0),
            reset_after=self.number(data, "backoff_reset_after", where, _BACKOFF.reset_after),
            max_retries=self.integer(data, "max_retries", where, _BACKOFF.max_retries),
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
            restart=self.choice(data, "restart", where, RESTART_POLICIES, _SERVICE.restart),
            stop_signal=stop_signal,
            stop_timeout=self.number(data, "stop_timeout", where, _SERVICE.stop_timeout),
            start_seconds=self.number(data, "start_seconds", where, _SERVICE.start_seconds),
            autostart=self.boolean(data, "autostart", where, _SERVICE.autostart),
            depends_on=self.strings(data, "depends_on", where, False),
            wait_for=self.strings(data, "wait_for", where, False),
            wait_timeout=self.number(data, "wait_timeout", where, _SERVICE.wait_timeout),
            success_exit_codes=codes,
            backoff=backoff,
            metrics_url=metrics_url,
            scrape_timeout=self.number(data, "scrape_timeout", where, _SERVICE.scrape_timeout,
                                       0.0, strictly=True),
            inherit_env=self.boolean(data, "inherit_env", where, _SERVICE.inherit_env),
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
            self.executable(probe.command[0], data[kind], f"{where}.{kind}.command", env, cwd)
        return probes

    def executable(self, exe: str, data: Mapping[str, Any], where: str,
                   env: Mapping[str, str], cwd: str) -> None:
        """`exe` (data["command"][0] expanded) must exist and be executable where it will run:
        relative to `cwd` when it holds a `/`, else on the service's PATH."""
        if "/" in exe:
            path = str(Path(cwd) / exe) if not Path(exe).is_absolute() else exe
            found = os.access(path, os.X_OK) and path_is(Path.is_file, path)
        else:
            search_path = env.get("PATH") or self.environ.get("PATH", os.defpath)
            found = shutil.which(exe, path=search_path) is not None
        if not found:
            # As written: an interpolated environment value is a secret.
            written = as_written(data, "command", exe)
            self.problem(where, f"executable {written!r} not found or not executable")

    def probe(self, kind: str, data: Any, where: str) -> ProbeSpec | None:
        """[services.NAME.liveness] and its siblings; every key checked, bounded and typed."""
        where = f"{where}.{kind}"
        if not self.is_table(data, where):
            return None
        probe_kinds = [k for k in KINDS if k.service_probe]
        target_keys = tuple(dict.fromkeys(k.key for k in probe_kinds))  # url, address, command
        self.table(data, {"type", *target_keys, "period", "timeout", "failure_threshold",
                          "success_threshold", "initial_delay"}, where)
        check = KIND[self.choice(data, "type", where, PROBE_TYPES, "tcp")]
        if "type" not in data:
            self.problem(f"{where}.type", f"required (one of {', '.join(PROBE_TYPES)})")
        key = check.key
        for other in target_keys:
            if other != key and other in data:
                self.problem(f"{where}.{other}", f"not used by type {check.name!r} (use {key})")
        target = _PROBE.target
        command = _PROBE.command
        if check.form == "argv":
            command = self.strings(data, key, where)
            if key in data and (not command or not command[0]) and not any(
                    p.startswith(f"{where}.{key}") for p in self.problems):
                self.problem(f"{where}.{key}", "must be a non-empty list of strings")
        else:
            target = self.string(data, key, where, "")
            if key in data and not target and not any(
                    p.startswith(f"{where}.{key}") for p in self.problems):
                self.problem(f"{where}.{key}", "must not be empty")
            elif target and check.form == "address":
                try:
                    parse_listen(target)
                except ValueError as exc:
                    self.problem(f"{where}.{key}", str(exc))
            elif target and not target.startswith(check.schemes):
                self.problem(f"{where}.{key}", check.scheme_hint)
            elif target:  # like metrics_url: its credentials are masked wherever they show
                self.secret_url(data, key, target)
                self.url_ok(f"{where}.{key}", target, path_at_ok=check.path_at_ok)
        if key not in data and "type" in data:
            self.problem(f"{where}.{key}", "required")
        success_threshold = self.integer(data, "success_threshold", where,
                                         _PROBE.success_threshold, minimum=1,
                                         maximum=MAX_PROBE_THRESHOLD)
        if kind != "readiness" and success_threshold != 1:
            self.problem(f"{where}.success_threshold", "must be 1 for a liveness or startup "
                         "probe (as in Kubernetes)")
        return ProbeSpec(
            kind=kind, type=check.name, target=target, command=command,
            period=self.number(data, "period", where, _PROBE.period, MIN_INTERVAL),
            timeout=self.number(data, "timeout", where, _PROBE.timeout, 0.0, strictly=True,
                                maximum=MAX_PROBE_TIMEOUT),
            failure_threshold=self.integer(data, "failure_threshold", where,
                                           _PROBE.failure_threshold, minimum=1,
                                           maximum=MAX_PROBE_THRESHOLD),
            success_threshold=success_threshold,
            initial_delay=self.number(data, "initial_delay", where, _PROBE.initial_delay),
        )

    def environment(self, data: Mapping[str, Any], where: str,
                    env_files: tuple[str, ...]) -> dict[str, str]:
        env: dict[str, str] = {}
        origin: dict[str, str] = {}  # variable -> the key path it came from
        for index, entry in enumerate(env_files):
            optional = entry.startswith("-")
            file_path = entry[1:] if optional else entry
            raw = data.get("env_file")
            shown = (raw[index] if isinstance(raw, list) and index < len(raw)
                     and isinstance(raw[index], str) else
                     raw if isinstance(raw, str) else file_path)
            try:
                text = Path(file_path).read_text(encoding="utf-8")
            except OSError as exc:
                if not optional:
                    self.problem(f"{where}.env_file[{index}]",
                                 f"cannot read {shown}: {exc.strerror or exc}")
                continue
            except UnicodeDecodeError:  # present, so reported even when optional
                self.problem(f"{where}.env_file[{index}]", f"cannot read {shown}: not UTF-8")
                continue
            values, problems = parse_env_file(text)
            for line, message in problems:
                self.problem(f"{where}.env_file[{index}]", f"{file_path} line {line}: {message}")
            env.update(values)
            origin.update(dict.fromkeys(values, f"{where}.env_file[{index}] ({file_path})"))
        table = data.get("env", {})
        if not isinstance(table, dict):
            self.problem(f"{where}.env", f"expected a table of strings, got {type_name(table)}")
            return env
        for key, value in table.items():
            if not key or "=" in key or "\0" in key:
                self.problem(f"{where}.env.{key!r}" if key else f"{where}.env",
                             "a variable name must be non-empty, without '=' or NUL bytes")
                continue
            if not isinstance(value, (str, int, float, bool)) or isinstance(value, bool):
                self.problem(f"{where}.env.{key}", f"expected a string, got {type_name(value)}")
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
        dependency_kinds = [k for k in KINDS if k.dependency]
        target_keys = tuple(dict.fromkeys(k.key for k in dependency_kinds))  # dsn, url, address
        self.table(data, {"type", *target_keys, "timeout", "interval",
                          *(f"{k.key}_file" for k in dependency_kinds if k.target_file),
                          *(["query"] if any(k.query for k in dependency_kinds) else [])}, where)
        check = KIND[self.choice(data, "type", where, CHECK_TYPES, "tcp")]
        if "type" not in data:
            self.problem(f"{where}.type", f"required (one of {', '.join(CHECK_TYPES)})")
        key = check.key
        file_key = f"{key}_file"
        from_file = check.target_file and file_key in data
        target = self.string(data, key, where)
        if from_file:
            if target is not None:
                self.problem(f"{where}.{file_key}", f"give either {key} or {file_key}, not both")
            target_file = self.resolve(self.string(data, file_key, where, ""))
            try:
                target = Path(target_file).read_text(encoding="utf-8").strip()
                self.secret_whole.append(target)
            except OSError as exc:
                self.problem(f"{where}.{file_key}", f"cannot read "
                             f"{as_written(data, file_key, target_file)}: "
                             f"{exc.strerror or exc}")
            except UnicodeDecodeError:
                self.problem(f"{where}.{file_key}", "is not valid UTF-8")
        for other in target_keys:
            if other != key and other in data:
                self.problem(f"{where}.{other}", f"not used by type {check.name!r} (use {key})")
        if target is not None and check.form == "url":
            self.secret_url(data, key, target)
        if target is None:
            if "type" in data:
                self.problem(f"{where}.{key}", "required")
            target = ""
        elif check.form == "address":
            try:
                parse_listen(target)
            except ValueError as exc:
                self.problem(f"{where}.{key}", str(exc))
        elif not target.startswith(check.schemes):
            self.problem(f"{where}.{key}", check.scheme_hint)
        else:
            source = file_key if from_file else key
            self.url_ok(f"{where}.{source}", target, path_at_ok=check.path_at_ok)
        if "query" in data and not check.query:
            takers = " and ".join(k.name for k in dependency_kinds if k.query)
            self.problem(f"{where}.query", f"only {takers} checks take a query")
        return CheckSpec(
            name=name,
            type=check.name,
            target=target,
            query=self.string(data, "query", where, _CHECK.query, interpolated=False),
            timeout=self.number(data, "timeout", where, _CHECK.timeout, 0.0, strictly=True),
            interval=self.number(data, "interval", where, _CHECK.interval, MIN_INTERVAL),
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


def _valid_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_." for c in name)


def load_toml_file(path: str) -> dict[str, Any]:
    """Raw TOML, for callers that need one key of a file that may be otherwise invalid."""
    with open(path, "rb") as f:
        return tomllib.load(f)

