"""Aggregate a multirun folder into one table: one row per job (its ``metrics.json``), chosen columns.

    python -m tunelab.results multirun/method_comparison/<time> --out experiments/method_comparison/table

writes ``table.csv`` and ``table.md`` (and prints the Markdown). A job folder is any direct subfolder with a
``metrics.json``; the row is named by the folder. Missing metrics show as empty cells.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

DEFAULT_COLUMNS = [
    "trainable_params",
    "untrained/val/loss",
    "val/loss",
    "val/rougeL",
    "test/rougeL",
    "perf/step_time_s",
    "perf/peak_mem_mib",
]


def collect(sweep_dir: Path, columns: list[str]) -> list[dict[str, object]]:
    """One ``{"run": folder name, column: value}`` per job folder, sorted by folder name."""
    rows = []
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json")):
        metrics = json.loads(metrics_file.read_text())
        rows.append({"run": metrics_file.parent.name, **{column: metrics.get(column) for column in columns}})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--columns", nargs="+", default=DEFAULT_COLUMNS, help="metrics.json keys")
    parser.add_argument("--out", type=Path, help="write <out>.csv and <out>.md")
    args = parser.parse_args()
    rows = collect(args.sweep_dir, args.columns)
    table = markdown(rows)
    print(table, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out.with_suffix(".csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        args.out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
