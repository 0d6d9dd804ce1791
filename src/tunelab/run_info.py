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

from hydra.experimental.callback import Callback
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
    ``"***"`` (None, booleans and numbers stay: they are no credential, and a seed such as VeRA's
    ``projection_prng_key`` must read back as the number the run used). Each secret string of 4 or more characters
    is also replaced wherever else it occurs in a string of ``value`` (e.g. an interpolation that copied it). A
    DictConfig is resolved first, so a secret read with ``${oc.env:...}`` is replaced, never written.
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
    return value is not None and not isinstance(value, (bool, int, float))


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


def hub_commit(repo_id: str, revision: str | None, cache_dir: str | Path | None = None) -> str | None:
    """The commit a Hub ``repo_id`` at ``revision`` (default ``main``) resolved to, from the local Hub cache.

    huggingface_hub keeps one ``snapshots/<commit>/`` folder per commit and ``refs/<revision>`` naming the one a
    branch or tag pointed to when it was fetched, so the folder ``config.json`` is cached in names the commit the
    weights were read from (transformers 5.x no longer records it on the config). A revision that is a commit is
    returned as given; ``None`` when the repo is not in the cache."""
    from huggingface_hub import try_to_load_from_cache

    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision or "main")
    match = re.search(r"[/\\]snapshots[/\\]([0-9a-f]{40})[/\\]", found) if isinstance(found, str) else None
    return match.group(1) if match else None


def model_provenance(model_cfg: DictConfig, hub_cache: str | Path | None = None) -> dict[str, Any]:
    """Where the weights came from: the config's source, path and requested revision, and, for a Hub model, the
    commit they resolved to (``resolved_commit``, :func:`hub_commit`; ``None`` for weights built locally or read
    from a folder). A requested revision such as ``main`` moves; the commit does not."""
    path, revision = model_cfg.get("path"), model_cfg.get("revision")
    from_hub = model_cfg.get("source") == "hub" and path and not Path(str(path)).exists()
    return {
        "source": model_cfg.get("source"),
        "path": path,
        "revision": revision,
        "resolved_commit": hub_commit(str(path), revision, hub_cache) if from_hub else None,
    }


def write_run_info(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Write ``config.yaml`` (resolved) and ``run_info.json`` (seed, git, versions, command, the model's provenance:
    :func:`model_provenance`) to ``output_dir``, both through :func:`redact`, and redact the copies
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
        "model": model_provenance(cfg.model),
    }
    write_text(output_dir / "run_info.json", json.dumps(info, indent=2))
    return info


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (atomically), turning tensors into floats."""

    def plain(value: Any) -> Any:
        return value.item() if hasattr(value, "item") else value

    write_text(path, json.dumps({k: plain(v) for k, v in payload.items()}, indent=2, default=str))


class RedactHydraCopies(Callback):
    """Hydra callback (``configs/hydra/default.yaml``): redacts the config copies Hydra has just written
    (``.hydra/``, a sweep's ``multirun.yaml``) when the job starts, so a secret is gone from them even when the
    run then stops at its config check, before :func:`write_run_info`."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        for path in hydra_copies():
            redact_file(path)
