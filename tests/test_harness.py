"""lm-evaluation-harness on tunelab models, offline (``tunelab.harness``; ``evaluate.py harness.tasks=[...]``).

The shipped multiple-choice task is checked against a plain transformers forward pass written here: each option's
log-likelihood is the sum of the log-probabilities of the tokens the model is trained to emit for that option
(the chat template's rendering of the prompt + the option as the assistant turn, minus the prompt), and the
harness must pick the same option for every question. On a run trained on multiple-choice data, the harness's
``acc`` also equals the SFT task's own ``mcq_acc_ll`` on the same split.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.build import build_components
from tunelab.data.loading import load_examples
from tunelab.data.records import ChatExample
from tunelab.errors import ConfigError
from tunelab.evaluate import check_harness, evaluate, harness_model, run_choice_examples
from tunelab.harness import SHIPPED, HarnessResult, flat_metrics, run_harness, task_manager, write_task_rows
from tunelab.harness.rows import choice_rows, turn_end
from tunelab.train import train

from .conftest import tiny_overrides

LETTERS = "ABCD"


def medqa_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """MedQA-shaped records (question, options A-D, answer_idx, answer): sums with three near misses, the right
    option at a random letter."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        a, b = i % 13, (7 * i + seed) % 11
        options = [a + b, a + b + 1, a + b - 1, a + b + 3]
        rng.shuffle(options)
        letter = LETTERS[options.index(a + b)]
        rows.append(
            {
                "question": f"What is {a} plus {b}?",
                "options": dict(zip(LETTERS, map(str, options), strict=True)),
                "answer_idx": letter,
                "answer": str(a + b),
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def mcq_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("mcq") / "train.jsonl", medqa_rows(72, seed=0))


@pytest.fixture(scope="module")
def held_out_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("mcq") / "held_out.jsonl", medqa_rows(12, seed=5))


def mcq_overrides(mcq_file: Path, output_dir: Path) -> list[str]:
    """The tiny random Llama on MedQA-format data (prompts with the chat template's system turn need > 64 tokens),
    8 validation and 8 test questions."""
    tiny = [o if o != "data=alpaca" else "data=medqa" for o in tiny_overrides(mcq_file, output_dir)]
    return [*tiny, "data.max_length=160", "data.val_size=8", "data.test_size=8"]


def evaluate_overrides(run_dir: Path, report_dir: Path, *harness: str) -> list[str]:
    """``evaluate.py`` on the run's adapter with few, short generations (the split's BLEU / ROUGE / mcq_acc)."""
    generation = ["generation.num_samples=4", "generation.max_new_tokens=8"]
    return [f"adapter_path={run_dir / 'adapter'}", f"report_dir={report_dir}", *generation, *harness]


@pytest.fixture(scope="module")
def mcq_run(mcq_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A tiny LoRA run trained one epoch on MedQA-format data: (run folder, its metrics)."""
    from hydra import compose, initialize_config_dir

    from .conftest import CONFIGS

    output_dir = tmp_path_factory.mktemp("mcq_run")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*mcq_overrides(mcq_file, output_dir), "method=lora"])
    metrics, _ = train(cfg)
    return output_dir, metrics


def harness_on_examples(
    model: torch.nn.Module, tokenizer: Any, examples: list[ChatExample], data_dir: Path, **settings: Any
) -> HarnessResult:
    """The harness's ``tunelab_mcq`` on ``examples`` (multiple-choice ChatExamples), rows written to ``data_dir``;
    ``settings``: :func:`run_harness`'s keywords (limit, num_fewshot, apply_chat_template, ...)."""
    end = turn_end(tokenizer) if settings.get("apply_chat_template", True) else ""
    write_task_rows(["tunelab_mcq"], data_dir, {"tunelab_mcq": lambda: choice_rows(examples, end)})
    return run_harness(model, tokenizer, ["tunelab_mcq"], task_manager(["tunelab_mcq"], data_dir), **settings)


def plain_option_logprobs(model: torch.nn.Module, tokenizer: Any, example: ChatExample) -> list[float]:
    """Each option's summed log-probability as the assistant answer to ``example.prompt``: one forward pass of the
    chat-template encoding of prompt + answer per option, summed over the tokens after the rendered prompt."""
    prompt_ids = tokenizer.apply_chat_template(list(example.prompt), add_generation_prompt=True, return_dict=False)
    scores = []
    for option in example.choices.options:
        conversation = [*example.prompt, {"role": "assistant", "content": option.response}]
        ids = torch.tensor([tokenizer.apply_chat_template(conversation, return_dict=False)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -ids.shape[1] :]  # soft prompts add positions in front
        logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        picked = logprobs[torch.arange(len(targets)), targets][len(prompt_ids) - 1 :]
        scores.append(float(picked.sum()))
    return scores


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_harness_acc_is_the_log_likelihood_choice_of_a_plain_forward_pass(
    method, mcq_file, held_out_file, compose_cfg, tmp_path
):
    """Per question, the harness's option log-likelihoods differ from the plain ones by one shared constant (lm-eval
    also scores the newline that ends the rendered prompt), so both pick the same option; ``acc`` is the same."""
    rank = ["method.r=4"] if method == "lora" else []
    cfg = compose_cfg([*mcq_overrides(mcq_file, tmp_path), f"method={method}", *rank])
    components = build_components(cfg)
    model, tokenizer = components["model"].eval(), components["tokenizer"]
    examples = load_examples(held_out_file, "medqa").examples
    result = harness_on_examples(model, tokenizer, examples, tmp_path / "data")
    samples = sorted(result.samples["tunelab_mcq"], key=lambda sample: sample["doc_id"])
    plain_correct = []
    for example, sample in zip(examples, samples, strict=True):
        harness = [response[0][0] for response in sample["resps"]]
        plain = plain_option_logprobs(model, tokenizer, example)
        shift = [h - p for h, p in zip(harness, plain, strict=True)]
        assert max(shift) - min(shift) == pytest.approx(0, abs=1e-4)
        assert max(range(4), key=harness.__getitem__) == max(range(4), key=plain.__getitem__)
        plain_correct.append(max(range(4), key=plain.__getitem__) == example.choices.answer_index)
    assert result.metrics["harness/tunelab_mcq/acc"] == pytest.approx(sum(plain_correct) / len(examples))
    assert result.summary["n_samples"]["tunelab_mcq"] == {"original": 12, "effective": 12}


def test_evaluate_writes_the_harness_report_and_merges_metrics_json(mcq_run, held_out_file, compose_cfg, tmp_path):
    run_dir, _ = mcq_run
    before = json.loads((run_dir / "metrics.json").read_text())
    harness = ["harness.tasks=[tunelab_mcq,tunelab_verne]", f"harness.data.tunelab_mcq={held_out_file}"]
    cfg = compose_cfg(evaluate_overrides(run_dir, tmp_path, *harness, "harness.limit=8"), config_name="evaluate")
    metrics = evaluate(cfg)
    keys = {f"harness/tunelab_mcq/{m}" for m in ("acc", "acc_norm")}
    keys |= {f"harness/tunelab_verne/{m}" for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")}
    assert keys <= set(metrics) and "test/loss" in metrics
    report = json.loads((tmp_path / "report.json").read_text())
    assert {k: report["metrics"][k] for k in keys} == {k: metrics[k] for k in keys}
    assert report["harness"]["n_samples"]["tunelab_mcq"] == {"original": 12, "effective": 8}
    assert report["harness"]["settings"]["limit"] == 8
    markdown = (tmp_path / "report.md").read_text()
    assert "## lm-evaluation-harness" in markdown and "| tunelab_mcq | 1.0 | 8 of 12 |" in markdown
    assert len((tmp_path / "harness_data" / "tunelab_mcq.jsonl").read_text().splitlines()) == 12
    after = json.loads((run_dir / "metrics.json").read_text())
    assert {k: after[k] for k in before} == before  # every key the run wrote is kept as it was
    assert {k: after[k] for k in keys} == {k: metrics[k] for k in keys}
    assert not list(run_dir.glob(".metrics.json.*.tmp"))


def test_harness_acc_equals_the_sft_tasks_mcq_acc_ll_on_the_runs_split(mcq_run, compose_cfg, tmp_path):
    """Without ``harness.data.tunelab_mcq`` the task scores the run's own test questions: the same choice as the
    SFT task's ``mcq_acc_ll`` in the same evaluation."""
    run_dir, run_metrics = mcq_run
    cfg = compose_cfg(evaluate_overrides(run_dir, tmp_path, "harness.tasks=[tunelab_mcq]"), config_name="evaluate")
    metrics = evaluate(cfg)
    assert metrics["harness/tunelab_mcq/acc"] == pytest.approx(metrics["test/mcq_acc_ll"], abs=1e-9)
    assert metrics["test/mcq_acc_ll"] == pytest.approx(run_metrics["test/mcq_acc_ll"], abs=1e-9)
    rows = (tmp_path / "harness_data" / "tunelab_mcq.jsonl").read_text().splitlines()
    assert len(rows) == 8  # data.test_size


def test_tunelab_mcq_leaves_out_the_questions_the_run_drops(compose_cfg, tmp_path):
    """A question whose prompt fills ``data.max_length`` is dropped from the run's split, so from the harness's too:
    both score the same questions."""
    rows = medqa_rows(12, seed=3)
    rows[4]["question"] = "Which of these is the sum? " * 40  # > data.max_length=160 tokens with the options
    split = write_jsonl(tmp_path / "split.jsonl", rows)
    files = [f"data.val_path={split}", f"data.test_path={split}"]
    run_cfg = compose_cfg(
        [*mcq_overrides(write_jsonl(tmp_path / "train.jsonl", medqa_rows(24, seed=0)), tmp_path), *files]
    )
    datamodule = build_components(run_cfg)["datamodule"]
    cfg = compose_cfg([f"adapter_path={tmp_path}", "split=test"], config_name="evaluate")
    questions = run_choice_examples(cfg, run_cfg, datamodule)
    assert [question.source for question in questions] == [f"{split}:{line}" for line in range(1, 13) if line != 5]


def test_merged_model_scores_as_the_adapter(mcq_run, held_out_file, compose_cfg, tmp_path):
    run_dir, _ = mcq_run

    def harness_only(model: str) -> dict[str, Any]:
        overrides = evaluate_overrides(
            run_dir,
            tmp_path / model,
            "harness.tasks=[tunelab_mcq,tunelab_verne]",
            f"harness.data.tunelab_mcq={held_out_file}",
            f"harness.model={model}",
            "harness.only=true",
        )
        return evaluate(compose_cfg(overrides, config_name="evaluate"))

    adapter, merged = harness_only("adapter"), harness_only("merged")
    assert "test/loss" not in adapter
    assert merged.keys() == adapter.keys()
    assert merged == pytest.approx(adapter, rel=1e-4)


def test_harness_settings_that_cannot_work_fail_before_any_model_loads(mcq_run, compose_cfg, tmp_path):
    run_dir, _ = mcq_run
    run_cfg = compose_cfg([*mcq_overrides(Path("x.jsonl"), tmp_path)])

    def check(*overrides: str, run: Any = run_cfg) -> None:
        cfg = compose_cfg([f"adapter_path={run_dir / 'adapter'}", *overrides], config_name="evaluate")
        check_harness(cfg, run, tmp_path)

    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['nope'\]; shipped \(offline\): \['tunelab_mcq'"):
        check("harness.tasks=[tunelab_mcq,nope]")
    with pytest.raises(ConfigError, match=re.escape("harness.model='folded' is not one of")):
        check("harness.tasks=[tunelab_verne]", "harness.model=folded")
    with pytest.raises(ConfigError, match=re.escape("harness.only=true scores only harness.tasks, which is empty")):
        check("harness.only=true")
    classifier = compose_cfg(["task=classification", "data.path=x.jsonl"])
    with pytest.raises(ConfigError, match="needs a causal language model; task=classification"):
        check("harness.tasks=[tunelab_verne]", run=classifier)
    assert check("harness.tasks=[]") is None


def test_merged_needs_an_adapter_that_folds(mcq_file, compose_cfg, tmp_path):
    model = build_components(compose_cfg([*mcq_overrides(mcq_file, tmp_path), "method=prompt"]))["model"]
    assert harness_model(model, "adapter", "prompt") is model
    with pytest.raises(ConfigError, match=re.escape("method=prompt has none that folds: use harness.model=adapter")):
        harness_model(model, "merged", "prompt")


def test_tunelab_mcq_needs_options_in_the_runs_data(alpaca_file, compose_cfg, tmp_path):
    """A run on data without options (alpaca) has no questions for tunelab_mcq: one line naming the fix."""
    from tunelab.evaluate import run_choice_examples

    run_cfg = compose_cfg(tiny_overrides(alpaca_file, tmp_path))
    datamodule = build_components(run_cfg)["datamodule"]
    cfg = compose_cfg(["adapter_path=x", "harness.tasks=[tunelab_mcq]"], config_name="evaluate")
    with pytest.raises(ConfigError, match=r"data=alpaca\) has no multiple-choice records; give harness.data"):
        run_choice_examples(cfg, run_cfg, datamodule)


def test_an_lm_eval_task_passes_through_and_offline_fails_in_one_line(mcq_file, compose_cfg, tmp_path):
    """A name lm-eval knows (not shipped) is passed to lm-eval as it is; without the Hub its data cannot load."""
    components = build_components(compose_cfg(mcq_overrides(mcq_file, tmp_path)))
    manager = task_manager(["medqa_4options"], tmp_path)
    with pytest.raises(ConfigError, match=r"GBaker/MedQA-USMLE-4-options-hf.*the shipped ones \['tunelab_mcq'"):
        run_harness(components["model"], components["tokenizer"], ["medqa_4options"], manager, limit=2)


def test_the_answer_continuation_ends_as_the_chat_template_ends_a_turn(tokenizer):
    assert turn_end(tokenizer) == "<|im_end|>\n"


def test_flat_metrics_names_filters_and_leaves_out_missing_stderr():
    results = {
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"},
        "tunelab_mcq": {"acc,none": 1, "acc_stderr,none": 0.1, "sample_len,none": True},
    }
    assert flat_metrics(results) == {
        "harness/gsm8k/exact_match/strict-match": 0.25,
        "harness/tunelab_mcq/acc": 1.0,
        "harness/tunelab_mcq/acc_stderr": 0.1,
    }


def test_the_shipped_tasks_are_the_task_files():
    assert SHIPPED == ("tunelab_mcq", "tunelab_verne")
