"""The composition root: the objects of a run, built from its config (model, method, data, objective, trainer).

``build_components(cfg)`` loads the model with the head the objective needs, adapts it with the method, and
asks the objective for its data and task module; ``build_trainer`` makes the Lightning Trainer. Axes are
reached through their registries (:data:`tunelab.methods.METHODS`, :data:`tunelab.tasks.OBJECTIVES`).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from omegaconf import DictConfig

from tunelab.methods import METHODS, apply_method, parameter_report, train_new_head
from tunelab.models.loading import load_model
from tunelab.runs import init_from_export, load_export
from tunelab.tasks import OBJECTIVES
from tunelab.tasks.objective import BuildContext
from tunelab.trainer_config import resolve_precision, uses_gpu

log = logging.getLogger("tunelab")


def instantiate_callbacks(cfg: DictConfig) -> list[Any]:
    """``cfg.callbacks``, then the ones the method adds (:attr:`tunelab.methods.spec.Method.callbacks`)."""
    from hydra.utils import instantiate

    configured = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    return configured + METHODS[cfg.method.name].callbacks(cfg.method)


def instantiate_loggers(cfg: DictConfig) -> list[Any]:
    from hydra.utils import instantiate

    return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]


def build_trainer(cfg: DictConfig, model: Any, callbacks: list[Any], loggers: list[Any]) -> Any:
    """The Lightning Trainer from ``cfg.trainer``; strategy factories get the loaded model and the accelerator."""
    from hydra.utils import instantiate

    precision = resolve_precision(cfg)
    strategy = cfg.trainer.strategy
    if isinstance(strategy, DictConfig):
        strategy = instantiate(strategy)(model=model, accelerator=cfg.trainer.accelerator)
    overrides: dict[str, Any] = {}
    from tunelab.strategies import is_sharding_engine

    if not is_sharding_engine(strategy):
        from tunelab.checkpoints import AtomicCheckpointIO

        plugins: list[Any] = [AtomicCheckpointIO()]
        if precision == "bf16-mixed":
            from tunelab.compat.lightning import BF16MixedPrecision

            plugins.append(BF16MixedPrecision("cuda" if uses_gpu(cfg.trainer) else "cpu"))
            overrides["precision"] = None
        overrides["plugins"] = plugins
    return instantiate(cfg.trainer, strategy=strategy, callbacks=callbacks, logger=loggers or False, **overrides)


def build_components(cfg: DictConfig) -> dict[str, Any]:
    """Model (adapted by the method), tokenizer, data module and task module for ``cfg``."""
    from tunelab.models.segment_attention import SEGMENT_SDPA, use_segment_attention

    method, objective = METHODS[cfg.method.name], OBJECTIVES[cfg.task.name]
    head, labels = objective.head(cfg)
    quantization = method.quantization(cfg.method)
    loaded = load_model(cfg.model, cfg.paths.cache_dir, quantization_config=quantization, head=head, labels=labels)
    model = apply_method(loaded.model, cfg.method, loaded.tokenizer)
    if cfg.data.get("packing") and use_segment_attention(model):
        log.info("data.packing: attention runs per packed example (%s)", SEGMENT_SDPA)
    if labels:
        train_new_head(model)
    if cfg.get("init_adapter"):
        init_from_export(model, cfg.init_adapter, cfg)
        log.info("init_adapter: the adapter starts from %s", cfg.init_adapter)
    report = parameter_report(model)
    log.info("method=%s: %s", cfg.method.name, report)
    print(f"[tunelab] method={cfg.method.name} model={cfg.model.name}: {report}", flush=True)
    load_run = partial(load_export, cache_dir=cfg.paths.cache_dir, trust_remote_code=cfg.model.trust_remote_code)
    datamodule, module = objective.build(BuildContext(cfg, model, loaded.tokenizer, method, load_run))
    method.init_from_data(model, cfg.method, datamodule)
    module.lr_scale = partial(method.lr_scale, cfg.method)
    return {
        "model": model,
        "tokenizer": loaded.tokenizer,
        "datamodule": datamodule,
        "module": module,
        "parameters": report,
    }
