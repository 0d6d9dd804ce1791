"""``generate(cfg)``: talk to a trained run (``python generate.py``, configs/generate.yaml).

The source is exactly one of ``adapter_path=<run>/adapter``, ``merged_path=<run>/merged`` or
``ckpt_path=<run>/checkpoints/best.ckpt``, loaded as :mod:`tunelab.runs` loads a finished run (an export with its
saved tokenizer; a checkpoint into the model its run config rebuilds, as ``evaluate.py`` does). Every prompt is
rendered with the chat template the run trained with, ``add_generation_prompt=True``, exactly as training rendered
its prompts (:func:`tunelab.data.tokenization.render_prompt_ids`): an export's saved tokenizer carries it, a
checkpoint's run config names it (``model.chat_template`` or the tokenizer's own). The run folder is data, not
code: a checkpoint is read as tensors only and the model's own code runs only when this command line says
``model.trust_remote_code=true``, whatever the run's config says.

The mode is exactly one of:

- ``prompt="..."``: one user turn; its answer is printed;
- ``chat=true``: each line of stdin is a user turn, answered with the whole conversation so far (the history is
  kept as messages) and printed, until EOF or a line ``/exit`` (piped stdin works as typed lines);
- ``input=<in.jsonl> output=<out.jsonl>``: one ``{"prompt": str | [turns]}`` or ``{"messages": [turns]}`` object
  a line (turns ``{"role": system|user|assistant, "content": str}`` ending with the user's turn); the output holds
  each good record with its answer under ``"response"`` (replacing one the record had), in input order, written
  atomically (:func:`tunelab.atomic.write_text`). A bad record (not a JSON object, no prompt, a bad turn, a prompt
  that leaves no room for ``generation.max_new_tokens`` in the model's positions) is located by file, line and
  field: ``on_error=fail`` ends the run with it before anything is written, ``skip`` leaves it out and warns, as
  ``data.on_error`` does in training.

stdout holds only the answers (one per prompt or chat turn; loading messages go to stderr). Generation is greedy
unless ``generation.do_sample=true`` (then ``temperature`` / ``top_p``), after seeding with ``seed``. An answer is
the new text only, special tokens dropped, stripped. Config and data errors are :class:`tunelab.errors.TunelabError`
(``generate.py`` prints them as one line, exit status 2); settings are checked before any weights load.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from omegaconf import DictConfig, OmegaConf

from tunelab.atomic import write_text
from tunelab.build import build_components
from tunelab.config_checks import Bound, is_count, is_number, is_whole
from tunelab.data.formats import Message
from tunelab.data.loading import (
    ON_ERROR,
    WARN_REASONS,
    LoadResult,
    checked_load,
    load_json_lines,
    no_examples,
    skip_or_fail,
)
from tunelab.data.preference import parse_turns
from tunelab.data.prompts import EncodedPrompt, PromptCollator, PromptExample, prompt_turns
from tunelab.data.tokenization import render_prompt_ids
from tunelab.errors import ConfigError, DataError
from tunelab.generation import generate_tokens
from tunelab.registry import load_plugins
from tunelab.runs import checkpoint_state, locate_run, model_from_export
from tunelab.tasks import OBJECTIVES

SOURCES = ("adapter_path", "merged_path", "ckpt_path")
EXIT = "/exit"  # a chat line that ends the chat
BOUNDS = (
    Bound("generation.max_new_tokens", is_count, "a token count >= 1", "set generation.max_new_tokens=128, say"),
    Bound("generation.do_sample", lambda v: isinstance(v, bool), "true or false", "set generation.do_sample=true"),
    Bound(
        "generation.temperature",
        lambda v: is_number(v) and v > 0,
        "a temperature > 0",
        "set generation.temperature=0.7, say (greedy decoding is generation.do_sample=false)",
    ),
    Bound(
        "generation.top_p",
        lambda v: is_number(v) and 0 < v <= 1,
        "a probability mass in (0, 1]",
        "set generation.top_p=0.9, say (1.0 keeps every token)",
    ),
    Bound("batch_size", is_count, "a count >= 1 (input records answered together)", "set batch_size=8, say"),
    Bound("on_error", lambda v: v in ON_ERROR, f"one of {list(ON_ERROR)}", "set on_error=fail or on_error=skip"),
    Bound("chat", lambda v: isinstance(v, bool), "true or false", "set chat=true"),
    Bound("verbose", lambda v: isinstance(v, bool), "true or false", "set verbose=true"),
    Bound("seed", is_whole, "a whole number", "set seed=0, say"),
)


def check_settings(cfg: DictConfig) -> str:
    """The mode cfg asks for (``"prompt"``, ``"chat"`` or ``"input"``) once every setting is valid; else a
    :class:`ConfigError` naming the key, the value and the fix."""
    for bound in BOUNDS:
        value = OmegaConf.select(cfg, bound.key)
        if not bound.valid(value):
            raise ConfigError(f"{bound.key}={value} must be {bound.expected}; {bound.fix}")
    given = [key for key in SOURCES if cfg.get(key)]
    if len(given) != 1:
        detail = f" (got {' and '.join(given)})" if given else ""
        raise ConfigError(
            "give exactly one of adapter_path=<run>/adapter, merged_path=<run>/merged or "
            f"ckpt_path=<run>/checkpoints/best.ckpt{detail}"
        )
    modes = [mode for mode, on in (("prompt", cfg.prompt is not None), ("chat", cfg.chat), ("input", cfg.input)) if on]
    if len(modes) != 1:
        detail = f" (got {' and '.join(modes)})" if modes else ""
        raise ConfigError(
            f'give exactly one of prompt="...", chat=true or input=<prompts.jsonl> output=<answers.jsonl>{detail}'
        )
    if bool(cfg.input) != bool(cfg.output):
        raise ConfigError("input= and output= go together: input=<prompts.jsonl> output=<answers.jsonl>")
    if modes == ["prompt"] and not str(cfg.prompt).strip():
        raise ConfigError('prompt= is blank; give the user turn, e.g. prompt="What is a fever?"')
    return modes[0]


def record_turns(row: Mapping[str, Any]) -> tuple[Message, ...]:
    """The conversation of one input record: ``{"prompt": str | [turns]}`` (as ``data=prompts`` reads it) or
    ``{"messages": [turns]}``, ending with the user's turn; DataError naming the field."""
    if "messages" not in row:
        if "prompt" not in row:
            raise DataError("no prompt: each record needs a 'prompt' or a 'messages' field", field="prompt")
        return prompt_turns(row)
    if "prompt" in row:
        raise DataError("give one of 'prompt' or 'messages', not both", field="messages")
    turns = parse_turns(row["messages"], "messages")
    if turns[-1]["role"] != "user":
        last = f"messages[{len(turns) - 1}].role"
        raise DataError(f"the conversation must end with the user's turn, got {turns[-1]['role']!r}", field=last)
    return tuple(turns)


def read_prompts(path: Path, on_error: str) -> LoadResult:
    """The :class:`PromptExample` of every good record of the json-lines file ``path`` (see :func:`record_turns`),
    bad ones raised or skipped per ``on_error``; DataError when none is usable."""
    examples, skipped = load_json_lines(
        path, lambda row, line: PromptExample(record_turns(row), row, line, f"{path}:{line}"), on_error=on_error
    )
    return checked_load(path, LoadResult(examples, skipped))


def load_source(cfg: DictConfig) -> tuple[torch.nn.Module, Any]:
    """Model and tokenizer of the one source ``cfg`` names (``adapter_path``, ``merged_path`` or ``ckpt_path``).

    ``cfg.model.trust_remote_code`` replaces the run's own for every load; a run whose objective trains a head other
    than the causal LM (``task=classification``, ``task=reward``) is refused."""
    export = cfg.adapter_path or cfg.merged_path
    run_dir, run_cfg = locate_run(cfg.ckpt_path, export)
    if cfg.merged_path and not (Path(cfg.merged_path) / "config.json").is_file():
        raise ConfigError(
            f"{cfg.merged_path} holds no config.json: merged_path= is the plain transformers folder <run>/merged "
            "(written with export.merged=true); an adapter folder is adapter_path="
        )
    load_plugins(run_cfg.get("plugins") or ())
    head, _ = OBJECTIVES[run_cfg.task.name].head(run_cfg)
    if head != "causal_lm":
        raise ConfigError(f"{run_dir} trained task={run_cfg.task.name} (a {head} head): generate.py needs a causal LM")
    run_cfg.paths.cache_dir = cfg.paths.cache_dir
    run_cfg.model.trust_remote_code = cfg.model.trust_remote_code
    if export:
        return model_from_export(run_cfg, Path(export), cfg.paths.cache_dir, cfg.model.trust_remote_code)
    state = checkpoint_state(cfg.ckpt_path)
    components = build_components(run_cfg)
    module = components["module"]
    module.load_state_dict(state, strict=module.strict_loading)
    return module.model, components["tokenizer"]


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when one is visible, else the CPU; otherwise the torch device ``name``, which must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name} is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no GPU is visible; use device=cpu (or auto)")
    return device


@dataclass(frozen=True)
class Generator:
    """A loaded run's model and tokenizer with the generation settings: renders conversations with the tokenizer's
    chat template and answers them."""

    model: torch.nn.Module
    tokenizer: Any
    max_new_tokens: int
    sampling: dict[str, Any]  # {} (greedy) or do_sample / temperature / top_p
    positions: int | None  # the model's context length; None when its config does not say
    verbose: bool = False

    def encode(self, turns: Sequence[Message], record: dict[str, Any], source: str) -> EncodedPrompt:
        """The conversation ``turns`` rendered for generation; DataError at ``source`` when it leaves no room for
        ``max_new_tokens`` new tokens in the model's positions."""
        ids = render_prompt_ids(self.tokenizer, tuple(turns))
        if self.positions is not None and len(ids) + self.max_new_tokens > self.positions:
            raise DataError(
                f"the prompt renders to {len(ids)} tokens: with generation.max_new_tokens={self.max_new_tokens} it "
                f"passes the model's {self.positions} positions; shorten it or lower generation.max_new_tokens",
                file=source,
            )
        return EncodedPrompt(ids, record, source)

    def answer(self, prompts: Sequence[EncodedPrompt]) -> list[str]:
        """The answer to each prompt, generated together (left-padded): new text only, special tokens dropped,
        stripped. With ``verbose``, each rendered prompt goes to stderr first."""
        for prompt in prompts if self.verbose else ():
            text = self.tokenizer.decode(prompt.input_ids)
            print(
                f"[tunelab] {prompt.source}: rendered prompt ({len(prompt.input_ids)} tokens):\n{text}", file=sys.stderr
            )
        batch = PromptCollator(self.tokenizer.pad_token_id)(prompts)
        device = next(self.model.parameters()).device
        input_ids = batch["input_ids"].to(device)
        output = generate_tokens(
            self.model,
            self.tokenizer,
            input_ids,
            batch["attention_mask"].to(device),
            self.max_new_tokens,
            **self.sampling,
        )
        new_tokens = output[:, input_ids.shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def typed_lines(stream: TextIO) -> Iterator[str]:
    """The lines of ``stream``; at a terminal each is asked for with a ``> `` on stderr."""
    while True:
        if stream.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = stream.readline()
        if not line:
            return
        yield line


def chat(generator: Generator, lines: Iterable[str]) -> list[str]:
    """Each non-blank line a user turn, answered with the whole conversation so far (earlier turns and answers as
    messages) and printed; ends at the end of ``lines`` or a line ``/exit``. Returns the answers in order."""
    messages: list[Message] = []
    answers: list[str] = []
    for line in lines:
        text = line.strip()
        if text == EXIT:
            break
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        [answer] = generator.answer([generator.encode(messages, {}, f"chat turn {len(answers) + 1}")])
        print(answer, flush=True)
        messages.append({"role": "assistant", "content": answer})
        answers.append(answer)
    return answers


def answer_file(
    generator: Generator, loaded: LoadResult, source: Path, output: Path, batch_size: int, on_error: str
) -> list[str]:
    """Answer the prompts ``loaded`` from ``source`` in batches of ``batch_size`` and write ``output`` (each record
    plus its ``"response"``, one JSON object a line, atomically). A prompt too long for the model is a bad record
    of ``source`` (raised or skipped per ``on_error``). Returns the answers in order."""
    encoded, skipped = [], list(loaded.skipped)
    for example in loaded.examples:
        try:
            encoded.append(generator.encode(example.prompt, example.record, example.source))
        except DataError as error:
            skip_or_fail(source, error, on_error, skipped, line=example.line)
    if not encoded:
        raise no_examples(source, skipped)
    answers: list[str] = []
    for start in range(0, len(encoded), batch_size):
        answers += generator.answer(encoded[start : start + batch_size])
    records = [{**prompt.record, "response": answer} for prompt, answer in zip(encoded, answers, strict=True)]
    write_text(output, "".join(json.dumps(record) + "\n" for record in records))
    detail = f"; {len(skipped)} bad record(s) skipped, e.g.: {'; '.join(skipped[:WARN_REASONS])}" if skipped else ""
    print(f"[tunelab] {len(records)} answer(s) written to {output}{detail}", file=sys.stderr, flush=True)
    return answers


def generate(cfg: DictConfig) -> list[str]:
    """Run the mode ``cfg`` asks for (see the module docstring) on its source; return the answers in order."""
    from transformers import set_seed

    mode = check_settings(cfg)
    device = resolve_device(cfg.device)
    loaded = read_prompts(Path(cfg.input), cfg.on_error) if mode == "input" else None  # before any weights load
    with redirect_stdout(sys.stderr):
        model, tokenizer = load_source(cfg)
    settings = cfg.generation
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
    generator = Generator(
        model.to(device),
        tokenizer,
        settings.max_new_tokens,
        sampling if settings.do_sample else {},
        getattr(model.config, "max_position_embeddings", None),
        cfg.verbose,
    )
    set_seed(cfg.seed)
    if mode == "chat":
        return chat(generator, typed_lines(sys.stdin))
    if loaded is not None:
        return answer_file(generator, loaded, Path(cfg.input), Path(cfg.output), cfg.batch_size, cfg.on_error)
    [answer] = generator.answer([generator.encode([{"role": "user", "content": str(cfg.prompt)}], {}, "prompt")])
    print(answer, flush=True)
    return [answer]
