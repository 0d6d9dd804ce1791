"""Data modules: local files (or a packaged data set) -> seeded splits -> tokenized batches.

:class:`SplitDataModule` holds what every task shares (splits, a resumable rank-sharded training sampler,
its position in checkpoints); :class:`SFTDataModule` adds chat examples and generation prompts.

Splits: when only ``data.path`` is given, the examples are shuffled once with ``data.split_seed`` and cut
into test (first ``test_size``), validation (next ``val_size``) and train (the rest, capped at
``train_size``). Sizes are counts (int >= 1) or fractions (float < 1). ``val_path`` / ``test_path`` give
explicit splits instead. Validation and test loaders come in pairs: teacher-forced loss batches, and
left-padded prompts of the first ``generation_samples`` examples for generated-text metrics; SFT data whose
records carry options adds a third, every multiple-choice question of the split (:mod:`tunelab.data.choices`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from tunelab.compat.torch import loader_generator
from tunelab.data.choices import ChoiceCollator, EncodedChoices, encode_sft_example
from tunelab.data.collate import (
    ClassificationCollator,
    EncodedLabeled,
    GenerationCollator,
    PackedCollator,
    TrainingCollator,
)
from tunelab.data.feedback import (
    FEEDBACK_READERS,
    FeedbackCollator,
    FeedbackExample,
    encode_feedback,
    feedback_of,
    thin_to_share,
    with_mismatched,
)
from tunelab.data.labeled import LabeledExample, load_labeled
from tunelab.data.loading import LoadResult, load_examples
from tunelab.data.preference import PreferenceCollator, PreferenceExample, encode_preference, load_preferences
from tunelab.data.records import ChatExample
from tunelab.data.sampler import ResumableSampler
from tunelab.data.tokenization import IGNORE_INDEX, EncodedExample, encode_examples
from tunelab.errors import ConfigError

log = logging.getLogger("tunelab.data")

BUILDERS = {
    "hpo_qa": "tunelab.assets.hpo_qa:ensure_hpo_qa",
    "hpo_mcq": "tunelab.assets.hpo_mcq:ensure_hpo_mcq",
    "finsent": "tunelab.assets.finsent:ensure_finsent",
    "finsent_explained": "tunelab.assets.finsent_explained:ensure_finsent_explained",
    "arith_prefs": "tunelab.assets.arithmetic:ensure_arith_prefs",
    "arith_prompts": "tunelab.assets.arithmetic:ensure_arith_prompts",
    "arith_feedback": "tunelab.assets.arithmetic:ensure_arith_feedback",
}


def build_packaged(builder: str, cache_dir: str | Path) -> Path:
    """The file a packaged data set is built into (once, in the cache)."""
    import importlib

    module, function = BUILDERS[builder].split(":")
    return getattr(importlib.import_module(module), function)(cache_dir)


def resolve_data_path(data_cfg: DictConfig, cache_dir: str | Path) -> Path:
    """The file holding the examples: built from a package (``data.builder``) or ``data.path``."""
    if data_cfg.get("builder"):
        if data_cfg.builder not in BUILDERS:
            raise ConfigError(f"data.builder={data_cfg.builder!r} is not one of {sorted(BUILDERS)}")
        return build_packaged(data_cfg.builder, cache_dir)
    if not data_cfg.get("path"):
        raise ConfigError(f"data={data_cfg.name}: set data.path to a local .jsonl/.json/.csv/.parquet file")
    return Path(data_cfg.path)


def split_size(value: float | int | None, total: int, name: str) -> int:
    """A split size from a count or a fraction of ``total``."""
    if value is None:
        return total
    if isinstance(value, float) and 0 < value < 1:
        return math.ceil(value * total)
    if int(value) != value or value < 0:
        raise ConfigError(f"data.{name}={value} must be a count >= 0 or a fraction in (0, 1)")
    return int(value)


def seeded_split(examples: list[Any], data_cfg: DictConfig) -> dict[str, list[Any]]:
    """Shuffle once with ``split_seed`` and cut test / val / train (see module docstring)."""
    generator = torch.Generator().manual_seed(data_cfg.split_seed)
    order = torch.randperm(len(examples), generator=generator).tolist()
    shuffled = [examples[i] for i in order]
    n_test = split_size(data_cfg.test_size, len(shuffled), "test_size")
    n_val = split_size(data_cfg.val_size, len(shuffled), "val_size")
    if n_test + n_val >= len(shuffled):
        raise ConfigError(
            f"data.test_size + data.val_size = {n_test + n_val} leaves no training examples out of {len(shuffled)}"
        )
    train = shuffled[n_test + n_val :]
    return {
        "test": shuffled[:n_test],
        "val": shuffled[n_test : n_test + n_val],
        "train": train[: split_size(data_cfg.train_size, len(train), "train_size")],
    }


LENGTH_GROUP_STEPS = 50  # data.group_by_length sorts runs of this many optimizer steps' samples (as HF's sampler)


class WithBatchTotal(Dataset):
    """Items looked up by the ``(index, total)`` pairs a sized :class:`ResumableSampler` yields."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        index, total = key
        return self.items[index], total


class BatchTotalCollator:
    """The task's collator, plus ``global_batch_size``: the loss normalizer of the optimizer step."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, rows: list[tuple[Any, int]]) -> dict[str, Any]:
        batch = self.collate([item for item, _ in rows])
        batch["global_batch_size"] = torch.tensor(rows[0][1])
        return batch


class SplitDataModule(LightningDataModule):
    """Splits of encoded examples and the loaders every task shares; subclasses fill ``splits`` in ``setup``
    and name their batch collator in :meth:`collator`."""

    def __init__(self, data_cfg: DictConfig, cache_dir: str | Path) -> None:
        super().__init__()
        self.cfg, self.cache_dir = data_cfg, cache_dir
        self.splits: dict[str, list[Any]] = {}
        self.report: dict[str, Any] = {}
        self._resume: dict[str, int] | None = None
        self._sampler: ResumableSampler | None = None

    def prepare_data(self) -> None:
        resolve_data_path(self.cfg, self.cache_dir)

    def collator(self) -> Any:
        raise NotImplementedError

    def raw_splits(self, load: Callable[[str | Path], list[Any]]) -> dict[str, list[Any]]:
        """train / val / test examples: ``val_path`` / ``test_path`` when given, else a seeded split."""
        examples = load(resolve_data_path(self.cfg, self.cache_dir))
        if not (self.cfg.get("val_path") or self.cfg.get("test_path")):
            return seeded_split(examples, self.cfg)
        raw = {"train": examples[: split_size(self.cfg.train_size, len(examples), "train_size")]}
        for split in ("val", "test"):
            path = self.cfg.get(f"{split}_path")
            raw[split] = load(path) if path else []
        return raw

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def num_train_batches(self) -> int:
        """Batches per epoch on this rank (all ranks see the same number)."""
        _rank, world = self._rank_and_world()
        per_rank = math.ceil(len(self.splits["train"]) / world)
        return math.ceil(per_rank / self.cfg.batch_size)

    def loss_sizes(self) -> list[int] | None:
        """Each training item's weight in the loss normalizer (SFT: its supervised tokens), or ``None`` when the
        task averages per micro-batch. With sizes, training batches carry ``global_batch_size``: the summed
        sizes of the whole optimizer step over ranks and accumulation (see :class:`ResumableSampler`)."""
        return None

    def train_collator(self) -> Any:
        """The collator of training batches (SFT may pack them); evaluation batches use :meth:`collator`."""
        return self.collator()

    def item_lengths(self) -> list[int] | None:
        """Each training item's length, for ``data.group_by_length`` (``None``: this data cannot be grouped)."""
        return None

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        sizes = self.loss_sizes()
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        global_batch = self.cfg.batch_size * accumulate * world
        lengths = self.item_lengths() if self.cfg.get("group_by_length") else None
        self._sampler = ResumableSampler(
            len(self.splits["train"]),
            shuffle=self.cfg.shuffle,
            seed=self.cfg.seed,
            rank=rank,
            world_size=world,
            sizes=sizes,
            global_batch=global_batch,
            lengths=lengths,
            group_size=global_batch * LENGTH_GROUP_STEPS,
        )
        if self._resume is not None:
            self._sampler.resume_from(self._resume["epoch"], self._resume["consumed"])
            self._resume = None
        return DataLoader(
            self.splits["train"] if sizes is None else WithBatchTotal(self.splits["train"]),
            batch_size=self.cfg.batch_size,
            sampler=self._sampler,
            collate_fn=self.train_collator() if sizes is None else BatchTotalCollator(self.train_collator()),
            num_workers=self.cfg.num_workers,
            generator=loader_generator(self.cfg.seed),
        )

    def _loader(self, items: list[Any], collate_fn: Any) -> DataLoader:
        """An evaluation loader: in order, sharded over ranks without padding."""
        rank, world = self._rank_and_world()
        return DataLoader(
            items,
            batch_size=self.cfg.eval_batch_size,
            sampler=ResumableSampler(len(items), shuffle=False, seed=0, rank=rank, world_size=world, pad=False),
            collate_fn=collate_fn,
            generator=loader_generator(self.cfg.seed),
        )

    def ordered_loader(self, split: str) -> DataLoader:
        """``split`` in order with the task's collator, in evaluation batches (sharded over ranks)."""
        return self._loader(self.splits[split], self.collator())

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        return [self.ordered_loader(split)]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def state_dict(self) -> dict[str, int]:
        """Where the training data stream stands: the epoch and the samples this rank consumed in it.

        A checkpoint written after the last batch keeps that epoch with everything consumed: Lightning then
        finishes the epoch from an empty iterator and starts the next one itself.
        """
        if self.trainer is None:
            return {}
        consumed_batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        epoch = self.trainer.fit_loop.epoch_progress.current.processed
        return {"epoch": epoch, "consumed": consumed_batches * self.cfg.batch_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = dict(state_dict) if state_dict else None


class RecordDataModule(SplitDataModule):
    """Splits of the records :meth:`read` loads from a file (a load with ``examples`` and located ``skipped``
    reasons) and :meth:`encode` turns into batchable items (with the reasons of those it drops); ``report``
    counts the skipped records per file and the examples and dropped ones per split."""

    def __init__(self, data_cfg: DictConfig, tokenizer: Any, cache_dir: str | Path) -> None:
        super().__init__(data_cfg, cache_dir)
        self.tokenizer = tokenizer

    def read(self, path: str | Path) -> Any:
        raise NotImplementedError

    def encode(self, items: list[Any]) -> tuple[list[Any], list[str]]:
        raise NotImplementedError

    def split_report(self, items: list[Any]) -> dict[str, Any]:
        """What the report adds about a split's encoded ``items`` (nothing by default)."""
        return {}

    def _load(self, path: str | Path) -> list[Any]:
        result = self.read(path)
        self.report.setdefault("skipped_records", {})[str(path)] = len(result.skipped)
        return result.examples[: self.cfg.get("limit")]

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = self.raw_splits(self._load)
        for split, items in raw.items():
            self.splits[split], dropped = self.encode(items)
            self.report[split] = {
                "examples": len(self.splits[split]),
                "dropped_overflow": len(dropped),
                **self.split_report(self.splits[split]),
            }
        log.info("Data %s: %s", self.cfg.name, {split: self.report[split]["examples"] for split in raw})


class SFTDataModule(RecordDataModule):
    """Instruction / chat examples (``data.format``) -> prompt-masked training batches; validation and test add
    left-padded prompts of the first ``generation_samples`` examples for generation metrics, and the split's
    multiple-choice questions (records with options) for multiple-choice accuracy."""

    def __init__(
        self, data_cfg: DictConfig, tokenizer: Any, cache_dir: str | Path, generation_samples: int = 0
    ) -> None:
        super().__init__(data_cfg, tokenizer, cache_dir)
        self.generation_samples = generation_samples

    def collator(self) -> TrainingCollator:
        return TrainingCollator(self.tokenizer.pad_token_id, self.cfg.pad_to_multiple_of)

    def train_collator(self) -> TrainingCollator | PackedCollator:
        return PackedCollator() if self.cfg.get("packing") else self.collator()

    def item_lengths(self) -> list[int]:
        return [len(ex.input_ids) for ex in self.splits["train"]]

    def read(self, path: str | Path) -> LoadResult:
        return load_examples(path, self.cfg.format, on_error=self.cfg.on_error, limit=self.cfg.get("limit"))

    def encode(self, items: list[ChatExample]) -> tuple[list[EncodedExample], list[str]]:
        return encode_examples(
            self.tokenizer, items, self.cfg.max_length, self.cfg.on_overflow, encode=encode_sft_example
        )

    def loss_sizes(self) -> list[int]:
        """Supervised (next-token target) positions of each training example: the SFT loss is their mean over
        the optimizer step's global batch."""
        return [sum(label != IGNORE_INDEX for label in ex.labels[1:]) for ex in self.splits["train"]]

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        """Teacher-forced loss batches, plus left-padded prompts of the first ``generation_samples`` examples, plus
        every multiple-choice question (``eval_batch_size`` questions a batch, their option rows scored
        ``eval_batch_size`` rows a forward)."""
        loaders = super()._eval_loaders(split)
        if self.generation_samples:
            prompts = self.splits[split][: self.generation_samples]
            loaders.append(self._loader(prompts, GenerationCollator(self.tokenizer.pad_token_id)))
        questions = [ex for ex in self.splits[split] if isinstance(ex, EncodedChoices)]
        if questions:
            rows = self.cfg.eval_batch_size
            collator = ChoiceCollator(self.tokenizer, self.cfg.max_length, rows, self.cfg.pad_to_multiple_of)
            loaders.append(self._loader(questions, collator))
        return loaders


class ClassificationDataModule(SplitDataModule):
    """Labeled texts (``data.labels`` is the label set, in class-index order) -> right-padded token batches
    ``{input_ids, attention_mask, labels}``; texts longer than ``max_length`` tokens are truncated (counted).
    ``report`` counts each file's problems per kind and, as :class:`RecordDataModule`, its skipped records."""

    def __init__(self, data_cfg: DictConfig, tokenizer: Any, cache_dir: str | Path) -> None:
        super().__init__(data_cfg, cache_dir)
        self.tokenizer = tokenizer
        self.labels = list(data_cfg.labels)

    def collator(self) -> ClassificationCollator:
        return ClassificationCollator(self.tokenizer.pad_token_id, self.cfg.pad_to_multiple_of)

    def _load(self, path: str | Path) -> list[LabeledExample]:
        loaded = load_labeled(
            path,
            self.cfg.format,
            self.labels,
            on_error=self.cfg.on_error,
            duplicates=self.cfg.duplicates,
            text_field=self.cfg.text_field,
            label_field=self.cfg.label_field,
        )
        self.report.setdefault("problems", {})[str(path)] = dict(loaded.report)
        self.report.setdefault("skipped_records", {})[str(path)] = len(loaded.skipped)
        return loaded.examples[: self.cfg.get("limit")]

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split, items in self.raw_splits(self._load).items():
            encoded = self.tokenizer([ex.text for ex in items], truncation=False)["input_ids"]
            truncated = sum(len(ids) > self.cfg.max_length for ids in encoded)
            self.splits[split] = [
                EncodedLabeled(ids[: self.cfg.max_length], ex.label) for ids, ex in zip(encoded, items, strict=True)
            ]
            counts = [sum(ex.label == index for ex in items) for index in range(len(self.labels))]
            self.report[split] = {"examples": len(items), "truncated": truncated, "per_label": counts}
        log.info("Data %s: %s", self.cfg.name, {k: self.report[k]["examples"] for k in ("train", "val", "test")})

    def label_counts(self) -> list[int]:
        """Training examples per class (for class weights)."""
        return self.report["train"]["per_label"]


class PreferenceDataModule(RecordDataModule):
    """Preference pairs (:mod:`tunelab.data.preference`) -> batches of 2B rows (chosen, then rejected) with each
    pair's ``index`` in its split; pairs whose prompt fills ``max_length`` are dropped (counted) or fail."""

    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(self.tokenizer.pad_token_id, self.cfg.pad_to_multiple_of)

    def read(self, path: str | Path) -> Any:
        return load_preferences(path, on_error=self.cfg.on_error)

    def encode(self, items: list[PreferenceExample]) -> tuple[list[dict[str, Any]], list[str]]:
        pairs, dropped = encode_examples(
            self.tokenizer, items, self.cfg.max_length, self.cfg.on_overflow, encode=encode_preference
        )
        return [{**pair, "index": index} for index, pair in enumerate(pairs)], dropped


class FeedbackDataModule(RecordDataModule):
    """Feedback examples (:mod:`tunelab.data.feedback`; read as ``FEEDBACK_READERS[data.kind]`` says; preference
    pairs give two examples each, after the split) -> batches of 2N rows (the completions, then the mismatched
    rows) with ``desirable`` [N] and each example's ``index`` in its split. ``data.desirable_share`` (``null``: as
    read) thins one label of each split, seeded with ``data.split_seed``, to that share of thumbs-up. ``report``
    adds per split the ``desirable`` / ``undesirable`` counts and, over the splits, ``thinned_for_share``."""

    def collator(self) -> FeedbackCollator:
        return FeedbackCollator(self.tokenizer.pad_token_id, self.cfg.pad_to_multiple_of)

    def read(self, path: str | Path) -> LoadResult:
        return FEEDBACK_READERS[self.cfg.kind](path, on_error=self.cfg.on_error)

    def encode(self, items: list[FeedbackExample | PreferenceExample]) -> tuple[list[dict[str, Any]], list[str]]:
        examples = feedback_of(items)
        share = self.cfg.get("desirable_share")
        kept = examples if share is None else thin_to_share(examples, share, self.cfg.split_seed)
        self.report["thinned_for_share"] = self.report.get("thinned_for_share", 0) + len(examples) - len(kept)
        encoded, dropped = encode_examples(
            self.tokenizer, kept, self.cfg.max_length, self.cfg.on_overflow, encode=encode_feedback
        )
        return with_mismatched(encoded, self.cfg.max_length), dropped

    def split_report(self, items: list[dict[str, Any]]) -> dict[str, int]:
        desirable = sum(item["desirable"] for item in items)
        return {"desirable": desirable, "undesirable": len(items) - desirable}
