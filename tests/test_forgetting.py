"""Forgetting, measured (``tunelab.forgetting``): general-text loss of the untrained and the trained model, on a tiny
random Llama; and the packaged general text it is measured on (``tunelab.assets.verne``)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tunelab.assets.verne import PASSAGE_WORDS, ensure_verne
from tunelab.build import build_components
from tunelab.errors import ConfigError
from tunelab.forgetting import Forgetting, check_forgetting, score_general
from tunelab.runs import model_from_export
from tunelab.train import train

from .conftest import tiny_overrides

SETTINGS = [
    "forgetting.sets=[verne]",
    "forgetting.max_passages=5",
    "forgetting.max_length=48",
    "forgetting.batch_size=2",  # 5 passages: batches of 2, 2 and 1, padded
]


@pytest.fixture
def tiny(alpaca_file, compose_cfg, tmp_path):
    """(cfg, model, tokenizer): the tiny random Llama with LoRA, forgetting on 5 passages cut to 48 tokens."""
    cfg = compose_cfg([*tiny_overrides(alpaca_file, tmp_path), "method=lora", *SETTINGS])
    components = build_components(cfg)
    return cfg, components["model"], components["tokenizer"]


def plain_mean_nll(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int) -> float:
    """One passage at a time, no padding: transformers' own mean loss times the predicted tokens, summed."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"][:max_length]])
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return total / count


def test_the_score_is_the_mean_token_loss_of_a_plain_forward_pass(tiny, cache_dir):
    cfg, model, tokenizer = tiny
    texts = [json.loads(line)["text"] for line in ensure_verne(cache_dir).read_text().splitlines()[:5]]
    expected = plain_mean_nll(model.eval(), tokenizer, texts, 48)
    assert score_general(model, tokenizer, cfg) == {"verne": pytest.approx(expected, rel=1e-5)}


def test_scoring_draws_no_random_numbers_and_restores_the_mode(tiny):
    cfg, model, tokenizer = tiny
    model.train()
    state = torch.get_rng_state()
    score_general(model, tokenizer, cfg)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and all(module.training for module in model.modules())


def test_before_after_and_change_around_training(tiny):
    """A few steps on other text move the general-text loss; ``change`` is after - before. Without a before (a
    resumed run) only ``after`` is reported."""
    cfg, model, tokenizer = tiny
    forgetting = Forgetting(cfg)
    forgetting.before(model, tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([tokenizer("0 1 2 3 4 5 6 7 8 9 " * 4)["input_ids"]])
    model.train()
    for _ in range(10):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    metrics = forgetting.after(model, tokenizer)
    assert set(metrics) == {"forgetting/verne/before", "forgetting/verne/after", "forgetting/verne/change"}
    assert metrics["forgetting/verne/after"] == pytest.approx(score_general(model, tokenizer, cfg)["verne"])
    change = metrics["forgetting/verne/after"] - metrics["forgetting/verne/before"]
    assert metrics["forgetting/verne/change"] == pytest.approx(change) and abs(change) > 1e-3
    assert set(Forgetting(cfg).after(model, tokenizer)) == {"forgetting/verne/after"}


def test_a_training_run_reports_the_untrained_and_the_exported_models_scores(alpaca_file, compose_cfg, tmp_path):
    """``train.py`` with forgetting on: ``before`` is the untrained model's score, ``after`` the score of the weights
    the run exports (the best checkpoint's), ``change`` their difference, all in ``metrics.json``."""
    cfg = compose_cfg([*tiny_overrides(alpaca_file, tmp_path), "method=lora", *SETTINGS])
    untrained = build_components(cfg)
    before = score_general(untrained["model"], untrained["tokenizer"], cfg)["verne"]
    train(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    exported, tokenizer = model_from_export(cfg, tmp_path / "adapter", cfg.paths.cache_dir)
    after = score_general(exported, tokenizer, cfg)["verne"]
    assert written["forgetting/verne/before"] == pytest.approx(before, rel=1e-6)
    assert written["forgetting/verne/after"] == pytest.approx(after, rel=1e-6)
    assert written["forgetting/verne/change"] == pytest.approx(after - before, rel=1e-6) and abs(after - before) > 1e-4


def test_soft_prompt_logits_are_aligned_with_the_passage(alpaca_file, compose_cfg, tmp_path):
    """method=prompt prepends virtual tokens' logits; the score reads the passage's own positions: with the virtual
    tokens set to those of a real text, the loss is the base model's on that text followed by the passage."""
    cfg = compose_cfg([*tiny_overrides(alpaca_file, tmp_path), "method=prompt", *SETTINGS])
    components = build_components(cfg)
    model, tokenizer = components["model"].eval(), components["tokenizer"]
    prompt = model.prompt_encoder[model.active_adapter].embedding.weight
    prefix = torch.tensor(tokenizer("Once upon a time")["input_ids"])
    virtual = prompt.shape[0]
    prefix = prefix.repeat(virtual)[:virtual]
    base = model.get_base_model()
    with torch.no_grad():
        prompt.copy_(base.get_input_embeddings()(prefix))
    score = score_general(model, tokenizer, cfg)["verne"]
    texts = [json.loads(line)["text"] for line in ensure_verne(cfg.paths.cache_dir).read_text().splitlines()[:5]]
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor(tokenizer(text)["input_ids"][:48])
        with torch.no_grad():
            logits = base(input_ids=torch.cat([prefix, ids])[None]).logits[0, virtual:]
        total += float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum"))
        count += len(ids) - 1
    assert score == pytest.approx(total / count, rel=1e-5)


def test_off_by_default_and_on_in_the_method_comparison(compose_cfg, alpaca_file, tmp_path):
    assert list(compose_cfg([]).forgetting.sets) == []
    assert list(compose_cfg(["experiment=method_comparison"]).forgetting.sets) == ["verne"]
    cfg = compose_cfg(tiny_overrides(alpaca_file, tmp_path))
    assert score_general(torch.nn.Linear(1, 1), None, cfg) == {}  # nothing loads, nothing runs


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["forgetting.sets=[wiki]"], "forgetting.sets: unknown set(s) ['wiki']; valid: ['verne']"),
        (["forgetting.sets=[verne]", "forgetting.max_length=0"], "forgetting.max_length=0 must be a whole number"),
        (["forgetting.sets=[verne]", "forgetting.max_passages=0"], "forgetting.max_passages=0 must be null (all)"),
        (["forgetting.sets=[verne]", "trainer=fsdp"], "it cannot run under FSDP or ZeRO-3"),
        (["forgetting.sets=[verne]", "task=classification"], "scores a causal language model; task=classification"),
    ],
)
def test_settings_that_cannot_work_fail_before_any_weights_load(overrides, words, compose_cfg):
    with pytest.raises(ConfigError, match=re.escape(words)):
        check_forgetting(compose_cfg(overrides))


def test_the_general_text_is_the_story_in_passages(cache_dir):
    rows = [json.loads(line) for line in ensure_verne(cache_dir).read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 31 and [row["id"] for row in rows] == [f"verne:{i}" for i in range(31)]
    assert rows[0]["text"].startswith("Little though they seem to think of it, the people of this twenty-ninth")
    assert rows[-1]["text"].endswith("no means has been found of increasing the length of the terrestrial year.")
    assert all(len(row["text"].split()) >= PASSAGE_WORDS for row in rows)
    assert not [row for row in rows if "Gutenberg" in row["text"] or "Redactor" in row["text"]]
