"""Training recipes: a YAML file (plus ``key.sub=value`` overrides) that names the model, data, compression
config and training settings; ``run_recipe`` turns it into a trained adapter folder."""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path
from typing import Any

import yaml

from .config import CompressionConfig
from .errors import ConfigError, IncompatibleError

DEFAULTS: dict[str, Any] = {
    "model": "smollm2",
    "base_adapter": None,  # a stage-1 (full-context) adapter folder merged into the base weights first
    "init_adapter": None,  # an adapter folder whose weights start the run (warm start, fresh optimizer); not on resume
    "init_across_variants": False,  # let init_adapter be of another variant (a merge run from a concat adapter)
    "init_grow": False,  # let init_adapter be a smaller LoRA (lower rank, fewer target modules): same function
    "data": {"source": "chitchat", "split_seed": 0, "max_turn_tokens": 128, "eval_dialogs": 64},
    "compression": {},
    "train": {},
    "output": None,  # final adapter folder (default: <train.output_dir>/adapter)
}


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """The recipe at ``path`` over :data:`DEFAULTS`, with ``key.sub=value`` overrides; a file that is not YAML or a
    key the trainer or the compression config does not know is refused here, naming it, before any model loads."""
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        with open(path) as f:
            try:
                user = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"recipe {path} is not valid YAML: {' '.join(str(e).split())}") from e
        if not isinstance(user, dict):
            raise ConfigError(f"recipe {path} must be a mapping of keys (model, data, compression, train, ...), "
                              f"got {type(user).__name__}")
        _merge(cfg, user)
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} must look like key.sub=value")
        key, val = o.split("=", 1)
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        try:
            node[last] = yaml.safe_load(val)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {o!r}: its value is not valid YAML ({' '.join(str(e).split())})") from e
    _check_keys(cfg, path)
    return cfg


def _check_keys(cfg: dict[str, Any], path: str | Path | None) -> None:
    """Unknown keys at the top, in ``train`` or in ``compression`` (a misspelling would otherwise be a TypeError
    deep in the run, or silently ignored)."""
    from dataclasses import fields

    from .training import TrainConfig

    where = f"recipe {path}" if path else "the recipe"
    known = {"top level": set(DEFAULTS), "train": {f.name for f in fields(TrainConfig)},
             "compression": {f.name for f in fields(CompressionConfig)}}
    for part, keys in known.items():
        node = cfg if part == "top level" else cfg.get(part)
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: `{part}` must be a mapping, got {node!r}")
        bad = sorted(set(node) - keys)
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {bad} in {part}; known: {sorted(keys)}")


def _merge(a: dict, b: dict) -> None:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _merge(a[k], v)
        else:
            a[k] = v


def prepare_model(model_name: str, base_adapter: str | None, device: str | None = None):
    """Load the base model; if a stage-1 adapter is given, fold its LoRA into the weights (stage 2 of the recipe)."""
    from .model import fold_stage1
    from .models import load_model

    model, tok = load_model(model_name, device=device)
    if base_adapter:
        fold_stage1(model, base_adapter)
    return model, tok


def dialog_format(tok: Any, data_cfg: dict) -> Any:
    """``format: plain`` (``A: ... / B: ...`` lines, the default) or ``template`` (the tokenizer's chat template)."""
    from .data.dialog import FORMATS

    name = data_cfg.get("format", "plain")
    if name not in FORMATS:
        raise ConfigError(f"data.format must be one of {sorted(FORMATS)}, got {name!r}")
    return FORMATS[name](tok)


def recipe_file(path: str | Path) -> Path | None:
    """The ``recipe.yaml`` that trained an adapter folder: beside its weights, or, for a training checkpoint
    (``<run>/checkpoints/step_N``), the one its run folder holds; None when there is none."""
    p = Path(path)
    for f in (p / "recipe.yaml", p.parent.parent / "recipe.yaml" if p.parent.name == "checkpoints" else None):
        if f is not None and f.is_file():
            return f
    return None


def adapter_data(path: str | Path) -> dict:
    """The ``data`` section of the recipe that trained an adapter (:func:`recipe_file`), empty when it has none."""
    f = recipe_file(path)
    if f is None:
        return {}
    return (yaml.safe_load(f.read_text()) or {}).get("data") or {}


def adapter_dialog_format(path: str | Path) -> str | None:
    """The dialog format an adapter was trained on, from its recipe: ``template`` when every dialog part (chit-chat,
    recall) of its data used the chat template, ``plain`` when any used ``A: / B:`` lines, None when the folder holds
    no recipe or no dialog data."""
    data = adapter_data(path)
    parts = data.get("parts") or [data]
    found = {p.get("format", "plain") for p in parts if p.get("source") in ("chitchat", "recall", "script")}
    return None if not found else "template" if found == {"template"} else "plain"


def _script_names(data: dict) -> set[str]:
    if data.get("source") == "script":
        return {data.get("name")}
    return {n for p in data.get("parts") or [] if isinstance(p, dict) for n in _script_names(p)}


def adapter_scripts(path: str | Path) -> set[str]:
    """The script sources (``shakespeare``) whose training plays an adapter's weights saw: its recipe's data (mixes
    within mixes too) and those of the adapters its run started from (``init_adapter``) or folds in
    (``base_adapter``, a ``stage1/`` folder), as far as their folders are here. A dialog suite must then read only
    their held-out plays (``<source>:test``)."""
    found: set[str] = set()
    todo, seen = [Path(path)], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        if (p / "stage1").is_dir():
            todo.append(p / "stage1")
        f = recipe_file(p)
        if f is None:
            continue
        cfg = yaml.safe_load(f.read_text()) or {}
        found |= _script_names(cfg.get("data") or {})
        todo += [Path(cfg[k]) for k in ("init_adapter", "base_adapter") if cfg.get(k)]
    return found


def chitchat_splits(tok: Any, data_cfg: dict) -> tuple[dict, Any]:
    from .data import DialogFormat, load_chitchat, split_dialogs

    dialogs, report = load_chitchat()
    fmt = dialog_format(tok, data_cfg)
    limit = data_cfg.get("max_turn_tokens", 128)
    plain = DialogFormat(tok)  # the filter counts plain turns, so every format keeps the same dialogs and splits
    kept = [d for d in dialogs if all(len(plain.turn(0, t)) <= limit for t in d.turns)]
    report["turn over max_turn_tokens"] += len(dialogs) - len(kept)
    return split_dialogs(kept, seed=data_cfg.get("split_seed", 0)), fmt, report


def dialog_episodes(splits: dict, fmt: Any, d: dict, seed: int, eval_dialogs: int,
                    min_turns: int = 0) -> tuple[Any, list[Any]]:
    """Training episodes (cut per ``d["cut"]``) and whole validation dialogs of at least ``min_turns`` turns (the
    first ``d["eval_dialogs"]`` of them): the one way every dialog source (chit-chat, scripts, files) renders its
    split."""
    from .data import DialogEpisodes

    train = DialogEpisodes(splits["train"], fmt, seed=seed, cut=d.get("cut", "uniform"))
    long_enough = [x for x in splits["validation"] if len(x.turns) >= min_turns]
    val = [fmt.episode(x, len(x.turns)) for x in long_enough[: d.get("eval_dialogs", eval_dialogs)]]
    return train, val


def script_data(tok: Any, d: dict, seed: int) -> tuple[Any, list[Any], Any]:
    """``source: script``: two-party runs of drama (``name: shakespeare``), the training plays of its split by play,
    so that the dialog suites' ``shakespeare:test`` plays stay unseen; cut and rendered as chit-chat is (``format``,
    ``cut``, ``max_turn_tokens``; ``eval_dialogs`` validation runs, from the validation plays). The split seed is
    fixed (:data:`ccmem.data.scripts.SPLIT_SEED`): the evaluation's held-out plays are those of that seed."""
    from collections import Counter

    from .data.scripts import SOURCES as SCRIPTS
    from .data.scripts import SPLIT_SEED, TRAINABLE, script_splits

    name = d.get("name")
    if name not in TRAINABLE:
        why = ("held out of training: its transcripts are for evaluation only" if name in SCRIPTS
               else f"not a script source (of {list(SCRIPTS)})")
        raise ConfigError(f"data.name {name!r} of a script part is {why}; trainable: {list(TRAINABLE)}")
    if d.get("split_seed", SPLIT_SEED) != SPLIT_SEED:
        raise ConfigError(f"a script part splits its plays with seed {SPLIT_SEED} only (another seed would train on "
                          f"the plays --dialogs {name}:test holds out); remove split_seed from the part")
    fmt = dialog_format(tok, d)
    splits = script_splits(name, tok, d.get("max_turn_tokens", 128))
    train, val = dialog_episodes(splits, fmt, d, seed, eval_dialogs=16, min_turns=3)
    report = Counter({f"{k} runs": len(v) for k, v in splits.items()})
    report["train runs of >= 3 turns"] = len(train)
    return train, val, report


def text_data(tok: Any, d: dict, seed: int):
    """Streaming-adapter data: episodes cut from long text. ``path``: one text or a list of them, each a name
    (``kjv:old``, ``devil``, ``pydocs``, ``chitchat:train``, ``fortunes``: :data:`ccmem.data.text.TEXTS`) or a
    PG-19-style file/folder. A list splits the episodes evenly over its texts, so a short text weighs as much as a
    long one; the last 2 % of every text is held out for validation."""
    from collections import Counter

    from .data.text import named_text, stream_episodes

    paths = d.get("path", "kjv:old")
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("data.path names no text: give a text name or file, or a list of them")
    kw = {k: d[k] for k in ("steps", "chunk", "window", "target") if k in d}
    n_train, n_val = d.get("train_episodes", 20000), d.get("eval_episodes", 32)
    train, val, report = [], [], Counter()
    for i, path in enumerate(paths):
        ids = tok(named_text(path), add_special_tokens=False)["input_ids"]
        cut = int(len(ids) * 0.98)
        share_train = n_train // len(paths) + (i < n_train % len(paths))
        share_val = n_val // len(paths) + (i < n_val % len(paths))
        train += stream_episodes(ids[:cut], share_train, seed=seed + 2 * i, **kw)
        val += stream_episodes(ids[cut:], share_val, seed=seed + 2 * i + 1, **kw)
        report["text tokens"] += len(ids)
        if len(paths) > 1:
            report[f"text tokens {path}"] = len(ids)
    if len(paths) > 1:
        random.Random(seed).shuffle(train)
    return train, val, report


def icl_data(tok: Any, d: dict, seed: int):
    """In-context-learning adapter data: episodes over the suite's training tasks only (the test tasks stay unseen);
    validation episodes come from the same training tasks with a different seed."""
    from collections import Counter

    from .data.icl import TRAIN_TASKS, IclFormat, IclTrainEpisodes, build_tasks

    tasks = build_tasks(d.get("per_task", 400), seed=d.get("task_seed", 0))
    train_tasks = {n: tasks[n] for n in TRAIN_TASKS}
    fmt, eos = IclFormat(tok), tok.eos_token_id
    k = d.get("k_max", 16)
    train = IclTrainEpisodes(train_tasks, fmt, eos, k_max=k, size=d.get("train_episodes", 100_000), seed=seed)
    val_src = IclTrainEpisodes(train_tasks, fmt, eos, k_max=k, size=d.get("eval_episodes", 32), seed=seed + 1)
    return train, list(val_src), Counter({f"task {n}": len(t.examples) for n, t in train_tasks.items()})


def recall_types(d: dict) -> tuple[str, ...]:
    """The fact types of a recall data part (``types:``, all training types by default); a held-out test type or an
    unknown one is refused, since training on it would make the recall suite's numbers meaningless."""
    from .data.recall import FACT_TYPES, TEST_TYPES, TRAIN_TYPES

    types = tuple(d.get("types") or TRAIN_TYPES)
    bad = [t for t in types if t not in TRAIN_TYPES]
    if bad:
        why = "held out for the recall suite" if set(bad) <= set(TEST_TYPES) else f"unknown (of {sorted(FACT_TYPES)})"
        raise ConfigError(f"recall data types {bad} are {why}; use training types only: {list(TRAIN_TYPES)}")
    return types


def build_data(tok: Any, d: dict, seed: int):
    """(train source, validation episodes, data report) of a recipe's ``data`` section. ``source: mix`` takes
    ``parts``, a list of data sections, and mixes them in the ratio of their sizes (a part's ``weight: w`` counts it
    w times: read w times an epoch, or a fraction of it per epoch for w < 1)."""
    from collections import Counter

    from .data import Mixture, Weighted

    source = d.get("source")
    if "weight" in d:  # a mix pops its parts' weights before building them: anywhere else it would do nothing
        raise ConfigError(f"data.weight ({d['weight']!r}) weighs one part of a mix against the others; a data "
                          "section outside data.parts has nothing to weigh against: drop it, or make the section a "
                          "part of `source: mix`")
    if source == "chitchat":
        splits, fmt, report = chitchat_splits(tok, d)
        return (*dialog_episodes(splits, fmt, d, seed, eval_dialogs=64), report)
    if source == "recall":
        from .data.recall import RecallEpisodes

        splits, fmt, report = chitchat_splits(tok, d)
        kw = {"max_distance": d.get("max_distance", 16), "types": recall_types(d), "facts": d.get("facts", 1)}
        train = RecallEpisodes(splits["train"], fmt, seed=seed, **kw)
        # eval_facts: validation episodes drawn with their own facts per turn, so a recipe that changes `facts`
        # mid-run keeps a validation set that compares with its earlier steps
        val_kw = {**kw, "facts": d.get("eval_facts", kw["facts"])}
        val_src = RecallEpisodes(splits["validation"], fmt, seed=seed + 1, **val_kw)
        val = [val_src.get(i) for i in range(min(len(val_src), d.get("eval_episodes", 32)))]
        return train, val, report
    if source == "script":
        return script_data(tok, d, seed)
    if source == "text":
        return text_data(tok, d, seed)
    if source == "icl":
        return icl_data(tok, d, seed)
    if source in ("jsonl", "dailydialog", "soda"):
        return _dialog_or_episode_file(tok, d, seed)
    if source == "metaicl":
        from .data import load_metaicl, metaicl_episodes

        _need(d, "path", source)
        tasks, report = load_metaicl(d["path"], strict=d.get("strict", False))
        eps, rep = metaicl_episodes(tasks, tok, k=d.get("k", 16), seed=seed, max_length=d.get("max_length"))
        return _holdout(eps, d, seed, report + rep)
    if source == "lamp":
        from .data import lamp2_episodes, load_lamp2

        _need(d, "questions", source)
        rows, report = load_lamp2(d["questions"], d.get("outputs"), strict=d.get("strict", False))
        eps, rep = lamp2_episodes(rows, tok, k=d.get("k", 16), seed=seed, max_length=d.get("max_length"))
        return _holdout(eps, d, seed, report + rep)
    if source == "episodes":
        return episode_file_data(tok, d, seed)
    if source == "mix":
        parts, vals, report = [], [], Counter()
        given = d.get("parts") or []
        if any(not isinstance(p, dict) or "source" not in p for p in given):
            raise ConfigError(f"each of data.parts is a data section with a source; got {given!r}")
        names = part_names(given)
        for j, part in enumerate(given):
            part = dict(part)
            try:  # checked before the part's data is built (which can take minutes)
                weight = Weighted.check(part.pop("weight", 1))
            except ValueError as e:
                raise ConfigError(f"data part {names[j]}: {e}") from None
            tr, va, rep = build_data(tok, part, seed)
            if weight != 1:  # the part read `weight` times an epoch: its share of the mix, its data unchanged
                if not len(tr):
                    raise ConfigError(f"data part {names[j]} has no training episodes to weigh: drop its weight")
                tr = Weighted(tr, weight, seed=f"{seed}:{j}")
                report[f"{names[j]}: weight (episodes an epoch / its episodes)"] = len(tr) / tr.n
            parts.append(tr)
            vals += va
            report.update({f"{part.get('source')}: {k}": v for k, v in rep.items()})
        if not parts:
            raise ConfigError("data.source 'mix' needs data.parts, a list of data sections")
        return Mixture(parts, names), vals, report
    raise ConfigError(f"unknown data source {source!r}; known: {', '.join(SOURCES)}")


def recipe_parts(data: dict[str, Any]) -> list[dict[str, Any]]:
    """A recipe's data sections, one per part of a mix, each as it builds alone (a part's mix ``weight`` dropped)."""
    if data.get("source") != "mix":
        return [data]
    return [{k: v for k, v in p.items() if k != "weight"} for p in data["parts"]]


def part_name(d: dict[str, Any]) -> str:
    """``source`` or ``source:name`` / ``source:path`` (``script:shakespeare``, ``text:kjv:old``)."""
    detail = d.get("name") or (d.get("path") if isinstance(d.get("path"), str) else None)
    return d["source"] + (f":{detail}" if detail else "")


def part_names(parts: list[dict[str, Any]]) -> list[str]:
    """One name per part of a mix, for the per-part losses of the training log: :func:`part_name`, numbered
    (``chitchat#2``) where two parts would share one."""
    names = [part_name(p) for p in parts]
    return [f"{n}#{names[:j].count(n) + 1}" if names.count(n) > 1 else n for j, n in enumerate(names)]


SOURCES = ("chitchat", "recall", "script", "text", "icl", "jsonl", "dailydialog", "soda", "metaicl", "lamp", "episodes",
           "mix")


def episode_file_data(tok: Any, d: dict, seed: int):
    """``source: episodes``: a file written by ``ccmem data export`` (the episodes a recipe's live sources give, for
    a fixed number of epochs), refused if it was tokenized by another tokenizer or cut with another seed."""
    from collections import Counter

    from .data import EpisodeFile

    _need(d, "path", "episodes")
    f = EpisodeFile(d["path"])
    if f.meta.get("vocab") not in (None, vocab_digest(tok)):
        raise ConfigError(f"{d['path']} was tokenized with another vocabulary ({f.meta.get('tokenizer')}) than this "
                          "model's: export it again with this model")
    if f.meta.get("seed") not in (None, seed):
        raise ConfigError(f"{d['path']} holds the episodes of train.seed={f.meta['seed']}; this run has "
                          f"train.seed={seed}: use that seed or export again with train.seed={seed}")
    return f, f.val, Counter({"episodes per epoch": len(f), "epochs exported": f.epochs})


def vocab_digest(tok: Any) -> str:
    """A digest of the tokenizer's base vocabulary (tokens added later, such as <COMP>, are not part of it)."""
    import hashlib

    return hashlib.sha256("\n".join(tok.convert_ids_to_tokens(list(range(tok.vocab_size)))).encode()).hexdigest()[:16]


def export_data(cfg: dict[str, Any], path: str | Path, epochs: int) -> Path:
    """Write the episodes a recipe trains on (``epochs`` epochs of its data order, and its validation episodes) to
    one file that ``data.source: episodes`` reads on a machine without the sources (``ccmem data export``)."""
    from .data import write_episodes
    from .models import load_tokenizer

    tok = load_tokenizer(cfg["model"])
    from .training import TrainConfig

    seed = TrainConfig(**cfg["train"]).seed
    train, val, report = build_data(tok, cfg["data"], seed)
    meta = {"data": cfg["data"], "seed": seed, "tokenizer": str(tok.name_or_path), "vocab": vocab_digest(tok),
            "report": dict(report)}
    return write_episodes(path, train, val, epochs, meta)


def _need(d: dict, key: str, source: str) -> None:
    if not d.get(key):
        raise ConfigError(f"data.source {source!r} needs data.{key}")


def _holdout(eps: list, d: dict, seed: int, report):
    """Episodes -> (train, validation, report): the validation episodes are a seeded hash split by episode id."""
    import hashlib

    frac = d.get("eval_fraction", 0.05)
    val, train = [], []
    for e in eps:
        u = int(hashlib.sha256(f"{seed}:{e.id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (val if u < frac else train).append(e)
    if not train:
        raise ConfigError("no training episodes left; check the data source and its filters")
    return train, val[: d.get("eval_episodes", 64)], report


def _dialog_or_episode_file(tok: Any, d: dict, seed: int):
    """``jsonl`` (``kind: dialogs`` or ``episodes``, ccmem.data.sources), ``dailydialog`` and ``soda`` (hub names or
    local files in the hub's schema): dialogs are split by id and cut like the chit-chat corpus."""
    from .data import load_jsonl_dialogs, load_jsonl_episodes, split_dialogs
    from .data.hub import load_dailydialog, load_soda

    source, strict = d["source"], d.get("strict", False)
    if source == "jsonl":
        _need(d, "path", source)
        if d.get("kind", "dialogs") == "episodes":
            eps, report = load_jsonl_episodes(d["path"], tok, strict=strict)
            return _holdout(eps, d, seed, report)
        dialogs, report = load_jsonl_dialogs(d["path"], strict=strict)
    elif source == "dailydialog":
        dialogs, report = load_dailydialog(d.get("path", "daily_dialog"), split=d.get("split", "train"),
                                           strict=strict, tokenizer=tok, max_turn_tokens=d.get("max_turn_tokens", 128))
    else:
        dialogs, report = load_soda(d.get("path", "allenai/soda"), split=d.get("split", "train"), strict=strict,
                                    max_dialogs=d.get("max_dialogs"), tokenizer=tok,
                                    max_turn_tokens=d.get("max_turn_tokens", 128))
    splits = split_dialogs(dialogs, seed=d.get("split_seed", 0), test=0.0, val=d.get("eval_fraction", 0.05))
    fmt = dialog_format(tok, d)
    train, val = dialog_episodes(splits, fmt, d, seed, eval_dialogs=64)
    if not len(train):
        raise ConfigError(f"data.source {source!r}: no dialog with at least 3 turns left for training")
    return train, val, report


def training_totals(history: list[dict], per_step: int) -> dict[str, Any]:
    """Samples, tokens and hours a run has seen, and on which hardware, from its log rows. Rows written before the
    log recorded these count ``per_step`` samples (the recipe's global batch), tokens from tokens/s x seconds, and
    hardware 'unrecorded'; rows that record their precision are counted per hardware and precision."""
    from collections import Counter

    hw: Counter = Counter()
    hours: Counter = Counter()
    samples = tokens = 0
    for r in history:
        where = r.get("hardware", "unrecorded")
        if "precision" in r:  # the trainer may run a bf16 recipe in fp32 (a CPU without native bf16)
            where += f", {'fp32' if r['precision'] == 'no' else r['precision']}"
        hw[where] += 1
        hours[where] += r.get("seconds", 0.0) / 3600
        samples += r.get("samples", per_step)
        tokens += r.get("tokens", round(r.get("tokens_per_s", 0.0) * r.get("seconds", 0.0)))
    return {"trained_samples": samples, "trained_tokens": tokens,
            "hardware": {k: {"steps": hw[k], "hours": round(hours[k], 3)} for k in hw}}


def with_warm_start(totals: dict[str, Any], init: str | None, _seen: frozenset[Path] = frozenset()
                    ) -> dict[str, Any]:
    """This run's totals plus, for a run warm-started from another adapter, that adapter's own and the sums over both,
    so the folder says what all its weights have seen. The start's totals come from its ``train_summary.json`` (read
    when this run ends) or, for a training checkpoint, from the history its ``trainer_state.pt`` carries plus that
    run's own start. A start that is gone, unreadable or already counted (a cycle) is marked unknown, never summed."""
    if not init:
        return totals
    start: dict[str, Any] = {"adapter": str(init)}
    key = Path(init).resolve()
    try:
        before = None if key in _seen else _start_summary(Path(init), _seen | {key})
    except Exception as e:  # noqa: BLE001 - a damaged ancestor must not cost the run its summary
        before = None
        start["error"] = f"{type(e).__name__}: {e}"
    if before is None:  # its folder gone, never summarised or met before: the sums would be this run's alone
        why = ("already counted (a cycle)" if key in _seen else start.get("error")
               or "no train_summary.json or trainer state")
        return {**totals, "warm_start": {**start, "totals": f"unknown ({why})"}}
    for k in ("steps", "trained_samples", "trained_tokens", "hardware", "total_samples", "total_tokens", "warm_start"):
        if k in before:
            start[k] = before[k]
    return {**totals, "warm_start": start,
            "total_samples": totals["trained_samples"] + before.get("total_samples", before.get("trained_samples", 0)),
            "total_tokens": totals["trained_tokens"] + before.get("total_tokens", before.get("trained_tokens", 0))}


def _start_summary(init: Path, seen: frozenset[Path]) -> dict[str, Any] | None:
    """A start adapter's summary: its own file, or a checkpoint's totals over the history it was saved with (rows
    from before the log kept samples count that run's global batch), plus, where that run was itself warm-started
    (``init_adapter`` in its run folder's ``recipe.yaml``), its start's totals, so a branch of a branch still counts
    its whole lineage; None if neither."""
    if (init / "train_summary.json").exists():
        return json.loads((init / "train_summary.json").read_text())
    if not (init / "trainer_state.pt").exists():
        return None
    import torch

    st = torch.load(init / "trainer_state.pt", weights_only=True)
    per_step = st["config"]["batch_size"] * st["config"]["grad_accum"]
    summary = {"steps": st["step"], **training_totals(st.get("history", []), per_step)}
    f = recipe_file(init)  # the run folder's, for <run>/checkpoints/step_N
    cfg = yaml.safe_load(f.read_text()) if f is not None else None
    if isinstance(cfg, dict) and cfg.get("init_adapter"):
        return with_warm_start(summary, cfg["init_adapter"], seen)
    return summary


def run_record(cfg: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """What a run folder's ``recipe.yaml`` keeps: the recipe, and on a resume (``previous``: the run's record so far)
    the run's own start, ``init_adapter``, as it was (a resume reads its checkpoint and ignores it, so the lineage
    totals must not follow a new value), and the first sitting's ``train.max_minutes`` (a limit per sitting, not
    part of the run: a sitting of another length leaves the file as it was)."""
    out = copy.deepcopy(cfg)
    if isinstance(previous, dict):
        for k in ("init_adapter", "init_across_variants", "init_grow"):  # the start and how it was read go together
            if k in previous or k in out:
                out[k] = previous.get(k, DEFAULTS[k])
        before, now = previous.get("train"), out.get("train")
        if isinstance(before, dict) and isinstance(now, dict):
            if "max_minutes" in before:
                now["max_minutes"] = before["max_minutes"]
            else:
                now.pop("max_minutes", None)
    return out


def run_recipe(cfg: dict[str, Any], device: str | None = None) -> Path:
    """Train the adapter a recipe describes; returns the adapter folder."""
    import torch

    from . import train_log
    from .model import CompressedModel
    from .training import TrainConfig, Trainer, latest_checkpoint

    tcfg = TrainConfig(**cfg["train"])
    init = cfg.get("init_adapter")
    if init and Path(init).resolve().is_relative_to((Path(tcfg.output_dir) / "checkpoints").resolve()):
        raise ConfigError(f"init_adapter {init} is one of this run's own checkpoints (under {tcfg.output_dir}/"
                          "checkpoints): a run resumes its own newest checkpoint by itself, and starting it from one "
                          "of them again would count those steps twice in its totals; drop init_adapter to resume, "
                          "or give a new run another output_dir")
    comp = CompressionConfig(**cfg["compression"])
    if tcfg.mode == "full":
        comp = CompressionConfig(**{**cfg["compression"], "conditional": False})
    torch.manual_seed(tcfg.seed)
    model, tok = prepare_model(cfg["model"], cfg.get("base_adapter"),
                               device=device or ("cuda" if torch.cuda.is_available() else None))
    ccm = CompressedModel.attach(model, comp, tokenizer=tok)
    resuming = latest_checkpoint(tcfg.output_dir) is not None
    if cfg.get("init_adapter") and not resuming:
        # a warm start (same compression config, weights of an earlier run; a resumed run reads its checkpoint)
        try:
            ccm.load_adapter(cfg["init_adapter"], across_variants=bool(cfg.get("init_across_variants")),
                             grow=bool(cfg.get("init_grow")))
        except IncompatibleError as e:
            theirs = CompressedModel.read_adapter(cfg["init_adapter"])[1]["compression"]
            lora = {k: theirs.get(k) for k in ("lora_r", "target_modules")}
            mine = {"lora_r": comp.lora_r, "target_modules": list(comp.target_modules)}
            if not cfg.get("init_grow") and lora != mine:
                raise IncompatibleError(f"{e}; its LoRA is {lora}, this run's rank {comp.lora_r} on "
                                        f"{list(comp.target_modules)}: to start a larger LoRA from its weights on "
                                        "purpose, set init_grow: true in the recipe", e.fields) from e
            if e.fields != ("variant",):
                raise
            raise IncompatibleError(f"{e}; or, to start this {comp.variant} run from that adapter's weights on "
                                    "purpose, set init_across_variants: true in the recipe", e.fields) from e
        print(f"[ccmem] starting from the weights of {cfg['init_adapter']}")
    train, val, report = build_data(tok, cfg["data"], tcfg.seed)
    out = Path(cfg.get("output") or Path(tcfg.output_dir) / "adapter")
    log = Path(tcfg.output_dir) / "train_log.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)

    def on_log(rec: dict) -> None:
        with log.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    trainer = Trainer(ccm, train, tcfg, eval_data=val, pad_id=tok.pad_token_id or 0, on_log=on_log)
    record_file, previous = Path(tcfg.output_dir) / "recipe.yaml", None
    if resuming and record_file.is_file():
        try:
            previous = yaml.safe_load(record_file.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):  # a damaged record: this recipe replaces it
            previous = None
    record = run_record(cfg, previous)  # what the run is: its lineage follows the start it really had
    if trainer.acc.is_main_process:  # the run folder says what its checkpoints were trained on (their dialog format)
        record_file.write_text(yaml.safe_dump(record, sort_keys=False))
    if trainer.resume():
        print(f"[ccmem] resumed at step {trainer.step}")
        trainer.write_log(log)  # the checkpoint's history: rows of steps a killed run did after it are redone
    elif log.exists():
        log.unlink()
    trainer.fit()
    final_ppl = trainer.evaluate(val) if val else None  # every validation episode (periodic evals cap at eval_batches)
    if trainer.acc.is_main_process:
        ccm.save_pretrained(out)
        if cfg.get("base_adapter"):
            if (out / "stage1").is_symlink():  # shipped adapters share one stage 1 by link: write a real copy instead
                (out / "stage1").unlink()
            shutil.copytree(cfg["base_adapter"], out / "stage1", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("stage1", "checkpoints", "*.pt", "*.jsonl"))
        if log.exists():
            shutil.copy(log, out / "train_log.jsonl")
        if trainer.history:  # the run's loss per window of steps, per part of a mix (`ccmem train-curve`)
            try:  # a picture: never worth losing the summary below or hanging the other ranks for
                rows = trainer.history
                train_log.plot(train_log.windows(rows, train_log.default_window(len(rows))),
                               log.parent / "train_curve.png", title=f"{out.name}: training loss")
            except Exception as e:  # noqa: BLE001
                print(f"[ccmem] no train_curve.png ({type(e).__name__}: {e}); `ccmem train-curve {log.parent}` "
                      "draws it later")
        (out / "recipe.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
        per_step = tcfg.batch_size * tcfg.grad_accum * trainer.acc.num_processes
        (out / "train_summary.json").write_text(json.dumps(
            {"steps": trainer.step, "final_train_loss": trainer.history[-1]["loss"] if trainer.history else None,
             "validation_ppl": final_ppl, "validation_dialogs": len(val), "train_dialogs": len(train),
             "data_report": dict(report), "device": str(trainer.acc.device),
             **({"part_loss": parts} if (parts := train_log.pooled_parts(trainer.history)) else {}),
             **with_warm_start(training_totals(trainer.history, per_step), record.get("init_adapter"))},
            indent=2) + "\n")
    trainer.close()  # under torchrun / accelerate launch: no rank exits with its process group alive
    return out
