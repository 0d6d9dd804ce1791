"""task=classification: metrics against scikit-learn on a fixed batch, class weights, end-to-end runs on a
tiny encoder (full) and a tiny decoder (LoRA, last-token pooling), checkpoint / adapter reload, refusals."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from tunelab.errors import ConfigError
from tunelab.tasks.classification import ClassificationModule, class_weights
from tunelab.train import train

from .conftest import tiny_classification_overrides

LABELS = ["negative", "neutral", "positive"]


class FixedLogits(torch.nn.Module):
    """A stand-in model returning given logits: row i of ``input_ids`` (a single id) picks logits[i]."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(logits)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def fixed_module(logits: torch.Tensor, weights=None) -> ClassificationModule:
    task_cfg = OmegaConf.create({"class_weights": weights, "optimizer": {}, "scheduler": {}})
    return ClassificationModule(FixedLogits(logits), task_cfg, LABELS, trains_all_weights=True)


def test_metrics_equal_sklearn_on_a_fixed_batch():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 3, generator=generator)
    targets = torch.randint(0, 3, (40,), generator=generator)
    module = fixed_module(logits)
    for rows in (slice(0, 16), slice(16, 40)):  # two batches: states must accumulate
        ids = torch.arange(40)[rows, None]
        module._eval_step("val", {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": targets[rows]})
    computed = module.stage_metrics["val"].compute()
    predicted = logits.argmax(-1).numpy()
    assert computed["acc"].item() == pytest.approx(accuracy_score(targets, predicted), abs=1e-6)
    assert computed["macro_f1"].item() == pytest.approx(f1_score(targets, predicted, average="macro"), abs=1e-6)
    expected_class_f1 = f1_score(targets, predicted, average=None)
    assert computed["class_f1"].tolist() == pytest.approx(expected_class_f1.tolist(), abs=1e-6)
    assert computed["confusion"].tolist() == confusion_matrix(targets, predicted).tolist()
    assert module.stage_loss["val"].compute().item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, targets).item(), abs=1e-6
    )


def test_balanced_class_weights_equal_sklearn_and_weight_the_loss():
    import numpy as np
    from sklearn.utils.class_weight import compute_class_weight

    counts = [50, 30, 20]
    labels = np.repeat([0, 1, 2], counts)
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=labels)
    weights = class_weights("balanced", counts)
    assert weights.tolist() == pytest.approx(expected.tolist(), abs=1e-6)

    logits, targets = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), torch.tensor([0, 2])
    module = fixed_module(logits)
    module.class_weight.copy_(weights)
    per_example = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    hand = (weights[targets] * per_example).sum() / weights[targets].sum()
    assert module.loss(logits, targets).item() == pytest.approx(hand.item(), abs=1e-6)
    assert class_weights([1, 2, 3], counts).tolist() == [1.0, 2.0, 3.0]
    assert class_weights(None, counts) is None
    with pytest.raises(ConfigError, match="class_weights"):
        class_weights([1, 2], counts)


@pytest.fixture(scope="module")
def encoder_run(labeled_file, tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from .conftest import CONFIGS

    output_dir = tmp_path_factory.mktemp("encoder_run")
    overrides = [*tiny_classification_overrides(labeled_file, output_dir), "trainer.max_epochs=3"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    metrics, objects = train(cfg)
    return output_dir, metrics, objects


def test_encoder_classification_learns(encoder_run):
    output_dir, metrics, _ = encoder_run
    assert metrics["val/loss"] < metrics["untrained/val/loss"] - 0.2
    assert metrics["val/acc"] > metrics["untrained/val/acc"] + 0.3
    assert metrics["test/macro_f1"] > 0.6
    for label in LABELS:
        assert f"test/f1_{label}" in metrics
    confusion = metrics["test/confusion_matrix"]
    assert sum(map(sum, confusion)) == metrics["data"]["test"]["examples"] == 30
    assert [sum(row) for row in confusion] == metrics["data"]["test"]["per_label"]
    saved = json.loads((output_dir / "metrics.json").read_text())
    assert saved["labels"] == LABELS and saved["test/confusion_matrix"] == confusion


def test_checkpoint_reload_gives_identical_logits(encoder_run):
    from tunelab.runs import checkpoint_state

    _, metrics, objects = encoder_run
    module = objects["module"]
    batch = next(iter(objects["datamodule"].test_dataloader()[0]))
    module.eval()
    with torch.no_grad():
        expected = module(batch["input_ids"], batch["attention_mask"])
        for param in module.parameters():
            param.add_(0.1)
        module.load_state_dict(checkpoint_state(metrics["best_checkpoint"]), strict=module.strict_loading)
        torch.testing.assert_close(module(batch["input_ids"], batch["attention_mask"]), expected, atol=0, rtol=0)


def test_evaluate_reproduces_test_metrics_and_confusion(encoder_run, compose_cfg, tmp_path):
    from tunelab.evaluate import evaluate

    _, metrics, _ = encoder_run
    cfg = compose_cfg([f"ckpt_path={metrics['best_checkpoint']}", f"report_dir={tmp_path}"], config_name="evaluate")
    result = evaluate(cfg)
    assert result["test/macro_f1"] == pytest.approx(metrics["test/macro_f1"], abs=1e-6)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["test/confusion_matrix"] == metrics["test/confusion_matrix"]


def test_decoder_lora_classification_learns_and_adapter_reloads(labeled_file, compose_cfg, tmp_path):
    from tunelab.evaluate import evaluate

    overrides = [*tiny_classification_overrides(labeled_file, tmp_path / "run", model="tiny"), "method=lora"]
    cfg = compose_cfg([*overrides, "trainer.max_epochs=3", "method.r=4"])
    metrics, objects = train(cfg)
    assert type(objects["model"].base_model.model).__name__ == "LlamaForSequenceClassification"
    assert metrics["val/loss"] < metrics["untrained/val/loss"] - 0.2
    head = [n for n, p in objects["model"].named_parameters() if p.requires_grad and "score" in n]
    assert head, "the new classification head must train next to the adapter"
    eval_cfg = compose_cfg(
        [f"adapter_path={metrics['adapter_dir']}", f"report_dir={tmp_path / 'eval'}"], config_name="evaluate"
    )
    assert evaluate(eval_cfg)["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit", "adapter", "prompt", "prefix", "unipelt"])
def test_every_applicable_method_trains_the_head_and_the_method(method, labeled_file, compose_cfg, tmp_path):
    import lightning.pytorch as pl

    from tunelab.build import build_components

    overrides = [*tiny_classification_overrides(labeled_file, tmp_path), f"method={method}"]
    cfg = compose_cfg(
        [*overrides, "trainer.max_steps=3", "validate_before_training=false", "test=false", "export.adapter=false"]
    )
    _, objects = train(cfg)
    pl.seed_everything(cfg.seed)
    untrained = dict(build_components(cfg)["model"].named_parameters())
    changed = {n for n, p in objects["model"].named_parameters() if not torch.equal(p, untrained[n])}
    trainable = {n for n, p in objects["model"].named_parameters() if p.requires_grad}
    assert changed <= trainable, f"{method}: frozen tensors changed: {sorted(changed - trainable)[:3]}"
    assert any("classifier" in n for n in changed), f"{method}: the head did not train"
    assert any("classifier" not in n for n in changed), f"{method}: only the head trained"


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["model=tiny", "method=prompt"], "last non-pad token"),
        (["model=tiny", "method=ptuning"], "last non-pad token"),
        (["model=tiny_bert", "method=mam"], "mam"),
    ],
)
def test_combinations_that_cannot_work_fail_at_config_time(overrides, words, labeled_file, compose_cfg, tmp_path):
    from tunelab.config_checks import check_config

    cfg = compose_cfg([*tiny_classification_overrides(labeled_file, tmp_path), *overrides])
    with pytest.raises(ConfigError, match=words):
        check_config(cfg)


def test_classification_needs_a_label_set(compose_cfg, tmp_path):
    from tunelab.tasks import OBJECTIVES

    cfg = compose_cfg(["task=classification", "data=hpo_qa", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data\.labels"):
        OBJECTIVES[cfg.task.name].head(cfg)
