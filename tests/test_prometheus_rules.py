"""docs/prometheus: promtool validates the rule files and runs their unit tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES_DIR = Path(__file__).resolve().parents[1] / "docs" / "prometheus"
ALERTS = RULES_DIR / "alerts.yml"
RECORDING = RULES_DIR / "recording.yml"
UNIT_TESTS = RULES_DIR / "alerts_test.yml"
GUIDE = RULES_DIR.parents[0] / "operator-guide.md"
RUNBOOK_BASE = "https://github.com/example/platform-supervisor/blob/main/docs/operator-guide.md"
JOB = 'job="supervisor"'


def promtool(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool must be installed (Debian package 'prometheus')"
    return subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def alert_blocks(text: str) -> dict[str, str]:
    """alert name -> the YAML text of its rule (up to the next rule)."""
    parts = re.split(r"^\s*- (?=alert:|record:)", text, flags=re.M)
    out = {}
    for part in parts[1:]:
        m = re.match(r"alert:\s*(\S+)", part)
        if m:
            out[m.group(1)] = part
    return out


def alert_rules() -> dict[str, dict[str, object]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", "--lint=all", "--lint-fatal", ALERTS.name, RECORDING.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout
    assert "SUCCESS: 4 rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", UNIT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
    tests = UNIT_TESTS.read_text()
    assert "expr: 'service:http_request_duration_seconds:p95_rate5m'" in tests


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = set(alert_rules())
    assert names - firing == set(), "never shown firing"
    assert names - quiet == set(), "never shown quiet"


def test_alerts_severity_hold_time_and_runbook() -> None:
    rules = alert_rules()
    # Only what must wake someone pages: the daemon gone (its services die with it), no
    # daemon target at all, a service down or crash-looping.
    severities = {name: rule["labels"]["severity"] for name, rule in rules.items()}  # type: ignore[index]
    assert severities == {
        "SupervisorDown": "critical",
        "SupervisorAbsent": "critical",
        "ServiceDown": "critical",
        "CrashLoop": "critical",
        "ServiceRestarting": "warning",
        "DependencyUnavailable": "warning",
        "ChildScrapeFailing": "warning",
    }
    for name, rule in rules.items():
        hold = str(rule.get("for", ""))
        m = re.fullmatch(r"(\d+)m", hold)
        assert m and int(m.group(1)) >= 5, (name, hold)
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert annotations["summary"] and annotations["description"], name
    assert "absent(up{job=\"supervisor\"})" in str(rules["SupervisorAbsent"]["expr"])


def github_anchors(markdown: str) -> dict[str, str]:
    """GitHub's heading anchors (lower case, punctuation dropped, spaces to dashes) -> the
    section's text up to the next heading."""
    anchors: dict[str, str] = {}
    current: str | None = None
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            current = slug
            anchors[slug] = ""
        elif current is not None:
            anchors[current] += line + "\n"
    return anchors


def test_every_runbook_url_is_an_anchor_of_the_operator_guide() -> None:
    anchors = github_anchors(GUIDE.read_text())
    for name, rule in alert_rules().items():
        url = rule["annotations"]["runbook_url"]  # type: ignore[index]
        base, _, anchor = str(url).partition("#")
        assert base == RUNBOOK_BASE, name
        assert anchor in anchors, f"{name}: no heading for #{anchor} in operator-guide.md"
        section = anchors[anchor]
        # The alert's own section, saying what to do: at least a command to run.
        assert anchor == name.lower(), name
        assert "`" in section and len(section.split()) >= 30, name


def test_job_selector_is_in_every_selector_and_changes_in_one_sweep(tmp_path: Path) -> None:
    """Every metric selector of the rules carries job="supervisor", so the documented sed
    line is the whole change; after it, the rules and their unit tests still pass."""
    from tests.test_dashboard import metric_names, rule_exprs, selectors

    for path in (ALERTS, RECORDING):
        for expr in rule_exprs(path):
            bare = re.sub(r"[A-Za-z_:][\w:]*\s*\{[^}]*\}", " ", expr)
            assert metric_names(bare) == set(), f"{path.name}: a selector without {JOB}: {expr}"
            found = list(selectors(expr))
            assert found, expr
            for metric, matchers in found:
                assert ("job", "=", "supervisor") in matchers, f"{path.name}: {metric} in {expr}"
    for path in (ALERTS, RECORDING, UNIT_TESTS):
        (tmp_path / path.name).write_text(
            path.read_text().replace(JOB, 'job="platform"').replace("job: supervisor",
                                                                    "job: platform"))
    result = promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("rule_file", "old", "new", "must_fail"),
    [
        # The naive crash-loop rule never fires on a service that flaps backoff/starting:
        # the unit test must notice.
        (
            "alerts.yml",
            'expr: max_over_time(service_state{job="supervisor", state="backoff"}[2m]) == 1',
            'expr: service_state{job="supervisor", state="backoff"} == 1',
            "alertname: CrashLoop",
        ),
        # A wrong quantile changes a recorded value: the unit test must notice.
        ("recording.yml", "histogram_quantile(0.95,", "histogram_quantile(0.90,", "p95_rate5m"),
        # Dropping the "stopped on purpose" exception would page for a stopped service.
        ("alerts.yml", 'service_state{job="supervisor", state="stopped"} == 1', "vector(0) == 1",
         "ServiceDown"),
        # Excusing every exited service would hide one that failed and stays down.
        ("alerts.yml", 'service_last_exit_code{job="supervisor"} == 0',
         'service_last_exit_code{job="supervisor"} >= 0', "report"),
        # Without the crash-loop exception, one crash loop would also page as ServiceDown...
        ("alerts.yml", 'max_over_time(service_state{job="supervisor", state="backoff"}[2m]) == 1\n'
         "        for: 5m\n        labels:\n          severity: critical\n        annotations:\n"
         '          summary: "{{ $labels.service }} ({{ $labels.environment }}) is down',
         'vector(0) == 1\n'
         "        for: 5m\n        labels:\n          severity: critical\n        annotations:\n"
         '          summary: "{{ $labels.service }} ({{ $labels.environment }}) is down',
         "ServiceDown"),
        # ... and as ServiceRestarting.
        ("alerts.yml", 'max_over_time(service_state{job="supervisor", state="backoff"}[10m])',
         "vector(0)", "ServiceRestarting"),
        # An error ratio without the fallback is absent for a service without failures.
        ("recording.yml", "    or\n            0 * sum", "    or\n            1 * sum",
         "ratio_rate5m"),
    ],
)
def test_unit_tests_catch_broken_rules(
    tmp_path: Path, rule_file: str, old: str, new: str, must_fail: str
) -> None:
    for path in (ALERTS, RECORDING, UNIT_TESTS):
        shutil.copy(path, tmp_path / path.name)
    target = tmp_path / rule_file
    text = target.read_text()
    assert text.count(old) == 1, old
    target.write_text(text.replace(old, new))
    result = promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert must_fail in result.stdout + result.stderr
