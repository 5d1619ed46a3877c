#!/usr/bin/env bash
# The general adapter (issue 10) on every suite beside the training-free methods and kvpress presses at equal KV.
# It was trained without stage 1, so the baselines run on the plain base model too (--base-adapter none).
#   bash scripts/eval_general.sh [ADAPTER] [SUITES] [NAME]
#   (default: adapters/general-concat, "chitchat recall icl", general)
# -> benchmarks/results/eval_{chitchat,recall,icl}_NAME.{json,md,png}
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
adapter=${1:-adapters/general-concat}
name=${3:-general}
[ -f "$adapter/adapter.safetensors" ] || {
  echo "$adapter holds no adapter: train it (scripts/continue_general.sh) or name a checkpoint folder"; exit 2; }
for suite in ${2:-chitchat recall icl}; do
  limit=40
  [ "$suite" = icl ] && limit=100
  $PY -m ccmem eval --suite "$suite" --adapter ccm_concat="$adapter" --base-adapter none --limit $limit --control \
    --name "eval_${suite}_${name}"
done
