"""services.toml validation through the operator's interface: load_config and `check-config`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import load_config
from supervisor.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "services.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ or {"PATH": "/usr/bin:/bin"})
    return info.value.problems


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", "check-config", "--config",
                           str(path)], capture_output=True, text=True, timeout=30)


def test_shipped_config_is_valid() -> None:
    config = load_config(ROOT / "services.toml")
    assert set(config.services) >= {"api", "event-writer", "observer", "watchdog"}
    assert config.settings.listen_host == "127.0.0.1"
    result = check_config(ROOT / "services.toml")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_every_problem_is_reported_with_its_key_path(tmp_path: Path) -> None:
    found = problems(tmp_path, """
[supervisor]
listen = "nowhere"
colour = "blue"

[services.api]
command = ["sh", "-c", "sleep 1"]
restart = "sometimes"
stop_signal = "SIGNOPE"
stop_timeout = -1
depends_on = ["ghost"]

[services.worker]
restart = "always"
""")
    text = "\n".join(found)
    assert "supervisor.listen: expected host:port" in text
    assert "supervisor.colour: unknown key" in text
    assert "services.api.restart: expected one of always, on-failure, never" in text
    assert "services.api.stop_signal: unknown signal" in text
    assert "services.api.stop_timeout: must be >= 0" in text
    assert "services.api.depends_on: unknown service 'ghost'" in text
    assert "services.worker.command: required" in text
    assert len(found) == 7


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    found = problems(tmp_path, '[services.api]\ncommand = ["sh"\nrestart = "always"\n')
    assert len(found) == 1 and "line 3" in found[0]


def test_dependency_cycle_and_missing_executable(tmp_path: Path) -> None:
    found = problems(tmp_path, """
[services.a]
command = ["sh", "-c", "true"]
depends_on = ["b"]
[services.b]
command = ["definitely-not-a-program-xyz"]
depends_on = ["a"]
""")
    text = "\n".join(found)
    assert "dependency cycle" in text
    assert "services.b.command: executable 'definitely-not-a-program-xyz' not found" in text


def test_interpolation_env_files_and_secret_free_errors(tmp_path: Path) -> None:
    (tmp_path / "app.env").write_text('# comment\nexport TOKEN="s3cr3t-canary"\nMODE=fast\n')
    config = load_config(write(tmp_path, """
[services.api]
command = ["sh", "-c", "echo ${GREETING:-hello} $$HOME"]
env_file = ["app.env", "-missing.env"]
env = { MODE = "${MODE_OVERRIDE}", PORT = 8081 }
"""), {"PATH": "/usr/bin:/bin", "MODE_OVERRIDE": "slow"})
    spec = config.services["api"]
    assert spec.command[2] == "echo hello $HOME"
    assert spec.env == {"TOKEN": "s3cr3t-canary", "MODE": "slow", "PORT": "8081"}
    found = problems(tmp_path, """
[checks.db]
type = "postgres"
dsn = "postgresql://app:${DB_PASSWORD}@127.0.0.1/test"
[services.api]
command = ["sh", "-c", "true"]
env = { A = "${UNSET_VARIABLE}" }
env_file = "nope.env"
""", {"PATH": "/usr/bin:/bin"})
    text = "\n".join(found)
    assert "services.api.env.A: environment variable UNSET_VARIABLE is not set" in text
    assert "checks.db.dsn: environment variable DB_PASSWORD is not set" in text
    assert "services.api.env_file[0]: cannot read" in text


def test_environment_variable_overrides_environment_label(tmp_path: Path) -> None:
    path = write(tmp_path, '[supervisor]\nenvironment = "staging"\n'
                           '[services.a]\ncommand = ["sh", "-c", "true"]\n')
    assert load_config(path, {"PATH": "/bin"}).settings.environment == "staging"
    assert load_config(path, {"PATH": "/bin", "ENVIRONMENT": "prod"}).settings.environment == "prod"


def test_start_order_puts_dependencies_first(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
[services.web]
command = ["sh", "-c", "true"]
depends_on = ["db", "cache"]
[services.cache]
command = ["sh", "-c", "true"]
depends_on = ["db"]
[services.db]
command = ["sh", "-c", "true"]
"""), {"PATH": "/usr/bin:/bin"})
    assert list(config.services) == ["db", "cache", "web"]


def test_check_config_cli_exits_1_with_every_problem_and_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, '[services.api]\ncommand = "sh"\nrestart = "sometimes"\nbogus = 1\n')
    result = check_config(path)
    assert result.returncode == 1
    assert "services.api.restart: expected one of always, on-failure, never" in result.stderr
    assert "services.api.bogus: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    missing = check_config(tmp_path / "absent.toml")
    assert missing.returncode == 1 and "cannot read file" in missing.stderr


def test_run_refuses_a_bad_file_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, '[services.api]\ncommand = ["sh"]\nrestart = 3\n')
    result = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "services.api.restart" in result.stderr and "Traceback" not in result.stderr
