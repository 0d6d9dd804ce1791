"""Start-up cost: time from ``python train.py`` to the end of the first training step, against the bare import
time of the stack it needs (torch, lightning, transformers, peft, hydra), plus ``--help`` and a config error.

    python benchmarks/startup.py                       # default run (SmolLM2-135M + LoRA), 3 alternating rounds
    python benchmarks/startup.py --overrides model=tiny data=alpaca data.path=x.jsonl --rounds 5

Each round runs, in fresh processes and in this order: the bare import, ``train.py --help``, ``train.py`` with a
config error (16-bit precision on CPU, refused before weights load), and ``train.py`` for one optimizer step
(no validation, test or export), whose ``perf/first_batch_s`` (process start -> the first training batch starts)
and ``perf/first_step_s`` (-> it ends), written by the StepTimer callback, are read from its ``metrics.json``.
Prints the median of each and its ratio to the bare import (target for reaching the first step <= 1.3:
everything but the imports costs at most 30% more). The first step itself is one cold forward / backward /
optimizer step of the model, so its end depends on the model and the machine, not on start-up.
The model and data must already be in the cache (run ``python train.py`` once), or the first round pays for
building them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BARE_IMPORT = "import torch, lightning.pytorch, transformers, peft, hydra"
ONE_STEP = [
    "trainer.max_steps=1",
    "validate_before_training=false",
    "test=false",
    "export.adapter=false",
    "trainer.enable_progress_bar=false",
    "callbacks.perf.warmup_steps=0",
]


def wall_seconds(command: list[str]) -> float:
    """Wall time of ``command`` run from the repository root (its output is discarded)."""
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def first_step_seconds(overrides: list[str]) -> tuple[float, float]:
    """``perf/first_batch_s`` and ``perf/first_step_s`` of a one-step ``train.py`` run."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "train.py", *ONE_STEP, *overrides, f"hydra.run.dir={out}"]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        metrics_file = Path(out) / "metrics.json"
        if result.returncode != 0 or not metrics_file.exists():
            raise SystemExit(f"train.py failed:\n{result.stderr[-2000:]}")
        metrics = json.loads(metrics_file.read_text())
        return metrics["perf/first_batch_s"], metrics["perf/first_step_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--overrides", nargs="*", default=[], help="extra train.py overrides (e.g. model=tiny ...)")
    args = parser.parse_args()
    python = sys.executable
    measurements: dict[str, list[float]] = {
        "bare import": [],
        "--help": [],
        "config error": [],
        "step starts": [],
        "step ends": [],
    }
    for _ in range(args.rounds):
        measurements["bare import"].append(wall_seconds([python, "-c", BARE_IMPORT]))
        measurements["--help"].append(wall_seconds([python, "train.py", "--help"]))
        error = [python, "train.py", "trainer.accelerator=cpu", "trainer.precision=16-mixed", *args.overrides]
        measurements["config error"].append(wall_seconds(error))
        starts, ends = first_step_seconds(args.overrides)
        measurements["step starts"].append(starts)
        measurements["step ends"].append(ends)
    medians = {name: statistics.median(values) for name, values in measurements.items()}
    bare = medians["bare import"]
    print(f"{'measure':<14} {'median s':>9} {'/ bare import':>14}   (rounds: {args.rounds})")
    for name, value in medians.items():
        print(f"{name:<14} {value:>9.2f} {value / bare:>14.2f}")


if __name__ == "__main__":
    main()
