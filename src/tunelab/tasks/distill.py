"""Knowledge distillation (task=distill): a student learns from labels and from a frozen teacher's soft outputs.

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(Hinton et al., 2015; the T^2 keeps the soft term's gradient scale independent of T). ``task.objective``
picks the pairing: ``classification`` (one KL per text, over the classes) or ``sft`` (token-level: one KL per
supervised response token, over the vocabulary, averaged over those tokens; prompt and padding positions
are left out like in the CE term). Validation and test are the objective's own (the student alone).

The teacher is a trained run's export (``task.teacher.adapter_path``: its ``adapter/`` folder, peft adapter or
full model; its model and method come from that run's ``config.yaml``). It is frozen, in eval mode, runs
under ``no_grad`` in its own dtype (``task.teacher.dtype``) and is not part of the student's checkpoints.
Teacher and student must share the tokenizer (same vocabulary, same ids) and the output space (same label
set / same logit width): a mismatch is a :class:`ConfigError` naming the difference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from tunelab.errors import ConfigError
from tunelab.methods.spec import Method
from tunelab.models.frozen import FrozenModel
from tunelab.models.loading import torch_dtype
from tunelab.tasks.classification import ClassificationModule, classification_datamodule
from tunelab.tasks.objective import OBJECTIVES, BuildContext, Head, LoadRun, Objective
from tunelab.tasks.sft import SFTModule, causal_lm_loss, sft_datamodule

MISSING_TEACHER = "task=distill needs task.teacher.adapter_path=<teacher run>/adapter (train a teacher first)"


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * mean_rows KL(softmax(teacher / T) || softmax(student / T))`` over the last dimension."""
    student_log = F.log_softmax(student.float() / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_row = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)
    return temperature**2 * per_row.mean()


class Teacher(FrozenModel):
    """The distillation teacher: frozen, outside the student's module tree, following its device."""


class Distillation:
    """The teacher and the mixing of hard and soft losses, for a task module whose ``forward`` gives logits."""

    teacher: Teacher
    alpha: float
    temperature: float

    def init_distillation(self, teacher: Teacher, task_cfg: DictConfig) -> None:
        if not 0.0 <= task_cfg.alpha <= 1.0 or task_cfg.temperature <= 0:
            raise ConfigError(f"task.alpha={task_cfg.alpha} must be in [0, 1], task.temperature > 0")
        self.teacher, self.alpha, self.temperature = teacher, float(task_cfg.alpha), float(task_cfg.temperature)

    def mixed_loss(self, hard: torch.Tensor, soft: torch.Tensor, batch_size: int) -> torch.Tensor:
        loss = self.alpha * hard + (1 - self.alpha) * soft
        self.log_dict({"train/hard_loss": hard, "train/soft_loss": soft}, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss


class ClassificationDistillModule(Distillation, ClassificationModule):
    def __init__(
        self,
        model: torch.nn.Module,
        task_cfg: DictConfig,
        labels: list[str],
        trains_all_weights: bool,
        teacher: Teacher,
    ) -> None:
        super().__init__(model, task_cfg, labels, trains_all_weights)
        self.init_distillation(teacher, task_cfg)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        teacher = self.teacher.logits(batch["input_ids"], batch["attention_mask"])
        soft = soft_target_loss(logits, teacher, self.temperature)
        return self.mixed_loss(self.loss(logits, batch["labels"]), soft, batch["labels"].shape[0])


class SFTDistillModule(Distillation, SFTModule):
    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, task_cfg: DictConfig, trains_all_weights: bool, teacher: Teacher
    ) -> None:
        super().__init__(model, tokenizer, task_cfg, trains_all_weights)
        self.init_distillation(teacher, task_cfg)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        teacher = self.teacher.logits(batch["input_ids"], batch["attention_mask"])
        supervised = batch["labels"][:, 1:] != -100
        soft = soft_target_loss(logits[:, :-1][supervised], teacher[:, :-1][supervised], self.temperature)
        hard, _ = causal_lm_loss(logits, batch["labels"])
        return self.mixed_loss(hard, soft, batch["input_ids"].shape[0])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Nothing: distillation logs its per-micro-batch losses in ``mixed_loss`` (no step-level SFT loss)."""


def check_same_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Token ids must mean the same text for both models; the first disagreement is named."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab == student_vocab:
        return
    differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda item: item[1])
    token, index = differing[0]
    raise ConfigError(
        f"task=distill: teacher and student tokenizers differ (vocabularies of {len(teacher_vocab)} and "
        f"{len(student_vocab)} tokens; e.g. {token!r} -> id {index} in only one): distillation compares "
        "outputs token id by token id, so both need the same tokenizer"
    )


def check_same_outputs(teacher: torch.nn.Module, student: torch.nn.Module, head: str) -> None:
    """Same label set (a classification head) or same logit width (a language-model head) in the same order."""
    teacher_cfg, student_cfg = teacher.config, student.config
    if head == "sequence_classification":
        pairs = (teacher_cfg.id2label, student_cfg.id2label)
        what = "label sets"
    else:
        pairs = (teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0])
        what = "vocabulary logit widths"
    if pairs[0] != pairs[1]:
        raise ConfigError(f"task=distill: teacher and student {what} differ: {pairs[0]} vs {pairs[1]}")


def load_teacher(task_cfg: DictConfig, load_run: LoadRun) -> tuple[torch.nn.Module, Any]:
    """The trained teacher (model, tokenizer) from ``task.teacher.adapter_path``, in ``task.teacher.dtype``."""
    adapter_path = task_cfg.teacher.get("adapter_path")
    if not adapter_path:
        raise ConfigError(MISSING_TEACHER)
    model, tokenizer, run_cfg = load_run(str(adapter_path))
    teacher_objective = run_cfg.task.get("objective", run_cfg.task.name)
    if teacher_objective != task_cfg.objective:
        raise ConfigError(
            f"task.teacher.adapter_path={adapter_path} is a task={teacher_objective} run; the student's "
            f"task.objective is {task_cfg.objective}"
        )
    if task_cfg.teacher.get("dtype"):
        model = model.to(torch_dtype(task_cfg.teacher.dtype))
    return model, tokenizer


def load_checked_teacher(context: BuildContext) -> Teacher:
    """The frozen teacher, after checking it speaks the student's vocabulary and outputs."""
    teacher, teacher_tokenizer = load_teacher(context.cfg.task, context.load_run)
    check_same_vocabulary(teacher_tokenizer, context.tokenizer)
    check_same_outputs(teacher, context.model, distill_head(context.cfg)[0])
    return Teacher(teacher)


def classification_student(context: BuildContext, teacher: Teacher) -> tuple[Any, ClassificationDistillModule]:
    datamodule = classification_datamodule(context)
    args = (context.model, context.cfg.task, datamodule.labels, context.method.trains_all_weights)
    return datamodule, ClassificationDistillModule(*args, teacher)


def sft_student(context: BuildContext, teacher: Teacher) -> tuple[Any, SFTDistillModule]:
    args = (context.model, context.tokenizer, context.cfg.task, context.method.trains_all_weights)
    return sft_datamodule(context), SFTDistillModule(*args, teacher)


# task.objective -> the data and distillation module of that student objective
STUDENTS = {"classification": classification_student, "sft": sft_student}


def distill_head(cfg: DictConfig) -> Head:
    """The student trains the head of its ``task.objective``."""
    if cfg.task.objective not in STUDENTS:
        raise ConfigError(f"task.objective={cfg.task.objective!r} is not one of {sorted(STUDENTS)}")
    return OBJECTIVES[cfg.task.objective].head(cfg)


def check_distill(cfg: DictConfig, method: Method) -> None:
    if OmegaConf.is_missing(cfg.task.teacher, "adapter_path"):
        raise ConfigError(MISSING_TEACHER)


def build_distill(context: BuildContext) -> tuple[Any, Any]:
    return STUDENTS[context.cfg.task.objective](context, load_checked_teacher(context))


OBJECTIVES.register(Objective(name="distill", build=build_distill, head=distill_head, check=check_distill))
