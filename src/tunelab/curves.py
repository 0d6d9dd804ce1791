"""Plot logged metrics against the logged step, from one or more runs' ``metrics.csv`` (the CSV logger's file).

    python -m tunelab.curves outputs/<run> --metrics val/rewards/accuracy train/loss --out curves.png

The logged step is the optimizer step, except for task=ppo where it is the rollout iteration (each of which
takes ``ppo_epochs x minibatches`` optimizer steps). One panel per metric, one line per run (labelled by
``--labels`` or the folder name); rows where a metric is empty (logged at other steps) are skipped. Writes a PNG
and prints the first / last value of each line.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def series(run_dir: Path, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``metric`` in ``run_dir/metrics.csv``; SystemExit naming the file if it is absent."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        raise SystemExit(f"{path}: no metrics.csv (run with the csv logger, the default)")
    steps, values = [], []
    with path.open() as handle:
        for row in csv.DictReader(handle):
            if row.get(metric):
                steps.append(int(row["step"]))
                values.append(float(row[metric]))
    return steps, values


def plot(run_dirs: list[Path], labels: list[str], metrics: list[str], out: Path) -> list[str]:
    """Write the figure to ``out``; return one summary line per (metric, run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), squeeze=False)
    summary = []
    for axis, metric in zip(axes[0], metrics, strict=True):
        for run_dir, label in zip(run_dirs, labels, strict=True):
            steps, values = series(run_dir, metric)
            if not values:
                summary.append(f"{metric} [{label}]: not logged")
                continue
            axis.plot(steps, values, marker="o" if len(values) < 30 else None, markersize=3, label=label)
            summary.append(
                f"{metric} [{label}]: {values[0]:.4g} (step {steps[0]}) -> {values[-1]:.4g} (step {steps[-1]})"
            )
        axis.set_title(metric)
        axis.set_xlabel("logged step")
        axis.grid(alpha=0.3)
        if len(run_dirs) > 1:
            axis.legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--metrics", nargs="+", required=True)
    parser.add_argument("--labels", nargs="+", help="one per run (default: folder names)")
    parser.add_argument("--out", type=Path, required=True, help="PNG file")
    args = parser.parse_args()
    labels = args.labels or [run_dir.name for run_dir in args.run_dirs]
    if len(labels) != len(args.run_dirs):
        raise SystemExit(f"--labels names {len(labels)} runs, but {len(args.run_dirs)} were given")
    print("\n".join(plot(args.run_dirs, labels, args.metrics, args.out)))


if __name__ == "__main__":
    main()
