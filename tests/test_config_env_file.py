"""An env_file that is not UTF-8 is a config problem with its key path, not a traceback
(check-config, run and reload crashed on it with UnicodeDecodeError)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import load_config
from supervisor.core.errors import ConfigError


@pytest.mark.parametrize("prefix", ["", "-"])
def test_an_env_file_that_is_not_utf8_is_refused_by_key(tmp_path: Path, prefix: str) -> None:
    (tmp_path / "app.env").write_bytes(b"TOKEN=s3cr3t\xff\n")
    path = tmp_path / "services.toml"
    path.write_text(f'[services.app]\ncommand = ["{sys.executable}"]\n'
                    f'env_file = ["{prefix}app.env"]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.problems == [
        f"services.app.env_file[0]: cannot read {prefix}app.env: not UTF-8"]
    result = subprocess.run([sys.executable, "-m", "supervisor", "check-config", "--config",
                             str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "services.app.env_file[0]" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr and "s3cr3t" not in result.stderr + result.stdout
