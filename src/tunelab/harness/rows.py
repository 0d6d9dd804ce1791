"""The rows tunelab's shipped harness tasks score, and the loader their task files name (``custom_dataset``).

tunelab writes each task's rows to ``<data dir>/<task>.jsonl`` before the harness runs; lm-eval calls
:func:`dataset` with the task's ``dataset_kwargs`` and the task manager's metadata, whose ``tunelab_data_dir``
names that folder. The same files run under lm-eval's own command line::

    lm_eval --include_path src/tunelab/harness/tasks --tasks tunelab_mcq \\
        --metadata '{"tunelab_data_dir": "outputs/<run>/eval_test/harness_data"}' ...
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunelab.data.records import ChatExample
from tunelab.errors import ConfigError, DataError


def turn_end(tokenizer: Any) -> str:
    """The text the tokenizer's chat template writes after an assistant answer (SmolLM2: ``"<|im_end|>\\n"``): a
    trained answer's last tokens, which the SFT task's option scores include."""
    probe = [{"role": "user", "content": "Q"}]
    prompt = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*probe, {"role": "assistant", "content": "A"}], tokenize=False)
    if not full.startswith(prompt + "A"):
        raise ConfigError(
            "the chat template renders the prompt differently with and without an answer, so an option's "
            "continuation is not defined; set harness.apply_chat_template=false"
        )
    return full[len(prompt) + 1 :]


def choice_rows(examples: Sequence[ChatExample], end_of_turn: str) -> list[dict[str, Any]]:
    """``tunelab_mcq`` rows of multiple-choice examples: ``prompt`` (the user turn), ``choices`` (each option's
    response followed by ``end_of_turn``: the continuations scored), ``answers`` (the responses alone: few-shot
    answers), ``target`` (index of the right option) and ``source`` (file:line)."""
    rows = []
    for example in examples:
        if example.choices is None:
            raise DataError("a record without options; tunelab_mcq needs multiple-choice records", file=example.source)
        if len(example.prompt) != 1:
            raise DataError("tunelab_mcq needs a prompt of one user turn", file=example.source)
        options = example.choices.options
        rows.append(
            {
                "source": example.source,
                "prompt": example.prompt[0]["content"],
                "choices": [option.response + end_of_turn for option in options],
                "answers": [option.response for option in options],
                "target": example.choices.answer_index,
            }
        )
    return rows


def text_rows(path: Path) -> list[dict[str, Any]]:
    """``tunelab_verne`` rows: the JSON lines of ``path``, each with a ``text`` (e.g. :func:`tunelab.assets.verne.
    ensure_verne`'s passages)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    missing = [row for row in rows if not isinstance(row.get("text"), str)]
    if missing or not rows:
        raise DataError("expected JSON lines with a 'text' string each", file=str(path))
    return rows


def dataset(data_key: str, tunelab_data_dir: str | None = None, **_task_metadata: Any) -> Any:
    """The ``test`` split (a ``datasets.DatasetDict``) of ``<tunelab_data_dir>/<data_key>.jsonl``.

    lm-eval passes the task's metadata (its version, config source and the task manager's metadata) as
    further keyword arguments; only ``tunelab_data_dir`` is read."""
    from datasets import Dataset, DatasetDict

    if tunelab_data_dir is None:
        raise ConfigError(f"{data_key}: give the task manager metadata tunelab_data_dir=<folder of {data_key}.jsonl>")
    path = Path(tunelab_data_dir) / f"{data_key}.jsonl"
    if not path.exists():
        raise ConfigError(f"{path} not found: tunelab writes it before the harness runs")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return DatasetDict({"test": Dataset.from_list(rows)})
