"""Scores of the methods no adapter changes (no and full context, the window, StreamingLLM, the kvpress presses), kept
on disk between runs. Reading a training milestone beside its reference re-scores the same baselines on the same
groups every time; with a cache only the adapters are scored again.

A score is reused only when everything that made it is the same: the method and its fields, the exact groups (every
token id of every context, query, target and calibration query), the budget, the suite's description, the reference
model's weights (stage 1 folded in) and dtype, the device (a CPU's model and thread count: they change the order of
floating-point sums), the scoring mode and batch size, the torch and transformers versions (and kvpress's, for a
press), and the source of every ccmem module on the scoring path (:func:`code_digest`). A missing, unreadable or
mismatched entry is scored anew, never an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .methods import Method
from .suites import Group, Scores

# modules off the scoring path: editing them leaves cached scores valid
OFF_PATH = ("server/", "cli.py", "__main__.py", "chat.py", "demo.py", "training.py", "hardware.py",
            "evaluation/report.py", "evaluation/intervals.py", "evaluation/frontier.py", "evaluation/score_cache.py")


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def code_digest() -> str:
    """sha256 of the source of every ccmem module except those in :data:`OFF_PATH`."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if not rel.startswith(OFF_PATH):
            h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters and buffers as they are (dtype included): the reference model's identity."""
    h = hashlib.sha256()
    for name, t in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def groups_digest(groups: list[Group]) -> str:
    return _sha([[g.id, g.chunks, [[q.input, q.targets, q.answer] for q in g.queries],
                  [[q.input, q.targets, q.answer] for q in g.calibration]] for g in groups])


class ScoreCache:
    """One folder of JSON entries, one per (method, groups, budget) under a ``setting`` (the run's model, device,
    mode, versions and code): :meth:`get` returns an entry or ``None``; :meth:`put` writes one atomically."""

    def __init__(self, folder: str | os.PathLike, setting: dict[str, Any]):
        self.folder = Path(folder)
        self.setting = {**setting, "torch": torch.__version__, "code": code_digest()}
        self.read: list[str] = []  # labels of the entries served
        self.unreadable: list[str] = []

    def key(self, method: Method | str, groups: list[Group], budget: Any, **extra: Any) -> str:
        m = method if isinstance(method, str) else {"class": type(method).__name__, **dataclasses.asdict(method)}
        return _sha({"setting": self.setting, "method": m, "groups": groups_digest(groups), "budget": budget,
                     **extra})

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str, label: str) -> dict[str, Any] | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text())
            entry["scores"] = [[[(float(ll), int(n)) for ll, n in q] for q in g] for g in entry["scores"]]
        except (OSError, ValueError, KeyError, TypeError):
            self.unreadable.append(label)
            return None
        self.read.append(label)
        return entry

    def put(self, key: str, scores: Scores, **extra: Any) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"scores": scores, **extra}))
        os.replace(tmp, path)

    def note(self) -> str | None:
        """What the run took from the cache, for the report's notes."""
        parts = []
        if self.read:
            parts.append(f"{len(self.read)} scores of methods without an adapter read from the score cache "
                         f"{self.folder} ({', '.join(self.read)})")
        if self.unreadable:
            parts.append(f"unreadable score-cache entries scored anew: {', '.join(self.unreadable)}")
        return "; ".join(parts) or None
