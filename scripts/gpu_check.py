"""GPU check (run on a CUDA machine): the exactness of parallel vs online on CUDA for every variant, backend and
architecture, in fp32 and bf16, and a bf16-autocast training step. Prints one line per case and a summary."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import ARCHS, tiny_ccm  # noqa: E402
from test_exactness import EPISODES, online, parallel, tail_logits  # noqa: E402

from ccmem.training import TrainConfig, Trainer  # noqa: E402


def check(arch, variant, attn, dtype) -> float:
    ccm = tiny_ccm(arch, variant, attn, sink=True)
    ccm.model.to("cuda", dtype)
    ids, am = parallel(ccm, EPISODES, "left")
    with torch.no_grad():
        out = ccm.model(input_ids=ids.cuda(), **ccm.parallel_inputs(ids.cuda(), am.cuda()))
    s = online(ccm, EPISODES)
    logits, _ = s.logits([t for _, t in EPISODES])
    par = tail_logits(out.logits, am, EPISODES, "left")
    return max(float((par[b] - logits[b, : len(t)]).abs().max()) for b, (_, t) in enumerate(EPISODES))


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(0))
    worst = {torch.float32: 0.0, torch.bfloat16: 0.0}
    for dtype in worst:
        for arch in ARCHS:
            for variant in ("concat_recur", "merge_recur", "concat", "merge"):
                for attn in ("sdpa", "eager"):
                    err = check(arch, variant, attn, dtype)
                    worst[dtype] = max(worst[dtype], err)
                    print(f"{str(dtype):15s} {arch:8s} {variant:13s} {attn:6s} max|parallel-online| = {err:.2e}")
    from test_training import key_task, make_toy_ccm

    ccm = make_toy_ccm()
    ccm.model.cuda()
    tr = Trainer(ccm, key_task(256, 0), TrainConfig(output_dir="/tmp/gpu_tr", max_steps=100, batch_size=16, lr=1e-2,
                                                    mixed_precision="bf16"))
    t0 = time.time()
    h = tr.fit()
    print(f"bf16 training on cuda: loss {h[0]['loss']:.3f} -> {h[-1]['loss']:.4f} in {time.time() - t0:.1f}s")
    print(f"SUMMARY fp32 worst {worst[torch.float32]:.2e} (tol 1e-4: {'OK' if worst[torch.float32] < 1e-4 else 'FAIL'})"
          f"; bf16 worst {worst[torch.bfloat16]:.2e}")


if __name__ == "__main__":
    main()
