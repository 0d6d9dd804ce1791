"""task=reward and task=dpo on a tiny Llama: the module's losses (each DPO loss type) against the tested loss
functions fed with log-probs computed by hand, the three DPO references agreeing, learning on a learnable preference,
the on-disk reference cache, and combinations that cannot work refused at config time."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from tunelab.build import build_components
from tunelab.errors import ConfigError
from tunelab.methods import METHODS
from tunelab.methods.inhouse import adapters_disabled
from tunelab.tasks.dpo import DPOModule
from tunelab.tasks.pairwise import split_pairs
from tunelab.tasks.preference_losses import dpo_loss
from tunelab.train import train

from .conftest import tiny_overrides


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


def reply_positions(tokenizer, batch) -> list[range]:
    """Per row, the positions of the reply tokens, found from the token ids (not from the labels): those after the
    last ``<|im_start|>assistant\\n`` the chat template writes, up to the padding."""
    marker = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    replies = []
    for ids, attention in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True):
        starts = [i + len(marker) for i in range(len(ids)) if ids[i : i + len(marker)] == marker]
        replies.append(range(starts[-1], sum(attention)))
    return replies


def hand_reply_logps(model, batch, replies: list[range]) -> torch.Tensor:
    """Per row, ``sum_r log softmax(logits[r - 1])[input_ids[r]]`` over its reply positions ``r``, in float64:
    the prompt and the padding are left out by position."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    totals = []
    for row, reply in enumerate(replies):
        picked = [torch.log_softmax(logits[row, r - 1].double(), -1)[batch["input_ids"][row, r]] for r in reply]
        totals.append(torch.stack(picked).sum())
    return torch.stack(totals)


def dpo_module(components, cfg, loss_type: str, label_smoothing: float) -> DPOModule:
    """Another DPO module on the components' model, with ``task.loss_type`` / ``task.label_smoothing`` replaced."""
    task_cfg = OmegaConf.merge(cfg.task, {"loss_type": loss_type, "label_smoothing": label_smoothing})
    method = cfg.method.name
    identity = components["module"].reference.identity
    return DPOModule(
        components["model"],
        task_cfg,
        METHODS[method].trains_all_weights,
        METHODS[method].trains_base_in_place,
        identity,
    )


# (task.loss_type, task.label_smoothing): DPO, conservative DPO, IPO, SLiC.
DPO_LOSSES = (("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0))


@pytest.mark.parametrize("reference", ["adapter_disabled", "copy", "precomputed"])
def test_dpo_loss_uses_the_base_model_as_reference(reference, preference_file, compose_cfg, tmp_path):
    """For each loss type, the module's per-pair losses and statistics equal ``dpo_loss`` fed with log-probs
    gathered here by hand: the perturbed policy's and the base model's (LoRA B = 0), summed over the reply tokens,
    per-token means for IPO (as trl). One model serves a module per loss type (sharing the reference cache)."""
    overrides = [*alignment_overrides("dpo", preference_file, tmp_path), f"task.reference={reference}", "task.beta=0.5"]
    cfg = compose_cfg(overrides)
    components = build_components(cfg)
    model = components["model"]
    # made before the perturbation: reference=copy copies the model as it starts
    modules = {loss: dpo_module(components, cfg, *loss) for loss in DPO_LOSSES}
    batch = one_batch(components)
    replies = reply_positions(components["tokenizer"], batch)
    lengths = torch.tensor([len(reply) for reply in replies], dtype=torch.float64)
    with torch.no_grad():
        base_logps = hand_reply_logps(model.eval(), batch, replies)
        perturb_adapter(model)
        policy_logps = hand_reply_logps(model, batch, replies)
        with adapters_disabled(model):
            assert torch.allclose(hand_reply_logps(model, batch, replies), base_logps, atol=1e-5)
    trainer = type("T", (), {"datamodule": components["datamodule"], "global_step": 0, "global_rank": 0})()
    for (loss_type, label_smoothing), module in modules.items():
        if reference == "precomputed":
            module.trainer = trainer
        with torch.no_grad():
            losses, statistics = module.pair_outputs(batch, "val")
        scale = lengths if loss_type == "ipo" else 1.0
        ref_chosen, ref_rejected = split_pairs(base_logps / scale)
        expected, chosen_rewards, _ = dpo_loss(
            *split_pairs(policy_logps / scale),
            ref_chosen,
            ref_rejected,
            beta=0.5,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
        )
        case = f"loss_type={loss_type} label_smoothing={label_smoothing}"
        assert torch.allclose(losses.double(), expected, atol=1e-5), f"{case}: {losses} != {expected}"
        assert statistics["rewards/chosen"].item() == pytest.approx(chosen_rewards.mean().item(), abs=1e-5), case
        ref_accuracy = (ref_chosen > ref_rejected).double().mean().item()
        assert statistics["ref_logps/accuracy"].item() == pytest.approx(ref_accuracy), case


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
    cached = sorted(p.name for p in (tmp_path / "a" / "ref_cache").iterdir() if not p.name.startswith("."))
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
    cfg = compose_cfg([*alignment_overrides("reward", preference_file, tmp_path), "trainer.max_epochs=3"])
    metrics, objects = train(cfg)
    assert metrics["val/rewards/accuracy"] > 0.9 > metrics["untrained/val/rewards/accuracy"] - 0.5
    assert metrics["val/loss"] < metrics["untrained/val/loss"]
    assert metrics["test/rewards/margin"] > 0

    from tunelab.runs import load_export

    batch = one_batch(objects)
    with torch.no_grad():
        scores = objects["module"].eval().scores(batch)
        reloaded, _, _ = load_export(metrics["adapter_dir"], str(cfg.paths.cache_dir))
        again = reloaded.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    assert torch.equal(scores, again), (scores - again).abs().max()  # README: reloads with identical scores


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
