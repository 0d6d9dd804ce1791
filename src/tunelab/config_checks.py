"""Fail fast on config combinations that cannot work, before any weights load.

The checks shared by every axis live here; each method and objective adds its own (its entry's ``check``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from tunelab import trainer_config
from tunelab.checkpoints import check_checkpoint_file
from tunelab.errors import ConfigError
from tunelab.methods import METHODS
from tunelab.methods.inhouse import check_family_supports
from tunelab.methods.spec import Method
from tunelab.models.loading import SOURCES, declared_model_type, torch_dtype
from tunelab.registry import load_plugins
from tunelab.tasks import OBJECTIVES
from tunelab.tasks.objective import Objective, check_data_kind
from tunelab.trainer_config import PRECISIONS, strategy_name


def is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_count(value: Any) -> bool:
    """A whole number >= 1."""
    return is_whole(value) and value >= 1


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_fraction(value: Any) -> bool:
    """A float in (0, 1): a share of the examples (``data.*_size``)."""
    return isinstance(value, float) and 0 < value < 1


class Bound(NamedTuple):
    """The valid values of one numeric knob: its dotted ``key``, ``valid(value)``, what a valid value is, the fix."""

    key: str
    valid: Callable[[Any], bool]
    expected: str
    fix: str


BOUNDS = (
    Bound(
        "data.batch_size",
        is_count,
        "a batch size >= 1 (training examples per micro-batch and device)",
        "set data.batch_size=1 or more",
    ),
    Bound(
        "data.eval_batch_size",
        is_count,
        "a batch size >= 1 (validation / test examples per batch and device)",
        "set data.eval_batch_size=1 or more",
    ),
    Bound(
        "data.max_length",
        is_count,
        "a token count >= 1 (tokens per example)",
        "set data.max_length to the tokens an example may take, e.g. 512",
    ),
    Bound(
        "task.optimizer.lr",
        lambda v: is_number(v) and v > 0,
        "a learning rate > 0 (at 0 nothing trains)",
        "set task.optimizer.lr=1e-4, for example",
    ),
    Bound(
        "trainer.max_steps",
        lambda v: is_whole(v) and (v == -1 or v >= 1),
        "-1 (train for trainer.max_epochs) or an optimizer step count >= 1",
        "set trainer.max_steps=-1 or 1 or more",
    ),
    Bound(
        "trainer.max_epochs",
        lambda v: v is None or (is_whole(v) and (v == -1 or v >= 1)),
        "an epoch count >= 1 (or -1: until trainer.max_steps)",
        "set trainer.max_epochs=1 or more",
    ),
    Bound(
        "trainer.accumulate_grad_batches",
        is_count,
        "a count >= 1 (micro-batches per optimizer step)",
        "set trainer.accumulate_grad_batches=1 (no accumulation) or more",
    ),
    Bound(
        "trainer.gradient_clip_val",
        lambda v: v is None or (is_number(v) and v >= 0),
        "null (no clipping) or a gradient norm >= 0",
        "set trainer.gradient_clip_val=null to switch clipping off, or a norm such as 1.0",
    ),
    Bound(
        "trainer.strategy.timeout_s",
        lambda v: is_number(v) and v > 0,
        "a time > 0 in seconds (how long a collective waits for the other ranks; at 0 every one times out)",
        "set trainer.strategy.timeout_s=1800 (the default), for example",
    ),
)
ABSENT = object()


def check_numbers(cfg: DictConfig) -> None:
    """Every knob of :data:`BOUNDS` the config holds is in range; else one sentence names the key, the value and
    the fix (a knob a data config lacks, e.g. ``max_length`` of prompt data, is not checked)."""
    for bound in BOUNDS:
        value = OmegaConf.select(cfg, bound.key, default=ABSENT)
        if value is not ABSENT and not bound.valid(value):
            raise ConfigError(f"{bound.key}={value} must be {bound.expected}; {bound.fix}")


def check_splits(cfg: DictConfig) -> None:
    """Each split the run reads holds examples: train and validation (which picks the best checkpoint) when
    ``train=true``, test when ``test=true``; an empty one fails only once it is reached (a fit that trains
    nothing, an IndexError after training). Validation and test are cut from ``data.path`` by ``data.val_size`` /
    ``data.test_size`` (a count >= 1 or a fraction in (0, 1)) unless ``data.val_path`` or ``data.test_path`` is
    given: then each is read from its own file (:func:`tunelab.data.datamodule.seeded_split`)."""
    data = cfg.data
    train_size = data.get("train_size")
    if cfg.train and not (train_size is None or is_count(train_size) or is_fraction(train_size)):
        raise ConfigError(
            f"data.train_size={train_size} must be null (all the rest), a count >= 1 or a fraction in (0, 1) (0 "
            "leaves nothing to train on); set data.train_size=null"
        )
    explicit = data.get("val_path") or data.get("test_path")
    for split, name, used, otherwise in (
        ("val", "validation", cfg.train, ""),
        ("test", "test", cfg.test, ", or test=false"),
    ):
        size = data.get(f"{split}_size")
        if used and explicit and not data.get(f"{split}_path"):
            raise ConfigError(
                f"data.{split}_path=null leaves the {name} split empty: with data.val_path or data.test_path given, "
                f"no split is cut from data.path; set data.{split}_path=/path/to/{split}.jsonl{otherwise}"
            )
        if used and not explicit and not (is_count(size) or is_fraction(size)):
            raise ConfigError(
                f"data.{split}_size={size} must be a count >= 1 or a fraction in (0, 1) of data.path's examples "
                f"(0 leaves the {name} split empty); set data.{split}_size=16, for example{otherwise}"
            )


def check_length_fits_positions(cfg: DictConfig) -> None:
    """``data.max_length`` within the position limit the model config declares (``model.config`` of
    ``source=random_init``): beyond it, learned position embeddings index out of range and rotary ones run past
    the context the model is built for."""
    limit = OmegaConf.select(cfg, "model.config.max_position_embeddings")
    length = cfg.data.get("max_length")
    if limit is not None and length is not None and length > limit:
        raise ConfigError(
            f"data.max_length={length} is beyond model={cfg.model.name}'s position limit "
            f"(model.config.max_position_embeddings={limit}); set data.max_length={limit} or less"
        )


def check_method_fits_model(cfg: DictConfig, method: Method, head: str) -> None:
    """Method x model x trainer combinations that cannot work, named in one sentence."""
    if method.virtual_tokens and cfg.model.gradient_checkpointing:
        raise ConfigError(
            f"method={method.name} cannot run with model.gradient_checkpointing=true: its virtual tokens go through "
            "past key values / input embeddings that checkpointing drops; set model.gradient_checkpointing=false"
        )
    model_type = declared_model_type(cfg.model)
    if method.sublayers(cfg.method) and model_type:
        check_family_supports(method.name, model_type, method.sublayers(cfg.method))
    method.check(cfg, head)


def check_packing(cfg: DictConfig, objective: Objective, method: Method) -> None:
    """Packed batches (``data.packing``) rely on position ids alone to keep examples apart."""
    if not cfg.data.get("packing"):
        return
    if not objective.packs:
        raise ConfigError(f"data.packing=true packs SFT examples; task={objective.name} reads padded batches")
    if method.virtual_tokens:
        raise ConfigError(
            f"data.packing=true cannot run method={method.name}: its virtual tokens (input prefix or past key "
            "values) would be shared by every packed example; use data.packing=false"
        )


def check_precision_fits_optimizer(cfg: DictConfig) -> None:
    """16-mixed scales the loss; Lightning's AMP and FSDP plugins (2.6) skip unscaling for a fused optimizer, which
    unscales inside its step, so gradient clipping would see scaled gradients (DeepSpeed scales and clips itself)."""
    clips = cfg.trainer.get("gradient_clip_val") or 0
    fused = cfg.task.get("optimizer", {}).get("fused")
    if (
        str(cfg.trainer.precision) == "16-mixed"
        and fused
        and clips > 0
        and "deepspeed" not in strategy_name(cfg.trainer.strategy)
    ):
        raise ConfigError(
            "trainer.precision=16-mixed cannot clip gradients (trainer.gradient_clip_val) with the fused AdamW "
            "kernel, which unscales inside its step; set task.optimizer.fused=false, trainer.gradient_clip_val=null "
            "or trainer.precision=bf16-mixed"
        )


def check_devices_fit_accelerator(trainer_cfg: DictConfig) -> None:
    """``trainer.accelerator=auto`` on a machine without CUDA falls back to CPU, where ``trainer.devices=N`` means N
    processes: a GPU command (``trainer=ddp trainer.devices=8``) typed on a login node would start N gloo
    processes instead of failing. CPU processes are run only when asked for by name (``trainer.accelerator=cpu``)."""
    devices, nodes = trainer_cfg.devices, trainer_cfg.get("num_nodes", 1)
    many = (isinstance(devices, int) and devices > 1) or nodes > 1
    if trainer_cfg.accelerator == "auto" and many and trainer_config.runs_on_cpu("auto"):
        raise ConfigError(
            f"trainer.devices={devices} trainer.num_nodes={nodes} asks for several devices "
            "but no CUDA GPU is visible, so they would be CPU processes; add trainer.accelerator=cpu to mean that, "
            "or run on a GPU machine"
        )


def check_export(cfg: DictConfig, method: Method) -> None:
    if cfg.export.merged and not cfg.export.adapter and trainer_config.shards_parameters(cfg.trainer):
        raise ConfigError(
            "export.merged=true under a sharded strategy merges the complete adapter gathered for export: "
            "keep export.adapter=true"
        )
    if method.trains_all_weights and cfg.export.merged:
        raise ConfigError(
            f"export.merged=true needs an adapter method; method={method.name} already exports the full model"
        )


def check_trainer(cfg: DictConfig) -> None:
    precision = str(cfg.trainer.precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not one of {list(PRECISIONS)}")
    wants_gpu = cfg.trainer.accelerator in ("gpu", "cuda")
    if wants_gpu and not trainer_config.gpu_available():
        raise ConfigError(
            f"trainer.accelerator={cfg.trainer.accelerator} but no CUDA GPU is visible; use trainer=cpu, or "
            "trainer.accelerator=cpu for CPU processes"
        )
    check_devices_fit_accelerator(cfg.trainer)
    if trainer_config.runs_on_cpu(cfg.trainer.accelerator) and precision.startswith("16-"):
        raise ConfigError(
            f"trainer.precision={precision} needs a GPU (on CPU 16-mixed silently runs bf16 and 16-true gives "
            "NaN losses); use bf16-mixed or 32-true"
        )
    check_precision_fits_optimizer(cfg)


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` with a one-line reason for a combination that cannot run here (after importing
    the config's ``plugins``, whose entries it checks like the built-in ones)."""
    load_plugins(cfg.get("plugins") or ())
    method, objective = METHODS[cfg.method.name], OBJECTIVES[cfg.task.name]
    SOURCES[cfg.model.source]
    torch_dtype(cfg.model.dtype)
    if not cfg.data.get("builder") and not cfg.data.get("path"):
        raise ConfigError(f"data={cfg.data.name} reads a local file: set data.path=/path/to/file.jsonl")
    check_numbers(cfg)
    check_splits(cfg)
    check_length_fits_positions(cfg)
    check_trainer(cfg)
    if cfg.ckpt_path is not None and not cfg.train:
        raise ConfigError("ckpt_path resumes training, but train=false; use evaluate.py ckpt_path=... instead")
    if cfg.ckpt_path is not None:
        check_checkpoint_file(cfg.ckpt_path)
    head, _ = objective.head(cfg)
    check_method_fits_model(cfg, method, head)
    check_data_kind(cfg, objective)
    objective.check(cfg, method)
    check_packing(cfg, objective, method)
    check_export(cfg, method)
