"""The quality-vs-memory frontier: every method's metric at several KV budgets, at a few time steps.

Training-free methods (window, StreamingLLM, the kvpress presses, KVzip included) are run at ``k`` slots per context
chunk for each ``k`` in ``per_step`` (the budget ``k * steps(t)``); each trained adapter contributes the point its
own ``n_tok`` (and raw tail) gives, and with ``control`` its control point (the adapter on another unit's memory:
how much of its score any memory gives). Full and no context are reference lines. Every point carries its 95 % bootstrap
interval. ``ccmem eval --suite S --frontier`` writes ``frontier_<suite>.{json,md,png}``.
"""

from __future__ import annotations

import json
import math
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
        runs.append((None, replace(cfg, training_free=(), presses=())))  # --control adds each adapter's control
    notes: list[str] = []
    memo: dict = {}  # no context and full context do not depend on the budget: scored in the first run only
    reps: dict[tuple[str, int | None, int], list[float]] = {}  # (method, per_step, t) -> paired replicates
    for k, c in runs:
        got: dict = {}
        res = evaluate(suite, c, load_model=load_model, progress=progress, tokenizer=tokenizer, reference_memo=memo,
                       replicates_out=got)
        reps.update({(m, k, t): v for (m, t), v in got.items()})
        notes += res["notes"]
        for r in res["rows"]:
            if r["method"] in ("none", "full"):
                if k == runs[0][0]:
                    refs.append(r)
                continue
            points.append({**r, "per_step": k})
    out = {"points": points, "references": refs, "per_step": list(per_step), "ts": list(suite.ts),
           "metric": suite.metric, "higher_is_better": suite.higher_is_better, "notes": sorted(set(notes)),
           "config": {**vars(cfg), **suite.describe()}}
    out["margins"], out["kv_to_match"] = margins(out, reps), kv_to_match(out)
    out["headline"] = headline(out)
    return out


def _main_method(points: list[dict[str, Any]]) -> str | None:
    """The trained method the frontier is about: CCM-concat if present, else the first trained one."""
    trained = sorted({p["method"] for p in points if p["kind"] == "trained"})
    return "ccm_concat" if "ccm_concat" in trained else (trained[0] if trained else None)


def _competitor(p: dict[str, Any], main: str) -> bool:
    """Every other method is a competitor, except controls (the adapter itself on another context) and CCM itself:
    the main method's siblings trained at another budget (``ccm_concat_*``) and its other layout (``ccm_merge``)."""
    return p["method"] != main and p["kind"] != "control" and not p["method"].startswith("ccm_")


def _main_points(points: list[dict[str, Any]], ts: list[int]) -> list[tuple[int, str, dict[str, Any]]]:
    """(t, main method, its point at t) for every t where the main trained method has a point."""
    main = _main_method(points)
    by_t = {p["t"]: p for p in points if p["method"] == main}
    return [(t, main, by_t[t]) for t in ts if t in by_t]


def margins(res: dict[str, Any], reps: dict[tuple[str, int | None, int], list[float]]) -> list[dict[str, Any]]:
    """Per t: the main trained method's margin over the best point of any other method holding at most its KV
    (positive = the trained method better), with a paired 95 % bootstrap interval where replicates exist."""
    from .intervals import interval

    metric, higher, points = res["metric"], res["higher_is_better"], res["points"]
    out = []
    for t, main, p in _main_points(points, res["ts"]):
        best = None
        for q in points:
            if q["t"] != t or not _competitor(q, main) or q["kv_kib"] > p["kv_kib"] * (1 + 1e-9):
                continue
            m = (p[metric] - q[metric]) if higher else (q[metric] - p[metric])
            if best is None or m < best[0]:
                best = (m, q)
        if best is None:
            continue
        m, q = best
        row = {"t": t, "ccm": main, "ccm_value": p[metric], "kv_kib": p["kv_kib"], "best_other": q["method"],
               "other_per_step": q["per_step"], "other_kv_kib": q["kv_kib"], "other_value": q[metric], "margin": m}
        a, b = reps.get((main, p["per_step"], t)), reps.get((q["method"], q["per_step"], t))
        if a and b:
            row["margin_ci"] = interval([(x - y) if higher else (y - x) for x, y in zip(a, b)])
        out.append(row)
    return out


def kv_to_match(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Per t and per other budgeted method: the KV it needs to reach the main trained method's metric, read off its
    frontier (log-linear between the two budgets that bracket it), as a multiple of the trained method's KV. ``None``
    when no tested budget reaches it (then it needs more than ``max_ratio``)."""
    metric, higher, points = res["metric"], res["higher_is_better"], res["points"]
    better = (lambda a, b: a >= b) if higher else (lambda a, b: a <= b)
    out = []
    for t, main, p in _main_points(points, res["ts"]):
        for name in sorted({q["method"] for q in points if q["t"] == t and q["per_step"] is not None}):
            ps = sorted((q for q in points if q["t"] == t and q["method"] == name), key=lambda q: q["kv_kib"])
            if not _competitor(ps[0], main):
                continue
            kv = None
            for i, q in enumerate(ps):
                if better(q[metric], p[metric]):
                    if i == 0 or q[metric] == ps[i - 1][metric]:
                        kv = q["kv_kib"]
                    else:
                        lo, f = ps[i - 1], (p[metric] - ps[i - 1][metric]) / (q[metric] - ps[i - 1][metric])
                        kv = math.exp(math.log(max(lo["kv_kib"], 1e-9)) + f * (
                            math.log(max(q["kv_kib"], 1e-9)) - math.log(max(lo["kv_kib"], 1e-9))))
                    break
            out.append({"t": t, "method": name, "kv_kib": kv, "ratio": None if kv is None else kv / p["kv_kib"],
                        "max_ratio": ps[-1]["kv_kib"] / p["kv_kib"], "at_smallest_budget": kv == ps[0]["kv_kib"]})
    return out


def headline(res: dict[str, Any]) -> dict[str, Any] | None:
    """The frontier's one number: the main trained method's worst margin over t against the best other method at
    most its KV, on every budget tested (the eval's headline compares at one budget per t only)."""
    ms = res["margins"]
    if not ms:
        return None
    worst = min(ms, key=lambda m: m["margin"])
    need = [r for r in res["kv_to_match"] if r["t"] == worst["t"]]
    return {"metric": "ccm_margin_over_best_at_most_its_kv_worst_t", "value": round(worst["margin"], 4),
            "target": 0.0, "higher_is_better": True, "unit": res["metric"],
            **({"interval_95": [round(x, 4) for x in worst["margin_ci"]]} if worst.get("margin_ci") else {}),
            "meaning": f"min over t in {res['ts']} of {worst['ccm']}'s {res['metric']} margin over the best point of "
                       f"any other method at any tested budget holding at most its KV (positive = {worst['ccm']} "
                       f"better); worst at t={worst['t']} against {worst['best_other']} at {worst['other_per_step']} "
                       f"slot(s) per step; KV the others need to match it there, as a multiple of its own: "
                       + ", ".join(f"{r['method']} " + (f"{r['ratio']:.2g}x" if r["ratio"] is not None else
                                                         f"> {r['max_ratio']:.2g}x") for r in need)}


def write(out_dir: Path, name: str, res: dict[str, Any]) -> list[Path]:
    from .report import markdown_table

    out_dir.mkdir(parents=True, exist_ok=True)
    metric = res["metric"]
    cols = ["t", "method", "per_step", "kv_slots", "kv_kib", metric, f"{metric}_ci", "gap_recovered"]
    rows = sorted(res["points"], key=lambda r: (r["t"], r["method"], r["kv_kib"]))
    table = [{**r, f"{metric}_ci": "[{:.4g}, {:.4g}]".format(*r[f"{metric}_ci"]) if r.get(f"{metric}_ci") else None}
             for r in rows]
    md = [f"# Quality vs memory frontier: {res['config'].get('suite')}", "",
          f"Command: `{res.get('command', '')}`"
          + (f" ({res['wall_s'] / 60:.1f} min wall)" if res.get("wall_s") else ""), ""]
    h = res.get("headline")
    if h:
        ci = " [{:.4g}, {:.4g}]".format(*h["interval_95"]) if h.get("interval_95") else ""
        md += [f"Headline: {h['metric']} = {h['value']:.4g}{ci} (target > {h['target']:g}); {h['meaning']}", ""]
    if res.get("margins"):
        mt = [{**m, "margin_ci": "[{:.4g}, {:.4g}]".format(*m["margin_ci"]) if m.get("margin_ci") else None}
              for m in res["margins"]]
        md += ["## Margin over the best other method at most the trained method's KV", "",
               markdown_table(mt, ["t", "ccm", "ccm_value", "kv_kib", "best_other", "other_per_step", "other_kv_kib",
                                   "other_value", "margin", "margin_ci"]), ""]
    if res.get("kv_to_match"):
        kt = [{**r, "ratio": f"{r['ratio']:.3g}x" if r["ratio"] is not None else f"> {r['max_ratio']:.3g}x"}
              for r in res["kv_to_match"]]
        md += ["## KV each budgeted method needs to match the trained method (multiple of its KV)", "",
               markdown_table(kt, ["t", "method", "kv_kib", "ratio", "at_smallest_budget"]), ""]
    md += [f"Training-free methods at {res['per_step']} KV slots per context step; trained adapters at their own "
           f"n_tok. {metric} ({'higher' if res['higher_is_better'] else 'lower'} is better), 95 % bootstrap "
           "intervals.", "", "## Every point", "", markdown_table(table, cols), "", "## References", "",
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
            style = {"trained": "*", "control": "X"}.get(ps[0]["kind"], "o-")
            a.errorbar(x, y, yerr=err, fmt=style, color=colors[i % 10], capsize=2, label=ps[0]["label"],
                       markersize=5 if style == "o-" else 10)
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
