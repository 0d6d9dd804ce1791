"""The benchmark scripts run end to end (not their numbers: those depend on the machine)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow  # subprocess runs of both benchmark sides

RATE = r"[\d,]+"


def test_vs_hf_trainer_smoke():
    """``--smoke``: tiny model, one round of tunelab and HF Trainer; the table has both rows and the ratio row
    (about 35 s on 2 CPU cores, most of it two subprocesses importing torch / transformers / Lightning)."""
    command = [sys.executable, "benchmarks/vs_hf_trainer.py", "--smoke"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1]
        for line in result.stdout.splitlines()
        if line.startswith("| ")
    }
    assert {"tunelab", "HF Trainer", "tunelab / HF"} <= set(rows), result.stdout
    for side in ("tunelab", "HF Trainer"):
        real, positions, padding = (cell.strip() for cell in rows[side][:3])
        assert re.fullmatch(RATE, real) and re.fullmatch(RATE, positions), rows[side]
        assert padding.endswith("%")
    if "note: dropped --tunelab-overrides data.packing" not in result.stdout:
        assert float(rows["tunelab"][2].strip().rstrip("%")) == 0.0, "packed batches hold no padding"
    assert float(rows["HF Trainer"][2].strip().rstrip("%")) > 0.0, "HF's collator pads to the longest example"
    assert all(re.fullmatch(r"\d+\.\d+x", cell.strip()) for cell in rows["tunelab / HF"][:2]), rows["tunelab / HF"]
    assert "token ids: identical on both sides" in result.stdout
