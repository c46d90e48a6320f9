"""`supervisor status`: one row per service, then readiness; exit codes as `systemctl status`
(0 every service running, 3 some service not running, 4 daemon unreachable)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import httpx

from supervisor.config import load_config
from supervisor.errors import ConfigError

EXIT_OK, EXIT_NOT_RUNNING, EXIT_UNREACHABLE = 0, 3, 4


def show_status(url: str | None, config_path: str, as_json: bool) -> int:
    if url is None:
        try:
            settings = load_config(config_path).settings
            host = settings.listen_host
            host = f"[{host}]" if ":" in host else host
            url = f"http://{host}:{settings.listen_port}"
        except ConfigError as exc:
            print(exc.render(), file=sys.stderr)
            return 1
    try:
        response = httpx.get(url.rstrip("/") + "/v1/status", timeout=5.0)
        response.raise_for_status()
        document: dict[str, Any] = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"supervisor: cannot reach the daemon at {url}: {_short(exc)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if as_json:
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        print(render(document))
    services = document.get("services", [])
    all_running = all(s.get("state") == "running" for s in services)
    return EXIT_OK if all_running else EXIT_NOT_RUNNING


def render(document: dict[str, Any]) -> str:
    now = document.get("time") or time.time()
    rows = [("SERVICE", "STATE", "PID", "UPTIME", "STARTS", "LAST EXIT", "NEXT START", "SCRAPE")]
    for s in document.get("services", []):
        rows.append((
            s["name"],
            s["state"],
            str(s["pid"] or "-"),
            _duration(s.get("uptime_seconds") or 0) if s.get("pid") else "-",
            str(s.get("starts", 0)),
            _last_exit(s.get("last_exit"), now),
            _duration(s["next_start_in_seconds"]) if s.get("next_start_in_seconds") is not None
            else "-",
            _scrape(s.get("scrape")),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    for s in document.get("services", []):
        if s.get("state") == "waiting" and s.get("waiting_for"):
            lines.append(f"{s['name']}: waiting for {s['waiting_for']}")
        elif s.get("state") == "fatal" and s.get("last_error"):
            lines.append(f"{s['name']}: fatal: {s['last_error']}")
    daemon = document.get("daemon")
    warnings = daemon.get("warnings") if isinstance(daemon, dict) else None
    for warning in warnings if isinstance(warnings, list) else []:
        lines.append(f"WARNING: {warning}")
    readiness = document.get("readiness")
    if readiness is not None:
        lines.append("")
        lines.append(f"readiness: {readiness.get('status', '?')}")
        for name, check in sorted(readiness.get("checks", {}).items()):
            mark = "ok  " if check.get("healthy") else "FAIL"
            detail = f"{check.get('latency_ms', 0):.1f} ms"
            if check.get("error"):
                detail += f"  {check['error']}"
            lines.append(f"  {mark} {name:<16} {detail}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{secs}s"


def _last_exit(last: dict[str, Any] | None, now: float) -> str:
    if not last:
        return "-"
    what = f"signal {last['signal']}" if last.get("signal") else f"code {last.get('code')}"
    if last.get("reason") == "spawn_error":
        what = "spawn error"
    ago = f" {_duration(max(0.0, now - last['at']))} ago" if last.get("at") else ""
    return f"{what}{ago}"


def _scrape(scrape: dict[str, Any] | None) -> str:
    if not scrape:
        return "-"
    text = "ok" if scrape.get("ok") else "failing"
    dropping = sum((scrape.get("dropping_families") or {}).values())
    if dropping:
        # A service whose metric families are being kept out of /v1/metrics must show.
        text += f", {dropping} families dropped"
    return text


def _short(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
