"""Checkpoint probe: is a long run still getting better, and where? A cheap, paired read of a run's checkpoints
(minutes, where `scripts/eval_general.sh` takes hours) that decides whether to keep training and when a milestone
is worth the full suites.

Every adapter scores the same episodes in one run, under the parallel formulation (one masked forward per batch,
EOS excluded, each adapter's own compression config):

- the validation episodes of each part of the run's recipe (its own domains: whole validation dialogs, recall,
  ICL and text episodes), built exactly as training builds them;
- the next turn after t = 4, 8, 12 compressed turns of dialogs from a domain no recipe trains on (`--held-out`, The
  Office by default), in the recipe's format: exactly the episodes of the chit-chat suite on that domain.

Per part it reports each adapter's pooled perplexity and the gap it recovers between no context and full context
(the base model alone, which every adapter shares), and each adapter's paired margin over the reference adapter
(the first `--adapter`): ppl(reference) - ppl(adapter), with a 95 % paired bootstrap interval over episodes.
The headline is the last adapter's margin on the held-out domain (target: above 0, i.e. better than the reference).
Episode-level perplexity mixes every t; the suites (`ccmem eval`) remain the measure of record.

    python benchmarks/checkpoint_probe.py                     # step 4000, plays-1000, the long run's newest checkpoint
    python benchmarks/checkpoint_probe.py --adapter ref=adapters/general-chat --adapter new=PATH --name my_probe
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_results  # noqa: E402

from ccmem import CompressedModel  # noqa: E402
from ccmem.evaluation.core import gap_recovered  # noqa: E402
from ccmem.evaluation.intervals import interval, pooled_ppl_replicates  # noqa: E402
from ccmem.metrics import perplexity as pooled_ppl  # noqa: E402
from ccmem.recipe import build_data, load_recipe, part_names, prepare_model, recipe_parts  # noqa: E402
from ccmem.scoring import perplexity  # noqa: E402
from ccmem.training import latest_checkpoint  # noqa: E402

RECIPE = "configs/general_chat_long.yaml"
DEFAULT_ADAPTERS = ("step4000=adapters/general-chat", "plays1000=adapters/general-chat-plays-1000")


def probe_sets(cfg: dict[str, Any], tok: Any, held_out: str | None, dialogs: int, ts: list[int]) -> dict[str, list]:
    """{part name: episodes}: each recipe part's validation episodes (as training builds them, with its seed), then
    for each t the next turn after t compressed turns of the held-out domain's dialogs, in the recipe's dialog
    format: the episodes and targets of ``ccmem eval --suite chitchat --dialogs HELD_OUT --limit DIALOGS``."""
    from ccmem.evaluation.suites import ChitchatSuite

    seed = cfg.get("train", {}).get("seed", 42)
    parts = recipe_parts(cfg["data"])
    sets = {name: build_data(tok, p, seed)[1] for name, p in zip(part_names(parts), parts)}  # the training log's names
    if held_out:
        fmt = next((p.get("format") for p in parts if p.get("format")), "plain")
        suite = ChitchatSuite(tok, dialogs=dialogs, ts=ts, format=fmt, source=held_out)
        for t in ts:
            sets[f"held out: {held_out}, t = {t}"] = [suite.fmt.episode(d, t + 2) for d in suite.dialogs]
    return {k: v for k, v in sets.items() if v}


def score(ccm: CompressedModel, sets: dict[str, list], mode: str, batch: int) -> dict[str, list[tuple[float, int]]]:
    eos = getattr(ccm.tokenizer, "eos_token_id", None)
    return {name: perplexity(ccm, eps, mode=mode, batch_size=batch, eos=eos).per_episode for name, eps in sets.items()}


def pooled(rows: list[tuple[float, int]]) -> float:
    return pooled_ppl(sum(s for s, _ in rows), sum(c for _, c in rows))


def probe(ccm: CompressedModel, adapters: dict[str, str], sets: dict[str, list], batch: int, bootstrap: int
          ) -> list[dict[str, Any]]:
    """Rows (part x method) of pooled ppl and gap recovered, and each adapter's paired margin over the first one.
    No and full context are scored once: the conditional LoRA is off where no ⟨COMP⟩ token is, whatever is loaded."""
    per = {"no context": score(ccm, sets, "none", batch), "full context": score(ccm, sets, "full", batch)}
    for name, path in adapters.items():
        ccm.load_adapter(path)
        per[name] = score(ccm, sets, "compress", batch)
        print(f"{name}: " + ", ".join(f"{k} {pooled(v):.3f}" for k, v in per[name].items()), flush=True)
    ref = next(iter(adapters))
    rows = []
    for part, eps in sets.items():
        reps = pooled_ppl_replicates({m: per[m][part] for m in per}, n=bootstrap)
        none, full = pooled(per["no context"][part]), pooled(per["full context"][part])
        for m in per:
            ppl = pooled(per[m][part])
            row = {"part": part, "episodes": len(eps), "tokens": sum(c for _, c in per[m][part]), "method": m,
                   "ppl": round(ppl, 4), "gap_recovered": round(gap_recovered(none, full, ppl), 4)}
            if m in adapters and m != ref:
                row["margin_vs_ref"] = round(pooled(per[ref][part]) - ppl, 4)
                row["margin_ci"] = [round(x, 4) for x in interval([a - b for a, b in zip(reps[ref], reps[m])])]
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=RECIPE, help="the run whose validation parts are scored")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                    help="adapters in order, the first the reference (default: step 4000, plays-1000 and the "
                         "recipe's newest checkpoint)")
    ap.add_argument("--held-out", default="office", help="a dialog source no recipe trains on ('' for none)")
    ap.add_argument("--dialogs", type=int, default=40, help="held-out dialogs scored")
    ap.add_argument("--ts", default="4,8,12", help="held-out dialogs: compressed turns before the scored one")
    ap.add_argument("--per-part", type=int, default=0, help="score only the first N episodes of each part (0: all)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--name", default="checkpoint_probe")
    args = ap.parse_args()

    cfg = load_recipe(args.recipe)
    specs = args.adapter or list(DEFAULT_ADAPTERS)
    if not args.adapter:
        newest = latest_checkpoint(cfg["train"]["output_dir"])
        if newest is None:
            raise SystemExit(f"no checkpoint under {cfg['train']['output_dir']}; pass --adapter NAME=PATH")
        specs.append(f"{newest.name}={newest}")
    adapters = dict(s.split("=", 1) for s in specs)
    if len(adapters) < 2:
        raise SystemExit("--adapter: give at least two (the first is the reference)")

    t0 = time.time()
    model, tok = prepare_model(cfg["model"], cfg.get("base_adapter"))
    ts = [int(x) for x in args.ts.split(",")]
    sets = probe_sets(cfg, tok, args.held_out or None, args.dialogs, ts)
    if args.per_part:
        sets = {k: v[: args.per_part] for k, v in sets.items()}
    ccm = CompressedModel.from_pretrained(next(iter(adapters.values())), model, tokenizer=tok)
    rows = probe(ccm, adapters, sets, args.batch, args.bootstrap)

    ref, last = next(iter(adapters)), list(adapters)[-1]
    head_part = f"held out: {args.held_out}, t = {max(ts)}" if args.held_out else next(iter(sets))
    head = next(r for r in rows if r["part"] == head_part and r["method"] == last)
    headline = {"metric": f"ppl_margin_{last}_vs_{ref}", "value": head["margin_vs_ref"], "target": 0.0,
                "higher_is_better": True, "unit": "ppl", "interval_95": head["margin_ci"],
                "meaning": f"{head_part}: ppl({ref}) - ppl({last}) of the next turn (paired bootstrap over "
                           "dialogs); above 0 = the newer adapter is better"}
    config = {"recipe": args.recipe, "adapters": adapters, "reference": ref, "held_out": args.held_out,
              "dialogs": args.dialogs, "ts": ts, "per_part": args.per_part, "model": cfg["model"],
              "base_adapter": cfg.get("base_adapter"),
              "scoring": "parallel, pooled over episodes, EOS excluded; no/full context: the base model",
              "bootstrap": args.bootstrap, "minutes": round((time.time() - t0) / 60, 1)}
    cols = ["part", "episodes", "method", "ppl", "gap recovered", "margin vs reference [95 %]"]
    table = [dict(zip(cols, [r["part"], r["episodes"], r["method"], f"{r['ppl']:.3f}", f"{r['gap_recovered']:.3f}",
                             f"{r['margin_vs_ref']:+.3f} [{r['margin_ci'][0]:+.3f}, {r['margin_ci'][1]:+.3f}]"
                             if "margin_vs_ref" in r else ""])) for r in rows]
    md = (f"# Checkpoint probe: {args.name}\n\nHeadline: {headline['meaning']}: **{headline['value']:+.3f}** "
          f"{head['margin_ci']}.\n\nReference: `{adapters[ref]}`. Recipe: `{args.recipe}`. "
          f"{config['minutes']} min.\n\n"
          + markdown_table(table, cols))
    command = "python benchmarks/checkpoint_probe.py " + shlex.join(sys.argv[1:])
    print(write_results(args.name, command.strip(), headline, config, rows, md))


if __name__ == "__main__":
    main()
