#!/usr/bin/env bash
# Baselines for issue 2: minilm, seed 42, full / BitFit / LoRA r=8 / Houlsby adapter on RTE, MRPC, CoLA,
# STS-B and SST-2 (first 10,000 of a seed-42 shuffle of train). Budget that fits 2 CPU cores: 3 epochs,
# batch 32, max_length 128, dynamic padding with length-grouped batches (the default), warmup 6%, evaluation after every epoch, best epoch by the
# task's selection metric on the GLUE dev set. Learning rates are the usual ones for each method on
# BERT-size encoders: full 5e-5 (wd 0.01), BitFit 1e-3, LoRA 5e-4 (alpha 16, six maps), adapter 5e-4 (bn 64).
# Usage: SPARSE_PEFT_DATA=../shared/data bash scripts/run_baselines.sh [runs/baselines] [tasks...]
set -u
root=${1:-runs/baselines}; shift || true
tasks=${*:-stsb cola sst2 mrpc rte}
declare -A args=(
  [full]="trainer.lr=5e-5 trainer.weight_decay=0.01"
  [bitfit]="trainer.lr=1e-3"
  [lora]="trainer.lr=5e-4 method.lora_r=8"
  [adapter]="trainer.lr=5e-4 method.adapter_size=64"
)
for task in $tasks; do
  extra=""; [ "$task" = sst2 ] && extra="data.max_train_samples=10000"
  for method in lora full bitfit adapter; do
    out=$root/$task/$method/seed42
    # Completed here, or already committed under results/ by scripts/update_results.sh: skip.
    if grep -qs '"status": "completed"' "$out/metrics.json" "results/baselines/$task/$method/seed42/metrics.json"; then
      echo "skip $out"; continue
    fi
    cmd="python -m sparse_peft.train method=$method task=glue/$task model=minilm trainer.seed=42 trainer.epochs=3 \
trainer.batch_size=32 data.max_length=128 ${args[$method]} $extra logger.wandb.mode=offline \
trainer.progress_bar=false trainer.output_dir=$out"
    echo "$cmd"
    mkdir -p "$out"; echo "$cmd" > "$out/command.txt"
    $cmd > "$out/train.log" 2>&1 || echo "FAILED $out (see $out/train.log)"
  done
done
