#!/usr/bin/env bash
# Continue the general adapter's CPU training (configs/general_chat.yaml: the chat-template mix, warm-started from the
# plain-format run) from its committed checkpoint for `train.max_minutes` (55 by default), then leave the newest
# checkpoint (weights + optimizer state, one kept) in checkpoints/general-chat/ to commit.
# RECIPE=configs/general_concat.yaml continues the plain-format run instead; RECIPE=configs/general_chat_tail.yaml
# the run with a raw tail of one chunk (checkpoints/general-chat-tail/, warm-started from adapters/general-chat).
# Extra arguments override the recipe, e.g. train.max_minutes=120.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RECIPE=${RECIPE:-configs/general_chat.yaml}
$PY -m ccmem train "$RECIPE" "$@"
ls -la checkpoints/
