"""Training throughput of one recipe in two micro-batch layouts, on the real run it trains: the recipe as written
(e.g. the long run's 8 micro-batches of one episode, accumulated) against one micro-batch of all the step's episodes
packed into rows (``train.pack``) with the loss a mean of per-episode means (``train.loss_per=episode``, the same
objective: a batch of B equals B batches of one accumulated).

Both layouts resume the recipe's latest committed checkpoint and train the same next steps: the episodes of step s
are a pure function of (seed, s) and the global batch size, so each step's loss can be compared pair by pair (they
differ by dropout draws and float order only). Each (layout, round) runs in its own process, rounds alternate the
layouts, and nothing is saved: the checkpoint folder is only read.

    python benchmarks/train_layout.py                    # configs/general_chat_long.yaml, 4 timed steps x 2 rounds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_results  # noqa: E402

PACKED = ["train.pack=1024", "train.loss_per=episode"]


def worker(recipe: str, overrides: list[str], steps: int, warmup: int, out: Path) -> None:
    """Resume the recipe's latest checkpoint with ``overrides`` and train ``warmup`` + ``steps`` steps; the rows of
    the last ``steps`` to ``out`` (a process's first step pays for one-time setup: kernels, allocator)."""
    import torch

    from ccmem.config import CompressionConfig
    from ccmem.model import CompressedModel
    from ccmem.recipe import build_data, load_recipe, prepare_model
    from ccmem.training import TrainConfig, Trainer, latest_checkpoint

    cfg = load_recipe(recipe, overrides)
    ckpt = latest_checkpoint(cfg["train"]["output_dir"])
    if ckpt is None:
        raise SystemExit(f"{cfg['train']['output_dir']} holds no checkpoint to resume")
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = TrainConfig(**{**cfg["train"], "output_dir": tmp, "save_every": 0, "max_minutes": 0})
        torch.manual_seed(tcfg.seed)
        model, tok = prepare_model(cfg["model"], cfg.get("base_adapter"))
        ccm = CompressedModel.attach(model, CompressionConfig(**cfg["compression"]), tokenizer=tok)
        train, _, _ = build_data(tok, cfg["data"], tcfg.seed)
        trainer = Trainer(ccm, train, tcfg, pad_id=tok.pad_token_id or 0)
        trainer.resume(ckpt)
        rows = [trainer.train_step() for _ in range(warmup + steps)][warmup:]
    out.write_text(json.dumps({"checkpoint": str(ckpt), "rows": rows}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="configs/general_chat_long.yaml")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per (layout, round)")
    ap.add_argument("--warmup", type=int, default=1, help="steps trained first in each process and not timed")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--name", default="train_layout")
    ap.add_argument("--worker", nargs="*", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.recipe, args.worker, args.steps, args.warmup, Path(args.out))
        return
    from ccmem.recipe import load_recipe

    t = load_recipe(args.recipe)["train"]
    per_step = t.get("batch_size", 4) * t.get("grad_accum", 1)  # the same global batch: the same episodes per step
    layouts = {f"as written ({t.get('batch_size', 4)} x {t.get('grad_accum', 1)} accumulated)": [],
               f"packed ({per_step} x 1)": [f"train.batch_size={per_step}", "train.grad_accum=1", *PACKED]}
    runs: dict[str, list[dict]] = {k: [] for k in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, over in layouts.items():
                out = Path(tmp) / f"{r}.json"
                print(f"[train_layout] round {r + 1}/{args.rounds}: {name}", flush=True)
                subprocess.run([sys.executable, __file__, "--recipe", args.recipe, "--steps", str(args.steps),
                                "--warmup", str(args.warmup), "--out", str(out), "--worker", *over], check=True)
                runs[name] += [{**row, "round": r + 1} for row in json.loads(out.read_text())["rows"]]
    names = list(layouts)
    table = []
    for name in names:
        rows = runs[name]
        sec, tok = sum(x["seconds"] for x in rows), sum(x["tokens"] for x in rows)
        table.append({"layout": name, "overrides": " ".join(layouts[name]) or "-", "steps": len(rows),
                      "tokens": tok, "seconds": round(sec, 1), "tokens_per_s": round(tok / sec, 1),
                      "mean_loss": round(statistics.fmean(x["loss"] for x in rows), 4),
                      "precision": rows[0]["precision"]})
    ratio = table[1]["tokens_per_s"] / table[0]["tokens_per_s"]
    pairs = list(zip(runs[names[0]], runs[names[1]]))
    assert all(a["step"] == b["step"] and a["tokens"] == b["tokens"] for a, b in pairs), "the layouts saw other data"
    diff = statistics.fmean(abs(a["loss"] - b["loss"]) for a, b in pairs)
    for row in table:
        row["speed_vs_written"] = round(row["tokens_per_s"] / table[0]["tokens_per_s"], 3)
    headline = {"metric": "packed_over_written_tokens_per_s", "value": round(ratio, 3), "target": 1.0,
                "higher_is_better": True, "unit": "x",
                "meaning": f"training tokens/s of the packed layout over the recipe's own, {args.recipe} resumed "
                           f"from its checkpoint, same steps and episodes, {args.rounds} alternating rounds on "
                           f"{runs[names[0]][0]['hardware']}",
                "mean_abs_loss_difference_same_step": round(diff, 4)}
    cmd = "python benchmarks/train_layout.py " + " ".join(a for a in sys.argv[1:])
    md = "\n".join([
        f"# Training layout: {args.recipe} as written vs packed", "",
        f"Headline: **{headline['metric']} = {headline['value']}** (target >= 1.0); the same steps' losses differ by "
        f"{headline['mean_abs_loss_difference_same_step']} on average (dropout draws, float order).", "",
        f"Command: `{cmd}`", "",
        f"Both resume the committed checkpoint and train the same steps from it in {args.rounds} alternating rounds, "
        f"each in its own process; each process's first {args.warmup} step(s) are trained and not timed.", "",
        markdown_table(table, list(table[0])), "",
        "## Per step", "",
        markdown_table([{"round": a["round"], "step": a["step"], "tokens": a["tokens"],
                         "written_s": round(a["seconds"], 2), "packed_s": round(b["seconds"], 2),
                         "written_loss": round(a["loss"], 4), "packed_loss": round(b["loss"], 4)} for a, b in pairs],
                       ["round", "step", "tokens", "written_s", "packed_s", "written_loss", "packed_loss"]), ""])
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "out")} | {"layouts": layouts}
    path = write_results(args.name, cmd, headline, config, table, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
