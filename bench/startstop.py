"""Startup and shutdown only, at any N, interleaved across systems (issue 14's targets).

    python bench/startstop.py --n 200,1000 --repeats 5 \
        --systems bare,ours/asyncio,ours/trio,ours+cg/asyncio,ours+cg/trio

Each run launches the daemon with N sleepers, times startup (from Popen, interpreter start
included, until all N children have exec'd: bench/README.md), lets it settle for `--settle`
seconds, then times SIGTERM until the daemon and every child are gone. Systems run in a
rotating order each repeat, so a burst of load on this shared machine hits all of them alike.
Prints the median (and range) per system and N of startup, the daemon's own CPU time until
then (schedstat: load inflates it least) and shutdown, with /proc/loadavg before and after.
`bare` is bench/bare_supervisor.py, a reference with nothing but the spawns and the kills:
the floor of both figures on this machine at this moment. `--compare DIR` also runs each of
our systems from another checkout (DIR on PYTHONPATH; shown as `name@before`), interleaved
with this one, for before/after figures taken under the same load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procs  # noqa: E402
from bench.run import compile_ours  # noqa: E402
from bench.scenarios import Launched, free_port, measure_shutdown  # noqa: E402
from bench.systems import ALL, Child, Tools, sleepers  # noqa: E402

log = logging.getLogger("bench")
BARE = Path(__file__).resolve().parent / "bare_supervisor.py"


@dataclass(frozen=True)
class Bare:
    """bench/bare_supervisor.py, launched like the systems of systems.py."""

    name: str = "bare"
    kind: str = "bare"

    def launch_argv(self, workdir: Path, children: Sequence[Child], tools: Tools,
                    settings: dict[str, float]) -> list[str]:
        return [tools.python, str(BARE), str(len(children))]


def one_run(system_name: str, n: int, tools: Tools, settle: float, timeout: float,
            compare: str | None = None) -> dict[str, float]:
    name, _, variant = system_name.partition("@")
    system = Bare() if name == "bare" else next(s for s in ALL if s.name == name)
    saved = os.environ.get("PYTHONPATH")
    if variant:
        assert compare is not None
        os.environ["PYTHONPATH"] = compare
    settings = {"port": float(free_port()), "reset_after": 1.0}
    with tempfile.TemporaryDirectory(prefix=f"bench-{system.kind}-") as tmp:
        d = Launched(system, Path(tmp), sleepers(n), tools, settings)
        try:
            startup = d.wait_running(n, timeout)
            # The daemon's own CPU until then: what load on this shared machine inflates
            # least (wall time also counts waiting for the CPU and for each child's exec).
            startup_cpu = procs.on_cpu_seconds(d.pid)
            time.sleep(settle)
            shutdown, left = measure_shutdown(d, timeout)
        except Exception:
            log.error("%s n=%d failed; daemon output:\n%s", system.name, n, d.tail())
            raise
        finally:
            d.close()
            if variant:
                if saved is None:
                    del os.environ["PYTHONPATH"]
                else:
                    os.environ["PYTHONPATH"] = saved
    return {"startup_s": startup, "startup_cpu_s": startup_cpu, "shutdown_s": shutdown,
            "shutdown_left": float(left)}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="# %(message)s", stream=sys.stderr)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", default="200,1000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--systems",
                    default="bare,ours/asyncio,ours/trio,ours+cg/asyncio,ours+cg/trio")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds between the two")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--json", help="also write raw results to this file")
    ap.add_argument("--compare", help="another checkout whose `supervisor` runs as @before")
    args = ap.parse_args(argv)
    names = args.systems.split(",")
    unknown = set(names) - {s.name for s in ALL if s.kind == "ours"} - {"bare"}
    if unknown:
        print(f"unknown systems (ours only): {sorted(unknown)}", file=sys.stderr)
        return 2
    procs.become_subreaper()
    compile_ours(args.python)
    if args.compare:
        subprocess.run([args.python, "-m", "compileall", "-q", os.path.join(args.compare,
                        "supervisor")], check=True, timeout=120)
        names += [f"{n}@before" for n in names if n != "bare"]
    tools = Tools(args.python, None, {})
    ns = [int(x) for x in args.n.split(",")]
    load_before = procs.loadavg()
    results: dict[str, dict[int, list[dict[str, float]]]] = {s: {} for s in names}
    for r in range(args.repeats):
        for n in ns:
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                out = one_run(name, n, tools, args.settle, args.timeout, args.compare)
                log.info("repeat %d n=%d %s startup=%.3f (cpu %.3f) shutdown=%.3f left=%d "
                         "load=%s", r + 1, n, name, out["startup_s"], out["startup_cpu_s"],
                         out["shutdown_s"], out["shutdown_left"], procs.loadavg())
                results[name].setdefault(n, []).append(out)
    load_after = procs.loadavg()
    print("| system | N | startup median (range) s | its CPU median (range) s "
          "| shutdown median (range) s | left |")
    print("|---|---|---|---|---|---|")
    for name in names:
        for n in ns:
            runs = results[name][n]
            cells = []
            for key in ("startup_s", "startup_cpu_s", "shutdown_s"):
                vals = [x[key] for x in runs]
                cells.append(f"{statistics.median(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})")
            left = max(x["shutdown_left"] for x in runs)
            print(f"| {name} | {n} | {cells[0]} | {cells[1]} | {cells[2]} | {left:g} |")
    print(f"\nloadavg before: {load_before}; after: {load_after}; {args.repeats} repeats")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
