"""``generate.py`` (tunelab.chat) on a tiny LoRA run built once: one prompt, a piped chat, a jsonl file in and out,
refused sources and settings, and the serving round trip (the merged export in a plain transformers pipeline gives
tunelab's greedy answers, string for string)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.train import train

from .conftest import CONFIGS, ROOT, tiny_overrides

pytestmark = pytest.mark.slow  # a tiny training run and generate.py subprocesses

MAX_NEW_TOKENS = 16
FIRST, SECOND = "What is 2 plus 5?", "What is 6 plus 1?"
GOOD_RECORDS = [
    {"prompt": FIRST, "id": "a"},
    {"prompt": [{"role": "user", "content": "What is 9 plus 3?"}], "id": "b"},
    {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 4 plus 4?"}]},
    {"messages": [{"role": "user", "content": "What is 1 plus 2?"}], "response": "replaced"},
]
BAD_RECORD = {"messages": [{"role": "user", "content": "What is 3 plus 3?"}, {"role": "assistant", "content": "6"}]}
BAD_LINE = 3  # BAD_RECORD's line in the input file
BAD_REASON = "field 'messages[1].role': the conversation must end with the user's turn, got 'assistant'"
TOO_LONG = {"prompt": "one plus one " * 700}  # the file's last record: past the tiny model's 2048 positions


@pytest.fixture(scope="module")
def run_dir(alpaca_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LoRA run with its adapter, its merged model (``export.merged=true``) and its checkpoints."""
    from hydra import compose, initialize_config_dir

    output_dir = tmp_path_factory.mktemp("generate_run")
    overrides = [
        *tiny_overrides(alpaca_file, output_dir),
        "method=lora",
        "method.r=4",
        "trainer.max_epochs=2",
        "validate_before_training=false",
        "test=false",
        "export.merged=true",
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        train(compose(config_name="train", overrides=overrides))
    return output_dir


def generate_py(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``python generate.py <args>`` from the repository root, greedy, ``MAX_NEW_TOKENS`` new tokens."""
    command = [sys.executable, "generate.py", f"generation.max_new_tokens={MAX_NEW_TOKENS}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=600, env=env)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The ``error: ...`` line a refused run ends with (status 2, no stack, nothing on stdout)."""
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stdout == "", result.stdout + result.stderr
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    return last.removeprefix("error: ")


@pytest.fixture(scope="module")
def first_answer(run_dir: Path) -> str:
    """``generate.py adapter_path=... prompt=FIRST``: its stdout is the answer alone."""
    stdout = succeeded(generate_py(f"adapter_path={run_dir / 'adapter'}", f"prompt={FIRST}")).stdout
    assert stdout.endswith("\n") and stdout.strip(), repr(stdout)
    return stdout.removesuffix("\n")


def chat_history(first_answer: str) -> list[dict[str, str]]:
    """The piped chat's conversation when its second turn is asked."""
    return [
        {"role": "user", "content": FIRST},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": SECOND},
    ]


@pytest.fixture(scope="module")
def good_records(first_answer: str) -> list[dict]:
    """The input file's good records; the last is the piped chat's conversation at its second turn."""
    return [*GOOD_RECORDS, {"messages": chat_history(first_answer), "id": "chat"}]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory, good_records: list[dict]) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    records = [*good_records[: BAD_LINE - 1], BAD_RECORD, *good_records[BAD_LINE - 1 :], TOO_LONG]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def answered(run_dir: Path, prompts_file: Path) -> list[dict]:
    """``generate.py adapter_path=... input=prompts.jsonl output=... on_error=skip``: the records it wrote."""
    output = prompts_file.with_name("answers.jsonl")
    result = succeeded(
        generate_py(f"adapter_path={run_dir / 'adapter'}", f"input={prompts_file}", f"output={output}", "on_error=skip")
    )
    assert f"{prompts_file}, line {BAD_LINE}: {BAD_REASON}" in result.stderr, result.stderr
    last_line = len(prompts_file.read_text().splitlines())
    too_long = f"{prompts_file}, line {last_line}: the prompt renders to "
    assert too_long in result.stderr and "2 bad record(s) skipped" in result.stderr, result.stderr
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_single_prompt_gives_one_greedy_answer_from_every_source(run_dir: Path, first_answer: str) -> None:
    """The adapter, the merged model and the best checkpoint answer the same prompt with the same greedy text."""
    for source in (f"merged_path={run_dir / 'merged'}", f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}"):
        assert succeeded(generate_py(source, f"prompt={FIRST}")).stdout == f"{first_answer}\n", source


def test_piped_chat_answers_each_turn_with_the_history(run_dir: Path, first_answer: str, answered: list[dict]) -> None:
    """Two turns piped on stdin (a blank line between, the line after ``/exit`` unread): the first answer is the
    single prompt's; the second turn's prompt is the whole conversation (the first answer included) rendered with
    the run's chat template, and its answer is the one the same conversation gets from an input file."""
    from transformers import AutoTokenizer

    stdin = f"{FIRST}\n\n{SECOND}\n/exit\nWhat is 9 plus 9?\n"
    result = succeeded(generate_py(f"adapter_path={run_dir / 'adapter'}", "chat=true", "verbose=true", stdin=stdin))
    [from_file] = [r["response"] for r in answered if r.get("id") == "chat"]
    assert result.stdout == f"{first_answer}\n{from_file}\n", result.stdout
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    rendered = tokenizer.apply_chat_template(chat_history(first_answer), add_generation_prompt=True, return_dict=False)
    second_prompt = tokenizer.decode(rendered)
    assert f"{first_answer}<|im_end|>" in second_prompt, second_prompt
    assert f"chat turn 2: rendered prompt ({len(rendered)} tokens):\n{second_prompt}" in result.stderr, result.stderr
    assert "chat turn 3" not in result.stderr


def test_batch_file_keeps_each_good_record_and_adds_its_response(
    answered: list[dict], good_records: list[dict], first_answer: str
) -> None:
    """``on_error=skip``: the bad records (a conversation ending with an answer, a prompt past the model's positions)
    are left out and named on stderr; the others keep their fields in input order; a batched answer equals the
    single prompt's."""
    without_response = [{k: v for k, v in r.items() if k != "response"} for r in good_records]
    assert [{k: v for k, v in r.items() if k != "response"} for r in answered] == without_response
    assert all(isinstance(r["response"], str) and r["response"] for r in answered), answered
    assert answered[0]["response"] == first_answer
    assert "replaced" not in [r["response"] for r in answered]


def test_a_bad_record_fails_in_one_located_line_and_writes_nothing(run_dir: Path, prompts_file: Path) -> None:
    output = prompts_file.with_name("never_written.jsonl")
    result = generate_py(f"adapter_path={run_dir / 'adapter'}", f"input={prompts_file}", f"output={output}")
    assert one_line_error(result) == f"{prompts_file}, line {BAD_LINE}: {BAD_REASON}"
    assert not output.exists()


@pytest.mark.parametrize(
    ("sources", "reason"),
    [
        ((), "give exactly one of adapter_path=<run>/adapter, merged_path=<run>/merged or ckpt_path="),
        (("adapter", "merged"), "(got adapter_path and merged_path)"),
        (("missing",), "does not exist"),
        (("adapter as merged",), "holds no config.json: merged_path= is the plain transformers folder"),
    ],
    ids=["none", "two", "missing", "adapter-as-merged"],
)
def test_a_bad_source_is_refused_in_one_line(run_dir: Path, sources: tuple[str, ...], reason: str) -> None:
    words = {
        "adapter": f"adapter_path={run_dir / 'adapter'}",
        "merged": f"merged_path={run_dir / 'merged'}",
        "missing": f"adapter_path={run_dir / 'no_such_adapter'}",
        "adapter as merged": f"merged_path={run_dir / 'adapter'}",
    }
    assert reason in one_line_error(generate_py(*(words[s] for s in sources), f"prompt={FIRST}"))


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["generation.temperature=0"], "generation.temperature=0 must be a temperature > 0"),
        (["generation.top_p=1.5"], "generation.top_p=1.5 must be a probability mass in (0, 1]"),
        (["generation.max_new_tokens=0"], "generation.max_new_tokens=0 must be a token count >= 1"),
        (["on_error=ignore"], "on_error=ignore must be one of ['fail', 'skip']"),
        (["prompt=null"], 'give exactly one of prompt="...", chat=true or input='),
        (["chat=true"], "(got prompt and chat)"),
        (["input=prompts.jsonl"], "(got prompt and input)"),
        (["prompt=null", "input=prompts.jsonl"], "input= and output= go together"),
    ],
)
def test_settings_are_refused_before_any_weights_load(compose_cfg, overrides: list[str], reason: str) -> None:
    from tunelab.chat import check_settings
    from tunelab.errors import ConfigError

    cfg = compose_cfg(["adapter_path=x", "prompt=hi", *overrides], config_name="generate")
    with pytest.raises(ConfigError) as refused:
        check_settings(cfg)
    assert reason in str(refused.value)


def test_sampling_is_seeded(run_dir: Path, compose_cfg, capsys: pytest.CaptureFixture) -> None:
    """``generation.do_sample=true``: the same seed gives the same answer; the answer is what was printed."""
    from tunelab.chat import generate

    def sampled(seed: int) -> str:
        overrides = [f"merged_path={run_dir / 'merged'}", f"prompt={FIRST}", "generation.do_sample=true"]
        cfg = compose_cfg([*overrides, "generation.temperature=2.0", f"seed={seed}", "device=cpu"], "generate")
        [answer] = generate(cfg)
        assert capsys.readouterr().out == f"{answer}\n"
        return answer

    assert sampled(1) == sampled(1)


def test_merged_export_serves_in_a_plain_transformers_pipeline(run_dir: Path, answered: list[dict]) -> None:
    """The serving round trip: ``transformers.pipeline("text-generation", model=<run>/merged)`` alone (the export's
    tokenizer and chat template, no tunelab code) answers the test prompts greedily with exactly the strings
    generate.py wrote from the adapter (the pipeline's answer stripped, as tunelab's are)."""
    from transformers import pipeline

    serve = pipeline("text-generation", model=str(run_dir / "merged"), device="cpu")
    for record in answered:
        messages = record.get("messages") or record["prompt"]
        messages = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
        [served] = serve(messages, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        assert served["generated_text"][-1]["role"] == "assistant"
        assert served["generated_text"][-1]["content"].strip() == record["response"], record
