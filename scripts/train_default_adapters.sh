#!/usr/bin/env bash
# Reproduce the shipped chit-chat adapters: stage 1 (full-context LoRA), then CCM-concat and CCM-merge on top,
# then the quality benchmark. On a GPU this takes minutes; on a 2-core CPU, hours.
# Extra arguments are passed to every `ccmem train` call (e.g. train.mixed_precision=bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
$PY -m ccmem train configs/chitchat_stage1.yaml "$@"
$PY -m ccmem train configs/chitchat_concat.yaml "$@" &
concat=$!
$PY -m ccmem train configs/chitchat_merge.yaml "$@"
wait $concat
$PY benchmarks/chitchat_quality.py --dialogs 200
