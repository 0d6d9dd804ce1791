"""The precomputed reference cache (``task.reference=precomputed``, :mod:`tunelab.tasks.reference`) on tiny models:
its key changes with one weight, the quantization config and the precision the reference runs in; a torn, short or
foreign file is named in one warning and computed again; two jobs racing for one file leave one valid file, one
computing it and the other reading it; the ranks of one run compute it together without deadlocking on the lock;
and weights trained in place (a resumed run, ``evaluate.py`` on a finished ``method=full`` run) never fill it."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import pickle
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.errors import ConfigError
from tunelab.methods.qlora import qlora_quantization_config
from tunelab.tasks import reference as reference_module
from tunelab.tasks.reference import ReferenceModel, read_table, run_precision, write_table

from .conftest import synthetic_preferences
from .test_alignment import alignment_overrides

SPLIT, SETTINGS = "val", (False,)
EXAMPLES = [[[5, 6, 7], [-100, 6, 7]], [[5, 6, 8], [-100, 6, 8]], [[5, 9], [-100, 9]], [[5, 10], [-100, 10]]]
SHAPE = (2, 2)  # two pairs, (chosen, rejected)
REFUSAL = "no longer holds the weights training started from"


def tiny_llama() -> LlamaForCausalLM:
    """The same tiny random Llama on every call (a fixed seed)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(config)


def precomputed(model: torch.nn.Module, cache_dir: Path, in_place: bool = True) -> ReferenceModel:
    return ReferenceModel(
        model, trains_base_in_place=in_place, source="precomputed", cache_dir=cache_dir, identity="tiny"
    )


def table(value: float) -> torch.Tensor:
    return torch.full(SHAPE, value)


def load(
    reference: ReferenceModel, model: torch.nn.Module, compute: Callable[[], torch.Tensor], updated: bool = False
) -> torch.Tensor:
    return reference.load_or_compute(SPLIT, SETTINGS, EXAMPLES, compute, policy=model, shape=SHAPE, updated=updated)


def key_path(reference: ReferenceModel, model: torch.nn.Module) -> Path:
    return reference.cache_path(SPLIT, SETTINGS, EXAMPLES, run_precision(model))


def never() -> torch.Tensor:
    raise AssertionError("the reference table was computed")


def cache_files(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir())


def test_one_weight_changes_the_key_where_strided_sums_do_not(tmp_path):
    """Two models equal but for one element moved by 1e-3, off a stride of 7: a sum over that strided slice is
    the same, the key is not. An equal model has the same key."""
    base, same, edited = tiny_llama(), tiny_llama(), tiny_llama()
    weight = edited.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        weight.view(-1)[1] += 1e-3
    assert torch.equal(weight.view(-1)[::7], base.model.layers[0].mlp.up_proj.weight.view(-1)[::7])
    paths = [key_path(precomputed(m, tmp_path), m) for m in (base, same, edited)]
    assert paths[0] == paths[1] != paths[2]


def test_the_quantization_config_changes_the_key(tmp_path):
    """Unquantized, 4-bit NF4, 4-bit FP4 and NF4 without double quantization (method=qlora's
    ``BitsAndBytesConfig``, read off the model's ``config.quantization_config``): four keys."""
    nf4 = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32", "quant_storage": "uint8"}
    variants = [None, nf4, {**nf4, "quant_type": "fp4"}, {**nf4, "double_quant": False}]
    keys = []
    for variant in variants:
        model = tiny_llama()
        if variant is not None:
            model.config.quantization_config = qlora_quantization_config(OmegaConf.create(variant))
        reference = precomputed(model, tmp_path)
        keys.append(key_path(reference, model))
    assert reference.quantization["bnb_4bit_quant_type"] == "nf4"
    assert reference.quantization["bnb_4bit_use_double_quant"] is False
    assert len(set(keys)) == 4


def test_the_precision_the_reference_runs_in_changes_the_key(tmp_path):
    """32-true, bf16-mixed (autocast) and bf16-true (bfloat16 weights) each get their own table file."""
    model = tiny_llama()
    reference = precomputed(model, tmp_path, in_place=False)
    assert run_precision(model) == "torch.float32 autocast=off"
    plain = load(reference, model, lambda: table(1.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert run_precision(model) == "torch.float32 autocast=torch.bfloat16"
        mixed = load(reference, model, lambda: table(2.0))
    model.to(torch.bfloat16)
    assert run_precision(model) == "torch.bfloat16 autocast=off"
    half = load(reference, model, lambda: table(3.0))
    assert [plain[0, 0].item(), mixed[0, 0].item(), half[0, 0].item()] == [1.0, 2.0, 3.0]
    assert len([name for name in cache_files(tmp_path) if name.endswith(".pt")]) == 3


def test_an_adapter_methods_key_leaves_its_adapters_out(tmp_path):
    """With adapters (not in place) the reference runs on the frozen weights only: a trainable parameter moving
    keeps the key, a frozen one moving changes it."""
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)
    for param in model.model.parameters():
        param.requires_grad_(False)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)  # stands in for an adapter
    start = key_path(precomputed(model, tmp_path, in_place=False), model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(1.0)
    assert key_path(precomputed(model, tmp_path, in_place=False), model) == start
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    assert key_path(precomputed(model, tmp_path, in_place=False), model) != start


class Exploit:
    """Unpickled, it creates ``marker``: what a crafted pickle could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def zero_the_table_bytes(path: Path) -> None:
    raw = path.read_bytes()
    start = raw.index(table(1.0).numpy().tobytes())
    path.write_bytes(raw[:start] + bytes(table(1.0).numel() * 4) + raw[start + table(1.0).numel() * 4 :])


CORRUPTIONS = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "empty": lambda path: path.write_bytes(b""),
    "zeroed table bytes": zero_the_table_bytes,
    "another shape": lambda path: write_table(path, torch.zeros(3, 2)),
    "a bare tensor": lambda path: torch.save(table(1.0), path),
    "a pickle that runs code": lambda path: path.write_bytes(
        pickle.dumps(Exploit(path.with_name("marker")), protocol=2)
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_an_unreadable_cache_file_is_named_once_and_computed_again(corruption, tmp_path, caplog):
    model = tiny_llama()
    path = key_path(precomputed(model, tmp_path), model)
    load(precomputed(model, tmp_path), model, lambda: table(1.0))
    CORRUPTIONS[corruption](path)
    calls = []
    with caplog.at_level(logging.WARNING, logger="tunelab.reference"):
        again = load(precomputed(model, tmp_path), model, lambda: calls.append(1) or table(2.0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith(f"Reference cache {path} is unreadable (")
    assert warnings[0].endswith("); computing it again")
    assert calls == [1] and torch.equal(again, table(2.0))
    assert torch.equal(read_table(path, SHAPE, warn=True), table(2.0))  # rewritten
    assert not path.with_name("marker").exists()
    assert cache_files(tmp_path) == sorted([path.name, f".{path.name}.lock"])


def exit_codes(processes: list[multiprocessing.process.BaseProcess]) -> list[int | None]:
    """Each forked process's exit code once it ends (within two minutes; one still running is killed: None)."""
    for process in processes:
        process.join(120)
    codes = [process.exitcode for process in processes]
    for process in processes:
        if process.exitcode is None:
            process.kill()
    return codes


def wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def writer_job(name: str, cache_dir: Path, events: Path) -> None:
    """One sweep job (forked): looks the table up, computing ``1.0`` (``first``) or ``2.0`` (``second``). The
    first computes only once the second has found the file missing and is about to take the lock."""
    torch.set_num_threads(1)
    model = tiny_llama()
    reference = precomputed(model, cache_dir)
    if name == "second":
        take_lock = reference_module.exclusive

        def announced(path):
            (events / "second-waits").touch()
            return take_lock(path)

        reference_module.exclusive = announced

    def compute() -> torch.Tensor:
        (events / f"{name}-computes").touch()
        if name == "first":
            wait_for(events / "second-waits")
            time.sleep(0.2)
        return table(1.0 if name == "first" else 2.0)

    torch.save(load(reference, model, compute), events / f"{name}.pt")


def test_two_jobs_racing_write_one_file_and_the_second_reads_it(tmp_path):
    """Two forked jobs find the file missing at once: the first computes it under the lock while the second
    waits for the lock, then finds the file written meanwhile and reads it instead of computing it again."""
    cache_dir, events = tmp_path / "cache", tmp_path / "events"
    events.mkdir()
    fork = multiprocessing.get_context("fork")
    jobs = {name: fork.Process(target=writer_job, args=(name, cache_dir, events)) for name in ("first", "second")}
    jobs["first"].start()
    wait_for(events / "first-computes")
    jobs["second"].start()
    assert exit_codes(list(jobs.values())) == [0, 0], "a job failed or hung"
    assert sorted(p.name for p in events.iterdir()) == ["first-computes", "first.pt", "second-waits", "second.pt"]
    assert torch.equal(torch.load(events / "first.pt"), table(1.0))
    assert torch.equal(torch.load(events / "second.pt"), table(1.0))
    model = tiny_llama()
    path = key_path(precomputed(model, cache_dir), model)
    assert cache_files(cache_dir) == sorted([path.name, f".{path.name}.lock"])  # no temporary left
    assert torch.equal(read_table(path, SHAPE, warn=True), table(1.0))


def rank_job(rank: int, cache_dir: Path, events: Path) -> None:
    """One rank of a 2-process gloo group (forked) whose table needs a collective, as a sharded forward does."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{events}/group", rank=rank, world_size=2)
    model = tiny_llama()
    reference = precomputed(model, cache_dir)

    def compute() -> torch.Tensor:
        (events / f"rank{rank}-computes").touch()
        ones = table(1.0)
        torch.distributed.all_reduce(ones)
        return ones

    torch.save(load(reference, model, compute), events / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_the_ranks_of_one_run_compute_together_outside_the_lock(tmp_path):
    cache_dir, events = tmp_path / "cache", tmp_path / "events"
    events.mkdir()
    fork = multiprocessing.get_context("fork")
    ranks = [fork.Process(target=rank_job, args=(rank, cache_dir, events)) for rank in (0, 1)]
    for rank in ranks:
        rank.start()
    assert exit_codes(ranks) == [0, 0], "a rank failed or deadlocked"
    assert (events / "rank0-computes").exists() and (events / "rank1-computes").exists()
    assert torch.equal(torch.load(events / "rank0.pt"), table(2.0))
    assert torch.equal(torch.load(events / "rank1.pt"), table(2.0))
    model = tiny_llama()
    path = key_path(precomputed(model, cache_dir), model)
    assert cache_files(cache_dir) == sorted([path.name, f".{path.name}.lock"])


def test_trained_in_place_weights_read_the_cache_but_never_compute_it(tmp_path):
    """A method training in place: after an update (a resumed run) or once :meth:`check_start` found weights
    other than the starting ones, a missing table is refused (nothing written); the table cached under the
    starting weights' key is still read. The starting weights themselves compute it."""
    model = tiny_llama()
    with pytest.raises(ConfigError, match=REFUSAL):
        load(precomputed(model, tmp_path), model, never, updated=True)
    reference = precomputed(model, tmp_path)
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)  # what load_state_dict of a trained checkpoint does
    reference.check_start(model)
    assert reference.weights_changed
    with pytest.raises(ConfigError, match=REFUSAL):
        load(reference, model, never)
    assert cache_files(tmp_path) == []

    start = tiny_llama()
    fresh = precomputed(start, tmp_path)
    fresh.check_start(start)
    assert not fresh.weights_changed
    assert torch.equal(load(fresh, start, lambda: table(1.0)), table(1.0))
    assert torch.equal(load(reference, model, never), table(1.0))


def test_evaluate_on_a_trained_full_run_reads_the_cache_but_never_computes_it(tmp_path, compose_cfg, monkeypatch):
    """``evaluate.py`` on a method=full DPO run rebuilds the starting model, then loads the trained weights into
    it: with the cache gone it refuses in one line; given the starting weights it may compute the cache, which
    the trained checkpoint then reads without computing."""
    from tunelab.build import build_components
    from tunelab.evaluate import evaluate
    from tunelab.tasks import dpo

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(row) + "\n" for row in synthetic_preferences(48)))
    run_dir = tmp_path / "run"
    cache_dir = run_dir / "ref_cache"  # alignment_overrides' task.reference_cache_dir
    overrides = [o for o in alignment_overrides("dpo", prefs, run_dir) if not o.startswith("method")]
    overrides += ["method=full", "task.reference=precomputed"]
    run_cfg = compose_cfg([*overrides, "trainer.precision=32-true"])
    (run_dir / "checkpoints").mkdir(parents=True)
    OmegaConf.save(run_cfg, run_dir / "config.yaml", resolve=True)
    state = build_components(run_cfg)["module"].state_dict()
    torch.save({"state_dict": state}, run_dir / "checkpoints" / "start.ckpt")
    trained = {**state, "model.model.norm.weight": state["model.model.norm.weight"] + 0.5}
    torch.save({"state_dict": trained}, run_dir / "checkpoints" / "trained.ckpt")

    def evaluate_checkpoint(name: str) -> dict[str, float]:
        return evaluate(compose_cfg([f"ckpt_path={run_dir / 'checkpoints' / name}"], config_name="evaluate"))

    with pytest.raises(ConfigError, match=REFUSAL):
        evaluate_checkpoint("trained.ckpt")
    assert not cache_dir.exists()
    start = evaluate_checkpoint("start.ckpt")
    assert start["test/loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert sorted(p.name.split("-")[0] for p in cache_dir.glob("*.pt")) == ["test", "train", "val"]
    monkeypatch.setattr(dpo.DPOModule, "_compute_table", lambda *args: never())
    after = evaluate_checkpoint("trained.ckpt")
    assert after["test/ref_logps/accuracy"] == start["test/ref_logps/accuracy"]  # the same, starting, reference
    assert after["test/logps/chosen"] != start["test/logps/chosen"]
    assert after["test/loss"] != pytest.approx(math.log(2), abs=1e-6)
