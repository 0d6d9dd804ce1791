"""Writes a later run trusts, made atomic: readers see the old file or the new one, never half of one.

Every such write goes through here: checkpoints (:class:`tunelab.checkpoints.AtomicCheckpointIO`), exports,
``metrics.json`` / ``run_info.json`` / ``config.yaml``, the asset cache and the DPO reference cache.

The recipe (POSIX): write into a uniquely named temporary file in the target's own folder (same file system, so
the rename cannot turn into a copy; unique, so two writers never share a temporary), ``fsync`` it, ``os.replace``
it onto the target (atomic on POSIX), then ``fsync`` the folder so the rename itself survives a power cut. A
process killed midway (SIGKILL included) leaves at most a hidden ``.<name>.*.tmp`` file, which nothing reads.
Where several processes may write the same target, :func:`exclusive` serialises them with an ``flock``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary)`` to fill a fresh temporary file beside ``path``, then move it onto ``path``.

    ``write`` may open the temporary by name (``torch.save``, ``OmegaConf.save``) and must finish writing it
    before returning. If ``write`` raises, ``path`` is untouched and the temporary is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    temporary = Path(name)
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it owner-only; a run folder is shared like any file
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """``path.write_text(text)``, atomically."""
    return replace_file(path, lambda temporary: temporary.write_text(text))


def write_bytes(path: str | Path, data: bytes) -> Path:
    """``path.write_bytes(data)``, atomically."""
    return replace_file(path, lambda temporary: temporary.write_bytes(data))


def replace_dir(path: str | Path, build: Callable[[Path], None]) -> Path:
    """Call ``build(staging)`` to fill a fresh hidden folder beside ``path``, then rename it to ``path``.

    A folder cannot be renamed over a non-empty one, so an existing ``path`` is first renamed aside and removed
    after the swap: a reader finds the complete old folder, the complete new one, or (killed between the two
    renames, microseconds) none; never a partial one. If ``build`` raises, ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        build(staging)
        for file in staging.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
        staging.chmod(0o755)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", suffix=".tmp", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(staging, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


@contextmanager
def exclusive(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<path>.lock`` (created if missing): one process at a time writes ``path``.

    Works across processes of one machine and on NFS v4 / Lustre mounts with ``flock`` support (SLURM clusters'
    shared folders usually have it)."""
    lock_path = Path(path).with_name(f".{Path(path).name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
