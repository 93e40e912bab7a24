"""Errors a user can act on. The CLI prints ``str(error)`` as one line, never a traceback."""

from __future__ import annotations


class TunesmithError(Exception):
    """Base class: a message that says what went wrong and where."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ConfigError(TunesmithError):
    """An invalid config: names the file, the key path and, where known, the line."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        source: str | None = None,
        line: int | None = None,
        hint: str | None = None,
        errors: list[str] | None = None,
    ) -> None:
        where = ""
        if source:
            where = source + (f":{line}" if line else "")
        prefix = ": ".join(p for p in (where, key) if p)
        super().__init__(f"{prefix}: {message}" if prefix else message, hint=hint)
        self.key = key
        self.source = source
        self.line = line
        self.errors = errors or [str(self)]


class DataError(TunesmithError):
    """Bad input data: names the file and the line (1-based) or row."""

    exit_code = 3

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, hint: str | None = None) -> None:
        where = path or ""
        if line is not None:
            where += f":{line}"
        super().__init__(f"{where}: {message}" if where else message, hint=hint)
        self.path = path
        self.line = line


class PluginError(TunesmithError):
    """A plugin failed to load or register, or two plugins claim one name."""

    exit_code = 4


class PluginNotFound(PluginError):
    """A config or command names a plugin that no installed package registers."""
