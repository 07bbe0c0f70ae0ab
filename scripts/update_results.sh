#!/usr/bin/env bash
# Copy the small files of every completed result run (metrics.json, curve.jsonl, config.yaml, command.txt)
# from runs/ into results/, and regenerate the tables with the report command.
# Usage: bash scripts/update_results.sh   (after scripts/run_baselines.sh)
set -eu
cd "$(dirname "$0")/.."
for m in runs/baselines/*/*/seed*/metrics.json; do
  [ -e "$m" ] || continue
  grep -qs '"status": "completed"' "$m" || continue
  d=$(dirname "$m"); dest=results/${d#runs/}
  mkdir -p "$dest"
  cp "$d"/{metrics.json,curve.jsonl,config.yaml,command.txt} "$dest"/
done
python -m sparse_peft.report results/baselines --out results/baselines.md
