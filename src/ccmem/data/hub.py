"""Loaders for the paper's datasets (method.md §7): DailyDialog and SODA dialogs, MetaICL tasks and LaMP-2.

Malformed rows follow :mod:`ccmem.data.sources`: with ``strict=True`` the first one raises :class:`RowError` naming
where it came from (``file:line``, or ``source [split] row i`` for dataset rows); otherwise it is skipped and counted
in the returned report under the part of the message before the first colon.

Dialog loaders take a hub name (loaded with ``datasets.load_dataset(name, split=split)``), a local data file in the
hub's schema (``.json``/``.jsonl``/``.parquet``, loaded with the ``json``/``parquet`` builder), a local folder laid out
like a hub repository, or rows that are already loaded (a ``datasets.Dataset`` or a list of dicts).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .dialog import Dialog
from .episode import Episode
from .sources import RowError, _problem, _read_jsonl

LAMP2_LABELS: tuple[str, ...] = (
    "women", "religion", "politics", "style & beauty", "entertainment", "culture & arts", "sports",
    "science & technology", "travel", "business", "crime", "education", "healthy living", "parents", "food & drink",
)
"""The 15 LaMP-2 categories, in the order the LaMP prompt lists them (the gold outputs use exactly these strings)."""

_ARTICLE = "article:"


# ---------------------------------------------------------------------------------------------------------- helpers
def clean_text(text: str) -> str:
    """Light clean-up of DailyDialog's tokenised text: curly apostrophes to ``'``, runs of whitespace to one space,
    no space before ``, . ? ! ; : % )`` or after ``(``, contractions re-joined (``I ' m`` -> ``I'm``)."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u3002", ".")
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r" ([,.?!;:%)])", r"\1", text)
    text = re.sub(r"\( ", "(", text)
    text = re.sub(r"(\w) ?' ?(s|t|m|d|re|ve|ll)\b", r"\1'\2", text, flags=re.IGNORECASE)
    return text


def _encoder(tokenizer: Any):
    cache: dict[str, list[int]] = {}

    def enc(text: str) -> list[int]:
        if text not in cache:
            cache[text] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(cache[text])

    return enc


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []


_PARQUET_EXPORT = "refs/convert/parquet"


def _hub_rows(source: Any, split: str, cache_dir: str | None, revision: str | None = None) -> tuple[str, Iterable]:
    """(label for messages, rows) for a hub name, a local file or folder, or rows already loaded. A hub repository
    that still holds a loading script (which ``datasets`` >= 4 refuses) is read from the hub's parquet export."""
    if not isinstance(source, (str, Path)):
        return "<rows>", source
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("loading dataset files or hub datasets needs `pip install datasets`") from e
    path = Path(source)
    if path.is_file():
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix.lower())
        if builder is None:
            raise RowError(f"{path}: unknown data file type; use .json, .jsonl or .parquet in the hub's schema")
        ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, cache_dir=cache_dir)
    else:  # a hub name, or a local folder laid out like a hub repository
        try:
            ds = datasets.load_dataset(str(source), split=split, cache_dir=cache_dir, revision=revision)
        except RuntimeError as e:
            if revision is not None or "scripts are no longer supported" not in str(e):
                raise
            ds = datasets.load_dataset(str(source), split=split, cache_dir=cache_dir, revision=_PARQUET_EXPORT)
    return str(source), ds


def _iter_rows(rows: Iterable, columns: Sequence[str]) -> Iterable:
    """Rows, decoding only the needed columns of a ``datasets.Dataset`` (SODA rows carry many unused fields)."""
    names = getattr(rows, "column_names", None)
    if names is not None and hasattr(rows, "select_columns"):
        keep = [c for c in columns if c in names]
        if keep:
            rows = rows.select_columns(keep)
    return rows


def _load_dialogs(source: Any, split: str, strict: bool, field: str, prefix: str, id_field: str | None,
                  max_dialogs: int | None, tokenizer: Any, max_turn_tokens: int, max_total_tokens: int,
                  cache_dir: str | None, revision: str | None) -> tuple[list[Dialog], Counter]:
    label, rows = _hub_rows(source, split, cache_dir, revision)
    report: Counter = Counter()
    out: list[Dialog] = []
    for i, row in enumerate(_iter_rows(rows, [field] + ([id_field] if id_field else []))):
        if max_dialogs is not None and len(out) >= max_dialogs:
            break
        where = f"{label} [{split}] row {i}"
        turns = row.get(field) if isinstance(row, dict) else None
        if not isinstance(turns, (list, tuple)) or not all(isinstance(t, str) for t in turns):
            _problem(report, strict, where, f'missing field: "{field}" must be a list of strings')
            continue
        turns = [clean_text(t) for t in turns]
        if any(not t for t in turns):
            _problem(report, strict, where, "empty turn: every turn needs text")
            continue
        if len(turns) <= 2:
            _problem(report, strict, where, "too few turns: a dialog needs more than 2 turns")
            continue
        if tokenizer is not None:
            lengths = [len(ids) for ids in tokenizer(turns, add_special_tokens=False)["input_ids"]]
            if max(lengths) > max_turn_tokens:
                _problem(report, strict, where, f"over-long turn: a turn exceeds {max_turn_tokens} tokens")
                continue
            if sum(lengths) > max_total_tokens:
                _problem(report, strict, where, f"over-long dialog: the turns exceed {max_total_tokens} tokens")
                continue
        key = row.get(id_field) if id_field else None
        out.append(Dialog(f"{prefix}-{split}-{i if key is None else key}", tuple(turns)))
    return out, report


# ---------------------------------------------------------------------------------------------------------- dialogs
def load_dailydialog(path_or_name: Any = "daily_dialog", split: str = "train", strict: bool = False, *,
                     tokenizer: Any = None, max_turn_tokens: int = 128, max_total_tokens: int | None = None,
                     cache_dir: str | None = None, revision: str | None = None) -> tuple[list[Dialog], Counter]:
    """DailyDialog rows ``{"dialog": [str, ...], "act": [...], "emotion": [...]}`` as Dialogs with ids
    ``dailydialog-{split}-{row index}``. Turns are lightly cleaned (:func:`clean_text`). Dropped and counted: a
    missing or non-list ``dialog``, an empty turn, 2 turns or fewer; with a ``tokenizer`` also a turn over
    ``max_turn_tokens`` tokens and a dialog over ``max_total_tokens`` (default 400 for ``train``, else 600).
    The evaluation pool of the paper is validation + test."""
    total = max_total_tokens if max_total_tokens is not None else (400 if split == "train" else 600)
    return _load_dialogs(path_or_name, split, strict, "dialog", "dailydialog", None, None, tokenizer,
                         max_turn_tokens, total, cache_dir, revision)


def load_soda(path_or_name: Any = "allenai/soda", split: str = "train", strict: bool = False,
              max_dialogs: int | None = None, *, tokenizer: Any = None, max_turn_tokens: int = 128,
              max_total_tokens: int = 512, cache_dir: str | None = None, revision: str | None = None
              ) -> tuple[list[Dialog], Counter]:
    """SODA rows ``{"dialogue": [str, ...], "speakers": [...], "narrative": str, "original_index": int, ...}`` as
    Dialogs with ids ``soda-{split}-{original_index}`` (the row index where it is missing). Same filters as
    :func:`load_dailydialog` (total limit 512 tokens); ``max_dialogs`` keeps only the first dialogs that pass (the
    paper's eval set: 2000 of validation). Speaker names are not kept: turns are taken to alternate."""
    return _load_dialogs(path_or_name, split, strict, "dialogue", "soda", "original_index", max_dialogs, tokenizer,
                         max_turn_tokens, max_total_tokens, cache_dir, revision)


# ---------------------------------------------------------------------------------------------------------- MetaICL
def load_metaicl(path: str | Path, strict: bool = False) -> tuple[dict[str, list[dict]], Counter]:
    """MetaICL task files (JSONL of ``{"task", "input", "output", "options"}``) from one file or a folder of
    ``*.jsonl`` files, grouped by task in file order. Dropped and counted: invalid JSON, a missing or mistyped field,
    an empty output, an output that is not one of the (non-empty) options."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no *.jsonl files")
    report: Counter = Counter()
    tasks: dict[str, list[dict]] = {}
    for file in files:
        for where, row in _read_jsonl(file):
            if isinstance(row, Exception):
                _problem(report, strict, where, f"invalid JSON: {row}")
                continue
            if not isinstance(row, dict) or not all(isinstance(row.get(f), str) for f in ("task", "input", "output")) \
                    or not isinstance(row.get("options"), list) or not all(isinstance(o, str) for o in row["options"]):
                _problem(report, strict, where, 'missing field: "task", "input", "output" must be strings and '
                                                '"options" a list of strings')
                continue
            if not row["output"].strip():
                _problem(report, strict, where, "empty output: the output needs text")
                continue
            if row["options"] and row["output"].strip() not in [o.strip() for o in row["options"]]:
                _problem(report, strict, where, f"output not in options: {row['output']!r} is not one of the options")
                continue
            tasks.setdefault(row["task"], []).append(row)
    return tasks, report


def _flatten(examples: Sequence[dict] | dict[str, Sequence[dict]]) -> list[dict]:
    if isinstance(examples, dict):
        return [ex for rows in examples.values() for ex in rows]
    return list(examples)


def metaicl_episodes(examples: Sequence[dict] | dict[str, Sequence[dict]], tokenizer: Any, k: int = 16,
                     seed: int = 100, demos: Sequence[dict] | dict[str, Sequence[dict]] | None = None,
                     max_example_length: int = 256, max_length: int | None = None) -> tuple[list[Episode], Counter]:
    """One Episode per example (a list, or the task dict of :func:`load_metaicl`).

    Each piece is ``.strip()``-ed and tokenised on its own, and the prefixes are joined at token level with no
    whitespace: a demonstration chunk is ``"Input:" x "Output:" y``, the input ``"Input:" x "Output:"``, the output
    ``y + [EOS]``; ``options`` are the de-duplicated option tokens (no EOS) and ``answer`` the gold's index (both
    ``None`` without options). Examples longer than ``max_example_length`` tokens (prefixes and gold output
    included) are dropped and counted, from the examples and from the demonstration pools alike.

    Demonstrations: with ``demos`` (evaluation), the first ``k`` demos of the example's task in the given order
    (concatenate the seed-100 pool and the seed-13 pool to top up); otherwise (training) ``k`` other examples of the
    same task drawn without replacement with ``random.Random(seed)`` (fewer when the task has fewer). With
    ``max_length``, demonstrations are added in order only while their total stays within
    ``max_length - len(input) - len(y)`` (method.md §7.1)."""
    enc = _encoder(tokenizer)
    eos = _eos(tokenizer)
    p_in, p_out = enc("Input:"), enc("Output:")
    report: Counter = Counter()

    def prepare(rows: list[dict], what: str) -> dict[str, list[tuple[dict, list[int], list[int]]]]:
        by_task: dict[str, list[tuple[dict, list[int], list[int]]]] = {}
        for ex in rows:
            x, y = enc(ex["input"].strip()), enc(ex["output"].strip())
            if len(p_in) + len(x) + len(p_out) + len(y) > max_example_length:
                report[what] += 1
                continue
            by_task.setdefault(ex["task"], []).append((ex, x, y))
        return by_task

    pools = prepare(_flatten(examples), "over-long example")
    demo_pools = prepare(_flatten(demos), "over-long demonstration") if demos is not None else None
    rng = random.Random(seed)
    out: list[Episode] = []
    for task, pool in pools.items():
        for i, (ex, x, y) in enumerate(pool):
            if demo_pools is not None:
                chosen = demo_pools.get(task, [])[:k]
            else:  # k of the n-1 others: index j >= i stands for example j + 1
                picks = rng.sample(range(len(pool) - 1), min(k, len(pool) - 1))
                chosen = [pool[j + (j >= i)] for j in picks]
            inp = p_in + x + p_out
            chunks: list[list[int]] = []
            used = 0
            for _, dx, dy in chosen:
                chunk = p_in + dx + p_out + dy
                if max_length is not None and used + len(chunk) > max_length - len(inp) - len(y):
                    break
                chunks.append(chunk)
                used += len(chunk)
            options, answer = None, None
            if ex.get("options"):
                texts = list(dict.fromkeys(o.strip() for o in ex["options"]))
                options = [enc(t) for t in texts]
                answer = texts.index(ex["output"].strip()) if ex["output"].strip() in texts else None
                if answer is None:
                    report["output not in options"] += 1
                    continue
            out.append(Episode(chunks, inp, y + eos, options, answer, id=f"metaicl-{task}-{i}",
                               meta={"task": task}))
    return out, report


# ---------------------------------------------------------------------------------------------------------- LaMP-2
def _read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:  # the whole file is unusable: never a silent empty result
        raise RowError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e


def load_lamp2(questions_path: str | Path, outputs_path: str | Path | None = None, strict: bool = False
               ) -> tuple[list[dict], Counter]:
    """LaMP-2 questions (a JSON list of ``{"id", "input", "profile": [{"text", "title", "category", "id"}]}``) and
    optional outputs (``{"task": "LaMP_2", "golds": [{"id", "output"}]}``) as rows ``{"id", "instruction",
    "article", "profile", "label"}``: ``instruction`` is the input up to and including the first ``article:``,
    ``article`` the rest, ``label`` the gold output (``None`` without an outputs file). Dropped and counted: a
    missing or mistyped field or profile entry, an input without ``article:``, a question without a gold output
    (when an outputs file is given). A file that is not valid JSON raises :class:`RowError` naming its line."""
    questions = _read_json(questions_path)
    if not isinstance(questions, list):
        raise RowError(f"{questions_path}: the questions file must hold a JSON list")
    report: Counter = Counter()
    golds: dict[str, str] | None = None
    if outputs_path is not None:
        data = _read_json(outputs_path)
        if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
            raise RowError(f'{outputs_path}: the outputs file must hold {{"task": ..., "golds": [...]}}')
        golds = {}
        for j, g in enumerate(data["golds"]):
            if not isinstance(g, dict) or not isinstance(g.get("id"), (str, int)) \
                    or not isinstance(g.get("output"), str):
                _problem(report, strict, f"{outputs_path} golds[{j}]",
                         'missing field: a gold needs "id" and a string "output"')
                continue
            golds[str(g["id"])] = g["output"].strip()
    rows = []
    for i, q in enumerate(questions):
        where = f"{questions_path} row {i}"
        if isinstance(q, dict) and isinstance(q.get("id"), (str, int)):
            where = f"{where} (id {q['id']})"
        if not isinstance(q, dict) or not isinstance(q.get("id"), (str, int)) or not isinstance(q.get("input"), str) \
                or not isinstance(q.get("profile"), list):
            _problem(report, strict, where, 'missing field: a question needs "id", a string "input" and a list '
                                            '"profile"')
            continue
        qid = str(q["id"])
        profile = q["profile"]
        if not all(isinstance(p, dict) and isinstance(p.get("text"), str) and isinstance(p.get("category"), str)
                   for p in profile):
            _problem(report, strict, where, 'missing field: every profile entry needs string "text" and "category"')
            continue
        cut = q["input"].find(_ARTICLE)
        article = q["input"][cut + len(_ARTICLE):].strip() if cut >= 0 else ""
        if not article:
            _problem(report, strict, where, f'missing article: the input has no text after "{_ARTICLE}"')
            continue
        label = None
        if golds is not None:
            label = golds.get(qid)
            if label is None:
                _problem(report, strict, where, "missing gold: the outputs file has no output for this id")
                continue
        rows.append({"id": qid, "instruction": q["input"][:cut + len(_ARTICLE)].strip(), "article": article,
                     "profile": [dict(p) for p in profile], "label": label})
    return rows, report


def lamp2_entry(entry: dict) -> str:
    """The text of one profile entry (one compressed chunk)."""
    return f'the category for the article: "{entry["text"]}" is "{entry["category"]}"'


def lamp2_episodes(rows: Sequence[dict], tokenizer: Any, k: int = 16, seed: int = 42,
                   labels: Sequence[str] = LAMP2_LABELS, max_entry_tokens: int = 100, min_kept_ratio: float = 0.9,
                   max_length: int | None = None) -> tuple[list[Episode], Counter]:
    """One Episode per row of :func:`load_lamp2`: ``k`` profile entries (:func:`lamp2_entry`) as chunks, drawn with
    ``random.Random(seed)`` without replacement, or with replacement when fewer than ``k`` are left; input
    ``"{instruction}\\nInput: {article}\\nOutput:"``; output the label tokens + EOS; options the label tokens (no
    EOS), answer the gold's index in ``labels``.

    Counted: profile entries of ``max_entry_tokens`` tokens or more (dropped from the profile), and dropped rows:
    a label missing or not in ``labels``, a profile with no entry left or whose kept ratio is below
    ``min_kept_ratio``. With ``max_length``, entries are removed from the end until the chunks, input and output
    fit (method.md §7.3). Use ``seed=42`` for training and a fresh ``seed=1337`` at every evaluation."""
    enc = _encoder(tokenizer)
    eos = _eos(tokenizer)
    options = [enc(lab) for lab in labels]
    rng = random.Random(seed)
    report: Counter = Counter()
    out: list[Episode] = []
    for row in rows:
        label = row.get("label")
        if label not in labels:
            report["missing label" if label is None else "unknown label"] += 1
            continue
        entries = [enc(lamp2_entry(p)) for p in row["profile"]]
        kept = [e for e in entries if len(e) < max_entry_tokens]
        if len(kept) < len(entries):
            report["over-long profile entry"] += len(entries) - len(kept)
        if not kept:
            report["empty profile"] += 1
            continue
        if len(kept) < min_kept_ratio * len(entries):
            report["low kept-profile ratio"] += 1
            continue
        chunks = rng.sample(kept, k) if len(kept) >= k else [rng.choice(kept) for _ in range(k)]
        inp = enc(f"{row.get('instruction', '')}\nInput: {row['article']}\nOutput:")
        answer = list(labels).index(label)
        output = options[answer] + eos
        if max_length is not None:
            while chunks and sum(map(len, chunks)) + len(inp) + len(output) > max_length:
                chunks.pop()
        out.append(Episode([list(c) for c in chunks], inp, output, [list(o) for o in options], answer,
                           id=f"lamp2-{row['id']}", meta={"label": label}))
    return out, report
