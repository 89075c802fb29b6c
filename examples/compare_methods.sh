#!/usr/bin/env bash
# Every method, trained briefly on the same easy Countdown setting, then evaluated base vs trained
# on the same held-out examples (README "Methods side by side"). ~45 min on a 2-core CPU.
# SCoRe runs 5 steps, all in Stage I (a SCoRe step samples two attempts: ~100 s a step here);
# Re-ReST samples k = 4 outputs of 16 inputs, corrects the failures, and fine-tunes (3 epochs).
#   bash examples/compare_methods.sh        # a rerun reuses finished eval examples
set -euo pipefail
cd "$(dirname "$0")/.."
COMMON="--task countdown --source easy --reward partial --batch-size 4 --group-size 4
        --train-size 64 --max-new-tokens 24 --reflect-tokens 32 --lr 2e-4 --eval-every 0"
train() { [ -e "runs/compare-$1/latest" ] || python train_r3.py $COMMON --method "$@" --out-dir "runs/compare-$1"; }
train grpo --steps 10
train r3 --steps 10
train score --steps 5 --stage1-steps 5
train rerest --train-size 16 --k 4   # Re-ReST: k samples of each of 16 inputs
for method in grpo r3 rerest; do
    python eval.py --task countdown --source easy --n ${N:-50} --max-new-tokens 24 --reflect-tokens 32 \
        --adapter runs/compare-$method --compare --out evals/compare
done
python eval.py --task countdown --source easy --n ${N:-50} --max-new-tokens 24 --method score \
    --adapter runs/compare-score --compare --out evals/compare
