"""Inference speed of two trained classifiers on the same texts (e.g. a distillation teacher and its student).

Loads each run's export (``<run>/adapter``, rebuilt with that run's config), tokenizes the run's test split
once, and times forward passes over it in batches, alternating teacher and student for ``--repeats`` rounds
(the median round counts). Prints parameters, texts/s and the speed ratio:

    python benchmarks/inference_speed.py --teacher outputs/<teacher>/adapter --student outputs/<student>/adapter
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tunelab.data.datamodule import ClassificationDataModule
from tunelab.methods import parameter_report
from tunelab.runs import load_export


def load(adapter_dir: str, cache_dir: str) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """The run's model (eval mode) and its test split as batches."""
    model, tokenizer, run_cfg = load_export(adapter_dir, cache_dir)
    datamodule = ClassificationDataModule(run_cfg.data, tokenizer, cache_dir)
    datamodule.setup()
    return model.eval(), list(datamodule.test_dataloader()[0])


@torch.no_grad()
def seconds(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    started = time.perf_counter()
    for batch in batches:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="teacher run's adapter/ folder")
    parser.add_argument("--student", required=True, help="student run's adapter/ folder")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache-dir", default=".cache")
    args = parser.parse_args()
    runs = {name: load(path, args.cache_dir) for name, path in (("teacher", args.teacher), ("student", args.student))}
    texts = sum(len(batch["labels"]) for batch in runs["student"][1])
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (model, batches) in runs.items():
            timings[name].append(seconds(model, batches))
    print("| model | parameters | texts/s (median of rounds) |\n|---|---|---|")
    speed = {}
    for name, (model, _) in runs.items():
        speed[name] = texts / statistics.median(timings[name])
        print(f"| {name} | {parameter_report(model).total:,} | {speed[name]:.1f} |")
    print(
        f"student / teacher speed: {speed['student'] / speed['teacher']:.2f}x on {texts} texts, "
        f"{torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
