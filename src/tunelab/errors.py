"""User-facing errors: each carries a one-line reason that names what to fix, and :func:`one_line_errors`, how
an entry point (``train.py``, ``evaluate.py``) reports them."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

FULL_ERROR = "HYDRA_FULL_ERROR"  # =1: a tunelab error goes through unchanged, with its full stack (as Hydra's own)


class TunelabError(Exception):
    """Base class for errors a user can act on (config, data, a lost rank of a multi-process run), not bugs."""


class ConfigError(TunelabError):
    """A config value or combination that cannot work; raised before any weights load."""


class RewardError(TunelabError):
    """A reward (a user's function, a reward model) that raised on a sample or did not return one finite float
    per completion (:mod:`tunelab.rewards.checked`)."""


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


def tunelab_error(error: BaseException | None) -> TunelabError | None:
    """``error`` itself when it is a :class:`TunelabError`, else the first one down its chain of ``__cause__`` (or,
    without one, ``__context__``): Lightning and Hydra raise errors of hooks and jobs wrapped that way. ``None``
    when the chain holds none (a bug, reported with its stack)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, TunelabError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def one_line_errors() -> Iterator[None]:
    """The body of a Hydra job: a tunelab error (raised, or wrapped as :func:`tunelab_error` finds it) ends it
    with one line on stderr, ``error: <message>``, and no stack:

    - a single run then exits with status 2;
    - a sweep job (``-m``) raises Hydra's ``CompactHydraException`` with the message instead: ``SystemExit`` would
      pass through Hydra's job runner (it catches ``Exception``) and end the whole sweep, this job unrecorded.
      Hydra records the job as failed: the basic sweeper runs the remaining jobs, then ends the sweep on the
      first failure, printed without a stack (status 1); Optuna's sweeper counts it against ``max_failure_rate``.

    With ``HYDRA_FULL_ERROR=1`` the error goes through unchanged (Hydra prints its full stack); any other error
    always does.
    """
    try:
        yield
    except Exception as error:
        from hydra.core.hydra_config import HydraConfig
        from hydra.errors import CompactHydraException
        from hydra.types import RunMode

        found = tunelab_error(error)
        if found is None or os.environ.get(FULL_ERROR) == "1":
            raise
        message = " ".join(str(found).splitlines())
        print(f"error: {message}", file=sys.stderr, flush=True)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise CompactHydraException(message) from error
        raise SystemExit(2) from None
