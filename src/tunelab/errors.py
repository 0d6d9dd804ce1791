"""User-facing errors: each carries a one-line reason that names what to fix."""

from __future__ import annotations


class TunelabError(Exception):
    """Base class for errors caused by the user's config or data (not by a bug in tunelab)."""


class ConfigError(TunelabError):
    """A config value or combination that cannot work; raised before any weights load."""


class DataError(TunelabError):
    """A data problem, located by file, line (or record index) and field where known."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        record: int | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = message
        self.file, self.line, self.record, self.field = file, line, record, field
        where = [part for part in (file, f"line {line}" if line is not None else None) if part]
        if record is not None and line is None:
            where.append(f"record {record}")
        prefix = ":".join(where[:1]) + "".join(f", {w}" for w in where[1:])
        if field is not None:
            prefix = f"{prefix}: field '{field}'" if prefix else f"field '{field}'"
        super().__init__(f"{prefix}: {message}" if prefix else message)
