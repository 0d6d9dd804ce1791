"""task=distill: the loss against hand / torch references, both pairings end to end on tiny models (teacher
trained first), a frozen teacher kept out of checkpoints, and mismatched teacher/student refused."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from tunelab.errors import ConfigError
from tunelab.tasks.distill import ClassificationDistillModule, SFTDistillModule, Teacher, soft_target_loss
from tunelab.train import train

from .conftest import tiny_classification_overrides, tiny_overrides


def test_soft_target_loss_equals_hand_value_and_torch_kl():
    student, teacher = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    temperature = 2.0
    p = [math.exp(t / temperature) for t in (0.0, 2.0, 0.0)]
    q = [math.exp(s / temperature) for s in (1.0, 0.0, -1.0)]
    p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
    hand = temperature**2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert soft_target_loss(student, teacher, temperature).item() == pytest.approx(hand, abs=1e-6)

    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 11, generator=generator), torch.randn(6, 11, generator=generator)
    reference = F.kl_div(
        F.log_softmax(student / 3, -1), F.log_softmax(teacher / 3, -1), log_target=True, reduction="batchmean"
    )
    assert soft_target_loss(student, teacher, 3.0).item() == pytest.approx(9 * reference.item(), abs=1e-6)
    assert soft_target_loss(teacher, teacher, 3.0).item() == pytest.approx(0.0, abs=1e-7)


class FixedLogits(torch.nn.Module):
    """A stand-in model whose forward gives the same logits whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


ALPHA, TEMPERATURE = 0.3, 2.0  # alpha != 1 - alpha and T != 1, so swapping the weights or dropping T^2 shows
DISTILL_CFG = {"alpha": ALPHA, "temperature": TEMPERATURE, "generation": {"labels": None}}  # what the modules read


def sft_student(student: torch.Tensor, teacher: torch.Tensor) -> SFTDistillModule:
    cfg = OmegaConf.create(DISTILL_CFG)
    return SFTDistillModule(FixedLogits(student), None, cfg, True, Teacher(FixedLogits(teacher)))


def classification_student(student: torch.Tensor, teacher: torch.Tensor) -> ClassificationDistillModule:
    cfg = OmegaConf.create(DISTILL_CFG)
    return ClassificationDistillModule(FixedLogits(student), cfg, list("abcd"), True, Teacher(FixedLogits(teacher)))


def training_loss(module, labels: torch.Tensor) -> tuple[float, dict[str, float]]:
    """The module's training-step loss on a batch with these labels (the stand-in models ignore the inputs), and
    what it logged."""
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value.item())
    inputs = {"input_ids": torch.zeros(labels.shape, dtype=torch.long), "attention_mask": torch.ones(labels.shape)}
    return module.training_step({**inputs, "labels": labels}, 0).item(), logged


def log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    log_total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_total for v in values]


def hand_distill_parts(rows: list[tuple[list[float], list[float], int]]) -> tuple[float, float]:
    """(CE, T^2 KL) over ``rows`` of (student logits, teacher logits, label), each averaged over the rows, in
    float64 Python arithmetic: ``CE = -log softmax(s)[y]``, ``KL = sum_v p_v (log p_v - log q_v)`` with
    ``p = softmax(teacher / T)`` (the target) and ``q = softmax(student / T)``."""
    ce = kl = 0.0
    for student, teacher, label in rows:
        ce -= log_softmax(student)[label]
        log_p = log_softmax([t / TEMPERATURE for t in teacher])
        log_q = log_softmax([s / TEMPERATURE for s in student])
        kl += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q, strict=True))
    return ce / len(rows), TEMPERATURE**2 * kl / len(rows)


# Token-level (objective=sft): 2 sequences x 5 positions x 4 vocabulary entries; logits[:, t] predicts labels[:, t + 1].
SFT_LABELS = torch.tensor([[-100, -100, 2, 1, 3], [-100, 0, 3, -100, -100]])  # prompt 2 / 1 tokens; row 1 padded
SUPERVISED = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]  # (row, t) with labels[row, t + 1] != -100
MASKED = [(0, 0), (0, 4), (1, 2), (1, 3), (1, 4)]  # predicting a prompt token, padding, or nothing (the last t)


def sft_logits() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return 2 * torch.randn(2, 5, 4, generator=generator), 2 * torch.randn(2, 5, 4, generator=generator)


def test_sft_distillation_loss_equals_the_hand_computed_mix():
    """``alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T)`` of the token-level training step, both terms
    averaged over the supervised response tokens only, equals the value computed element by element here."""
    student, teacher = sft_logits()
    rows = [(student[b, t].tolist(), teacher[b, t].tolist(), int(SFT_LABELS[b, t + 1])) for b, t in SUPERVISED]
    ce, soft = hand_distill_parts(rows)
    loss, logged = training_loss(sft_student(student, teacher), SFT_LABELS)
    assert loss == pytest.approx(ALPHA * ce + (1 - ALPHA) * soft, rel=1e-6)
    assert (logged["train/hard_loss"], logged["train/soft_loss"]) == pytest.approx((ce, soft), rel=1e-6)
    assert logged["train/loss"] == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_sft_distillation_loss_reads_only_supervised_positions(which):
    """Changing the student's (or the teacher's) logits at a position that predicts a prompt token, padding or
    nothing leaves the loss as it is; at a position that predicts a response token it moves it."""
    logits = dict(zip(("student", "teacher"), sft_logits(), strict=True))
    unchanged, _ = training_loss(sft_student(logits["student"], logits["teacher"]), SFT_LABELS)
    for b, t in MASKED + SUPERVISED:
        changed = dict(logits)
        changed[which] = logits[which].clone()
        changed[which][b, t] += torch.tensor([3.0, -2.0, 0.0, 1.0])
        loss, _ = training_loss(sft_student(changed["student"], changed["teacher"]), SFT_LABELS)
        if (b, t) in MASKED:
            assert loss == unchanged, f"{which} logits at masked ({b}, {t}) changed the loss"
        else:
            assert abs(loss - unchanged) > 1e-3, f"{which} logits at supervised ({b}, {t}) did not change the loss"


def test_classification_distillation_loss_equals_the_hand_computed_mix():
    """The per-text pairing: the same mix, CE against the labels and KL over the classes, averaged over texts."""
    generator = torch.Generator().manual_seed(1)
    student, teacher = 2 * torch.randn(3, 4, generator=generator), 2 * torch.randn(3, 4, generator=generator)
    labels = torch.tensor([2, 0, 3])
    ce, soft = hand_distill_parts(list(zip(student.tolist(), teacher.tolist(), labels.tolist(), strict=True)))
    loss, _ = training_loss(classification_student(student, teacher), labels)
    assert loss == pytest.approx(ALPHA * ce + (1 - ALPHA) * soft, rel=1e-6)


@pytest.fixture(scope="module")
def encoder_teacher(labeled_file, tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from .conftest import CONFIGS

    output_dir = tmp_path_factory.mktemp("teacher")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[*tiny_classification_overrides(labeled_file, output_dir), "trainer.max_epochs=3"],
        )
    metrics, _ = train(cfg)
    return metrics


def distill_overrides(labeled_file, output_dir, teacher_metrics, model="tiny_bert") -> list[str]:
    return [
        *tiny_classification_overrides(labeled_file, output_dir, model=model),
        "task=distill",
        f"task.teacher.adapter_path={teacher_metrics['adapter_dir']}",
        "model.keep_layers=[0]",
        "task.alpha=0.3",
        "trainer.max_epochs=3",
    ]


def test_classification_student_learns_from_a_frozen_teacher(encoder_teacher, labeled_file, compose_cfg, tmp_path):
    from tunelab.runs import checkpoint_state

    cfg = compose_cfg(distill_overrides(labeled_file, tmp_path, encoder_teacher))
    metrics, objects = train(cfg)
    module = objects["module"]
    assert objects["model"].config.num_hidden_layers == 1
    assert metrics["val/loss"] < metrics["untrained/val/loss"] - 0.05  # CE rises toward the soft teacher's
    assert metrics["val/acc"] > metrics["untrained/val/acc"] + 0.3
    teacher = module.teacher.model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(not name.startswith("teacher") for name in module.state_dict())
    saved = checkpoint_state(metrics["best_checkpoint"])
    assert set(saved) == set(module.state_dict())  # method=full: the student, whole; no teacher tensors
    with open(tmp_path / "metrics.csv") as handle:
        header = handle.readline()
    assert "train/soft_loss" in header and "train/hard_loss" in header


def test_teacher_is_unchanged_and_not_in_the_student_checkpoint(encoder_teacher, labeled_file, compose_cfg, tmp_path):
    from tunelab.runs import load_export

    cfg = compose_cfg([*distill_overrides(labeled_file, tmp_path, encoder_teacher), "trainer.max_steps=3"])
    _, objects = train(cfg)
    fresh, _, _ = load_export(encoder_teacher["adapter_dir"], str(cfg.paths.cache_dir))
    trained_with = objects["module"].teacher.model.state_dict()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, trained_with[name]), name
    saved = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert saved and not any("teacher" in key for key in saved)


def test_causal_lm_student_with_lora_learns_token_level(alpaca_file, compose_cfg, tmp_path):
    teacher_cfg = compose_cfg(
        [*tiny_overrides(alpaca_file, tmp_path / "teacher"), "method=lora", "trainer.max_epochs=2"]
    )
    teacher_metrics, _ = train(teacher_cfg)
    student_cfg = compose_cfg(
        [
            *tiny_overrides(alpaca_file, tmp_path / "student"),
            "task=distill",
            "task.objective=sft",
            f"task.teacher.adapter_path={teacher_metrics['adapter_dir']}",
            "model.keep_layers=[1]",
            "method=lora",
            "task.generation.num_samples=0",
            "callbacks.model_checkpoint.monitor=val/loss",
            "callbacks.model_checkpoint.mode=min",
            "callbacks.early_stopping.monitor=val/loss",
            "callbacks.early_stopping.mode=min",
            "trainer.max_epochs=2",
        ]
    )
    metrics, objects = train(student_cfg)
    assert metrics["val/loss"] < metrics["untrained/val/loss"] - 0.3
    assert objects["model"].base_model.model.config.num_hidden_layers == 1


def test_tokenizer_mismatch_is_refused(encoder_teacher, labeled_file, compose_cfg, tmp_path):
    cfg = compose_cfg([*distill_overrides(labeled_file, tmp_path, encoder_teacher, model="tiny"), "method=lora"])
    with pytest.raises(ConfigError, match="tokenizers differ"):
        train(cfg)


def test_label_set_mismatch_is_refused(encoder_teacher, labeled_file, compose_cfg, tmp_path):
    cfg = compose_cfg(
        [*distill_overrides(labeled_file, tmp_path, encoder_teacher), "data.labels=[positive,neutral,negative]"]
    )
    with pytest.raises(ConfigError, match="label sets differ"):
        train(cfg)


def test_missing_teacher_fails_at_config_time(compose_cfg, tmp_path):
    from tunelab.config_checks import check_config

    with pytest.raises(ConfigError, match="train a teacher first"):
        check_config(compose_cfg(["task=distill", f"paths.output_dir={tmp_path}"]))
