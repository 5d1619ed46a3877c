"""Scores of the methods no adapter changes (no and full context, the window, StreamingLLM, the kvpress presses), kept
on disk between runs. Reading a training milestone beside its reference re-scores the same baselines on the same
groups every time; with a cache only the adapters are scored again.

A score is reused only when everything that made it is the same: the method and its fields, the exact groups (every
token id of every context, query, target and calibration query), the budget, the suite's description, the reference
model's weights (stage 1 folded in), dtype and config, the tokenizer, the device (a CPU's model and thread count:
they change the order of floating-point sums), the scoring mode and batch size, the torch and transformers versions
(and kvpress's, for a press), and the source of every ccmem module on the scoring path (:func:`code_digest`). A
missing, unreadable or mismatched entry is scored anew, and a folder that cannot be written only goes unused: never
an error.

The folder is bounded: once it holds more than :data:`MAX_BYTES` its entries are removed, least recently written or
served first, at the end of a run (:meth:`ScoreCache.prune`), so a cache shared by many runs does not grow without
end.
"""

from __future__ import annotations

import contextlib
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


MAX_BYTES = 256 << 20  # about 10k entries of a chit-chat suite's t


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
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-dim buffers (Gemma's scale)
    return h.hexdigest()


def config_digest(model: torch.nn.Module) -> str:
    """The model config (rope, norms, windows: what scores depend on beside the weights), its path left out."""
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    return _sha(cfg)


def tokenizer_digest(tok: Any) -> str | None:
    """The whole tokenizer as it encodes and decodes (the recall suite's replies are decoded and matched), with the
    tokenizers version."""
    if tok is None:
        return None
    import tokenizers

    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else sorted(tok.get_vocab().items())
    return _sha([body, tok.special_tokens_map, getattr(tok, "clean_up_tokenization_spaces", None),
                 tokenizers.__version__])


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
        self.unwritable: list[str] = []
        self.pruned = 0

    def key(self, method: Method | str, groups: list[Group], budget: Any, **extra: Any) -> str:
        m = method if isinstance(method, str) else {"class": type(method).__name__, **dataclasses.asdict(method)}
        return _sha({"setting": self.setting, "method": m, "groups": groups_digest(groups), "budget": budget,
                     **extra})

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str, label: str, groups: list[Group], calibration: bool = False,
            need: tuple[str, ...] = ()) -> dict[str, Any] | None:
        """The entry, if it exists and fits ``groups`` (a score per target of each query, counting its tokens) with
        the fields in ``need`` of one value per group; else ``None``, an unreadable entry named in :meth:`note`."""
        path = self._path(key)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text())
            scores = [[[(float(ll), int(n)) for ll, n in q] for q in g] for g in entry["scores"]]
            queries = [g.calibration if calibration else g.queries for g in groups]
            fits = len(scores) == len(groups) and all(
                len(sg) == len(qs) and all(len(sq) == len(q.targets) and all(n == len(tg) for (_, n), tg in
                                                                            zip(sq, q.targets))
                                           for sq, q in zip(sg, qs)) for sg, qs in zip(scores, queries))
            if not fits or any(not isinstance(entry.get(f), list) or len(entry[f]) != len(groups) for f in need):
                raise ValueError("the entry does not fit the groups")
        except (OSError, ValueError, KeyError, TypeError):
            self.unreadable.append(label)
            return None
        self.read.append(label)
        with contextlib.suppress(OSError):
            os.utime(path)  # used: the last to be pruned
        return {**entry, "scores": scores}

    def put(self, key: str, label: str, scores: Scores, **extra: Any) -> None:
        """Write an entry atomically; a folder that cannot be written loses the entry, not the run."""
        path = self._path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"scores": scores, **extra}))
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self.unwritable.append(label)

    def prune(self, max_bytes: int = MAX_BYTES) -> int:
        """Remove the least recently written or served entries until the folder holds at most ``max_bytes``; returns
        how many went. A file that cannot be listed or removed is left (never an error)."""
        files = []
        try:
            names = list(self.folder.glob("??/*.json"))
        except OSError:
            return 0
        for f in names:
            with contextlib.suppress(OSError):  # gone since the listing (another run pruning): not counted
                st = f.stat()
                files.append((st.st_mtime, st.st_size, f))
        total = sum(size for _, size, _ in files)
        removed = 0
        for _, size, f in sorted(files, key=lambda x: x[0]):
            if total <= max_bytes:
                break
            try:
                f.unlink()
                removed += 1
            except FileNotFoundError:  # another run removed it first: its bytes are gone all the same
                pass
            except OSError:
                continue
            total -= size
        self.pruned += removed
        return removed

    def note(self) -> str | None:
        """What the run took from the cache, for the report's notes."""
        parts = []
        if self.read:
            parts.append(f"{len(self.read)} scores of methods without an adapter read from the score cache "
                         f"{self.folder} ({', '.join(self.read)})")
        if self.unreadable:
            parts.append(f"unreadable score-cache entries scored anew: {', '.join(self.unreadable)}")
        if self.pruned:
            parts.append(f"{self.pruned} least recently used score-cache entries removed (the folder is kept under "
                         f"{MAX_BYTES >> 20} MiB)")
        if self.unwritable:
            parts.append(f"score-cache entries that could not be written to {self.folder}: "
                         f"{', '.join(self.unwritable)}")
        return "; ".join(parts) or None
