"""The daemon's private runtime directory: the control socket and the status file live there.

Another local user must not be able to take the control socket's place (the old default,
`/tmp/supervisor-UID/`, could be created first by anyone). As ssh-agent and tmux do, the
directory is created 0700 and, created or found, checked before use: a real directory (not a
symlink), owned by the user running the daemon, with no access for other users and no write
access for the group (0750 is accepted, for `control_socket_group`). Anything else is refused
with a message that says what to fix.

The status file (`daemon.json`, one small JSON object: `url`, `pid`, `config`) lets
`supervisor status` find the daemon's HTTP address from anywhere; it is written atomically
(temporary file, then rename) once the port is bound, and removed when the daemon stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from supervisor.core.errors import SupervisorError

log = logging.getLogger("supervisor.daemon")  # operators know this warning by that name

STATUS_FILE = "daemon.json"
# Group members may traverse (control_socket_group), nobody else may even look.
FORBIDDEN_BITS = stat.S_IRWXO | stat.S_IWGRP
MAX_STATUS_FILE = 4096


class UnsafeDirectory(SupervisorError):
    """The runtime directory is not private to the user running the daemon."""


def default_directory(environ: Mapping[str, str] | None = None, euid: int | None = None) -> str:
    """`$RUNTIME_DIRECTORY` (systemd's RuntimeDirectory=), then `$XDG_RUNTIME_DIR/supervisor`,
    then /run/platform-supervisor for root and /tmp/supervisor-UID for anyone else."""
    env = os.environ if environ is None else environ
    uid = os.geteuid() if euid is None else euid
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return runtime
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg and Path(xdg).is_absolute():
        return str(Path(xdg) / "supervisor")
    if uid == 0:
        return "/run/platform-supervisor"
    return f"/tmp/supervisor-{uid}"


def problem(directory: str, st: os.stat_result, euid: int | None = None) -> str | None:
    """Why `directory` (described by its lstat result) is not a safe place, or None."""
    uid = os.geteuid() if euid is None else euid
    if stat.S_ISLNK(st.st_mode):
        return f"{directory} is a symlink; the runtime directory must be a real directory"
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory"
    if st.st_uid != uid:
        return (f"{directory} is owned by uid {st.st_uid}, not by uid {uid} running the "
                "daemon; another user may have created it: remove it, or choose another "
                "control_socket")
    if st.st_mode & FORBIDDEN_BITS:
        return (f"{directory} has mode {stat.S_IMODE(st.st_mode):04o}: other users could reach "
                f"or replace the control socket (chmod 0700 {directory})")
    return None


def ensure_private(directory: str) -> None:
    """Create `directory` 0700 if missing (parents as needed), then verify it; raises
    UnsafeDirectory with a message naming the directory and the problem."""
    path = Path(directory)
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)  # a strange umask (0o200, say) may have removed owner bits
        except FileExistsError:
            pass
        st = os.lstat(path)
    except OSError as exc:
        raise UnsafeDirectory(f"cannot create runtime directory {directory}: "
                              f"{exc.strerror or exc}") from None
    why = problem(directory, st)
    if why is not None:
        raise UnsafeDirectory(f"refusing runtime directory: {why}")


def trusted_owner(st: os.stat_result, euid: int | None = None) -> bool:
    """Whether a file or peer owned by `st.st_uid` may be trusted: root or the user itself."""
    uid = os.geteuid() if euid is None else euid
    return st.st_uid in (0, uid)


def write_status_file(directory: str, document: Mapping[str, Any]) -> str:
    """Write `daemon.json` atomically in `directory` (already verified); return its path."""
    target = Path(directory) / STATUS_FILE
    temporary = Path(directory) / f".{STATUS_FILE}.{os.getpid()}"
    data = json.dumps(dict(document), sort_keys=True).encode() + b"\n"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(temporary, target)
    return str(target)


def remove_status_file(directory: str, pid: int) -> None:
    """Remove `daemon.json` if it is still this daemon's (a newer daemon may have replaced it)."""
    target = Path(directory) / STATUS_FILE
    document = read_status_file(directory)
    if document is not None and document.get("pid") == pid:
        with contextlib.suppress(OSError):
            target.unlink()


def placed_by_owner(directory: str, st: os.stat_result) -> bool:
    """Whether an entry (described by `st`) of `directory` can only have been put there by its
    owner: the directory is the owner's and no one else can write it, in a root-owned parent
    that no one else can write either. That is a daemon run as a service user (systemd's User=
    with RuntimeDirectory=: /run/platform-supervisor) as seen by root; /tmp/anything never is."""
    try:
        dir_st = os.lstat(directory)
        parent = os.stat(Path(directory).parent)
    except OSError:
        return False
    writable = stat.S_IWGRP | stat.S_IWOTH
    return (stat.S_ISDIR(dir_st.st_mode) and dir_st.st_uid == st.st_uid
            and not dir_st.st_mode & writable
            and parent.st_uid == 0 and not parent.st_mode & writable)


def read_status_file(directory: str) -> dict[str, Any] | None:
    """The daemon's status file, if present, private (directory and file owned by root or
    this user, the directory not writable by others) and well formed; else None."""
    try:
        dir_st = os.stat(directory)
        if (not stat.S_ISDIR(dir_st.st_mode)
                or dir_st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            return None
        fd = os.open(Path(directory) / STATUS_FILE, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not (
                    (trusted_owner(dir_st) and trusted_owner(st))
                    or placed_by_owner(directory, st)):
                return None
            data = os.read(fd, MAX_STATUS_FILE)
        finally:
            os.close(fd)
        document = json.loads(data)
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or not isinstance(document.get("url"), str):
        return None
    return document


def announce(directory: str, url: str, config_path: str) -> None:
    """Tell `supervisor status`, run from anywhere by this user, where the HTTP port is; an
    unwritable directory costs only a warning."""
    try:
        write_status_file(directory, {"url": url, "pid": os.getpid(), "config": config_path})
    except OSError as exc:
        log.warning("status file not written directory=%s error=%s", directory,
                    exc.strerror or exc)
