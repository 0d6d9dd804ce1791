"""``run(cfg)``: the training pipeline behind ``python train.py``.

check config -> seed -> write run info -> load model -> apply method -> data -> task module ->
trainer -> (validate untrained) -> fit (or resume) -> test best checkpoint -> export adapter / merged model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tunelab.build import build_components, build_trainer, instantiate_callbacks, instantiate_loggers
from tunelab.config_checks import check_config
from tunelab.forgetting import Forgetting
from tunelab.runs import checkpoint_state, model_from_export
from tunelab.trainer_config import shards_parameters


def run(cfg: DictConfig) -> float | None:
    """Train and evaluate as configured; return the monitored metric's best value (for sweepers)."""
    metrics, _ = train(cfg)
    from omegaconf import OmegaConf

    monitor = OmegaConf.select(cfg, "callbacks.model_checkpoint.monitor", default="val/loss")
    value = metrics.get(f"best/{monitor}")
    return float(value) if value is not None else None


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the pipeline; return (metrics, objects) as the lightning-hydra-template does."""
    check_config(cfg)
    forgetting = Forgetting(cfg)
    import lightning.pytorch as pl

    from tunelab.export import export_adapter, export_merged
    from tunelab.run_info import write_json, write_run_info
    from tunelab.strategies import gathered_for_export, strategy_loads_checkpoints

    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    objects = build_components(cfg)
    callbacks, loggers = instantiate_callbacks(cfg), instantiate_loggers(cfg)
    trainer = build_trainer(cfg, objects["model"], callbacks, loggers)
    objects["trainer"] = trainer
    if trainer.is_global_zero:
        write_run_info(cfg, output_dir)
    module, datamodule = objects["module"], objects["datamodule"]

    metrics: dict[str, Any] = {
        "trainable_params": objects["parameters"].trainable,
        "total_params": objects["parameters"].total,
    }
    if cfg.train and cfg.validate_before_training and cfg.ckpt_path is None:
        before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        metrics.update({f"untrained/{k}": v for k, v in before.items()})
        forgetting.before(objects["model"], objects["tokenizer"])
    if cfg.train:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        metrics.update({k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
    checkpoint = best_checkpoint(trainer)
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    if best_path:
        metrics[f"best/{checkpoint.monitor}"] = checkpoint.best_model_score
        metrics["best_checkpoint"] = best_path
    if cfg.test:
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)[0]
        metrics.update(results)
    elif best_path and strategy_loads_checkpoints(trainer):  # sharded weights: the strategy reads its own format
        trainer.validate(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)
    elif best_path:
        module.load_state_dict(checkpoint_state(best_path), strict=module.strict_loading)
    metrics.update(forgetting.after(objects["model"], objects["tokenizer"]))
    if cfg.export.adapter:
        with gathered_for_export(trainer, objects["model"]) as gathered:  # every rank: sharded saves gather
            if trainer.is_global_zero:
                adapter_dir = export_adapter(objects["model"], objects["tokenizer"], output_dir / "adapter", gathered)
                metrics["adapter_dir"] = str(adapter_dir)
    if trainer.is_global_zero:
        if cfg.export.merged:
            # a sharded model holds slices on this rank: merge the complete adapter just saved instead
            sharded = shards_parameters(cfg.trainer)
            source = (
                model_from_export(cfg, adapter_dir, cfg.paths.cache_dir, trust_remote_code=cfg.model.trust_remote_code)[
                    0
                ]
                if sharded
                else objects["model"]
            )
            metrics["merged_dir"] = str(export_merged(source, objects["tokenizer"], output_dir / "merged"))
        metrics["data"] = datamodule.report
        metrics.update(perf_summary(callbacks, module))
        metrics.update(module.summary() if hasattr(module, "summary") else {})
        write_json(output_dir / "metrics.json", metrics)
    _finish_loggers(loggers)
    return metrics, objects


def best_checkpoint(trainer: Any) -> Any | None:
    """The run's ranked checkpoint callback (``callbacks.model_checkpoint``: ``best.ckpt``), if it has one."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ranked = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor is not None]
    return ranked[0] if ranked else None


def perf_summary(callbacks: list[Any], module: Any) -> dict[str, float]:
    """Step time and peak memory from the :class:`StepTimer` callback, when it is configured."""
    from tunelab.callbacks.perf import StepTimer

    timers = [c for c in callbacks if isinstance(c, StepTimer)]
    return timers[0].summary(module.device) if timers else {}


def _finish_loggers(loggers: list[Any]) -> None:
    """Close W&B runs so the next multirun job starts its own run."""
    for logger in loggers:
        experiment_finish = getattr(getattr(logger, "experiment", None), "finish", None)
        if type(logger).__name__ == "WandbLogger" and callable(experiment_finish):
            experiment_finish()
