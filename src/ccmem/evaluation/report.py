"""Reports of an evaluation run: the results JSON (shared/design/results.md format: headline beside its target,
environment, config, rows), markdown tables, and PNG plots of metric against time step and against KV bytes."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any


def environment(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Git revision, library versions and the machine, recorded in every results file."""
    import accelerate
    import torch
    import transformers

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        rev = ""
    from .. import __version__
    from ..hardware import cpu_name

    cpu = cpu_name()

    env = {"git_rev": rev, "ccmem": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "accelerate": accelerate.__version__, "cpu": cpu,
           "threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    env.update(extra or {})
    return env


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r.get(c, ''):.4g}" if isinstance(r.get(c), float) else str(r.get(c, '')) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pivot(rows: list[dict], key: str, methods: list[str], ts: list[int]) -> list[dict]:
    """One row per t, one column per method, holding ``key``."""
    by = {(r["t"], r["method"]): r for r in rows}
    return [{"t": t, **{m: by[(t, m)].get(key) for m in methods if (t, m) in by}} for t in ts]


def _ci_text(rows: list[dict], key: str) -> list[dict]:
    """Rows with ``key`` ([lo, hi]) written as one "[lo, hi]" cell, for the tables."""
    out = []
    for r in rows:
        ci = r.get(key)
        out.append({**r, key: f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else None})
    return out


def write(out_dir: Path, name: str, result: dict[str, Any], methods: list[dict], metric: str,
          higher_is_better: bool) -> list[Path]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, ts = result["rows"], result["config"]["ts"]
    names = [m["name"] for m in methods]
    h = result["headline"]
    md = [f"# {result['title']}\n",
          f"Headline: **{h['metric']} = {h['value']}** (target {'>' if h['higher_is_better'] else '<'} "
          f"{h['target']}"
          + (f"; 95 % interval [{h['interval_95'][0]}, {h['interval_95'][1]}]" if h.get("interval_95") else "")
          + f"): {h['meaning']}\n",
          f"Command: `{result['command']}`"
          + (f" ({result['wall_s'] / 60:.1f} min wall)" if result.get("wall_s") else "") + "\n",
          "Methods: " + "; ".join(f"`{m['name']}` = {m['label']} ({m['kind']}"
                                  + (f", adapter {m['adapter']}" if m.get("adapter") else "") + ")" for m in methods)
          + "\n",
          f"## {metric} ({'higher' if higher_is_better else 'lower'} is better)\n", markdown_table(
              pivot(rows, metric, names, ts), ["t"] + names),
          *([f"\n## {metric}: 95 % bootstrap intervals (paired over the suite's units, "
             f"{result['config'].get('bootstrap', '')} replicates)\n",
             markdown_table(pivot(_ci_text(rows, f"{metric}_ci"), f"{metric}_ci", names, ts), ["t"] + names)]
            if any(f"{metric}_ci" in r for r in rows) else []),
          *(["\n## exact_match (greedy reply contains the answer; methods with an online session)\n",
             markdown_table(pivot(rows, "exact_match", names, ts), ["t"] + names)]
            if any("exact_match" in r for r in rows) else []),
          "\n## KV memory held for the context (KiB, mean per context)\n",
          markdown_table(pivot(rows, "kv_kib", names, ts), ["t"] + names),
          "\n## Peak KV while processing the context (KiB)\n",
          markdown_table(pivot(rows, "peak_kv_kib", names, ts), ["t"] + names),
          "\n## Fraction of the no-context -> full-context gap recovered\n",
          markdown_table(pivot(rows, "gap_recovered", names, ts), ["t"] + names),
          *(["\n## Gap recovered: 95 % bootstrap intervals\n",
             markdown_table(pivot(_ci_text(rows, "gap_recovered_ci"), "gap_recovered_ci", names, ts), ["t"] + names)]
            if any(r.get("gap_recovered_ci") for r in rows) else []),
          "\n## CCM-concat against the best other method at equal or smaller KV\n",
          markdown_table(_ci_text(result["margins"], "margin_ci"),
                         ["t", "ccm", "best_other", "ccm_value", "other_value", "margin", "margin_ci"]),
          *(["\n## CCM-concat against the best other method at equal or smaller peak KV (what an online session "
             "must bound; one-shot presses prefill the whole history first)\n",
             markdown_table(_ci_text(result["peak_margins"], "margin_ci"),
                            ["t", "ccm", "best_other", "ccm_value", "other_value", "margin", "margin_ci"])]
            if result.get("peak_margins") else []),
          *(["\n## What the memory of the right context is worth: each adapter minus its control (the same adapter "
             "on another context's memory of equal size; positive = better with its own context)\n",
             markdown_table(_ci_text(result["context_value"], "margin_ci"),
                            ["t", "ccm", "control", "ccm_value", "control_value", "margin", "margin_ci"])]
            if result.get("context_value") else []),
          *(["\n## CCM-concat against the other CCM-concat adapters of this run (paired over the same units; "
             "positive = `ccm_concat` better)\n",
             markdown_table(_ci_text(result["adapter_margins"], "margin_ci"),
                            ["t", "ccm", "other", "ccm_value", "other_value", "margin", "margin_ci", "ccm_kv_kib",
                             "other_kv_kib"])]
            if result.get("adapter_margins") else [])]
    parts = sorted({k for r in rows for k in r if k.startswith(f"{metric}_") and not k.endswith("_ci")})
    if parts:  # the metric per kind of unit (recall: per fact type), at the largest t
        last = max(ts)
        md.append(f"\n## {metric} by {', '.join(k[len(metric) + 1:] for k in parts)} at t = {last}\n")
        md.append(markdown_table([{"method": r["method"], **{k: r.get(k) for k in parts}} for r in rows
                                  if r["t"] == last], ["method", *parts]))
    if result.get("agreement"):
        md.append("\n## Parallel forward vs online loop (max |difference| of option log-likelihoods)\n")
        md.append(markdown_table([{"method": k, "max_abs_diff": v} for k, v in result["agreement"].items()],
                                 ["method", "max_abs_diff"]))
    if result.get("notes"):
        md.append("\n## Notes\n\n" + "\n".join(f"- {n}" for n in result["notes"]) + "\n")
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text("\n".join(md))
    plot(paths[2], rows, methods, metric, ts, result["title"])
    return paths


def plot(path: Path, rows: list[dict], methods: list[dict], metric: str, ts: list[int], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5.5))
    styles = {"reference": ":", "trained": "-", "training-free": "--", "control": "-."}
    colors = plt.get_cmap("tab20").colors
    for i, m in enumerate(methods):  # one colour per method, the same in both panels
        mr = sorted((r for r in rows if r["method"] == m["name"] and r.get(metric) is not None),
                    key=lambda r: r["t"])
        if not mr:
            continue
        kw = {"color": colors[(2 * i) % 20 + (i // 10) % 2], "marker": "o", "label": m["label"]}
        ls = styles.get(m["kind"], "-")
        a.plot([r["t"] for r in mr], [r[metric] for r in mr], ls, **kw)
        if all(r.get(f"{metric}_ci") for r in mr):  # the 95 % bootstrap interval as error bars
            a.errorbar([r["t"] for r in mr], [r[metric] for r in mr], fmt="none", ecolor=kw["color"], capsize=2,
                       elinewidth=0.8, yerr=[[max(r[metric] - r[f"{metric}_ci"][0], 0) for r in mr],
                                             [max(r[f"{metric}_ci"][1] - r[metric], 0) for r in mr]])
        if m["name"] != "none":
            b.plot([max(r["kv_kib"], 1e-1) for r in mr], [r[metric] for r in mr], ls, **kw)
    a.set(xlabel="time step t (context chunks)", ylabel=metric, title="quality per time step")
    a.set_xscale("log", base=2)
    a.set_xticks(ts, [str(t) for t in ts])
    b.set(xscale="log", xlabel="KV memory held for the context (KiB)", ylabel=metric,
          title="quality vs memory (one point per t)")
    a.legend(fontsize=7)
    if methods and any(r["method"] == "none" for r in rows):
        none = [r[metric] for r in rows if r["method"] == "none"]
        b.axhline(sum(none) / len(none), color="grey", lw=0.8, ls=":", label="no context (mean)")
    b.legend(fontsize=7)
    if metric == "ppl":  # perplexities span orders of magnitude when a method breaks down
        a.set_yscale("log")
        b.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rerender(path: str | Path) -> list[Path]:
    """Re-write the markdown table and the plot of a results JSON (e.g. after a change of plot style), from the
    file alone: ``python -m ccmem.evaluation.report benchmarks/results/eval_icl.json``."""
    path = Path(path)
    res = json.loads(path.read_text())
    metric = "ppl" if res["config"].get("suite") == "chitchat" else "acc_norm"
    higher = metric != "ppl"
    return write(path.parent, path.stem, res, res["methods"], metric, higher)


if __name__ == "__main__":
    import sys

    for p in sys.argv[1:]:
        print(*rerender(p))
