"""task=kto and unpaired feedback data: the record forms and their located errors, counted skips, pairs split into a
thumbs-up and a thumbs-down example, the mismatched rows of the reference point, thinning to a share of thumbs-up,
the packaged arithmetic feedback, the module's losses against ``kto_loss`` on hand-gathered log-probs for each
reference, learning on the tiny model, and refusals at config time."""

from __future__ import annotations

import json
import re

import pytest
import reasoning_gym
import torch

from tunelab.assets.arithmetic import GENERATOR, GENERATOR_OPTIONS, ensure_arith_feedback
from tunelab.build import build_components
from tunelab.data.feedback import (
    FeedbackExample,
    feedback_of,
    load_feedback,
    thin_to_share,
)
from tunelab.data.preference import PreferenceExample
from tunelab.data.records import ChatExample
from tunelab.data.tokenization import encode_example
from tunelab.errors import ConfigError, DataError
from tunelab.tasks.pairwise import split_pairs
from tunelab.tasks.preference_losses import kto_loss, kto_reference_point
from tunelab.train import train

from .test_alignment import alignment_overrides, hand_reply_logps, perturb_adapter, reply_positions

USER = {"role": "user", "content": "What is 2 plus 3?"}


def write_lines(path, rows: list) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def test_both_record_forms_load(tmp_path):
    path = write_lines(
        tmp_path / "feedback.jsonl",
        [
            {"prompt": "What is 2 plus 3?", "completion": " 5 ", "label": True},
            {"prompt": [USER], "completion": [{"role": "assistant", "content": "6"}], "label": False},
        ],
    )
    examples = load_feedback(path).examples
    assert examples == [
        FeedbackExample((USER,), "5", True, f"{path}:1"),
        FeedbackExample((USER,), "6", False, f"{path}:2"),
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "completion": "a"}, "field 'label': missing field; set \"label\": true (thumbs-up) or false"),
        ({"prompt": "q", "completion": "a", "label": 1}, "field 'label': expected true or false, got 1; set"),
        ({"prompt": "q", "completion": "a", "label": "true"}, "field 'label': expected true or false, got 'true'"),
        ({"prompt": "q", "completion": "  ", "label": True}, "field 'completion': empty completion"),
        (
            {"prompt": [USER], "completion": [{"role": "assistant", "content": ""}], "label": True},
            "field 'completion[0].content': empty completion",
        ),
        (
            {"prompt": [USER], "completion": [USER], "label": True},
            "field 'completion': expected exactly one turn, the assistant's reply",
        ),
    ],
)
def test_bad_records_fail_with_file_line_and_field(row, message, tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "a", "label": True}, row])
    with pytest.raises(DataError, match=f"^{re.escape(f'{path}, line 2: {message}')}"):
        load_feedback(path)


def test_bad_records_are_skipped_and_counted_in_the_data_report(tmp_path, compose_cfg):
    rows = [{"prompt": f"q{i}", "completion": "a", "label": i % 3 == 0} for i in range(40)]
    rows[5] = {"prompt": "q", "completion": "a"}
    rows[7] = {"prompt": "q", "completion": "a", "label": "yes"}
    rows[9] = "not json"
    path = write_lines(tmp_path / "feedback.jsonl", rows)
    assert len(load_feedback(path, on_error="skip").skipped) == 3
    cfg = compose_cfg(
        [
            *alignment_overrides("kto", path, tmp_path),
            "data=feedback",
            f"data.path={path}",
            "data.on_error=skip",
            "data.desirable_share=0.5",
        ]
    )
    datamodule = build_components(cfg)["datamodule"]
    datamodule.setup("fit")
    report = datamodule.report
    assert report["skipped_records"] == {path: 3}
    # 37 good records, 13 thumbs-up: the thumbs-down of each split thinned to as many as its thumbs-up
    assert report["thinned_for_share"] == 37 - sum(report[s]["examples"] for s in ("train", "val", "test"))
    assert all(report[s]["desirable"] == report[s]["undesirable"] for s in ("train", "val", "test"))


def test_pairs_become_one_thumbs_up_and_one_thumbs_down_example():
    pair = PreferenceExample((USER,), "5", "6", line=3, source="p.jsonl:3")
    single = FeedbackExample((USER,), "7", False, "f.jsonl:1")
    assert feedback_of([pair, single]) == [
        FeedbackExample((USER,), "5", True, "p.jsonl:3"),
        FeedbackExample((USER,), "6", False, "p.jsonl:3"),
        single,
    ]


def test_thinning_keeps_the_share_and_the_order():
    examples = [FeedbackExample((USER,), str(i), i < 30, f"x:{i}") for i in range(40)]  # 30 up, 10 down
    kept = thin_to_share(examples, 0.6, seed=0)
    assert [e.desirable for e in kept].count(True) == 15 and [e.desirable for e in kept].count(False) == 10
    assert kept == sorted(kept, key=lambda e: int(e.completion)) and kept == thin_to_share(examples, 0.6, seed=0)
    down = thin_to_share(examples, 0.9, seed=0)  # 30 up need 3.33 down at most: 3 kept
    assert [e.desirable for e in down].count(False) == 3 and [e.desirable for e in down].count(True) == 30


def kto_components(preference_file, compose_cfg, tmp_path, *overrides: str):
    cfg = compose_cfg([*alignment_overrides("kto", preference_file, tmp_path), *overrides])
    components = build_components(cfg)
    components["datamodule"].setup("fit")
    return components


def test_mismatched_rows_pair_each_prompt_with_another_prompts_completion(preference_file, compose_cfg, tmp_path):
    """Each example's mismatched row is the chat template of its prompt answered with the completion of the next
    example of the split with another prompt, as encoding that conversation directly gives."""
    components = kto_components(preference_file, compose_cfg, tmp_path, "data.max_length=64")
    tokenizer, items = components["tokenizer"], components["datamodule"].splits["val"]
    assert [item["index"] for item in items] == list(range(len(items)))
    for item in items:
        completion, row = item["completion"], item["mismatched"]
        other = next(
            later["completion"]
            for later in items[item["index"] + 1 :] + items[: item["index"]]
            if later["completion"].question != completion.question
        )
        prompt = ({"role": "user", "content": completion.question},)
        direct = encode_example(tokenizer, ChatExample(prompt, other.response, "x"), 64)
        assert (row.input_ids, row.labels) == (direct.input_ids, direct.labels)
        assert row.prompt_length == completion.prompt_length and other.question != completion.question


@pytest.mark.parametrize("reference", ["adapter_disabled", "copy", "precomputed"])
def test_kto_loss_uses_the_base_model_as_reference(reference, preference_file, compose_cfg, tmp_path):
    """The module's per-example losses and its ``kl`` equal ``kto_loss`` / ``kto_reference_point`` on reply log-probs
    gathered by hand: the perturbed policy's and the base model's (LoRA B = 0), of the examples and of their
    mismatched rows."""
    overrides = [
        f"task.reference={reference}",
        f"task.reference_cache_dir={tmp_path}/ref",
        "task.beta=0.5",
        "data.train_size=8",
    ]
    components = kto_components(preference_file, compose_cfg, tmp_path, *overrides, "task.undesirable_weight=1.5")
    model, module = components["model"], components["module"]
    batch = next(iter(components["datamodule"].ordered_loader("val")))
    replies = reply_positions(components["tokenizer"], batch)
    with torch.no_grad():
        base = hand_reply_logps(model.eval(), batch, replies)
        perturb_adapter(model)
        policy = hand_reply_logps(model, batch, replies)
        if reference == "precomputed":
            module.trainer = type("T", (), {"datamodule": components["datamodule"], "global_step": 0})()
        losses, statistics = module.pair_outputs(batch, "val")
    (logps, mismatched), (ref, mismatched_ref) = split_pairs(policy), split_pairs(base)
    z0 = kto_reference_point(mismatched, mismatched_ref)
    expected, rewards = kto_loss(logps, ref, batch["desirable"], z0, beta=0.5, undesirable_weight=1.5)
    assert torch.allclose(losses.double(), expected, atol=1e-5), f"{losses} != {expected}"
    assert statistics["kl"].item() == pytest.approx(z0.item(), abs=1e-5)
    assert statistics["rewards/chosen"].item() == pytest.approx(rewards[batch["desirable"]].mean().item(), abs=1e-5)
    assert (mismatched - mismatched_ref).abs().min() > 1e-3  # the perturbation moved the policy off the reference


def test_kto_learns_the_preference_from_the_pairs(preference_file, compose_cfg, tmp_path):
    """8 steps on 32 pairs (64 examples) lift the held-out thumbs-up rewards well above the thumbs-down ones and put
    most examples on their side of the reference point (at the start, policy == reference: every reward is 0, on
    neither side; measured: loss 0.33, margin 1.7, accuracy 0.69 to 0.81 on 16 examples)."""
    overrides = [
        *alignment_overrides("kto", preference_file, tmp_path),
        "task.beta=1.0",
        "task.optimizer.lr=1e-2",
        "data.batch_size=8",
        "data.train_size=32",
        "data.val_size=8",
        "data.test_size=8",
        "trainer.max_epochs=1",
    ]
    metrics, _ = train(compose_cfg(overrides))
    assert metrics["untrained/val/loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0)
    assert metrics["untrained/val/rewards/accuracy"] == 0.0
    assert metrics["val/loss"] < 0.4
    assert metrics["val/rewards/margin"] > 1.0 and metrics["val/rewards/accuracy"] > 0.6


def test_kto_learns_from_one_sided_feedback(preference_file, compose_cfg, tmp_path):
    """The same replies as unpaired thumbs-up / thumbs-down records, thinned to 75% thumbs-up with the rare
    thumbs-down weighted 3x: KTO still separates them (measured: loss 0.70 -> 0.53, margin 1.4, accuracy 0.8)."""
    pairs = [json.loads(line) for line in preference_file.read_text().splitlines()]
    records = [
        {"prompt": pair["prompt"], "completion": pair[reply], "label": reply == "chosen"}
        for pair in pairs
        for reply in ("chosen", "rejected")
    ]
    path = write_lines(tmp_path / "feedback.jsonl", records)
    overrides = [
        *alignment_overrides("kto", path, tmp_path),
        "data=feedback",
        f"data.path={path}",
        "data.desirable_share=0.75",
        "task.undesirable_weight=3.0",
        "task.beta=1.0",
        "task.optimizer.lr=1e-2",
        "data.batch_size=8",
        "data.train_size=64",
        "trainer.max_epochs=1",
    ]
    metrics, objects = train(compose_cfg(overrides))
    val = objects["datamodule"].report["val"]
    assert 0.75 <= val["desirable"] / val["examples"] < 0.85  # the thinned label is floored (0.8 on this split)
    start = (0.5 * val["desirable"] + 1.5 * val["undesirable"]) / val["examples"]  # 1 - sigmoid(0), weighted
    assert metrics["untrained/val/loss"] == pytest.approx(start, abs=1e-6)
    assert metrics["val/loss"] < start - 0.1
    assert metrics["val/rewards/margin"] > 0.7 and metrics["val/rewards/accuracy"] > 0.6


def test_packaged_feedback_is_labelled_by_the_generator_scorer(cache_dir):
    rows = [json.loads(line) for line in ensure_arith_feedback(cache_dir).read_text().splitlines()]
    scorer = reasoning_gym.create_dataset(GENERATOR, size=1, seed=0, **GENERATOR_OPTIONS)
    assert len(rows) > 1000 and len({row["prompt"] for row in rows}) == len(rows)
    for row in rows:
        assert row["label"] == (scorer.score_answer(answer=row["completion"], entry=row) == 1.0)
        assert row["label"] == (row["completion"] == str(eval(row["metadata"]["expression"])))
    share = sum(row["label"] for row in rows) / len(rows)
    assert 0.45 < share < 0.55


def test_packaged_feedback_is_thinned_to_mostly_thumbs_up(compose_cfg, tmp_path, cache_dir):
    cfg = compose_cfg(["task=kto", "model=tiny", f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"])
    datamodule = build_components(cfg)["datamodule"]
    datamodule.setup("fit")
    report = datamodule.report
    for split in ("train", "val", "test"):
        desirable, undesirable = report[split]["desirable"], report[split]["undesirable"]
        assert desirable + undesirable == report[split]["examples"]
        assert desirable / (desirable + undesirable) == pytest.approx(0.8, abs=0.02), split
    assert report["thinned_for_share"] > 0


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["task=kto", "task.beta=0"], "task.beta=0 must be > 0"),
        (["task=kto", "task.undesirable_weight=-1"], "task.undesirable_weight=-1 must be > 0"),
        (["task=kto", "data.desirable_share=1.5"], "data.desirable_share=1.5 must be null"),
        (["task=kto", "method=full"], "method=full trains the model.s own weights"),
        (["task=kto", "data=hpo_qa"], "task=kto reads feedback or preference records"),
        (
            ["task=dpo", "data=arith_feedback"],
            "task=dpo reads preference records, but data=arith_feedback holds feedback",
        ),
    ],
)
def test_bad_settings_fail_at_config_time(overrides, words, compose_cfg):
    from tunelab.config_checks import check_config

    with pytest.raises(ConfigError, match=words):
        check_config(compose_cfg(overrides))
