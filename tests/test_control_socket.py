"""The control socket belongs to its daemon alone: attacks by a second local user (`nobody`),
files and symlinks in its place, stale sockets, and a second daemon with the same socket.

Every daemon here is a real `supervisor run` process, on each backend.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.control import rundir
from tests.support import SLEEPER_CODE, free_port, poll_until, service

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="attacks as a second user need root"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing"),
]


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A short, world-writable (sticky, like /tmp) directory: where an attacker can go."""
    path = Path(tempfile.mkdtemp(prefix="svp-"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def config(tmp_path: Path, socket_path: Path, marker: Path, name: str = "services.toml") -> Path:
    code = f"open({str(marker)!r}, 'a').write('started\\n')\n" + SLEEPER_CODE
    text = (f'[supervisor]\nlisten = "127.0.0.1:{free_port()}"\n'
            f'control_socket = "{socket_path}"\n\n' + service("api", code, start_seconds=0.2))
    path = tmp_path / name
    path.write_text(text)
    return path


class Daemon:
    """`python -m supervisor run` in its own session; stopped by its pid, its group killed."""

    def __init__(self, path: Path, backend: str) -> None:
        self.log = path.with_suffix(".log")
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "run", "--config", str(path),
                 "--backend", backend], stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@contextlib.contextmanager
def daemon(path: Path, backend: str) -> Iterator[Daemon]:
    d = Daemon(path, backend)
    try:
        yield d
    finally:
        d.stop()


def refused_before_start(path: Path, backend: str, marker: Path, *expected: str) -> str:
    """Run the daemon; it must exit 1 at once with a clear message and start nothing."""
    d = Daemon(path, backend)
    try:
        code = d.wait(30)
    finally:
        d.stop()
    out = d.output()
    assert code == 1, out
    assert "Traceback" not in out, out
    for text in expected:
        assert text in out, out
    assert not marker.exists(), "a service was started before the refusal"
    return out


def as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AS_NOBODY, sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=30, check=True)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True,
                          text=True, timeout=60)


# -- the daemon's side --------------------------------------------------------------------------

def test_directory_created_first_by_another_user_is_refused(tmp_path: Path, public_dir: Path,
                                                            backend: str) -> None:
    taken = public_dir / "supervisor-0"
    as_nobody(f"import os; os.mkdir({str(taken)!r}, 0o700)")
    assert taken.stat().st_uid == NOBODY
    marker = tmp_path / "marker"
    path = config(tmp_path, taken / "control.sock", marker)
    refused_before_start(path, backend, marker, str(taken), f"owned by uid {NOBODY}")
    assert not (taken / "control.sock").exists()


def test_default_directory_follows_xdg_runtime_dir_and_is_checked(
        tmp_path: Path, public_dir: Path, backend: str) -> None:
    """The default place ($XDG_RUNTIME_DIR/supervisor here) gets the same checks."""
    as_nobody(f"import os; os.mkdir({str(public_dir / 'supervisor')!r}, 0o777)")
    marker = tmp_path / "marker"
    code = f"open({str(marker)!r}, 'a').write('started\\n')\n" + SLEEPER_CODE
    path = tmp_path / "services.toml"
    path.write_text(f'[supervisor]\nlisten = "127.0.0.1:{free_port()}"\n\n'
                    + service("api", code))
    env = {**os.environ, "XDG_RUNTIME_DIR": str(public_dir)}
    env.pop("RUNTIME_DIRECTORY", None)
    done = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(path),
                           "--backend", backend], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 1, done.stderr
    assert f"{public_dir}/supervisor" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()


@pytest.mark.parametrize("mode", [0o777, 0o755, 0o770, 0o701])
def test_directory_reachable_by_others_is_refused(tmp_path: Path, mode: int,
                                                  backend: str) -> None:
    directory = Path(tempfile.mkdtemp(prefix="svm-"))
    try:
        directory.chmod(mode)
        marker = tmp_path / "marker"
        path = config(tmp_path, directory / "control.sock", marker)
        refused_before_start(path, backend, marker, str(directory), f"mode {mode:04o}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_created_directory_is_private(tmp_path: Path, backend: str) -> None:
    parent = Path(tempfile.mkdtemp(prefix="svc-"))
    try:
        directory = parent / "run"
        marker = tmp_path / "marker"
        path = config(tmp_path, directory / "control.sock", marker)
        with daemon(path, backend) as d:
            assert poll_until(lambda: (directory / "control.sock").exists(), 20), d.output()
            st = os.lstat(directory)
            assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
            sock_mode = os.lstat(directory / "control.sock").st_mode
            assert stat.S_ISSOCK(sock_mode) and stat.S_IMODE(sock_mode) == 0o600
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.parametrize("kind", ["symlink", "file", "dangling symlink"])
def test_file_or_symlink_at_socket_path_is_refused_untouched(tmp_path: Path, kind: str,
                                                             backend: str) -> None:
    directory = Path(tempfile.mkdtemp(prefix="svs-"))
    try:
        target = tmp_path / "precious"
        sock_path = directory / "control.sock"
        if kind == "file":
            sock_path.write_text("keep me")
        else:
            if kind == "symlink":
                target.write_text("keep me")
            sock_path.symlink_to(target)
        marker = tmp_path / "marker"
        path = config(tmp_path, sock_path, marker)
        expected = "a symlink" if "symlink" in kind else "a regular file"
        refused_before_start(path, backend, marker, str(sock_path), expected)
        if kind == "file":
            assert sock_path.read_text() == "keep me"
        else:
            assert sock_path.is_symlink() and os.readlink(sock_path) == str(target)
            if kind == "symlink":
                assert target.read_text() == "keep me"
            else:
                assert not target.exists()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_stale_socket_of_a_dead_daemon_is_replaced(tmp_path: Path, backend: str) -> None:
    directory = Path(tempfile.mkdtemp(prefix="svt-"))
    try:
        sock_path = directory / "control.sock"
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(sock_path))
        stale.close()  # the file stays; nothing listens: what a SIGKILLed daemon leaves
        marker = tmp_path / "marker"
        path = config(tmp_path, sock_path, marker)
        with daemon(path, backend) as d:
            assert poll_until(lambda: marker.exists(), 20), d.output()
            assert poll_until(lambda: cli("stop", "api", "--config", str(path)).returncode == 0,
                              20), d.output()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_second_daemon_is_refused_before_spawning_and_first_is_untouched(
        tmp_path: Path, backend: str) -> None:
    directory = Path(tempfile.mkdtemp(prefix="sv2-"))
    try:
        sock_path = directory / "control.sock"
        first_marker, second_marker = tmp_path / "first", tmp_path / "second"
        first = config(tmp_path, sock_path, first_marker, "first.toml")
        second = config(tmp_path, sock_path, second_marker, "second.toml")
        with daemon(first, backend) as d:
            assert poll_until(lambda: sock_path.exists() and first_marker.exists(), 20), \
                d.output()
            # status exits 0 only once every service counts as running (after start_seconds).
            assert poll_until(lambda: cli("status", "--config", str(first)).returncode == 0,
                              20), d.output()
            before = cli("status", "--config", str(first), "--json")
            assert before.returncode == 0, before.stderr
            out = refused_before_start(second, backend, second_marker, str(sock_path),
                                       "another running daemon")
            assert "services=" not in out.split("control socket")[-1]
            after = cli("status", "--config", str(first), "--json")
            assert after.returncode == 0, after.stderr
            import json

            pids = [[s["pid"] for s in json.loads(r.stdout)["services"]] for r in (before, after)]
            assert pids[0] == pids[1] and all(pids[0])
            assert first_marker.read_text() == "started\n"  # never restarted
            assert sock_path.exists()  # still the first daemon's
            assert cli("stop", "api", "--config", str(first)).returncode == 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- the CLI's side -----------------------------------------------------------------------------

LISTENER = """
import os, socket, sys
path, log = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
os.chmod(path, 0o777)
server.listen(5)
print("ready", flush=True)
server.settimeout(20)
with open(log, "ab", buffering=0) as out:
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            break
        conn.settimeout(2)
        out.write(b"connected\\n")
        try:
            out.write(conn.recv(65536))
        except OSError:
            pass
        try:
            conn.sendall(b'{"ok": true, "services": {"api": "stopped"}}\\n')
        except OSError:
            pass  # the client hung up without a command
        conn.close()
        out.write(b"\\nhandled\\n")  # whatever the connection carried is in the log
"""


@contextlib.contextmanager
def impostor(public_dir: Path) -> Iterator[tuple[Path, Path]]:
    """A control socket made and served by `nobody`, recording what it receives."""
    directory = public_dir / "supervisor-0"
    as_nobody(f"import os; os.mkdir({str(directory)!r}, 0o755)")
    sock_path, log = directory / "control.sock", public_dir / "received"
    log.touch()
    log.chmod(0o666)
    proc = subprocess.Popen([*AS_NOBODY, sys.executable, "-c", LISTENER, str(sock_path),
                             str(log)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield sock_path, log
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_root_reaches_a_daemon_run_as_a_service_user(public_dir: Path) -> None:
    """The socket of a daemon run as User=nobody in /run-like (root-owned, 0755) parent."""
    with impostor(public_dir) as (sock_path, log):
        public_dir.chmod(0o755)  # now only root can have made supervisor-0 there
        result = cli("stop", "api", "--socket", str(sock_path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == "api: stopped"
        assert b'"command": "stop"' in log.read_bytes()


def test_cli_sends_nothing_to_another_users_socket(public_dir: Path) -> None:
    with impostor(public_dir) as (sock_path, log):
        assert os.lstat(sock_path).st_uid == NOBODY
        result = cli("stop", "api", "--socket", str(sock_path))
        assert result.returncode == 4, result.stdout + result.stderr
        assert f"belongs to uid {NOBODY}" in result.stderr and "Traceback" not in result.stderr
        assert "api: stopped" not in result.stdout
        assert log.read_bytes() == b""  # not even a connection


def test_status_sends_nothing_to_another_users_socket_and_falls_back(public_dir: Path,
                                                                      tmp_path: Path) -> None:
    """`supervisor status` asks the control socket first: never one another user holds."""
    with impostor(public_dir) as (sock_path, log):
        path = tmp_path / "services.toml"
        path.write_text(f'[supervisor]\nlisten = "127.0.0.1:{free_port()}"\n'
                        f'control_socket = "{sock_path}"\n')
        fallback = cli("status", "--config", str(path))
        assert fallback.returncode == 4, fallback.stdout + fallback.stderr
        assert "cannot reach the daemon at http://127.0.0.1" in fallback.stderr  # over HTTP
        assert f"belongs to uid {NOBODY}" in fallback.stderr
        explicit = cli("status", "--socket", str(sock_path), "--json")
        assert explicit.returncode == 4 and f"belongs to uid {NOBODY}" in explicit.stderr
        for result in (fallback, explicit):
            assert "Traceback" not in result.stderr and result.stdout == ""
            assert len(result.stderr.strip().splitlines()) == 1
        assert log.read_bytes() == b""  # not even a connection


def test_cli_checks_the_daemons_uid_after_connecting(public_dir: Path) -> None:
    """A socket file that looks like root's, served by another user's process."""
    with impostor(public_dir) as (sock_path, log):
        os.chown(sock_path, 0, 0)
        result = cli("stop", "api", "--socket", str(sock_path))
        assert result.returncode == 4, result.stdout + result.stderr
        assert f"runs as uid {NOBODY}" in result.stderr
        # Until the listener is done with the connection (its first read returned: the CLI's
        # hang-up, or a command if one was sent), not for a fixed time.
        assert poll_until(lambda: b"handled" in log.read_bytes(), 20)
        assert b"command" not in log.read_bytes()


def test_cli_refuses_a_symlink_at_the_socket_path(tmp_path: Path) -> None:
    link = tmp_path / "control.sock"
    link.symlink_to("/run/somewhere-else.sock")
    result = cli("stop", "api", "--socket", str(link))
    assert result.returncode == 4 and "it is a symlink" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_file_is_not_trusted_in_another_users_directory(public_dir: Path) -> None:
    directory = public_dir / "run"
    as_nobody(f"""
        import os, json
        os.mkdir({str(directory)!r}, 0o755)
        open({str(directory / rundir.STATUS_FILE)!r}, "w").write(
            json.dumps({{"url": "http://127.0.0.1:9", "pid": 1}}))
    """)
    assert rundir.read_status_file(str(directory)) is None


def test_root_reads_the_status_file_of_a_daemon_run_as_a_service_user() -> None:
    """systemd's User=svc with RuntimeDirectory=: /run/NAME owned by svc, in root's /run."""
    parent = Path(tempfile.mkdtemp(prefix="svu-"))
    try:
        parent.chmod(0o777)  # so that nobody can make its directory, as systemd would
        directory = parent / "supervisor"
        as_nobody(f"""
            import os, json
            os.mkdir({str(directory)!r}, 0o700)
            open({str(directory / rundir.STATUS_FILE)!r}, "w").write(
                json.dumps({{"url": "http://127.0.0.1:9464", "pid": 1}}))
        """)
        parent.chmod(0o755)
        found = rundir.read_status_file(str(directory))
        assert found is not None and found["url"] == "http://127.0.0.1:9464"
        parent.chmod(0o777)  # now anyone could have planted it
        assert rundir.read_status_file(str(directory)) is None
    finally:
        shutil.rmtree(parent, ignore_errors=True)
