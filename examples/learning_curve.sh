#!/usr/bin/env bash
# A short CPU run where the embedded 135M model has something to learn from, and its curve as a PNG.
# Why these settings: SmolLM2-135M solves almost no Countdown problem (0/48 first tries on "easy" in
# our probe), so a binary reward gives no group with signal. We use the easy source (2-3 numbers,
# 1-9), the 3-shot prompt, and --reward partial (credit for a valid equation, for the right numbers).
# METHOD=grpo (default) rewards first attempts; METHOD=r3 rewards reflections by the retry.
#   bash examples/learning_curve.sh                 # GRPO, ~10 min on a 2-core CPU
#   METHOD=r3 bash examples/learning_curve.sh       # R3, ~35 s a step
set -euo pipefail
case ${1:-} in -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac  # the header above; nothing runs
cd "$(dirname "$0")/.."
METHOD=${METHOD:-grpo}
OUT=${OUT:-runs/learning-curve-$METHOD}
RESUME=$([ -e "$OUT/latest" ] && echo --resume || true)   # a rerun continues the run it left
python train_r3.py $RESUME --task countdown --source easy --method "$METHOD" --reward partial \
    --steps ${STEPS:-30} --batch-size 4 --group-size 4 --train-size 64 --max-new-tokens 24 --reflect-tokens 32 \
    --lr 2e-4 --eval-every 0 --out-dir "$OUT" "$@"
python eval.py --plot "$OUT/metrics.jsonl" --plot-out "$OUT/metrics.png"
