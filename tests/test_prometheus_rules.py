"""docs/prometheus: promtool validates the rule files and runs their unit tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

RULES_DIR = Path(__file__).resolve().parents[1] / "docs" / "prometheus"
ALERTS = RULES_DIR / "alerts.yml"
RECORDING = RULES_DIR / "recording.yml"
UNIT_TESTS = RULES_DIR / "alerts_test.yml"


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


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", "--lint=all", "--lint-fatal", ALERTS.name, RECORDING.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout
    assert "SUCCESS: 4 rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", UNIT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
    # The unit tests cover what the issue asks for: ServiceDown and CrashLoop firing, and
    # a recording rule's value.
    tests = UNIT_TESTS.read_text()
    assert "alertname: ServiceDown" in tests and "alertname: CrashLoop" in tests
    assert "expr: 'service:http_request_duration_seconds:p95_rate5m'" in tests


def test_alerts_and_their_hold_times() -> None:
    blocks = alert_blocks(ALERTS.read_text())
    expected_for = {
        "ServiceRestarting": None,
        "ServiceDown": "1m",
        "CrashLoop": "5m",
        "DependencyUnavailable": "1m",
        "ChildScrapeFailing": "5m",
        "SupervisorDown": "1m",
    }
    assert set(blocks) == set(expected_for)
    for name, hold in expected_for.items():
        m = re.search(r"^\s*for:\s*(\S+)", blocks[name], flags=re.M)
        assert (m.group(1) if m else None) == hold, name
        assert re.search(r"severity:\s*(critical|warning)", blocks[name]), name
    assert "increase(service_starts_total[10m]) > 3" in blocks["ServiceRestarting"]
    assert 'up{job="supervisor"} == 0' in blocks["SupervisorDown"]


@pytest.mark.parametrize(
    ("rule_file", "old", "new", "must_fail"),
    [
        # The naive crash-loop rule never fires on a service that flaps backoff/starting:
        # the unit test must notice.
        (
            "alerts.yml",
            'max_over_time(service_state{state="backoff"}[2m]) == 1',
            'service_state{state="backoff"} == 1',
            "alertname: CrashLoop",
        ),
        # A wrong quantile changes a recorded value: the unit test must notice.
        ("recording.yml", "histogram_quantile(0.95,", "histogram_quantile(0.90,", "p95_rate5m"),
        # Dropping the "stopped on purpose" exception would page for a stopped service.
        ("alerts.yml", 'service_state{state="stopped"} == 1', "vector(0) == 1", "ServiceDown"),
        # Excusing every exited service would hide one that failed and stays down.
        ("alerts.yml", "service_last_exit_code == 0", "service_last_exit_code >= 0", "report"),
    ],
)
def test_unit_tests_catch_broken_rules(
    tmp_path: Path, rule_file: str, old: str, new: str, must_fail: str
) -> None:
    for path in (ALERTS, RECORDING, UNIT_TESTS):
        shutil.copy(path, tmp_path / path.name)
    target = tmp_path / rule_file
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new))
    result = promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert must_fail in result.stdout + result.stderr
