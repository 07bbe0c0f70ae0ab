#!/bin/bash
# Issues 12 and 15, run from a git worktree at commit 94f7ab3 (/work/wt_res) on the 2-core CPU box.
# SmolLM2-135M on the commonsense tasks at a CPU budget. Every trained method: the IST / LLM-Adapters scripts'
# LoRA setting (targets q,k,v,up,down; r 32, alpha 64, dropout 0.05; lr 2e-4; batch 16; cutoff 256; warmup 3%)
# for 48 steps (768 training examples of the 17,634 in the union of the four training files here), seed 42;
# validation: 60 of the 120 held-out training items, test: 60 items per task (the same seeded subsets for every
# method), both scored by log-likelihood (sum).
set -u
cd /work/wt_res
export SPARSE_PEFT_DATA=/work/shared/data
OUT=/work/main/results/experiments/commonsense_smollm2
GLUE=/work/main/results/experiments/ist_glue
BENCH=/work/main/benchmarks/results
COMMON="model=smollm2 task=commonsense/all trainer.max_steps=48 trainer.batch_size=16 trainer.lr=2e-4 trainer.warmup_ratio=0.03 data.max_length=256 data.max_eval_samples=60 task.eval_mode=loglik trainer.seed=42 trainer.progress_bar=false logger.wandb.mode=disabled"
INNER="+method.inner.lora_r=32 +method.inner.lora_alpha=64 +method.inner.lora_dropout=0.05 +method.inner.target_modules=[query,key,value,ffn_in,ffn_out]"
PY=.venv/bin/python
run() { name=$1; shift; echo "== $name $(date -u +%T)"; $PY -m sparse_peft.train "$@" $COMMON trainer.output_dir=$OUT/$name > $OUT/$name.log 2>&1; echo "   rc $? $(date -u +%T)"; }
step() { name=$1; shift; echo "== $name $(date -u +%T)"; "$@" > $OUT/$name.log 2>&1; echo "   rc $? $(date -u +%T)"; }
# Each step is skipped when its output is already complete (re-run this script to finish what is missing).
done_() { [ -f "$1" ] && grep -q '"status": "completed"\|"benchmark"' "$1"; }
done_ $OUT/lora/metrics.json || run lora +experiment=lora_ist_targets
done_ $OUT/lora_ist/metrics.json || run lora_ist method=ist $INNER
done_ $OUT/lora_rst/metrics.json || run lora_rst method=rst $INNER
# zero-shot: the packaged model on the same 60 test items per task
done_ $OUT/zero_shot.json || step zero_shot $PY benchmarks/commonsense_eval.py --n 60 --modes loglik --repeats 1 --batch-size 16 --out $OUT/zero_shot.json
# the two scoring modes on the trained LoRA model (greedy, 32 new tokens), two tasks
done_ $OUT/lora_modes.json || step lora_modes $PY benchmarks/commonsense_eval.py --run $OUT/lora --tasks arc_e,obqa --repeats 1 --batch-size 16 --out $OUT/lora_modes.json
done_ $OUT/dora/metrics.json || run dora +experiment=lora_ist_targets method=dora
# Issue 15 benchmark on smollm2: IST vs LoRA step time and memory, the scripts' LoRA, batch 8 x 256
done_ $BENCH/ist_step_smollm2.json || step ist_step_smollm2 $PY benchmarks/ist_step.py --model smollm2 --task commonsense/all --batch-size 8 --max-length 256 --steps 6 --warmup 2 --block 2 --mem-steps 4 --base-key lora_r=32 --base-key lora_alpha=64 --base-key "target_modules=[query,key,value,ffn_in,ffn_out]" --out $BENCH/ist_step_smollm2.json
# Issue 15, GLUE: LoRA vs LoRA+IST on MiniLM, MRPC and STS-B (RTE sits at chance for every PEFT method at this
# budget: results/README.md, baselines), the SoRA split (best checkpoint on the validation half, test half
# reported), LoRA r 8 on the six maps, lr 5e-4 for both (IST runs its base method's hyper-parameters), batch 32,
# 3 epochs, seed 42. The sweep skips jobs already complete in its dir.
step ist_glue $PY -m sparse_peft.train -m method=lora,ist task=glue/mrpc,glue/stsb task.split_protocol=sora trainer.lr=5e-4 trainer.seed=42 trainer.progress_bar=false logger.wandb.mode=disabled hydra.sweep.dir=$GLUE
echo "== done $(date -u +%T)"
