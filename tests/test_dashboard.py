"""The Grafana dashboard and the Prometheus rules only query metrics the daemon exports.

EXPORTED lists the names (and labels) the daemon is meant to export; it stands in for a list
read from a live daemon's /v1/metrics until that exists.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docs" / "grafana" / "supervisor-dashboard.json"
ALERTS = ROOT / "docs" / "prometheus" / "alerts.yml"
RECORDING = ROOT / "docs" / "prometheus" / "recording.yml"

# name -> labels beyond the ones every series has (service, environment; and the target
# labels job, instance that Prometheus attaches).
EXPORTED: dict[str, frozenset[str]] = {
    name: frozenset(extra)
    for name, extra in {
        "uptime_seconds": (),
        "service_starts_total": (),
        "service_up": (),
        "service_state": ("state",),
        "service_start_time_seconds": (),
        "service_exits_total": ("reason",),
        "service_last_exit_code": (),
        "service_restart_backoff_seconds": (),
        "service_ready": (),
        "service_probe_failures_total": ("probe",),
        "service_cpu_seconds_total": (),
        "service_memory_resident_bytes": (),
        "service_threads": (),
        "service_open_fds": (),
        "service_processes": (),
        "dependency_up": ("check",),
        "dependency_check_duration_seconds": ("check",),
        "service_scrape_up": (),
        "service_scrape_duration_seconds": (),
        "service_scrape_samples": (),
        "service_scrape_limit_exceeded": (),
        "http_request_duration_seconds_bucket": ("le",),
        "http_request_duration_seconds_sum": (),
        "http_request_duration_seconds_count": (),
        "http_requests_total": (),
        "http_requests_failed_total": (),
        "config_last_reload_successful": (),
        "config_reloads_total": ("result",),
        "process_cpu_seconds_total": (),
        "process_resident_memory_bytes": (),
        "up": (),
    }.items()
}
COMMON_LABELS = frozenset({"service", "environment", "job", "instance"})
LABEL_VALUES = {
    "state": {"stopped", "starting", "running", "backoff", "stopping", "exited", "fatal",
              "waiting"},
    "reason": {"success", "failure", "signal", "stopped", "spawn_error", "liveness"},
    "probe": {"liveness", "readiness", "startup"},
    "result": {"success", "failure"},
}
PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "atan2",
    "inf",
    "nan",
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"(?<![\w:])([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (functions, keywords, labels, variables excluded)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    return {n for n in _IDENT.findall(text) if n.lower() not in PROMQL_KEYWORDS}


def selectors(expr: str) -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, op, value)]) for each `metric{...}` in `expr`."""
    for m in _SELECTOR.finditer(expr):
        yield m.group(1) or "", _MATCHER.findall(m.group(2))


def grouping_labels(expr: str) -> set[str]:
    text = _STRING.sub('""', expr)
    return {
        label.strip()
        for m in _GROUPING.finditer(text)
        for label in m.group(2).split(",")
        if label.strip()
    }


def rule_exprs(path: Path) -> list[str]:
    """Every `expr:` of a rules file (inline or `|` block), enough YAML for our own files."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", lines[i])
        i += 1
        if not m:
            continue
        indent, rest = len(m.group(1)), m.group(2).strip()
        if rest in ("|", "|-", ">", ">-"):
            block = []
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
            ):
                block.append(lines[i])
                i += 1
            out.append("\n".join(block).strip())
        else:
            out.append(rest)
    rules = len(re.findall(r"^\s*- (?:alert|record):", "\n".join(lines), flags=re.M))
    assert len(out) == rules, f"{path.name}: parsed {len(out)} exprs for {rules} rules"
    return out


def recorded_names() -> set[str]:
    return set(re.findall(r"^\s*- record:\s*(\S+)", RECORDING.read_text(), flags=re.M))


def dashboard_exprs() -> list[str]:
    """Panel target exprs plus the selectors inside templating `label_values(...)` queries."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"], flags=re.S)
        assert m, var["query"]
        exprs.append(m.group(1))
    return exprs


def check_names_and_labels(exprs: list[str], allowed_extra: set[str]) -> set[str]:
    used: set[str] = set()
    known_labels = COMMON_LABELS.union(*EXPORTED.values())
    for expr in exprs:
        names = metric_names(expr)
        unknown = names - set(EXPORTED) - allowed_extra
        assert not unknown, f"not exported by the daemon: {sorted(unknown)} in {expr!r}"
        used |= names
        for metric, matchers in selectors(expr):
            allowed = COMMON_LABELS | EXPORTED.get(metric, known_labels)
            for label, op, value in matchers:
                assert label in allowed, f"{metric} has no label {label!r}: {expr!r}"
                if label in LABEL_VALUES and op == "=":
                    assert value in LABEL_VALUES[label], f"{label}={value!r}: {expr!r}"
        assert grouping_labels(expr) <= known_labels, expr
    return used


def test_metric_name_extraction() -> None:
    # The checks below are only as good as this parser.
    assert metric_names(
        'histogram_quantile(0.9, sum by (service, le) (rate(a_bucket{le="1", x=~"$v"}'
        "[$__rate_interval]))) / 1e6 + on (service) group_left b:rec:ratio unless c offset 5m"
    ) == {"a_bucket", "b:rec:ratio", "c"}
    assert metric_names("time() - start_seconds and up == bool 1") == {"start_seconds", "up"}
    assert list(selectors('x{state="backoff", service=~"a|b"}')) == [
        ("x", [("state", "=", "backoff"), ("service", "=~", "a|b")])
    ]
    assert grouping_labels("sum without (state) (x) * on (service, environment) y") == {
        "state",
        "service",
        "environment",
    }


def test_rules_use_only_exported_metrics() -> None:
    recording = rule_exprs(RECORDING)
    alerts = rule_exprs(ALERTS)
    assert len(recording) == 4 and len(alerts) == 7
    used = check_names_and_labels(recording + alerts, allowed_extra=set())
    assert {"service_up", "service_state", "dependency_up", "service_scrape_up", "up"} <= used


def test_dashboard_uses_only_exported_or_recorded_metrics() -> None:
    recorded = recorded_names()
    used = check_names_and_labels(dashboard_exprs(), allowed_extra=recorded)
    # The panels the issue asks for: uptime, starts, state timeline, latency percentiles,
    # error ratio, resources (CPU, memory, fds), readiness.
    required = {
        "uptime_seconds",
        "service_starts_total",
        "service_state",
        "service_cpu_seconds_total",
        "service_memory_resident_bytes",
        "service_open_fds",
        "dependency_up",
    } | recorded
    assert required <= used, sorted(required - used)


def test_dashboard_structure() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["title"]
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        area = {(x, y) for x in xs for y in ys}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        cells |= area
        if p["type"] != "row":
            assert p["targets"], p["title"]
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}"
    titles = {p["title"] for p in panels}
    assert {"Service state", "Latency percentiles", "Error ratio", "CPU"} <= titles
    types = {p["type"] for p in panels}
    assert "state-timeline" in types


def _as_plain_promql(expr: str) -> str:
    # Grafana substitutes its variables before Prometheus sees the query.
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses every dashboard query (wrapped as recording rules)."""
    exe = shutil.which("promtool")
    assert exe
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(dashboard_exprs()):
        rules.append(f"      - record: dashboard:query_{i}")
        rules.append(f"        expr: {json.dumps(_as_plain_promql(expr))}")
    path = tmp_path / "dashboard_rules.yml"
    path.write_text("\n".join(rules) + "\n")
    result = subprocess.run(
        [exe, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(dashboard_exprs())} rules found" in result.stdout


@pytest.mark.parametrize(
    "bad",
    [
        'service_restarts_total{service="api"}',  # not exported
        'service_state{state="crashed"}',  # not a state
        'service_up{check="db"}',  # label the metric lacks
        "sum by (pod) (service_up)",  # label nothing has
    ],
)
def test_checker_rejects_bad_queries(bad: str) -> None:
    with pytest.raises(AssertionError):
        check_names_and_labels([bad], allowed_extra=set())


def test_metrics_reference_documents_every_exported_metric() -> None:
    reference = (ROOT / "docs" / "metrics.md").read_text()
    missing = [name for name in EXPORTED if f"`{name}" not in reference]
    assert not missing, missing
    for label, values in LABEL_VALUES.items():
        for value in values:
            assert f"`{value}`" in reference, (label, value)
    for name in recorded_names():
        assert f"`{name}`" in reference, name


def _panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def test_every_panel_has_a_description() -> None:
    missing = [p["title"] for p in _panels() if not p.get("description", "").strip()]
    assert missing == []


def test_job_and_instance_variables_filter_every_query() -> None:
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "job", "instance", "environment", "service"} <= set(variables)
    # The job's default is the job name the rules select and the guide's scrape config uses.
    assert variables["job"]["current"]["value"] == "supervisor"
    for p in _panels():
        for target in p["targets"]:
            found = list(selectors(target["expr"]))
            assert found, target["expr"]
            for metric, matchers in found:
                assert ("job", "=~", "$job") in matchers, (p["title"], metric)
                assert ("instance", "=~", "$instance") in matchers, (p["title"], metric)
            bare = re.sub(r"[A-Za-z_:][\w:]*\s*\{[^}]*\}", " ", target["expr"])
            assert metric_names(bare) == set(), (p["title"], target["expr"])


def _kind(expr: str) -> str:
    names = metric_names(expr)
    if any(n.endswith("_bytes") for n in names):
        return "bytes"
    if any(n.endswith("_seconds_total") for n in names) and "rate(" in expr:
        return "cores"
    return "other"


def test_each_unit_has_its_own_axis() -> None:
    """A panel whose queries have different units gives each its unit and its own axis."""
    mixed = 0
    for p in _panels():
        kinds = {t["refId"]: _kind(t["expr"]) for t in p["targets"]}
        if len(set(kinds.values())) < 2:
            continue
        mixed += 1
        defaults = p["fieldConfig"]["defaults"]
        default_axis = defaults.get("custom", {}).get("axisPlacement", "auto")
        overrides = {
            o["matcher"]["options"]: {prop["id"]: prop["value"] for prop in o["properties"]}
            for o in p["fieldConfig"].get("overrides", [])
            if o["matcher"]["id"] == "byFrameRefID"
        }
        for ref, kind in kinds.items():
            if kind == "bytes":
                props = overrides.get(ref, {})
                assert props.get("unit") == "bytes", (p["title"], ref)
                assert props.get("custom.axisPlacement") not in (None, default_axis), p["title"]
            else:
                assert ref not in overrides and defaults["unit"] != "bytes", (p["title"], ref)
        # Values are plotted as exported: a unit conversion in the query (`/ 1e6`) would
        # mislabel the axis.
        assert not any(re.search(r"/\s*1e\d", t["expr"]) for t in p["targets"]), p["title"]
    assert mixed >= 1  # the daemon's CPU and memory panel
