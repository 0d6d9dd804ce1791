"""Fail fast on config combinations that cannot work, before any weights load."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from tunelab.errors import ConfigError

ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "mpnet")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true")


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def declared_model_type(model_cfg: DictConfig) -> str | None:
    """The transformers ``model_type`` a model config declares (random_init: in its ``config``)."""
    if model_cfg.source == "random_init":
        return model_cfg.config.get("model_type")
    return model_cfg.get("model_type")


def shards_parameters(trainer_cfg: DictConfig) -> bool:
    """Whether the strategy splits each parameter over ranks: FSDP (all sharding modes but NO_SHARD) or ZeRO-3."""
    strategy = trainer_cfg.strategy
    if isinstance(strategy, DictConfig):
        target = str(strategy.get("_target_", ""))
        if target.endswith("fsdp_strategy"):
            return strategy.get("sharding_strategy", "FULL_SHARD") != "NO_SHARD"
        return target.endswith("deepspeed_strategy") and strategy.get("stage") == 3
    return "fsdp" in str(strategy) or "stage_3" in str(strategy)


def check_method_fits_model(cfg: DictConfig) -> None:
    """Method x model x trainer combinations that cannot work, named in one sentence."""
    from tunelab.methods import SOFT_PROMPT_METHODS, required_sublayers
    from tunelab.methods.inhouse import check_family_supports

    method = cfg.method.name
    if method in SOFT_PROMPT_METHODS and cfg.model.gradient_checkpointing:
        raise ConfigError(
            f"method={method} cannot run with model.gradient_checkpointing=true: its virtual tokens go through "
            "past key values / input embeddings that checkpointing drops; set model.gradient_checkpointing=false"
        )
    model_type = declared_model_type(cfg.model)
    if required_sublayers(cfg.method) and model_type:
        check_family_supports(method, model_type, required_sublayers(cfg.method))
    if cfg.task.name == "classification" and method in ("prompt", "ptuning") and model_type not in ENCODER_MODEL_TYPES:
        raise ConfigError(
            f"method={method} cannot feed task=classification on the decoder model={cfg.model.name}: its head scores "
            "the last non-pad token, which peft's virtual-token inputs hide; use an encoder (model=minilm_l6) or "
            "method=prefix / ptuning_v2 / lora"
        )
    if method == "qlora" and shards_parameters(cfg.trainer) and cfg.method.quant_storage == "uint8":
        raise ConfigError(
            "method=qlora with a sharded strategy (FSDP / ZeRO-3) needs 4-bit weights stored in the float dtype "
            "the shards are flattened in: set method.quant_storage=bfloat16 (or the model dtype)"
        )


TASK_DATA_KINDS = {"reward": "preference", "dpo": "preference", "ppo": "prompts"}
DATA_OF_KIND = {"preference": "data=arith_prefs or data=preference", "prompts": "data=arith_prompts or data=prompts"}


def check_task_fits_data(cfg: DictConfig) -> None:
    """Alignment tasks read their own record kinds: preference pairs (reward, dpo) or prompts (ppo)."""
    needed = TASK_DATA_KINDS.get(cfg.task.name)
    if needed and cfg.data.get("kind") != needed:
        raise ConfigError(
            f"task={cfg.task.name} reads {needed} records, but data={cfg.data.name} holds "
            f"{cfg.data.get('kind') or 'instruction / labeled'} records; use {DATA_OF_KIND[needed]}"
        )
    if cfg.task.name == "dpo":
        from tunelab.tasks.dpo import check_dpo_config

        check_dpo_config(cfg.task, cfg.method.name)
    if cfg.task.name == "ppo":
        from tunelab.tasks.ppo import check_ppo_config

        check_ppo_config(cfg)


def check_packing(cfg: DictConfig) -> None:
    """Packed batches (``data.packing``) rely on position ids alone to keep examples apart."""
    from tunelab.methods import SOFT_PROMPT_METHODS

    if not cfg.data.get("packing"):
        return
    if cfg.task.name != "sft":
        raise ConfigError(f"data.packing=true packs SFT examples; task={cfg.task.name} reads padded batches")
    if cfg.method.name in SOFT_PROMPT_METHODS:
        raise ConfigError(
            f"data.packing=true cannot run method={cfg.method.name}: its virtual tokens (input prefix or past key "
            "values) would be shared by every packed example; use data.packing=false"
        )


def uses_gpu(trainer_cfg: DictConfig) -> bool:
    """Whether the Trainer will run on CUDA: asked for (gpu / cuda), or ``auto`` with a GPU visible."""
    return trainer_cfg.accelerator in ("auto", "gpu", "cuda") and gpu_available()


def strategy_name(strategy: str | DictConfig) -> str:
    """A configured strategy's name in lower case: Lightning's name, or a factory config's ``_target_``."""
    return str(strategy.get("_target_", "") if isinstance(strategy, DictConfig) else strategy).lower()


def resolve_precision(cfg: DictConfig) -> str:
    """``trainer.precision=auto`` made concrete, in place (so the saved config records what ran): bf16-mixed when
    the run uses a GPU with bf16 (Ampere or newer), else 32-true."""
    if cfg.trainer.precision == "auto":
        import torch

        cfg.trainer.precision = "bf16-mixed" if uses_gpu(cfg.trainer) and torch.cuda.is_bf16_supported() else "32-true"
    return cfg.trainer.precision


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


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` with a one-line reason for a combination that cannot run here."""
    from tunelab.methods import METHODS
    from tunelab.models.loading import SOURCES, torch_dtype

    if cfg.method.name not in METHODS:
        raise ConfigError(f"method={cfg.method.name!r} is not one of {sorted(METHODS)}")
    if cfg.model.source not in SOURCES:
        raise ConfigError(f"model.source={cfg.model.source!r} is not one of {list(SOURCES)}")
    torch_dtype(cfg.model.dtype)
    if not cfg.data.get("builder") and not cfg.data.get("path"):
        raise ConfigError(f"data={cfg.data.name} reads a local file: set data.path=/path/to/file.jsonl")
    precision = str(cfg.trainer.precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not one of {list(PRECISIONS)}")
    wants_gpu = cfg.trainer.accelerator in ("gpu", "cuda")
    if wants_gpu and not gpu_available():
        raise ConfigError(
            f"trainer.accelerator={cfg.trainer.accelerator} but no CUDA GPU is visible; use trainer=cpu or trainer=ddp"
        )
    on_cpu = cfg.trainer.accelerator == "cpu" or (cfg.trainer.accelerator == "auto" and not gpu_available())
    if on_cpu and precision.startswith("16-"):
        raise ConfigError(
            f"trainer.precision={precision} needs a GPU (on CPU 16-mixed silently runs bf16 and 16-true gives "
            "NaN losses); use bf16-mixed or 32-true"
        )
    if cfg.ckpt_path is not None and not cfg.train:
        raise ConfigError("ckpt_path resumes training, but train=false; use evaluate.py ckpt_path=... instead")
    check_precision_fits_optimizer(cfg)
    check_method_fits_model(cfg)
    if cfg.task.name == "distill" and OmegaConf.is_missing(cfg.task.teacher, "adapter_path"):
        from tunelab.tasks.distill import MISSING_TEACHER

        raise ConfigError(MISSING_TEACHER)
    check_task_fits_data(cfg)
    check_packing(cfg)
    if cfg.export.merged and not cfg.export.adapter and shards_parameters(cfg.trainer):
        raise ConfigError(
            "export.merged=true under a sharded strategy merges the complete adapter gathered for export: "
            "keep export.adapter=true"
        )
    if cfg.method.name == "full" and cfg.export.merged:
        raise ConfigError("export.merged=true needs an adapter method; method=full already exports the full model")
