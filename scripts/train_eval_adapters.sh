#!/usr/bin/env bash
# Trains the adapters that the evaluation suites compare with equal budgets and runs both suites, one heavy job at a
# time (2-core CPU): the ICL suite's five variants, `ccmem eval --suite icl`, then the chit-chat CPU group (Gisting,
# CCM-concat: one budget; chitchat_concat_nr/merge_nr.yaml exist but were not run for lack of CPU time) and `ccmem eval --suite chitchat`.
# A failed step is logged and the rest goes on. Log: runs/train_eval_adapters.log
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
step() { echo "=== $* $(date -u +%H:%M:%S)"; "$@" || echo "=== FAILED ($?): $*"; }
for cfg in icl_concat icl_gist icl_merge icl_concat_nr icl_merge_nr; do
  [ -f "adapters/${cfg//_/-}/adapter.safetensors" ] || step $PY -m ccmem train "configs/$cfg.yaml"
done
step $PY -m ccmem eval --suite icl
for cfg in chitchat_gist chitchat_concat_cpu; do
  [ -f "adapters/${cfg//_/-}/adapter.safetensors" ] || step $PY -m ccmem train "configs/$cfg.yaml"
done
step $PY -m ccmem eval --suite chitchat --limit 40
echo "=== done $(date -u +%H:%M:%S)"
