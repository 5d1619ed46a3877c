#!/usr/bin/env bash
# The measurements to run whenever a GPU is lent (one command, under 10 minutes; needs no model files: the
# SmolLM2-135M architecture with random weights). Run from the repository root on the GPU machine:
#
#   bash scripts/gpu_session.sh            # results land in $OUT (or ./gpu_out) and benchmarks/results/
#
# 1. exactness of parallel vs online on CUDA (scripts/gpu_check.py), every variant / backend / architecture;
# 2. training throughput, old path vs new path in one run, bf16, with the largest batch that fits
#    (benchmarks/train_throughput.py -> benchmarks/results/train_throughput_gpu.{json,md});
#    and the same with the flex backend (-> train_throughput_gpu_flex.{json,md});
# 3. parallel vs recurrent training on the new path (benchmarks/train_speed.py -> ..._gpu.{json,md}).
# The machine's python3 holds torch; ccmem runs from src/. If its transformers is not the pinned one, carry the
# wheel (see the device tool's notes) in .whl/ and it is installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$OUT/gpu_session.log"
{
  nvidia-smi --query-gpu=name,memory.total --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  timeout 120 python3 scripts/gpu_check.py
  timeout 300 python3 benchmarks/train_throughput.py --device cuda --random-smollm2 --bf16 --batch 64 --pack 4096 \
    --repeats 5 --max-batch --name train_throughput_gpu
  timeout 200 python3 benchmarks/train_throughput.py --device cuda --random-smollm2 --bf16 --batch 64 --pack 4096 \
    --repeats 5 --attn flex --name train_throughput_gpu_flex
  timeout 150 python3 benchmarks/train_speed.py --device cuda --random-smollm2 --batch 8 --repeats 3 \
    --name train_parallel_vs_recurrent_gpu
} 2>&1 | tee "$log"
cp benchmarks/results/train_throughput_gpu.* benchmarks/results/train_throughput_gpu_flex.* \
  benchmarks/results/train_parallel_vs_recurrent_gpu.* "$OUT"/ 2>/dev/null
ls -la "$OUT"
