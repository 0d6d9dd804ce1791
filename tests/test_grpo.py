"""task=grpo: its config checks, no reference at beta = 0 (and the memory a reference copy would take), the
sampling policy's log-probs as the old ones over ``num_iterations`` passes (ratio exactly 1 on the first), and a
short tiny-model run that raises a toy reward and logs every metric. The losses have their hand-worked and trl
checks in test_grpo_losses.py."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from tunelab.errors import ConfigError
from tunelab.methods import METHODS
from tunelab.models.loading import load_model
from tunelab.tasks import OBJECTIVES
from tunelab.tasks.grpo import GRPOModule, check_grpo_config

from .test_ppo import counting_prompts, logged, newline_share, ppo_trainer, prompt_data_cfg
from .test_preference_data import write_jsonl

NEW_TOKENS = 8


def grpo_overrides(output_dir: Path, *extra: str) -> list[str]:
    return [
        "model=tiny",
        "task=grpo",
        f"paths.output_dir={output_dir}",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "trainer.max_epochs=1",
        f"task.rollout.max_new_tokens={NEW_TOKENS}",
        *extra,
    ]


def build_grpo(cfg: DictConfig, data_cfg: DictConfig, reward_fn, module_class: type[GRPOModule] = GRPOModule):
    """The adapted model, the prompts and the module (``module_class``), as train.py builds them for task=grpo
    (and task=rloo)."""
    from tunelab.data.prompts import PromptDataModule
    from tunelab.methods import apply_method

    loaded = load_model(cfg.model, cfg.paths.cache_dir)
    model = apply_method(loaded.model, cfg.method, loaded.tokenizer)
    torch.manual_seed(cfg.seed)
    datamodule = PromptDataModule(data_cfg, loaded.tokenizer, cfg.paths.cache_dir)
    method = METHODS[cfg.method.name]
    module = module_class(
        model, loaded.tokenizer, cfg.task, method.trains_all_weights, reward_fn, method.trains_base_in_place
    )
    return module, datamodule


def test_grpo_is_registered_from_its_own_file():
    objective = OBJECTIVES["grpo"]
    assert objective.data_kind == "prompts" and objective.check.__module__ == "tunelab.tasks.grpo"


CONFIG_ERRORS = {
    "task.num_generations=1": "at least 2 completions",
    "task.epsilon_low=-0.1": "0 <= epsilon_low < 1",
    "task.epsilon_low=1.0": "0 <= epsilon_low < 1",
    "task.epsilon_high=-0.1": "epsilon_high >= 0",
    "task.beta=-1": "task.beta >= 0",
    "task.num_iterations=0": "num_iterations >= 1",
    "task.loss_type=ppo": "task.loss_type='ppo' is not one of",
    "task.loss_type=dr_grpo task.scale_rewards=true": "set task.scale_rewards=false",
    "task.overlong_cache=9": "task.overlong_cache=9 must be in (0, task.rollout.max_new_tokens=8]",
    "task.reward.source=human": "task.reward.source='human' is not one of",
    "task.dynamic_sampling=drop": "task.dynamic_sampling in ['skip', 'resample', 'off']",
    "task.max_resample_batches=-1": "task.max_resample_batches >= 0",
    "trainer.accumulate_grad_batches=2": "trainer.accumulate_grad_batches=1, not 2",
    "trainer.gradient_clip_val=1.0": "trainer.gradient_clip_val=null",
}


@pytest.mark.parametrize(("overrides", "reason"), list(CONFIG_ERRORS.items()), ids=list(CONFIG_ERRORS))
def test_settings_that_cannot_work_fail_before_weights_load(compose_cfg, tmp_path, overrides, reason):
    check_grpo_config(compose_cfg(grpo_overrides(tmp_path)), METHODS["lora"])
    with pytest.raises(ConfigError, match=re.escape(reason)):
        check_grpo_config(compose_cfg(grpo_overrides(tmp_path, *overrides.split())), METHODS["lora"])


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(param.numel() * param.element_size() for param in model.parameters())


def test_beta_zero_builds_no_reference(compose_cfg, tmp_path):
    """method=full would need a frozen copy as its reference: at beta = 0 none is made (0 bytes), at beta > 0 it
    holds as many bytes as the policy (the tiny Llama: 12.9 MB of float32)."""
    cfg = compose_cfg(grpo_overrides(tmp_path, "method=full"))
    model = load_model(cfg.model, cfg.paths.cache_dir).model
    assert cfg.task.beta == 0
    module = GRPOModule(model, None, cfg.task, True, newline_share, trains_base_in_place=True)
    assert module.engine.reference is None
    with pytest.raises(RuntimeError, match="without a reference"):
        module.engine.reference_logps(model, None, None, None)
    cfg.task.beta = 0.04
    reference = GRPOModule(model, None, cfg.task, True, newline_share, True).engine.reference
    copy_bytes = parameter_bytes(reference.frozen.model)
    assert copy_bytes == parameter_bytes(model) > 10_000_000


def test_num_iterations_use_the_sampling_log_probs(compose_cfg, tmp_path, monkeypatch):
    """Every pass's ratios are against the log-probs computed once before the first update (the same tensors), so
    the first pass's ratios are exactly 1 and the second's are not (the first step moved the policy)."""
    import tunelab.tasks.grpo as grpo

    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = grpo.policy_loss

    def spy(logps, old_logps, *args, **kwargs):
        calls.append((logps.detach().clone(), old_logps))
        return original(logps, old_logps, *args, **kwargs)

    monkeypatch.setattr(grpo, "policy_loss", spy)
    overrides = ("method=full", "task.num_iterations=2", "task.optimizer.lr=1e-2", "trainer.max_steps=2")
    cfg = compose_cfg(grpo_overrides(tmp_path, *overrides, "task.dynamic_sampling=off"))
    data_cfg = prompt_data_cfg(write_jsonl(tmp_path / "p.jsonl", counting_prompts(20)), batch_size=3)
    module, datamodule = build_grpo(cfg, data_cfg, lambda texts, records: torch.rand(len(texts)))
    trainer = ppo_trainer(cfg, module, callbacks=[])
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2  # one batch, num_iterations optimizer steps
    chunks = math.ceil(3 * cfg.task.num_generations / cfg.task.chunk_size)
    assert len(calls) == 2 * chunks
    (first, old), (second, old_again) = calls[0], calls[chunks]
    assert old_again is old  # the same detached tensor in both passes
    assert torch.equal(first, old)  # ratio == 1 exactly on the first pass
    assert (second - old).abs().max() > 1e-4


def test_short_run_raises_the_reward_and_logs_every_metric(compose_cfg, tmp_path):
    """As PPO's short run: the tiny random model trains every weight and samples at temperature 0.1, with a
    reference (beta > 0) so the KL is logged; the toy reward is the share of newlines."""
    from tunelab.build import instantiate_callbacks

    cfg = compose_cfg(
        grpo_overrides(
            tmp_path,
            "method=full",
            "task.rollout.temperature=0.1",
            "task.loss_type=grpo",
            "task.beta=0.01",
            "task.optimizer.lr=3e-4",
        )
    )
    data_cfg = prompt_data_cfg(write_jsonl(tmp_path / "data.jsonl", counting_prompts(104)), batch_size=8)
    module, datamodule = build_grpo(cfg, data_cfg, newline_share)
    trainer = ppo_trainer(cfg, module, instantiate_callbacks(cfg))
    trainer.fit(module, datamodule=datamodule)

    rewards = logged(tmp_path, "train/reward_mean")
    assert len(rewards) == 12  # 96 training prompts in batches of 8
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.3, rewards  # measured: 0.10 -> 0.60 (0.016 -> 0.742)
    for key in (
        "train/reward_std",
        "train/completion_length",
        "train/zero_variance_share",
        "train/clip_fraction",
        "train/policy_loss",
        "train/kl",
    ):
        values = logged(tmp_path, key)
        assert values and all(math.isfinite(value) for value in values), key
    assert logged(tmp_path, "train/kl")[-1] > 0
    assert all(0 <= share <= 1 for share in logged(tmp_path, "train/zero_variance_share"))
    assert math.isfinite(trainer.callback_metrics["val/reward_mean"])
    assert math.isfinite(trainer.callback_metrics["val/reward_stderr"])
    assert 0 <= trainer.callback_metrics["val/exact_match"] <= 1  # the counting prompts carry an answer
    assert trainer.callback_metrics["val/completion_length"] > 0
    assert trainer.checkpoint_callback.monitor == "val/reward_mean" and trainer.checkpoint_callback.best_model_path


def test_zero_variance_groups_are_dropped_from_the_update_and_counted(compose_cfg, tmp_path, monkeypatch):
    """Prompts with an even answer get reward 1 for every completion (a zero-variance group), the others a random
    reward: the update sees only the odd prompts' rows and ``train/zero_variance_share`` is the even share."""
    import tunelab.tasks.grpo as grpo

    generations = 4
    batches: list[list[dict]] = []
    updated_rows: list[int] = []
    original = grpo.policy_loss

    def reward(texts: list[str], records: list[dict]) -> torch.Tensor:
        if len(texts) == 3 * generations:  # a training batch (validation scores 4 greedy answers)
            batches.append(records[::generations])
        return torch.tensor([1.0 if int(r["answer"]) % 2 == 0 else torch.rand(()).item() for r in records])

    def spy(logps, old_logps, advantages, *args, **kwargs):
        updated_rows.append(len(advantages))
        return original(logps, old_logps, advantages, *args, **kwargs)

    monkeypatch.setattr(grpo, "policy_loss", spy)
    cfg = compose_cfg(grpo_overrides(tmp_path, f"task.num_generations={generations}", "task.chunk_size=64"))
    data_cfg = prompt_data_cfg(write_jsonl(tmp_path / "p.jsonl", counting_prompts(20)), batch_size=3)
    module, datamodule = build_grpo(cfg, data_cfg, reward)
    trainer = ppo_trainer(cfg, module, callbacks=[])
    trainer.fit(module, datamodule=datamodule)

    evens = [sum(int(record["answer"]) % 2 == 0 for record in batch) for batch in batches]
    assert len(batches) == 4 and 0 < sum(evens) < 12  # 12 training prompts in batches of 3: both kinds occur
    assert updated_rows == [(3 - even) * generations for even in evens if even < 3]
    assert logged(tmp_path, "train/zero_variance_share") == pytest.approx([even / 3 for even in evens])
    assert trainer.global_step == sum(even < 3 for even in evens)  # a batch of flat groups takes no step


# --- task=rloo -----------------------------------------------------------------------------------------------


def test_rloo_is_registered_and_refuses_what_grpo_refuses(compose_cfg, tmp_path):
    assert OBJECTIVES["rloo"].check.__module__ == "tunelab.tasks.rloo"
    overrides = [o.replace("task=grpo", "task=rloo") for o in grpo_overrides(tmp_path)]
    OBJECTIVES["rloo"].check(compose_cfg(overrides), METHODS["lora"])
    refused = {
        "task.num_generations=1": "at least 2",
        "task.epsilon_low=-1": "0 <= epsilon_low",
        "task.beta=-1": "beta >= 0",
    }
    for bad, reason in refused.items():
        with pytest.raises(ConfigError, match=re.escape(reason)):
            OBJECTIVES["rloo"].check(compose_cfg([*overrides, bad]), METHODS["lora"])


def test_rloo_short_run_uses_leave_one_out_advantages_and_no_reference(compose_cfg, tmp_path, monkeypatch):
    """One batch of 3 prompts x 4 samples with a random reward: the update's advantages are the leave-one-out ones of
    the sampled rewards, the module holds no reference, and the run logs finite metrics."""
    import tunelab.tasks.rloo as rloo
    from tunelab.tasks.grpo_losses import leave_one_out_advantages

    rewards: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []
    original = rloo.sequence_ratio_loss

    def reward(texts: list[str], records: list[dict]) -> torch.Tensor:
        rewards.append(torch.rand(len(texts)))
        return rewards[-1]

    def spy(logps, old_logps, advantages, *args, **kwargs):
        seen.append(advantages)
        return original(logps, old_logps, advantages, *args, **kwargs)

    monkeypatch.setattr(rloo, "sequence_ratio_loss", spy)
    overrides = [o.replace("task=grpo", "task=rloo") for o in grpo_overrides(tmp_path, "trainer.max_steps=1")]
    cfg = compose_cfg([*overrides, "task.chunk_size=64"])
    data_cfg = prompt_data_cfg(write_jsonl(tmp_path / "p.jsonl", counting_prompts(20)), batch_size=3)
    module, datamodule = build_grpo(cfg, data_cfg, reward, rloo.RLOOModule)
    assert isinstance(module, rloo.RLOOModule) and module.engine.reference is None
    trainer = ppo_trainer(cfg, module, callbacks=[])
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1 and len(seen) == 1
    expected, _ = leave_one_out_advantages(rewards[0], 4)
    torch.testing.assert_close(seen[0], expected)
    for key in ("train/reward_mean", "train/policy_loss", "train/clip_fraction", "train/zero_variance_share"):
        assert all(math.isfinite(value) for value in logged(tmp_path, key)), key


def test_concatenated_completions_keep_every_row(compose_cfg, tmp_path):
    """Two rollouts of different prompt and response lengths as one: each row's unpadded tokens, response mask,
    labels and text are those of its own rollout; the padding is outside both masks."""
    from tunelab.tasks.rollout import Completions, concat_completions

    def completions(prompt: int, response: int, rows: int, seed: int) -> Completions:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 50, (rows, prompt + response), generator=generator)
        mask = torch.rand(rows, response, generator=generator) < 0.7
        return Completions(ids, torch.ones_like(ids), mask, mask.all(-1), [f"{seed}-{row}" for row in range(rows)])

    first, second = completions(3, 5, 2, 0), completions(6, 2, 3, 1)
    joined = concat_completions([first, second], pad_token_id=0)
    assert joined.input_ids.shape == (5, 6 + 5) and joined.texts == [*first.texts, *second.texts]
    for rows, part, prompt, response in ((slice(0, 2), first, 3, 5), (slice(2, 5), second, 6, 2)):
        ids = joined.input_ids[rows, 6 - prompt : 6 + response]
        assert torch.equal(ids, part.input_ids) and torch.equal(joined.mask[rows, :response], part.mask)
        assert torch.equal(joined.labels[rows, : response + 1], part.labels)
        assert (joined.labels[rows, response + 1 :] == -100).all() and not joined.mask[rows, response:].any()
        assert (joined.attention_mask[rows, : 6 - prompt] == 0).all()
        assert (joined.attention_mask[rows, 6 + response :] == 0).all()
    assert torch.equal(joined.ended, torch.cat([first.ended, second.ended]))


@pytest.mark.parametrize("mode", ["resample", "skip"])
def test_dynamic_sampling_resamples_until_the_batch_has_signal(compose_cfg, tmp_path, monkeypatch, mode):
    """A prompt whose answer is not a multiple of 3 gets reward 1 on every completion (no signal), the others a
    random one. ``resample`` draws more batches of 3 prompts until 3 groups have signal (at most 2 more): each step's
    update holds ``min(3, signal groups drawn) G`` rows and ``train/resampled_batches`` counts the extra batches;
    ``skip`` never draws more and updates on its own signal groups only."""
    import tunelab.tasks.grpo as grpo

    generations, calls, updated_rows = 4, [], []
    original = grpo.policy_loss

    def reward(texts: list[str], records: list[dict]) -> torch.Tensor:
        if len(texts) == 3 * generations:  # a training batch (validation scores 4 greedy answers)
            calls.append(sum(int(record["answer"]) % 3 == 0 for record in records[::generations]))
        return torch.tensor([torch.rand(()).item() if int(r["answer"]) % 3 == 0 else 1.0 for r in records])

    def spy(logps, old_logps, advantages, *args, **kwargs):
        updated_rows.append(len(advantages))
        return original(logps, old_logps, advantages, *args, **kwargs)

    monkeypatch.setattr(grpo, "policy_loss", spy)
    overrides = (f"task.dynamic_sampling={mode}", "task.max_resample_batches=2", "task.chunk_size=64")
    cfg = compose_cfg(grpo_overrides(tmp_path, *overrides, "trainer.max_steps=3"))
    data_cfg = prompt_data_cfg(write_jsonl(tmp_path / "p.jsonl", counting_prompts(32)), batch_size=3)
    module, datamodule = build_grpo(cfg, data_cfg, reward)
    trainer = ppo_trainer(cfg, module, callbacks=[])
    trainer.fit(module, datamodule=datamodule)

    resampled = [int(count) for count in logged(tmp_path, "train/resampled_batches")]
    expected_rows, expected_resampled, start = [], [], 0
    while start < len(calls) and len(expected_rows) < len(resampled):
        drawn = 1
        while mode == "resample" and drawn <= 2 and sum(calls[start : start + drawn]) < 3:
            drawn += 1
        expected_resampled.append(drawn - 1)
        expected_rows.append(min(3, sum(calls[start : start + drawn])) * generations)
        start += drawn
    assert start == len(calls) and resampled == expected_resampled, (calls, resampled)
    assert updated_rows == [rows for rows in expected_rows if rows], (calls, updated_rows)
    if mode == "resample":
        assert sum(resampled) > 0  # measured: most steps draw more
    else:
        assert sum(resampled) == 0


def test_the_objective_samples_through_its_generation_engine(compose_cfg, tmp_path):
    """A :class:`GenerationEngine` swapped in (here: transformers' generate, recording each call) samples every
    rollout and validation answer: the objective needs no change, and the engine gets the policy and the
    temperature (``None``: greedy)."""
    from tunelab.tasks.rollout import TransformersEngine

    calls: list[tuple[int, float | None]] = []

    class Recording(TransformersEngine):
        def generate(self, policy, prompts, temperature):
            assert policy is module.model
            calls.append((len(prompts["input_ids"]), temperature))
            return super().generate(policy, prompts, temperature)

    cfg = compose_cfg(grpo_overrides(tmp_path, "trainer.max_steps=1", "task.dynamic_sampling=off"))
    data_cfg = prompt_data_cfg(write_jsonl(tmp_path / "p.jsonl", counting_prompts(20)), batch_size=3)
    module, datamodule = build_grpo(cfg, data_cfg, lambda texts, records: torch.rand(len(texts)))
    module.engine.generator = Recording(module.engine.tokenizer, NEW_TOKENS)
    trainer = ppo_trainer(cfg, module, callbacks=[])
    trainer.fit(module, datamodule=datamodule)
    assert calls == [(3 * cfg.task.num_generations, 1.0)]  # the training batch, sampled at task.rollout.temperature
    trainer.validate(module, datamodule=datamodule)
    assert calls[1:] == [(4, None)]  # validation: 4 prompts, greedy


@pytest.mark.parametrize("overlong_cache", [None, 2])
def test_rloo_beta_penalizes_the_reward_with_the_sequence_kl(overlong_cache, compose_cfg, tmp_path, monkeypatch):
    """task=rloo with beta > 0 (method=full: the reference is a frozen copy, and the policy is perturbed after it is
    taken so the KL is not 0): the loss's advantages are the leave-one-out ones of ``r - beta KL`` with
    ``KL_i = sum_t m_t (log pi_old - log pi_ref)`` of the very log-probs the update and the reference give, and
    ``train/kl`` is its mean per completion token. With ``overlong_cache`` the soft overlong penalty is added on top
    of the KL penalty (neither replaces the other)."""
    import tunelab.tasks.rloo as rloo
    from tunelab.tasks.grpo_losses import leave_one_out_advantages, soft_overlong_penalty

    beta, rewards, losses, references = 0.1, [], [], []
    original_loss = rloo.sequence_ratio_loss

    def reward(texts: list[str], records: list[dict]) -> torch.Tensor:
        rewards.append(torch.rand(len(texts)))
        return rewards[-1]

    def spy(logps, old_logps, advantages, mask, **kwargs):
        losses.append((old_logps, advantages, mask))
        return original_loss(logps, old_logps, advantages, mask, **kwargs)

    monkeypatch.setattr(rloo, "sequence_ratio_loss", spy)
    overrides = [o.replace("task=grpo", "task=rloo") for o in grpo_overrides(tmp_path, "trainer.max_steps=1")]
    extra = ["method=full", f"task.beta={beta}", "task.chunk_size=64", "task.dynamic_sampling=off"]
    cfg = compose_cfg(
        [*overrides, *extra, f"task.overlong_cache={'null' if overlong_cache is None else overlong_cache}"]
    )
    OBJECTIVES["rloo"].check(cfg, METHODS["full"])
    data_cfg = prompt_data_cfg(write_jsonl(tmp_path / "p.jsonl", counting_prompts(20)), batch_size=3)
    module, datamodule = build_grpo(cfg, data_cfg, reward, rloo.RLOOModule)
    assert module.engine.reference is not None and module.beta == 0  # the KL is on the reward, not in the loss
    original_reference = module.engine.reference_logps

    def reference_spy(*args):
        references.append(original_reference(*args))
        return references[-1]

    module.engine.reference_logps = reference_spy
    with torch.no_grad():
        for param in module.model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    trainer = ppo_trainer(cfg, module, callbacks=[])
    trainer.fit(module, datamodule=datamodule)

    (old_logps, advantages, mask), (reference,) = losses[0], references
    kl = ((old_logps - reference) * mask).sum(-1)
    assert kl.abs().max() > 1e-3
    shaped = rewards[0] - beta * kl
    if overlong_cache is not None:
        lengths = mask.sum(-1)
        assert (lengths > cfg.task.rollout.max_new_tokens - overlong_cache).any()  # the penalty bites somewhere
        shaped = shaped + soft_overlong_penalty(lengths, cfg.task.rollout.max_new_tokens, overlong_cache)
    expected, _ = leave_one_out_advantages(shaped, cfg.task.num_generations)
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-6)
    assert logged(tmp_path, "train/kl") == pytest.approx([(kl.sum() / mask.sum()).item()], rel=1e-6)
