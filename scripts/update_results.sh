#!/usr/bin/env bash
# Copy the small files of every completed result run (metrics.json, curve.jsonl, config.yaml, and the command:
# command.txt or Hydra's .hydra/overrides.yaml) from runs/<set>/ into results/<set>/, then regenerate each set's
# tables and plots with the report command into results/tables/<name>/ (<name>: the set's last path part) and
# paste report.md between the `<!-- <name>:start/end -->` markers of README.md and results/README.md.
# Usage: bash scripts/update_results.sh [sets...]   (default: every set in DEFAULT_SETS)
set -euo pipefail
cd "$(dirname "$0")/.."
DEFAULT_SETS="baselines experiments/sora_glue experiments/sora_glue_gpu experiments/sora_ablation experiments/sora_scheduler
  experiments/commonsense_smollm2 experiments/ist_glue experiments/ist_glue_lr
  experiments/sora_paper experiments/sora_paper_controls experiments/sparse_adapter_glue experiments/sparse_adapter_glue_v0 experiments/sparse_adapter_pruners
  experiments/pst_glue experiments/pst_dynamics"
for set in ${*:-$DEFAULT_SETS}; do
  [ -d "runs/$set" ] || [ -d "results/$set" ] || continue
  while IFS= read -r m; do
    grep -qs '"status": "completed"' "$m" || continue
    d=$(dirname "$m"); dest=results/${d#runs/}
    mkdir -p "$dest"
    cp "$d"/{metrics.json,curve.jsonl,config.yaml} "$dest"/
    for extra in command.txt .hydra/overrides.yaml; do if [ -e "$d/$extra" ]; then cp "$d/$extra" "$dest/"; fi; done
  done < <(find "runs/$set" -name metrics.json 2>/dev/null)
  [ -d "results/$set" ] || continue  # nothing completed yet
  if [ -e "runs/$set/command.txt" ]; then cp "runs/$set/command.txt" "results/$set/"; fi
  name=$(basename "$set"); tables=results/tables/$name
  grid_seed=  # a set whose rate grid ran on one seed: choice.md, each group's rate chosen on that seed's validation
  pair=()  # paired.md: every row against the baseline at its rate chosen on grid_seed, per task (report --baseline)
  case $name in
    sora_paper) grid_seed=0 pair=(--baseline method=lora,trainer.lr=chosen) ;;
    sparse_adapter_glue) grid_seed=0
      pair=(--baseline method.adapter_size=64,method.sparsity=0.0,trainer.lr=chosen) ;;  # the dense adapter
    pst_glue) grid_seed=0 pair=(--baseline method=full,trainer.lr=chosen) ;;
    ist_glue_lr) grid_seed=42 ;;
  esac
  if [ ${#pair[@]} -gt 0 ]; then pair+=(--chosen-on "trainer.seed=$grid_seed"); fi
  case $name in
    sora_glue|sora_glue_gpu|ist_glue)  # split protocol sora: the held-out test half is the reported number, validation beside it
      python -m sparse_peft.report "results/$set" --split test --out "$tables" > /dev/null
      python -m sparse_peft.report "results/$set" --split eval --out "$tables/validation" > /dev/null ;;
    sora_ablation*)  # variants of one method side by side: the varied keys are columns
      python -m sparse_peft.report "results/$set" --split test --out "$tables" \
        --group-by method,task,method.lora_r,method.sparse_lambda_2 > /dev/null ;;
    sora_scheduler)
      [ -e "results/$set/metrics.json" ] || continue
      python -m sparse_peft.report "results/$set" --stages "$tables" > /dev/null
      cp "$tables/stages.md" "$tables/report.md" ;;
    sora_paper_controls|sparse_adapter_glue*|pst_*)  # variants of one setting: the varied keys are columns
      case $name in
        sora_paper_controls) keys=method,method.train_head,method.sparse_lambda,trainer.lr ;;  # one-variable controls
        sparse_adapter_glue*) keys=method.adapter_size,method.sparsity,trainer.lr ;;
        *) keys=method,trainer.lr ;;  # pst_glue's labels (pst, pst_50, magnitude, ...) carry the sparsity
      esac
      grid_keys=${keys%,trainer.lr}
      python -m sparse_peft.report "results/$set" --split test --group-by $keys --out "$tables" "${pair[@]}" > /dev/null
      python -m sparse_peft.report "results/$set" --split eval --group-by $keys --out "$tables/validation" \
        "${pair[@]}" > /dev/null ;;
    sparse_adapter_pruners)  # SNIP's row is sparse_adapter_glue's SNIP 40% at 1e-3: the same configuration, run once
      for split in test eval; do
        out=$tables; [ $split = eval ] && out=$tables/validation
        python -m sparse_peft.report "results/$set" results/experiments/sparse_adapter_glue --split $split \
          --where task=mrpc --where method.adapter_size=64 --where method.sparsity=0.4 --where trainer.lr=0.001 \
          --group-by method.pruner,task --out "$out" > /dev/null
      done ;;
    ist_glue_lr|sora_paper)  # a learning-rate grid: each method's rate chosen on validation (choice.md), every rate's test beside it
      grid_keys=method
      python -m sparse_peft.report "results/$set" --split test --group-by method,trainer.lr --out "$tables" \
        "${pair[@]}" > /dev/null
      python -m sparse_peft.report "results/$set" --split eval --group-by method,trainer.lr --out "$tables/validation" \
        "${pair[@]}" > /dev/null ;;
    commonsense_smollm2)  # one column per commonsense test set (the runs' test split), peak memory in runs.csv
      python -m sparse_peft.report "results/$set" --split test --out "$tables" > /dev/null ;;
    *) python -m sparse_peft.report "results/$set" --out "$tables" > /dev/null ;;
  esac
  if [ "$name" = pst_glue ]; then  # paired_magnitude.md: PST's gaps to magnitude pruning at each sparsity, unrounded
    for split in test eval; do
      out=$tables; [ $split = eval ] && out=$tables/validation
      for m in pst pst_50; do  # each PST against magnitude pruning at its own sparsity, every rate of both
        b=${m/pst/magnitude}
        echo "## $m minus $b"; echo
        python -m sparse_peft.report "results/$set" --split $split --group-by $keys --paired-only \
          --where "method=$m|$b" --baseline method=$b,trainer.lr=chosen --chosen-on trainer.seed=$grid_seed
        echo
      done > "$out/paired_magnitude.md"
    done
  fi
  if [ -n "$grid_seed" ]; then
    python -m sparse_peft.report "results/$set" --choose trainer.lr --chosen-on trainer.seed="$grid_seed" \
      --group-by "$grid_keys" --out "$tables" > /dev/null
  fi
  NAME=$name python - <<'PY'
import os, re
from pathlib import Path
name = os.environ["NAME"]
table = Path(f"results/tables/{name}/report.md").read_text().strip()
for doc in (Path("README.md"), Path("results/README.md")):
    text = doc.read_text()
    pattern = rf"<!-- {name}:start -->.*?<!-- {name}:end -->"
    if re.search(pattern, text, flags=re.S):
        doc.write_text(re.sub(pattern, lambda _: f"<!-- {name}:start -->\n{table}\n<!-- {name}:end -->", text, flags=re.S))
PY
done
