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
  case $set in
    sora_comparison)  # split protocol sora: the held-out test half is the reported number
      { echo "Test split (best epoch chosen on the validation split):"; echo
        python -m sparse_peft.report "results/$set" --split test --retained
        echo; echo "Validation split:"; echo
        python -m sparse_peft.report "results/$set" --split eval; } > "results/$set.md" ;;
    *) python -m sparse_peft.report "results/$set" --out "results/$set.md" > /dev/null ;;
  esac
  SET=$set python - <<'PY'
import os, re
from pathlib import Path
name = os.environ["SET"]
table = Path(f"results/{name}.md").read_text().strip()
for doc in (Path("README.md"), Path("results/README.md")):
    text = doc.read_text()
    pattern = rf"<!-- {name}:start -->.*?<!-- {name}:end -->"
    if re.search(pattern, text, flags=re.S):
        doc.write_text(re.sub(pattern, lambda _: f"<!-- {name}:start -->\n{table}\n<!-- {name}:end -->", text, flags=re.S))
PY
done
