"""Build-once cache entries: a directory is complete when its marker file exists.

Builders write into a temporary sibling directory and rename it into place, under an exclusive file lock,
so a crash never leaves a half-written entry and concurrent processes (DDP ranks) build it once.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MARKER = "tunelab_complete.json"


@contextmanager
def _locked(cache_dir: Path, name: str):
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_entry(cache_dir: str | Path, name: str, build: Callable[[Path], dict[str, Any]]) -> Path:
    """``cache_dir/name``, calling ``build(tmp_dir) -> marker info`` first if it is not complete yet."""
    target = Path(cache_dir) / name
    if (target / MARKER).exists():
        return target
    with _locked(Path(cache_dir), name):
        if (target / MARKER).exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
        staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache is shared like any checkout
        try:
            info = build(staging)
            (staging / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True))
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
