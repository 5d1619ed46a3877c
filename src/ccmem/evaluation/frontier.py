"""The quality-vs-memory frontier: every method's metric at several KV budgets, at a few time steps.

Training-free methods (window, StreamingLLM, the kvpress presses, KVzip included) are run at ``k`` slots per context
chunk for each ``k`` in ``per_step`` (the budget ``k * steps(t)``); each trained adapter contributes the point its
own ``n_tok`` (and raw tail) gives. Full and no context are reference lines. Every point carries its 95 % bootstrap
interval. ``ccmem eval --suite S --frontier`` writes ``frontier_<suite>.{json,md,png}``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from .runner import EvalConfig, evaluate
from .suites import Suite


def frontier(suite: Suite, cfg: EvalConfig, per_step: tuple[int, ...] = (1, 2, 4, 8), tokenizer: Any = None,
             load_model: Any = None, progress: bool = True) -> dict[str, Any]:
    points: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    runs = [(k, replace(cfg, n_tok=k, adapters={}, peers={}, control=False)) for k in per_step]
    if cfg.adapters:
        runs.append((None, replace(cfg, training_free=(), presses=(), control=False)))
    notes: list[str] = []
    memo: dict = {}  # no context and full context do not depend on the budget: scored in the first run only
    for k, c in runs:
        res = evaluate(suite, c, load_model=load_model, progress=progress, tokenizer=tokenizer, reference_memo=memo)
        notes += res["notes"]
        for r in res["rows"]:
            if r["method"] in ("none", "full"):
                if k == runs[0][0]:
                    refs.append(r)
                continue
            points.append({**r, "per_step": k})
    return {"points": points, "references": refs, "per_step": list(per_step), "ts": list(suite.ts),
            "metric": suite.metric, "higher_is_better": suite.higher_is_better, "notes": sorted(set(notes)),
            "config": {**vars(cfg), **suite.describe()}}


def write(out_dir: Path, name: str, res: dict[str, Any]) -> list[Path]:
    from .report import markdown_table

    out_dir.mkdir(parents=True, exist_ok=True)
    metric = res["metric"]
    cols = ["t", "method", "per_step", "kv_slots", "kv_kib", metric, f"{metric}_ci", "gap_recovered"]
    rows = sorted(res["points"], key=lambda r: (r["t"], r["method"], r["kv_kib"]))
    table = [{**r, f"{metric}_ci": "[{:.4g}, {:.4g}]".format(*r[f"{metric}_ci"]) if r.get(f"{metric}_ci") else None}
             for r in rows]
    md = [f"# Quality vs memory frontier: {res['config'].get('suite')}", "",
          f"Command: `{res.get('command', '')}`", "",
          f"Training-free methods at {res['per_step']} KV slots per context step; trained adapters at their own "
          f"n_tok. {metric} ({'higher' if res['higher_is_better'] else 'lower'} is better), 95 % bootstrap "
          "intervals.", "", markdown_table(table, cols), "", "## References", "",
          markdown_table(res["references"], ["t", "method", metric]), ""]
    if res["notes"]:
        md += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"]
    paths[0].write_text(json.dumps(res, indent=2) + "\n")
    paths[1].write_text("\n".join(md))
    plot(paths[2], res)
    return paths


def plot(path: Path, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, ts = res["metric"], res["ts"]
    fig, axes = plt.subplots(1, len(ts), figsize=(6.5 * len(ts), 5), squeeze=False)
    methods = sorted({p["method"] for p in res["points"]})
    colors = plt.get_cmap("tab10").colors
    for a, t in zip(axes[0], ts):
        for i, m in enumerate(methods):
            ps = sorted((p for p in res["points"] if p["t"] == t and p["method"] == m), key=lambda p: p["kv_kib"])
            if not ps:
                continue
            x, y = [max(p["kv_kib"], 1e-1) for p in ps], [p[metric] for p in ps]
            err = None
            if all(p.get(f"{metric}_ci") for p in ps):
                err = [[max(p[metric] - p[f"{metric}_ci"][0], 0) for p in ps],
                       [max(p[f"{metric}_ci"][1] - p[metric], 0) for p in ps]]
            style = "o-" if ps[0]["kind"] != "trained" else "*"
            a.errorbar(x, y, yerr=err, fmt=style, color=colors[i % 10], capsize=2, label=ps[0]["label"],
                       markersize=10 if style == "*" else 5)
        for r in res["references"]:
            if r["t"] == t:
                a.axhline(r[metric], ls=":", color="green" if r["method"] == "full" else "red",
                          label=f"{r['method']} context")
        a.set(xscale="log", xlabel="KV memory held for the context (KiB)", ylabel=metric, title=f"t = {t}")
        if metric == "ppl":
            a.set_yscale("log")
        a.legend(fontsize=7)
    fig.suptitle("Quality vs memory: every method at several KV budgets")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
