"""``run(cfg)``: the training pipeline behind ``python train.py``.

check config -> seed -> write run info -> load model -> apply method -> data -> task module ->
trainer -> (validate untrained) -> fit (or resume) -> test best checkpoint -> export adapter / merged model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tunelab.config_checks import check_config, resolve_precision, shards_parameters, uses_gpu

log = logging.getLogger("tunelab")


def instantiate_callbacks(cfg: DictConfig) -> list[Any]:
    from hydra.utils import instantiate

    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]


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
    from tunelab.strategies import has_own_precision

    if precision == "bf16-mixed" and not has_own_precision(strategy):
        from tunelab.compat.lightning import BF16MixedPrecision

        overrides = {"precision": None, "plugins": [BF16MixedPrecision("cuda" if uses_gpu(cfg.trainer) else "cpu")]}
    return instantiate(cfg.trainer, strategy=strategy, callbacks=callbacks, logger=loggers or False, **overrides)


OBJECTIVE_HEADS = {
    "sft": "causal_lm",
    "classification": "sequence_classification",
    "reward": "sequence_classification",
    "dpo": "causal_lm",
    "ppo": "causal_lm",
}
TASKS = ("sft", "classification", "distill", "reward", "dpo", "ppo")
REWARD_LABELS = ["reward"]  # the reward model's one output: a scalar score


def task_objective(cfg: DictConfig) -> str:
    """What the student optimises: the task itself, or for task=distill its ``task.objective``."""
    from tunelab.errors import ConfigError

    if cfg.task.name not in TASKS:
        raise ConfigError(f"task={cfg.task.name!r} is not one of {list(TASKS)}")
    objective = cfg.task.objective if cfg.task.name == "distill" else cfg.task.name
    if objective not in OBJECTIVE_HEADS:
        raise ConfigError(f"task.objective={objective!r} is not one of {sorted(OBJECTIVE_HEADS)}")
    return objective


def task_head(cfg: DictConfig) -> tuple[str, list[str] | None]:
    """The model head a task needs and, for classification, the label set (from ``data.labels``)."""
    from tunelab.errors import ConfigError

    head = OBJECTIVE_HEADS[task_objective(cfg)]
    if head == "causal_lm":
        return head, None
    if cfg.task.name == "reward":
        return head, REWARD_LABELS
    if not cfg.data.get("labels"):
        raise ConfigError(f"task={cfg.task.name} needs data.labels (the label set); data={cfg.data.name} has none")
    return head, list(cfg.data.labels)


def build_task(cfg: DictConfig, model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """The data module and task module of ``cfg.task`` around the adapted ``model``."""
    from tunelab.data.datamodule import ClassificationDataModule, SFTDataModule

    trains_all_weights = cfg.method.name == "full"
    if cfg.task.name in ("reward", "dpo", "ppo"):
        return build_alignment_task(cfg, model, tokenizer, trains_all_weights)
    teacher = load_checked_teacher(cfg, model, tokenizer) if cfg.task.name == "distill" else None
    if task_objective(cfg) == "classification":
        from tunelab.tasks.classification import ClassificationModule
        from tunelab.tasks.distill import ClassificationDistillModule

        datamodule = ClassificationDataModule(cfg.data, tokenizer, cfg.paths.cache_dir)
        args = (model, cfg.task, datamodule.labels, trains_all_weights)
        return datamodule, ClassificationDistillModule(*args, teacher) if teacher else ClassificationModule(*args)
    from tunelab.tasks.distill import SFTDistillModule
    from tunelab.tasks.sft import SFTModule

    datamodule = SFTDataModule(cfg.data, tokenizer, cfg.paths.cache_dir, cfg.task.generation.num_samples)
    args = (model, tokenizer, cfg.task, trains_all_weights)
    return datamodule, SFTDistillModule(*args, teacher) if teacher else SFTModule(*args)


def build_alignment_task(cfg: DictConfig, model: Any, tokenizer: Any, trains_all_weights: bool) -> tuple[Any, Any]:
    """Data and task modules of task=reward / dpo (preference pairs) and task=ppo (prompts)."""
    import json

    from omegaconf import OmegaConf

    from tunelab.data.datamodule import PreferenceDataModule

    if cfg.task.name == "reward":
        from tunelab.tasks.reward import RewardModule

        datamodule = PreferenceDataModule(cfg.data, tokenizer, cfg.paths.cache_dir)
        return datamodule, RewardModule(model, cfg.task, trains_all_weights)
    if cfg.task.name == "dpo":
        from tunelab.tasks.dpo import DPOModule

        identity = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True)
        datamodule = PreferenceDataModule(cfg.data, tokenizer, cfg.paths.cache_dir)
        return datamodule, DPOModule(model, cfg.task, cfg.method.name, identity)
    from tunelab.data.prompts import PromptDataModule
    from tunelab.tasks.ppo import PPOModule, build_reward_fn, reference_copy

    datamodule = PromptDataModule(cfg.data, tokenizer, cfg.paths.cache_dir)
    reward_fn = build_reward_fn(cfg.task.reward, cfg.paths.cache_dir)
    reference = reference_copy(model, cfg.method.name)
    return datamodule, PPOModule(model, tokenizer, cfg.task, trains_all_weights, reward_fn, reference)


def load_checked_teacher(cfg: DictConfig, student: Any, tokenizer: Any) -> Any:
    """The frozen teacher of task=distill, after checking it speaks the student's vocabulary and outputs."""
    from tunelab.tasks.distill import Teacher, check_same_outputs, check_same_vocabulary, load_teacher

    teacher, teacher_tokenizer = load_teacher(cfg.task, cfg.paths.cache_dir)
    check_same_vocabulary(teacher_tokenizer, tokenizer)
    check_same_outputs(teacher, student, task_objective(cfg))
    return Teacher(teacher)


def build_components(cfg: DictConfig) -> dict[str, Any]:
    """Model (adapted by the method), tokenizer, data module and task module for ``cfg``."""
    from tunelab.methods import apply_method, parameter_report, quantization_config, train_new_head
    from tunelab.models.loading import load_model
    from tunelab.models.segment_attention import SEGMENT_SDPA, use_segment_attention

    head, labels = task_head(cfg)
    loaded = load_model(
        cfg.model, cfg.paths.cache_dir, quantization_config=quantization_config(cfg.method), head=head, labels=labels
    )
    model = apply_method(loaded.model, cfg.method, loaded.tokenizer)
    if cfg.data.get("packing") and use_segment_attention(model):
        log.info("data.packing: attention runs per packed example (%s)", SEGMENT_SDPA)
    if labels:
        train_new_head(model)
    report = parameter_report(model)
    log.info("method=%s: %s", cfg.method.name, report)
    print(f"[tunelab] method={cfg.method.name} model={cfg.model.name}: {report}", flush=True)
    datamodule, module = build_task(cfg, model, loaded.tokenizer)
    return {
        "model": model,
        "tokenizer": loaded.tokenizer,
        "datamodule": datamodule,
        "module": module,
        "parameters": report,
    }


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
    import lightning.pytorch as pl

    from tunelab.evaluate import load_adapter
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
    if cfg.train:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        metrics.update({k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
    checkpoint = trainer.checkpoint_callback
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
    if cfg.export.adapter:
        with gathered_for_export(trainer, objects["model"]) as gathered:  # every rank: sharded saves gather
            if trainer.is_global_zero:
                adapter_dir = export_adapter(objects["model"], objects["tokenizer"], output_dir / "adapter", gathered)
                metrics["adapter_dir"] = str(adapter_dir)
    if trainer.is_global_zero:
        if cfg.export.merged:
            # a sharded model holds slices on this rank: merge the complete adapter just saved instead
            sharded = shards_parameters(cfg.trainer)
            source = load_adapter(cfg, adapter_dir, cfg.paths.cache_dir)[0] if sharded else objects["model"]
            metrics["merged_dir"] = str(export_merged(source, objects["tokenizer"], output_dir / "merged"))
        metrics["data"] = datamodule.report
        metrics.update(perf_summary(callbacks, module))
        metrics.update(module.summary() if hasattr(module, "summary") else {})
        write_json(output_dir / "metrics.json", metrics)
    _finish_loggers(loggers)
    return metrics, objects


def perf_summary(callbacks: list[Any], module: Any) -> dict[str, float]:
    """Step time and peak memory from the :class:`StepTimer` callback, when it is configured."""
    from tunelab.callbacks.perf import StepTimer

    timers = [c for c in callbacks if isinstance(c, StepTimer)]
    return timers[0].summary(module.device) if timers else {}


def checkpoint_state(path: str) -> dict[str, Any]:
    """The module state dict stored in a Lightning checkpoint."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def _finish_loggers(loggers: list[Any]) -> None:
    """Close W&B runs so the next multirun job starts its own run."""
    for logger in loggers:
        experiment_finish = getattr(getattr(logger, "experiment", None), "finish", None)
        if type(logger).__name__ == "WandbLogger" and callable(experiment_finish):
            experiment_finish()
