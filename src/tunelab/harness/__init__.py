"""lm-evaluation-harness (lm-eval) on an already-loaded tunelab model, through lm-eval's Python API.

- Tasks: the ones shipped in ``tasks/`` (:data:`SHIPPED`) run offline, on rows tunelab writes into a data folder
  first (:func:`write_task_rows`, :mod:`tunelab.harness.rows`): ``tunelab_mcq`` (MedQA-shaped multiple choice,
  scored as the SFT task's ``mcq_acc_ll``: each option continued by the chat template's end of turn) and
  ``tunelab_verne`` (rolling log-likelihood of general English prose). Any other name is one of lm-eval's own
  tasks, groups or tags (``medqa_4options``, ``mmlu``, ``gsm8k``), whose data lm-eval loads from the Hugging Face
  Hub: passed through as named.
- The model is wrapped as lm-eval's ``HFLM`` around the model and tokenizer objects (:class:`~tunelab.harness.lm.
  RunLM`), so a peft or in-house adapter is scored as loaded, on the device and in the dtype it is on.
- Results: :func:`flat_metrics` names every number ``harness/<task>/<metric>`` (``<metric>/<filter>`` for a
  filter other than lm-eval's ``none``; ``<metric>_stderr`` when ``bootstrap_iters`` > 0).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.atomic import write_text
from tunelab.errors import ConfigError

TASKS_DIR = Path(__file__).parent / "tasks"
SHIPPED = tuple(sorted(path.stem for path in TASKS_DIR.glob("*.yaml")))
PREFIX = "harness"


@dataclass(frozen=True)
class HarnessResult:
    """``metrics``: ``harness/<task>/<metric>`` -> value; ``samples``: lm-eval's logged samples per task (each
    document, its requests' arguments and responses); ``summary``: task versions, sample counts and the settings,
    JSON-ready for a report."""

    metrics: dict[str, float]
    samples: dict[str, list[dict[str, Any]]]
    summary: dict[str, Any]


def task_manager(tasks: Sequence[str], data_dir: Path) -> Any:
    """lm-eval's ``TaskManager`` for ``tasks``: tunelab's task files, with ``data_dir`` as the folder of their rows,
    and lm-eval's own task index only when a task is not shipped (scanning it takes ~10 s). A name neither
    knows is a :class:`ConfigError` (before any model loads, when called first)."""
    from lm_eval.tasks import TaskManager

    hub = [task for task in tasks if task not in SHIPPED]
    manager = TaskManager(
        include_path=str(TASKS_DIR), include_defaults=bool(hub), metadata={"tunelab_data_dir": str(data_dir)}
    )
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"harness.tasks: unknown task(s) {unknown}; shipped (offline): {list(SHIPPED)}; with the Hugging Face "
            "Hub any lm-eval task, group or tag (lm-eval --tasks list)"
        )
    return manager


def write_task_rows(
    tasks: Sequence[str], data_dir: Path, rows: Mapping[str, Callable[[], list[dict[str, Any]]]]
) -> dict[str, Path]:
    """Write ``rows[task]()`` to ``data_dir/<task>.jsonl`` (atomically) for each shipped task in ``tasks`` (the
    others are lm-eval's own); return the files. ``rows`` maps every shipped task to what builds its rows
    (:func:`~tunelab.harness.rows.choice_rows`, :func:`~tunelab.harness.rows.text_rows`), called only when asked."""
    written = {}
    for task in tasks:
        if task in SHIPPED:
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows[task]())
            written[task] = write_text(data_dir / f"{task}.jsonl", text)
    return written


def flat_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """lm-eval's ``results["results"]`` (task -> ``{"<metric>,<filter>": value}``) as ``harness/<task>/<metric>``;
    values that are not numbers (lm-eval's ``"N/A"`` stderr without bootstrap) are left out."""
    flat = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metric, filter_name = key.split(",", 1)
            name = metric if filter_name == "none" else f"{metric}/{filter_name}"
            flat[f"{PREFIX}/{task}/{name}"] = float(value)
    return flat


def run_harness(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    manager: Any,
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    apply_chat_template: bool = True,
    bootstrap_iters: int = 0,
    seed: int = 0,
) -> HarnessResult:
    """Score ``model`` on ``tasks`` with ``lm_eval.simple_evaluate`` (``manager``: :func:`task_manager`; the rows
    of shipped tasks already written).

    ``limit``: documents per task (a fraction below 1); ``num_fewshot``: examples shown before each (None: each
    task's default); ``apply_chat_template``: each prompt rendered as a user turn with the tokenizer's chat template
    (as SFT trains), or as plain text; ``seed`` seeds lm-eval's python, numpy, torch and few-shot generators. The
    model is put in eval mode. An lm-eval task whose Hub data cannot be reached (offline) is a :class:`ConfigError`."""
    from lm_eval import simple_evaluate

    from tunelab.harness.lm import RunLM

    lm = RunLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        output = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            task_manager=manager,
            apply_chat_template=apply_chat_template,
            log_samples=True,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except ConnectionError as error:  # datasets' own, raised for a Hub data set it cannot reach
        raise ConfigError(
            f"harness.tasks: {error}; lm-eval's own tasks read their data from the Hugging Face Hub, the shipped "
            f"ones {list(SHIPPED)} run offline"
        ) from error
    summary = {
        "tasks": list(tasks),
        "versions": output["versions"],
        "n_samples": output["n-samples"],
        "settings": {
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "apply_chat_template": apply_chat_template,
            "bootstrap_iters": bootstrap_iters,
            "seed": seed,
        },
    }
    return HarnessResult(flat_metrics(output["results"]), output["samples"], summary)
