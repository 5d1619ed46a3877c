"""Two training branches on the same data order, compared step by step: what one knob (capacity, a loss, a rate) does
to the training loss, before any suite is run.

Two runs started from the same weights with the same seed read the same episodes in the same order (checked: the
tokens of every step, per part, must agree), and each episode is seen once, so a step's loss is measured on data the
run has not trained on yet: the paired difference of the two runs' losses, step by step, is a held-out comparison of
what each has learned so far. Per window of steps and per part of the mix it gives the token-weighted mean difference
(B - A; negative = B predicts better) with a 95 % bootstrap interval over the window's steps.

    python benchmarks/train_pair.py checkpoints/general-chat-cap-r8 checkpoints/general-chat-cap-grow \
        --labels r8,grow --name train_pair_capacity
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, write_results  # noqa: E402

from ccmem.evaluation.intervals import interval  # noqa: E402
from ccmem.train_log import read_log  # noqa: E402

ALL = "all"


def paired_steps(a: list[dict], b: list[dict]) -> list[tuple[dict, dict]]:
    """The steps both runs logged, paired; refused where they did not read the same tokens (another data order)."""
    by_b = {r["step"]: r for r in b}
    pairs = [(r, by_b[r["step"]]) for r in a if r["step"] in by_b]
    if not pairs:
        raise SystemExit("the two runs share no logged step: give two runs of the same length")
    for x, y in pairs:
        if x.get("tokens") != y.get("tokens") or (x.get("part_tokens") or {}) != (y.get("part_tokens") or {}):
            raise SystemExit(f"step {x['step']}: the runs read different tokens ({x.get('part_tokens')} vs "
                             f"{y.get('part_tokens')}); a paired comparison needs the same seed and data recipe")
    return pairs


def per_step(pairs: list[tuple[dict, dict]], part: str) -> list[tuple[float, float, float]]:
    """(weight, A's loss, B's loss) per step that has ``part``: its tokens of that part (all tokens for ``all``)."""
    out = []
    for x, y in pairs:
        if part == ALL:
            out.append((float(x.get("tokens") or 1), x["loss"], y["loss"]))
        elif (x.get("part_tokens") or {}).get(part):
            out.append((float(x["part_tokens"][part]), x["part_loss"][part], y["part_loss"][part]))
    return out


def diffs(pairs: list[tuple[dict, dict]], part: str) -> list[tuple[float, float]]:
    """(weight, B - A loss) per step that has ``part``."""
    return [(w, b - a) for w, a, b in per_step(pairs, part)]


def weighted_mean(d: list[tuple[float, float]]) -> float:
    return sum(w * v for w, v in d) / sum(w for w, _ in d)


def summary(d: list[tuple[float, float]], n: int, seed: int) -> dict:
    """Token-weighted mean difference with its bootstrap interval, the steps that have the part resampled."""
    if not d:
        return {"mean": None, "ci": None, "steps": 0}
    rng = random.Random(seed)
    reps = [weighted_mean([d[rng.randrange(len(d))] for _ in d]) for _ in range(n)]
    return {"mean": weighted_mean(d), "ci": interval(reps), "steps": len(d)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="run folder, adapter folder or train_log.jsonl of branch A (the reference)")
    ap.add_argument("b", help="the same for branch B")
    ap.add_argument("--labels", default="A,B", help="names of the two branches, comma-separated")
    ap.add_argument("--windows", type=int, default=3, help="windows of steps (default 3)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--name", default="train_pair")
    args = ap.parse_args()
    la, lb = args.labels.split(",")
    pairs = paired_steps(read_log(args.a), read_log(args.b))
    parts = sorted({p for x, _ in pairs for p in (x.get("part_tokens") or {})})
    size = -(-len(pairs) // args.windows)
    windows = [pairs[i:i + size] for i in range(0, len(pairs), size)]
    rows = []
    for i, w in enumerate(windows):
        for part in [ALL, *parts]:
            s = summary(diffs(w, part), args.bootstrap, seed=i)
            base = [(wt, a) for wt, a, _ in per_step(w, part)]
            rows.append({"steps": f"{w[0][0]['step']}-{w[-1][0]['step']}", "part": part, "diff": s["mean"],
                         "diff_ci": s["ci"], "n_steps": s["steps"], "loss_a": weighted_mean(base) if base else None})
    half = pairs[len(pairs) // 2:]
    head = summary(diffs(half, ALL), args.bootstrap, seed=len(windows))
    steps = f"{half[0][0]['step']}-{half[-1][0]['step']}"
    headline = {"metric": f"train_loss_{lb}_minus_{la}_second_half", "value": round(head["mean"], 4), "target": 0.0,
                "higher_is_better": False, "unit": "nats/token",
                "interval_95": [round(x, 4) for x in head["ci"]],
                "meaning": f"{lb} minus {la}: token-weighted mean training loss difference over steps {steps} of the "
                           f"same episodes in the same order, each seen once (negative = {lb} predicts better); "
                           f"interval: bootstrap over steps"}
    fmt = [{"steps": r["steps"], "part": r["part"], f"loss {la}": r["loss_a"],
            f"{lb} - {la}": r["diff"], "95 % interval": f"[{r['diff_ci'][0]:.3g}, {r['diff_ci'][1]:.3g}]"
            if r["diff_ci"] else "", "steps with the part": r["n_steps"]} for r in rows]
    cmd = "python benchmarks/train_pair.py " + " ".join(sys.argv[1:])
    table = (f"# Training-loss pair: {lb} against {la}, step by step on the same episodes\n\n"
             f"Headline: **{headline['metric']} = {headline['value']}** {headline['interval_95']} (target < 0): "
             f"{headline['meaning']}.\n\nCommand: `{cmd}`\n\n{len(pairs)} paired steps; A = `{args.a}`, "
             f"B = `{args.b}`.\n\n" + markdown_table(fmt, list(fmt[0])) + "\n")
    write_results(args.name, cmd, headline, {"a": args.a, "b": args.b, "labels": [la, lb], "windows": args.windows,
                                             "bootstrap": args.bootstrap, "paired_steps": len(pairs)}, rows, table)
    plot(rows, [ALL, *parts], la, lb, RESULTS / f"{args.name}.png")
    print(table)


def plot(rows: list[dict], parts: list[str], la: str, lb: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    windows = list(dict.fromkeys(r["steps"] for r in rows))
    width = 0.8 / len(parts)
    for j, part in enumerate(parts):
        rs = [next(r for r in rows if r["steps"] == w and r["part"] == part) for w in windows]
        xs = [i + (j - (len(parts) - 1) / 2) * width for i in range(len(windows))]
        ys = [r["diff"] if r["diff"] is not None else float("nan") for r in rs]
        err = [[y - r["diff_ci"][0] if r["diff_ci"] else 0 for y, r in zip(ys, rs)],
               [r["diff_ci"][1] - y if r["diff_ci"] else 0 for y, r in zip(ys, rs)]]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=part)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(windows)), [f"steps {w}" for w in windows])
    ax.set_ylabel(f"training loss, {lb} - {la} (nats/token)")
    ax.set_title(f"{lb} against {la} on the same episodes (below 0: {lb} better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
