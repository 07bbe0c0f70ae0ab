#!/usr/bin/env bash
# Baselines for issue 2: full / BitFit / LoRA r=8 / Houlsby adapter, seed 42, on RTE, MRPC, CoLA, STS-B, SST-2
# (budget and protocol: scripts/_grid.sh). Learning rates are the usual ones for each method on BERT-size
# encoders: full 5e-5 (wd 0.01), BitFit 1e-3, LoRA 5e-4 (alpha 16, six maps), adapter 5e-4 (bottleneck 64).
# Usage: SPARSE_PEFT_DATA=../shared/data bash scripts/run_baselines.sh [runs/baselines] [tasks...]
set -u
cd "$(dirname "$0")/.."
. scripts/_grid.sh
root=${1:-runs/baselines}; shift || true
declare -A args=(
  [full]="trainer.lr=5e-5 trainer.weight_decay=0.01"
  [bitfit]="trainer.lr=1e-3"
  [lora]="trainer.lr=5e-4 method.lora_r=8"
  [adapter]="trainer.lr=5e-4 method.adapter_size=64"
)
run_grid "$root" baselines "${*:-stsb cola sst2 mrpc rte}" "lora full bitfit adapter" 42
