"""End-to-end SFT on a tiny random Llama: training, checkpoints, adapter export/reload, merge, evaluate."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from tunelab.train import train

from .conftest import tiny_overrides


def logged(output_dir: Path, key: str) -> list[float]:
    with open(output_dir / "metrics.csv") as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]


LORA_RUN_METHOD = ("method=lora", "method.r=4")


@pytest.fixture(scope="module")
def lora_run(alpaca_file, tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from .conftest import CONFIGS

    output_dir = tmp_path_factory.mktemp("lora_run")
    overrides = [
        *tiny_overrides(alpaca_file, output_dir),
        *LORA_RUN_METHOD,
        "trainer.max_epochs=3",
        "export.merged=true",
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    metrics, objects = train(cfg)
    return output_dir, metrics, objects


def test_lora_training_lowers_validation_loss(lora_run):
    output_dir, metrics, _ = lora_run
    assert metrics["val/loss"] < metrics["untrained/val/loss"] - 0.5
    train_losses = logged(output_dir, "train/loss")
    assert sum(train_losses[-5:]) / 5 < sum(train_losses[:5]) / 5
    for key in ("val/bleu", "val/rougeL", "val/ppl", "val/token_acc", "test/loss", "test/rougeL"):
        assert key in metrics, key


def test_run_folder_holds_what_a_paper_table_needs(lora_run):
    output_dir, metrics, _ = lora_run
    info = json.loads((output_dir / "run_info.json").read_text())
    assert info["seed"] == 42 and info["packages"]["torch"].startswith("2.13")
    assert "commit" in info["git"]
    assert info["model"] == {"source": "random_init", "path": None, "revision": None, "resolved_commit": None}
    assert (output_dir / "config.yaml").read_text().count("name: lora") == 1
    assert (output_dir / "checkpoints" / "best.ckpt").exists()
    assert (output_dir / "checkpoints" / "last.ckpt").exists()
    saved = json.loads((output_dir / "metrics.json").read_text())
    assert saved["test/loss"] == pytest.approx(metrics["test/loss"])
    assert saved["data"]["train"]["examples"] == 120 - 32
    assert 0 < saved["perf/step_time_s"] < 60 and saved["perf/peak_mem_mib"] > 100
    assert 0 < saved["perf/first_batch_s"] < saved["perf/first_step_s"]  # start-up, then the first step's compute


def test_lora_checkpoint_holds_only_trainable_tensors(lora_run):
    output_dir, _, objects = lora_run
    state = torch.load(output_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    trainable = {n for n, p in objects["module"].named_parameters() if p.requires_grad}
    assert set(state) == trainable
    assert all("lora_" in name for name in state)


def fresh_tiny_base(cfg):
    from tunelab.models.loading import load_model

    return load_model(cfg.model, cfg.paths.cache_dir).model


def sample_batch(objects):
    batch = next(iter(objects["datamodule"].test_dataloader()[0]))
    return batch["input_ids"], batch["attention_mask"]


def test_adapter_reloads_with_identical_logits(lora_run):
    from omegaconf import OmegaConf
    from peft import PeftModel

    output_dir, _, objects = lora_run
    run_cfg = OmegaConf.load(output_dir / "config.yaml")  # the base model is rebuilt from the run folder alone
    input_ids, attention_mask = sample_batch(objects)
    trained = objects["model"].eval()
    reloaded = PeftModel.from_pretrained(fresh_tiny_base(run_cfg), output_dir / "adapter").eval()
    with torch.no_grad():
        expected = trained(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = reloaded(input_ids=input_ids, attention_mask=attention_mask).logits
        base = fresh_tiny_base(run_cfg)(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(actual, expected)
    assert not torch.allclose(base, expected, atol=1e-3)


def test_merged_export_matches_adapter_logits(lora_run):
    from transformers import AutoModelForCausalLM

    output_dir, _, objects = lora_run
    input_ids, attention_mask = sample_batch(objects)
    merged = AutoModelForCausalLM.from_pretrained(output_dir / "merged").eval()
    with torch.no_grad():
        expected = objects["model"].eval()(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = merged(input_ids=input_ids, attention_mask=attention_mask).logits
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_evaluate_writes_report(lora_run, compose_cfg, tmp_path):
    from tunelab.evaluate import evaluate

    output_dir, metrics, _ = lora_run
    cfg = compose_cfg(
        [
            f"ckpt_path={output_dir / 'checkpoints' / 'best.ckpt'}",
            f"report_dir={tmp_path}",
            "generation.num_samples=4",
            "generation.max_new_tokens=8",
            "report_samples=2",
        ],
        config_name="evaluate",
    )
    result = evaluate(cfg)
    assert result["test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["samples"]) == 4 and report["samples"][0]["reference"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| test/rougeL |" in markdown and markdown.count("**reference:**") == 2


def test_evaluate_from_exported_adapter_matches_checkpoint(lora_run, compose_cfg, tmp_path):
    from tunelab.evaluate import evaluate

    output_dir, metrics, _ = lora_run
    cfg = compose_cfg(
        [f"adapter_path={output_dir / 'adapter'}", f"report_dir={tmp_path}", "generation.num_samples=0"],
        config_name="evaluate",
    )
    assert evaluate(cfg)["test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)


def init_adapter_cfg(compose_cfg, lora_run, alpaca_file, output_dir, *overrides: str, method=LORA_RUN_METHOD):
    """The lora_run's settings (or another ``method``), untrained (``train=false``), its adapter as
    ``init_adapter``."""
    adapter = lora_run[0] / "adapter"
    base = [*tiny_overrides(alpaca_file, output_dir), *method, "train=false"]
    return compose_cfg([*base, f"init_adapter={adapter}", "export.adapter=false", *overrides])


def test_init_adapter_starts_from_the_exported_weights(lora_run, alpaca_file, compose_cfg, tmp_path):
    """``train=false init_adapter=<run>/adapter`` scores the run's best weights: its test loss, not the base's."""
    _, metrics, _ = lora_run
    scored, _ = train(init_adapter_cfg(compose_cfg, lora_run, alpaca_file, tmp_path / "scored"))
    assert scored["test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)
    untouched, _ = train(init_adapter_cfg(compose_cfg, lora_run, alpaca_file, tmp_path / "base", "init_adapter=null"))
    assert untouched["test/loss"] > metrics["test/loss"] + 0.5  # the base model: the check above is not trivial


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (("method=lora", "method.r=8"), "r: export 4, this run 8"),
        ((*LORA_RUN_METHOD, "method.alpha=32"), "lora_alpha: export 16, this run 32"),
        (("method=dora", "method.r=4"), "use_dora: export False, this run True"),
        ((*LORA_RUN_METHOD, "method.init=pissa"), "method.init=pissa initialises the adapter itself"),
        (("method=ia3",), "peft_type: export 'LORA', this run 'IA3'"),
        ((*LORA_RUN_METHOD, "model=tiny_moe"), "the export adapts model=tiny, this run model=tiny_moe"),
        (("method=full",), "method=full is not a peft adapter"),
    ],
)
def test_init_adapter_refuses_an_export_of_another_model_or_method(
    lora_run, alpaca_file, compose_cfg, tmp_path, method, message
):
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        train(init_adapter_cfg(compose_cfg, lora_run, alpaca_file, tmp_path, method=method))


def test_init_adapter_refuses_a_folder_without_a_peft_adapter(lora_run, alpaca_file, compose_cfg, tmp_path):
    from tunelab.errors import ConfigError

    folder = tmp_path / "run" / "adapter"
    folder.mkdir(parents=True)
    with pytest.raises(ConfigError, match="no peft adapter there"):
        train(init_adapter_cfg(compose_cfg, lora_run, alpaca_file, tmp_path, f"init_adapter={folder}"))


def test_full_finetuning_trains_every_weight(alpaca_file, compose_cfg, tmp_path):
    cfg = compose_cfg(
        [
            *tiny_overrides(alpaca_file, tmp_path),
            "method=full",
            "trainer.max_epochs=2",
            "task.optimizer.lr=1e-3",
            "task.generation.num_samples=0",
        ]
    )
    metrics, objects = train(cfg)
    assert metrics["trainable_params"] == metrics["total_params"]
    assert metrics["val/loss"] < metrics["untrained/val/loss"] - 0.5
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
    input_ids, attention_mask = sample_batch(objects)
    with torch.no_grad():
        expected = objects["model"].eval()(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = exported.eval()(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_run_info_records_the_hub_commit_a_model_resolved_to(tmp_path):
    """A Hub model's files come from a snapshot folder named by its commit; run_info.json keeps that commit next to
    the requested revision (built offline: a local Hub cache with one snapshot, loaded by transformers as a run
    would)."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from tunelab.run_info import model_provenance

    commit = "0123456789abcdef0123456789abcdef01234567"
    hub = tmp_path / "hub"
    repo = hub / "models--someorg--tiny"
    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(config).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    AutoModelForCausalLM.from_pretrained("someorg/tiny", revision="main", cache_dir=hub)
    for revision, resolved in (("main", commit), (None, commit), (commit, commit), ("v2", None)):
        model_cfg = OmegaConf.create({"source": "hub", "path": "someorg/tiny", "revision": revision})
        assert model_provenance(model_cfg, hub) == {
            "source": "hub",
            "path": "someorg/tiny",
            "revision": revision,
            "resolved_commit": resolved,
        }
