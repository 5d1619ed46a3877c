"""Sources of dialogs and episodes: the chit-chat corpus (default), and documented JSONL files for your own data.

Malformed rows are never silently mangled: with ``strict=True`` the first one raises :class:`RowError` naming file
and line; otherwise each is skipped and counted in the returned report.

JSONL formats (one JSON object per line):

- dialogs: ``{"id": "optional", "turns": ["hi", "hello, how are you?", ...]}`` (at least 2 non-empty turns);
- episodes: ``{"context": ["chunk 1", ...], "input": "question", "output": "answer"}``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import InputError
from .dialog import Dialog
from .episode import Episode


class RowError(InputError):
    """A malformed data row, with the file and line it came from."""


def _problem(report: Counter, strict: bool, where: str, what: str) -> None:
    if strict:
        raise RowError(f"{where}: {what}")
    report[what.split(":")[0]] += 1


def load_chitchat(min_turns: int = 3, max_turn_chars: int = 1000) -> tuple[list[Dialog], Counter]:
    """BYU chit-chat corpus (``chitchat-dataset``): one Dialog per conversation, one string per turn (the
    utterances of one sender joined), turns alternating between the two people."""
    try:
        import chitchat_dataset as ccc
    except ImportError as e:
        raise FileNotFoundError("the default dialog data needs `pip install chitchat-dataset==0.9.0`") from e
    report: Counter = Counter()
    dialogs = []
    for cid, conv in sorted(ccc.Dataset().items()):
        turns = []
        for turn in conv.get("messages", []):
            text = " ".join(u.get("text", "").strip() for u in turn if u.get("text", "").strip())
            turns.append(text)
        if any(not t for t in turns):  # dropping the turn would swap the speakers of every later turn
            report["empty turn"] += 1
            continue
        if any(len(t) > max_turn_chars for t in turns):
            report["over-long turn"] += 1
            continue
        if len(turns) < min_turns:
            report["too few turns"] += 1
            continue
        dialogs.append(Dialog(cid, tuple(turns)))
    return dialogs, report


def _read_jsonl(path: str | Path):
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, e


def load_jsonl_dialogs(path: str | Path, strict: bool = False, max_turn_chars: int = 4000, min_turns: int = 3
                       ) -> tuple[list[Dialog], Counter]:
    """Dialogs with fewer than ``min_turns`` turns are dropped (method.md §7.2: one needs at least one compressed
    turn, an input turn and a target turn)."""
    report: Counter = Counter()
    out = []
    for where, row in _read_jsonl(path):
        if isinstance(row, Exception):
            _problem(report, strict, where, f"invalid JSON: {row}")
            continue
        turns = row.get("turns") if isinstance(row, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            _problem(report, strict, where, 'missing field: "turns" must be a list of strings')
            continue
        if any(not t.strip() for t in turns):
            _problem(report, strict, where, "empty turn: every turn needs text")
            continue
        if any(len(t) > max_turn_chars for t in turns):
            _problem(report, strict, where, f"over-long turn: a turn exceeds {max_turn_chars} characters")
            continue
        if len(turns) < min_turns:
            _problem(report, strict, where, f"too few turns: a dialog needs at least {min_turns} turns")
            continue
        out.append(Dialog(str(row.get("id", where)), tuple(t.strip() for t in turns)))
    return out, report


def load_jsonl_episodes(path: str | Path, tokenizer: Any, strict: bool = False) -> tuple[list[Episode], Counter]:
    report: Counter = Counter()
    out = []
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for where, row in _read_jsonl(path):
        if isinstance(row, Exception):
            _problem(report, strict, where, f"invalid JSON: {row}")
            continue
        if not isinstance(row, dict):
            _problem(report, strict, where, "missing field: a row must be an object")
            continue
        ctx, inp, outp = row.get("context"), row.get("input"), row.get("output")
        if not isinstance(ctx, list) or not all(isinstance(c, str) for c in ctx):
            _problem(report, strict, where, 'missing field: "context" must be a list of strings')
            continue
        if not isinstance(inp, str) or not isinstance(outp, str):
            _problem(report, strict, where, 'missing field: "input" and "output" must be strings')
            continue
        if any(not c.strip() for c in ctx):
            _problem(report, strict, where, "empty turn: every context chunk needs text")
            continue
        if not inp.strip() or not outp.strip():
            _problem(report, strict, where, "empty input or output: both need text")
            continue
        out.append(Episode([enc(c) for c in ctx], enc(inp), enc(outp) + eos, id=str(row.get("id", where))))
    return out, report
