"""The README's layout table is where a newcomer starts: it must name every module."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_layout_lists_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([a-z_/]+\.py)`", section))
    package = ROOT / "supervisor"
    modules = {
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if p.name not in {"__init__.py", "__main__.py"}
    }
    assert modules - listed == set(), "modules missing from README's layout table"
    assert listed - modules == set(), "README's layout table names modules that do not exist"
