"""What a run writes next to its checkpoints so a paper table can be regenerated from the folder alone, and
:func:`redact`, which keeps secrets out of everything a run writes (its files and its W&B run)."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tunelab.atomic import replace_file, write_text

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


REDACTED = "***"
SECRET_NAME = re.compile(r"(token|key|secret|password)$", re.IGNORECASE)
# `key=value` at the start of a string or after a comma / space, its value running to the next such `key=`:
# one command-line override (`+model.hf_token=abc`), or one of those Hydra joins (`a=1,+model.hf_token=abc`)
ASSIGNMENT = re.compile(
    r"(?:^|(?<=[,\s]))(?P<key>[+~-]*(?P<name>[\w.-]+))=(?P<value>.*?)(?=[,\s][+~-]*[\w.-]+=|\Z)", re.DOTALL
)
SEARCHED_LENGTH = 4  # a secret this long or longer is also replaced wherever else it occurs in a string


def is_secret_name(name: str) -> bool:
    """Whether a config key names a secret: its last dotted part ends in token, key, secret or password, any case
    (``hf_token``, ``WANDB_API_KEY``, ``model.token``; not ``max_new_tokens`` or ``num_key_value_heads``)."""
    return bool(SECRET_NAME.search(name.rsplit(".", 1)[-1]))


def redact(value: Any) -> Any:
    """A copy of ``value`` (mappings, lists and tuples at any depth, DictConfigs, strings) without its secrets.

    A secret is the value of a key :func:`is_secret_name` matches, in a mapping or in a ``key=value`` part of a
    string (a command-line override ``+model.hf_token=abc``, or one of those Hydra joins with commas); it becomes
    ``"***"`` (None and booleans stay: they are no credential). Each secret string of 4 or more characters is also
    replaced wherever else it occurs in a string of ``value`` (e.g. an interpolation that copied it). A DictConfig
    is resolved first, so a secret read with ``${oc.env:...}`` is replaced, never written.
    """
    plain = _plain(value)
    secrets: set[str] = set()
    _collect_secrets(plain, secrets)
    return _scrub(plain, sorted((s for s in secrets if len(s) >= SEARCHED_LENGTH), key=len, reverse=True))


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    return value


def _collect_secrets(value: Any, secrets: set[str]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if is_secret_name(str(key)) and isinstance(item, str):
                secrets.add(item)
            _collect_secrets(item, secrets)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect_secrets(item, secrets)
    elif isinstance(value, str):
        secrets.update(a["value"] for a in ASSIGNMENT.finditer(value) if is_secret_name(a["name"]))


def _scrub(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, Mapping):
        return {
            key: REDACTED if is_secret_name(str(key)) and _is_credential(item) else _scrub(item, secrets)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(item, secrets) for item in value)
    if isinstance(value, str):
        value = ASSIGNMENT.sub(lambda a: f"{a['key']}={REDACTED}" if is_secret_name(a["name"]) else a[0], value)
        for secret in secrets:
            value = value.replace(secret, REDACTED)
    return value


def _is_credential(value: Any) -> bool:
    return value is not None and not isinstance(value, bool)


def hydra_copies() -> list[Path]:
    """The config files Hydra wrote for this job: ``<run>/.hydra/*.yaml`` (the config as composed, its overrides,
    Hydra's own config) and, under ``-m``, the sweep's ``multirun.yaml``; none outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return []
    hydra_cfg = HydraConfig.get()
    copies = []
    if hydra_cfg.output_subdir is not None:
        copies += sorted((Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir).glob("*.yaml"))
    if hydra_cfg.mode == RunMode.MULTIRUN:
        copies.append(Path(hydra_cfg.sweep.dir) / "multirun.yaml")
    return [path for path in copies if path.is_file()]


def redact_file(path: Path) -> None:
    """Rewrite a YAML file through :func:`redact` (interpolations kept unresolved), if it holds a secret; the new
    text replaces the old in one step, so a parallel job never reads half a file."""
    original = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    redacted = redact(original)
    if redacted != original:
        replace_file(path, lambda temporary: OmegaConf.save(OmegaConf.create(redacted), temporary))


def model_provenance(model_cfg: DictConfig, model: Any | None) -> dict[str, Any]:
    """Where the weights came from: the config's source, path and requested revision, and the Hub commit they
    resolved to (``resolved_commit``; ``None`` for weights built locally or read from a plain folder).

    transformers (5.x) records the commit of the snapshot it read a model's files from as the config's
    ``_commit_hash``; a requested ``revision`` such as ``main`` moves, the commit does not."""
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return {
        "source": model_cfg.get("source"),
        "path": model_cfg.get("path"),
        "revision": model_cfg.get("revision"),
        "resolved_commit": commit if isinstance(commit, str) else None,
    }


def write_run_info(cfg: DictConfig, output_dir: Path, model: Any | None = None) -> dict[str, Any]:
    """Write ``config.yaml`` (resolved) and ``run_info.json`` (seed, git, versions, command, the loaded ``model``'s
    provenance: :func:`model_provenance`) to ``output_dir``, both through :func:`redact`, and redact the copies
    Hydra wrote before the job started (:func:`hydra_copies`).

    A secret in the config reads back as ``"***"``: give credentials through the environment (``HF_TOKEN``,
    ``WANDB_API_KEY``), which is never written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    config, argv = redact((cfg, sys.argv))
    replace_file(output_dir / "config.yaml", lambda temporary: OmegaConf.save(OmegaConf.create(config), temporary))
    for path in hydra_copies():
        redact_file(path)
    info = {
        "seed": cfg.seed,
        "command": " ".join(argv),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_revision(Path(__file__).resolve().parent),
        "python": platform.python_version(),
        "host": platform.node(),
        "packages": package_versions(),
        "model": model_provenance(cfg.model, model),
    }
    write_text(output_dir / "run_info.json", json.dumps(info, indent=2))
    return info


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (atomically), turning tensors into floats."""

    def plain(value: Any) -> Any:
        return value.item() if hasattr(value, "item") else value

    write_text(path, json.dumps({k: plain(v) for k, v in payload.items()}, indent=2, default=str))
