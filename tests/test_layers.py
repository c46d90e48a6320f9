"""The package's layers import one way only, so each can be read (and tested) without the ones
above it. The order is README's layout table; every import counts, including those inside
functions (kept there so services spawn before prometheus_client loads) and under
`TYPE_CHECKING`, because a type-only import is still a dependency a reader has to follow."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "supervisor"

# Lowest first. A module may import from its own layer and from any layer listed before it.
LAYERS = (
    "core",  # pure: lifecycle state machine, value types, errors, redaction
    "config",  # services.toml (and the web config) into frozen specs
    "logs",  # the daemon's own log output
    "process",  # spawning, reaping, containment, per-process statistics, output
    "checks",  # probe implementations and their scheduling, dependency readiness
    "runner",  # one service's supervision: lifecycle + process + checks
    "services",  # the set of runners: dependency order, waiting, replacement on reload
    "observe",  # everything behind /v1/metrics
    "web",  # the HTTP stack
    "control",  # control socket, its client, status documents, sd_notify
    "observability",  # the HTTP, metrics, checks and stats half, wired (imported lazily once)
    "daemon",  # the composition root
    "cli",  # the edge: argv, process-wide settings, exit codes
)
RANK = {layer: i for i, layer in enumerate(LAYERS)}


def layer_of(module: str) -> str:
    """`supervisor.process.spawn` -> `process`; `supervisor.daemon` -> `daemon`."""
    parts = module.split(".")
    assert parts[0] == "supervisor", module
    if len(parts) == 1 or parts[1] in {"__init__", "__main__"}:
        return "cli"
    return parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:  # `from supervisor.core import lifecycle`
                yield node.lineno, f"{node.module}.{alias.name}"


def edges() -> Iterator[tuple[str, int, str]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        for lineno, target in imported_modules(ast.parse(path.read_text(), str(path))):
            if target == "supervisor" or not target.startswith("supervisor."):
                continue
            yield source, lineno, target


def known_modules() -> set[str]:
    return {module_name(p) for p in PACKAGE.rglob("*.py")}


def resolve(target: str, known: set[str]) -> str:
    """The module an import names: `supervisor.config.Backoff` -> `supervisor.config`."""
    while target not in known and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def violations() -> set[tuple[str, str]]:
    known = known_modules()
    found = set()
    for source, _lineno, target in edges():
        target = resolve(target, known)
        if RANK[layer_of(target)] > RANK[layer_of(source)]:
            found.add((source, target))
    return found


def test_every_module_belongs_to_a_layer() -> None:
    unknown = {
        module_name(p)
        for p in PACKAGE.rglob("*.py")
        if layer_of(module_name(p)) not in RANK
    }
    assert unknown == set(), "add the new layer to LAYERS (and README's layout table)"


def test_imports_go_down_the_layers_only() -> None:
    assert sorted(violations()) == [], "an import goes up the layers"


def test_the_checker_sees_a_violation() -> None:
    """The walk above must catch an upward import wherever it hides."""
    src = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from supervisor.daemon import Daemon\n"
        "def f():\n"
        "    import supervisor.observe.metrics\n"
    )
    targets = [t for _, t in imported_modules(ast.parse(src))]
    assert "supervisor.daemon" in targets and "supervisor.observe.metrics" in targets
    assert RANK[layer_of("supervisor.daemon")] > RANK[layer_of("supervisor.core.lifecycle")]
