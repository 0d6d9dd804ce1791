"""tunelab against the Hugging Face ``transformers.Trainer`` (+ peft) on the same fine-tuning workload.

    python benchmarks/vs_hf_trainer.py                                  # LoRA SFT on SmolLM2-135M, 3 rounds
    python benchmarks/vs_hf_trainer.py --workload full --repeats 3      # full fine-tuning of the same
    python benchmarks/vs_hf_trainer.py --workload gpt2                  # GPT-2-size model (124M), random init
    python benchmarks/vs_hf_trainer.py --repeats 1 --steps 6            # a quick look (minutes on 2 CPU cores)
    python benchmarks/vs_hf_trainer.py --smoke                          # tiny model, 2 steps (the test's command)
    python benchmarks/vs_hf_trainer.py --tunelab-overrides              # tunelab without its data features (padded)
    python benchmarks/vs_hf_trainer.py --json costs.json                # also write every raw figure

Workloads (``--workload``):

- ``lora``: LoRA SFT of SmolLM2-135M-Instruct (``model=smollm2_135m method=lora``; r, alpha, dropout and target
  modules from ``configs/method/lora.yaml``) on the packaged ``data=hpo_qa`` training split (real instruction
  data of varied length), batch 8, ``max_length`` 512.
- ``full``: the same with ``method=full`` (every weight trains).
- ``gpt2``: full fine-tuning of a GPT-2-size model (12 layers, d=768, 12 heads: 124M parameters with GPT-2's own
  vocabulary). No download is possible here, so it is ``GPT2LMHeadModel`` from ``GPT2Config`` with *random* weights
  and the SmolLM2 tokenizer's 49,152-token vocabulary (123.6M parameters); ``--method lora`` adapts c_attn,
  c_proj and c_fc instead. Speed does not depend on the weights' values.

``--smoke`` swaps in the tiny random Llama of ``configs/model/tiny.yaml`` (a 2-layer GPT-2 for ``gpt2``): 1 warm-up
and 2 timed steps, 1 round.

The same work on both sides: the training examples are encoded once with tunelab's SFT data module (chat template,
prompt tokens masked with -100) and the first ``steps x batch`` of the training split are used. Each side first
trains ``--warmup`` untimed steps (a separate, discarded fit: allocator, kernel and lazy-init warm-up), then the
timed fit: exactly one epoch of ``--steps`` optimizer steps over those examples, so both sides time the same
examples (each in its own order and batching; timing steps after a warm-up inside one fit would not, e.g.
tunelab's length grouping puts the longest examples first). Same model weights, LoRA config, AdamW (lr, betas,
eps, weight decay from ``configs/task/sft.yaml``; the same torch ``AdamW`` implementation: the fused kernel, HF's
default ``--hf-optim adamw_torch_fused`` and tunelab's ``task.optimizer.fused=true``), cosine schedule with
tunelab's warm-up, gradient clipping at ``trainer.gradient_clip_val``, seed, number of optimizer steps, torch
threads, precision (fp32 on CPU, bf16 mixed on a bf16 GPU), no evaluation, no checkpoints, no loggers, no DataLoader
workers.

- tunelab runs its own pipeline: ``configs/train.yaml`` composed with the workload's overrides plus
  ``--tunelab-overrides`` (default ``data.packing=true data.group_by_length=true``; a key the config does not have
  is dropped with a note), ``tunelab.train.build_components`` and ``build_trainer`` (a Lightning Trainer with
  ``max_steps``, no validation, ``logger=False``). Overrides that change the model, method or data encoding also
  change what the HF side runs (it is derived from the composed config); tunelab-only knobs (packing, grouping,
  ``model.compile``, ``trainer.*``) change only tunelab.
- HF runs ``transformers.Trainer`` on the same encoded examples with its default padding collator
  (``DataCollatorForSeq2Seq(padding=True)``, labels padded with -100), random sampling
  (``--hf-group-by-length`` for its length-grouped sampler), the model built with plain
  ``AutoModelForCausalLM`` (+ ``peft.get_peft_model``), ``report_to="none"``, ``save_strategy="no"``.

Each run is a fresh subprocess (so its peak memory is its own); rounds alternate the order (tunelab, HF, then HF,
tunelab, ...) and every figure is the median over rounds. What the table shows, per side:

- ``real tok/s``: non-pad input tokens processed per second over the timed fit: sum of the attention masks (packed
  rows: their length; they hold no padding) / sum of step times (the same token count on both sides).
- ``all tok/s``: every input position, padding included (``input_ids.numel()``), per second; ``padding`` is the
  share of positions that are padding.
- ``median step (s)``: the median time of one optimizer step, measured from the end of the previous step (the start
  of training for the first) to the end of this one, so data loading, collation and framework hooks count (on a
  GPU after ``torch.cuda.synchronize``).
- ``peak RSS (MiB)``: the process's peak resident set size while training, warm-up included (``VmHWM``, reset when
  the first fit starts, so the loaded model counts but loading transients do not; the warm-up's trainer and
  optimizer are freed before the timed fit); on a GPU ``peak GPU alloc``: ``torch.cuda.max_memory_allocated``.
- ``MFU``: model FLOPs per second over the timed fit / the machine's measured matmul peak (the best of several
  timed square matmuls: fp32 2048^3 on CPU with the same torch threads, bf16 8192^3 on a GPU). Model FLOPs of an
  example of n tokens: ``n * (6 * N_trainable + 4 * N_frozen + 12 * L * d * n)``, where N_trainable / N_frozen are
  the weights of the matmul layers (Linear / Conv1D, the LM head included, embedding lookups excluded) that do / do
  not train: a trained weight costs forward + input-gradient + weight-gradient (2 + 2 + 2 FLOPs per weight and
  token), a frozen one only the first two; so full fine-tuning is 6N and LoRA ~4N (+ 6x its adapter weights).
  ``12 * L * d * n`` is self-attention (QK^T and AV, forward + backward, L layers, width d), counted over the
  example's own length n (not the padded one) and without discounting the causal mask (the PaLM convention).
  Both sides are credited the same FLOPs for the same examples; padding and packed cross-example blocks are waste.
- ``tunelab / HF``: tunelab's median over HF's; above 1 means tunelab is faster for the token rates and MFU, and
  slower / larger for step time and memory.

The per-round lines also give each side's mean training loss over the timed fit: with the same batches
(``--tunelab-overrides`` alone: both samplers draw ``torch.randperm`` with the seed, so tunelab pads exactly the
batches HF pads) the two agree to ~1e-3 (dropout masks differ); with packing and grouping the order differs.
CPU figures move with whatever else runs on the machine (the load average before the first run is printed).
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tunelab.memory import peak_memory_mib, reset_peak_memory

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SIDES = ("tunelab", "hf")
SIDE_NAMES = {"tunelab": "tunelab", "hf": "HF Trainer"}
DEFAULT_TUNELAB_OVERRIDES = ["data.packing=true", "data.group_by_length=true"]
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
}
GPT2_124M = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}
GPT2_SMOKE = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024}
GPT2_LORA_TARGETS = "[c_attn,c_proj,c_fc]"


# --------------------------------------------------------------------------- the workload as tunelab overrides


@dataclass(frozen=True)
class Spec:
    """Everything a worker needs; written to ``<workdir>/spec.json`` by the parent."""

    workload: str
    method: str
    smoke: bool
    warmup: int
    steps: int
    batch_size: int
    max_length: int
    examples: int
    seed: int
    threads: int
    device: str  # cpu | cuda
    tunelab_overrides: list[str] = field(default_factory=list)
    hf_optim: str = "adamw_torch_fused"
    hf_group_by_length: bool = False


def model_overrides(workload: str, smoke: bool) -> list[str]:
    """The ``model=`` part: SmolLM2-135M (tiny Llama for smoke runs), or a random-init GPT-2 on tunelab's tiny
    model entry (its ``random_init`` source and SmolLM2 tokenizer) with the GPT-2 config swapped in."""
    if workload != "gpt2":
        return ["model=tiny" if smoke else "model=smollm2_135m"]
    config = GPT2_SMOKE if smoke else GPT2_124M
    rendered = ",".join(f"{key}:{value}" for key, value in config.items())
    name = "gpt2_smoke_random" if smoke else "gpt2_124m_random"
    return [
        "model=tiny",
        "~model.config",
        f"+model.config={{{rendered}}}",
        f"++model.lora_targets={GPT2_LORA_TARGETS}",
        f"model.name={name}",
    ]


def base_overrides(spec: Spec, output_dir: str) -> list[str]:
    """Overrides of ``configs/train.yaml`` that make the benchmark workload (before ``--tunelab-overrides``)."""
    return [
        *model_overrides(spec.workload, spec.smoke),
        f"method={spec.method}",
        "task=sft",
        "data=hpo_qa",
        f"data.max_length={spec.max_length}",
        f"data.batch_size={spec.batch_size}",
        f"data.train_size={spec.examples}",
        "data.num_workers=0",
        "task.generation.num_samples=0",
        f"seed={spec.seed}",
        f"trainer.accelerator={'gpu' if spec.device == 'cuda' else 'cpu'}",
        "trainer.devices=1",
        "trainer.strategy=auto",
        "trainer.max_epochs=1",
        f"trainer.max_steps={spec.steps}",
        "trainer.accumulate_grad_batches=1",
        "trainer.enable_progress_bar=false",
        "++trainer.enable_checkpointing=false",
        "++trainer.enable_model_summary=false",
        "++trainer.limit_val_batches=0",
        "validate_before_training=false",
        "test=false",
        "export.adapter=false",
        f"paths.output_dir={output_dir}",
    ]


def compose(overrides: Sequence[str]) -> Any:
    """``configs/train.yaml`` composed with ``overrides`` (no Hydra run: ``paths.output_dir`` must be set)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def known_overrides(cfg: Any, overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``key=value`` overrides into those whose key ``cfg`` has and those it lacks (e.g. a data knob another
    branch adds); ``+``/``++``/``~`` overrides and config-group choices (``model=tiny``) are always kept."""
    from omegaconf import OmegaConf

    missing = object()
    kept, dropped = [], []
    for override in overrides:
        key = override.split("=", 1)[0]
        if override.startswith(("+", "~")) or "." not in key:
            kept.append(override)
        elif OmegaConf.select(cfg, key, default=missing) is missing:
            dropped.append(override)
        else:
            kept.append(override)
    return kept, dropped


def tunelab_config(spec: Spec, output_dir: str) -> Any:
    return compose([*base_overrides(spec, output_dir), *spec.tunelab_overrides])


# --------------------------------------------------------------------------- measuring a run (both sides)


def batch_lengths(batch: dict[str, Any]) -> list[int]:
    """Real (non-pad) length of every example in a batch: attention-mask row sums, or a packed row's
    ``segment_lengths`` (``PackedCollator``)."""
    if batch.get("attention_mask") is not None:
        return [int(n) for n in batch["attention_mask"].sum(dim=1).tolist()]
    if batch.get("segment_lengths") is not None:
        return list(batch["segment_lengths"])
    return [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0]


@dataclass
class StepMeter:
    """Step times (end of the previous step, or the start of training, -> end of this step), the batches' lengths,
    the losses and the peak memory."""

    device: torch.device
    seconds: list[float] = field(default_factory=list)
    lengths: list[list[int]] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    threads: int = 0
    _last: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_start(self) -> None:
        self._sync()
        self._last = time.perf_counter()

    def step_end(self) -> None:
        self._sync()
        now = time.perf_counter()
        self.seconds.append(now - (self._last or now))
        self._last = now
        self.threads = torch.get_num_threads()

    def batch(self, batch: dict[str, torch.Tensor]) -> None:
        self.lengths.append(batch_lengths(batch))
        self.positions.append(batch["input_ids"].numel())

    def result(self) -> dict[str, Any]:
        steps = len(self.seconds)
        return {
            "seconds": self.seconds,
            "lengths": self.lengths[:steps],
            "positions": self.positions[:steps],
            "peak_mem_mib": peak_memory_mib(self.device),
            "threads": self.threads,
            "mean_loss": statistics.fmean(self.losses) if self.losses else None,
        }


def matmul_weights(model: torch.nn.Module) -> dict[str, int]:
    """Weights of the matmul layers (``nn.Linear`` and transformers' ``Conv1D``), split by whether they train."""
    counts = {"trainable": 0, "frozen": 0}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            counts["trainable" if module.weight.requires_grad else "frozen"] += module.weight.numel()
    return counts


def model_facts(model: torch.nn.Module) -> dict[str, int]:
    """What the FLOPs formula needs: matmul weights by kind, layers and width; plus parameter counts."""
    config = model.config
    unique = {id(p): p for p in model.parameters()}.values()
    return {
        **{f"matmul_{kind}": count for kind, count in matmul_weights(model).items()},
        "layers": config.num_hidden_layers,
        "width": config.hidden_size,
        "params_total": sum(p.numel() for p in unique),
        "params_trainable": sum(p.numel() for p in unique if p.requires_grad),
    }


def data_hash(examples: Sequence[Any]) -> str:
    """Fingerprint of encoded examples (``input_ids`` and ``labels``, in split order)."""
    rows = [[list(_field(ex, "input_ids")), list(_field(ex, "labels"))] for ex in examples]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def _field(example: Any, name: str) -> Any:
    return example[name] if isinstance(example, dict) else getattr(example, name)


def collected(optimizer: weakref.ref) -> bool:
    """Collect the dropped warm-up trainer and its optimizer state (reference cycles), so the timed fit does not
    carry them into its peak memory; True when the warm-up ``optimizer`` is gone."""
    gc.collect()
    return optimizer() is None


# --------------------------------------------------------------------------- the tunelab side


def lightning_callback(meter: StepMeter) -> Any:
    from lightning.pytorch import Callback

    class Meter(Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            meter.train_start()

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            meter.batch(batch)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            meter.step_end()
            meter.losses.append(float(outputs["loss"]))

    return Meter()


def run_tunelab(spec: Spec, workdir: Path) -> dict[str, Any]:
    """tunelab's pipeline: compose, check, seed, ``build_components``, then ``build_trainer`` + ``fit`` twice: the
    warm-up (``max_steps=warmup``, discarded) and the timed epoch."""
    import lightning.pytorch as pl

    from tunelab.build import build_components, build_trainer
    from tunelab.config_checks import check_config

    cfg = tunelab_config(spec, str(workdir / "tunelab_out"))
    check_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    objects = build_components(cfg)
    module, datamodule = objects["module"], objects["datamodule"]
    reset_peak_memory(torch.device(spec.device))
    freed = True
    if spec.warmup:
        warm_cfg = copy.deepcopy(cfg)
        warm_cfg.trainer.max_steps = spec.warmup
        warm = build_trainer(warm_cfg, objects["model"], [], [])
        warm.fit(module, datamodule=datamodule)
        optimizer = weakref.ref(warm.optimizers[0])
        module.trainer = datamodule.trainer = warm = None
        freed = collected(optimizer)
    meter = StepMeter(torch.device(spec.device))
    trainer = build_trainer(cfg, objects["model"], [lightning_callback(meter)], [])
    trainer.fit(module, datamodule=datamodule)
    return {
        **meter.result(),
        **model_facts(objects["model"]),
        "precision": str(cfg.trainer.precision),
        "data_hash": data_hash(objects["datamodule"].splits["train"]),
        "warmup_freed": freed,
    }


# --------------------------------------------------------------------------- the Hugging Face side


def hf_recipe(cfg: Any) -> dict[str, Any]:
    """The HF side's model, method and optimizer, read from tunelab's composed config (one source of truth)."""
    from omegaconf import OmegaConf

    from tunelab.models.loading import resolve_checkpoint_dir

    model: dict[str, Any] = {
        "dtype": cfg.model.dtype,
        "attn_implementation": cfg.model.attn_implementation,
        "init_seed": cfg.model.get("init_seed", 0),
    }
    if cfg.model.source == "random_init":
        model["config"] = OmegaConf.to_container(cfg.model.config, resolve=True)
    else:
        model["pretrained"] = resolve_checkpoint_dir(cfg.model, cfg.paths.cache_dir)
    method = OmegaConf.to_container(cfg.method, resolve=True)
    if method["name"] not in ("lora", "full"):
        raise SystemExit(f"method={method['name']}: the HF baseline here knows lora and full only")
    optimizer, scheduler = cfg.task.optimizer, cfg.task.scheduler
    return {
        "model": model,
        "method": method,
        "lr": optimizer.lr,
        "weight_decay": optimizer.weight_decay,
        "betas": list(optimizer.betas),
        "eps": optimizer.eps,
        "scheduler": "constant_with_warmup" if scheduler.name == "constant" else scheduler.name,
        "warmup_steps": scheduler.get("warmup_steps"),
        "warmup_ratio": scheduler.get("warmup_ratio", 0.0),
        "max_grad_norm": cfg.trainer.gradient_clip_val or 0.0,
        "pad_to_multiple_of": cfg.data.pad_to_multiple_of,
        "output_dir": str(Path(cfg.paths.output_dir).parent / "hf_out"),
    }


def build_hf_model(recipe: dict[str, Any], tokenizer: Any) -> torch.nn.Module:
    """Plain transformers (+ peft): ``from_pretrained``, or ``from_config`` seeded as tunelab seeds it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = recipe["model"]
    dtype = getattr(torch, spec["dtype"])
    if "pretrained" in spec:
        model = AutoModelForCausalLM.from_pretrained(
            spec["pretrained"], dtype=dtype, attn_implementation=spec["attn_implementation"]
        )
    else:
        kwargs = dict(spec["config"])
        kwargs.setdefault("vocab_size", len(tokenizer))
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            kwargs.setdefault(name, getattr(tokenizer, name))
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec["init_seed"])
            attn = spec["attn_implementation"]
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    method = recipe["method"]
    if method["name"] == "full":
        return model.train()
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=method["r"],
        lora_alpha=method["alpha"],
        lora_dropout=method["dropout"],
        target_modules=method["target_modules"],
        bias=method["bias"],
        use_rslora=method["use_rslora"],
    )
    return get_peft_model(model, lora).train()


class CountingCollator:
    """The HF collator, recording each batch's lengths as it is built (batches are consumed in that order)."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], Any], meter: StepMeter) -> None:
        self.collate, self.meter = collate, meter

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = self.collate(features)
        self.meter.batch(batch)
        return batch


def hf_callback(meter: StepMeter) -> Any:
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            meter.train_start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            meter.step_end()

    return Meter()


def hf_trainer(
    model: torch.nn.Module,
    features: list[dict[str, Any]],
    spec: Spec,
    recipe: dict[str, Any],
    steps: int,
    **kwargs: Any,
) -> Any:
    """A ``transformers.Trainer`` for ``steps`` optimizer steps; ``kwargs`` go to the Trainer (collator, callbacks)."""
    from transformers import Trainer, TrainingArguments

    from tunelab.tasks.optim import warmup_steps

    args = TrainingArguments(
        output_dir=recipe["output_dir"],  # nothing is saved
        max_steps=steps,
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=recipe["lr"],
        weight_decay=recipe["weight_decay"],
        adam_beta1=recipe["betas"][0],
        adam_beta2=recipe["betas"][1],
        adam_epsilon=recipe["eps"],
        optim=spec.hf_optim,
        lr_scheduler_type=recipe["scheduler"],
        warmup_steps=warmup_steps(recipe, steps),  # counted as tunelab counts them
        max_grad_norm=recipe["max_grad_norm"],
        seed=spec.seed,
        bf16=hf_bf16(spec),
        use_cpu=spec.device == "cpu",
        train_sampling_strategy="group_by_length" if spec.hf_group_by_length else "random",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=features, **kwargs)


def hf_bf16(spec: Spec) -> bool:
    return spec.device == "cuda" and torch.cuda.is_bf16_supported()


def run_hf(spec: Spec, workdir: Path) -> dict[str, Any]:
    """``transformers.Trainer`` on the examples tunelab encoded, with HF's default padding collator: a warm-up
    Trainer (``max_steps=warmup``, discarded), then the timed one."""
    import transformers
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    recipe = json.loads((workdir / "hf_recipe.json").read_text())
    examples = json.loads((workdir / "train_examples.json").read_text())
    features = [{**ex, "attention_mask": [1] * len(ex["input_ids"])} for ex in examples]
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    transformers.set_seed(spec.seed)
    model = build_hf_model(recipe, tokenizer)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=recipe["pad_to_multiple_of"])
    reset_peak_memory(torch.device(spec.device))
    freed = True
    if spec.warmup:
        warm = hf_trainer(model, features, spec, recipe, spec.warmup, data_collator=collator)
        warm.train()
        optimizer, warm = weakref.ref(warm.optimizer), None
        freed = collected(optimizer)
    meter = StepMeter(torch.device(spec.device))
    trainer = hf_trainer(
        model,
        features,
        spec,
        recipe,
        spec.steps,
        data_collator=CountingCollator(collator, meter),
        callbacks=[hf_callback(meter)],
    )
    output = trainer.train()
    return {
        **meter.result(),
        "mean_loss": output.training_loss,
        **model_facts(model),
        "precision": "bf16-mixed" if hf_bf16(spec) else "32-true",
        "data_hash": data_hash(examples),
        "warmup_freed": freed,
    }


# --------------------------------------------------------------------------- the parent: prepare, alternate, report


def choose_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    return requested


def prepare(spec: Spec, workdir: Path) -> tuple[Spec, list[str], dict[str, Any]]:
    """Compose tunelab's config (dropping unknown extra overrides), encode the training examples once with tunelab's
    SFT data module, and write what the workers read: spec, HF recipe, examples, tokenizer."""
    from tunelab.data.datamodule import SFTDataModule
    from tunelab.models.loading import load_tokenizer

    base = compose(base_overrides(spec, str(workdir / "tunelab_out")))
    kept, dropped = known_overrides(base, spec.tunelab_overrides)
    spec = replace(spec, tunelab_overrides=kept)
    cfg = tunelab_config(spec, str(workdir / "tunelab_out"))
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    datamodule = SFTDataModule(cfg.data, tokenizer, cfg.paths.cache_dir)
    datamodule.setup()
    train = datamodule.splits["train"]
    if len(train) < spec.steps * spec.batch_size:
        raise SystemExit(f"only {len(train)} training examples for {spec.steps} steps of {spec.batch_size}")
    examples = [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in train]
    (workdir / "train_examples.json").write_text(json.dumps(examples))
    tokenizer.save_pretrained(workdir / "tokenizer")
    (workdir / "hf_recipe.json").write_text(json.dumps(hf_recipe(cfg)))
    (workdir / "spec.json").write_text(json.dumps(asdict(spec)))
    lengths = [len(ex["input_ids"]) for ex in examples]
    info = {
        "model": cfg.model.name,
        "method": cfg.method.name,
        "examples": len(examples),
        "lengths": (min(lengths), statistics.median(lengths), max(lengths)),
        "data_hash": data_hash(examples),
    }
    return spec, dropped, info


def measure_peak_flops(device: str, threads: int, smoke: bool) -> tuple[float, str]:
    """The best FLOP/s of a timed square matmul: fp32 on CPU (with the workers' threads), bf16 on a GPU."""
    torch.set_num_threads(threads)
    if device == "cuda":
        size, dtype, repeats = (2048 if smoke else 8192), torch.bfloat16, 20
    else:
        size, dtype, repeats = (512 if smoke else 2048), torch.float32, 3 if smoke else 6
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first one warms up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best, f"{str(dtype).removeprefix('torch.')} {size}x{size} matmul, best of {repeats}"


def run_worker(side: str, workdir: Path, spec: Spec, run_index: int) -> dict[str, Any]:
    """One side in a fresh process; its output goes to a log file, shown when it fails."""
    result_file = workdir / f"result_{run_index}_{side}.json"
    log_file = workdir / f"log_{run_index}_{side}.txt"
    env = {**os.environ, **WORKER_ENV, "OMP_NUM_THREADS": str(spec.threads), "MKL_NUM_THREADS": str(spec.threads)}
    command = [sys.executable, __file__, "--worker", side, "--workdir", str(workdir), "--result", str(result_file)]
    with log_file.open("w") as log:
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0 or not result_file.exists():
        raise SystemExit(f"{SIDE_NAMES[side]} run failed (exit {code}); its log ends:\n{log_file.read_text()[-4000:]}")
    return json.loads(result_file.read_text())


def example_flops(n: int, result: dict[str, Any]) -> float:
    """Model FLOPs of one n-token example (see the module docstring)."""
    weights = 6 * result["matmul_trainable"] + 4 * result["matmul_frozen"]
    return n * (weights + 12 * result["layers"] * result["width"] * n)


def summarize_run(result: dict[str, Any], peak_flops: float) -> dict[str, float]:
    """Rates over the timed fit of one run."""
    seconds = sum(result["seconds"])
    real = sum(sum(lengths) for lengths in result["lengths"])
    positions = sum(result["positions"])
    flops = sum(example_flops(n, result) for lengths in result["lengths"] for n in lengths)
    return {
        "real_tok_s": real / seconds,
        "all_tok_s": positions / seconds,
        "padding": 1 - real / positions,
        "step_s": statistics.median(result["seconds"]),
        "peak_mem_mib": result["peak_mem_mib"] or float("nan"),
        "mfu": flops / seconds / peak_flops,
        "real_tokens": real,
        "seconds": seconds,
    }


def median_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def print_table(medians: dict[str, dict[str, float]], memory_label: str) -> None:
    ratio = {
        key: medians["tunelab"][key] / medians["hf"][key]
        for key in ("real_tok_s", "all_tok_s", "step_s", "peak_mem_mib", "mfu")
    }
    print(f"\n| side | real tok/s | all tok/s | padding | median step (s) | {memory_label} | MFU |")
    print("|---|---|---|---|---|---|---|")
    for side in SIDES:
        m = medians[side]
        print(
            f"| {SIDE_NAMES[side]} | {m['real_tok_s']:,.0f} | {m['all_tok_s']:,.0f} | {m['padding']:.1%} | "
            f"{m['step_s']:.3f} | {m['peak_mem_mib']:,.0f} | {m['mfu']:.2%} |"
        )
    print(
        f"| tunelab / HF | {ratio['real_tok_s']:.2f}x | {ratio['all_tok_s']:.2f}x | - | {ratio['step_s']:.2f}x | "
        f"{ratio['peak_mem_mib']:.2f}x | {ratio['mfu']:.2f}x |"
    )


def print_header(spec: Spec, repeats: int, info: dict[str, Any], dropped: list[str], peak: tuple[float, str]) -> None:
    low, mid, high = info["lengths"]
    print(
        f"workload {spec.workload}: model={info['model']} method={info['method']}, data=hpo_qa training split: "
        f"first {info['examples']} examples (tokens min / median / max {low} / {mid:g} / {high}), "
        f"batch {spec.batch_size}, max_length {spec.max_length}"
    )
    print(
        f"steps: {spec.warmup} warm-up + {spec.steps} timed, {repeats} round(s) in alternating order; "
        f"device {spec.device}, {spec.threads} torch threads; "
        f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    print(f"tunelab overrides: {' '.join(spec.tunelab_overrides) or '(none)'}")
    for override in dropped:
        print(f"note: dropped --tunelab-overrides {override}: the composed config has no such key")
    print(f"HF: optim={spec.hf_optim}, sampler={'group_by_length' if spec.hf_group_by_length else 'random'}")
    print(f"matmul peak: {peak[0] / 1e9:,.1f} GFLOP/s ({peak[1]})", flush=True)


def run_line(round_index: int, side: str, result: dict[str, Any], row: dict[str, float]) -> str:
    return (
        f"round {round_index + 1} {SIDE_NAMES[side]}: {row['real_tokens']:,} real tokens in {row['seconds']:.2f} s = "
        f"{row['real_tok_s']:,.0f} real tok/s, median step {row['step_s']:.3f} s, peak {row['peak_mem_mib']:,.0f} MiB, "
        f"precision {result['precision']}, {result['threads']} threads, mean loss {result['mean_loss']:.4f}"
        + ("" if result["warmup_freed"] else " (warning: the warm-up optimizer was not freed: it counts in the peak)")
    )


def compare(spec: Spec, repeats: int, json_path: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="vs-hf-") as tmp:
        workdir = Path(tmp)
        spec, dropped, info = prepare(spec, workdir)
        peak = measure_peak_flops(spec.device, spec.threads, spec.smoke)
        print_header(spec, repeats, info, dropped, peak)
        results: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        rows: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
        for round_index in range(repeats):
            order = SIDES if round_index % 2 == 0 else SIDES[::-1]
            for side in order:
                result = run_worker(side, workdir, spec, round_index)
                row = summarize_run(result, peak[0])
                results[side].append(result)
                rows[side].append(row)
                print(run_line(round_index, side, result, row), flush=True)
    hashes = {result["data_hash"] for side in SIDES for result in results[side]} | {info["data_hash"]}
    if len(hashes) != 1:
        raise SystemExit(f"the two sides trained on different token ids (hashes {sorted(hashes)})")
    tokens = {row["real_tokens"] for side in SIDES for row in rows[side]}
    if len(tokens) != 1:
        raise SystemExit(f"the timed fits processed different numbers of real tokens: {sorted(tokens)}")
    facts = results["tunelab"][0]
    print(
        f"token ids: identical on both sides (sha256 {info['data_hash']}), {next(iter(tokens)):,} real tokens per "
        f"timed fit; params {facts['params_total']:,} ({facts['params_trainable']:,} trainable); model FLOPs of an "
        f"n-token example: n * (6 * {facts['matmul_trainable']:,} + 4 * {facts['matmul_frozen']:,} + "
        f"12 * {facts['layers']} * {facts['width']} * n)"
    )
    medians = {side: median_rows(rows[side]) for side in SIDES}
    memory_label = "peak GPU alloc (MiB)" if spec.device == "cuda" else "peak RSS (MiB)"
    print_table(medians, memory_label)
    if json_path:
        payload = {"spec": asdict(spec), "dropped": dropped, "peak_flops": peak, "medians": medians, "runs": results}
        json_path.write_text(json.dumps(payload, indent=2, default=str))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("lora", "full", "gpt2"), default="lora")
    parser.add_argument("--method", choices=("lora", "full"), default=None, help="default: lora for lora, else full")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 8; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 2; smoke 1)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of (tunelab, HF) runs (default 3; smoke 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--tunelab-overrides",
        nargs="*",
        default=DEFAULT_TUNELAB_OVERRIDES,
        help="train.py overrides for tunelab only; replace the default (give the flag alone for none)",
    )
    parser.add_argument("--hf-optim", default="adamw_torch_fused", help="TrainingArguments.optim (HF's default)")
    parser.add_argument("--hf-group-by-length", action="store_true", help="HF's length-grouped sampler")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1 warm-up + 2 timed steps, 1 round")
    parser.add_argument("--json", type=Path, default=None, help="write every raw figure here")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker_main(args: argparse.Namespace) -> None:
    spec = Spec(**json.loads((args.workdir / "spec.json").read_text()))
    torch.set_num_threads(spec.threads)
    result = (run_tunelab if args.worker == "tunelab" else run_hf)(spec, args.workdir)
    args.result.write_text(json.dumps(result))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    if args.worker:
        worker_main(args)
        return
    steps = args.steps if args.steps is not None else (2 if args.smoke else 8)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 3)
    spec = Spec(
        workload=args.workload,
        method=args.method or ("lora" if args.workload == "lora" else "full"),
        smoke=args.smoke,
        warmup=warmup,
        steps=steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        examples=steps * args.batch_size,
        seed=args.seed,
        threads=args.threads,
        device=choose_device(args.device),
        tunelab_overrides=list(args.tunelab_overrides),
        hf_optim=args.hf_optim,
        hf_group_by_length=args.hf_group_by_length,
    )
    compare(spec, repeats, args.json)


if __name__ == "__main__":
    main()
