"""Recipe ablation (issue 10): short training runs that differ in one knob each, with one budget, seed and data
order, scored on the chit-chat validation split (next-turn ppl and gap recovered at t = 4, 8, 12, parallel scoring,
beside a sliding window holding exactly the same KV per dialog) and on validation items of the ICL training tasks
(acc_norm after 8 demonstrations).

Every run trains on the same mix: chit-chat dialogs (cut uniformly in t) and episodes of the 7 ICL training tasks,
in equal numbers. Runs are resumable and the results file is rewritten after each run, so the ablation can be
continued by a later session or on a GPU with a larger budget (``--steps``, ``--batch``; a different budget starts
a separate results name).

    python benchmarks/recipe_ablation.py                      # every knob at the default CPU budget
    python benchmarks/recipe_ablation.py --only base,ntok4    # some runs
    python benchmarks/recipe_ablation.py --report             # re-render the table and plot from the JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, environment  # noqa: E402

from ccmem.data.collate import split_tail  # noqa: E402
from ccmem.data.episode import Episode  # noqa: E402
from ccmem.evaluation.core import budget_episode, bytes_per_slot, gap_recovered, option_logliks  # noqa: E402
from ccmem.metrics import multiple_choice  # noqa: E402

TS = (4, 8, 12)
ICL_T = 8
STAGE1 = "adapters/chitchat-stage1"

BASE: dict[str, Any] = {
    "model": "smollm2",
    "base_adapter": STAGE1,
    "data": {"source": "mix", "parts": [
        {"source": "chitchat", "split_seed": 0, "max_turn_tokens": 128, "eval_dialogs": 8, "cut": "uniform"},
        {"source": "icl", "per_task": 400, "task_seed": 0, "k_max": 16, "train_episodes": 2700, "eval_episodes": 8},
    ]},
    "compression": {"variant": "concat_recur", "n_tok": 2, "sink": False, "lora_r": 8, "lora_alpha": 16,
                    "lora_dropout": 0.05},
    "train": {"mode": "compress", "lr": 1.0e-3, "warmup_ratio": 0.03, "max_length": 512, "seed": 42,
              "mixed_precision": "no", "save_every": 16, "eval_every": 0, "eval_batches": 8},
}

# name -> (what changes, overrides as dotted keys); one knob per run, everything else as BASE
KNOBS: dict[str, tuple[str, dict[str, Any]]] = {
    "base": ("n_tok 2, r 8, attention LoRA, lr 1e-3, stage 1, no sink, t uniform", {}),
    "ntok4": ("n_tok 4", {"compression.n_tok": 4}),
    "lr3e-4": ("lr 3e-4", {"train.lr": 3.0e-4}),
    "emb_lr1e-2": ("⟨COMP⟩ embedding lr 1e-2 (LoRA lr 1e-3)", {"train.emb_lr": 1.0e-2}),
    "tail1": ("raw tail of 1 turn", {"compression.raw_tail": 1}),
    "cut_end": ("t at the dialog's natural end", {"data.parts.0.cut": "end"}),
    "no_stage1": ("no stage 1 (compression LoRA on the base model)", {"base_adapter": None}),
    "r32": ("LoRA rank 32 (alpha 64)", {"compression.lora_r": 32, "compression.lora_alpha": 64}),
    "mlp": ("LoRA on attention + MLP", {"compression.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"]}),
    "ntok1": ("n_tok 1", {"compression.n_tok": 1}),
    "ntok8": ("n_tok 8", {"compression.n_tok": 8}),
    "sink": ("attention sink on", {"compression.sink": True}),
    "gate": ("memory gate, starts at -4 (gate lr 1e-2)", {"compression.memory_gate": -4.0, "train.gate_lr": 1.0e-2}),
    "gate_fast": ("memory gate, starts at -4 (gate lr 5e-2)", {"compression.memory_gate": -4.0,
                                                               "train.gate_lr": 5.0e-2}),
    "sink_gate": ("attention sink on + memory gate from -4", {"compression.sink": True,
                                                              "compression.memory_gate": -4.0}),
    "gate_distill": ("memory gate from -4 + distillation from the raw past (0.5 KL + 0.5 cross-entropy)",
                     {"compression.memory_gate": -4.0, "train.gate_lr": 1.0e-2, "train.distill": 0.5}),
}


def recipe(name: str, steps: int, batch: int, runs: Path) -> dict[str, Any]:
    cfg = copy.deepcopy(BASE)
    for key, val in KNOBS[name][1].items():
        node: Any = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = val
    # batch 1 micro-batches: no padding, the fastest layout on a CPU; the optimizer step sees `batch` episodes
    cfg["train"].update(max_steps=steps, batch_size=1, grad_accum=batch, output_dir=str(runs / name))
    cfg["output"] = str(runs / name / "adapter")
    return cfg


# ------------------------------------------------------------------------------------------------ evaluation data
def chitchat_groups(tok: Any, dialogs: int) -> dict[int, list[Episode]]:
    from ccmem.recipe import chitchat_splits

    splits, fmt, _ = chitchat_splits(tok, {"split_seed": 0, "max_turn_tokens": 128})
    pool = [d for d in splits["validation"] if len(d.turns) >= max(TS) + 2][:dialogs]
    out = {}
    for t in TS:
        eps = []
        for d in pool:
            ep = fmt.episode(d, t + 2)
            out_ids = ep.output[:-1] if ep.output[-1] == tok.eos_token_id else ep.output
            eps.append(Episode(ep.chunks, ep.input, [], [out_ids], 0, ep.id))
        out[t] = eps
    return out


def icl_items(tok: Any, items: int) -> list[Episode]:
    from ccmem.data.icl import TRAIN_TASKS, IclFormat, build_tasks, split_task

    tasks, fmt = build_tasks(), IclFormat(tok)
    out = []
    for name in TRAIN_TASKS:
        pool, rest = split_task(tasks[name], k=ICL_T, seed=100)
        for e in rest[:items]:
            out.append(Episode([fmt.demo(d) for d in pool], fmt.query(e), [], [fmt.option(o) for o in e.options],
                               e.answer, meta={"task": name}))
    return out


def ppl_of(lls: list[list[float]], lens: list[list[int]]) -> float:
    return math.exp(-sum(x[0] for x in lls) / max(sum(n[0] for n in lens), 1))


def icl_score(eps: list[Episode], lls, lens) -> float:
    by_task: dict[str, list[int]] = {}
    for i, e in enumerate(eps):
        by_task.setdefault(e.meta["task"], []).append(i)
    accs = [multiple_choice([lls[i] for i in ix], [lens[i] for i in ix], [eps[i].answer for i in ix])["acc_norm"]
            for ix in by_task.values()]
    return sum(accs) / len(accs)


def slots(ccm: Any, ep: Episode) -> int:
    """KV slots CCM holds for this context: n_tok per compressed chunk (concat) plus the raw tail's tokens."""
    comp, tail = split_tail(ep.chunks, [], ccm.config.raw_tail)
    return ccm.config.n_tok * len(comp) + len(tail) + (1 if ccm.config.sink and comp else 0)


def window_at(ep: Episode, budget: int) -> Episode:
    return budget_episode(ep, budget, sink=False)


# ------------------------------------------------------------------------------------------------ runs
def references(tok: Any, chit: dict[int, list[Episode]], icl: list[Episode], bs: int) -> dict[str, Any]:
    """No and full context with the stage-1 model (the yardstick every run's gap is measured against)."""
    from ccmem.config import CompressionConfig
    from ccmem.model import CompressedModel
    from ccmem.recipe import prepare_model

    model, _ = prepare_model("smollm2", STAGE1)
    ref = CompressedModel.attach(model, CompressionConfig())
    out: dict[str, Any] = {"chitchat": {}, "icl": {}}
    for mode in ("none", "full"):
        for t in TS:
            lls, lens = option_logliks(ref, chit[t], mode, bs)
            out["chitchat"].setdefault(mode, {})[str(t)] = ppl_of(lls, lens)
        lls, lens = option_logliks(ref, icl, mode, bs)
        out["icl"][mode] = icl_score(icl, lls, lens)
    out["bytes_per_slot"] = bytes_per_slot(model)
    return out


def score_run(adapter: Path, chit: dict[int, list[Episode]], icl: list[Episode], ref: dict[str, Any], bs: int
              ) -> dict[str, Any]:
    from ccmem.model import CompressedModel
    from ccmem.models import load_model

    model, _ = load_model("smollm2")
    ccm = CompressedModel.from_pretrained(adapter, model)
    row: dict[str, Any] = {}
    for t in TS:
        eps = chit[t]
        lls, lens = option_logliks(ccm, eps, "compress", bs)
        kv = [slots(ccm, e) for e in eps]
        none, full = ref["chitchat"]["none"][str(t)], ref["chitchat"]["full"][str(t)]
        row[f"ppl_t{t}"] = ppl_of(lls, lens)
        row[f"gap_t{t}"] = gap_recovered(none, full, row[f"ppl_t{t}"])
        row[f"kv_slots_t{t}"] = sum(kv) / len(kv)
        # the sliding window holding exactly this run's KV, dialog by dialog, read by the same model without the
        # compression adapter (plain text never triggers the gated LoRA)
        wl, wn = option_logliks(ccm, [window_at(e, k) for e, k in zip(eps, kv)], "full", bs)
        row[f"window_ppl_t{t}"] = ppl_of(wl, wn)
        row[f"window_gap_t{t}"] = gap_recovered(none, full, row[f"window_ppl_t{t}"])
    lls, lens = option_logliks(ccm, icl, "compress", bs)
    row["icl_acc_norm"] = icl_score(icl, lls, lens)
    kv = [slots(ccm, e) for e in icl]
    wl, wn = option_logliks(ccm, [window_at(e, k) for e, k in zip(icl, kv)], "full", bs)
    row["icl_window_acc_norm"] = icl_score(icl, wl, wn)
    row["icl_kv_slots"] = sum(kv) / len(kv)
    row["gap_mean"] = sum(row[f"gap_t{t}"] for t in TS) / len(TS)
    row["margin_vs_window_mean"] = sum(row[f"gap_t{t}"] - row[f"window_gap_t{t}"] for t in TS) / len(TS)
    return row


# ------------------------------------------------------------------------------------------------ report
def report(res: dict[str, Any], name: str) -> None:
    from common import markdown_table

    rows = res["rows"]
    done = [r for r in rows if "gap_mean" in r]
    best = max(done, key=lambda r: r["gap_mean"]) if done else None
    res["headline"] = {
        "metric": "best_margin_vs_window_mean", "target": 0.0, "higher_is_better": True, "unit": "gap fraction",
        "value": best["margin_vs_window_mean"] if best else None, "run": best["run"] if best else None,
        "meaning": "the run with the highest mean chit-chat gap recovered (t = 4, 8, 12): its gap recovered minus "
                   "a sliding window's at exactly the same KV per dialog, mean over t (positive = CCM better)"}
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    ref = res["references"]
    cols = ["run", "knob", "samples"] + [f"gap_t{t}" for t in TS] + [f"window_gap_t{t}" for t in TS] + [
        "gap_mean", "margin_vs_window_mean", "icl_acc_norm", "icl_window_acc_norm", "train_minutes"]
    table = [{c: r.get(c) for c in cols} for r in done]
    ppl = [{"run": r["run"], **{f"ppl_t{t}": r[f"ppl_t{t}"] for t in TS},
            **{f"window_ppl_t{t}": r[f"window_ppl_t{t}"] for t in TS},
            **{f"kv_slots_t{t}": r[f"kv_slots_t{t}"] for t in TS}} for r in done]
    refs = [{"reference": m, **{f"ppl_t{t}": ref["chitchat"][m][str(t)] for t in TS}, "icl_acc_norm": ref["icl"][m]}
            for m in ("none", "full")]
    h = res["headline"]
    md = [f"# Recipe ablation ({res['config']['model']}, {res['config']['budget']})", "",
          f"Headline: **{h['metric']} = {h['value']}** (target > {h['target']}): {h['meaning']}; run `{h['run']}`.",
          "", f"Command: `{res['command']}`", "",
          "Gap recovered = (ppl_none - ppl) / (ppl_none - ppl_full) on the chit-chat validation split "
          f"({res['config']['chitchat_dialogs']} dialogs with >= {max(TS) + 2} turns, next-turn ppl, EOS excluded); "
          "references with the stage-1 model. The window holds exactly the run's KV slots per dialog. "
          f"ICL: acc_norm after {ICL_T} demonstrations on {res['config']['icl_items']} validation items of each of "
          "the 7 training tasks (not the demonstration pool).", "",
          "## Gap recovered and ICL accuracy", "", markdown_table(table, cols), "",
          "## Perplexity and KV slots held", "", markdown_table(ppl, list(ppl[0]) if ppl else ["run"]), "",
          "## References", "", markdown_table(refs, list(refs[0])), ""]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    plot(done, res, name)


def plot(done: list[dict], res: dict[str, Any], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not done:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 0.45 * len(done) + 2.5))
    y = range(len(done))
    for i, t in enumerate(TS):
        a.barh([v + (i - 1) * 0.27 for v in y], [r[f"gap_t{t}"] for r in done], 0.27, label=f"CCM t={t}")
        a.scatter([r[f"window_gap_t{t}"] for r in done], [v + (i - 1) * 0.27 for v in y], marker="|", s=120,
                  color="k", zorder=3, label="window, same KV" if i == 0 else None)
    a.set_yticks(list(y), [r["run"] for r in done])
    a.set_xlabel("fraction of the no -> full context ppl gap recovered (chit-chat validation)")
    a.axvline(0, color="grey", lw=0.8)
    a.legend(fontsize=8)
    b.barh(list(y), [r["icl_acc_norm"] for r in done], color="tab:purple", label="CCM")
    b.scatter([r["icl_window_acc_norm"] for r in done], list(y), marker="|", s=120, color="k", zorder=3,
              label="window, same KV")
    for m, c in (("none", "tab:red"), ("full", "tab:green")):
        b.axvline(res["references"]["icl"][m], color=c, ls="--", label=f"{m} context")
    b.set_yticks(list(y), [])
    b.set_xlabel(f"ICL training-task validation acc_norm (t={ICL_T})")
    b.legend(fontsize=8)
    fig.suptitle(f"Recipe ablation: {res['config']['budget']}")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", default="", help="comma-separated run names (default: every knob)")
    ap.add_argument("--dialogs", type=int, default=24, help="chit-chat validation dialogs")
    ap.add_argument("--icl-items", type=int, default=8, help="validation items per ICL training task")
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--runs", default="runs/ablation")
    ap.add_argument("--name", default="recipe_ablation")
    ap.add_argument("--report", action="store_true", help="only re-render the table and plot from the JSON")
    args = ap.parse_args()
    path = RESULTS / f"{args.name}.json"
    if args.report:
        report(json.loads(path.read_text()), args.name)
        return

    from ccmem.models import load_tokenizer
    from ccmem.recipe import run_recipe

    torch.manual_seed(0)
    tok = load_tokenizer("smollm2")
    chit, icl = chitchat_groups(tok, args.dialogs), icl_items(tok, args.icl_items)
    budget = f"{args.steps} steps x {args.batch} episodes"
    res = json.loads(path.read_text()) if path.exists() else None
    if res and res["config"]["budget"] != budget:
        raise SystemExit(f"{path} holds runs with another budget ({res['config']['budget']}); pass --name")
    if res is None:
        res = {"name": args.name, "command": "python benchmarks/recipe_ablation.py " + " ".join(sys.argv[1:]),
               "environment": environment(), "rows": [],
               "config": {"model": "smollm2", "budget": budget, "base_recipe": BASE, "ts": list(TS),
                          "chitchat_dialogs": len(chit[TS[0]]), "icl_items": args.icl_items, "icl_t": ICL_T,
                          "knobs": {k: {"knob": v[0], "overrides": v[1]} for k, v in KNOBS.items()}},
               "references": references(tok, chit, icl, args.eval_batch)}
        report(res, args.name)
    res["config"]["knobs"] = {k: {"knob": v[0], "overrides": v[1]} for k, v in KNOBS.items()}  # knobs added later
    names = [n for n in (args.only.split(",") if args.only else KNOBS) if n]
    for n in names:
        if n not in KNOBS:
            raise SystemExit(f"unknown run {n!r}; known: {', '.join(KNOBS)}")
        if any(r["run"] == n for r in res["rows"]):
            continue
        cfg = recipe(n, args.steps, args.batch, Path(args.runs))
        print(f"=== {n}: {KNOBS[n][0]}", flush=True)
        t0 = time.perf_counter()
        adapter = run_recipe(cfg)
        minutes = (time.perf_counter() - t0) / 60
        row = {"run": n, "knob": KNOBS[n][0], "samples": args.steps * args.batch, "train_minutes": round(minutes, 1),
               **score_run(adapter, chit, icl, res["references"], args.eval_batch)}
        res["rows"].append(row)
        res["environment"] = environment()
        report(res, args.name)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
