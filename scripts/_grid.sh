# Sourced by the run_*.sh scripts: run_grid ROOT EXPERIMENT "TASKS" "METHODS" "SEEDS", with the caller's
# associative array `args` (extra overrides per method). Every run is minilm, batch 32, max_length 128, 3 epochs
# (SST-2: the first 10,000 examples of a seed-42 shuffle of train), dynamic padding with length-grouped batches,
# warmup 6%, evaluation after every epoch, the best epoch by the task's selection metric on the GLUE dev set.
# A run completed in ROOT or already committed under results/EXPERIMENT is skipped; an interrupted one resumes
# from its last epoch checkpoint (same output dir). WORKERS=N runs N workers side by side, each with
# trainer.num_threads=THREADS (default 1 when N > 1): a run is taken by one worker through a lock file.
run_grid() {
  local workers=${WORKERS:-1} w
  for ((w = 1; w < workers; w++)); do
    THREADS=${THREADS:-1} run_grid_worker "$@" &
  done
  THREADS=${THREADS:-$([ "$workers" -gt 1 ] && echo 1 || echo 0)} run_grid_worker "$@"
  wait
}

run_grid_worker() {
  local root=$1 experiment=$2 tasks=$3 methods=$4 seeds=$5 task method seed out extra cmd
  for seed in $seeds; do
    for task in $tasks; do
      extra=""; [ "$task" = sst2 ] && extra="data.max_train_samples=10000"
      for method in $methods; do
        out=$root/$task/$method/seed$seed
        if grep -qs '"status": "completed"' "$out/metrics.json" "results/$experiment/$task/$method/seed$seed/metrics.json"; then
          echo "skip $out"; continue
        fi
        cmd="python -m sparse_peft.train method=$method task=glue/$task model=minilm trainer.seed=$seed trainer.epochs=3 \
trainer.batch_size=32 data.max_length=128 ${args[$method]} $extra logger.wandb.mode=offline \
trainer.progress_bar=false trainer.num_threads=$THREADS trainer.output_dir=$out"
        mkdir -p "$out"
        # -E 75: another worker holds this run; anything else is the run's own exit status.
        flock -n -E 75 "$out/.lock" bash -c "grep -qs '\"status\": \"completed\"' '$out/metrics.json' && exit 0; \
echo '$cmd' > '$out/command.txt'; echo '$cmd'; $cmd >> '$out/train.log' 2>&1"
        case $? in 0) ;; 75) echo "busy $out" ;; *) echo "FAILED $out (see $out/train.log)" ;; esac
      done
    done
  done
}
