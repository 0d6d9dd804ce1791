"""The environment is the lock: what runs the suite is exactly ``requirements/lock.txt`` (+ the asset packages),
torch is the CPU build with no CUDA packages, and the suite itself cannot reach the network."""

from __future__ import annotations

import re
import socket
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement

from .conftest import ROOT, loopback_only_connect

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")
NOT_LOCKED = {"tunelab", "pip"}  # the project itself (editable) and the venv's own installer


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line of a requirements file."""
    found = (PIN.match(line) for line in path.read_text().splitlines())
    return {normalized(m.group(1)): m.group(2) for m in found if m}


def installed() -> dict[str, str]:
    """Distributions installed in the environment's site-packages (not the copies that packages vendor, such as
    setuptools/_vendor, which land on sys.path once pkg_resources is imported)."""
    site_packages = sysconfig.get_paths()["purelib"]
    return {normalized(d.metadata["Name"]): d.version for d in metadata.distributions(path=[site_packages])}


def test_the_running_environment_is_exactly_the_lock():
    locked = pins(ROOT / "requirements" / "lock.txt") | pins(ROOT / "requirements" / "assets.txt")
    present = {name: version for name, version in installed().items() if name not in NOT_LOCKED}
    if torch.cuda.is_available():  # scripts/setup.sh takes PyPI's CUDA build (and its runtime packages) there
        pytest.skip("a GPU machine installs torch's CUDA build beside the lock")
    assert {n: (locked.get(n), v) for n, v in present.items() if locked.get(n) != v} == {}
    assert sorted(set(locked) - set(present)) == []


def declared_requirements() -> list[Requirement]:
    """pyproject.toml's dependencies and its dev extra (what scripts/lock.sh resolves)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


def test_the_lock_satisfies_every_declared_range():
    """A pyproject.toml edit without a re-lock fails here (offline; ``bash scripts/lock.sh --check`` asks uv)."""
    locked = pins(ROOT / "requirements" / "lock.txt")
    misses = {
        str(requirement): locked.get(normalized(requirement.name))
        for requirement in declared_requirements()
        if not requirement.specifier.contains(locked.get(normalized(requirement.name), "0.0.0a0"), prereleases=True)
    }
    assert misses == {}, f"re-lock with: bash scripts/lock.sh ({misses})"


def test_the_lock_pins_the_cpu_torch_and_no_cuda_packages():
    locked = pins(ROOT / "requirements" / "lock.txt")
    assert locked["torch"] == "2.13.0+cpu"
    assert [name for name in locked if name.startswith(("nvidia-", "triton", "cuda-"))] == []


def test_the_suite_refuses_sockets_beyond_loopback(monkeypatch):
    calls = []
    monkeypatch.setattr("tests.conftest._connect", lambda sock, address: calls.append(address))
    assert socket.socket.connect is loopback_only_connect
    with pytest.raises(RuntimeError, match="runs offline"):
        loopback_only_connect(None, ("192.0.2.1", 443))
    loopback_only_connect(None, ("127.0.0.1", 29500))
    assert calls == [("127.0.0.1", 29500)]
