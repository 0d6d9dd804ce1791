"""``evaluate(cfg)``: score a trained checkpoint or adapter on the test (or val) split and write a report.

The run folder (``<run>/checkpoints/x.ckpt`` or ``<run>/adapter``) holds the run's resolved ``config.yaml``,
so the same model, method, data split and template are rebuilt; only evaluation knobs are overridden. The folder
is data, not code: a checkpoint that would run code when unpickled is refused before any model loads, and the
model's own code (``model.trust_remote_code``) runs only when this command line says ``model.trust_remote_code=true``,
whatever the run's config says.
Writes ``report.json`` (metrics + samples) and ``report.md`` (a metrics table and sample generations).

``harness.tasks=[...]`` also scores the model with lm-evaluation-harness (:mod:`tunelab.harness`): the adapter as
loaded or the adapter merged into the base (``harness.model``), on tunelab's shipped tasks (offline, rows written
to ``<report_dir>/harness_data/``) or, with the Hugging Face Hub, any lm-eval task. Its ``harness/<task>/<metric>``
numbers join the report's metrics and are merged into the run's ``metrics.json``, keeping every other key there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.assets.verne import ensure_verne
from tunelab.atomic import exclusive, write_text
from tunelab.build import build_components
from tunelab.data.loading import load_examples
from tunelab.data.records import ChatExample
from tunelab.errors import ConfigError
from tunelab.export import merged_copy
from tunelab.harness import HarnessResult, run_harness, task_manager, write_task_rows
from tunelab.harness.rows import choice_rows, text_rows, turn_end
from tunelab.methods import is_peft_model
from tunelab.registry import load_plugins
from tunelab.runs import checkpoint_state, locate_run, model_from_export
from tunelab.tasks import OBJECTIVES

HARNESS_MODELS = ("adapter", "merged")


def markdown_report(
    run_dir: Path,
    split: str,
    metrics: dict[str, float],
    samples: list[dict[str, str]],
    harness: dict[str, Any] | None = None,
) -> str:
    lines = [f"# Evaluation of {run_dir} on the {split} split", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items())]
    if harness:
        lines += ["", "## lm-evaluation-harness", "", "| task | version | documents |", "|---|---|---|"]
        lines += [
            f"| {task} | {harness['versions'].get(task, '')} | {count['effective']} of {count['original']} |"
            for task, count in harness["n_samples"].items()
        ]
        lines += ["", "Settings: " + ", ".join(f"{key}={value}" for key, value in harness["settings"].items())]
    if samples:
        lines += ["", "## Sample generations", ""]
    for i, sample in enumerate(samples, 1):
        lines += [
            f"### {i}. {sample['question']}",
            "",
            f"**model:** {sample['prediction']}",
            "",
            f"**reference:** {sample['reference']}",
            "",
        ]
    return "\n".join(lines)


def check_harness(cfg: DictConfig, run_cfg: DictConfig, report_dir: Path) -> Any | None:
    """lm-eval's task manager for ``harness.tasks`` (None when empty), or a :class:`ConfigError` before any model
    loads: an unknown task name or ``harness.model``, ``harness.only`` without tasks, a run whose model is not a
    causal LM (a classifier, a reward model)."""
    tasks = list(cfg.harness.tasks)
    if not tasks:
        if cfg.harness.only:
            raise ConfigError("harness.only=true scores only harness.tasks, which is empty: name tasks=[...]")
        return None
    if cfg.harness.model not in HARNESS_MODELS:
        raise ConfigError(f"harness.model={cfg.harness.model!r} is not one of {list(HARNESS_MODELS)}")
    head, _ = OBJECTIVES[run_cfg.task.name].head(run_cfg)
    if head != "causal_lm":
        raise ConfigError(f"harness.tasks needs a causal language model; task={run_cfg.task.name} trains a {head} head")
    return task_manager(tasks, report_dir / "harness_data")


def harness_model(model: torch.nn.Module, which: str, method: str) -> torch.nn.Module:
    """The model the harness scores: ``model`` itself (``adapter``), or a copy with its peft adapter folded into
    the base (``merged``; a :class:`ConfigError` for a method without one that folds)."""
    if which == "adapter":
        return model
    if not is_peft_model(model) or model.active_peft_config.is_prompt_learning:
        raise ConfigError(
            f"harness.model=merged folds a peft adapter (lora, qlora, ia3) into the base; method={method} has none "
            "that folds: use harness.model=adapter"
        )
    return merged_copy(model)


def run_choice_examples(cfg: DictConfig, run_cfg: DictConfig, datamodule: Any) -> list[ChatExample]:
    """``tunelab_mcq``'s records: ``harness.data.tunelab_mcq`` (MedQA format), else the multiple-choice records of
    the run's ``split`` (as the run's data config splits them) that the run keeps: the questions ``mcq_acc_ll``
    scores, without those whose prompt fills ``data.max_length``. (An option that ``data.max_length`` cuts short is
    scored cut by tunelab and whole by the harness.)"""
    path = cfg.harness.data.tunelab_mcq
    if path:
        return load_examples(path, "medqa").examples
    examples = datamodule.raw_splits(lambda file: datamodule.read(file).examples)[cfg.split]
    questions = [example for example in examples if example.choices is not None]
    kept = {encoded.source for encoded in datamodule.encode(questions)[0]}
    questions = [example for example in questions if example.source in kept]
    if not questions:
        raise ConfigError(
            f"tunelab_mcq: the {cfg.split} split of the run's data (data={run_cfg.data.name}) has no multiple-choice "
            "records; give harness.data.tunelab_mcq=<MedQA-shaped .jsonl>"
        )
    return questions


def harness_on_run(
    cfg: DictConfig, run_cfg: DictConfig, components: dict[str, Any], manager: Any, report_dir: Path, device: Any
) -> HarnessResult:
    """Write the shipped tasks' rows, then score the run's model (on ``device``) on ``harness.tasks``."""
    harness = cfg.harness
    tasks, tokenizer = list(harness.tasks), components["tokenizer"]
    model = harness_model(components["module"].model, harness.model, run_cfg.method.name).to(device)
    text = harness.data.tunelab_verne
    write_task_rows(
        tasks,
        report_dir / "harness_data",
        {
            "tunelab_mcq": lambda: choice_rows(
                run_choice_examples(cfg, run_cfg, components["datamodule"]),
                turn_end(tokenizer) if harness.apply_chat_template else "",
            ),
            "tunelab_verne": lambda: text_rows(Path(text) if text else ensure_verne(cfg.paths.cache_dir)),
        },
    )
    return run_harness(
        model,
        tokenizer,
        tasks,
        manager,
        limit=harness.limit,
        num_fewshot=harness.num_fewshot,
        batch_size=harness.batch_size,
        apply_chat_template=harness.apply_chat_template,
        bootstrap_iters=harness.bootstrap_iters,
        seed=run_cfg.seed,
    )


def merge_run_metrics(path: Path, new: dict[str, float]) -> None:
    """Add ``new`` to the run's ``metrics.json`` (created if missing), keeping every other key: read and rewritten
    (atomically) under the file's lock, so two evaluations at once both land."""
    with exclusive(path):
        current = json.loads(path.read_text()) if path.exists() else {}
        write_text(path, json.dumps({**current, **new}, indent=2, default=str))


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild the run, score the chosen split (and ``harness.tasks``), write report.json / report.md; return the
    metrics."""
    import lightning.pytorch as pl

    run_dir, run_cfg = locate_run(cfg.ckpt_path, cfg.adapter_path)
    load_plugins(run_cfg.get("plugins") or ())
    split = cfg.split
    if split not in ("test", "val"):
        raise ConfigError(f"split={split!r} is not one of ['test', 'val']")
    report_dir = Path(cfg.report_dir) if cfg.report_dir else run_dir / f"eval_{split}"
    manager = check_harness(cfg, run_cfg, report_dir)
    if "generation" in run_cfg.task:
        run_cfg.task.generation.update(cfg.generation)  # sample count / length; the run's label set stays
    run_cfg.paths.cache_dir = cfg.paths.cache_dir
    run_cfg.model.trust_remote_code = cfg.model.trust_remote_code
    state = checkpoint_state(cfg.ckpt_path) if cfg.ckpt_path else None
    pl.seed_everything(run_cfg.seed)
    components = build_components(run_cfg)
    module, datamodule = components["module"], components["datamodule"]
    if cfg.adapter_path:
        module.model, _ = model_from_export(
            run_cfg, Path(cfg.adapter_path), cfg.paths.cache_dir, trust_remote_code=cfg.model.trust_remote_code
        )
    else:
        module.load_state_dict(state, strict=module.strict_loading)
    if split == "val":
        datamodule.test_dataloader = datamodule.val_dataloader
    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        logger=False,
        precision=cfg.trainer.precision or run_cfg.trainer.precision,
        use_distributed_sampler=False,
    )
    metrics: dict[str, Any] = {}
    all_samples: list[dict[str, str]] = []
    summary: dict[str, Any] = {}
    if not cfg.harness.only:
        results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        metrics = {k.replace("test/", f"{split}/"): float(v) for k, v in results.items()}
        all_samples = getattr(module, "test_samples", [])
        summary = {
            k.replace("test/", f"{split}/"): v
            for k, v in (module.summary() if hasattr(module, "summary") else {}).items()
        }
    if manager is not None:
        harness = harness_on_run(cfg, run_cfg, components, manager, report_dir, trainer.strategy.root_device)
        metrics.update(harness.metrics)
        summary["harness"] = harness.summary
        merge_run_metrics(run_dir / "metrics.json", harness.metrics)
    samples = all_samples[: cfg.report_samples]
    report_dir.mkdir(parents=True, exist_ok=True)
    source = str(cfg.ckpt_path or cfg.adapter_path)
    write_text(
        report_dir / "report.json",
        json.dumps({"source": source, "split": split, "metrics": metrics, "samples": all_samples, **summary}, indent=2),
    )
    write_text(report_dir / "report.md", markdown_report(run_dir, split, metrics, samples, summary.get("harness")))
    print(f"[tunelab] report written to {report_dir}/report.md", flush=True)
    return metrics
