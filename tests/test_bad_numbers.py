"""Numbers out of range fail before any weights load, in one sentence naming the key, the value and the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunelab.config_checks import check_config
from tunelab.errors import ConfigError

from .conftest import ROOT

# (overrides, the key=value the sentence names, its fix)
REFUSED = [
    (["data.batch_size=0"], "data.batch_size=0", "set data.batch_size=1 or more"),
    (["data.batch_size=-4"], "data.batch_size=-4", "set data.batch_size=1 or more"),
    (["data.eval_batch_size=0"], "data.eval_batch_size=0", "set data.eval_batch_size=1 or more"),
    (["task.optimizer.lr=0"], "task.optimizer.lr=0", "set task.optimizer.lr="),
    (["task.optimizer.lr=-1e-4"], "task.optimizer.lr=-0.0001", "set task.optimizer.lr="),
    (["trainer.max_steps=0"], "trainer.max_steps=0", "set trainer.max_steps=-1 or 1 or more"),
    (["trainer.max_steps=-2"], "trainer.max_steps=-2", "set trainer.max_steps=-1 or 1 or more"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0", "set trainer.max_epochs=1 or more"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0", "accumulate_grad_batches=1"),
    (["trainer.gradient_clip_val=-1.0"], "trainer.gradient_clip_val=-1.0", "set trainer.gradient_clip_val=null"),
    (["data.max_length=0"], "data.max_length=0", "set data.max_length to"),
    (["data.val_size=0"], "data.val_size=0", "set data.val_size="),
    (["data.val_size=0.0"], "data.val_size=0.0", "set data.val_size="),
    (["data.test_size=0"], "data.test_size=0", "or test=false"),
    (["data.train_size=0"], "data.train_size=0", "set data.train_size=null"),
    (["data.val_path=/data/val.jsonl"], "data.test_path=null", "set data.test_path="),
    (["method.r=0"], "method.r=0", "set method.r="),
    (["method.r=-8"], "method.r=-8", "set method.r="),
    (["model=tiny", "data.max_length=2049"], "data.max_length=2049", "set data.max_length=2048 or less"),
    *[
        (["task=dpo", f"task.loss_type={loss}", f"task.beta={beta}"], f"task.beta={beta}", "set task.beta=")
        for loss in ("sigmoid", "ipo", "hinge")
        for beta in (0, -0.1)
    ],
]


@pytest.mark.parametrize(("overrides", "named", "fix"), REFUSED, ids=[" ".join(case[0]) for case in REFUSED])
def test_bad_number_fails_at_config_time_naming_key_value_and_fix(compose_cfg, tmp_path, overrides, named, fix):
    with pytest.raises(ConfigError) as info:
        check_config(compose_cfg([*overrides, f"paths.output_dir={tmp_path}"]))
    message = str(info.value)
    assert message.startswith(named) and fix in message, message
    assert "\n" not in message


ACCEPTED = [
    ["trainer.max_steps=-1"],
    ["trainer.max_steps=1"],
    ["trainer.max_epochs=-1", "trainer.max_steps=10"],
    ["trainer.max_epochs=null"],
    ["trainer.gradient_clip_val=null"],
    ["trainer.gradient_clip_val=0.0"],
    ["data.val_size=0.05", "data.test_size=1"],
    ["data.test_size=0", "test=false"],
    ["data.val_size=0", "train=false"],
    ["data.train_size=null"],
    ["data.val_path=/data/val.jsonl", "data.test_path=/data/test.jsonl"],
    ["model=tiny", "data.max_length=2048"],
    ["method.r=1"],
    ["task=dpo", "task.loss_type=ipo", "task.beta=0.5"],
]


@pytest.mark.parametrize("overrides", ACCEPTED, ids=[" ".join(case) for case in ACCEPTED])
def test_numbers_at_the_edge_of_their_range_pass(compose_cfg, tmp_path, overrides):
    check_config(compose_cfg([*overrides, f"paths.output_dir={tmp_path}"]))


def test_lora_target_that_names_no_module_fails_before_training(compose_cfg, cache_dir):
    from tunelab.methods import apply_method
    from tunelab.models.loading import load_model

    cfg = compose_cfg(["model=tiny", "method.target_modules=[q_proj,qkv_proj,attention.dense]"])
    check_config(cfg)  # names are known only once the model is there
    loaded = load_model(cfg.model, cache_dir)
    with pytest.raises(ConfigError) as info:
        apply_method(loaded.model, cfg.method, loaded.tokenizer)
    message = str(info.value)
    assert message.startswith("method.target_modules names ['qkv_proj', 'attention.dense'], which match no module")
    assert "'k_proj'" in message and "'q_proj'" in message and "'down_proj'" in message


def test_bad_number_is_one_line_from_train_py(tmp_path):
    command = [sys.executable, "train.py", "data.batch_size=0", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last == (
        "error: data.batch_size=0 must be a batch size >= 1 (training examples per micro-batch and device); "
        "set data.batch_size=1 or more"
    )
    assert "Traceback" not in result.stderr
