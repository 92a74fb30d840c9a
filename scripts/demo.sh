#!/usr/bin/env bash
# One command for a fresh machine: venv, install, run the demo (embedded: no Postgres/Redis needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/promptopt demo "$@"
