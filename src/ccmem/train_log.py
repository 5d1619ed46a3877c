"""A run's training log (``train_log.jsonl``, one row per step) read back: loss per window of steps, overall and for
each part of a mixed recipe, as a table and a plot. A step's loss is noisy (8 episodes drawn from parts of very
different difficulty); pooled over a few hundred steps and split by part it says which data the run still learns."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import InputError


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a training log: a ``train_log.jsonl`` file, or a run or adapter folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "train_log.jsonl"
    if not p.is_file():
        raise InputError(f"{p}: no training log; give a run folder (train.output_dir), an adapter folder or a "
                         "train_log.jsonl file")
    text = p.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()  # a row the running trainer is still writing
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}:{n}: not a JSON row ({e.msg}); the file is damaged: remove that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or not _finite(row.get("loss")):
            raise InputError(f"{p}:{n}: a log row needs an integer 'step' and a numeric 'loss'; remove that line")
        parts = [row.get("part_loss") or {}, row.get("part_tokens") or {}]
        if not all(isinstance(x, dict) and all(_finite(v) for v in x.values()) for x in parts):
            raise InputError(f"{p}:{n}: 'part_loss' and 'part_tokens' must map part names to numbers; remove that "
                             "line")
        rows.append(row)
    if not rows:
        raise InputError(f"{p}: the training log is empty (the run has not finished a step yet)")
    return rows


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def windows(rows: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """Rows pooled ``size`` steps at a time: the mean step cross-entropy (``ce`` of a distilled run, whose ``loss``
    mixes in the KL term), and each part's loss pooled over its target tokens (rows logged before per-part losses
    existed count for the overall loss only)."""
    if size < 1:
        raise ValueError(f"a window holds at least one step, got {size}")
    out = []
    for a in range(0, len(rows), size):
        chunk = rows[a:a + size]
        sums: dict[str, list[float]] = {}
        for r in chunk:
            for name, loss in (r.get("part_loss") or {}).items():
                n = (r.get("part_tokens") or {}).get(name, 0)
                s = sums.setdefault(name, [0.0, 0.0])
                s[0], s[1] = s[0] + loss * n, s[1] + n
        out.append({"first": chunk[0]["step"], "last": chunk[-1]["step"], "steps": len(chunk),
                    "loss": sum(r.get("ce", r["loss"]) for r in chunk) / len(chunk),
                    "parts": {k: v[0] / v[1] for k, v in sorted(sums.items()) if v[1] > 0},
                    "part_tokens": {k: int(v[1]) for k, v in sorted(sums.items()) if v[1] > 0}})
    return out


def pooled_parts(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each part's loss over all ``rows``, pooled over its target tokens (empty when the data was not a mix)."""
    return windows(rows, len(rows))[0]["parts"] if rows else {}


def default_window(n_rows: int) -> int:
    """About 20 windows over the run, at least 10 steps each."""
    return max(10, math.ceil(n_rows / 20))


def table(wins: list[dict[str, Any]]) -> str:
    """A markdown table of the windows: steps, mean step loss, each part's pooled loss."""
    names = sorted({k for w in wins for k in w["parts"]})
    head = ["steps", "loss", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in wins:
        cells = [f"{w['first']}-{w['last']}", f"{w['loss']:.3f}",
                 *(f"{w['parts'][k]:.3f}" if k in w["parts"] else "" for k in names)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(wins: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss per window of steps as a PNG: the mean of the steps' losses, and each part's loss pooled over its target
    tokens where the log has it (so the first line need not lie between the others)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mid = [(w["first"] + w["last"]) / 2 for w in wins]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(mid, [w["loss"] for w in wins], color="black", linewidth=2, marker="o", markersize=3,
            label="all parts (mean of step losses)")
    for name in sorted({k for w in wins for k in w["parts"]}):
        pts = [(m, w["parts"][name]) for m, w in zip(mid, wins) if name in w["parts"]]
        ax.plot(*zip(*pts), marker=".", linewidth=1, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("next-token cross-entropy (train)")
    ax.set_title(title or f"training loss per {wins[0]['steps']} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
