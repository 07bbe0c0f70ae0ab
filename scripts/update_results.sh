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
# The same table between the markers of README.md and results/README.md.
python - <<'PY'
import re
from pathlib import Path
table = Path("results/baselines.md").read_text().strip()
for doc in (Path("README.md"), Path("results/README.md")):
    text = re.sub(r"<!-- baselines:start -->.*?<!-- baselines:end -->",
                  lambda _: f"<!-- baselines:start -->\n{table}\n<!-- baselines:end -->", doc.read_text(), flags=re.S)
    doc.write_text(text)
PY
