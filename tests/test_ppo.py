"""task=ppo: prompt files (located errors, skips, overflow, left-padded batches), one PPO iteration (its optimizer
steps, the value head trained and checkpointed, the reference = the base model with the adapter off), the
reward-model scorer, and a short run that raises a toy reward. The loss functions have their hand-worked checks in
test_preference_losses.py."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from tunelab.data.prompts import PromptCollator, PromptDataModule, PromptExample, encode_prompts, load_prompts
from tunelab.data.tokenization import render_prompt_ids
from tunelab.errors import ConfigError, DataError
from tunelab.methods import METHODS
from tunelab.models.loading import load_model
from tunelab.tasks.ppo import PPOModule, check_ppo_config
from tunelab.tasks.preference_losses import token_logps
from tunelab.tasks.rollout import response_mask

from .test_preference_data import write_jsonl

TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"}]
PLAIN = {"prompt": "What is 2 plus 3?", "answer": "5", "metadata": {"source_dataset": "basic_arithmetic"}}


def prompt_data_cfg(path: Path, **overrides: object) -> DictConfig:
    """A prompt data config with the keys of configs/data/hpo_qa.yaml that PromptDataModule reads."""
    keys = {
        "name": "prompts",
        "builder": None,
        "path": str(path),
        "val_path": None,
        "test_path": None,
        "on_error": "fail",
        "on_overflow": "drop",
        "limit": None,
        "max_prompt_length": 64,
        "split_seed": 1234,
        "test_size": 4,
        "val_size": 4,
        "train_size": None,
        "batch_size": 6,
        "eval_batch_size": 4,
        "shuffle": True,
        "seed": 0,
        "num_workers": 0,
    }
    return OmegaConf.create({**keys, **overrides})


def counting_prompts(count: int) -> list[dict[str, object]]:
    return [{"prompt": f"Count to {i}.", "answer": str(i)} for i in range(count)]


# --- prompt files ----------------------------------------------------------------------------------------------


def test_string_and_turn_prompts_keep_the_whole_record(tmp_path):
    turns_row = {"prompt": TURNS, "id": 7}
    path = write_jsonl(tmp_path / "prompts.jsonl", [PLAIN, "", turns_row])
    result = load_prompts(path)
    assert result.skipped == []
    plain, turns = result.examples
    assert plain == PromptExample(({"role": "user", "content": PLAIN["prompt"]},), PLAIN, 1, f"{path}:1")
    assert turns == PromptExample(tuple(TURNS), turns_row, 3, f"{path}:3")


BAD_PROMPTS = {
    "missing prompt": ({"answer": "5"}, "prompt", "missing field"),
    "blank prompt": ({"prompt": " \n"}, "prompt", "empty prompt"),
    "number": ({"prompt": 5}, "prompt", "expected a string or a list of {role, content} turns, got int"),
    "no turns": ({"prompt": []}, "prompt", "expected a non-empty list"),
    "unknown role": ({"prompt": [{"role": "bot", "content": "hi"}]}, "prompt[0].role", "unknown role 'bot'"),
    "content not text": ({"prompt": [{"role": "user", "content": 3}]}, "prompt[0].content", "expected a string"),
    "ends with the assistant": (
        {"prompt": [*TURNS, {"role": "assistant", "content": "5"}]},
        "prompt[2].role",
        "must end with the user's turn, got 'assistant'",
    ),
}


@pytest.mark.parametrize(("row", "field", "reason"), list(BAD_PROMPTS.values()), ids=list(BAD_PROMPTS))
def test_bad_prompt_error_names_file_line_and_field(tmp_path, row, field, reason):
    path = write_jsonl(tmp_path / "prompts.jsonl", [PLAIN, row])
    with pytest.raises(DataError, match=re.escape(reason)) as info:
        load_prompts(path)
    assert (info.value.file, info.value.line, info.value.field) == (str(path), 2, field)
    assert str(info.value).startswith(f"{path}, line 2: field '{field}': ")


def test_skip_counts_bad_prompts_and_malformed_lines(tmp_path):
    rows = [PLAIN, BAD_PROMPTS["missing prompt"][0], {"prompt": TURNS}, BAD_PROMPTS["number"][0]]
    result = load_prompts(write_jsonl(tmp_path / "prompts.jsonl", rows), on_error="skip")
    assert [example.line for example in result.examples] == [1, 3]
    assert [reason.split(": field ")[1] for reason in result.skipped] == [
        "'prompt': missing field",
        "'prompt': expected a string or a list of {role, content} turns, got int",
    ]
    with pytest.raises(DataError, match=r"no usable examples .*1 bad record\(s\) skipped"):
        load_prompts(write_jsonl(tmp_path / "bad.jsonl", rows[1:2]), on_error="skip")
    broken = write_jsonl(tmp_path / "broken.jsonl", [PLAIN, '{"prompt": "q"'])
    with pytest.raises(DataError, match=rf"^{broken}, line 2: invalid JSON"):
        load_prompts(broken, on_error="fail")
    assert load_prompts(broken, on_error="skip").skipped == [
        f"{broken}, line 2: invalid JSON: Expecting ',' delimiter (column 15)"
    ]
    with pytest.raises(ConfigError, match=r"data\.on_error='drop'"):
        load_prompts(broken, on_error="drop")


def test_prompts_render_with_the_generation_prompt_and_collate_left_padded(tokenizer):
    short = PromptExample(tuple(TURNS), {"prompt": TURNS, "id": 1}, 1, "mem:1")
    question = "Please add two and three. " * 10
    long = PromptExample(({"role": "user", "content": question},), {"prompt": question, "id": 2}, 2, "mem:2")
    encoded, dropped = encode_prompts(tokenizer, [short, long], max_prompt_length=256)
    assert dropped == []
    assert [prompt.input_ids for prompt in encoded] == [render_prompt_ids(tokenizer, ex.prompt) for ex in (short, long)]
    assert tokenizer.decode(encoded[0].input_ids).endswith("<|im_start|>assistant\n")

    batch = PromptCollator(tokenizer.pad_token_id)(encoded)
    width = max(len(prompt.input_ids) for prompt in encoded)
    assert batch["records"] == [short.record, long.record]
    for row, prompt in enumerate(encoded):
        padding = width - len(prompt.input_ids)
        assert batch["input_ids"][row].tolist() == [tokenizer.pad_token_id] * padding + prompt.input_ids
        assert batch["attention_mask"][row].tolist() == [0] * padding + [1] * len(prompt.input_ids)

    limit = len(encoded[0].input_ids)
    kept, dropped = encode_prompts(tokenizer, [short, long], max_prompt_length=limit)
    assert [prompt.record["id"] for prompt in kept] == [1] and len(dropped) == 1 and dropped[0].startswith("mem:2: ")
    with pytest.raises(DataError, match=rf"^mem:2: prompt of {width} tokens is longer than"):
        encode_prompts(tokenizer, [short, long], max_prompt_length=limit, on_overflow="fail")


def test_datamodule_splits_prompts_and_reports_counts(tokenizer, tmp_path):
    rows = [*counting_prompts(20), {"prompt": "word " * 100}]
    datamodule = PromptDataModule(prompt_data_cfg(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer, tmp_path)
    datamodule.setup()
    report = datamodule.report
    cut = {split: report[split]["examples"] + report[split]["dropped_overflow"] for split in ("train", "val", "test")}
    assert cut == {"train": 13, "val": 4, "test": 4}  # split first (seeded), then the too-long prompt is dropped
    assert sum(report[split]["dropped_overflow"] for split in cut) == 1
    assert report["skipped_records"] == {str(tmp_path / "p.jsonl"): 0}
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input_ids"].shape[0] == 6 and len(batch["records"]) == 6
    assert all(record["prompt"].startswith("Count to") for record in batch["records"])


def test_response_mask_keeps_tokens_through_the_first_eos():
    response = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    assert response_mask(response, eos_token_id=2).tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
    ]


# --- one PPO iteration -----------------------------------------------------------------------------------------


def ppo_overrides(output_dir: Path, *extra: str) -> list[str]:
    return [
        "model=tiny",
        "task=ppo",
        f"paths.output_dir={output_dir}",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "trainer.max_epochs=1",
        "task.rollout.max_new_tokens=8",
        *extra,
    ]


def build_ppo(cfg: DictConfig, data_cfg: DictConfig, reward_fn) -> tuple[PPOModule, PromptDataModule]:
    """The adapted model, the prompts and the module, whose reference is a frozen copy where the method trains the
    base weights (as train.py is to build them for task=ppo)."""
    from tunelab.methods import apply_method

    loaded = load_model(cfg.model, cfg.paths.cache_dir)
    model = apply_method(loaded.model, cfg.method, loaded.tokenizer)
    torch.manual_seed(cfg.seed)  # as seed_everything in train.py: rollouts sample from the run seed
    datamodule = PromptDataModule(data_cfg, loaded.tokenizer, cfg.paths.cache_dir)
    method = METHODS[cfg.method.name]
    module = PPOModule(
        model, loaded.tokenizer, cfg.task, method.trains_all_weights, reward_fn, method.trains_base_in_place
    )
    return module, datamodule


def ppo_trainer(cfg: DictConfig, module: PPOModule, callbacks: list) -> object:
    from tunelab.build import build_trainer, instantiate_loggers

    return build_trainer(cfg, module.model, callbacks, instantiate_loggers(cfg))


def completion_lengths(completions: list[str], records: list[dict]) -> torch.Tensor:
    return torch.tensor([float(len(text)) for text in completions])


@pytest.fixture(scope="module")
def one_iteration(tmp_path_factory):
    """LoRA, 6 prompts per batch, minibatches of 4, 2 PPO epochs, stopped after 4 optimizer steps: one batch."""
    from hydra import compose, initialize_config_dir

    from .conftest import CONFIGS

    output_dir = tmp_path_factory.mktemp("ppo_one")
    overrides = ppo_overrides(output_dir, "method=lora", "task.optimizer.lr=1e-2", "trainer.max_steps=4")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    data_file = write_jsonl(tmp_path_factory.mktemp("data") / "p.jsonl", counting_prompts(20))
    module, datamodule = build_ppo(cfg, prompt_data_cfg(data_file), completion_lengths)
    trainer = ppo_trainer(cfg, module, callbacks=[])
    trainer.fit(module, datamodule=datamodule)
    return cfg, module, datamodule, trainer


def test_one_iteration_takes_ppo_epochs_times_minibatches_optimizer_steps(one_iteration):
    cfg, module, _, trainer = one_iteration
    assert cfg.task.ppo_epochs == 2 and cfg.task.minibatch_size == 4
    assert trainer.global_step == 2 * math.ceil(6 / 4)  # Lightning counts every optimizer step
    assert module.lr_schedulers().last_epoch == 1  # one scheduler step per rollout batch
    assert module.total_training_steps() == 1  # max_steps=4 optimizer steps: 1 of the epoch's 2 batches


def test_value_head_trains_and_is_checkpointed(one_iteration, tmp_path):
    _, module, _, trainer = one_iteration
    head = list(module.value_head.parameters())
    optimized = {id(param) for group in module.optimizers().optimizer.param_groups for param in group["params"]}
    assert all(id(param) in optimized for param in head)
    assert module.value_head.weight.abs().sum() > 0  # left its zero init
    trainer.save_checkpoint(tmp_path / "ppo.ckpt")
    saved = torch.load(tmp_path / "ppo.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    trainable = {name for name, param in module.named_parameters() if param.requires_grad}
    assert {"value_head.weight", "value_head.bias"} <= set(saved) == trainable
    assert all("lora_" in name or name.startswith("value_head.") for name in saved)
    assert torch.equal(saved["value_head.weight"], module.value_head.weight)


def test_reference_is_the_base_model_with_the_adapter_off(one_iteration):
    cfg, module, datamodule, _ = one_iteration
    batch = next(iter(datamodule.val_dataloader()[0]))
    completions = module.engine.complete(module.model, batch, sample=True)
    args = (completions.input_ids, completions.attention_mask, completions.labels)
    reference = module.engine.reference_logps(module.model, *args)
    base = load_model(cfg.model, cfg.paths.cache_dir).model.eval()
    with torch.no_grad():
        logits = base(input_ids=completions.input_ids, attention_mask=completions.attention_mask).logits
        policy, _, _ = module.policy_outputs(*args)
    temperature = module.engine.temperature
    expected, mask = token_logps(logits[:, -completions.labels.shape[1] :] / temperature, completions.labels)
    assert mask.equal(completions.mask)
    torch.testing.assert_close(reference, expected, atol=0, rtol=0)  # README: equals the adapter-free base model
    assert (policy - reference).abs().max() > 1e-3  # the trained adapter moved the policy away from it


def test_missing_eos_penalty_lowers_the_last_reward(one_iteration):
    cfg, module, datamodule, _ = one_iteration
    batch = next(iter(datamodule.val_dataloader()[0]))
    completions = module.engine.complete(module.model, batch, sample=True)
    assert not completions.ended.any()  # a random tiny model does not sample its EOS in 8 tokens
    scores = torch.zeros(len(completions.texts))
    free, _ = module.make_rollout(completions, scores)
    cfg.task.missing_eos_penalty = 1.0
    try:
        penalized, _ = module.make_rollout(completions, scores)
    finally:
        cfg.task.missing_eos_penalty = None
    # returns R_t = A_t + V_t; with gamma = 1 a change of the last reward shifts R_last by exactly that change
    torch.testing.assert_close(penalized.returns[:, -1] - free.returns[:, -1], -torch.ones(len(scores)))


CONFIG_ERRORS = {
    "task.reward.source=human": "task.reward.source='human' is not one of",
    "task.reward.source=model": "needs task.reward.model_path",
    "task.rollout.temperature=0": "temperature > 0",
    "task.minibatch_size=0": "minibatch_size >= 1",
    "trainer.accumulate_grad_batches=2": "trainer.accumulate_grad_batches=1, not 2",
    "trainer.gradient_clip_val=1.0": "trainer.gradient_clip_val=null",
}


@pytest.mark.parametrize(("override", "reason"), list(CONFIG_ERRORS.items()), ids=list(CONFIG_ERRORS))
def test_settings_that_cannot_work_fail_before_weights_load(compose_cfg, tmp_path, override, reason):
    check_ppo_config(compose_cfg(ppo_overrides(tmp_path)))
    with pytest.raises(ConfigError, match=re.escape(reason)):
        check_ppo_config(compose_cfg(ppo_overrides(tmp_path, override)))


def test_method_full_needs_a_frozen_reference(compose_cfg, tmp_path):
    cfg = compose_cfg(ppo_overrides(tmp_path, "method=full"))
    model = load_model(cfg.model, cfg.paths.cache_dir).model
    with pytest.raises(ConfigError, match="needs a frozen reference"):
        PPOModule(model, None, cfg.task, True, completion_lengths, trains_base_in_place=False)
    assert METHODS["full"].trains_base_in_place and not METHODS["lora"].trains_base_in_place
    reference = PPOModule(model, None, cfg.task, True, completion_lengths, True).engine.reference.frozen.model
    assert reference is not model and not any(param.requires_grad for param in reference.parameters())
    assert PPOModule(model, None, cfg.task, False, completion_lengths, False).engine.reference.frozen is None


# --- reward model ------------------------------------------------------------------------------------------------


def tiny_reward_model(tokenizer, num_labels: int = 1) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForSequenceClassification(config)


def test_reward_model_scores_each_conversation_as_rendered_alone(tokenizer):
    from tunelab.rewards.model import RewardModelScorer

    model = tiny_reward_model(tokenizer)
    scorer = RewardModelScorer(model, tokenizer)
    records = [PLAIN, {"prompt": TURNS}]
    completions = ["5", "It is five, because two plus three makes five."]
    scores = scorer(completions, records)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    for index, (completion, turns) in enumerate(zip(completions, ([TURNS[1]], TURNS), strict=True)):
        conversation = [*turns, {"role": "assistant", "content": completion}]
        ids = torch.tensor([tokenizer.apply_chat_template(conversation, return_dict=False)])
        with torch.no_grad():
            alone = model(input_ids=ids).logits[0, 0]
        assert scores[index].item() == pytest.approx(alone.item(), abs=1e-5)
    assert not model.training and not any(param.requires_grad for param in model.parameters())
    with pytest.raises(ConfigError, match="one output"):
        RewardModelScorer(tiny_reward_model(tokenizer, num_labels=2), tokenizer)


def reward_run(compose_cfg, run_dir: Path, tokenizer, task: str) -> Path:
    """A run folder as train.py writes it (config.yaml + adapter/ holding a full model) for task ``task``."""
    cfg = compose_cfg(ppo_overrides(run_dir, "method=full"))
    cfg.task.name = task
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    tiny_reward_model(tokenizer).save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    return run_dir / "adapter"


def reward_model(adapter: Path, cache_dir: Path):
    """``task.reward.source=model`` as the PPO objective builds it (the export loaded by tunelab.runs)."""
    from functools import partial

    from tunelab.runs import load_export
    from tunelab.tasks.reward_sources import build_reward_fn

    reward_cfg = OmegaConf.create({"source": "model", "model_path": str(adapter)})
    return build_reward_fn(reward_cfg, partial(load_export, cache_dir=str(cache_dir)))


def test_reward_model_path_must_be_a_reward_run(compose_cfg, tokenizer, tmp_path, cache_dir):
    adapter = reward_run(compose_cfg, tmp_path / "sft_run", tokenizer, task="sft")
    with pytest.raises(ConfigError, match="is a task=sft run"):
        reward_model(adapter, cache_dir)


def test_reward_model_loads_from_a_reward_run(compose_cfg, tokenizer, tmp_path, cache_dir):
    adapter = reward_run(compose_cfg, tmp_path / "reward_run", tokenizer, task="reward")
    scorer = reward_model(adapter, cache_dir)
    expected = tiny_reward_model(tokenizer)
    ids = torch.tensor([scorer.reward.conversation_ids("5", PLAIN)])  # the scorer inside its CheckedReward
    with torch.no_grad():
        assert scorer(["5"], [PLAIN]).item() == pytest.approx(expected(input_ids=ids).logits[0, 0].item(), abs=1e-5)


# --- a short run -------------------------------------------------------------------------------------------------

NEW_TOKENS = 8


def newline_share(completions: list[str], records: list[dict]) -> torch.Tensor:
    """Newlines per generated token: the untrained tiny policy at temperature 0.1 writes a few (its prompts end
    with one and a random model tends to repeat its input), so the reward has a signal from the start."""
    return torch.tensor([text.count("\n") / NEW_TOKENS for text in completions])


def logged(output_dir: Path, key: str) -> list[float]:
    with open(output_dir / "metrics.csv") as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]


def test_short_run_raises_the_reward_with_a_finite_kl(compose_cfg, tmp_path):
    """The tiny random model's tied embeddings give it near-uniform logits that a LoRA on its blocks barely moves,
    so this run trains every weight (reference: a frozen copy) and samples at temperature 0.1."""
    from tunelab.build import instantiate_callbacks

    cfg = compose_cfg(
        ppo_overrides(
            tmp_path,
            "method=full",
            "task.rollout.temperature=0.1",
            f"task.rollout.max_new_tokens={NEW_TOKENS}",
            "task.minibatch_size=8",
            "task.optimizer.lr=3e-4",
        )
    )
    data_cfg = prompt_data_cfg(write_jsonl(tmp_path / "data.jsonl", counting_prompts(200)), batch_size=16)
    module, datamodule = build_ppo(cfg, data_cfg, newline_share)
    trainer = ppo_trainer(cfg, module, instantiate_callbacks(cfg))
    untrained = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    assert untrained["val/kl"] == 0.0  # the policy is its reference before training
    trainer.fit(module, datamodule=datamodule)

    rewards = logged(tmp_path, "train/reward_mean")
    assert len(rewards) == 12  # 192 training prompts in batches of 16: 12 PPO iterations
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.3
    kls = logged(tmp_path, "train/kl")
    assert len(kls) == 12 and all(math.isfinite(kl) for kl in kls) and kls[-1] > 0
    for key in ("train/clip_frac", "train/entropy", "train/value_loss", "train/policy_loss", "train/approx_kl"):
        assert all(math.isfinite(value) for value in logged(tmp_path, key)), key
    assert math.isfinite(trainer.callback_metrics["val/kl"]) and trainer.callback_metrics["val/kl"] > 0
    assert trainer.callback_metrics["val/response_length"] > 0
    assert trainer.checkpoint_callback.monitor == "val/reward_mean" and trainer.checkpoint_callback.best_model_path
