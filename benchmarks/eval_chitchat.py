"""Chit-chat next-turn perplexity, every method side by side at each t, with the KV each holds: no context, full
context (stage 1), CCM-concat, CCM-merge, and the training-free sliding window and StreamingLLM (sink + window) at
CCM-concat's KV budget (n_tok * t slots). Also checks that the parallel forward agrees with the online loop.
Not yet included (issue 5): Gisting, Gisting-online, non-recurrent variants, kvpress presses.

Writes benchmarks/results/eval_chitchat.{json,md,png}. Headline: CCM-concat's perplexity margin over the best
other method at equal KV budget (here: window, StreamingLLM), worst case over t >= 4 (positive = CCM better).
Run: python benchmarks/eval_chitchat.py [--dialogs 100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, markdown_table, write_results  # noqa: E402

from ccmem import CompressedModel  # noqa: E402
from ccmem.evaluation import budget_episode, bytes_per_slot, online_agreement, perplexity  # noqa: E402
from ccmem.models import load_model  # noqa: E402
from ccmem.recipe import chitchat_splits  # noqa: E402

TS = (1, 2, 4, 8, 12)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dialogs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--check-online", type=int, default=4, help="episodes per t checked parallel vs online")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m, tok = load_model(device=dev)
    splits, fmt, _ = chitchat_splits(tok, {"split_seed": 0, "max_turn_tokens": 128})
    pool = [d for d in splits["test"] if len(d.turns) >= max(TS) + 2]
    pool += [d for d in splits["validation"] if len(d.turns) >= max(TS) + 2]
    dialogs = pool[: args.dialogs]
    eps = {t: [fmt.episode(d, t + 2) for d in dialogs] for t in TS}
    eos, per_slot = tok.eos_token_id, bytes_per_slot(m)
    rows = {t: {"t": t} for t in TS}
    agree = 0.0
    for name, adapter in (("concat", "adapters/chitchat-concat"), ("merge", "adapters/chitchat-merge")):
        if name == "merge":
            m, _ = load_model(device=dev)
        ccm = CompressedModel.from_pretrained(adapter, m)
        n = ccm.config.n_tok
        for t in TS:
            r = rows[t]
            r[f"ccm_{name}_ppl"] = perplexity(ccm, eps[t], "compress", args.batch_size, eos).ppl
            r[f"ccm_{name}_kib"] = (n * t if name == "concat" else n) * per_slot / 1024
            agree = max(agree, online_agreement(ccm, eps[t][: args.check_online]))
            if name == "concat":  # the stage-1 model is the same for both adapters
                r["none_ppl"] = perplexity(ccm, eps[t], "none", args.batch_size, eos).ppl
                r["full_ppl"] = perplexity(ccm, eps[t], "full", args.batch_size, eos).ppl
                r["full_kib"] = sum(len(c) for e in eps[t] for c in e.chunks) / len(eps[t]) * per_slot / 1024
                budget = n * t
                for base, sink in (("window", False), ("streamingllm", True)):
                    be = [budget_episode(e, budget, sink) for e in eps[t]]
                    r[f"{base}_ppl"] = perplexity(ccm, be, "full", args.batch_size, eos).ppl
                    r[f"{base}_kib"] = budget * per_slot / 1024
            print(rows[t], flush=True)
        del ccm
    for r in rows.values():
        r["ccm_concat_margin"] = min(r["window_ppl"], r["streamingllm_ppl"]) - r["ccm_concat_ppl"]
        r["gap_recovered_concat"] = (r["none_ppl"] - r["ccm_concat_ppl"]) / (r["none_ppl"] - r["full_ppl"])
        r["gap_recovered_merge"] = (r["none_ppl"] - r["ccm_merge_ppl"]) / (r["none_ppl"] - r["full_ppl"])
    rl = [rows[t] for t in TS]
    worst = min(r["ccm_concat_margin"] for r in rl if r["t"] >= 4)
    headline = {"metric": "ccm_concat_margin_worst_t_ge_4", "value": round(worst, 4), "target": 0.0,
                "higher_is_better": True, "unit": "ppl",
                "meaning": "min over t>=4 of (best of sliding window / StreamingLLM at CCM-concat's KV budget) - "
                           "CCM-concat perplexity; Gisting and kvpress presses not included yet. Max |parallel - "
                           f"online| logit difference on checked episodes: {agree:.2e}"}
    cols = ["t", "none_ppl", "full_ppl", "ccm_concat_ppl", "ccm_merge_ppl", "window_ppl", "streamingllm_ppl",
            "ccm_concat_margin", "gap_recovered_concat", "gap_recovered_merge", "full_kib", "ccm_concat_kib",
            "ccm_merge_kib", "window_kib"]
    table = (f"# Chit-chat: every method per time step (SmolLM2-135M-Instruct, {len(dialogs)} held-out dialogs)\n\n"
             f"Headline: {headline['metric']} = {headline['value']} (target > 0); {headline['meaning']}\n\n"
             + markdown_table(rl, cols))
    _plot(rl)
    write_results("eval_chitchat", "python benchmarks/eval_chitchat.py " + " ".join(sys.argv[1:]), headline,
                  {"dialogs": len(dialogs), "split": "chit-chat test + validation, seed 0, >= 14 turns",
                   "adapters": ["adapters/chitchat-concat", "adapters/chitchat-merge"], "device": dev,
                   "online_agreement_max_abs_logit_diff": agree, "eos_excluded": True}, rl, table)
    print(table)


def _plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = (("none", "no context"), ("full", "full context"), ("ccm_concat", "CCM-concat"),
             ("ccm_merge", "CCM-merge"), ("window", "sliding window"), ("streamingllm", "StreamingLLM"))
    for key, label in names:
        a.plot([r["t"] for r in rows], [r[f"{key}_ppl"] for r in rows], marker="o", label=label)
        if key != "none":
            b.scatter([r[f"{key}_kib"] for r in rows], [r[f"{key}_ppl"] for r in rows], label=label)
    a.set(xlabel="compressed turns t", ylabel="next-turn perplexity", title="quality per time step")
    b.set(xscale="log", xlabel="KV memory for the context (KiB)", ylabel="perplexity", title="quality vs memory")
    a.legend(), b.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "eval_chitchat.png", dpi=100)


if __name__ == "__main__":
    main()
