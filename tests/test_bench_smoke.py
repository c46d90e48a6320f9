"""A seconds-long run of bench/run.py (N=4, ours only, both backends) so the bench does not rot.

No timing is asserted: a benchmark is not a test. Only that it runs and fills its tables.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^\d+(\.\d+)?(e[-+]?\d+)?$")


def _row(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in:\n{table}")


def test_quick_bench_prints_a_table_of_numbers_for_both_backends(tmp_path: Path) -> None:
    raw = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--n", "4",
         "--systems", "ours/asyncio,ours/trio", "--no-install", "--json", str(raw)],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    header = _row(out, "metric (N=4)")
    assert header[:2] == ["ours/asyncio", "ours/trio"]
    for label in ("startup, all N running (s)", "restart after SIGKILL p50 (ms)",
                  "idle CPU, with helper processes (% of a core)", "RSS of the daemon (MiB)",
                  "RSS + helpers' USS (MiB)", "shutdown after SIGTERM (s)",
                  "orphans 2 s after SIGKILL of daemon", "/v1/metrics p99, 20 clients (ms)",
                  "/v1/ready p99, 20 clients (ms)"):
        cells = _row(out, label)[:2]
        assert all(NUMBER.match(c) for c in cells), (label, cells)
    # Structural facts that do not depend on timing.
    assert _row(out, "orphans 2 s after SIGKILL of daemon")[:2] == ["0", "0"]
    assert _row(out, "children left after shutdown")[:2] == ["0", "0"]
    assert float(_row(out, "series in /v1/metrics")[0]) >= 4 * 50
    assert "loadavg before" in out and "Popen spawn" in out
    assert "HTTP errors (not 200/503): ours/asyncio 0, ours/trio 0" in out
    assert raw.read_text().startswith("{")
