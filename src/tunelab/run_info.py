"""What a run writes next to its checkpoints so a paper table can be regenerated from the folder alone."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

PACKAGES = (
    "torch",
    "lightning",
    "transformers",
    "peft",
    "hydra-core",
    "datasets",
    "torchmetrics",
    "bitsandbytes",
    "accelerate",
    "sacrebleu",
    "rouge-score",
    "wandb",
    "tunelab",
)


def git_revision(cwd: Path | None = None) -> dict[str, Any]:
    """The commit and whether the work tree had uncommitted changes (``None`` outside a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_run_info(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Write ``config.yaml`` (resolved) and ``run_info.json`` (seed, git, versions, command) to ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    info = {
        "seed": cfg.seed,
        "command": " ".join(sys.argv),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_revision(Path(__file__).resolve().parent),
        "python": platform.python_version(),
        "host": platform.node(),
        "packages": package_versions(),
    }
    (output_dir / "run_info.json").write_text(json.dumps(info, indent=2))
    return info


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, turning tensors into floats."""

    def plain(value: Any) -> Any:
        return value.item() if hasattr(value, "item") else value

    path.write_text(json.dumps({k: plain(v) for k, v in payload.items()}, indent=2, default=str))
