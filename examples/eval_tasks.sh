#!/usr/bin/env bash
# The embedded model's two-try table on every task (docs/results.md). ~20 min on a 2-core CPU.
#   bash examples/eval_tasks.sh [--model ...]    (a rerun reuses finished examples)
set -euo pipefail
case ${1:-} in -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac  # the header above; nothing runs
cd "$(dirname "$0")/.."
python eval.py --task countdown --n ${N:-50} --out evals/tasks "$@"
python eval.py --task function_calling --n ${N_LONG:-16} --out evals/tasks "$@"
python eval.py --task math --n ${N_LONG:-16} --out evals/tasks "$@"
python eval.py --task code --n ${N_LONG:-16} --out evals/tasks "$@"
