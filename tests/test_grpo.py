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
    assert objective.data_kind == "prompts" and objective.build.__module__ == "tunelab.tasks.grpo"


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
    cfg = compose_cfg(grpo_overrides(tmp_path, *overrides, "task.drop_zero_variance=false"))
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
    assert OBJECTIVES["rloo"].build.__module__ == "tunelab.tasks.rloo"
    overrides = [o.replace("task=grpo", "task=rloo") for o in grpo_overrides(tmp_path)]
    OBJECTIVES["rloo"].check(compose_cfg(overrides), METHODS["lora"])
    for bad, reason in (("task.num_generations=1", "at least 2"), ("task.epsilon_low=-1", "0 <= epsilon_low")):
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
