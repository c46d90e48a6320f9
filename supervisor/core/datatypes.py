"""Small pure converters from config text to values (after supervisord's datatypes.py)."""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping

_INTERPOLATION = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\{[^}]*\}?)")


def signal_number(name: str) -> int:
    """`"TERM"`, `"SIGTERM"` or `"15"` -> 15; ValueError names the accepted forms."""
    text = name.strip().upper()
    if text.isdigit():
        number = int(text)
        try:
            signal.Signals(number)
        except ValueError:
            raise ValueError(f"unknown signal number {number}") from None
        return number
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return int(signal.Signals[text])
    except KeyError:
        raise ValueError(f"unknown signal {name!r} (expected a name such as SIGTERM)") from None


# syslog priorities by name, as journalctl -p and systemd's SyslogLevel= spell them.
PRIORITIES = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5,
              "info": 6, "debug": 7}


def priority_number(name: str) -> int:
    """`"err"` or `"3"` -> 3; ValueError names the accepted forms."""
    text = name.lower()
    if text in PRIORITIES:
        return PRIORITIES[text]
    if text.isdigit() and len(text) == 1 and int(text) <= 7:
        return int(text)
    raise ValueError(f"unknown syslog priority {name!r} (expected one of "
                     f"{', '.join(PRIORITIES)}, or 0-7)")


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def parse_listen(text: str) -> tuple[str, int]:
    """`"127.0.0.1:9464"`, `"[::1]:9464"` or `":9464"` (loopback) -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected host:port, got {text!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range 0..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host or "127.0.0.1"), port


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Expand `${VAR}` and `${VAR:-default}`; `$$` is a literal `$`.

    Raises KeyError(VAR) for an undefined variable without a default and ValueError for a
    malformed reference. Error text never contains a variable's value.
    """

    def replace(match: re.Match[str]) -> str:
        whole = match.group(0)
        if whole == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name is None:
            raise ValueError(f"malformed variable reference {whole!r} (use ${{NAME}} or $$)")
        value = environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise KeyError(name)
            return default
        return value

    return _INTERPOLATION.sub(replace, text)


def parse_env_file(text: str) -> tuple[dict[str, str], list[tuple[int, str]]]:
    """Parse systemd EnvironmentFile= syntax: `KEY=VALUE` lines, `#`/`;` comments, optional
    single or double quotes, optional leading `export `. Returns (values, [(line, problem)])."""
    values: dict[str, str] = {}
    problems: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            problems.append((number, "expected KEY=VALUE"))
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
            if raw.strip()[-1] == '"':
                value = value.replace('\\"', '"').replace("\\\\", "\\")
        values[key] = value
    return values, problems
