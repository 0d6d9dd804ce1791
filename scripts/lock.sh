#!/usr/bin/env bash
# The environment lock: requirements/lock.txt pins every package tunelab installs (direct and transitive) to an
# exact version, resolved by uv from pyproject.toml's ranges (+ the dev extra) for CPython 3.11 on x86_64 Linux,
# with torch taken from the local CPU wheel (no CUDA packages). scripts/setup.sh installs exactly that file.
#
#   bash scripts/lock.sh            # upgrade: newest versions the ranges allow -> lock, rebuild .venv, full suite
#   bash scripts/lock.sh --check    # fail if the lock no longer satisfies pyproject.toml (no upgrade; CI runs it)
#
# An upgrade is a deliberate commit: run the first form, read the diff of requirements/lock.txt and the suite's
# result, and commit both together.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements/lock.txt
WHEELS=${TUNELAB_TORCH_WHEELS:-/opt/wheels}
UV=.venv/bin/uv
[ -x "$UV" ] || { echo "scripts/lock.sh: no $UV; run: bash scripts/setup.sh" >&2; exit 1; }

compile() {  # compile OUTPUT [extra uv flags]: resolve pyproject.toml into OUTPUT
    local out=$1; shift
    "$UV" pip compile pyproject.toml --extra dev --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
        --find-links "$WHEELS" --custom-compile-command "bash scripts/lock.sh" --quiet "$@" -o "$out"
}

if [ "${1:-}" = "--check" ]; then
    fresh=$(mktemp)
    cp "$LOCK" "$fresh"
    compile "$fresh"   # keeps every pinned version that still fits; changes the file only if pyproject.toml moved
    if ! diff -u "$LOCK" "$fresh"; then
        echo "scripts/lock.sh --check: $LOCK is out of step with pyproject.toml; run: bash scripts/lock.sh" >&2
        exit 1
    fi
    echo "lock: $LOCK satisfies pyproject.toml ($(grep -c '^[a-z0-9]' "$LOCK") pinned packages)"
    exit 0
fi

compile "$LOCK" --upgrade
git --no-pager diff --stat -- "$LOCK" || true
bash scripts/setup.sh
.venv/bin/python -m pytest
