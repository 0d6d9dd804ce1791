"""``evaluate(cfg)``: score a trained checkpoint or adapter on the test (or val) split and write a report.

The run folder (``<run>/checkpoints/x.ckpt`` or ``<run>/adapter``) holds the run's resolved ``config.yaml``,
so the same model, method, data split and template are rebuilt; only evaluation knobs are overridden. The folder
is data, not code: a checkpoint that would run code when unpickled is refused before any model loads, and the
model's own code (``model.trust_remote_code``) runs only when this command line says ``model.trust_remote_code=true``,
whatever the run's config says.
Writes ``report.json`` (metrics + samples) and ``report.md`` (a metrics table and sample generations).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tunelab.atomic import write_text
from tunelab.build import build_components
from tunelab.errors import ConfigError
from tunelab.registry import load_plugins
from tunelab.runs import checkpoint_state, locate_run, model_from_export


def markdown_report(run_dir: Path, split: str, metrics: dict[str, float], samples: list[dict[str, str]]) -> str:
    lines = [f"# Evaluation of {run_dir} on the {split} split", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items())]
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


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild the run, score the chosen split, write report.json / report.md; return the metrics."""
    import lightning.pytorch as pl

    run_dir, run_cfg = locate_run(cfg.ckpt_path, cfg.adapter_path)
    load_plugins(run_cfg.get("plugins") or ())
    split = cfg.split
    if split not in ("test", "val"):
        raise ConfigError(f"split={split!r} is not one of ['test', 'val']")
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
    results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    metrics = {k.replace("test/", f"{split}/"): float(v) for k, v in results.items()}
    all_samples = getattr(module, "test_samples", [])
    samples = all_samples[: cfg.report_samples]
    report_dir = Path(cfg.report_dir) if cfg.report_dir else run_dir / f"eval_{split}"
    report_dir.mkdir(parents=True, exist_ok=True)
    source = str(cfg.ckpt_path or cfg.adapter_path)
    summary = {
        k.replace("test/", f"{split}/"): v for k, v in (module.summary() if hasattr(module, "summary") else {}).items()
    }
    write_text(
        report_dir / "report.json",
        json.dumps({"source": source, "split": split, "metrics": metrics, "samples": all_samples, **summary}, indent=2),
    )
    write_text(report_dir / "report.md", markdown_report(run_dir, split, metrics, samples))
    print(f"[tunelab] report written to {report_dir}/report.md", flush=True)
    return metrics
