"""Memory and per-turn time against the number of turns: full context (KV cache reuse) vs CCM-concat vs CCM-merge.

Tiny random Llama, turns of 25 tokens, n_tok = 2. Writes benchmarks/results/memory_growth.{json,md,png}.
Run: python benchmarks/memory_growth.py [--turns 64 --turn-len 25 --repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from common import RESULTS, markdown_table, write_results  # noqa: E402

from ccmem import CompressedModel, CompressionConfig  # noqa: E402

CHECKPOINTS = (1, 2, 4, 8, 16, 32, 64)


def tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


def run_full(model, turns) -> list[dict]:
    """Full context: every turn is appended to a growing KV cache (the cache is reused, nothing recomputed)."""
    cache, out, seen = DynamicCache(), [], 0
    with torch.no_grad():
        for t, turn in enumerate(turns, 1):
            ids = torch.tensor([turn])
            t0 = time.perf_counter()
            model(input_ids=ids, cache=cache, use_cache=True,
                  position_ids=torch.arange(seen, seen + len(turn))[None])
            dt = time.perf_counter() - t0
            seen += len(turn)
            slots = cache.get_seq_length()
            nbytes = sum(la.keys.numel() * la.keys.element_size() * 2 for la in cache.layers)
            out.append({"turn": t, "slots": slots, "bytes": nbytes, "seconds": dt})
    return out


def run_ccm(model, variant: str, turns) -> list[dict]:
    ccm = CompressedModel.attach(model, CompressionConfig(variant=variant, n_tok=2))
    s, out = ccm.session(), []
    for t, turn in enumerate(turns, 1):
        t0 = time.perf_counter()
        s.add_context(turn)
        dt = time.perf_counter() - t0
        out.append({"turn": t, "slots": s.memory.num_slots, "bytes": s.memory.nbytes, "seconds": dt})
    ccm.detach(remove_weights=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=64)
    ap.add_argument("--turn-len", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    g = torch.Generator().manual_seed(0)
    turns = [torch.randint(3, 1000, (args.turn_len,), generator=g).tolist() for _ in range(args.turns)]
    model = tiny()
    run_ccm(model, "concat_recur", turns[:4])  # warm-up
    methods = {"full_context": lambda: run_full(model, turns),
               "ccm_concat": lambda: run_ccm(model, "concat_recur", turns),
               "ccm_merge": lambda: run_ccm(model, "merge_recur", turns)}
    results = {}
    for name, fn in methods.items():
        reps = [fn() for _ in range(args.repeats)]
        rows = reps[0]
        for i, r in enumerate(rows):  # median per-turn time over repeats
            r["seconds"] = sorted(rep[i]["seconds"] for rep in reps)[len(reps) // 2]
        results[name] = rows

    rows = []
    for t in [c for c in CHECKPOINTS if c <= args.turns]:
        row = {"turn": t}
        for name, res in results.items():
            r = res[t - 1]
            row[f"{name}_slots"] = r["slots"]
            row[f"{name}_kib"] = r["bytes"] / 1024
            row[f"{name}_ms"] = r["seconds"] * 1000
        rows.append(row)
    last = rows[-1]
    ratio = last["full_context_kib"] / last["ccm_concat_kib"]
    headline = {"metric": f"kv_bytes_full_over_concat_T{last['turn']}", "value": round(ratio, 3), "target": 8.0,
                "higher_is_better": True, "unit": "x",
                "meaning": f"full-context KV bytes / CCM-concat memory bytes after {last['turn']} turns of "
                           f"{args.turn_len} tokens (n_tok=2); the paper's dialog compression factor is about 8"}
    cols = ["turn"] + [f"{m}_{k}" for m in results for k in ("slots", "kib", "ms")]
    table = (f"# Memory growth (tiny Llama, {args.turn_len}-token turns, n_tok=2)\n\n"
             f"Headline: {headline['metric']} = {headline['value']} (target >= {headline['target']})\n\n"
             + markdown_table(rows, cols))
    _plot(results)
    write_results("memory_growth", "python benchmarks/memory_growth.py " + " ".join(sys.argv[1:]), headline,
                  vars(args) | {"model": "tiny random Llama (hidden 128, 4 layers, 2 KV heads, head_dim 32)",
                                "n_tok": 2}, rows, table)
    print(table)


def _plot(results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, res in results.items():
        a.plot([r["turn"] for r in res], [r["bytes"] / 1024 for r in res], label=name)
        b.plot([r["turn"] for r in res], [r["seconds"] * 1000 for r in res], label=name)
    a.set(xlabel="turn", ylabel="KV memory (KiB)", title="memory held after each turn")
    b.set(xlabel="turn", ylabel="ms per turn", title="time to process one turn")
    a.legend(), b.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "memory_growth.png", dpi=100)


if __name__ == "__main__":
    main()
