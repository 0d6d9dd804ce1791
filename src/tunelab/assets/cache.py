"""Build-once cache entries: a directory is complete when its marker file exists.

Builders write into a temporary sibling directory that is renamed into place (:func:`tunelab.atomic.replace_dir`),
under an exclusive file lock (:func:`tunelab.atomic.exclusive`), so a crash never leaves a half-written entry and
concurrent processes (DDP ranks, sweep jobs) build it once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.atomic import exclusive, replace_dir

MARKER = "tunelab_complete.json"


def ensure_entry(cache_dir: str | Path, name: str, build: Callable[[Path], dict[str, Any]]) -> Path:
    """``cache_dir/name``, calling ``build(tmp_dir) -> marker info`` first if it is not complete yet."""
    target = Path(cache_dir) / name
    if (target / MARKER).exists():
        return target
    with exclusive(target):
        if (target / MARKER).exists():
            return target

        def fill(staging: Path) -> None:
            info = build(staging)
            (staging / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True))

        replace_dir(target, fill)
    return target
