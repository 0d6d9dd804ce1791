"""The reference model ``pi_ref`` of an alignment objective: the fixed distribution the policy is held to (DPO's
log-ratios, the KL penalty of PPO and of the RL objectives to come).

Sources (``source``):

- ``adapter_disabled``: the policy itself with its adapters switched off (peft or in-house methods): no second
  model. A method that trains the base weights in place has no adapter to switch off.
- ``copy``: a frozen copy of the policy as it is when the reference is made (any method), held outside the task
  module's tree (:class:`~tunelab.models.frozen.FrozenModel`).
- ``precomputed``: the objective's reference outputs of every example of every split, computed once before the
  first update (adapters off, or the starting policy itself when it trains in place) and cached on disk as
  ``<cache_dir>/<split>-<key>.pt`` (the cache below).

The policy is passed to each call rather than held: a module whose ``model`` is replaced (``evaluate.py`` loads
an adapter into it) is scored with the model it holds then. The reference never switches the policy between
train and eval mode: a caller that needs its dropout off wraps the call in :func:`tunelab.models.frozen.eval_mode`.

The precomputed cache. ``key`` is the first 20 hex digits of the SHA-256 of
``json({identity, weights, quantization, precision, settings})`` followed by ``json(example)`` of each encoded
example, which covers everything the reference outputs depend on:

- ``identity``: what names the model, given by the objective (DPO: the model config as JSON: name, source,
  path, revision, load dtype, tokenizer, chat template, architecture);
- ``weights``: :func:`weights_fingerprint` of the reference's parameters as the reference is made, i.e. the
  weights training *starts* from (all of the policy's for a method that trains in place, else its frozen ones:
  the adapters the reference switches off are left out, so runs that differ only in ``seed`` share a table);
- ``quantization``: the model's ``config.quantization_config`` (bitsandbytes 4-bit: quant type, double
  quantization, compute and storage dtypes), or ``null``;
- ``precision``: :func:`run_precision` when the table is looked up, right where it is scored (the trainer's
  ``precision``: ``32-true``, ``bf16-true`` and ``bf16-mixed`` give three tables);
- ``settings`` and the examples: the objective's own (DPO: ``average_logps``, each reply's ``input_ids`` and
  ``labels``, so tokenizer, template, ``max_length`` and data are covered). A sweep over anything else (DPO's
  ``beta``) computes the tables once.

A file holds ``{"table": tensor, "sha256": hex digest of its bytes}``. Several writers (the jobs of a joblib or
SLURM sweep) share it safely: one that finds it missing takes an exclusive lock on it
(:func:`tunelab.atomic.exclusive`), looks again (so the others, once they hold the lock, read the file it wrote
instead of computing), computes, and writes a unique temporary that is fsync'd and renamed into place
(:func:`tunelab.atomic.replace_file`): no reader sees half a file. The ranks of one process group compute it
together, outside the lock (a sharded model's forward is collective), if any of them lacks it, and write it
under the lock the same way (the first writes, the others read its file). A file is read as data only
(``weights_only``); one that does not load, holds another shape or fails its checksum (a copy cut short, blocks
lost in a crash) is named in one warning and computed again. A table is never computed from trained weights:
a method that trains in place refuses to (:class:`~tunelab.errors.ConfigError`) once its weights are not the
starting ones, though it still reads the table cached under the starting weights' key.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.atomic import exclusive, replace_file
from tunelab.errors import ConfigError
from tunelab.methods.inhouse import adapters_disabled
from tunelab.models.frozen import FrozenModel

log = logging.getLogger("tunelab.reference")

SOURCES = ("adapter_disabled", "copy", "precomputed")
# what torch.load raises on a file cut short, zeroed or not written by torch.save, and what read_table raises
UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError)


def check_reference(source: str, trains_base_in_place: bool, trained_by: str = "the method") -> None:
    """Refuse a reference source that is unknown or cannot be built: ``adapter_disabled`` when the policy trains
    its base weights in place (the message names ``trained_by`` as what trains them)."""
    if source not in SOURCES:
        raise ConfigError(f"task.reference={source!r} is not one of {list(SOURCES)}")
    if source == "adapter_disabled" and trains_base_in_place:
        raise ConfigError(
            f"task.reference=adapter_disabled needs an adapter to switch off, but {trained_by} trains the model's "
            "own weights: use task.reference=copy or precomputed"
        )


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """Every byte of ``tensor``'s data, on the CPU (detached first: a bitsandbytes ``Params4bit``'s own ``.cpu()``
    would move its quantization state off the GPU)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def weights_fingerprint(parameters: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 hex digest over each named tensor's name, dtype, shape and every byte of its data.

    Every byte, because what moves weights moves few or small ones (a few optimizer steps, bitfit's biases, a
    merged low-rank update, one edited tensor): a sum over strided slices misses any change off the sampled
    elements, and sums cancel. Any changed bit changes the digest, for one pass over the weights: 0.67 s for
    SmolLM2-135M's 538 MB of float32 weights on one (busy) CPU core, measured."""
    digest = hashlib.sha256()
    for name, tensor in parameters:
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def quantization_of(policy: torch.nn.Module) -> Any:
    """The policy's ``config.quantization_config`` as plain values (``to_dict`` of a transformers config), or
    ``None`` for a model loaded unquantized."""
    quantization = getattr(getattr(policy, "config", None), "quantization_config", None)
    return quantization.to_dict() if hasattr(quantization, "to_dict") else quantization


def run_precision(policy: torch.nn.Module) -> str:
    """How ``policy`` computes now: the dtypes of its floating parameters, and the dtype autocast casts to on
    their device (``off`` outside autocast), e.g. ``torch.float32 autocast=torch.bfloat16`` under
    ``trainer.precision=bf16-mixed``."""
    parameters = list(policy.parameters())
    dtypes = sorted({str(p.dtype) for p in parameters if p.is_floating_point()})
    device = parameters[0].device.type
    autocast = str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else "off"
    return f"{'+'.join(dtypes)} autocast={autocast}"


class ReferenceModel:
    """``pi_ref`` of one policy, from one of :data:`SOURCES` (see the module docstring)."""

    def __init__(
        self,
        policy: torch.nn.Module,
        *,
        trains_base_in_place: bool,
        source: str | None = None,
        cache_dir: str | Path | None = None,
        identity: str = "",
    ) -> None:
        """``policy`` as training starts; ``trains_base_in_place``: its method updates the base weights themselves
        (no adapter to switch off). ``source`` ``None`` is the cheapest live reference: ``copy`` when the policy
        trains in place, else ``adapter_disabled``. ``precomputed`` caches its tables under ``cache_dir``, keyed
        by ``identity`` (what names the reference model, e.g. the model config as JSON) and by the starting
        weights, fingerprinted now (module docstring)."""
        self.source = source if source is not None else ("copy" if trains_base_in_place else "adapter_disabled")
        check_reference(self.source, trains_base_in_place)
        if self.source == "precomputed" and cache_dir is None:
            raise ConfigError("task.reference=precomputed needs task.reference_cache_dir (where the tables are kept)")
        self.trains_base_in_place = trains_base_in_place
        self.frozen = FrozenModel(copy.deepcopy(policy)) if self.source == "copy" else None
        self.cache_dir, self.identity = cache_dir, identity
        self.tables: dict[str, torch.Tensor] = {}  # split -> the precomputed table of its examples
        self.start_weights = weights_fingerprint(self.reference_weights(policy)) if self.precomputed else ""
        self.quantization = quantization_of(policy) if self.precomputed else None
        self.weights_changed = False  # the policy was found holding other weights than the starting ones

    @property
    def precomputed(self) -> bool:
        return self.source == "precomputed"

    def reference_weights(self, policy: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """The named parameters the reference computes with: all of the policy's when it trains in place, else
        the frozen ones (its adapters are switched off)."""
        return ((n, p) for n, p in policy.named_parameters() if self.trains_base_in_place or not p.requires_grad)

    def check_start(self, policy: torch.nn.Module) -> None:
        """Note whether a policy that trains in place still holds the starting weights (:attr:`weights_changed`),
        while no table is loaded yet. Called before each trainer stage sets up: after a caller loaded weights
        into the policy (``evaluate.py``), before a resume restores a checkpoint (its step count tells instead)
        and before a strategy converts the weights' dtype or shards them."""
        if self.precomputed and self.trains_base_in_place and not self.tables:
            self.weights_changed = weights_fingerprint(self.reference_weights(policy)) != self.start_weights

    @torch.no_grad()
    def logits(self, policy: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The reference's logits of the batch, computed now: the frozen copy's (float32, cut to the input
        positions: :meth:`FrozenModel.logits`), else ``policy``'s in its own dtype with its adapters switched off,
        or as it is when it trains in place (``precomputed`` only, before its first update)."""
        if self.frozen is not None:
            return self.frozen.logits(input_ids, attention_mask)
        if self.trains_base_in_place:
            return policy(input_ids=input_ids, attention_mask=attention_mask).logits
        with adapters_disabled(policy):
            return policy(input_ids=input_ids, attention_mask=attention_mask).logits

    def cache_path(self, split: str, settings: Sequence[Any], examples: Iterable[Any], precision: str) -> Path:
        """``<cache_dir>/<split>-<key>.pt`` of a table over the JSON-encodable ``examples``, scored at
        ``precision`` (:func:`run_precision`); the key is the module docstring's."""
        header = {
            "identity": self.identity,
            "weights": self.start_weights,
            "quantization": self.quantization,
            "precision": precision,
            "settings": list(settings),
        }
        digest = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
        for example in examples:
            digest.update(json.dumps(example).encode())
        return Path(self.cache_dir) / f"{split}-{digest.hexdigest()[:20]}.pt"

    def load_or_compute(
        self,
        split: str,
        settings: Sequence[Any],
        examples: Iterable[Any],
        compute: Callable[[], torch.Tensor],
        *,
        policy: torch.nn.Module,
        shape: tuple[int, ...],
        updated: bool,
    ) -> torch.Tensor:
        """The precomputed table of ``split`` (kept in :attr:`tables`), of ``shape``: read from its cache file,
        else ``compute()``-d now from ``policy`` (as it is, or with its adapters off) and written, under the lock
        (module docstring). Computing is refused when the policy trains in place and it has been ``updated`` (a
        resumed run) or :meth:`check_start` found other weights than the starting ones (``evaluate.py`` on a
        finished run): those are not the reference."""
        path = self.cache_path(split, settings, examples, run_precision(policy))
        table = read_table(path, shape, warn=True)
        collective = torch.distributed.is_available() and torch.distributed.is_initialized()
        missing = missing_on_any_rank(table is None) if collective else table is None
        if missing:
            if self.trains_base_in_place and (updated or self.weights_changed):
                raise ConfigError(
                    f"task.reference=precomputed: {path} is missing or unreadable and the model no longer holds "
                    "the weights training started from (a resumed run, or evaluate.py on a run that trained them "
                    "in place), so the reference cannot be computed; restore the cache file the run wrote before "
                    "its first update, or train again from the start"
                )
            computed = compute() if collective else None  # ranks compute together: a sharded forward is collective
            with exclusive(path):
                table = read_table(path, shape, warn=False)  # another writer may have finished meanwhile
                if table is None:
                    table = compute() if computed is None else computed
                    write_table(path, table)
                    log.info("Reference outputs of %d %s examples cached in %s", len(table), split, path)
        self.tables[split] = table
        return table


def missing_on_any_rank(missing: bool) -> bool:
    """Whether any rank of the process group lacks the table: the ranks of one run then all compute it."""
    everyone: list[bool | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, missing)
    return any(everyone)


def table_digest(table: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(table)).hexdigest()


def write_table(path: Path, table: torch.Tensor) -> None:
    """``{"table", "sha256"}`` into a unique temporary beside ``path``, fsync'd and renamed onto it."""
    payload = {"table": table, "sha256": table_digest(table)}
    replace_file(path, lambda temporary: torch.save(payload, temporary))


def read_table(path: Path, shape: tuple[int, ...], *, warn: bool) -> torch.Tensor | None:
    """The table cached at ``path``, read as data only; ``None`` when the file is missing, or does not load,
    holds no table of ``shape`` or fails its checksum (then, if ``warn``, one warning line names the file)."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        table = payload.get("table") if isinstance(payload, dict) else None
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != tuple(shape):
            raise ValueError(f"it holds no table of shape {list(shape)}")
        if table_digest(table) != payload.get("sha256"):
            raise ValueError("its table fails its SHA-256 checksum")
    except UNREADABLE as error:
        if warn:
            reason = (str(error).splitlines() or [type(error).__name__])[0].split(". ")[0]  # torch's run long
            log.warning("Reference cache %s is unreadable (%s); computing it again", path, reason)
        return None
    return table
