"""services.toml (and the exporter-toolkit web config it names) into frozen values.

schema.py holds the values and their defaults, parser.py reads the TOML into them, kinds.py
is the table of check kinds, deny.py the FR52 deny list's entries and matching, webconfig.py
the web config file. The names the rest of the daemon uses are importable from here.
"""

from supervisor.config.deny import DEFAULT_DENY_METRICS
from supervisor.config.kinds import CHECK_TYPES, KIND, KINDS, PROBE_TYPES, CheckKind
from supervisor.config.parser import load_config, load_toml_file
from supervisor.config.schema import (
    MAX_BACKOFF_FACTOR,
    MAX_CONNECTIONS,
    MAX_PROBE_THRESHOLD,
    MAX_PROBE_TIMEOUT,
    MAX_RETRIES,
    MAX_SECONDS,
    MAX_SOCKET_PATH,
    MIN_INTERVAL,
    PRIVATE_ENV,
    PROBE_KINDS,
    RELOADED,
    RESTART_ONLY,
    CheckSpec,
    Config,
    ProbeSpec,
    ServiceSpec,
    Settings,
    child_environment,
    restart_only_changes,
)
from supervisor.core.policy import RESTART_POLICIES, Backoff

__all__ = [
    "CHECK_TYPES", "DEFAULT_DENY_METRICS", "KIND", "KINDS", "MAX_BACKOFF_FACTOR",
    "MAX_CONNECTIONS", "MAX_PROBE_THRESHOLD", "MAX_PROBE_TIMEOUT", "MAX_RETRIES", "MAX_SECONDS",
    "MAX_SOCKET_PATH", "MIN_INTERVAL", "PRIVATE_ENV", "PROBE_KINDS", "PROBE_TYPES",
    "RELOADED", "RESTART_ONLY", "RESTART_POLICIES", "Backoff", "CheckKind", "CheckSpec",
    "Config", "ProbeSpec", "ServiceSpec", "Settings", "child_environment", "load_config",
    "load_toml_file", "restart_only_changes",
]
