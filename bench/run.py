"""Benchmark our daemon (asyncio and trio) against supervisord and Circus on the same N children.

    python bench/run.py                       # full run: N=4,50,200, 3 repeats (about 12 min)
    python bench/run.py --quick --n 4 --systems ours/asyncio,ours/trio --no-install

Prints markdown tables of medians over repeats, ratios to supervisord and Circus from the same
run, and the machine's load average before and after. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procs  # noqa: E402
from bench.httpbench import HttpParams, http_floor, http_run  # noqa: E402
from bench.scenarios import Params, lifecycle_run, popen_floor  # noqa: E402
from bench.systems import ALL, Tools, available, prepare_venv  # noqa: E402

log = logging.getLogger("bench")

FLOOR = "floor: bare WSGI server, static body"

# (key, label, target at the largest N for ours, or None)
ROWS = [
    ("startup_s", "startup, all N running (s)", 0.6),
    ("restart_p50_ms", "restart after SIGKILL p50 (ms)", 10.0),
    ("restart_p90_ms", "restart after SIGKILL p90 (ms)", None),
    ("idle_cpu_pct", "idle CPU, with helper processes (% of a core)", 0.5),
    ("rss_mib", "RSS of the daemon (MiB)", None),
    ("helpers_uss_mib", "helper processes' own memory, USS (MiB)", None),
    ("rss_total_mib", "RSS + helpers' USS (MiB)", 45.0),
    ("shutdown_s", "shutdown after SIGTERM (s)", None),
    ("shutdown_left", "children left after shutdown", 0.0),
    ("orphans", "orphans 2 s after SIGKILL of daemon", 0.0),
]
HTTP_ROWS = [
    ("metrics_c1_p50_ms", "/v1/metrics p50, 1 client (ms)", None),
    ("metrics_c1_p99_ms", "/v1/metrics p99, 1 client (ms)", None),
    ("metrics_c20_p50_ms", "/v1/metrics p50, 20 clients (ms)", None),
    ("metrics_c20_p99_ms", "/v1/metrics p99, 20 clients (ms)", 50.0),
    ("ready_c1_p50_ms", "/v1/ready p50, 1 client (ms)", None),
    ("ready_c1_p99_ms", "/v1/ready p99, 1 client (ms)", None),
    ("ready_c20_p50_ms", "/v1/ready p50, 20 clients (ms)", None),
    ("ready_c20_p99_ms", "/v1/ready p99, 20 clients (ms)", 10.0),
    ("metrics_series", "series in /v1/metrics", None),
    ("metrics_kib", "/v1/metrics body (KiB)", None),
    ("http_rss_mib", "RSS while serving (MiB)", None),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", default="4,50,200", help="comma-separated child counts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--idle-repeats", type=int, default=1,
                    help="repeats that also measure idle CPU/RSS (each costs --idle-seconds)")
    ap.add_argument("--idle-seconds", type=float, default=20.0)
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs per run for restart latency")
    ap.add_argument("--systems", default=",".join(s.name for s in ALL))
    ap.add_argument("--no-http", action="store_true", help="skip the /v1/metrics,/v1/ready part")
    ap.add_argument("--http-n", type=int, default=None, help="children for the HTTP part "
                    "(default: the largest --n)")
    ap.add_argument("--venv", default="/tmp/bench-venv",
                    help="throwaway virtualenv for supervisord and circus")
    ap.add_argument("--no-install", action="store_true",
                    help="never pip install; skip systems whose venv is missing")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter with our `supervisor` package installed")
    ap.add_argument("--json", help="also write raw results to this file")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--quick", action="store_true",
                    help="seconds-long smoke run: 1 repeat, 3 kills, 1 s idle, few requests")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.idle_repeats, args.idle_seconds, args.kills = 1, 1, 1.0, 3
    return args


def compile_ours(python: str) -> None:
    """Byte-compile our package as `pip install` does, so that startup is not charged for
    compiling sources: an editable install, or PYTHONDONTWRITEBYTECODE=1 as on these machines,
    would otherwise recompile every module at each daemon start (about 60 ms)."""
    subprocess.run([python, "-c", "import compileall, os, supervisor; "
                    "compileall.compile_dir(os.path.dirname(supervisor.__file__), quiet=1)"],
                   check=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="# %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    ns = [int(x) for x in args.n.split(",")]
    wanted = [s for s in ALL if s.name in args.systems.split(",")]
    unknown = set(args.systems.split(",")) - {s.name for s in ALL}
    if unknown:
        print(f"unknown systems: {sorted(unknown)}", file=sys.stderr)
        return 2
    procs.become_subreaper()
    rng = random.Random(args.seed)
    notes: list[str] = []
    venv, versions = None, {}
    if any(s.kind != "ours" for s in wanted):
        venv, versions, notes = prepare_venv(Path(args.venv), not args.no_install)
    tools = Tools(args.python, venv, versions)
    if any(s.kind == "ours" for s in wanted):
        compile_ours(args.python)
    systems = [s for s in wanted if available(s, tools)]
    notes += [f"{s.name}: not available, skipped" for s in wanted if s not in systems]
    params = Params(kills=args.kills, idle_seconds=args.idle_seconds,
                    orphan_linger=2.0, reset_after=0.3 if args.quick else 1.0)
    load_before = procs.loadavg()
    began = time.monotonic()

    results: dict[str, dict[int, list[dict[str, float]]]] = {s.name: {} for s in systems}
    for r in range(args.repeats):
        for n in ns:
            # Rotate the order each repeat so no system always runs first on a cold cache.
            order = systems[r % len(systems):] + systems[:r % len(systems)] if systems else []
            for system in order:
                log.info("repeat %d n=%d %s", r + 1, n, system.name)
                out = lifecycle_run(system, n, tools, params, r < args.idle_repeats, rng)
                results[system.name].setdefault(n, []).append(out)

    http: dict[str, dict[str, float]] = {}
    if not args.no_http:
        http_n = args.http_n or max(ns)
        hp = (HttpParams(metrics_requests=20, ready_requests=40, scrape_interval=0.5)
              if args.quick else HttpParams())
        body = b""
        for system in (s for s in systems if s.kind == "ours"):
            log.info("http n=%d %s", http_n, system.name)
            http[system.name], body = http_run(system, http_n, tools, hp)
        if body:
            log.info("http floor: the daemon's server class serving a static body, same load")
            http[FLOOR] = http_floor(tools, body, hp)
    floor_ms = 1000 * popen_floor()
    load_after = procs.loadavg()

    print(report(systems, ns, results, http, args, floor_ms, load_before, load_after,
                 time.monotonic() - began, notes, versions))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "results": results, "http": http, "popen_floor_ms": floor_ms,
            "loadavg": [load_before, load_after], "versions": versions, "notes": notes},
            indent=1))
    return 0


def _median(runs: list[dict[str, float]], key: str) -> float | None:
    values = [run[key] for run in runs if key in run]
    return statistics.median(values) if values else None


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if value == int(value) and abs(value) >= 1:
        return f"{value:.0f}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def report(systems, ns, results, http, args, floor_ms, load_before, load_after,  # type: ignore[no-untyped-def]
           elapsed, notes, versions) -> str:
    ours = [s.name for s in systems if s.kind == "ours"]
    others = [s.name for s in systems if s.kind != "ours"]
    lines = [f"# Bench: {platform.node()} · {os.cpu_count()} CPUs · Python "
             f"{platform.python_version()} · loadavg before {load_before}, after {load_after} "
             f"· {elapsed:.0f} s",
             "",
             f"Medians over {args.repeats} repeat(s) (idle over {args.idle_repeats} x "
             f"{args.idle_seconds:g} s); restart p50/p90 over {args.kills} jittered kills "
             f"per run. Versions: " + (", ".join(f"{k} {v}" for k, v in versions.items())
                                       or "ours only") + ".",
             f"Floor: one bare subprocess.Popen spawn of `sleep` = {floor_ms:.2f} ms.", ""]
    for n in ns:
        head = [f"metric (N={n})"] + [s.name for s in systems]
        head += [f"{o} ÷ {x}" for o in ours for x in others]
        if n == max(ns):
            head.append("target (ours)")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key, label, target in ROWS:
            vals = {s.name: _median(results[s.name].get(n, []), key) for s in systems}
            row = [label] + [_fmt(vals[s.name]) for s in systems]
            for o in ours:
                for x in others:
                    a, b = vals[o], vals[x]
                    row.append(f"{a / b:.2g}" if a is not None and b else "–")
            if n == max(ns):
                row.append("≤ " + _fmt(target) if target is not None else "")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if http:
        names = list(http)
        head = [f"ours only, N={args.http_n or max(ns)} children x 50 series", *names]
        head.append("target")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key, label, target in HTTP_ROWS:
            row = [label] + [_fmt(http[name].get(key)) for name in names]
            row.append("≤ " + _fmt(target) if target is not None else "")
            lines.append("| " + " | ".join(row) + " |")
        errors = {name: sum(v for k, v in http[name].items() if k.endswith("_errors"))
                  for name in names if name != FLOOR}
        lines += ["", "HTTP errors (not 200/503): " + ", ".join(
            f"{k} {v:.0f}" for k, v in errors.items()), ""]
    lines += [f"Note: {note}" for note in notes]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
