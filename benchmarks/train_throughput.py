"""Training throughput of the parallel forward: the old path (each episode left-padded to the longest of its batch,
logits from the first target row to the end) vs the new path (episodes packed into rows with block-diagonal mask
rules, logits on target rows only), in one run, for SmolLM2-135M at the chit-chat and ICL recipe shapes, concat and
merge. Both paths share what cannot be switched off any more: the gated LoRA computed on ⟨COMP⟩ rows only and the
merge means as cumulative sums.

Episodes are synthetic token ids with the length statistics of the recipes (so the script runs anywhere, also on a
GPU machine without the datasets): chit-chat t uniform in 1..12 turns of 6..60 tokens (mean about 18), input and
output about 20 tokens; ICL k uniform in 1..16 demonstrations of about 14 tokens, a 10-token query and a 3-token
answer.

    python benchmarks/train_throughput.py                              # CPU, real SmolLM2 weights, fp32
    python benchmarks/train_throughput.py --device cuda --random-smollm2 --bf16 --batch 64 \\
        --name train_throughput_gpu                                    # one GPU
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, smollm2_for_timing, write_results  # noqa: E402

from ccmem import CompressedModel, CompressionConfig  # noqa: E402
from ccmem.data import Collator, Episode  # noqa: E402
from ccmem.data.collate import keep_for_loss, lm_loss, lm_loss_at, loss_positions  # noqa: E402


def synthetic(shape: str, n: int, vocab: int, seed: int) -> list[Episode]:
    r = random.Random(seed)
    tok = lambda k: [r.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    out = []
    for _ in range(n):
        if shape == "chitchat":
            t = r.randint(1, 12)
            turn = lambda: max(6, min(60, int(r.gauss(18, 8))))  # noqa: E731
            out.append(Episode([tok(turn()) for _ in range(t)], tok(turn() + 2), tok(turn())))
        else:
            k = r.randint(1, 16)
            out.append(Episode([tok(r.randint(10, 18)) for _ in range(k)], tok(10), tok(3)))
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(ccm, eps, path: str, pack: int, bf16: bool):
    """One forward + backward over ``eps``; returns (loss, real tokens)."""
    col = Collator(ccm.tokens, ccm.config.variant, max_length=4096, pack=pack if path == "new" else 0)
    b = {k: v.to(ccm.device) for k, v in col(eps).items()}
    extra = ccm.parallel_inputs(b["input_ids"], b["attention_mask"], segments=b.get("segments"))
    dev = "cuda" if ccm.device.type == "cuda" else "cpu"
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
        if path == "new":
            keep = loss_positions(b["labels"])
            logits = ccm.model(input_ids=b["input_ids"], use_cache=False, logits_to_keep=keep, **extra).logits
            loss = lm_loss_at(logits, b["labels"], keep)
        else:
            keep = keep_for_loss(b["labels"])
            logits = ccm.model(input_ids=b["input_ids"], use_cache=False, logits_to_keep=keep, **extra).logits
            loss = lm_loss(logits, b["labels"])
    loss.backward()
    _sync(dev)
    return float(loss.detach()), int(b["attention_mask"].sum()), tuple(b["input_ids"].shape)


def measure(ccm, eps, path, pack, bf16, repeats) -> dict:
    ccm.model.zero_grad(set_to_none=True)
    step(ccm, eps, path, pack, bf16)  # warm-up
    times, loss, tokens, shape = [], 0.0, 0, ()
    if ccm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss, tokens, shape = step(ccm, eps, path, pack, bf16)
        times.append(time.perf_counter() - t0)
        ccm.model.zero_grad(set_to_none=True)
    dt = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if ccm.device.type == "cuda" else None
    return {"tokens_per_s": tokens / dt, "samples_per_s": len(eps) / dt, "step_s": dt, "loss": loss,
            "tokens": tokens, "batch_shape": list(shape), "peak_gib": peak}


def largest_batch(ccm, shape, vocab, path, pack, bf16, start: int, cap: int = 4096) -> int | None:
    """Largest power-of-two batch whose step fits in GPU memory (None on a CPU)."""
    if ccm.device.type != "cuda":
        return None
    ok, b = None, start
    while b <= cap:
        try:
            step(ccm, synthetic(shape, b, vocab, seed=b), path, pack, bf16)
            ok = b
            b *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            ccm.model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-smollm2", action="store_true", help="SmolLM2-135M architecture with random weights")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (the GPU recipes' mixed precision)")
    ap.add_argument("--batch", type=int, default=8, help="episodes per step")
    ap.add_argument("--pack", type=int, default=1024, help="tokens per packed row (new path)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batch", action="store_true", help="also search the largest batch that fits (GPU)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flex"],
                    help="attention backend (flex: BlockMask from the rule functions; training needs a GPU)")
    ap.add_argument("--name", default="train_throughput")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, name = smollm2_for_timing(args.random_smollm2)
    model.to(args.device)
    vocab = 49152
    rows = []
    for variant in ("concat_recur", "merge_recur"):
        ccm = CompressedModel.attach(model, CompressionConfig(variant=variant, n_tok=2, lora_dropout=0.0),
                                     attn_implementation=args.attn)
        ccm.model.train()
        for shape in ("chitchat", "icl"):
            eps = synthetic(shape, args.batch, vocab, seed=1)
            res = {p: measure(ccm, eps, p, args.pack, args.bf16, args.repeats) for p in ("old", "new")}
            for p in ("old", "new"):
                mb = largest_batch(ccm, shape, vocab, p, args.pack, args.bf16, args.batch) if args.max_batch else None
                rows.append({"model": name, "attn": args.attn, "variant": variant, "shape": shape, "path": p,
                             "batch": args.batch,
                             **res[p], "largest_batch": mb,
                             "speedup_vs_old": res[p]["tokens_per_s"] / res["old"]["tokens_per_s"]})
                print(rows[-1], flush=True)
            assert abs(res["old"]["loss"] - res["new"]["loss"]) < 1e-2 * max(1.0, abs(res["old"]["loss"])), res
        ccm.detach(remove_weights=True)
    head = next(r for r in rows if r["variant"] == "concat_recur" and r["shape"] == "chitchat" and r["path"] == "new")
    on_gpu = args.device.startswith("cuda")
    card = torch.cuda.get_device_name() if on_gpu else "cpu"
    headline = {"metric": "speedup_new_vs_old_chitchat_concat", "value": round(head["speedup_vs_old"], 3),
                "target": 10.0 if on_gpu else 1.0, "higher_is_better": True, "unit": "x",
                "meaning": f"new-path / old-path training tokens/s, SmolLM2-135M, chit-chat shape, CCM-concat, "
                           f"batch {args.batch}, {'bf16' if args.bf16 else 'fp32'}, on {card} (same run, same "
                           f"episodes); new-path tokens/s = {head['tokens_per_s']:.0f}"}
    cols = ["variant", "shape", "path", "batch", "batch_shape", "tokens", "tokens_per_s", "samples_per_s", "step_s",
            "speedup_vs_old", "peak_gib", "largest_batch", "loss"]
    table = ("# Training throughput: old path (padded) vs new path (packed, target-row logits)\n\n"
             f"Headline: {headline['metric']} = {headline['value']} (target >= {headline['target']}); "
             f"{headline['meaning']}\n\nModel: {name}. Command: `python benchmarks/train_throughput.py "
             f"{' '.join(sys.argv[1:])}`\n\n" + markdown_table(rows, cols))
    write_results(args.name, "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]), headline,
                  {"device": card, "bf16": args.bf16, "batch": args.batch, "pack": args.pack,
                   "repeats": args.repeats, "n_tok": 2,
                   "shapes": {"chitchat": "t ~ U[1,12] turns of 6..60 tokens (mean ~18), input/output ~20",
                              "icl": "k ~ U[1,16] demonstrations of 10..18 tokens, query 10, answer 3"}},
                  rows, table)
    print(table)


if __name__ == "__main__":
    main()
