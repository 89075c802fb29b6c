#!/usr/bin/env bash
# Second tries that fix first tries: R3 with a retry reward that values change and a trained first try, R3 as
# the paper, and plain GRPO at equal compute on the embedded model (docs/self_correction.md; table in
# docs/r3_vs_grpo.md).
#  1. start: one shared starting adapter, 10 GRPO steps with partial credit (the main command's warm-up).
#  2. From it, for each seed and each arm of ARMS (default: r3-anchor-retries-nearmiss r3 grpo), until BUDGET
#     sampled tokens each (R3's failure sets and --train-attempts' first attempts counted):
#       r3-anchor-progress  R3 --retry-reward progress --train-attempts: a retry earns only its gain over the
#                           failed attempt; GRPO on the same queries' first attempts in the same update
#       r3-anchor-repeat0   R3 --repeat-reward 0 --train-attempts: a retry that repeats the failed answer earns 0
#       r3-anchor-candidate r3-anchor-repeat0 with --reflect-prompt candidate: the reflection is asked for a
#                           corrected answer to try, not forbidden one
#       r3-anchor-noworse   r3-anchor-repeat0 with --retry-reward no-worse: a retry below the failed attempt's
#                           credit (a near miss traded for a made-up number) earns 0
#       r3-anchor-noworse-candidate  r3-anchor-noworse with --reflect-prompt candidate
#       r3-anchor-noworse-penalty    r3-anchor-noworse with --repeat-reward -0.5: a repeat earns less than a
#                           broken rule (with 0 both earned 0, and the reflections collapsed into copies)
#       r3-anchor-solvable  r3-anchor-repeat0 with --solvable-k 4: the failure set keeps only queries that some of
#                           4 sampled first attempts pass (pass@4 > 0), so a retry can pass; the 4 samples count
#       r3-anchor-b8        r3-anchor-repeat0 with --batch-size 8: twice the queries per step, half the steps
#       r3-anchor-solvable-pool  --solvable-k 2 from 256 queries, rebuilt every 10 steps: a larger solvable set
#                           (with 64 queries and 4 samples, r3-anchor-solvable's set shrank to 1-3 queries)
#       r3-anchor-solvable-binary  r3-anchor-solvable-pool with --reward binary: no partial credit, so a retry that
#                           drops a number (0.25) earns no more than a copy; the solvable set keeps the signal
#       r3-anchor-note      r3-anchor-repeat0 with --retry-context reflection: the retry sees the question led by
#                           the reflection as a note, not the failed attempt (whose answer a retry copied)
#       r3-anchor-note-candidate  r3-anchor-note with --reflect-prompt candidate: the reflection names an answer
#                           to try, and the retry's prompt has no other answer to take
#       r3-anchor-retries   r3-anchor-repeat0 with --train-retries: the retry tokens are trained too, with the
#                           advantage of the reflection before them (a copy earns 0, a new near miss 0.5)
#       r3-anchor-retries-noworse  r3-anchor-retries with --retry-reward no-worse: a retry below its failed
#                           attempt (a near miss traded for a made-up number) earns 0, not 0.25
#       r3-anchor-retries-noworse-t1  r3-anchor-retries-noworse sampled at --temperature 1.0, not 0.7: when all
#                           4 retries of a group copy the failed answer the group is flat and nothing is learned
#       r3-anchor-retries-unstuck  r3-anchor-retries with --repeat-advantage -0.5: a copied failed answer costs its
#                           reflection and retry 0.5 of advantage after the group normalisation, so a group
#                           whose retries all copy is no longer flat
#       r3-anchor-retries-noworse-unstuck  r3-anchor-retries-noworse with --repeat-advantage -0.5: neither a copy nor
#                           a made-up number after a near miss is a way out (2026-12-07: a third, a format error)
#       r3-anchor-retries-unstuck-candidate  r3-anchor-retries-unstuck with --reflect-prompt candidate: every seed
#                           that fixed something wrote an answer as its reflection (2026-12-07 pilot, seed 2: 0 fixes)
#       r3-anchor-retries-nearmiss  r3-anchor-retries-noworse-unstuck with --failure-credit 0.5: the failure set
#                           holds near misses only (the given numbers, the wrong value), so every retry can pass by
#                           changing operators, the edit every seed that fixed something learned (2026-12-07)
#       r3-nearmiss         R3 as the paper (below) with --failure-credit 0.5 only: does the near-miss failure set
#                           alone make retries fix, without the reward and training choices around it?
#       r3-repeat0          R3 --repeat-reward 0 (the 2026-12-01 arm)
#       r3                  R3, partial credit, the verifier's reward on the retry (the paper's retry reward)
#       grpo                plain GRPO on first attempts, partial credit
#     EXTRA=1 adds SCoRe (through Stage II) and Re-ReST (one round) from the same adapter, one seed.
#  3. eval.py, greedy, two tries, on the same N held-out problems: base, start, every run; with EVAL_FLAGS
#     (e.g. "--retry-context reflection": every row's second try asked for the same way) into its own EVALS.
#  4. examples/report.py: the table with bootstrap intervals (docs/r3_vs_grpo.md) and the curves (.png).
# JOBS runs go at once, each on CPUS/JOBS threads (2 single-threaded runs beat one run on 2 threads on a
# 2-core CPU: docs/self_correction.md). A rerun skips finished runs and evals and resumes a killed one.
# Wall time on a 2-core Xeon: docs/self_correction.md.
#   bash examples/r3_vs_grpo.sh
#   ARMS="r3-anchor-progress r3-anchor-repeat0 r3 grpo" COMPARE="r3-anchor-repeat0,grpo;r3-anchor-progress,grpo;r3-anchor-repeat0,r3;r3,grpo" \
#       bash examples/r3_vs_grpo.sh   # the 2026-12-02 run (its 4 arms)
#   SEEDS="1 2 3 4 5" BUDGET=60000 N=500 bash examples/r3_vs_grpo.sh
#   bash examples/r3_vs_grpo.sh --flags r3   # print one arm's train_r3.py flags; nothing runs
#   bash examples/r3_vs_grpo.sh --help       # this text
# COMPARE: the pairs whose differences get intervals; CURVES: the arms in the PNG (default: all).
set -euo pipefail
case ${1:-} in -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac  # the header above; nothing runs
case ${1:-} in ""|--flags) ;; *) echo "examples/r3_vs_grpo.sh: unknown argument '$1' (settings are environment variables: see --help)" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/r3-vs-grpo}; EVALS=${EVALS:-evals/r3-vs-grpo}; REPORT=${REPORT:-docs/r3_vs_grpo}
SEEDS=${SEEDS:-"1 2 3"}; ARMS=${ARMS:-"r3-anchor-retries-nearmiss r3 grpo"}; BUDGET=${BUDGET:-30000}; N=${N:-200}; JOBS=${JOBS:-2}; EXTRA=${EXTRA:-0}
EVAL_FLAGS=${EVAL_FLAGS:-}
CPUS=${CPUS:-$(nproc)}; THREADS=$(( CPUS / JOBS > 0 ? CPUS / JOBS : 1 ))
export OUT EVALS BUDGET N EVAL_FLAGS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export COMMON="--task countdown --source easy --reward partial --batch-size 4 --group-size 4 --train-size 64
        --max-new-tokens 24 --reflect-tokens 32 --temperature 0.7 --lr 2e-4 --eval-every 0 --save-every 5
        --micro-batch-tokens 0"  # the recipe's 3072 since 2026-12-07; every run before had none (an arm may set it)
train() {  # train OUT_DIR FLAGS...: skipped when finished, resumed when killed; its log in OUT_DIR.log
    local out=$1; shift
    [ -e "$out/finished" ] && return
    mkdir -p "$(dirname "$out")"
    python train_r3.py $COMMON "$@" --out-dir "$out" $([ -e "$out/args.json" ] && echo --resume) >> "$out.log" 2>&1 \
        || { echo "$(date +%T) training $out failed: see $out.log"; return 1; }  # not marked finished
    touch "$out/finished"
    echo "$(date +%T) trained $out: $(tail -n 2 "$out.log" | head -n 1)"
}
evaluate() {  # evaluate [--adapter RUN] [FLAGS]: eval.py skips the examples it already has
    mkdir -p "$EVALS"
    python eval.py --task countdown --source easy --n "$N" --max-new-tokens 24 --reflect-tokens 32 \
        --batch-size 50 --out "$EVALS" $EVAL_FLAGS "$@" >> "$EVALS/eval-$(basename "${2:-base}").log" 2>&1 \
        || { echo "$(date +%T) evaluating ${2:-the base model} failed: see $EVALS/eval-$(basename "${2:-base}").log"; return 1; }
    echo "$(date +%T) evaluated ${2:-the base model}: $(grep -o 'accuracy@t2[^|]*|[^|]*' "$EVALS/eval-$(basename "${2:-base}").log" | tail -n 1)"
}
export -f train evaluate
parallel() { xargs -d '\n' -P "$JOBS" -I{} bash -c '{}'; }  # each stdin line a command, JOBS at a time

# Every R3 choice off (the paper's R3 step), then each arm's own: a flag given twice takes the later value, and
# the embedded model's recipe (config.EMBEDDED_COUNTDOWN) fills none of them.
R3="--method r3 --init-adapter $OUT/start --warmup-steps 0 --refresh-failures 5 --steps 1000 --token-budget $BUDGET
    --failure-credit 0 --retry-reward verifier --repeat-reward none --repeat-advantage 0 --no-train-attempts --no-train-retries"
flags() {  # flags ARM: the arm's training flags
    case $1 in
        r3-anchor-progress) echo "$R3 --retry-reward progress --repeat-reward none --train-attempts" ;;
        r3-anchor-repeat0)  echo "$R3 --repeat-reward 0 --train-attempts" ;;   # the recipe's 2026-12-02 to 12-07
        r3-anchor-candidate) echo "$R3 --repeat-reward 0 --train-attempts --reflect-prompt candidate" ;;
        r3-anchor-noworse)  echo "$R3 --retry-reward no-worse --repeat-reward 0 --train-attempts" ;;
        r3-anchor-noworse-candidate) echo "$R3 --retry-reward no-worse --repeat-reward 0 --train-attempts --reflect-prompt candidate" ;;
        r3-anchor-noworse-penalty) echo "$R3 --retry-reward no-worse --repeat-reward -0.5 --train-attempts" ;;
        r3-anchor-solvable) echo "$R3 --repeat-reward 0 --train-attempts --solvable-k 4" ;;
        r3-anchor-b8)       echo "$R3 --repeat-reward 0 --train-attempts --batch-size 8" ;;
        r3-anchor-solvable-pool) echo "$R3 --repeat-reward 0 --train-attempts --solvable-k 2 --train-size 256 --refresh-failures 10" ;;
        r3-anchor-solvable-binary) echo "$R3 --repeat-reward 0 --train-attempts --solvable-k 2 --train-size 256 --refresh-failures 10 --reward binary" ;;
        r3-anchor-note)     echo "$R3 --repeat-reward 0 --train-attempts --retry-context reflection" ;;
        r3-anchor-note-candidate) echo "$R3 --repeat-reward 0 --train-attempts --retry-context reflection --reflect-prompt candidate" ;;
        r3-anchor-retries)  echo "$R3 --repeat-reward 0 --train-attempts --train-retries --micro-batch-tokens 3072" ;;  # every retry has its own long prompt: 16 in one pass took 11.7 GB
        r3-anchor-retries-noworse) echo "$R3 --retry-reward no-worse --repeat-reward 0 --train-attempts --train-retries --micro-batch-tokens 3072" ;;
        r3-anchor-retries-noworse-t1) echo "$(flags r3-anchor-retries-noworse) --temperature 1.0" ;;
        r3-anchor-retries-unstuck) echo "$(flags r3-anchor-retries) --repeat-advantage -0.5" ;;
        r3-anchor-retries-noworse-unstuck) echo "$(flags r3-anchor-retries-noworse) --repeat-advantage -0.5" ;;
        r3-anchor-retries-unstuck-candidate) echo "$(flags r3-anchor-retries-unstuck) --reflect-prompt candidate" ;;
        r3-anchor-retries-nearmiss) echo "$(flags r3-anchor-retries-noworse-unstuck) --failure-credit 0.5" ;;  # the recipe's since 2026-12-07
        r3-nearmiss)        echo "$R3 --failure-credit 0.5" ;;  # the paper's R3 step on near misses only
        r3-repeat0)         echo "$R3 --repeat-reward 0 --no-train-attempts" ;;
        r3)                 echo "$R3 --repeat-reward none --no-train-attempts" ;;  # the paper's R3 step
        grpo)               echo "--method grpo --init-adapter $OUT/start --steps 1000 --token-budget $BUDGET" ;;
        *) echo "examples/r3_vs_grpo.sh: unknown arm '$1' in ARMS" >&2; exit 2 ;;
    esac
}
for arm in $ARMS; do flags "$arm" > /dev/null; done  # an unknown arm fails now, before any training
if [ "${1:-}" = "--flags" ]; then [ -n "${2:-}" ] || { echo "examples/r3_vs_grpo.sh: --flags needs an arm (see --help)" >&2; exit 2; }
    arm=$(flags "$2"); echo $COMMON $arm; exit 0; fi  # what ARM trains with

train "$OUT/start" --method grpo --steps 10 --seed 0
# One queue, seed by seed (a run is evaluated as soon as it is trained), so a stopped script leaves whole
# seeds behind; rerun it to continue.
{   for s in $SEEDS; do
        for arm in $ARMS; do
            # unquoted flags: a flag list spanning lines ($R3 does) must not split the one-line command (12-07)
            echo "train $OUT/$arm-s$s" $(flags "$arm") "--seed $s && evaluate --adapter $OUT/$arm-s$s"
        done
        if [ "$s" = "${SEEDS%% *}" ]; then echo "evaluate"; echo "evaluate --adapter $OUT/start"; fi
    done
    if [ "$EXTRA" = 1 ]; then
        echo "train $OUT/score --method score --init-adapter $OUT/start --steps ${SCORE_STEPS:-8} --stage1-steps ${SCORE_STAGE1:-4} --seed 1 && evaluate --adapter $OUT/score --method score"
        echo "train $OUT/rerest --method rerest --init-adapter $OUT/start --train-size 32 --k 4 --sft-epochs 3 --seed 1 && evaluate --adapter $OUT/rerest"
    fi
} | parallel
python examples/report.py --evals "$EVALS" --runs "$OUT" --out "$REPORT" --order "base model,start,r3-anchor-progress,r3-anchor-repeat0,r3-anchor-candidate,r3-anchor-noworse,r3-anchor-noworse-candidate,r3-anchor-noworse-penalty,r3-anchor-solvable,r3-anchor-solvable-pool,r3-anchor-solvable-binary,r3-anchor-b8,r3-anchor-note,r3-anchor-note-candidate,r3-anchor-retries,r3-anchor-retries-noworse,r3-anchor-retries-noworse-t1,r3-anchor-retries-unstuck,r3-anchor-retries-unstuck-candidate,r3-anchor-retries-noworse-unstuck,r3-anchor-retries-nearmiss,r3-nearmiss,r3-repeat0,r3,grpo,score,rerest" \
    --compare "${COMPARE:-r3-anchor-retries-nearmiss,grpo;r3-anchor-retries-nearmiss,r3;r3,grpo}" ${CURVES:+--curves "$CURVES"}
