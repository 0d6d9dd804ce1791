"""The greedy-answer metrics of the RL objectives (tunelab.tasks.answers): the standard error against the
textbook formula, exact match against hand-made answers, and the metrics a batch never updated left unlogged."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from omegaconf import OmegaConf

from tunelab.tasks.answers import StandardError, answer_metrics, exact_matches, update_answer_metrics
from tunelab.tasks.base import TaskModule


def test_standard_error_is_the_sample_std_over_root_n_across_batches():
    values = [0.2, 0.0, 1.0, 0.25, 0.0, 0.0, 0.5]
    metric = StandardError()
    metric.update(torch.tensor(values[:3]))
    metric.update(torch.tensor(values[3:]))
    expected = statistics.stdev(values) / math.sqrt(len(values))  # 0.1414...
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6)
    metric.reset()
    metric.update(torch.tensor([0.5]))
    assert math.isnan(metric.compute().item())  # one value has no spread to estimate


def test_exact_match_reads_the_reply_as_the_verifiable_scorer_does():
    records = [{"answer": "17"}, {"answer": 17}, {"answer": "17"}, {"answer": "17"}, {"answer": "-3"}]
    texts = [" 17\n", "17", "<answer> 17 </answer>", "17.", "3"]
    assert exact_matches(texts, records).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert exact_matches(["17"], [{"prompt": "no answer field"}]) is None


def test_metrics_no_batch_updated_are_not_logged(monkeypatch):
    """Prompts without an ``answer`` field have no exact match: the key is absent, not a nan."""
    module = TaskModule(torch.nn.Linear(1, 1), OmegaConf.create({}), trains_all_weights=True)
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log_dict", lambda values, **kwargs: logged.update(values))
    metrics = answer_metrics("completion_length")["test"]
    update_answer_metrics(metrics, torch.tensor([1.0, 0.0, 0.5]), ["a", "b", "c"], [{"prompt": "p"}] * 3)
    metrics["completion_length"].update(torch.tensor([3.0, 4.0, 5.0]))
    module.log_and_reset("test", metrics)
    assert set(logged) == {"test/reward_mean", "test/reward_stderr", "test/completion_length"}
    assert logged["test/reward_mean"] == pytest.approx(0.5)
    assert logged["test/reward_stderr"] == pytest.approx(0.5 / math.sqrt(3), rel=1e-6)
