"""`supervisor` command line: the only place that reads argv or configures logging.

Exit codes: 0 ok; 1 bad config or the daemon could not start; 2 usage (argparse).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import anyio

from supervisor import __version__
from supervisor.config import Config, load_config
from supervisor.errors import ConfigError, SupervisorError

log = logging.getLogger("supervisor")


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.config)
    if args.command == "run":
        return _run(args)
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
    return 0


def _configure_logging(level: str) -> None:
    try:
        from supervisor.logsetup import configure_logging
    except ImportError:  # pragma: no cover - while logsetup.py is being written
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
        return
    configure_logging(level)


def _run(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return 1
    _configure_logging(args.log_level or config.settings.log_level)
    from supervisor.daemon import Daemon

    notifier = _notifier()
    daemon = Daemon(config, notifier=notifier, subreaper=True)
    log.info("starting version=%s backend=%s config=%s services=%d", __version__, args.backend,
             config.path, len(config.services))
    try:
        anyio.run(daemon.run, backend=args.backend)
    except SupervisorError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C before the signal receiver was installed
        return 130
    return 0


def _notifier() -> object | None:
    try:
        from supervisor.notify import Notifier
    except ImportError:  # pragma: no cover - while notify.py is being written
        return None
    return Notifier.from_environ(os.environ)
