"""Is the distillation teacher worth distilling from? Per data part of an adapter's recipe, on its validation episodes:
the student's next-token cross-entropy (the adapter reading its ⟨COMP⟩ memory), the teacher's (the same model reading
the raw past instead: ``TrainConfig.teacher = "raw"``, i.e. the base model, or the stage-1 model when the recipe has
one), the ``raw+memory`` teacher's (text rows read the raw past and the memory: the adapter's prior on top of the raw
past) and the KL(teacher || student) of each on the same target tokens.

Distillation pulls the student's whole next-token distribution towards the teacher's. Where the teacher predicts the
targets worse than the student already does (the adapter has learned a task or format prior that the base model
reading the raw past lacks), that pull costs quality, and a large KL there dominates the loss. Run this before
choosing ``train.distill`` for a recipe.

Headline: for the first adapter, the worst part's teacher-minus-student cross-entropy (nats per target token; <= 0
means the teacher is at least as good on every part), with a 95 % bootstrap interval over episodes.
Writes benchmarks/results/<name>.{json,md}.
Run: python benchmarks/distill_teacher.py --adapters general-chat=adapters/general-chat [--episodes 16]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_results  # noqa: E402

from ccmem.config import CompressionConfig  # noqa: E402
from ccmem.data.collate import Collator, kl_at, lm_loss_at, loss_positions  # noqa: E402
from ccmem.evaluation.intervals import interval  # noqa: E402
from ccmem.model import CompressedModel  # noqa: E402
from ccmem.recipe import build_data, part_names, prepare_model, recipe_parts  # noqa: E402


def part_sums(ccm: CompressedModel, collate: Collator, episode) -> list[float]:
    """Summed over one episode's target tokens: student NLL, then NLL and KL(teacher || student) of the ``raw`` and
    of the ``raw+memory`` teacher (``TrainConfig.teacher``), and the token count."""
    b = collate([episode])
    ids, am, labels = b["input_ids"], b["attention_mask"], b["labels"]
    keep = loss_positions(labels)

    def logits(**how):
        return ccm.model(input_ids=ids, use_cache=False, logits_to_keep=keep, **ccm.parallel_inputs(ids, am, **how)
                         ).logits

    with torch.no_grad():
        s, raw, both = logits(), logits(raw_context=True), logits(raw_and_memory=True)
    nll_s, n = lm_loss_at(s, labels, keep, "sum")
    out = [float(nll_s)]
    for t in (raw, both):
        out += [float(lm_loss_at(t, labels, keep, "sum")[0]), float(kl_at(s, t, labels, keep) * n)]
    return [*out, int(n)]


def pooled_diff(sums: list[list[float]], idx: list[int], col: int) -> float:
    """A teacher's (column ``col`` of :func:`part_sums`) minus the student's cross-entropy, token-pooled over the
    episodes ``idx`` (a bootstrap draw or all)."""
    n = sum(sums[i][-1] for i in idx)
    return (sum(sums[i][col] for i in idx) - sum(sums[i][0] for i in idx)) / n


def score_adapter(name: str, path: str, episodes: int, seed: int, reps: int) -> list[dict]:
    recipe = yaml.safe_load((Path(path) / "recipe.yaml").read_text())
    stage1 = Path(path) / "stage1"  # shipped adapters carry their stage 1 (the recipe's path may be another machine's)
    model, tok = prepare_model(recipe["model"], str(stage1) if stage1.is_dir() else recipe.get("base_adapter"),
                               device="cpu")
    ccm = CompressedModel.attach(model, CompressionConfig(**recipe["compression"]), tokenizer=tok)
    ccm.load_adapter(path)
    ccm.model.eval()
    collate = Collator(ccm.tokens, ccm.config.variant, mode="compress", pad_id=tok.pad_token_id or 0,
                       max_length=recipe["train"].get("max_length", 1024), raw_tail=ccm.config.raw_tail)
    rows = []
    parts = recipe_parts(recipe["data"])
    for pname, d in zip(part_names(parts), parts):
        _, val, _ = build_data(tok, d, recipe["train"].get("seed", 42))
        val = val[:episodes]
        sums = [part_sums(ccm, collate, e) for e in tqdm(val, desc=f"{name} {pname}", leave=False)]

        n = sum(x[-1] for x in sums)
        row = {"adapter": name, "path": path, "part": pname, "episodes": len(val), "target_tokens": n,
               "student_ce": sum(x[0] for x in sums) / n}
        for key, col in (("", 1), ("memory_", 3)):  # the raw teacher, then the raw+memory one
            rng = random.Random(seed)
            boot = [pooled_diff(sums, [rng.randrange(len(sums)) for _ in sums], col) for _ in range(reps)]
            row |= {f"{key}teacher_ce": sum(x[col] for x in sums) / n,
                    f"kl_{key}teacher_student": sum(x[col + 1] for x in sums) / n,
                    f"{key}teacher_minus_student_ce": pooled_diff(sums, list(range(len(sums))), col),
                    f"{key}teacher_minus_student_ce_ci": [round(x, 4) for x in interval(boot)]}
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", default="general-chat=adapters/general-chat",
                    help="NAME=PATH,...: adapter folders with the recipe.yaml that trained them")
    ap.add_argument("--episodes", type=int, default=16, help="validation episodes per data part")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="distill_teacher")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    adapters = [a.split("=", 1) for a in args.adapters.split(",") if a]
    rows = [r for n, p in adapters for r in score_adapter(n, p, args.episodes, args.seed, args.bootstrap)]
    first = [r for r in rows if r["adapter"] == adapters[0][0]]
    worst = max(first, key=lambda r: r["teacher_minus_student_ce"])
    headline = {"metric": "teacher_minus_student_ce_worst_part", "value": round(worst["teacher_minus_student_ce"], 4),
                "target": 0.0, "higher_is_better": False, "unit": "nats/token",
                "interval_95": [round(x, 4) for x in worst["teacher_minus_student_ce_ci"]],
                "meaning": f"{adapters[0][0]}: max over its recipe's data parts of the distillation teacher's "
                           f"cross-entropy minus the student's on the validation targets (> 0: on that part, "
                           f"{worst['part']}, the teacher predicts worse than the student and distillation pulls "
                           f"the student towards it)"}
    cols = ["adapter", "part", "episodes", "target_tokens", "student_ce", "teacher_ce", "kl_teacher_student",
            "teacher_minus_student_ce", "teacher_minus_student_ce_ci", "memory_teacher_ce",
            "kl_memory_teacher_student", "memory_teacher_minus_student_ce", "memory_teacher_minus_student_ce_ci"]
    table = (f"# Is the distillation teacher better than the student?\n\n{headline['meaning']}: "
             f"**{headline['value']}** {headline['interval_95']}.\n\nteacher: the model reading the raw past without "
             "memory (`train.teacher: raw`); memory_teacher: text rows read the raw past and the memory "
             "(`train.teacher: raw+memory`). Cross-entropy in nats per target token, KL(teacher || student) "
             "likewise.\n\n" + markdown_table(rows, cols) + "\n")
    command = "python benchmarks/distill_teacher.py " + " ".join(sys.argv[1:])
    write_results(args.name, command.strip(), headline, vars(args), rows, table)
    print(table)


if __name__ == "__main__":
    main()
