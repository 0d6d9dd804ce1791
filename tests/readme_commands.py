"""The shell commands README.md shows, read from its ```bash blocks, and the stand-ins that make them run here.

Every ``python train.py`` line runs with the same :data:`STAND_INS` (debug=fast sizes and steps, no progress
bar) and, where it would load a real checkpoint, a tiny random model of the same family
(:data:`TINY_MODELS`). Placeholders (``<run>``, ``data.path=...``, ``my_data.jsonl``, ``prompts.jsonl``) become
files and run folders the test builds; :data:`PLACEHOLDER` finds any left unresolved.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PROGRAMS = ("train.py", "evaluate.py", "generate.py", "-m", "benchmarks/", "scripts/")

STAND_INS = ("debug=fast", "trainer.enable_progress_bar=false")
TINY_MODELS = {
    "smollm2_135m": "tiny",
    "smollm2_135m_half": "tiny",
    "minilm_l6": "tiny_bert",
    "minilm_l3": "tiny_bert",
    "qwen3_30b_a3b": "tiny_moe",
}
# Optuna's 20 trials shrink to 1 (a basic sweep runs the first value of each swept key: ``first_value``)
SWEEP_STAND_INS = {"hparams_search=lora_optuna": ("hydra.sweeper.n_trials=1",)}


@dataclass(frozen=True)
class Command:
    """One README command: its line number, its words, and what it runs (``train.py``, ``-m tunelab.results``,
    ``benchmarks/startup.py``, ``scripts/lock.sh`` ...); ``setup``: it follows ``bash scripts/setup.sh &&``."""

    line: int
    words: tuple[str, ...]
    setup: bool = False

    @property
    def program(self) -> str:
        python = self.words[0].endswith("python")
        if python and self.words[1] == "-m":
            return f"-m {self.words[2]}"
        return self.words[1] if python or self.words[0] == "bash" else self.words[0]

    @property
    def args(self) -> list[str]:
        return list(self.words[3:] if self.program.startswith("-m ") else self.words[2:])

    @property
    def multirun(self) -> bool:
        return "-m" in self.args or "--multirun" in self.args

    @property
    def overrides(self) -> list[str]:
        """Hydra overrides of a train.py / evaluate.py line (flags such as ``-m`` and ``--cfg hydra`` left out)."""
        words, kept, skip = self.args, [], 0
        for word in words:
            if skip:
                skip -= 1
            elif word in ("--cfg", "-c", "--package", "-p"):
                skip = 1
            elif not word.startswith("-"):
                kept.append(word)
        return kept

    def __str__(self) -> str:
        return f"README.md:{self.line}: {shlex.join(self.words)}"


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every command in the ```bash blocks, continuation lines joined, comments dropped; a
    quoted word (``prompt="What is a fever?"``) stays one word when the command is split again."""
    lines, block, pending, start = [], False, "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.startswith("```"):
            block = raw.strip() == "```bash"
            continue
        if not block:
            continue
        stripped = raw.strip()
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        words = shlex.split(pending + stripped, comments=True)  # without comments; a quoted word re-quoted, kept one
        command = " ".join(word if word == "&&" else shlex.quote(word) for word in words)
        pending = ""
        if command:
            lines.append((start, command))
    return lines


def readme_commands(readme: Path = README) -> list[Command]:
    """Every README command; ``bash scripts/setup.sh && X`` gives X (marked ``setup``)."""
    commands = []
    for number, line in shell_lines(readme.read_text()):
        parts = [shlex.split(part) for part in line.split("&&")]
        setup = len(parts) == 2 and parts[0] == ["bash", "scripts/setup.sh"]
        if len(parts) > 1 and not setup:
            raise AssertionError(f"README.md:{number}: only `bash scripts/setup.sh && <command>` chains: {line}")
        commands.append(Command(number, tuple(parts[-1]), setup))
    return commands


# a README placeholder: ``<run>``, ``<time>``, ``data.path=...``
PLACEHOLDER = re.compile(r"<[^>]+>|\.\.\.")
