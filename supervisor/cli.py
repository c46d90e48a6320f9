"""`supervisor` command line: the only place that reads argv, configures logging, or changes
interpreter-wide settings (signal mask and dispositions, switch interval, the collector).

Exit codes: 0 ok; 1 bad config or the daemon could not start; 2 usage (argparse).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

import anyio

from supervisor import __version__
from supervisor.config import Config, load_config
from supervisor.core.errors import ConfigError, SupervisorError

if TYPE_CHECKING:
    from supervisor.control.notify import Notifier
    from supervisor.core.redact import LogRedactor
    from supervisor.daemon import Daemon
if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger("supervisor")

GC_YOUNG_THRESHOLD = 10_000  # see _tune_collector


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supervisor", description=(
        "Keep a platform's services alive and report on them to Prometheus."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground (as systemd expects)")
    run.add_argument("--config", default="services.toml", help="path to services.toml")
    run.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    check = sub.add_parser("check-config", help="validate services.toml and exit")
    check.add_argument("--config", default="services.toml", help="path to services.toml")

    status = sub.add_parser("status", help="show services and readiness (exit 0 all running, "
                                           "3 some not running, 4 daemon unreachable)")
    status.add_argument("--config", help="services.toml, to find the daemon's control socket, "
                        "then its status file and listen (default: the runtime directory, "
                        "then ./services.toml)")
    status.add_argument("--url", help="daemon base URL (default: $SUPERVISOR_URL, the status "
                        "file in the runtime directory, then the config's listen)")
    status.add_argument("--json", action="store_true", help="print the raw JSON document")
    status.add_argument("--socket", help="control socket path; without --url the CLI asks the "
                        "daemon's control socket first (no HTTP credentials needed), then HTTP")
    status.add_argument("--cacert", help="CA file for an https port (default: $SUPERVISOR_CACERT)")
    status.add_argument("--cert", help="client certificate (PEM, may include the key) for an "
                        "mTLS port (default: $SUPERVISOR_CERT)")
    status.add_argument("--key", help="its key, if not in --cert (default: $SUPERVISOR_KEY)")
    status.add_argument("--basic-auth-file", help="file whose first line is user:password for a "
                        "port with basic auth (default: $SUPERVISOR_BASIC_AUTH_FILE, then "
                        "$SUPERVISOR_BASIC_AUTH); never put a password on the command line")

    for name, text in (("start", "start services"), ("stop", "stop services (they stay "
                       "stopped until started)"), ("restart", "stop, then start services")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("services", nargs="+", metavar="SERVICE")
        _socket_args(cmd)
    reload = sub.add_parser("reload", help="re-read services.toml and apply the changes")
    _socket_args(reload)
    return parser


def _socket_args(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--config", default="services.toml",
                     help="services.toml, to find the control socket")
    cmd.add_argument("--socket", help="control socket path (default: from the config)")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `supervisor status | head -3`: the reader left, as it may. Quiet, like other Unix
        # tools; stdout goes to /dev/null so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        _unblock_inherited_mask()
    if args.command == "check-config":
        return _check_config(args.config)
    if args.command == "run":
        code = _run(args)
        if argv is None:  # the program itself (not a caller of main() that goes on)
            _exit_without_teardown(code)
        return code
    if args.command == "status":
        from supervisor.control.client import HttpAuth, show_status

        auth = HttpAuth(args.cacert, args.cert, args.key, args.basic_auth_file)
        return show_status(args.url, args.config, args.json, socket_path=args.socket, auth=auth)
    return _control(args)
    raise AssertionError(args.command)  # pragma: no cover


def _load_or_report(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return None


def _check_config(path: str) -> int:
    config = _load_or_report(path)
    if config is None:
        return 1
    names = ", ".join(config.services)
    print(f"{path}: ok ({len(config.services)} services: {names}; "
          f"{len(config.checks)} checks)")
    from supervisor.web.listen import exposure_warning

    settings = config.settings
    warning = exposure_warning(settings.listen_host, settings.listen_port, settings.web_config)
    if warning:
        print(f"{path}: warning: {warning}", file=sys.stderr)
    return 0


def _configure_logging(level: str) -> LogRedactor:
    from supervisor.core.redact import LogRedactor
    from supervisor.logs.setup import configure_logging

    handler = configure_logging(level)
    redactor = LogRedactor()  # the daemon gives it the config's secrets, and new ones on reload
    handler.addFilter(redactor)
    # httpx logs every scrape and check at INFO: routine, so only its warnings reach the journal.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    return redactor


def _unblock_inherited_mask() -> None:
    """A signal blocked by whoever started us survives execve (some init scripts and shells
    leave SIGTERM or SIGHUP blocked): the daemon would never see it, and every thread and
    service would inherit the mask. Clear it first, before any thread exists (threads copy the
    mask of the thread that creates them), as tini does."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signal.valid_signals())


def _default_inherited_ignores() -> None:
    """Signals ignored when we were started (nohup ignores SIGHUP, some CI runners more) stay
    ignored across exec: every service would inherit them. Start services as systemd does,
    with default dispositions: restore them here, in the daemon (which handles the signals it
    cares about itself; SIGPIPE is Python's, and Popen restores it in children)."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE):
            continue
        try:
            if signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):  # real-time and reserved signals
            continue


def _tune_collector() -> None:
    """Once the daemon is up, everything that exists (modules, classes, the loop) lives as long
    as it does: move it out of the collector's sight, so that full collections, which the
    scrapes' churn triggers every second or so at 200 services, scan only newer objects (a
    25 ms pause in every /v1/metrics render it hits -> 8 ms).

    Scrapes keep ~16,000 new long-lived objects a second at 200 services, so with the default
    thresholds (700, 10, 10) a full collection ran every second or two, holding the GIL
    10-50 ms: the worst /v1/metrics waits. Young collections every 10,000 net allocations
    make full ones rare; /v1/metrics p99 with 20 scrapers: 52-139 -> 37-53 ms (asyncio)."""
    gc.collect()  # the garbage of the startup (the collector was off: _run), not frozen
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
    gc.enable()


async def _serve(daemon: Daemon) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)  # returns once the services and the HTTP port are up
        _tune_collector()


def _run(args: argparse.Namespace) -> int:
    # No collections until the daemon is up (_tune_collector collects once, then freezes):
    # the startup allocates ~100,000 objects that all live as long as the daemon (modules,
    # the config, 200 runners), and the collections they triggered scanned them over and
    # over, 20-40 ms of a 200-service startup (one full collection alone 14-21 ms).
    gc.disable()
    try:
        return _run_collector_off(args)
    finally:
        gc.enable()  # also when the daemon failed before it was up


def _run_collector_off(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return 1
    _default_inherited_ignores()
    log_redactor = _configure_logging(args.log_level or config.settings.log_level)
    from supervisor.process import fdlimit

    fdlimit.ensure(len(config.services))  # before the first spawn
    from supervisor.daemon import Daemon

    notifier = _notifier()
    daemon = Daemon(config, notifier=notifier, subreaper=True, log_redactor=log_redactor)
    log.info("starting version=%s backend=%s config=%s services=%d", __version__, args.backend,
             config.path, len(config.services))
    # HTTP threads give the GIL up at every system call; while the event loop or a parse thread
    # is busy (a scrape round), taking it back waits up to one switch interval (default 5 ms).
    # At 0.5 ms /v1/ready's worst latencies under load halve (p99.9 with 20 clients: 75-115 ->
    # 36-53 ms); idle CPU is unchanged (nothing contends when idle) and so is /v1/metrics.
    sys.setswitchinterval(0.0005)
    try:
        anyio.run(_serve, daemon, backend=args.backend)
    except SupervisorError as exc:
        log.error("%s", exc)
        return 1
    except BaseExceptionGroup as group:  # raised from inside the daemon's task group
        matched, rest = group.split(SupervisorError)
        if matched is None or rest is not None:
            raise
        for leaf in _leaves(matched):
            log.error("%s", leaf)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C before the signal receiver was installed
        return 130
    return 0


def _exit_without_teardown(code: int) -> NoReturn:
    """The daemon has stopped: every service is gone, the guard has ended, the cgroups are
    removed. Skip the interpreter's teardown, which frees every object one by one, module by
    module (at 1,000 services 20-30 ms of a shutdown, after the last service has exited).
    What it would do that matters is done here: the atexit handlers (logging.shutdown among
    them, which flushes and closes the log handlers) and the standard streams' buffers. No
    thread is left to wait for: the daemon joined its own, and the others are daemonic."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or its reader left
            pass
    os._exit(code)


def _leaves(group: BaseExceptionGroup[SupervisorError]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def _control(args: argparse.Namespace) -> int:
    from supervisor.control.server import UntrustedSocket, request, socket_path_for

    path = args.socket or socket_path_for(args.config)
    services = getattr(args, "services", [])
    try:
        response = request(path, args.command, services)
    except UntrustedSocket as exc:
        print(f"supervisor: {exc}", file=sys.stderr)
        return 4
    except OSError as exc:
        print(f"supervisor: cannot reach the daemon at {path}: {exc.strerror or exc}",
              file=sys.stderr)
        return 4
    except ValueError:
        print("supervisor: the daemon sent a malformed answer", file=sys.stderr)
        return 1
    if not response.get("ok"):
        if response.get("problems"):
            print("reload rejected; the running configuration is unchanged:", file=sys.stderr)
            for problem in response["problems"]:
                print(f"  {problem}", file=sys.stderr)
        else:
            print(f"supervisor: {response.get('error', 'failed')}", file=sys.stderr)
        return 1
    if args.command == "reload":
        for key in ("added", "removed", "changed"):
            print(f"{key}: {', '.join(response[key]) or '-'}")
        pending = response.get("restart_needed") or []
        if pending:
            print(f"restart needed: {', '.join(map(str, pending))} ([supervisor] keys read "
                  "only at startup; the daemon keeps their running values until it restarts)")
        return 0
    wanted = {"stop": ("stopped",), "start": ("running", "starting"),
              "restart": ("running", "starting")}[args.command]
    code = 0
    for name, state in response.get("services", {}).items():
        print(f"{name}: {state}")
        if state not in wanted:
            code = 1
    return code


def _notifier() -> Notifier | None:
    from supervisor.control.notify import Notifier

    return Notifier.from_environ(os.environ)
