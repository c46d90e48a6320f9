"""One table of check kinds (supervisor/config/kinds.py) ties the config's validation to the
probes' dispatch (supervisor/checks/probes.py): a kind without a probe, or a probe without a
kind, fails here; the parser takes every kind where the table says, and only there; and each
kind reaches its own probe, on both backends."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from supervisor.checks.aioloop import AsyncioThread
from supervisor.checks.probes import PROBES, CheckResult, probe, probe_service
from supervisor.config import (
    CHECK_TYPES,
    KIND,
    KINDS,
    PROBE_TYPES,
    Backoff,
    CheckKind,
    CheckSpec,
    ProbeSpec,
    ServiceSpec,
    Settings,
    load_config,
)
from supervisor.core.errors import ConfigError
from supervisor.process.spawn import spawn
from tests.support import free_port


def test_every_kind_has_a_probe_and_every_probe_a_kind() -> None:
    assert sorted(set(KIND) - set(PROBES)) == [], "a kind in config/kinds.py has no probe"
    assert sorted(set(PROBES) - set(KIND)) == [], "a probe has no kind in config/kinds.py"
    assert len(KIND) == len(KINDS), "a kind is listed twice"


def test_each_kind_is_usable_somewhere_and_its_target_form_is_one_the_parser_reads() -> None:
    for kind in KINDS:
        assert kind.dependency or kind.service_probe, kind.name
        assert (kind.form == "url") == bool(kind.schemes), kind.name
        assert (kind.form == "url") == bool(kind.scheme_hint), kind.name
        # A [checks.NAME] target is a URL or host:port (the parser reads no argv there).
        assert not (kind.dependency and kind.form == "argv"), kind.name


def _problems(tmp_path: Path, tables: str) -> list[str]:
    path = tmp_path / "services.toml"
    path.write_text(f'[services.app]\ncommand = ["{sys.executable}"]\n{tables}')
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={"PATH": os.defpath})
    return caught.value.problems


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_the_parser_takes_a_kind_where_the_table_says_and_only_there(
        tmp_path: Path, kind: CheckKind) -> None:
    # With its type alone, a kind is refused by type where it is not usable (then its target
    # is asked for as tcp's, the fallback), and asked for its own target where it is.
    problems = _problems(tmp_path, f'[checks.dep]\ntype = "{kind.name}"\n')
    if kind.dependency:
        assert problems == [f"checks.dep.{kind.key}: required"]
    else:
        assert problems[0] == f"checks.dep.type: expected one of {', '.join(CHECK_TYPES)}"
    problems = _problems(tmp_path, f'[services.app.liveness]\ntype = "{kind.name}"\n')
    if kind.service_probe:
        assert problems == [f"services.app.liveness.{kind.key}: required"]
    else:
        assert problems[0] == (
            f"services.app.liveness.type: expected one of {', '.join(PROBE_TYPES)}")


def test_an_absent_key_takes_the_schemas_default(tmp_path: Path) -> None:
    """The defaults are written once, in the dataclasses; the parser reads them from there."""
    path = tmp_path / "services.toml"
    path.write_text(f'[services.app]\ncommand = ["{sys.executable}"]\n'
                    '[services.app.liveness]\ntype = "tcp"\naddress = "127.0.0.1:1"\n'
                    '[checks.dep]\ntype = "tcp"\naddress = "127.0.0.1:1"\n')
    config = load_config(path, environ={"PATH": os.defpath})
    service, check = config.services["app"], config.checks["dep"]
    assert service.liveness is not None
    parsed: list[tuple[object, type]] = [(config.settings, Settings), (service, ServiceSpec),
                                         (service.backoff, Backoff),
                                         (service.liveness, ProbeSpec), (check, CheckSpec)]
    given = {"liveness", "target"}  # set above
    compared = 0
    for value, schema in parsed:
        for f in fields(schema):
            if f.name in given:
                continue
            if f.default_factory is not MISSING:
                default = f.default_factory()
            elif f.default is not MISSING:
                default = f.default
            else:
                continue  # required: no default to take
            assert getattr(value, f.name) == default, f"{schema.__name__}.{f.name}"
            compared += 1
    assert compared >= 40


@pytest.fixture
def bridge() -> Iterator[AsyncioThread]:
    with AsyncioThread() as thread:
        yield thread


def _refused(kind: CheckKind, port: int) -> tuple[str, tuple[str, ...]]:
    """A target of `kind` that nothing answers (a free port), from the table alone."""
    if kind.form == "url":
        return f"{kind.schemes[0]}127.0.0.1:{port}/", ()
    if kind.form == "address":
        return f"127.0.0.1:{port}", ()
    return "", (sys.executable, "-c", "raise SystemExit(3)")


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
async def test_each_kind_reaches_its_own_probe(kind: CheckKind, bridge: AsyncioThread) -> None:
    target, command = _refused(kind, free_port())
    results: list[CheckResult] = []
    if kind.dependency:
        spec = CheckSpec("dep", kind.name, target, timeout=2.0)
        results.append(await probe(spec, bridge))
    if kind.service_probe:
        probe_spec = ProbeSpec("liveness", kind.name, target, command, timeout=2.0)
        results.append(await probe_service("app", probe_spec, spawner=spawn,
                                           env=dict(os.environ)))
    assert results
    for result in results:
        assert not result.healthy
        error = result.error or ""
        # The kind's own probe failed on the refused target (or the exit code), not dispatch.
        assert error.startswith(("connect:", "request:", "exec:")), error
        assert "unknown check type" not in error and "no spawner" not in error
