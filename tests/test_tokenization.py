"""Prompt masking, truncation policy and batch collation on the real SmolLM2 tokenizer and chat template."""

from __future__ import annotations

import functools
import operator

import pytest
import torch

from tunelab.data.collate import GenerationCollator, TrainingCollator
from tunelab.data.records import ChatExample
from tunelab.data.sampler import ResumableSampler
from tunelab.data.tokenization import IGNORE_INDEX, encode_example, encode_examples, render_prompt_ids
from tunelab.errors import DataError

EXAMPLE = ChatExample(
    prompt=({"role": "user", "content": "What is Microcephaly?"},),
    response="Head circumference below the 3rd centile.",
    source="mem, line 1",
)


def test_only_the_answer_and_end_of_turn_are_supervised(tokenizer):
    encoded = encode_example(tokenizer, EXAMPLE, max_length=256)
    prompt_ids = render_prompt_ids(tokenizer, EXAMPLE.prompt)
    assert encoded.prompt_length == len(prompt_ids)
    assert encoded.input_ids[: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE_INDEX for label in encoded.labels[: len(prompt_ids)])
    supervised = [label for label in encoded.labels if label != IGNORE_INDEX]
    assert supervised == encoded.input_ids[len(prompt_ids) :]
    assert tokenizer.decode(supervised) == "Head circumference below the 3rd centile.<|im_end|>\n"
    assert "What is Microcephaly?" in tokenizer.decode(encoded.input_ids[: len(prompt_ids)])


def test_truncation_keeps_supervised_tokens_or_drops_and_counts(tokenizer):
    prompt_length = len(render_prompt_ids(tokenizer, EXAMPLE.prompt))
    clipped = encode_example(tokenizer, EXAMPLE, max_length=prompt_length + 2)
    assert len(clipped.input_ids) == prompt_length + 2
    assert sum(label != IGNORE_INDEX for label in clipped.labels) == 2
    kept, dropped = encode_examples(tokenizer, [EXAMPLE, EXAMPLE], max_length=prompt_length, on_overflow="drop")
    assert kept == [] and len(dropped) == 2 and "mem, line 1" in dropped[0]
    with pytest.raises(DataError, match=r"mem, line 1: prompt is longer than the context"):
        encode_examples(tokenizer, [EXAMPLE], max_length=prompt_length, on_overflow="fail")


def test_collators_pad_labels_with_ignore_and_prompts_on_the_left(tokenizer):
    short = encode_example(tokenizer, EXAMPLE, max_length=256)
    long = encode_example(
        tokenizer, ChatExample(EXAMPLE.prompt, EXAMPLE.response + " It is a sign of many syndromes.", "m"), 256
    )
    batch = TrainingCollator(tokenizer.pad_token_id)([short, long])
    width = len(long.input_ids)
    assert batch["input_ids"].shape == (2, width)
    assert batch["labels"][0, len(short.input_ids) :].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][0].sum() == len(short.input_ids)
    prompts = GenerationCollator(tokenizer.pad_token_id)([short, long])
    assert prompts["prompt_attention_mask"][:, -1].eq(1).all()
    assert prompts["references"] == [short.response, long.response]


def test_sampler_shards_ranks_and_resumes_mid_epoch():
    full = list(ResumableSampler(10, shuffle=True, seed=3))
    assert sorted(full) == list(range(10))
    ranks = [list(ResumableSampler(10, shuffle=True, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]
    assert set(functools.reduce(operator.iadd, ranks, [])) == set(range(10))
    resumed = ResumableSampler(10, shuffle=True, seed=3)
    resumed.resume_from(epoch=0, consumed=4)
    assert list(resumed) == full[4:]
    assert list(resumed) == full  # the skip applies to one iteration only
    other_epoch = ResumableSampler(10, shuffle=True, seed=3)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != full
    assert torch.equal(torch.tensor(list(ResumableSampler(5, shuffle=False, seed=0))), torch.arange(5))


def test_sized_sampler_gives_each_sample_its_global_batch_total():
    sizes = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    single = list(ResumableSampler(10, shuffle=True, seed=3, sizes=sizes, global_batch=4))
    order = [index for index, _ in single]
    for position, (_index, total) in enumerate(single):
        start = position // 4 * 4
        assert total == sum(sizes[i] for i in order[start : start + 4])
    assert single[-1][1] == sum(sizes[i] for i in order[8:])  # the last, partial step
    # 2 ranks x 2 per micro-batch: the same global batches, so the same totals for every sample
    ranks = [
        ResumableSampler(10, shuffle=True, seed=3, rank=r, world_size=2, sizes=sizes, global_batch=4) for r in (0, 1)
    ]
    assert sorted([*ranks[0], *ranks[1]]) == sorted(single)
