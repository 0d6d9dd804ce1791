"""task=reward and task=dpo on a tiny Llama: the module's losses against the tested loss functions fed with
independently computed log-probs, the three DPO references agreeing, learning on a learnable preference,
the on-disk reference cache, and combinations that cannot work refused at config time."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.methods.inhouse import adapters_disabled
from tunelab.tasks.dpo import reply_logps
from tunelab.tasks.pairwise import split_pairs
from tunelab.tasks.preference_losses import dpo_loss
from tunelab.train import build_components, train

from .conftest import tiny_overrides


def synthetic_preferences(count: int) -> list[dict[str, str]]:
    """Chosen and rejected state the sum and differ only in the final mark ("." over "!"): a preference a tiny
    model learns in a few steps and a random one does not hold."""
    return [
        {"prompt": f"What is {a} plus {b}?", "chosen": f"It is {a + b}.", "rejected": f"It is {a + b}!"}
        for a, b in ((i % 13, (7 * i) % 11) for i in range(count))
    ]


@pytest.fixture(scope="module")
def preference_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in synthetic_preferences(96)))
    return path


def alignment_overrides(task: str, preference_file, output_dir) -> list[str]:
    shared = [o for o in tiny_overrides(preference_file, output_dir) if not o.startswith(("data=", "task.generation"))]
    return [
        *shared,
        f"task={task}",
        "data=preference",
        f"data.path={preference_file}",
        "data.val_size=16",
        "data.test_size=16",
        "data.max_length=48",
        "method=lora",
        "method.r=8",
        *([f"task.reference_cache_dir={output_dir}/ref_cache"] if task == "dpo" else []),
    ]


def one_batch(components):
    datamodule = components["datamodule"]
    datamodule.setup("fit")
    return next(iter(datamodule.ordered_loader("val")))


def perturb_adapter(model):
    """Give LoRA's B matrices values, so policy and base model differ."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("reference", ["adapter_disabled", "copy", "precomputed"])
def test_dpo_loss_uses_the_base_model_as_reference(reference, preference_file, compose_cfg, tmp_path):
    overrides = [*alignment_overrides("dpo", preference_file, tmp_path), f"task.reference={reference}", "task.beta=0.5"]
    components = build_components(compose_cfg(overrides))
    module, model = components["module"], components["model"]
    batch = one_batch(components)
    base_logps = reply_logps(model.eval(), batch, average=False).detach()  # LoRA B = 0: the base model
    perturb_adapter(model)
    with torch.no_grad():
        policy_logps = reply_logps(model, batch, average=False)
        with adapters_disabled(model):
            assert torch.allclose(reply_logps(model, batch, average=False), base_logps, atol=1e-5)
    if reference == "precomputed":
        module.trainer = type("T", (), {"datamodule": components["datamodule"], "global_step": 0, "global_rank": 0})()
    with torch.no_grad():
        losses, statistics = module.pair_outputs(batch, "val")
    expected, chosen_rewards, _ = dpo_loss(
        *split_pairs(policy_logps), *split_pairs(base_logps), beta=0.5, loss_type="sigmoid"
    )
    assert torch.allclose(losses, expected, atol=1e-5)
    assert statistics["rewards/chosen"].item() == pytest.approx(chosen_rewards.mean().item(), abs=1e-5)
    chosen, rejected = split_pairs(base_logps)
    assert statistics["ref_logps/accuracy"].item() == pytest.approx((chosen > rejected).float().mean().item())


def test_dpo_learns_the_preference_and_reuses_the_reference_cache(preference_file, compose_cfg, tmp_path):
    overrides = [
        *alignment_overrides("dpo", preference_file, tmp_path / "a"),
        "task.reference=precomputed",
        "task.optimizer.lr=3e-3",
        "trainer.max_epochs=2",
    ]
    metrics, _ = train(compose_cfg(overrides))
    assert metrics["untrained/val/loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at start
    assert metrics["val/loss"] < math.log(2) - 0.05
    assert metrics["val/rewards/accuracy"] > 0.9 and metrics["val/rewards/margin"] > 0
    assert metrics["test/logps/accuracy"] > metrics["test/ref_logps/accuracy"]
    cached = sorted(p.name for p in (tmp_path / "a" / "ref_cache").iterdir())
    assert [name.split("-")[0] for name in cached] == ["test", "train", "val"]

    again = [*overrides[:-1], "trainer.max_steps=2", f"paths.output_dir={tmp_path / 'b'}"]
    cfg = compose_cfg([*again, f"task.reference_cache_dir={tmp_path / 'a' / 'ref_cache'}"])
    from tunelab.tasks import dpo

    def refuse(*args, **kwargs):
        raise AssertionError("the cached reference log-probs were computed again")

    original = dpo.DPOModule._compute_table
    dpo.DPOModule._compute_table = refuse
    try:
        rerun, _ = train(cfg)
    finally:
        dpo.DPOModule._compute_table = original
    assert rerun["untrained/val/loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_reward_model_learns_and_reloads(preference_file, compose_cfg, tmp_path):
    overrides = [*alignment_overrides("reward", preference_file, tmp_path), "trainer.max_epochs=3"]
    metrics, objects = train(compose_cfg(overrides))
    assert metrics["val/rewards/accuracy"] > 0.9 > metrics["untrained/val/rewards/accuracy"] - 0.5
    assert metrics["val/loss"] < metrics["untrained/val/loss"]
    assert metrics["test/rewards/margin"] > 0

    from tunelab.evaluate import load_adapter, locate_run

    batch = one_batch(objects)
    with torch.no_grad():
        scores = objects["module"].eval().scores(batch)
        _, run_cfg = locate_run(compose_cfg([f"adapter_path={metrics['adapter_dir']}"], config_name="evaluate"))
        reloaded, _ = load_adapter(run_cfg, tmp_path / "adapter", str(run_cfg.paths.cache_dir))
        again = reloaded.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    assert torch.allclose(scores, again, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["task=dpo", "data=hpo_qa"], "task=dpo reads preference records"),
        (["task=reward", "data=alpaca", "data.path=x.jsonl"], "task=reward reads preference records"),
        (["task=dpo", "method=full"], "method=full trains the model.s own weights"),
        (["task=dpo", "method=bitfit"], "method=bitfit trains the model.s own weights"),
        (["task=dpo", "task.reference=cached"], "is not one of"),
        (["task=dpo", "task.loss_type=ipo", "task.label_smoothing=0.1"], "loss_type=sigmoid only"),
    ],
)
def test_combinations_that_cannot_work_fail_at_config_time(overrides, words, compose_cfg):
    from tunelab.config_checks import check_config

    with pytest.raises(ConfigError, match=words):
        check_config(compose_cfg(overrides))


def test_label_smoothing_is_refused_outside_sigmoid(preference_file, compose_cfg, tmp_path):
    overrides = [
        *alignment_overrides("dpo", preference_file, tmp_path),
        "task.loss_type=ipo",
        "task.label_smoothing=0.1",
    ]
    with pytest.raises(ConfigError, match="loss_type=sigmoid only"):
        build_components(compose_cfg(overrides))
