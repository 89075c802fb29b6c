#!/usr/bin/env bash
# R3 vs plain GRPO at equal compute on the embedded model (docs/results.md, "R3 vs GRPO at equal compute").
#  1. start: one shared starting adapter, 10 GRPO steps with partial credit (the main command's warm-up).
#  2. From it, for each seed: R3 (failure set rebuilt every 5 steps) and GRPO, both with partial credit
#     (the binary reward gave R3 almost no signal here: docs/results.md), each until BUDGET sampled tokens --
#     compute is counted in sampled tokens, R3's failure sets included. SCoRe (through Stage II) and Re-ReST (one round) from the same adapter, one seed.
#  3. eval.py, greedy, two tries, on the same N held-out problems: base, start, every run.
#  4. examples/report.py: the table with bootstrap intervals (docs/r3_vs_grpo.md) and the curves (.png).
# A rerun skips finished runs and evals and resumes a killed one. ~1.5 h on a 2-core CPU.
#   bash examples/r3_vs_grpo.sh
#   SEEDS="1 2 3 4 5" BUDGET=20000 N=500 bash examples/r3_vs_grpo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/r3-vs-grpo}; EVALS=${EVALS:-evals/r3-vs-grpo}; REPORT=${REPORT:-docs/r3_vs_grpo}
SEEDS=${SEEDS:-"1 2 3"}; BUDGET=${BUDGET:-6000}; N=${N:-200}
COMMON="--task countdown --source easy --reward partial --batch-size 4 --group-size 4 --train-size 64
        --max-new-tokens 24 --reflect-tokens 32 --temperature 0.7 --lr 2e-4 --eval-every 0 --save-every 5"
train() {  # train OUT_DIR FLAGS...: skipped when finished, resumed when killed
    local out=$1; shift
    [ -e "$out/finished" ] && return
    python train_r3.py $COMMON "$@" --out-dir "$out" $([ -e "$out/args.json" ] && echo --resume)
    touch "$out/finished"
}
train "$OUT/start" --method grpo --steps 10 --seed 0
for s in $SEEDS; do
    train "$OUT/r3-s$s" --method r3 --init-adapter "$OUT/start" --warmup-steps 0 --refresh-failures 5 --steps 1000 \
        --token-budget "$BUDGET" --seed "$s"
    train "$OUT/grpo-s$s" --method grpo --init-adapter "$OUT/start" --steps 1000 --token-budget "$BUDGET" --seed "$s"
done
train "$OUT/score" --method score --init-adapter "$OUT/start" --steps ${SCORE_STEPS:-8} --stage1-steps ${SCORE_STAGE1:-4} --seed 1
train "$OUT/rerest" --method rerest --init-adapter "$OUT/start" --train-size 32 --k 4 --sft-epochs 3 --seed 1
evaluate() { python eval.py --task countdown --source easy --n "$N" --max-new-tokens 24 --reflect-tokens 32 \
                 --batch-size 50 --out "$EVALS" "$@"; }
evaluate
for run in "$OUT"/*/; do
    case "$(basename "$run")" in score) evaluate --adapter "$run" --method score ;; *) evaluate --adapter "$run" ;; esac
done
python examples/report.py --evals "$EVALS" --runs "$OUT" --out "$REPORT"
