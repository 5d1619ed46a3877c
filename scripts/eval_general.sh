#!/usr/bin/env bash
# A general adapter (issue 10) on every suite, as the milestones of its runs are read: beside the training-free
# methods and kvpress presses at equal KV, the baselines on the plain base model (--base-adapter none), and a
# reference adapter in the same run (REF, default adapters/general-chat = step 4000, the previous chat default), so
# the two meet in paired margins (`adapter_margins`). The dialog suites read both as `ccmem chat` does, with a raw tail of
# TAIL turns (default 1); ICL reads them without one. --control rows say what the right context's memory is worth.
#   bash scripts/eval_general.sh [ADAPTER] [SUITES] [NAME]
#   ADAPTER: an adapter or checkpoint folder (default: the newest checkpoint of checkpoints/general-chat-long)
#   SUITES:  any of office chitchat icl recall (default: all four; about 26 + 32 + 45 + 26 min on a 2-core CPU)
#   NAME:    suffix of the result files (default: the folder's name) -> benchmarks/results/eval_{SUITE}_general_NAME.*
#   REF=none scores the adapter alone; DRY=1 prints the commands instead of running them.
# The methods without an adapter (no/full context, window, StreamingLLM, kvpress) are read from the score cache
# (`ccmem eval --score-cache`) when an earlier run scored them on the same model, groups, budgets and code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
adapter=${1:-$(ls -d checkpoints/general-chat-long/checkpoints/step_* 2>/dev/null | sort | tail -n 1)}
[ -n "$adapter" ] && [ -f "$adapter/adapter.safetensors" ] || {
  echo "${adapter:-checkpoints/general-chat-long} holds no adapter: train it (scripts/continue_general.sh) or name an adapter folder" >&2
  exit 2; }
name=${3:-$(basename "$adapter")}
ref=${REF:-adapters/general-chat}
tail=${TAIL:-1}
pair=(--adapter "ccm_concat=$adapter")
tails=(--raw-tail "ccm_concat=$tail")
if [ "$ref" != none ]; then
  pair+=(--adapter "ccm_concat_ref=$ref")
  tails+=(--raw-tail "ccm_concat_ref=$tail")
fi
suites=${2:-office chitchat icl recall}
for suite in $suites; do
  case $suite in office|chitchat|icl|recall) ;; *) echo "unknown suite $suite: choose from office chitchat icl recall" >&2
    exit 2 ;; esac
done
# The suites compare against kvpress presses, which run in their own environment: without it every press row would be
# skipped (the results would say so in a note only), so build it first (about a minute) unless $CCMEM_KVPRESS_PYTHON
# names one.
if [ -z "${DRY:-}${NO_KVPRESS:-}" ] && [ -z "${CCMEM_KVPRESS_PYTHON:-}" ] && [ ! -f .venv-kvpress/.installed ]; then
  echo "[eval_general] no kvpress environment: building it (make kvpress-env)" >&2
  make kvpress-env || { echo "[eval_general] could not build .venv-kvpress: set CCMEM_KVPRESS_PYTHON to a python with" \
    "kvpress, or NO_KVPRESS=1 to run without the press rows" >&2; exit 2; }
fi
run() {
  if [ -n "${DRY:-}" ]; then printf '%q ' ccmem "$@" --score-cache; echo; else $PY -m ccmem "$@" --score-cache; fi
}
for suite in $suites; do
  case $suite in
    office) run eval --suite chitchat --dialogs office --format template "${pair[@]}" "${tails[@]}" --base-adapter none \
              --limit 40 --control --name "eval_chitchat_office_general_$name" ;;
    chitchat) run eval --suite chitchat --format template "${pair[@]}" "${tails[@]}" --base-adapter none --limit 40 \
              --control --name "eval_chitchat_general_$name" ;;
    icl) run eval --suite icl --ts 4,8,16 "${pair[@]}" --base-adapter none --limit 100 --control \
              --name "eval_icl_general_$name" ;;
    recall) run eval --suite recall --facts 3 --ts 4,16 --format template "${pair[@]}" "${tails[@]}" \
              --base-adapter none --presses kvzip --limit 40 --no-generate --name "eval_recall_3facts_general_$name" ;;
  esac
done
