"""Is bf16 autocast worth it for CPU training here? fp32 against bf16 on the real training steps of a recipe.

The general adapter trains across sessions on a 2-core CPU (about 9 s a step in fp32), so its step time is what
bounds how far it gets. CPUs with AVX-512 BF16 or AMX run bf16 matrix products natively; whether that pays for a
135M model under autocast (casts, fp32 softmax and norms) is measured here, on the recipe's own episodes: the
micro-batches of steps ``--from-step`` onwards exactly as ``ccmem train`` draws them, at the weights of a checkpoint.
Each step is run in both precisions, in alternating order, with the same dropout masks (the RNG is reseeded per
pass), and no optimizer update: the ratio is measured in one run, and the two gradients are compared (cosine and
norm ratio over all trainable parameters), so the speed does not come at the price of a different update.

    python benchmarks/cpu_precision.py                      # configs/general_chat.yaml at its committed checkpoint
    python benchmarks/cpu_precision.py --steps 4 --recipe configs/chitchat_concat.yaml --checkpoint none
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_results  # noqa: E402

from ccmem.recipe import build_data, load_recipe, prepare_model  # noqa: E402
from ccmem.training import TrainConfig, Trainer, latest_checkpoint  # noqa: E402


def grads_of_step(trainer: Trainer, step: int, bf16: bool) -> tuple[float, float, int, torch.Tensor]:
    """(seconds, loss, tokens, flat gradient) of one training step's forward and backward, no update."""
    trainer.model.train()
    trainer.opt.zero_grad(set_to_none=True)
    torch.manual_seed(1000 + step)  # the same dropout masks in both precisions
    micro = trainer._micro_batches(step)
    t0 = time.perf_counter()
    total, tokens = 0.0, 0
    for eps in micro:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = trainer._forward_loss(trainer.collate(eps))
            loss, ntok = out.loss, out.tokens
        if loss.requires_grad:  # a micro-batch with no ⟨COMP⟩ row (all in a raw tail) adds nothing, as in training
            (loss / len(micro)).backward()
        total += float(loss.detach()) / len(micro)
        tokens += ntok
    dt = time.perf_counter() - t0
    params = trainer.ccm.trainable_parameters()
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
                      for p in params])
    return dt, total, tokens, flat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="configs/general_chat.yaml")
    ap.add_argument("--checkpoint", default="auto",
                    help="adapter weights to measure at: auto = the recipe run's latest checkpoint, none = fresh")
    ap.add_argument("--from-step", type=int, default=None, help="first step whose batch is used (default: the "
                    "checkpoint's step, i.e. the next steps the run will take)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--name", default="cpu_precision")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_recipe(args.recipe)
    tcfg = TrainConfig(**{**cfg["train"], "mixed_precision": "no", "compile": ""})
    from ccmem import CompressedModel, CompressionConfig

    torch.manual_seed(tcfg.seed)
    model, tok = prepare_model(cfg["model"], cfg.get("base_adapter"), device="cpu")
    ccm = CompressedModel.attach(model, CompressionConfig(**cfg["compression"]), tokenizer=tok)
    ckpt = latest_checkpoint(tcfg.output_dir) if args.checkpoint == "auto" else (
        None if args.checkpoint == "none" else Path(args.checkpoint))
    start = 0
    if ckpt is not None:
        ccm.load_adapter(ckpt)
        state = ckpt / "trainer_state.pt"  # a training checkpoint knows its step; a bare adapter starts at 0
        start = int(torch.load(state, weights_only=True)["step"]) if state.exists() else 0
    start = args.from_step if args.from_step is not None else start
    train, _, _ = build_data(tok, cfg["data"], tcfg.seed)
    trainer = Trainer(ccm, train, tcfg, pad_id=tok.pad_token_id or 0)
    grads_of_step(trainer, start, True)  # warm-up of both paths (oneDNN builds its bf16 kernels on first use)
    grads_of_step(trainer, start, False)
    rows = []
    for i, step in enumerate(range(start, start + args.steps)):
        order = (False, True) if i % 2 == 0 else (True, False)
        got = {bf: grads_of_step(trainer, step, bf) for bf in order}
        (t32, l32, n, g32), (t16, l16, _, g16) = got[False], got[True]
        cos = float(torch.nn.functional.cosine_similarity(g32, g16, dim=0))
        rows.append({"step": step + 1, "tokens": n, "fp32_s": t32, "bf16_s": t16, "speedup": t32 / t16,
                     "loss_fp32": l32, "loss_bf16": l16, "grad_cosine": cos,
                     "grad_norm_ratio": float(g16.norm() / g32.norm())})
        print(rows[-1], flush=True)
    speed = sum(r["fp32_s"] for r in rows) / sum(r["bf16_s"] for r in rows)
    cos_min = min(r["grad_cosine"] for r in rows)
    summary = {"step": "all", "tokens": sum(r["tokens"] for r in rows), "fp32_s": statistics.median(
        r["fp32_s"] for r in rows), "bf16_s": statistics.median(r["bf16_s"] for r in rows), "speedup": speed,
        "loss_fp32": statistics.mean(r["loss_fp32"] for r in rows),
        "loss_bf16": statistics.mean(r["loss_bf16"] for r in rows), "grad_cosine": cos_min,
        "grad_norm_ratio": statistics.mean(r["grad_norm_ratio"] for r in rows)}
    from ccmem.hardware import device_name

    cpu = device_name(torch.device("cpu"))
    headline = {"metric": "bf16_speedup_cpu_training", "value": round(speed, 3), "target": 1.3,
                "higher_is_better": True, "unit": "x",
                "meaning": f"fp32 / bf16-autocast time of {args.steps} real training steps of {args.recipe} (steps "
                           f"{start + 1}-{start + args.steps}, {tcfg.batch_size} x {tcfg.grad_accum} episodes, "
                           f"forward + backward, no update) on {cpu}, {torch.get_num_threads()} threads, same run; "
                           f"worst gradient cosine fp32 vs bf16 {cos_min:.4f}; target 1.3x: worth switching the "
                           f"CPU recipe"}
    cols = ["step", "tokens", "fp32_s", "bf16_s", "speedup", "loss_fp32", "loss_bf16", "grad_cosine",
            "grad_norm_ratio"]
    cmd = "python benchmarks/cpu_precision.py " + " ".join(sys.argv[1:])
    table = ("# CPU training: fp32 against bf16 autocast on the recipe's real steps\n\n"
             f"Headline: {headline['metric']} = {headline['value']} (target >= {headline['target']}); "
             f"{headline['meaning']}\n\nCommand: `{cmd}`; adapter weights of {ckpt or 'a fresh adapter'}. The last "
             "row: total fp32 time / total bf16 time, the median step times, mean losses, the worst cosine.\n\n"
             + markdown_table(rows + [summary], cols))
    write_results(args.name, cmd, headline, {"recipe": args.recipe, "checkpoint": str(ckpt) if ckpt else None,
                                             "from_step": start, "steps": args.steps,
                                             "threads": torch.get_num_threads(), "cpu": cpu}, rows + [summary], table)
    print(table)


if __name__ == "__main__":
    main()
