"""Streaming perplexity over the King James Bible (New Testament, tokens [9000, 9000 + N)) in a bounded cache:
CCM (sink + FIFO compressed memory + window) vs StreamingLLM (sink + window) vs a sliding window, at identical KV
budgets at every token. Writes benchmarks/results/stream_kjv.{json,md,png}.
Headline: StreamingLLM's final perplexity minus CCM's (positive = CCM better).
Run: python benchmarks/stream_kjv.py [--tokens 16000 --adapter adapters/stream-kjv]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, markdown_table, write_results  # noqa: E402

from ccmem.streaming import StreamConfig, run_stream  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16000)
    ap.add_argument("--adapter", default="adapters/stream-kjv")
    ap.add_argument("--every", type=int, default=1000)
    args = ap.parse_args()
    cfg = StreamConfig()
    res = run_stream(args.adapter, "kjv:new", args.tokens, 9000, cfg)
    runs = res["runs"]
    rows = []
    curves = {m: dict(r.running_ppl(args.every)) for m, r in runs.items()}
    for n in sorted(curves["ccm"]):
        row = {"tokens": n}
        for m in runs:
            row[f"{m}_ppl"] = curves[m][n]
        row["cache_slots"] = runs["ccm"].cache_sizes[n - 1]
        rows.append(row)
    summary = [{"method": m, "ppl": r.ppl, "tokens_per_s": len(r.nll) / r.seconds, "max_cache_slots":
                max(r.cache_sizes), "max_cache_kib": max(r.cache_sizes) * res["bytes_per_slot"] / 1024}
               for m, r in runs.items()]
    gap = runs["streamingllm"].ppl - runs["ccm"].ppl
    headline = {"metric": "streamingllm_minus_ccm_final_ppl", "value": round(gap, 4), "target": 0.0,
                "higher_is_better": True, "unit": "ppl",
                "meaning": f"StreamingLLM ppl {runs['streamingllm'].ppl:.3f} - CCM ppl {runs['ccm'].ppl:.3f} over "
                           f"{len(runs['ccm'].nll)} predictions at identical KV budgets (window {cfg.window}, chunk "
                           f"{cfg.chunk}, <= {cfg.mem_slots} memory slots, sink 1); the paper: about 7.75 - 7.45"}
    table = (f"# Streaming perplexity, KJV New Testament, SmolLM2-135M-Instruct + {args.adapter}\n\n"
             f"Headline: {headline['metric']} = {headline['value']} (target > 0); {headline['meaning']}\n\n"
             + markdown_table(summary, ["method", "ppl", "tokens_per_s", "max_cache_slots", "max_cache_kib"])
             + "\nRunning perplexity\n\n" + markdown_table(rows, list(rows[0])))
    _plot(runs, args.every)
    write_results("stream_kjv", "python benchmarks/stream_kjv.py " + " ".join(sys.argv[1:]), headline,
                  {"adapter": args.adapter, "text": "kjv:new", "start": 9000, "tokens": res["tokens"],
                   "window": cfg.window, "chunk": cfg.chunk, "mem_slots": cfg.mem_slots, "sink": cfg.sink,
                   "model": "SmolLM2-135M-Instruct"}, summary + rows, table)
    print(table)


def _plot(runs, every) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m, r in runs.items():
        pts = r.running_ppl(100)
        a.plot([p[0] for p in pts], [p[1] for p in pts], label=m)
    a.set(xlabel="tokens processed", ylabel="running perplexity", title="streaming perplexity")
    r = runs["ccm"]
    b.plot(range(1, len(r.cache_sizes) + 1), r.cache_sizes)
    b.set(xlabel="tokens processed", ylabel="KV cache slots (all methods)", title="bounded cache")
    a.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "stream_kjv.png", dpi=100)


if __name__ == "__main__":
    main()
