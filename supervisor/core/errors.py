"""The few error classes the daemon raises on purpose; the CLI maps them to exit codes."""

from __future__ import annotations


class SupervisorError(Exception):
    """Base of every error the daemon raises deliberately."""


class ConfigError(SupervisorError):
    """services.toml is unreadable or invalid; carries every problem found, not just the first."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = list(problems)
        super().__init__(f"{path}: " + "; ".join(self.problems))

    def render(self) -> str:
        lines = [f"{self.path}: {len(self.problems)} problem(s)"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


class SpawnError(SupervisorError):
    """A service's process could not be started (missing executable, bad cwd, ...)."""


class LifecycleError(SupervisorError):
    """An event reached a service's lifecycle in a state where it cannot happen (a bug in the
    runner, or in the table). The runner's fault boundary makes that service `fatal`."""
