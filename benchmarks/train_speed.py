"""Training step time: the parallel formulation vs training the recurrence step by step (back-propagation through
the online loop), same model, same samples, T = 4, 8, 16 compressed chunks; plus training throughput.

Writes benchmarks/results/train_parallel_vs_recurrent.{json,md}. Headline: recurrent / parallel step time at T=16
on SmolLM2-135M (the paper: 1330 / 195 ms per sample = 6.8x; our target 8x).
Run: python benchmarks/train_speed.py [--repeats 3 --skip-smollm2]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, median_time, smollm2_for_timing, write_results  # noqa: E402

from ccmem import CompressedModel, CompressionConfig  # noqa: E402
from ccmem.data import Collator, Episode  # noqa: E402
from ccmem.data.collate import lm_loss_at, loss_positions  # noqa: E402
from ccmem.recurrent import recurrent_loss  # noqa: E402

TS = (4, 8, 16)


def episodes(n: int, t: int, vocab: int, seed: int, chunk: int = 25, io: int = 20) -> list[Episode]:
    r = random.Random(seed)
    tok = lambda k: [r.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    return [Episode([tok(chunk) for _ in range(t)], tok(io), tok(io)) for _ in range(n)]


def _sync(ccm) -> None:
    if ccm.device.type == "cuda":
        torch.cuda.synchronize()


def parallel_step(ccm, eps):
    """The training path: episodes packed into rows of at most 4096 tokens, the LM head on target rows only."""
    b = {k: v.to(ccm.device) for k, v in Collator(ccm.tokens, ccm.config.variant, pack=4096)(eps).items()}
    extra = ccm.parallel_inputs(b["input_ids"], b["attention_mask"], segments=b["segments"])
    keep = loss_positions(b["labels"])
    logits = ccm.model(input_ids=b["input_ids"], use_cache=False, logits_to_keep=keep, **extra).logits
    loss = lm_loss_at(logits, b["labels"], keep)
    loss.backward()
    _sync(ccm)
    return loss.detach()


def recurrent_step(ccm, eps):
    loss = recurrent_loss(ccm, eps)
    loss.backward()
    _sync(ccm)
    return loss.detach()


def bench(name, ccm, vocab, batch, repeats) -> list[dict]:
    ccm.model.train()
    rows = []
    for t in TS:
        eps = episodes(batch, t, vocab, seed=t)
        tokens = sum(sum(map(len, e.chunks)) + len(e.input) + len(e.output) for e in eps)
        par = median_time(lambda: parallel_step(ccm, eps), repeats)  # noqa: B023
        rec = median_time(lambda: recurrent_step(ccm, eps), repeats)  # noqa: B023
        lp, lr = float(parallel_step(ccm, eps)), float(recurrent_step(ccm, eps))
        ccm.model.zero_grad(set_to_none=True)
        rows.append({"model": name, "T": t, "batch": batch, "parallel_ms_per_sample": 1000 * par / batch,
                     "recurrent_ms_per_sample": 1000 * rec / batch, "speedup": rec / par,
                     "parallel_tokens_per_s": tokens / par, "loss_parallel": lp, "loss_recurrent": lr})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--random-smollm2", action="store_true",
                    help="SmolLM2-135M architecture with random weights (timing only; needs no model files)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1, help="samples per step for the SmolLM2-size model")
    ap.add_argument("--name", default="train_parallel_vs_recurrent")
    args = ap.parse_args()
    cfg = CompressionConfig(variant="concat_recur", n_tok=2, lora_dropout=0.0)
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2))
    rows = bench("tiny-llama (hidden 128, 4 layers)", CompressedModel.attach(tiny.to(args.device), cfg), 1000, 8,
                 args.repeats)
    if not args.skip_smollm2:
        model, name = smollm2_for_timing(args.random_smollm2)
        t0 = time.time()
        rows += bench(name, CompressedModel.attach(model.to(args.device), cfg), 49152, args.batch, args.repeats)
        print(f"smollm2 part took {time.time() - t0:.0f}s")
    head = [r for r in rows if r["T"] == 16][-1]
    headline = {"metric": "speedup_T16", "value": round(head["speedup"], 2), "target": 8.0, "higher_is_better": True,
                "unit": "x", "meaning": f"recurrent / parallel training step time at T=16 on {head['model']} "
                                        f"(same samples; loss on the output only; {args.device}, fp32)"}
    cols = ["model", "T", "batch", "parallel_ms_per_sample", "recurrent_ms_per_sample", "speedup",
            "parallel_tokens_per_s", "loss_parallel", "loss_recurrent"]
    table = ("# Training step: parallel formulation vs recurrent (BPTT through the online loop)\n\n"
             f"Headline: {headline['metric']} = {headline['value']} (target >= {headline['target']}); "
             f"{headline['meaning']}\n\n" + markdown_table(rows, cols))
    write_results(args.name, "python benchmarks/train_speed.py " + " ".join(sys.argv[1:]),
                  headline, {"variant": "concat_recur", "n_tok": 2, "chunk_tokens": 25, "input_tokens": 20,
                             "output_tokens": 20, "repeats": args.repeats, "Ts": list(TS), "device": args.device,
                             "smollm2_batch": args.batch}, rows, table)
    print(table)


if __name__ == "__main__":
    main()
