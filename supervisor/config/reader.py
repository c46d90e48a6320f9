"""Typed reads from a TOML table, each problem collected with its key path.

A getter returns the value at `data[key]`, or `default` when the key is absent or its value
is wrong (the problem is then recorded: `services.api.stop_timeout: must be >= 0, got -1`).
Strings are `${VAR}`-interpolated from the given environment. A problem names the key path
and what was expected; it never quotes a string that came from the environment (a
malformed reference is quoted only where the value is not secret: `expand(secret=False)`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from supervisor.config.schema import MAX_RETRIES, MAX_SECONDS
from supervisor.core.datatypes import interpolate, priority_number

_S = TypeVar("_S", bound=str)  # one of a fixed set of strings (Reader.choice)


class Reader:
    def __init__(self, path: str, environ: dict[str, str]) -> None:
        self.path = path
        self.base = Path(path).resolve().parent  # relative paths are the file's
        self.environ = environ
        self.problems: list[str] = []

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def table(self, data: Mapping[str, Any], allowed: set[str], where: str) -> None:
        for key in data:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.problem(f"{where}.{key}" if where else key,
                             f"unknown key (expected one of {hint})")

    def string(self, data: Mapping[str, Any], key: str, where: str, default: Any = None,
               interpolated: bool = True) -> Any:
        if key not in data:
            return default
        value = data[key]
        if not isinstance(value, str):
            self.problem(f"{where}.{key}", f"expected a string, got {type_name(value)}")
            return default
        text = self.expand(value, f"{where}.{key}") if interpolated else value
        return text if self.no_nul(text, f"{where}.{key}") else default

    def no_nul(self, text: str, where: str, what: str = "") -> bool:
        """Strings reach the OS (argv, environ, paths): a NUL byte cannot. Never echoes."""
        if "\0" in text:
            self.problem(where, f"{what or 'value'} contains a NUL byte")
            return False
        return True

    def number(self, data: Mapping[str, Any], key: str, where: str, default: float,
               minimum: float = 0.0, strictly: bool = False,
               maximum: float = MAX_SECONDS) -> float:
        if key not in data:
            return default
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problem(f"{where}.{key}", f"expected a number of seconds, got {type_name(value)}")
            return default
        if isinstance(value, float) and not math.isfinite(value):
            self.problem(f"{where}.{key}", f"must be a finite number, got {value}")
            return default
        if value < minimum or (strictly and value == minimum):
            relation = ">" if strictly else ">="
            self.problem(f"{where}.{key}",
                         f"must be {relation} {minimum:g}, got {_number_text(value)}")
            return default
        if value > maximum:
            self.problem(f"{where}.{key}", f"must be <= {maximum:g}, got {_number_text(value)}")
            return default
        return float(value)

    def integer(self, data: Mapping[str, Any], key: str, where: str, default: Any,
                minimum: int = 0, maximum: int = MAX_RETRIES) -> Any:
        if key not in data:
            return default
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(f"{where}.{key}", f"expected an integer, got {type_name(value)}")
            return default
        if value < minimum or value > maximum:
            self.problem(f"{where}.{key}",
                         f"must be {minimum}..{maximum}, got {_number_text(value)}")
            return default
        return value

    def boolean(self, data: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
        if key not in data:
            return default
        value = data[key]
        if not isinstance(value, bool):
            self.problem(f"{where}.{key}", f"expected true or false, got {type_name(value)}")
            return default
        return value

    def strings(self, data: Mapping[str, Any], key: str, where: str,
                interpolated: bool = True) -> tuple[str, ...]:
        if key not in data:
            return ()
        value = data[key]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(f"{where}.{key}", "expected a list of strings")
            return ()
        texts = tuple(self.expand(v, f"{where}.{key}[{i}]") if interpolated else v
                      for i, v in enumerate(value))
        if not all([self.no_nul(v, f"{where}.{key}[{i}]") for i, v in enumerate(texts)]):
            return ()
        return texts

    def globs(self, data: Mapping[str, Any], key: str, where: str) -> tuple[str, ...] | None:
        """A list of metric-name globs, or None when the key is absent."""
        if key not in data:
            return None
        value = data[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(f"{where}.{key}", "expected a list of metric-name globs (strings)")
            return None
        for index, glob in enumerate(value):
            if not glob or not all(c.isascii() and (c.isalnum() or c in "_:*?[]!")
                                   for c in glob):
                self.problem(f"{where}.{key}[{index}]", "expected a metric-name glob: letters, "
                             "digits, '_', ':' and the wildcards * ? [...]")
        return tuple(value)

    def choice(self, data: Mapping[str, Any], key: str, where: str, options: tuple[_S, ...],
               default: _S) -> _S:
        value = self.string(data, key, where, default, interpolated=False)
        if value not in options:
            self.problem(f"{where}.{key}", f"expected one of {', '.join(options)}")
            return default
        return options[options.index(value)]  # typed as the options are

    def priority(self, data: Mapping[str, Any], key: str, where: str, default: int) -> int:
        if key not in data:
            return default
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.problem(f"{where}.{key}",
                         f"expected a syslog priority name, got {type_name(value)}")
            return default
        try:
            return priority_number(str(value))
        except ValueError as exc:
            self.problem(f"{where}.{key}", str(exc))
            return default

    def expand(self, text: str, where: str, secret: bool = False) -> str:
        try:
            return interpolate(text, self.environ)
        except KeyError as exc:
            self.problem(where, f"environment variable {exc.args[0]} is not set "
                                f"(use ${{{exc.args[0]}:-default}} for a fallback)")
        except ValueError as exc:
            # The malformed reference is part of the value: not shown for a secret.
            self.problem(where, "malformed variable reference (use ${NAME} or $$)" if secret
                         else str(exc))
        return text

    def resolve(self, text: str) -> str:
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # ~user of an unknown user: left as written, reported as missing
            path = Path(text)
        return str(path if path.is_absolute() else self.base / path)

    def section(self, data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.problem(key, f"expected a table, got {type_name(value)}")
            return {}
        return value

    def is_table(self, value: Any, where: str) -> bool:
        if isinstance(value, dict):
            return True
        self.problem(where, f"expected a table, got {type_name(value)}")
        return False


def path_is(test: Callable[[Path], bool], path: str) -> bool:
    """Path.is_dir / is_file, False for a name the OS refuses (too long, ...)."""
    try:
        return test(Path(path))
    except (OSError, ValueError):
        return False


def _number_text(value: float) -> str:
    """A number for an error message; TOML integers have no size limit, floats' text has."""
    if isinstance(value, int):
        return str(value) if abs(value) < 10**30 else "a number of more than 30 digits"
    return f"{value:g}"


def as_written(data: Mapping[str, Any], key: str, expanded: str) -> str:
    """The config's own text for `data[key]` (its first item for a list), `${VAR}` references
    unexpanded; `expanded` when the key holds nothing usable."""
    raw = data.get(key)
    if isinstance(raw, list) and raw:
        raw = raw[0]
    return raw if isinstance(raw, str) else expanded


def type_name(value: Any) -> str:
    """What a TOML value is, in words, for an error: never the value itself."""
    names: dict[type, str] = {str: "a string", bool: "a boolean", int: "an integer",
                              float: "a number", list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)
