"""Aggregate a multirun folder into one table: one row per job (its ``metrics.json``), chosen columns, and
optionally a plot of metrics against a swept setting.

    python -m tunelab.results multirun/method_comparison/<time> --out experiments/method_comparison/table
    python -m tunelab.results multirun/lora_rank/<time> --columns cfg:method.r trainable_params val/loss \
        --plot cfg:method.r val/loss val/rougeL --out experiments/lora_rank/table

writes ``table.csv`` and ``table.md`` (and prints the Markdown), and with ``--plot X Y...`` ``table.png``: one
panel per Y against X over the jobs, sorted by X. A job folder is any direct subfolder with a ``metrics.json``;
the row is named by the folder. A ``cfg:<key>`` column is the job's setting (dotted key of its saved
``config.yaml``). Missing values show as empty cells.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
from pathlib import Path

from tunelab.atomic import write_text

DEFAULT_COLUMNS = [
    "trainable_params",
    "untrained/val/loss",
    "val/loss",
    "val/rougeL",
    "test/rougeL",
    "perf/step_time_s",
    "perf/peak_mem_mib",
]


CONFIG_PREFIX = "cfg:"


def job_row(job_dir: Path, columns: list[str]) -> dict[str, object]:
    """The job's metrics, and for ``cfg:<key>`` columns the value of ``key`` in its ``config.yaml`` (read once)."""
    metrics = json.loads((job_dir / "metrics.json").read_text())
    settings = [column for column in columns if column.startswith(CONFIG_PREFIX)]
    row = {column: metrics.get(column) for column in columns}
    if settings:
        from omegaconf import OmegaConf

        config = OmegaConf.load(job_dir / "config.yaml")
        row.update(
            {column: OmegaConf.select(config, column[len(CONFIG_PREFIX) :], default=None) for column in settings}
        )
    return row


def natural_key(name: str) -> list[object]:
    """Sort key that orders digit runs by value: ``n5`` before ``n10``, ``r2`` before ``r16``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def collect(sweep_dir: Path, columns: list[str]) -> list[dict[str, object]]:
    """One ``{"run": folder name, column: value}`` per job folder, in natural order of folder names."""
    jobs = sorted(sweep_dir.glob("*/metrics.json"), key=lambda job: natural_key(job.parent.name))
    rows = [{"run": job.parent.name, **job_row(job.parent, columns)} for job in jobs]
    if not rows:
        raise SystemExit(f"no */metrics.json under {sweep_dir}")
    return rows


def cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown(rows: list[dict[str, object]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, object]], x: str, ys: list[str], out: Path) -> None:
    """``out``: one panel per ``y`` against ``x`` over the rows that have both, sorted by ``x``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(ys), figsize=(4.2 * len(ys), 3.3), squeeze=False)
    for axis, y in zip(axes[0], ys, strict=True):
        points = sorted((row[x], row[y]) for row in rows if row.get(x) is not None and row.get(y) is not None)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        if points and all(isinstance(p[0], int | float) and p[0] > 0 for p in points):
            axis.set_xscale("log", base=2)
        axis.set_xlabel(x.removeprefix(CONFIG_PREFIX))
        axis.set_title(y)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--columns", nargs="+", default=DEFAULT_COLUMNS, help="metrics.json keys")
    parser.add_argument("--out", type=Path, help="write <out>.csv and <out>.md (and <out>.png with --plot)")
    parser.add_argument("--plot", nargs="+", metavar="COLUMN", help="X Y [Y ...]: plot the Y columns against X")
    args = parser.parse_args()
    if args.plot and (len(args.plot) < 2 or not args.out):
        raise SystemExit("--plot needs an X and at least one Y column, and --out for the PNG")
    columns = list(dict.fromkeys([*args.columns, *(args.plot or [])]))
    rows = collect(args.sweep_dir, columns)
    table = markdown(rows)
    print(table, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        write_text(args.out.with_suffix(".csv"), out.getvalue())
        write_text(args.out.with_suffix(".md"), table)
    if args.plot:
        plot(rows, args.plot[0], args.plot[1:], args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
