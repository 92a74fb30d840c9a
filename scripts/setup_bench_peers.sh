#!/usr/bin/env bash
# The peers bench/bench_throughput.py compares against (promptolution, DSPy), in a virtual environment of their own
# (.venv-peers), so their dependencies never mix with the project's. Only the benchmark uses it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv-peers/bin/python ]; then
  "$PYTHON" -m venv .venv-peers
fi
.venv-peers/bin/python -m pip install --quiet --upgrade pip
.venv-peers/bin/python -m pip install --quiet "promptolution==2.3.0" "dspy==3.4.1"
