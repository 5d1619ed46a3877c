"""Streaming that generalises: streaming adapters scored on long text from domains they were not trained on, beside
StreamingLLM and a sliding window at identical KV budgets at every token, with tokens/s.

Texts (ccmem.data.text): the KJV New Testament (`kjv:new`) and Bierce's *The Devil's Dictionary* (`devil`). The
general adapter (configs/stream_general.yaml) saw neither: it was trained on the Python documentation, chit-chat
dialogs and the fortunes quotations; the shapes adapter (configs/stream_mixed_shapes.yaml) on the first two. Any
adapter can be listed (the KJV one, configs/stream_kjv.yaml, is in domain on `kjv:new`).
Headline: the first adapter's worst margin over the texts it was not trained on, StreamingLLM ppl minus CCM ppl
(positive = CCM better), with a 95 % interval from a paired block bootstrap over the stream (blocks of 500 tokens:
ccmem.evaluation.intervals.ppl_margin_blocks). Writes benchmarks/results/stream_domains.{json,md,png}.
Run: python benchmarks/stream_domains.py [--tokens 16000 --texts kjv:new,devil
    --adapters stream-general=adapters/stream-general,stream-mixed-shapes=adapters/stream-mixed-shapes]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, markdown_table, write_results  # noqa: E402

from ccmem.evaluation.intervals import ppl_margin_blocks  # noqa: E402
from ccmem.recipe import adapter_data  # noqa: E402
from ccmem.streaming import StreamConfig, Streamer, load_stream_tokens  # noqa: E402


def trained_on(adapter: str) -> list[str]:
    """The texts an adapter's recipe trained it on (its recipe's data.path)."""
    path = adapter_data(adapter).get("path", [])
    return [path] if isinstance(path, str) else list(path)


def seen(text: str, sources: list[str]) -> bool:
    """Whether a scored text shares its domain with a training text (``kjv:new`` with ``kjv:old``: same book)."""
    return any(text.split(":")[0] == s.split(":")[0] for s in sources)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16000)
    ap.add_argument("--start", type=int, default=9000)
    ap.add_argument("--texts", default="kjv:new,devil")
    ap.add_argument("--adapters", default="stream-general=adapters/stream-general,"
                    "stream-mixed-shapes=adapters/stream-mixed-shapes")
    ap.add_argument("--name", default="stream_domains", help="results file name under benchmarks/results/")
    args = ap.parse_args()
    from ccmem.memory import bytes_per_slot
    from ccmem.model import CompressedModel
    from ccmem.models import load_model

    adapters = dict(a.split("=", 1) for a in args.adapters.split(","))
    missing = [p for p in adapters.values() if not (Path(p) / "adapter.safetensors").is_file()]
    if missing:
        sys.exit(f"no adapter in {missing}: train it first (ccmem train configs/stream_mixed.yaml)")
    model, tok = load_model()
    per_slot = bytes_per_slot(model)
    cfg = StreamConfig()
    rows = []
    for text in args.texts.split(","):
        ids = load_stream_tokens(tok, text, args.start, args.tokens)
        schedule = None
        for i, (name, path) in enumerate(adapters.items()):
            ccm = CompressedModel.from_pretrained(path, model)  # ids only: the tokenizer stays as loaded
            run = Streamer(ccm, "ccm", cfg)
            runs = {f"ccm ({name})": run.run(ids, progress=True)}
            if schedule is not None and run.schedule != schedule:
                raise RuntimeError("the adapters' cache schedules differ: the baselines must be rerun per adapter")
            if i == 0:  # the baselines follow CCM's cache-size schedule, which the config alone fixes
                schedule = run.schedule
                for m in ("streamingllm", "window"):
                    runs[m] = Streamer(ccm, m, cfg, budget_schedule=schedule).run(ids, progress=True)
                streamingllm_nll = runs["streamingllm"].nll
            ccm.detach(remove_weights=True)
            src = trained_on(path)
            for method, r in runs.items():
                rows.append({"text": text, "method": method, "trained_on": ", ".join(src) if method.startswith(
                    "ccm") else "-", "in_domain": seen(text, src) if method.startswith("ccm") else None,
                    "ppl": r.ppl, "tokens_per_s": len(r.nll) / r.seconds, "max_cache_slots": max(r.cache_sizes),
                    "max_cache_kib": max(r.cache_sizes) * per_slot / 1024, "predictions": len(r.nll),
                    "streamingllm_minus_ppl_ci": None if method == "streamingllm" else
                    [round(x, 4) for x in ppl_margin_blocks(r.nll, streamingllm_nll)]})
    for r in rows:  # margins and speed against StreamingLLM on the same text
        s = next(x for x in rows if x["text"] == r["text"] and x["method"] == "streamingllm")
        r["streamingllm_minus_ppl"] = s["ppl"] - r["ppl"]
        r["speed_vs_streamingllm"] = r["tokens_per_s"] / s["tokens_per_s"]
    first = f"ccm ({next(iter(adapters))})"
    unseen = [r for r in rows if r["method"] == first and not r["in_domain"]]
    worst = min(unseen, key=lambda r: r["streamingllm_minus_ppl"]) if unseen else None
    headline = {"metric": "streamingllm_minus_ccm_ppl_worst_unseen_domain",
                "value": round(worst["streamingllm_minus_ppl"], 4) if worst else None, "target": 0.0,
                "higher_is_better": True, "unit": "ppl",
                "interval_95": [round(x, 4) for x in worst["streamingllm_minus_ppl_ci"]] if worst else None,
                "meaning": (f"{first}: StreamingLLM ppl minus CCM ppl, worst over the texts it was not trained on "
                            f"(worst: {worst['text']}, CCM {worst['ppl']:.3f} vs StreamingLLM "
                            f"{worst['ppl'] + worst['streamingllm_minus_ppl']:.3f}; CCM at "
                            f"{worst['speed_vs_streamingllm']:.2f}x StreamingLLM's tokens/s), identical KV budgets "
                            f"at every token (window {cfg.window}, chunk {cfg.chunk}, <= {cfg.mem_slots} memory "
                            "slots, sink 1)") if worst else "no text outside the first adapter's training domains"}
    cols = ["text", "method", "trained_on", "in_domain", "ppl", "streamingllm_minus_ppl", "streamingllm_minus_ppl_ci",
            "tokens_per_s",
            "speed_vs_streamingllm", "max_cache_slots", "max_cache_kib"]
    command = "python benchmarks/stream_domains.py " + " ".join(sys.argv[1:])
    table = (f"# Streaming perplexity on domains the adapters were not trained on (SmolLM2-135M-Instruct)\n\n"
             f"Headline: {headline['metric']} = {headline['value']} (target > 0; 95 % interval "
             f"{headline['interval_95']}); {headline['meaning']}\n\n"
             f"Command: `{command}`\n\nTokens [{args.start}, {args.start + args.tokens}) of each text; "
             "in_domain: the adapter's training texts include this book or domain.\n\n" + markdown_table(rows, cols))
    _plot(rows, args.name)
    write_results(args.name, command, headline,
                  {"adapters": adapters, "texts": args.texts.split(","), "start": args.start, "tokens": args.tokens,
                   "window": cfg.window, "chunk": cfg.chunk, "mem_slots": cfg.mem_slots, "sink": cfg.sink,
                   "model": "SmolLM2-135M-Instruct"}, rows, table)
    print(table)


def _plot(rows, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(dict.fromkeys(r["text"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "window"]
    ccm = [m for m in methods if m != "streamingllm"]
    color = {m: f"C{j}" for j, m in enumerate(methods)}  # one colour per method in both panels
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    w = 0.8 / len(methods)
    for j, m in enumerate(methods):
        vals = [next((r["ppl"] for r in rows if r["text"] == t and r["method"] == m), float("nan")) for t in texts]
        ax.bar([i + j * w for i in range(len(texts))], vals, w, label=m, color=color[m])
    ax.set_xticks([i + w * (len(methods) - 1) / 2 for i in range(len(texts))], texts)
    ax.set(ylabel="streaming perplexity (lower is better)", title="equal KV budget, texts by domain")
    ax.legend(fontsize=8)
    w = 0.8 / max(len(ccm), 1)
    for j, m in enumerate(ccm):  # the margins with their 95 % block-bootstrap intervals as error bars
        rs = [next(r for r in rows if r["text"] == t and r["method"] == m) for t in texts]
        vals = [r["streamingllm_minus_ppl"] for r in rs]
        err = [[v - r["streamingllm_minus_ppl_ci"][0] for v, r in zip(vals, rs)],
               [r["streamingllm_minus_ppl_ci"][1] - v for v, r in zip(vals, rs)]]
        bx.bar([i + j * w for i in range(len(texts))], vals, w, yerr=err, capsize=4, label=m, color=color[m])
    bx.axhline(0, color="k", lw=0.8)
    bx.set_xticks([i + w * (len(ccm) - 1) / 2 for i in range(len(texts))], texts)
    bx.set(ylabel="StreamingLLM ppl - CCM ppl (> 0: CCM better)", title="margin over StreamingLLM, 95 % interval")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)


if __name__ == "__main__":
    main()
