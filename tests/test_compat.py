"""Each workaround in ``tunelab.compat`` still works, and a test fails once the upstream behaviour it works around
is gone (then the workaround can go).

Tests named ``test_<library>_still_...`` show the upstream behaviour without the workaround; the others show the
workaround fixing it. Sharded pieces run in this process on a one-rank gloo group, except the FSDP gather that
only crashes with two ranks (a subprocess on torch's fake process group); the real 2-process runs are
``tests/test_sharded.py``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from tunelab.callbacks.resume import AlignLoggingStep
from tunelab.compat.bitsandbytes import disable_cpu_repacking
from tunelab.compat.deepspeed import CPUDeepSpeedStrategy
from tunelab.compat.lightning import (
    TunelabFSDPStrategy,
    clip_gradients,
    eager_full_checkpoints,
    full_state_dict,
)
from tunelab.compat.peft import disable_adapter, expose_past_key_values, tuner_key_prefixes_renamed
from tunelab.compat.torch import loader_generator

from .test_methods_encoder import batch, logits, tiny_bert

VIRTUAL_TOKENS = 4
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def process_group():
    """A gloo process group of one rank, with the environment a launcher sets; one for the module (DeepSpeed keeps
    the group it first sees). Afterwards the environment, torch's thread count (both set by Lightning's DeepSpeed
    strategy) and ``torch.nn.functional.linear`` (DeepSpeed's ZeRO-3 replaces it for good) are as before."""
    import os
    from unittest import mock

    import torch.distributed as dist

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    threads = torch.get_num_threads()
    with mock.patch.dict(os.environ, env), mock.patch.object(torch.nn.functional, "linear", torch.nn.functional.linear):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        yield
        dist.destroy_process_group()
    torch.set_num_threads(threads)


def blocks() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


class Tiny(pl.LightningModule):
    """Two Linear blocks whose loss is their output's square: fits in a few steps."""

    def __init__(self) -> None:
        super().__init__()
        self.net = blocks()

    def loss(self, batch) -> torch.Tensor:
        return self.net(batch[0]).pow(2).mean()

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("loss", self.loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(batches: int = 2) -> torch.utils.data.DataLoader:
    inputs = torch.randn(4 * batches, 8, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs), batch_size=4)


def quiet_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


# peft


def prefix_tuned(model: torch.nn.Module) -> torch.nn.Module:
    from peft import PrefixTuningConfig, get_peft_model

    return get_peft_model(model, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=VIRTUAL_TOKENS))


def test_peft_still_refuses_a_backbone_that_names_it_cache():
    """peft 0.21 + transformers >= 5.24: without the workaround, prefix tuning cannot run on a BERT classifier."""
    model = prefix_tuned(tiny_bert())
    with pytest.raises(ValueError, match="does not support past key values"):
        logits(model, batch())


def test_exposed_backbone_reads_the_prefixes_as_its_cache():
    """With the workaround, peft's logits equal the backbone run by hand with the prefixes as ``cache`` and the
    attention mask extended over them, then pooled and classified."""
    base = tiny_bert().eval()
    expose_past_key_values(base)
    model = prefix_tuned(base).eval()
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.add_(torch.randn_like(param))
        inputs = batch()
        cache = model.get_prompt(batch_size=inputs["input_ids"].shape[0])
        mask = torch.cat(
            [torch.ones(inputs["input_ids"].shape[0], VIRTUAL_TOKENS, dtype=torch.long), inputs["attention_mask"]], 1
        )
        pooled = base.bert.__class__.forward(
            base.bert, input_ids=inputs["input_ids"], attention_mask=mask, cache=cache
        )[1]
        expected = base.classifier(pooled)
        torch.testing.assert_close(logits(model, inputs), expected, atol=1e-6, rtol=0)
        assert not torch.allclose(expected, logits(tiny_bert().eval(), inputs), atol=1e-3)


def prompt_tuned_classifier() -> torch.nn.Module:
    """A soft prompt on the BERT classifier, its prompt and its trained head copy moved away from the base."""
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(tiny_bert(), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=VIRTUAL_TOKENS))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    return model.eval()


def test_peft_still_cannot_disable_a_soft_prompt_on_a_classifier():
    """peft 0.21.2: its own ``disable_adapter`` crashes on a model without ``prepare_inputs_for_generation`` (or,
    should it run, keeps the trained head copy): it does not give the base model's logits."""
    model, inputs = prompt_tuned_classifier(), batch()
    base_logits = logits(tiny_bert().eval(), inputs)
    with torch.no_grad():
        try:
            with model.disable_adapter():
                disabled = logits(model, inputs)
        except UnboundLocalError:  # the finally block reads what the failed prepare_inputs_for_generation lookup left
            return
    assert not torch.allclose(disabled, base_logits, atol=1e-6)


def test_disabled_soft_prompt_classifier_gives_the_base_logits():
    model, inputs = prompt_tuned_classifier(), batch()
    with torch.no_grad():
        adapted = logits(model, inputs)
        base_logits = logits(tiny_bert().eval(), inputs)
        assert not torch.allclose(adapted, base_logits, atol=1e-3)
        with disable_adapter(model):
            torch.testing.assert_close(logits(model, inputs), base_logits, atol=1e-6, rtol=0)
        assert torch.equal(logits(model, inputs), adapted)  # the adapter is back after the block


def fsdp_lora_classifier():
    """A LoRA BERT classifier inside an FSDP root with one unit per BERT layer (as ``trainer=fsdp`` wraps a task
    module), the adapter state dict peft gives before wrapping, and the gathered state of the wrapped model."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.bert.modeling_bert import BertLayer

    model = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    expected = get_peft_model_state_dict(model)
    root = FSDP(
        torch.nn.ModuleDict({"model": model}),
        auto_wrap_policy=ModuleWrapPolicy({BertLayer}),
        device_id=CPU,
        use_orig_params=True,
    )
    with full_state_dict(root, CPU):
        state = {k.removeprefix("model."): v for k, v in root.state_dict().items()}
    return model, expected, state


def test_peft_still_misses_adapter_keys_inside_fsdp_units(process_group):
    from peft import get_peft_model_state_dict

    model, expected, state = fsdp_lora_classifier()
    assert any("._fsdp_wrapped_module." in name for name, _ in model.named_modules())
    saved = get_peft_model_state_dict(model, state_dict=state)
    assert not any("lora_" in key for key in saved)
    assert any("lora_" in key for key in expected)


def test_renamed_key_prefixes_find_every_adapter_tensor(process_group):
    from peft import get_peft_model_state_dict

    from tunelab.strategies import unwrapped_name

    model, expected, state = fsdp_lora_classifier()
    with tuner_key_prefixes_renamed(unwrapped_name):
        saved = get_peft_model_state_dict(model, state_dict=state)
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[key], expected[key]) for key in expected)


# Lightning


def test_lightning_fsdp_still_refuses_norm_clipping():
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.utilities import GradClipAlgorithmType
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(MisconfigurationException, match=r"'norm'` is currently not supported"):
        FSDPPrecision("32-true").clip_gradients(optimizer, 0.5, GradClipAlgorithmType.NORM)


def test_fsdp_root_clips_by_the_total_norm(process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    module, reference = Tiny(), Tiny()
    root = FSDP(module, device_id=CPU, use_orig_params=True)
    inputs = next(iter(loader()))
    root.loss(inputs).backward()
    reference.loss(inputs).backward()
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(model=root))
    clip_gradients(module, torch.optim.SGD(module.parameters(), lr=0.1), 0.5, None)
    norm_before = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    assert norm_before > 0.5  # so the clip had something to do
    for param, expected in zip(module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param.grad, expected.grad, rtol=1e-6, atol=0)


def on_cpu(strategy):
    strategy.parallel_devices = [CPU]
    return strategy


def test_lightning_fsdp_still_unwraps_the_root_at_a_later_stage(process_group):
    """The first stage wrapped the blocks and the root; Lightning's setup of the next stage leaves the root bare."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = blocks()
    on_cpu(TunelabFSDPStrategy(auto_wrap_policy={torch.nn.Linear}))._setup_model(model)
    with pytest.warns(UserWarning, match="already wrapped"):
        later = on_cpu(FSDPStrategy(auto_wrap_policy={torch.nn.Linear}))._setup_model(model)
    assert later is model and not isinstance(later, FSDP)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, FSDP picks the GPU when Lightning passes no index")
def test_lightning_fsdp_still_refuses_the_cpu(process_group):
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(RuntimeError, match="non-CPU accelerator"):
        on_cpu(FSDPStrategy(auto_wrap_policy={torch.nn.Linear}))._setup_model(blocks())


def test_tunelab_fsdp_wraps_the_root_once_on_the_cpu(process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model, strategy = blocks(), on_cpu(TunelabFSDPStrategy(auto_wrap_policy={torch.nn.Linear}))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*already wrapped")  # nor does Lightning drop the policy
        root = strategy._setup_model(model)
        assert strategy._setup_model(model) is root
    assert isinstance(root, FSDP) and root.module is model and isinstance(model[0], FSDP)
    assert root.compute_device == CPU and "auto_wrap_policy" in strategy.kwargs


FAKE_TWO_RANK_GATHER = """
import json, torch, torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.testing._internal.distributed.fake_pg import FakeStore
from lightning.fabric.strategies.fsdp import _get_full_state_dict_context
from tunelab.compat.lightning import full_state_dict

dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
blocks = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
model = FSDP(blocks, device_id=torch.device("cpu"), use_orig_params=True)  # as trainer=fsdp wraps
with full_state_dict(model, torch.device("cpu")):
    print(json.dumps({k: list(v.shape) for k, v in model.state_dict().items()}), flush=True)
with _get_full_state_dict_context(model, world_size=2):
    model.state_dict()
"""


@pytest.mark.slow  # a subprocess: the crash would take pytest with it
def test_lightning_full_state_dict_still_crashes_a_cpu_group():
    """Rank 0 of two CPU ranks (torch's fake process group: no peer needed): the workaround's gather gives every
    full tensor, then Lightning's (offloading to the CPU it is on) dies of a segmentation fault."""
    result = subprocess.run([sys.executable, "-c", FAKE_TWO_RANK_GATHER], capture_output=True, text=True, timeout=300)
    shapes = {"0.weight": [6, 4], "0.bias": [6], "1.weight": [2, 6], "1.bias": [2]}
    assert json.loads(result.stdout.splitlines()[0]) == shapes, result.stderr[-2000:]
    assert result.returncode == -signal.SIGSEGV, result.stderr[-2000:]


def untyped_storage_checkpoint(path):
    """A checkpoint holding NumPy's RNG key array (uint32, saved with an untyped storage), as tunelab's are."""
    from tunelab.callbacks.rng import numpy_state_as_tensors

    keys = numpy_state_as_tensors()[1]
    torch.save({"numpy_keys": keys}, path)
    return keys


def test_lightning_lazy_load_still_fails_on_untyped_storages(tmp_path):
    import lightning.pytorch.strategies.fsdp as lightning_fsdp

    untyped_storage_checkpoint(tmp_path / "x.ckpt")
    with pytest.raises(AttributeError, match="dtype"):
        lightning_fsdp._lazy_load(tmp_path / "x.ckpt")


def test_fsdp_checkpoints_load_eagerly(tmp_path):
    import lightning.pytorch.strategies.fsdp as lightning_fsdp

    keys = untyped_storage_checkpoint(tmp_path / "x.ckpt")
    with eager_full_checkpoints():
        loaded = lightning_fsdp._lazy_load(tmp_path / "x.ckpt")
    assert loaded["numpy_keys"].dtype == torch.uint32 and torch.equal(loaded["numpy_keys"], keys)


class RecordFirstStep(pl.Callback):
    """Records the global step and Lightning's logger step at the first training batch."""

    steps: tuple[int, int] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.steps is None:
            self.steps = (trainer.global_step, trainer.fit_loop.epoch_loop._batches_that_stepped)


VALIDATION_EVERY_3_STEPS = {"val_check_interval": 3, "check_val_every_n_epoch": None}
EPOCH_END_CHECKPOINTS = {
    # tunelab's resume setup: validation every few steps, a checkpoint every step; the stop at the epoch's last
    # batch runs a validation, whose checkpoint is the last one: the logger step comes back one short
    "validating_every_3_steps": (VALIDATION_EVERY_3_STEPS, {"monitor": "loss", "every_n_train_steps": 1}, -1),
    # Lightning's defaults, validation and a checkpoint per epoch: it comes back one over
    "validating_per_epoch": ({}, {}, +1),
}


def resumed_after_an_epoch_end_stop(tmp_path, scheduling, checkpointing, *callbacks) -> tuple[int, int]:
    """(global step, logger step) at the first batch resumed from the last checkpoint of a run stopped at the last
    batch of its first epoch (4 batches), with ``callbacks`` running before the recording."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .stopping import StopAfterSteps

    def trainer(*extra):
        save = ModelCheckpoint(dirpath=tmp_path, save_last=True, **checkpointing)
        return quiet_trainer(max_steps=8, max_epochs=-1, callbacks=[save, *extra], **scheduling)

    trainer(StopAfterSteps(4)).fit(Tiny(), loader(batches=4), loader(batches=1))
    record = RecordFirstStep()
    trainer(*callbacks, record).fit(Tiny(), loader(batches=4), loader(batches=1), ckpt_path=tmp_path / "last.ckpt")
    return record.steps


@pytest.mark.parametrize("case", EPOCH_END_CHECKPOINTS)
def test_lightning_still_restores_the_logging_step_off_by_one(case, tmp_path):
    scheduling, checkpointing, error = EPOCH_END_CHECKPOINTS[case]
    global_step, logging_step = resumed_after_an_epoch_end_stop(tmp_path, scheduling, checkpointing)
    assert (global_step, logging_step) == (4, 4 + error)


@pytest.mark.parametrize("case", EPOCH_END_CHECKPOINTS)
def test_realigned_logging_step_counts_optimizer_steps(case, tmp_path):
    """``AlignLoggingStep`` applies :func:`tunelab.compat.lightning.realign_logging_step` after a restore."""
    scheduling, checkpointing, _error = EPOCH_END_CHECKPOINTS[case]
    assert resumed_after_an_epoch_end_stop(tmp_path, scheduling, checkpointing, AlignLoggingStep()) == (4, 4)


def test_lightning_launcher_still_passes_a_lost_rank_through_raw(monkeypatch):
    """Lightning's script launcher lets gloo's error for a SIGKILLed peer end the rank as it is (with its stack)."""
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    from .test_process_group import GLOO_CLOSED, cpu_environment

    def collective() -> None:
        raise RuntimeError(GLOO_CLOSED)

    with pytest.raises(RuntimeError) as caught:
        _SubprocessScriptLauncher(cpu_environment(monkeypatch), 2, 1).launch(collective)
    assert type(caught.value) is RuntimeError and str(caught.value) == GLOO_CLOSED


# DeepSpeed


def test_lightning_deepspeed_still_refuses_the_cpu():
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(accelerator=CPUAccelerator(), parallel_devices=[CPU])
    with pytest.raises(RuntimeError, match="only supported on CUDA GPUs"):
        strategy.setup_environment()


def zero3_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
    """A DeepSpeed ZeRO-3 engine: a training engine with ``optimizer``, else an inference engine (as Lightning's)."""
    import argparse

    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3},
    }
    engine, *_ = deepspeed.initialize(
        args=argparse.Namespace(device_rank=0),
        config=config,
        model=model,
        optimizer=optimizer,
        model_parameters=None if optimizer else [],
        dist_init_required=False,
    )
    return engine


def train_step(engine) -> None:
    engine.backward(engine(next(iter(loader()))[0]).pow(2).mean())
    engine.step()


def test_deepspeed_zero3_still_breaks_under_a_second_engine(process_group):
    model = blocks()
    evaluation = zero3_engine(model, None)
    with torch.no_grad():
        evaluation(next(iter(loader()))[0])
    training = zero3_engine(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(IndexError, match="pop from an empty deque"):
        train_step(training)


def test_deepspeed_zero3_inference_engine_still_cannot_load_a_training_checkpoint(process_group, tmp_path):
    model = blocks()
    training = zero3_engine(model, torch.optim.SGD(model.parameters(), lr=0.1))
    train_step(training)
    training.save_checkpoint(tmp_path)
    with pytest.raises(AttributeError, match="_restore_from_bit16_weights"):
        zero3_engine(blocks(), None).load_checkpoint(  # as Lightning's test stage loads
            tmp_path, load_optimizer_states=False, load_lr_scheduler_states=False
        )


def test_cpu_deepspeed_validates_fits_and_tests_on_one_trainer(process_group, tmp_path):
    """ZeRO-3 on a CPU process through every stage of one Trainer; the test stage scores the fitted checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = Tiny()
    trainer = quiet_trainer(
        strategy=CPUDeepSpeedStrategy(stage=3),
        max_steps=2,
        callbacks=[ModelCheckpoint(tmp_path, save_last=True)],
        inference_mode=False,  # as configs/trainer/default.yaml
    )
    untrained = trainer.validate(module, loader(batches=1))[0]["loss"]  # one forward, as in the test above
    trainer.fit(module, loader(), loader())
    fitted = float(trainer.callback_metrics["loss"])
    tested = trainer.test(module, loader(), ckpt_path="last")[0]["loss"]
    assert tested == fitted and fitted < untrained
    assert trainer.strategy.root_device == torch.device("cpu", 0)


def adapted_tiny() -> Tiny:
    """:class:`Tiny` with an in-house bottleneck adapter (a forward hook) after its first layer; only it trains, and
    its weights are large enough to change the loss."""
    from tunelab.methods.inhouse import Bottleneck, attach

    module = Tiny()
    module.requires_grad_(False)
    attach(module.net[0], "adapter", Bottleneck(8, 2, init_std=0.5))
    module.net[0].adapter.requires_grad_(True)
    return module


def test_lightning_deepspeed_still_removes_the_models_hooks_for_evaluation(process_group):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    module = adapted_tiny()
    strategy = DeepSpeedStrategy(stage=2)  # Lightning's own inference setup, on this CPU process as device 0
    strategy.parallel_devices = [torch.device("cpu", 0)]
    strategy._initialize_deepspeed_inference(module)
    assert not module.net[0]._forward_hooks


@pytest.mark.parametrize("stage", [2, 3])
def test_cpu_deepspeed_evaluates_and_trains_through_inhouse_adapters(process_group, stage):
    """Validation before fitting scores the adapted model, and fitting then trains the adapter (the only weights
    that train: without its hook the loss would have no gradient)."""
    from tunelab.methods.inhouse import adapters_disabled

    module = adapted_tiny()
    with torch.no_grad():
        adapted = module.loss(next(iter(loader(batches=1)))).item()
        with adapters_disabled(module):
            assert module.loss(next(iter(loader(batches=1)))).item() != pytest.approx(adapted)
    trainer = quiet_trainer(
        strategy=CPUDeepSpeedStrategy(stage=stage), max_steps=2, enable_checkpointing=False, inference_mode=False
    )
    untrained = trainer.validate(module, loader(batches=1))[0]["loss"]
    assert untrained == pytest.approx(adapted, rel=1e-6)
    trainer.fit(module, loader(), loader(batches=1))
    assert float(trainer.callback_metrics["loss"]) < untrained


# bitsandbytes


def four_bit_linear(repacking: bool) -> torch.nn.Module:
    """A 4-bit NF4 Linear (quantized on its move to the CPU), with bitsandbytes' CPU repacking on or off."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    if not repacking:
        disable_cpu_repacking([layer])
    return layer


def after_an_eval_pass(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The dequantized weight, the eval-pass output and the input gradient of the next training forward."""
    from bitsandbytes.functional import dequantize_4bit

    weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    inputs = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    layer.eval()
    with torch.no_grad():
        evaluated = layer(inputs)
    layer.train()
    trained = inputs.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "an autograd kernel was not registered" for gemv_4bit
        layer(trained).sum().backward()
    return weight, evaluated - inputs @ weight.T, trained.grad


def require_avx512_bf16() -> None:
    from bitsandbytes.nn.modules import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no avx512_bf16: bitsandbytes never repacks, the trap cannot occur")


def test_bitsandbytes_still_stops_gradients_after_an_eval_pass():
    require_avx512_bf16()
    _weight, eval_error, gradient = after_an_eval_pass(four_bit_linear(repacking=True))
    assert gradient is None
    assert eval_error.abs().max() > 1e-4


def test_without_repacking_gradients_flow_and_outputs_stay_exact():
    weight, eval_error, gradient = after_an_eval_pass(four_bit_linear(repacking=False))
    assert torch.equal(eval_error, torch.zeros_like(eval_error))
    torch.testing.assert_close(gradient, weight.sum(0).expand(3, -1), rtol=0, atol=1e-6)


# torch


def test_torch_dataloader_still_draws_from_the_global_rng():
    state = torch.get_rng_state()
    list(torch.utils.data.DataLoader(range(4)))
    assert not torch.equal(torch.get_rng_state(), state)


def test_loader_generator_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    list(torch.utils.data.DataLoader(range(4), generator=loader_generator(0)))
    assert torch.equal(torch.get_rng_state(), state)


def test_deepspeed_still_loads_its_checkpoints_with_weights_only_false(tmp_path, monkeypatch):
    """DeepSpeed 0.19.8's TorchCheckpointEngine.load unpickles with weights_only=False: the reason for
    tunelab.compat.deepspeed.weights_only_engine_loads. Fails once DeepSpeed loads weights only."""
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine

    calls = []
    monkeypatch.setattr(torch_checkpoint_engine.torch, "load", lambda *args, **kwargs: calls.append(kwargs))
    torch_checkpoint_engine.TorchCheckpointEngine().load(str(tmp_path / "x.pt"), map_location="cpu")
    assert [call.get("weights_only") for call in calls] == [False]
