#!/usr/bin/env bash
# Every method, trained briefly on the same easy Countdown setting, then evaluated base vs trained
# on the same held-out examples (README "Methods side by side"). ~35 min on a 2-core CPU.
#   bash examples/compare_methods.sh
set -euo pipefail
cd "$(dirname "$0")/.."
COMMON="--task countdown --source easy --reward partial --steps ${STEPS:-10} --batch-size 4 --group-size 4
        --train-size 64 --max-new-tokens 24 --reflect-tokens 32 --lr 2e-4 --eval-every 0"
for method in grpo r3 score rerest; do
    python train_r3.py $COMMON --method $method --out-dir runs/compare-$method
done
for method in grpo r3 rerest; do
    python eval.py --task countdown --source easy --n ${N:-50} --max-new-tokens 24 --reflect-tokens 32 \
        --adapter runs/compare-$method --compare --out evals/compare
done
python eval.py --task countdown --source easy --n ${N:-50} --max-new-tokens 24 --method score \
    --adapter runs/compare-score --compare --out evals/compare
