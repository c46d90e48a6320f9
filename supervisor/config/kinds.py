"""The kinds of check, in one table: what each one's TOML looks like, and where it may be used.

A kind is usable as a dependency check (`[checks.NAME]`, behind `/v1/ready` and `wait_for`),
as a service probe (`[services.NAME.liveness|readiness|startup]`), or both. The parser
validates every check and probe from this table, and supervisor/checks/probes.py runs each
kind through its `PROBES` entry; tests/test_check_kinds.py fails when the two disagree. So
adding a kind (say `mysql`) is one entry here and one probe function there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# How a target is written: a URL (checked against `schemes`, then by redact.url_problem),
# `host:port` (datatypes.parse_listen) or an argv list.
TargetForm = Literal["url", "address", "argv"]


@dataclass(frozen=True)
class CheckKind:
    name: str  # the `type` value
    key: str  # the TOML key holding the target
    form: TargetForm
    schemes: tuple[str, ...] = ()  # the URL schemes accepted (form "url")
    scheme_hint: str = ""  # the problem reported for any other scheme
    path_at_ok: bool = False  # an `@` in the URL's path is not a misplaced credential
    dependency: bool = False  # usable as a [checks.NAME] table
    service_probe: bool = False  # usable as a service's liveness, readiness or startup probe
    query: bool = False  # takes `query` (dependency checks)
    target_file: bool = False  # the target may instead be read from the file `<key>_file`


KINDS: tuple[CheckKind, ...] = (
    CheckKind("postgres", "dsn", "url", ("postgres://", "postgresql://"),
              "expected a postgresql:// URL", dependency=True, query=True, target_file=True),
    CheckKind("redis", "url", "url", ("redis://", "rediss://", "unix://"),
              "expected a redis:// URL", dependency=True),
    CheckKind("http", "url", "url", ("http://", "https://"),
              "expected an http:// or https:// URL", path_at_ok=True, dependency=True,
              service_probe=True),
    CheckKind("tcp", "address", "address", dependency=True, service_probe=True),
    CheckKind("exec", "command", "argv", service_probe=True),
)
KIND = {kind.name: kind for kind in KINDS}
# In table order, as error messages list them.
CHECK_TYPES = tuple(kind.name for kind in KINDS if kind.dependency)
PROBE_TYPES = tuple(kind.name for kind in KINDS if kind.service_probe)
