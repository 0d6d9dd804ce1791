"""Every command README.md shows runs (issue 15): one test per command line of its ```bash blocks.

How each kind of line runs here (2 CPU cores, no GPU, no network):
- ``python train.py ...``: composed with the line's overrides plus :data:`readme_commands.STAND_INS` (debug=fast
  sizes and steps) and, where the line loads a real checkpoint, the tiny random model of the same family; then
  trained in this process, or as ``python train.py`` when it starts several processes (DDP / FSDP on CPU) or
  sweeps (``-m``, ``hparams_search``: every job runs, Optuna's 20 trials shrink to 2).
- A line that needs a GPU is refused here at config time in one sentence that names the GPU, and passes every
  config check with a GPU visible (``gpu_available`` patched); a SLURM sweep composes and checks every job.
- ``evaluate.py``, ``generate.py``, ``-m tunelab.results``, ``-m tunelab.curves`` and ``benchmarks/*.py`` run on the
  folders the lines before them wrote (``outputs/<run>`` is the default run's folder, ``<classification_run>`` that of
  ``task=classification`` ...); the benchmarks with their own smoke sizes. A ``generate.py`` line reads
  ``prompts.jsonl`` (prompts written here), writes ``answers.jsonl`` into the workspace, and reads its chat turns
  (``chat=true``) from :data:`CHAT_STDIN`.
- ``bash scripts/lock.sh --check`` runs (uv offline, from the cache setup.sh filled); ``bash scripts/lock.sh``
  (upgrade + rebuild + the whole suite) cannot run inside the suite: its script is syntax-checked and its two
  halves are the ``--check`` resolver and CI's command; the test command is checked to be ``.ci/run``'s.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from tunelab.errors import ConfigError

from .conftest import CONFIGS, ROOT, synthetic_pairs, synthetic_sentiment
from .readme_commands import PLACEHOLDER, STAND_INS, SWEEP_STAND_INS, TINY_MODELS, Command, readme_commands

pytestmark = pytest.mark.slow  # in-process training runs and subprocesses, about N minutes in all

COMMANDS = readme_commands()
TRAIN_LINES = [c for c in COMMANDS if c.program == "train.py"]
# the README folder a placeholder names -> the README line (its overrides) whose run folder it is
RUNS = {
    "outputs/<run>": (),
    "outputs/<default_run>": (),
    "outputs/<classification_run>": ("task=classification",),
    "outputs/<distill_run>": ("task=distill", "task.teacher.adapter_path=outputs/<classification_run>/adapter"),
    "outputs/<reward_run>": ("task=reward",),
    "outputs/<dpo_run>": ("task=dpo",),
    "outputs/<mcq_run>": ("data=hpo_mcq", "forgetting.sets=[verne]"),
    "multirun/lora_rank/<time>": ("experiment=lora_rank",),
}
MEDQA = {"question": "Which vitamin deficiency causes scurvy?", "answer_idx": "B", "answer": "Vitamin C"}
MEDQA_OPTIONS = {"A": "Vitamin A", "B": "Vitamin C", "C": "Vitamin D", "D": "Vitamin K"}
CHAT_STDIN = "What is a fever?\nAnd its causes?\n/exit\n"  # a chat=true line's two typed turns


def data_files(folder: Path) -> dict[str, Path]:
    """The user's own files the README names, written in their formats (alpaca, messages, medqa, PhraseBank)."""
    pairs = synthetic_pairs(80)
    rows = {
        "my_data.jsonl": pairs,
        "conversations.jsonl": [
            {"messages": [{"role": "user", "content": p["instruction"]}, {"role": "assistant", "content": p["output"]}]}
            for p in pairs
        ],
        "/data/medqa/train.jsonl": [
            {**MEDQA, "options": MEDQA_OPTIONS, "question": f"{i}. {MEDQA['question']}"} for i in range(80)
        ],
        "prompts.jsonl": [
            {"prompt": "What is a fever?"},
            {
                "messages": [
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "What is 2 plus 3?"},
                ]
            },
        ],
    }
    files = {}
    for name, records in rows.items():
        files[name] = folder / Path(name).name
        files[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    files["..."] = files["/data/medqa/train.jsonl"]
    files["answers.jsonl"] = folder / "answers.jsonl"  # written by a generate.py line
    files["Sentences_50Agree.txt"] = folder / "Sentences_50Agree.txt"
    files["Sentences_50Agree.txt"].write_text(
        "".join(f"{r['text']}@{r['label']}\n" for r in synthetic_sentiment(120)), encoding="latin-1"
    )
    return files


def command_for(overrides: tuple[str, ...]) -> Command:
    [command] = [c for c in TRAIN_LINES if tuple(c.overrides) == overrides]
    return command


class Workspace:
    """A folder standing in for the repository root: each README line's run writes to its own folder, and a
    placeholder resolves to the folder of the line that makes it (run first if no test has run it yet)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = data_files(root)
        self.done: dict[int, Path] = {}

    def folder(self, command: Command) -> Path:
        return self.root / f"line{command.line}"

    def resolve(self, word: str) -> str:
        for name, path in self.files.items():
            if word.endswith(f"={name}") or word == name:
                return word.replace(name, str(path))
        for placeholder, overrides in RUNS.items():
            if placeholder in word:
                return word.replace(placeholder, str(self.run_folder(command_for(overrides))))
        assert not PLACEHOLDER.search(word), f"no stand-in for the README placeholder in {word!r}"
        return word

    def run_folder(self, command: Command) -> Path:
        if command.line not in self.done:
            run_train_line(command, self)
        return self.done[command.line]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("readme"))


def composed(overrides: list[str], config: str = "train", hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config, overrides=overrides, return_hydra_config=hydra)


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override list of every job of a ``-m`` sweep (``key=a,b`` choices; their cartesian product)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line]
        for o in parsed
    ]
    return [list(job) for job in itertools.product(*choices)]


def config_sweeps(overrides: list[str]) -> list[str]:
    """A config's own basic-sweeper ``hydra.sweeper.params`` (``experiment=lora_rank``: ``method.r=1,2,...``) as
    command-line sweeps, except keys the command line sweeps itself (they win, as in Hydra)."""
    sweeper = composed(sweep_jobs(overrides)[0], hydra=True).hydra.sweeper
    given = {o.split("=", 1)[0] for o in overrides}
    params = {} if "optuna" in str(sweeper.get("_target_", "")).lower() else sweeper.get("params") or {}
    return [f"{key}={value}" for key, value in params.items() if key not in given]


def first_value(sweep: str) -> str:
    """``key=a,b,c,...`` -> ``key=a``: a sweep runs one job per swept key here (all of them compose and check)."""
    [override] = OverridesParser.create().parse_overrides([sweep])
    if not override.is_sweep_override():
        return sweep
    return f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"


def stand_in_overrides(command: Command, workspace: Workspace) -> list[str]:
    """The line's overrides (placeholders resolved; ``hydra.run.dir`` read as the output folder) + stand-ins."""
    words = [workspace.resolve(w) for w in command.overrides]
    words = [w.replace("hydra.run.dir=", "paths.output_dir=", 1) for w in words]
    first_job = sweep_jobs(words)[0]
    model = composed([*first_job, *STAND_INS]).model.name
    tiny = [f"model={TINY_MODELS[model]}"] if model in TINY_MODELS else []
    return [*words, *STAND_INS, *tiny]


def gpu_refusal(cfg: DictConfig) -> str | None:
    """None when the config passes every check here; else the refusal, which must name the GPU the line needs
    and be the only thing in the way: with a GPU visible, the same config passes."""
    from tunelab import config_checks, trainer_config

    try:
        config_checks.check_config(cfg)
        return None
    except ConfigError as error:
        message = str(error)
    assert "GPU" in message, message
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(trainer_config, "gpu_available", lambda: True)
        config_checks.check_config(cfg)
    return message


def launches_processes(cfg: DictConfig) -> bool:
    devices = cfg.trainer.devices
    return (isinstance(devices, int) and devices > 1) or cfg.trainer.num_nodes > 1


def run_subprocess(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """``python <args>`` from the repository root; fails the test with the output's tail unless it exits 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def with_output_dir(overrides: list[str], folder: Path) -> list[str]:
    given = any(o.startswith("paths.output_dir=") for o in overrides)
    return overrides if given else [*overrides, f"paths.output_dir={folder}"]


def run_train_line(command: Command, workspace: Workspace) -> str:
    """Run one train.py line with the stand-ins; returns how it ran (the test asserts what that run left)."""
    folder = workspace.folder(command)
    if "--cfg" in command.args:  # the line prints a composed config: run exactly that
        result = run_subprocess(["train.py", *command.args])
        assert "_target_:" in result.stdout, result.stdout
        return "printed"
    overrides = stand_in_overrides(command, workspace)
    overrides += config_sweeps(overrides) if command.multirun else []
    jobs = [with_output_dir(job, folder) for job in sweep_jobs(overrides)]
    hydra = composed(jobs[0], hydra=True).hydra
    if "slurm" in str(hydra.launcher._target_).lower():  # no cluster here: every job composes and checks
        for job in jobs:
            assert gpu_refusal(composed(job)) is not None, f"{job} runs without a GPU"
        return "cluster"
    refusals = {gpu_refusal(composed(job)) for job in jobs}
    if refusals != {None}:
        assert None not in refusals, f"{command}: some jobs need a GPU, others not"
        return "gpu"
    cfg = composed(jobs[0])
    if command.multirun or hydra.mode == "MULTIRUN":
        shrink = [s for key, extra in SWEEP_STAND_INS.items() if key in command.overrides for s in extra]
        flag = ["-m"] if command.multirun else []
        run_subprocess(["train.py", *flag, *map(first_value, overrides), *shrink, f"hydra.sweep.dir={folder}"])
        workspace.done[command.line] = folder
        return "sweep"
    output_dir = Path(cfg.paths.output_dir)
    if launches_processes(cfg):
        run_subprocess(["train.py", *overrides, f"hydra.run.dir={output_dir}"])
    else:
        from tunelab.train import run

        run(cfg)
    workspace.done[command.line] = output_dir
    return "run"


@pytest.mark.parametrize("command", TRAIN_LINES, ids=str)
def test_train_line(command: Command, workspace: Workspace) -> None:
    how = run_train_line(command, workspace) if command.line not in workspace.done else "run"
    if how == "run":
        metrics = json.loads((workspace.done[command.line] / "metrics.json").read_text())
        assert metrics["trainable_params"] > 0 and "adapter_dir" in metrics, metrics
    elif how == "sweep":
        jobs = [p for p in workspace.done[command.line].iterdir() if (p / "metrics.json").exists()]
        assert jobs, sorted(workspace.done[command.line].iterdir())


def resolved_args(command: Command, workspace: Workspace) -> list[str]:
    return [workspace.resolve(word) for word in command.args]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.program == "evaluate.py"], ids=str)
def test_evaluate_line(command: Command, workspace: Workspace) -> None:
    from tunelab.evaluate import evaluate
    from tunelab.runs import locate_run

    cfg = composed(resolved_args(command, workspace), config="evaluate")
    metrics = evaluate(cfg)
    run_dir, _ = locate_run(cfg.ckpt_path, cfg.adapter_path)
    report = json.loads((run_dir / f"eval_{cfg.split}" / "report.json").read_text())
    assert report["metrics"] == metrics, report["metrics"]
    assert (f"{cfg.split}/loss" in metrics) != cfg.harness.only, sorted(metrics)
    for task in cfg.harness.tasks:  # each harness task named scores something, also merged into the run's metrics
        scored = {key: value for key, value in metrics.items() if key.startswith(f"harness/{task}/")}
        assert scored and scored.items() <= json.loads((run_dir / "metrics.json").read_text()).items(), task


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.program == "generate.py"], ids=str)
def test_generate_line(
    command: Command, workspace: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The answers are printed (a prompt, a chat) or written to ``output=``, one record per input record."""
    from tunelab.chat import generate

    cfg = composed(resolved_args(command, workspace), config="generate")  # may train the run it names first
    monkeypatch.setattr(sys, "stdin", io.StringIO(CHAT_STDIN))
    capsys.readouterr()
    answers = generate(cfg)
    assert answers and all(isinstance(answer, str) for answer in answers), answers
    if cfg.input:
        written = [json.loads(line) for line in Path(cfg.output).read_text().splitlines()]
        inputs = [json.loads(line) for line in Path(cfg.input).read_text().splitlines()]
        assert written == [{**record, "response": answer} for record, answer in zip(inputs, answers, strict=True)]
    else:
        assert capsys.readouterr().out == "".join(f"{answer}\n" for answer in answers)


def run_module_line(command: Command, workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m tunelab.x ...`` in this process, from the workspace root (its relative outputs land there)."""
    monkeypatch.chdir(workspace.root)
    monkeypatch.setattr(sys, "argv", [command.program, *resolved_args(command, workspace)])
    runpy.run_module(command.program.removeprefix("-m "), run_name="__main__")


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.program.startswith("-m tunelab.")], ids=str)
def test_tool_line(command: Command, workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    run_module_line(command, workspace, monkeypatch)
    out = command.args[command.args.index("--out") + 1]
    written = sorted(p.name for p in workspace.root.glob(f"{Path(out).stem}*"))
    assert written and all((workspace.root / name).stat().st_size > 0 for name in written), written


def benchmark_table(stdout: str) -> dict[str, list[str]]:
    """The rows of a printed markdown table, by their first cell."""
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def check_vs_hf_trainer(stdout: str) -> None:
    """Both sides' rows (real tokens/s, positions/s, padding share) and the ratio row; the token ids agree."""
    rows = benchmark_table(stdout)
    assert {"tunelab", "HF Trainer", "tunelab / HF"} <= set(rows), stdout
    for side in ("tunelab", "HF Trainer"):
        real, positions, padding = rows[side][:3]
        assert re.fullmatch(RATE, real) and re.fullmatch(RATE, positions) and padding.endswith("%"), rows[side]
    assert float(rows["HF Trainer"][2].rstrip("%")) > 0.0, "HF's collator pads to the longest example"
    assert all(re.fullmatch(r"\d+\.\d+x", cell) for cell in rows["tunelab / HF"][:2]), rows["tunelab / HF"]
    assert "token ids: identical on both sides" in stdout


def check_startup(stdout: str) -> None:
    """One row per measure, each a median in seconds and its ratio to the bare import (1.00 for itself)."""
    rows = {line.split()[0]: line.split()[-2:] for line in stdout.splitlines()[1:] if line.strip()}
    assert rows["bare"][1] == "1.00" and {"--help", "config", "step"} <= set(rows), stdout


def check_inference_speed(stdout: str) -> None:
    rows = benchmark_table(stdout)
    assert {"teacher", "student"} <= set(rows) and "student / teacher speed:" in stdout, stdout


RATE = r"[\d,]+"
# the benchmark's own smallest size, appended to the README line (argparse keeps the last value)
BENCHMARKS = {
    "benchmarks/vs_hf_trainer.py": (["--smoke", "--steps", "2", "--repeats", "1"], check_vs_hf_trainer),
    "benchmarks/startup.py": (["--rounds", "1", "--overrides", "model=tiny", *STAND_INS], check_startup),
    "benchmarks/inference_speed.py": (["--repeats", "1"], check_inference_speed),
}


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.program.startswith("benchmarks/")], ids=str)
def test_benchmark_line(command: Command, workspace: Workspace) -> None:
    """Each benchmark runs end to end at its smallest size (not its numbers: those depend on the machine)."""
    stand_ins, check = BENCHMARKS[command.program]
    check(run_subprocess([command.program, *resolved_args(command, workspace), *stand_ins]).stdout)


def test_lock_check_line() -> None:
    """Runs as a user types it: uv reads package metadata from the registry (the PyPI index CI reaches) where its
    cache lacks it; offline, a fresh machine's cache holds the installed wheels but not every resolver's metadata."""
    [command] = [c for c in COMMANDS if c.program == "scripts/lock.sh" and c.args == ["--check"]]
    result = subprocess.run(["bash", command.program, *command.args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "satisfies pyproject.toml" in result.stdout, result.stdout + result.stderr


def test_lock_upgrade_line_is_the_check_resolver_plus_setup_and_the_suite() -> None:
    """``bash scripts/lock.sh`` (upgrade, rebuild, whole suite) cannot run inside the suite: it parses, and after
    the upgrading resolve it runs exactly the README's two set-up commands."""
    [command] = [c for c in COMMANDS if c.program == "scripts/lock.sh" and not c.args]
    assert subprocess.run(["bash", "-n", command.program], cwd=ROOT).returncode == 0
    tail = (ROOT / command.program).read_text().rstrip().splitlines()[-2:]
    assert tail == ["bash scripts/setup.sh", ".venv/bin/python -m pytest"], tail


def test_the_test_command_is_what_ci_runs() -> None:
    [command] = [c for c in COMMANDS if c.program == "-m pytest"]
    assert command.setup
    ci = (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1]
    assert ci == f"bash scripts/setup.sh && {' '.join(command.words)}", ci


def test_every_readme_command_has_a_test() -> None:
    """A README command of a kind no test here runs fails this (add a test for it above)."""
    kinds = {"train.py", "evaluate.py", "generate.py", "scripts/lock.sh", "-m pytest", *BENCHMARKS}
    untested = [str(c) for c in COMMANDS if c.program not in kinds and not c.program.startswith("-m tunelab.")]
    assert untested == []
