#!/usr/bin/env bash
# Issue 10's capacity question: two cool-down branches of configs/general_chat_capacity.yaml from one long-run
# checkpoint, the same data order and steps, differing in the LoRA only: rank 8 on q/k/v/o (adapters/general-chat-cap-r8)
# and rank 32 on q/k/v/o + gate/up/down grown from the same weights (adapters/general-chat-cap-grow; init_grow: it
# starts computing exactly what the checkpoint computes). Each branch resumes its own checkpoint when started again.
#   bash scripts/capacity_pair.sh [CHECKPOINT]   (default: the newest of checkpoints/general-chat-long)
# Then read them paired on the dialog suites:
#   REF=adapters/general-chat-cap-r8 bash scripts/eval_general.sh adapters/general-chat-cap-grow "chitchat office" capacity
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
start=${1:-$(ls -d checkpoints/general-chat-long/checkpoints/step_* 2>/dev/null | sort | tail -n 1)}
[ -n "$start" ] && [ -f "$start/adapter.safetensors" ] || { echo "no checkpoint to start from: name one" >&2; exit 2; }
# the start is copied with its trainer state and its run's recipe (what the branches' lineage totals are read from),
# so the long run moving on (it keeps one checkpoint) cannot take it away between or during the branches
if [ ! -f checkpoints/capacity-start/adapter.safetensors ]; then
  mkdir -p checkpoints/capacity-start
  cp "$start"/* checkpoints/capacity-start/
  cp "$(dirname "$(dirname "$start")")"/recipe.yaml checkpoints/capacity-start/
fi
echo "[capacity_pair] both branches start from $start (copied to checkpoints/capacity-start)"
$PY -m ccmem train configs/general_chat_capacity.yaml init_adapter=checkpoints/capacity-start
$PY -m ccmem train configs/general_chat_capacity.yaml init_adapter=checkpoints/capacity-start init_grow=true \
  compression.lora_r=32 compression.lora_alpha=64 \
  "compression.target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]" \
  train.output_dir=checkpoints/general-chat-cap-grow output=adapters/general-chat-cap-grow
