"""What a valid services.toml becomes: frozen values, each default written once, here.

The parser (parser.py) fills these from the TOML and takes every default it does not read
from these dataclasses; the bounds below are what it accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from supervisor.config.deny import DEFAULT_DENY_METRICS
from supervisor.core.policy import Backoff, Policy, RestartPolicy
from supervisor.core.redact import config_secrets

if TYPE_CHECKING:  # webconfig loads ssl; only a web_config_file needs it
    from supervisor.config.webconfig import WebConfig

LOG_LEVELS = ("debug", "info", "warning", "error")
# "auto": a cgroup per service where possible, else the fallback; "required": refuse to start
# without one (an operator who relies on containment is told, not silently downgraded);
# "off": never.
CGROUP_MODES = ("auto", "required", "off")
# Bounds on every number, so that what check-config accepts, run and reload can run: NaN and
# infinities are refused everywhere (TOML accepts them); durations are at most a week, loops
# (scrape, stats and check intervals) at least 10 ms apart, backoff_factor at most 100.
MAX_SECONDS = 7 * 24 * 3600.0
MIN_INTERVAL = 0.01
MAX_BACKOFF_FACTOR = 100.0
MAX_RETRIES = 1_000_000_000
MAX_CONNECTIONS = 65_536
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, with the terminating NUL
# Service probes ([services.NAME.liveness|readiness|startup]), named as in Kubernetes.
PROBE_KINDS = ("startup", "liveness", "readiness")
MAX_PROBE_THRESHOLD = 10_000
MAX_PROBE_TIMEOUT = 3600.0
# Variables that belong to the daemon's own relation with systemd; a child must never see them.
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
               "LISTEN_FDNAMES")


@dataclass(frozen=True)
class ProbeSpec:
    """One probe of a service (liveness, readiness or startup), as in Kubernetes."""

    kind: str  # "liveness" | "readiness" | "startup"
    type: str  # a kind of check usable as a service probe (kinds.PROBE_TYPES)
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
    # (observability.scrape_targets) without restarting its process.
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
    """One check of any kind (kinds.KINDS): a [checks.NAME] table, or what a service probe
    checks each period."""

    name: str
    type: str
    target: str = field(repr=False)  # DSN / URL / host:port; may hold a password: never print
    query: str = "SELECT 1"
    timeout: float = 1.0
    interval: float = 5.0
    command: tuple[str, ...] = field(default=(), repr=False)  # exec (service probes only)


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
    deny_metrics: tuple[str, ...] = DEFAULT_DENY_METRICS  # config entries are added to these
    max_connections: int = 128
    stdout_priority: int = 6  # the services' default (see ServiceSpec)
    stderr_priority: int = 4
    web_config_file: str | None = None
    # TLS and basic auth, read from web_config_file at load (and reload)
    web_config: WebConfig | None = field(default=None, compare=False, repr=False)
    # Globs of the metric families services may expose (strict mode); None: any family.
    allow_metrics: tuple[str, ...] | None = None
    cgroups: str = "auto"  # one of CGROUP_MODES
    # /v1/ready also requires every service with a readiness probe to be ready.
    ready_includes_services: bool = False


# How a reload treats each [supervisor] key (tests/test_reload_settings.py keeps every Settings
# field in exactly one of the two). Restart-only keys are taken once, at startup: a socket is
# bound, the cgroups are made, logging and the HTTP worker pool are set up. A reload that
# changes one keeps the running value and says so (log, `supervisor reload`), instead of
# letting the file claim what the daemon does not do.
RESTART_ONLY: Mapping[str, tuple[str, ...]] = {
    "listen": ("listen_host", "listen_port"),
    "control_socket": ("control_socket",),
    "control_socket_group": ("control_socket_group",),
    "cgroups": ("cgroups",),
    "log_level": ("log_level",),
    "max_connections": ("max_connections",),
}
# Applied by a reload (read where they are used, or handed over by Observability.reconfigure;
# the priorities reach services through their specs, which a reload compares).
RELOADED = frozenset({
    "environment", "scrape_interval", "stats_interval", "deny_metrics", "allow_metrics",
    "stdout_priority", "stderr_priority", "web_config_file", "web_config",
    "ready_includes_services",
})


def restart_only_changes(old: Settings, new: Settings) -> list[str]:
    """The restart-only [supervisor] keys whose value differs between `old` and `new`."""
    return [key for key, fields in RESTART_ONLY.items()
            if any(getattr(old, f) != getattr(new, f) for f in fields)]


@dataclass(frozen=True)
class Config:
    path: str
    settings: Settings
    services: Mapping[str, ServiceSpec]  # in start order: dependencies first
    checks: Mapping[str, CheckSpec] = field(default_factory=dict)
    # Every form of every credential above (see redact.config_secrets): masked by value in
    # whatever leaves the daemon. Never printed, never compared.
    secrets: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def all_secrets(self) -> set[str]:
        """`secrets`, and (for a Config built another way than load_config) the credentials
        in the targets themselves."""
        return set(self.secrets) | config_secrets(
            [c.target for c in self.checks.values() if c.type != "tcp"]
            + [s.metrics_url for s in self.services.values() if s.metrics_url]
            + [p.target for s in self.services.values() for p in s.probes().values()
               if p.type == "http"])


def child_environment(spec: ServiceSpec, daemon_environ: Mapping[str, str]) -> dict[str, str]:
    """The complete environment a service's process starts with."""
    env = ({k: v for k, v in daemon_environ.items() if k not in PRIVATE_ENV}
           if spec.inherit_env else {})
    env.update(spec.env)
    return env
