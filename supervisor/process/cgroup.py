"""A cgroup v2 per service: every process a service starts stays in its cgroup, however it
forks (setsid, double fork), so a stop can find and kill all of them.

Layout, under the cgroup the daemon was started in (P, from /proc/self/cgroup):

    P/supervisor-<pid>-<token>/        the instance: unique per daemon, so that daemons and
        supervisor/                    tests side by side never collide
        guard/                         the daemon's own processes (a leaf), the orphan guard's
        <service>.service/             one per service, created at its first spawn

A service is spawned as before (vfork/exec from the daemon, spawn.py), in the daemon's leaf,
and then placed: a worker thread writes its pid into its cgroup, then moves whatever it forked
meanwhile (its children by parent pid, escapees by SUPERVISOR_INVOCATION_ID). The move is not
done before the exec because any cgroup move waits for an RCU grace period (about 10 ms here)
when no move happened just before: on the spawn path that put 10 ms into every restart (see
docs/operator-guide.md for the figures). Until placed (~10 ms) the service is signalled by
process group too, and its exit is handled only once it is placed. No controller is
enabled: cgroup.procs, cgroup.kill, cgroup.events and cpu.stat are core files of every v2
cgroup, which is all this needs.

Only the hierarchy is touched here; waiting on cgroup.events is `EmptyWatcher` (inotify).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import math
import os
import signal
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from supervisor.process.descendants import invocation_of

log = logging.getLogger(__name__)

LEAF = "supervisor"
GUARD_LEAF = "guard"
SUFFIX = ".service"
PREFIX = "supervisor-"


def unified_mount(mountinfo: str) -> str | None:
    """The cgroup2 mount point: /sys/fs/cgroup (pure v2) or /sys/fs/cgroup/unified (hybrid)."""
    found: list[str] = []
    for line in mountinfo.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        if len(fields) > sep + 1 and fields[sep + 1] == "cgroup2":
            found.append(fields[4].replace("\\040", " "))
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in found:
            return preferred
    return found[0] if found else None


def own_cgroup(proc_cgroup: str) -> str | None:
    """The v2 path of this process (the `0::/path` line), or None outside the v2 hierarchy."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            path = line[3:]
            return None if path.endswith(" (deleted)") else path
    return None


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read(path: str) -> bytes:
    """A whole cgroup file with plain system calls: open() and its buffered file object
    cost 2-3 times as much here (140 against 40-65 us for cgroup.events), and a shutdown
    reads one or two of these per service. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 65536)
        if len(data) < 65536:
            return data
        chunks = [data]
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_procs(cgroup: str) -> list[int]:
    try:
        return [int(p) for p in _read(os.path.join(cgroup, "cgroup.procs")).split()]
    except OSError:
        return []


def populated(cgroup: str) -> bool:
    try:
        data = _read(os.path.join(cgroup, "cgroup.events"))
    except FileNotFoundError:
        return False
    for line in data.splitlines():
        if line.startswith(b"populated "):
            return line.endswith(b"1")
    return False


def cpu_seconds(cgroup: str) -> float | None:
    """usage_usec of cpu.stat (always there in v2, controller or not), in seconds."""
    try:
        for line in _read(os.path.join(cgroup, "cpu.stat")).splitlines():
            if line.startswith(b"usage_usec "):
                return int(line.split()[1]) / 1e6
    except (OSError, ValueError):
        return None
    return None


def kill(cgroup: str) -> bool:
    """SIGKILL every process in the cgroup and its descendants, atomically against forks."""
    try:
        _write(os.path.join(cgroup, "cgroup.kill"), b"1")
        return True
    except OSError:
        return False


def signal_all(cgroup: str, sig: int, rounds: int = 8) -> int:
    """Send `sig` to every process in the cgroup. A member forking meanwhile puts its child
    in the cgroup too, so read again until a round finds no one new (bounded)."""
    sent: set[int] = set()
    for _ in range(rounds):
        fresh = [pid for pid in read_procs(cgroup) if pid not in sent]
        if not fresh:
            break
        for pid in fresh:
            try:
                os.kill(pid, sig)  # a pid read from the cgroup this instant: reuse is remote
            except (ProcessLookupError, PermissionError):
                pass
            sent.add(pid)
    return len(sent)


class CgroupTree:
    """The daemon instance's subtree. Event-loop thread only."""

    def __init__(self, mount: str, origin: str, instance: str) -> None:
        self.mount = mount
        self.origin = origin  # absolute directory the daemon came from
        self.instance = instance  # absolute directory of the instance
        self.leaf = os.path.join(instance, LEAF)
        self.guard_leaf = os.path.join(instance, GUARD_LEAF)
        self._made: set[str] = set()
        # Main processes spawned and not placed yet (in our leaf meanwhile): a placement skips
        # them without reading their /proc files (1,000 at startup made placement quadratic).
        # Changed by the event loop only; the placement thread only tests membership.
        self.pending: set[int] = set()

    def __repr__(self) -> str:
        return f"<CgroupTree {self.instance}>"

    @classmethod
    def create(cls) -> CgroupTree:
        """Make the instance and move this process into its leaf. Raises OSError."""
        mount = unified_mount(Path("/proc/self/mountinfo").read_text())
        if mount is None:
            raise OSError(errno.ENOENT, "no cgroup2 hierarchy mounted")
        path = own_cgroup(Path("/proc/self/cgroup").read_text())
        if path is None:
            raise OSError(errno.ENOENT, "this process is not in the cgroup2 hierarchy")
        origin = os.path.normpath(mount + path)
        _remove_stale(origin)
        instance = os.path.join(origin, f"{PREFIX}{os.getpid()}-{os.urandom(4).hex()}")
        os.mkdir(instance)
        tree = cls(mount, origin, instance)
        try:
            for leaf in (tree.leaf, tree.guard_leaf):
                os.mkdir(leaf)
            _write(os.path.join(tree.leaf, "cgroup.procs"), b"0")
        except OSError:
            tree.remove_all()
            raise
        return tree

    def path_of(self, name: str) -> str:
        """The cgroup of a service, not created: its first placement creates it (in the
        placement thread, after a startup's spawns rather than before each)."""
        return os.path.join(self.instance, name + SUFFIX)

    def service(self, name: str) -> str:
        """The cgroup of a service (created if missing)."""
        path = self.path_of(name)
        if path not in self._made:
            try:
                os.mkdir(path)
            except FileExistsError:
                pass
            self._made.add(path)
        return path

    def place(self, pid: int, cgroup: str, invocation: str, rounds: int = 64) -> list[int]:
        """Move a just-spawned service process into its cgroup, then whatever it forked
        before that from our leaf (its invocation id, or its pid as parent, tells them from
        anything else there). Blocks: a cgroup move waits for an RCU grace period (about 10 ms
        here) when no move happened just before, so this runs in a worker thread. Returns the
        strays moved; raises OSError."""
        moved = self.place_all([(pid, cgroup, invocation)], rounds)[0]
        if isinstance(moved, OSError):
            raise moved
        return moved

    def place_all(self, requests: Sequence[tuple[int, str, str]], rounds: int = 64
                  ) -> list[list[int] | OSError]:
        """`place` for many processes (pid, cgroup, invocation) at once: the moves back to
        back (they share one RCU grace period), then one read of our leaf per round for the
        strays of all of them. Per request: the strays moved, or the error."""
        results: list[list[int] | OSError] = []
        for pid, cgroup, _ in requests:
            target = os.path.join(cgroup, "cgroup.procs")
            try:
                try:
                    _write(target, str(pid).encode())
                except FileNotFoundError:
                    os.mkdir(cgroup)
                    _write(target, str(pid).encode())
                results.append([])
            except ProcessLookupError:
                results.append([])
            except OSError as exc:
                results.append(exc)
        owner_by_parent = {pid: i for i, (pid, _, _) in enumerate(requests)}
        owner_by_invocation = {inv: i for i, (_, _, inv) in enumerate(requests)}
        me = os.getpid()
        for _ in range(rounds):
            pending = self.pending  # other services' main processes, not placed yet
            strays: list[tuple[int, int]] = []
            for p in read_procs(self.leaf):
                if p == me or p in pending or p in owner_by_parent:
                    continue
                owner = owner_by_parent.get(_parent(p))  # type: ignore[arg-type]
                if owner is None:
                    owner = owner_by_invocation.get(invocation_of(p))  # type: ignore[arg-type]
                if owner is not None:
                    strays.append((p, owner))
            if not strays:
                break
            for stray, owner in strays:
                moved = results[owner]
                try:
                    _write(os.path.join(requests[owner][1], "cgroup.procs"), str(stray).encode())
                except OSError:
                    continue
                if isinstance(moved, list):
                    moved.append(stray)
        return results

    def strays(self, leader: int, invocation: str) -> list[int]:
        """Processes of one start still in our leaf: never placed because the leader died
        before its placement (they were re-parented to us, so their parent no longer names
        them) or because they were mid-exec when placement looked. Their invocation id, or
        the leader as parent, names them."""
        me = os.getpid()
        return [p for p in read_procs(self.leaf)
                if p != me and p not in self.pending
                and (_parent(p) == leader or invocation_of(p) == invocation)]

    def remove(self, cgroup: str) -> bool:
        """Remove an empty service cgroup."""
        self._made.discard(cgroup)
        try:
            os.rmdir(cgroup)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            log.warning("cannot remove cgroup path=%s error=%s", cgroup, exc.strerror)
            return False

    def services(self) -> list[str]:
        try:
            names = os.listdir(self.instance)
        except OSError:
            return []
        return [os.path.join(self.instance, n) for n in names if n.endswith(SUFFIX)]

    def remove_services(self) -> None:
        """Remove every service cgroup (empty, at shutdown): one pass, for a worker thread
        (nothing else uses the tree then: no spawn, no placement)."""
        for cgroup in self.services():
            self.remove(cgroup)

    def kill_services(self) -> None:
        for cgroup in self.services():
            kill(cgroup)

    def release(self) -> None:
        """Move back where the daemon came from and remove the service cgroups and the
        daemon's leaf (the guard's goes once the guard has ended: `remove_rest`)."""
        # Everything in our leaf goes back: this process, and whatever an embedding program
        # (a test) started meanwhile, which is not ours to kill when the guard empties it.
        for pid in [0, *(p for p in read_procs(self.leaf) if p != os.getpid())]:
            try:
                _write(os.path.join(self.origin, "cgroup.procs"), str(pid).encode())
            except OSError as exc:
                log.warning("cannot move back to cgroup path=%s pid=%d error=%s", self.origin,
                            pid or os.getpid(), exc.strerror)
        for cgroup in [*self.services(), self.leaf]:
            self.remove(cgroup)

    def remove_rest(self) -> None:
        for path in (self.guard_leaf, self.instance):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove cgroup path=%s error=%s", path, exc.strerror)

    def remove_all(self) -> None:
        self.release()
        self.remove_rest()


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _remove_stale(origin: str) -> None:
    """Remove the empty subtrees of instances whose daemon is gone (one SIGKILLed before its
    guard ran). Populated ones are left alone: their pid may be another pid namespace's."""
    try:
        names = [n for n in os.listdir(origin) if n.startswith(PREFIX)]
    except OSError:
        return
    for name in names:
        try:
            pid = int(name[len(PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)
            continue  # alive (or not ours to judge)
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        instance = os.path.join(origin, name)
        try:
            for child in os.listdir(instance):
                if os.path.isdir(os.path.join(instance, child)):
                    os.rmdir(os.path.join(instance, child))
            os.rmdir(instance)
            log.info("removed a stale cgroup path=%s", instance)
        except OSError:
            continue


# -- waiting for `populated 0` ------------------------------------------------------------
_IN_MODIFY = 0x2
_IN_IGNORED = 0x8000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")
_libc = ctypes.CDLL(None, use_errno=True)
# Safety net only: every wait is woken by inotify; this bounds a wait whose event was lost
# (the reader task gone at teardown).
RECHECK_SECONDS = 1.0


class EmptyWatcher:
    """Waits for cgroups to become empty: the kernel signals a change of `populated` in
    cgroup.events as a file modification (inotify IN_MODIFY), so one inotify fd serves every
    service and nothing polls. `run()` reads it, in the daemon's task group."""

    def __init__(self) -> None:
        # Placements run one at a time in a worker thread: back to back, the moves after
        # the first share its RCU grace period (200 at startup: ~10 ms, not 200 x 10).
        self.place_limiter = anyio.CapacityLimiter(1)
        fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self._fd: int = fd
        self._paths: dict[int, str] = {}  # wd -> cgroup
        self._wds: dict[str, int] = {}
        self._changed: dict[str, anyio.Event] = {}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        while self._fd >= 0:
            await anyio.wait_readable(self._fd)
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                continue
            for wd, mask in _events(data):
                cgroup = self._paths.get(wd)
                if cgroup is None:
                    continue
                if mask & _IN_IGNORED:  # the cgroup was removed
                    del self._paths[wd]
                    self._wds.pop(cgroup, None)
                self._wake(cgroup)

    async def wait_empty(self, cgroup: str, within: float = math.inf) -> bool:
        """Wait until `populated 0` (True), or for at most `within` seconds (False)."""
        if not populated(cgroup):  # the usual case after an exit: no watch needed
            return True
        with anyio.move_on_after(within):
            while True:
                event = self._changed.get(cgroup)
                if event is None:
                    event = self._changed[cgroup] = anyio.Event()
                self._watch(cgroup)
                if not populated(cgroup):
                    return True
                with anyio.move_on_after(RECHECK_SECONDS):
                    await event.wait()
        return not populated(cgroup)

    def forget(self, cgroup: str) -> None:
        wd = self._wds.pop(cgroup, None)
        if wd is not None:
            self._paths.pop(wd, None)
            _libc.inotify_rm_watch(self._fd, wd)
        self._changed.pop(cgroup, None)

    def _watch(self, cgroup: str) -> None:
        if cgroup in self._wds or self._fd < 0:
            return
        wd = _libc.inotify_add_watch(self._fd, os.path.join(cgroup, "cgroup.events").encode(),
                                     _IN_MODIFY)
        if wd >= 0:
            self._wds[cgroup] = wd
            self._paths[wd] = cgroup

    def _wake(self, cgroup: str) -> None:
        event = self._changed.pop(cgroup, None)
        if event is not None:
            event.set()


def _events(data: bytes) -> Iterable[tuple[int, int]]:
    offset = 0
    while offset + _EVENT.size <= len(data):
        wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
        offset += _EVENT.size + length
        yield wd, mask


def available(setting: str) -> CgroupTree | None:
    """The instance's tree if cgroups are wanted (`auto`) and usable, else None (logged)."""
    if setting == "off":
        return None
    try:
        return CgroupTree.create()
    except OSError as exc:
        log.info("no cgroup per service (fallback containment) reason=%s",
                 exc.strerror or exc)
        return None


class Placer:
    """Places spawned service processes into their cgroups in batches: one worker-thread
    call for all that were spawned since the last (`CgroupTree.place_all`). One thread
    round trip per service made 1,000 placements after a startup take 1.2 s, during which
    a shutdown waited for them. `run()` works the queue, in the daemon's task group."""

    def __init__(self, tree: CgroupTree) -> None:
        self.tree = tree
        self._queue: list[_Placement] = []
        self._queued = anyio.Event()

    def __repr__(self) -> str:
        return f"<Placer queued={len(self._queue)}>"

    async def place(self, pid: int, cgroup: str, invocation: str) -> list[int]:
        """Place one process with the next batch; returns the strays moved. Raises OSError."""
        request = _Placement(pid, cgroup, invocation)
        self._queue.append(request)
        self._queued.set()
        await request.done.wait()
        if isinstance(request.result, OSError):
            raise request.result
        return request.result

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        while True:
            if not self._queue:
                self._queued = anyio.Event()
                await self._queued.wait()
            batch, self._queue = self._queue, []
            try:
                results = await anyio.to_thread.run_sync(
                    self.tree.place_all, [(r.pid, r.cgroup, r.invocation) for r in batch])
            except Exception as exc:  # noqa: BLE001 - reported to each waiter
                error = exc if isinstance(exc, OSError) else OSError(str(exc))
                results = [error] * len(batch)
            for request, result in zip(batch, results, strict=True):
                request.result = result
                request.done.set()


class _Placement:
    def __init__(self, pid: int, cgroup: str, invocation: str) -> None:
        self.pid, self.cgroup, self.invocation = pid, cgroup, invocation
        self.done = anyio.Event()
        self.result: list[int] | OSError = []


class ServiceCgroup:
    """One service's cgroup, as its runner uses it."""

    def __init__(self, tree: CgroupTree, watcher: EmptyWatcher, name: str,
                 placer: Placer | None = None) -> None:
        self.tree = tree
        self.watcher = watcher
        self.placer = placer
        self.path = tree.path_of(name)

    def __repr__(self) -> str:
        return f"<ServiceCgroup {self.path}>"

    def signal(self, sig: int) -> None:
        """`sig` to every process of the service; SIGKILL through cgroup.kill."""
        if sig == signal.SIGKILL:
            kill(self.path)
        else:
            signal_all(self.path, sig)

    def populated(self) -> bool:
        return populated(self.path)

    async def place(self, pid: int, invocation: str) -> list[int]:
        """CgroupTree.place, in a worker thread; returns the strays moved."""
        self.tree.pending.add(pid)  # (the runner added it at the spawn already)
        try:
            if self.placer is not None:
                return await self.placer.place(pid, self.path, invocation)
            moved: list[int] = await anyio.to_thread.run_sync(
                self.tree.place, pid, self.path, invocation, limiter=self.watcher.place_limiter)
        finally:
            self.tree.pending.discard(pid)
        return moved

    async def wait_empty(self, within: float = math.inf) -> bool:
        return await self.watcher.wait_empty(self.path, within)

    def remove(self) -> None:
        self.watcher.forget(self.path)
        self.tree.remove(self.path)


class Containment:
    """A daemon's cgroup side: its instance's tree, the watcher of `populated 0` and the
    placer, made together and closed together."""

    def __init__(self, tree: CgroupTree, watcher: EmptyWatcher) -> None:
        self.tree = tree
        self.watcher = watcher
        self.placer = Placer(tree)

    @classmethod
    def open(cls, setting: str) -> Containment | None:
        """A cgroup per service if `setting` ("auto"/"off") and the host allow; None: the
        fallback containment (process groups, descendants, the subreaper's sweep)."""
        tree = available(setting)
        if tree is None:
            return None
        try:
            watcher = EmptyWatcher()
        except OSError as exc:
            log.warning("no cgroup per service (inotify) reason=%s", exc.strerror or exc)
            tree.remove_all()
            return None
        log.info("cgroup per service path=%s", tree.instance)
        return cls(tree, watcher)

    def start(self, tg: TaskGroup) -> None:
        tg.start_soon(self.watcher.run)
        tg.start_soon(self.placer.run)

    def for_service(self, name: str) -> ServiceCgroup:
        return ServiceCgroup(self.tree, self.watcher, name, self.placer)

    def close(self) -> None:
        """After release() and the guard's exit: remove what is left, stop watching."""
        self.tree.remove_rest()
        self.watcher.close()
