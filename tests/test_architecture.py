"""The import contract: ``[tool.importlinter]`` in pyproject.toml, checked by import-linter (built on grimp).

* ``acyclic_siblings`` over all of tunelab: no two sibling modules or packages, at any depth, import each other,
  directly or through a chain of imports;
* ``layers``: entry points -> composition root -> run folders -> axes and shared pieces -> foundations.

grimp reads every import statement, including those inside functions, so a deferred import hides no cycle.
The same check by hand, from the repository root: ``.venv/bin/lint-imports``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import tomllib

from .conftest import ROOT

PYPROJECT = ROOT / "pyproject.toml"


def lint_imports(config: Path, cwd: Path = ROOT, pythonpath: str = "") -> tuple[int, str]:
    """import-linter's command line on ``config`` (no cache written), as a subprocess: in-process, click's output
    capture closes a stream that modules imported earlier in the session still log to. (exit code, report)."""
    command = [str(Path(sys.executable).with_name("lint-imports")), str(config), "--no-cache", "--no-logo"]
    env = {
        **os.environ,
        "COLUMNS": "200",
        "NO_COLOR": "1",
        "PYTHONPATH": pythonpath or os.environ.get("PYTHONPATH", ""),
    }
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=120)
    return result.returncode, result.stdout + result.stderr


def contract(kind: str) -> dict:
    """The one contract of type ``kind`` in pyproject.toml."""
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    (found,) = (c for c in contracts if c["type"] == kind)
    return found


def test_tunelab_keeps_its_import_contract():
    code, report = lint_imports(PYPROJECT)
    assert "Contracts:" in report, report  # the contracts ran: a configuration error reports no count
    assert code == 0, f"a contract of pyproject.toml's [tool.importlinter] is broken:\n{report}"


def test_the_acyclic_contract_catches_a_cycle_hidden_in_a_function(tmp_path):
    """The same contract on a tiny package whose one cycle closes through an import inside a function: it fails,
    and its report names the two siblings (so the test above is not one that cannot fail)."""
    package = tmp_path / "cyclepkg"
    (package / "inner").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "alpha.py").write_text("from cyclepkg.inner import beta\n\nVALUE = beta\n")
    (package / "inner" / "__init__.py").write_text("")
    (package / "inner" / "beta.py").write_text("def late():\n    from cyclepkg import alpha\n\n    return alpha\n")
    (package / "leaf.py").write_text("import cyclepkg.alpha\n")  # not in the cycle: must not be blamed
    acyclic = contract("acyclic_siblings")
    assert acyclic["ancestors"] == ["tunelab"]
    options = {k: v for k, v in acyclic.items() if k not in {"ancestors", "ignore_imports", "skip_descendants"}}
    lines = ["[tool.importlinter]", 'root_package = "cyclepkg"', "", "[[tool.importlinter.contracts]]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in options.items()]  # JSON scalars are TOML too
    lines.append('ancestors = ["cyclepkg"]')
    config = tmp_path / "pyproject.toml"
    config.write_text("\n".join(lines) + "\n")
    code, report = lint_imports(config, cwd=tmp_path, pythonpath=str(tmp_path))

    assert code == 1, report
    assert "Contracts: 0 kept, 1 broken." in report, report
    assert "No cycles are allowed in cyclepkg." in report, report
    assert ".alpha -> .inner" in report or ".inner -> .alpha" in report, report
    assert ".leaf" not in report, report
