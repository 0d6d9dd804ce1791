"""Training cost of every method on the embedded default: median step time and peak memory.

Each method runs ``python train.py method=<name>`` in its own process (so peak memory is its own) for
``--steps`` optimizer steps with validation, test and export off; the StepTimer callback measures the median
step time after two warm-up steps and the peak memory since ``fit`` started. Prints a Markdown table and
writes it with the raw figures to ``--out``. Run it on an otherwise idle machine:

    python benchmarks/method_costs.py --steps 8 --out experiments/method_comparison/costs.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = [
    "full",
    "lora",
    "qlora",
    "adapter",
    "prefix",
    "prompt",
    "ptuning",
    "ptuning_v2",
    "bitfit",
    "ia3",
    "mam",
    "unipelt",
]


def measure(method: str, steps: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"cost-{method}-") as run_dir:
        command = [
            sys.executable,
            str(ROOT / "train.py"),
            f"method={method}",
            f"trainer.max_steps={steps}",
            "validate_before_training=false",
            "test=false",
            "export.adapter=false",
            "~callbacks.model_checkpoint",
            "~callbacks.last_checkpoint",
            "~callbacks.early_stopping",
            f"hydra.run.dir={run_dir}",
            *extra,
        ]
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    return {
        "method": method,
        "trainable_params": metrics["trainable_params"],
        "step_time_s": metrics["perf/step_time_s"],
        "peak_mem_mib": metrics["perf/peak_mem_mib"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides, e.g. trainer.precision=bf16-mixed")
    args = parser.parse_args()
    rows = []
    print("| method | trainable params | step time (s) | peak memory (MiB) |\n|---|---|---|---|", flush=True)
    for method in args.methods:
        row = measure(method, args.steps, args.overrides)
        rows.append(row)
        print(
            f"| {method} | {row['trainable_params']:,} | {row['step_time_s']:.2f} | {row['peak_mem_mib']:.0f} |",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps({"steps": args.steps, "overrides": args.overrides, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
