#!/usr/bin/env bash
# Copy the small files of every completed result run (metrics.json, curve.jsonl, config.yaml, command.txt)
# from runs/<set>/ into results/<set>/, and regenerate each set's tables with the report command; a table is
# also written between the `<!-- <set>:start/end -->` markers of README.md and results/README.md.
# Usage: bash scripts/update_results.sh [sets...]   (default: baselines sora_comparison)
set -eu
cd "$(dirname "$0")/.."
for set in ${*:-baselines sora_comparison}; do
  for m in runs/$set/*/*/seed*/metrics.json; do
    [ -e "$m" ] || continue
    grep -qs '"status": "completed"' "$m" || continue
    d=$(dirname "$m"); dest=results/${d#runs/}
    mkdir -p "$dest"
    cp "$d"/{metrics.json,curve.jsonl,config.yaml,command.txt} "$dest"/
  done
  [ -d "results/$set" ] || continue
  # Tables, CSVs and plots in results/tables/<set>/; sora_comparison (split protocol sora) reports the held-out
  # test half (the best epoch is chosen on the validation half), and the validation table beside it.
  case $set in
    sora_comparison)
      python -m sparse_peft.report "results/$set" --split test --out "results/tables/$set" > /dev/null
      python -m sparse_peft.report "results/$set" --split eval --out "results/tables/$set/validation" > /dev/null ;;
    *) python -m sparse_peft.report "results/$set" --out "results/tables/$set" > /dev/null ;;
  esac
  SET=$set python - <<'PY'
import os, re
from pathlib import Path
name = os.environ["SET"]
table = Path(f"results/tables/{name}/report.md").read_text().strip()
for doc in (Path("README.md"), Path("results/README.md")):
    text = doc.read_text()
    pattern = rf"<!-- {name}:start -->.*?<!-- {name}:end -->"
    if re.search(pattern, text, flags=re.S):
        doc.write_text(re.sub(pattern, lambda _: f"<!-- {name}:start -->\n{table}\n<!-- {name}:end -->", text, flags=re.S))
PY
done
