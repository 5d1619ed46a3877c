#!/usr/bin/env bash
# Continue the general adapter's CPU training from its committed checkpoint for `train.max_minutes` (55 by default),
# then leave the newest checkpoint (weights + optimizer state, one kept) in checkpoints/general-concat/ to commit.
# Extra arguments override the recipe, e.g. train.max_minutes=120.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -m ccmem train configs/general_concat.yaml "$@"
ls -la checkpoints/general-concat
