#!/usr/bin/env bash
# The BBT / BBTv2 / ClaPS benchmark of issues 5 and 6: each job embedded, one after another, on the local model.
set -euo pipefail
cd "$(dirname "$0")/.."
for cfg in bbt_dbpedia16 bbtv2_dbpedia16 claps_greedy_dbpedia16 claps_genetic_dbpedia16; do
  python -m bench.jobs "bench/jobs_cfg/$cfg.json" --title "$cfg (local SmolLM2-135M, fp32, embedded)"
done
# BBT / BBTv2 over 3 seeds, additive and prepend forms, smaller budgets (mean +- std table):
#   python -m bench.bench_soft_seeds
