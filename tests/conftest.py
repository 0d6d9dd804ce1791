"""Shared fixtures: a persistent asset cache, small synthetic instruction and preference files, config composition."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
os.environ.setdefault("TUNELAB_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("WANDB_MODE", "disabled")
# The suite downloads and installs nothing: what a test needs comes from scripts/setup.sh. Subprocesses inherit
# these (Hub libraries offline, pip without an index); this process also refuses sockets beyond loopback.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PIP_NO_INDEX": "1"}
os.environ.update(OFFLINE)
# pytest-xdist runs the suite as one worker per core (pyproject's addopts: -n 2): each worker, and every process a
# test starts, computes on one thread, so the workers do not fight over the cores with spinning OpenMP threads.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
LOOPBACK = ("127.", "::1", "localhost", "0.0.0.0")
_connect = socket.socket.connect


def loopback_only_connect(sock: socket.socket, address) -> None:
    """``socket.connect`` for loopback and Unix-socket addresses; anything else is a test reaching the network."""
    host = address[0] if isinstance(address, tuple) else None
    if host is not None and not str(host).startswith(LOOPBACK):
        raise RuntimeError(f"a test tried to reach {address}: the suite runs offline (put downloads in setup.sh)")
    _connect(sock, address)


socket.socket.connect = loopback_only_connect


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ["TUNELAB_CACHE"])


@pytest.fixture(scope="session")
def tokenizer(cache_dir: Path):
    """The SmolLM2 tokenizer (with its chat template), built into the cache from the packaged GGUF."""
    from transformers import AutoTokenizer

    from tunelab.assets.smollm2 import ensure_smollm2_tokenizer

    return AutoTokenizer.from_pretrained(ensure_smollm2_tokenizer(cache_dir))


def synthetic_pairs(count: int) -> list[dict[str, str]]:
    """Arithmetic questions with short exact answers: easy for a tiny model to start learning."""
    return [
        {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
        for a, b in ((i % 13, (7 * i) % 11) for i in range(count))
    ]


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "arith.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in synthetic_pairs(120)))
    return path


SENTIMENT_WORDS = {
    "negative": ["loss", "fall", "drop", "miss", "slump"],
    "neutral": ["report", "meeting", "schedule", "filing", "update"],
    "positive": ["gain", "rise", "surge", "beat", "profit"],
}


def synthetic_sentiment(count: int) -> list[dict[str, str]]:
    """Short texts whose label is carried by two cue words: learnable by a tiny model in a few steps."""
    labels = list(SENTIMENT_WORDS)
    rows = []
    for i in range(count):
        label = labels[i % 3]
        words = SENTIMENT_WORDS[label]
        rows.append({"text": f"item {i}: {words[i % 5]} and {words[(i // 3) % 5]}", "label": label})
    return rows


@pytest.fixture(scope="session")
def labeled_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sentiment.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in synthetic_sentiment(240)))
    return path


def tiny_classification_overrides(labeled_file: Path, output_dir: Path, model: str = "tiny_bert") -> list[str]:
    """task=classification on a tiny random model and the synthetic sentiment file; seconds per run."""
    return [
        "task=classification",
        f"model={model}",
        "data.builder=null",
        f"data.path={labeled_file}",
        f"paths.output_dir={output_dir}",
        "data.val_size=30",
        "data.test_size=30",
        "data.batch_size=8",
        "data.max_length=32",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "task.optimizer.lr=1e-3",
    ]


def tiny_overrides(alpaca_file: Path, output_dir: Path) -> list[str]:
    """A tiny random Llama on the synthetic file; seconds per run on CPU."""
    return [
        "model=tiny",
        "data=alpaca",
        f"data.path={alpaca_file}",
        f"paths.output_dir={output_dir}",
        "data.val_size=16",
        "data.test_size=16",
        "data.max_length=64",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "task.optimizer.lr=3e-3",
        "task.generation.num_samples=4",
        "task.generation.max_new_tokens=8",
    ]


def synthetic_preferences(count: int) -> list[dict[str, str]]:
    """Chosen and rejected state the sum and differ only in the final mark ("." over "!"): a preference a tiny
    model learns in a few steps and a random one does not hold."""
    return [
        {"prompt": f"What is {a} plus {b}?", "chosen": f"It is {a + b}.", "rejected": f"It is {a + b}!"}
        for a, b in ((i % 13, (7 * i) % 11) for i in range(count))
    ]


@pytest.fixture(scope="module")
def preference_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in synthetic_preferences(96)))
    return path


def run_distributed(
    alpaca_file: Path, output_dir: Path, trainer: str, *overrides: str, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``train.py trainer=<trainer>`` on 2 CPU processes with the tiny overrides (:func:`launch_distributed`)."""
    tiny = [o for o in tiny_overrides(alpaca_file, output_dir) if not o.startswith(("trainer.devices", "trainer.acc"))]
    return launch_distributed(output_dir, trainer, [*tiny, *overrides], timeout=timeout)


def launch_distributed(
    output_dir: Path, trainer: str, overrides: list[str], *, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``train.py trainer=<trainer> <overrides>`` on 2 CPU processes (gloo), as a subprocess (``env`` added to its
    environment): inside pytest, Lightning's launcher would re-run the pytest command for rank 1. DeepSpeed's
    JIT-built CPU op is cached under the asset cache."""
    command = [
        sys.executable,
        "train.py",
        f"trainer={trainer}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        f"hydra.run.dir={output_dir}",
        *overrides,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(Path(os.environ["TUNELAB_CACHE"]) / "torch_extensions"),
        **(env or {}),
    }
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    def _compose(overrides: list[str], config_name: str = "train") -> DictConfig:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)

    return _compose
