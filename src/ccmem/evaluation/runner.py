"""One evaluation run: every method on the same groups of a suite at each time step, in the parallel or the online
mode (optionally checking that both agree), kvpress presses in their own environment, then margins, the headline and
the report files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.episode import Episode
from ..errors import ConfigError
from .core import Budget, bytes_per_slot, option_logliks, per_unit
from .methods import Compressed, Method, NoContext, Press, control, flat, variant_view
from .score_cache import ScoreCache, config_digest, tokenizer_digest, weights_digest
from .suites import Group, Scores, Suite


@dataclass
class EvalConfig:
    """What a run compares. ``adapters`` maps trained method names (ccm_concat, ccm_merge, concat_nr, merge_nr,
    gist, gist_online, plus optional suffixes such as ccm_concat_cpu) to adapter folders; ``peers`` names, for a
    trained baseline, the CCM-concat trained with the same budget it is compared against; ``raw_tails`` reads a
    named adapter with another raw tail than its own (``--raw-tail NAME=K``)."""

    model: str = "smollm2"
    base_adapter: str | None = None  # stage-1 adapter folded into the reference (full-context) model
    adapters: dict[str, str] = field(default_factory=dict)
    peers: dict[str, str] = field(default_factory=dict)
    raw_tails: dict[str, int] = field(default_factory=dict)
    training_free: tuple[str, ...] = ("window", "streamingllm")
    presses: tuple[str, ...] = ("snapkv", "streamingllm", "knorm")
    mode: str = "auto"  # parallel | online | auto (parallel for one query per context, online otherwise)
    check: int = 2  # contexts per t scored both ways to check parallel == online (0: off)
    batch_size: int = 16
    n_tok: int = 2  # the training-free budget at step t: n_tok * t, + 1 for CCM-concat's sink (with a raw tail: its
    # slots for each unit, the tail's tokens included)
    kvpress_python: str | None = None
    device: str | None = None
    generate: bool = True  # suites that can (recall) also score greedy replies by exact match
    bootstrap: int = 1000  # paired bootstrap replicates for the 95 % intervals (0: none)
    bootstrap_seed: int = 0
    control: bool = False  # also score each CCM adapter with another context's memory (see other_context)
    score_cache: str | None = None  # folder of scores of the methods without an adapter, reused across runs


def methods_for(cfg: EvalConfig) -> list[Method]:
    from .methods import REFERENCE, TRAINING_FREE, press, trained

    out = [REFERENCE["none"](), REFERENCE["full"]()]
    out += [trained(n, p, cfg.peers.get(n, "ccm_concat"), cfg.raw_tails.get(n)) for n, p in cfg.adapters.items()]
    out += [TRAINING_FREE[n]() for n in cfg.training_free]
    out += [press(p) for p in cfg.presses]
    return out


# ------------------------------------------------------------------------------------------------ scoring
def score_online(method: Method, ccm: Any, groups: list[Group], budget: Budget, batch_size: int = 32,
                 calibration: bool = False, progress: bool = False) -> Scores:
    """Build the method's memory for each context with the online loop, then score every query target on top of
    it (the memory is forked across a batch of queries, never recomputed)."""
    out: Scores = []
    ccm.model.eval()
    for g, b in tqdm(list(zip(groups, per_unit(budget, len(groups)))), desc=f"{method.name} online",
                     disable=not progress, leave=False):
        s = method.session(ccm, [] if calibration else g.chunks, b)
        qs = g.calibration if calibration else g.queries
        rows = [(qi, ti, q.input, tgt) for qi, q in enumerate(qs) for ti, tgt in enumerate(q.targets)]
        res: list[list[Any]] = [[None] * len(q.targets) for q in qs]
        for i in range(0, len(rows), batch_size):
            part = rows[i:i + batch_size]
            sc = s.fork(len(part)).score([p[2] for p in part], [p[3] for p in part])
            for (qi, ti, _, tgt), lp in zip(part, sc.logprob.tolist()):
                res[qi][ti] = (lp, len(tgt))
        out.append(res)
    return out


def score_parallel(method: Method, ccm: Any, groups: list[Group], budget: Budget, batch_size: int = 16) -> Scores:
    """The same scores from one masked forward per (context, query, target) sequence (method.md §8)."""
    eps, mode, variant = [], None, None
    for g, b in zip(groups, per_unit(budget, len(groups))):
        for q in g.queries:
            ep, mode, variant = method.episode(Episode(g.chunks, q.input, [], q.targets, q.answer), b)
            eps.append(ep)
    with variant_view(ccm, variant):
        lls, lens = option_logliks(ccm, eps, mode, batch_size)
    out: Scores = []
    k = 0
    for g in groups:
        out.append([[(ll, n) for ll, n in zip(lls[k + i], lens[k + i])] for i in range(len(g.queries))])
        k += len(g.queries)
    return out


def max_abs_diff(a: Scores, b: Scores) -> float:
    return max((abs(x[0] - y[0]) for ga, gb in zip(a, b) for qa, qb in zip(ga, gb) for x, y in zip(qa, qb)),
               default=0.0)


# ------------------------------------------------------------------------------------------------ kvpress
def export_reference(model: Any, key: str, tokenizer: Any = None) -> Path:
    """Save the reference model (stage 1 folded in) once as a plain HF folder that kvpress's environment loads,
    with its tokenizer when given (KVzip reads its repeat prompt with it)."""
    from ..models import cache_dir

    d = cache_dir() / "eval-reference" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not (d / "config.json").exists():
        _prune_references(d.parent, KEEP_REFERENCES - 1)  # room for this one
        tmp = d.with_suffix(".tmp")
        model.save_pretrained(tmp)
        shutil.rmtree(d, ignore_errors=True)  # a folder left half-removed (no config.json) would block the rename
        tmp.rename(d)
    if tokenizer is not None and not (d / "tokenizer_config.json").exists():
        tokenizer.save_pretrained(d)
    with contextlib.suppress(OSError):
        os.utime(d)  # used: the last to be pruned
    return d


KEEP_REFERENCES = 3  # exported reference models kept (a SmolLM2 copy is about 0.5 GB): the most recently used
IN_USE_S = 6 * 3600  # one used this recently may be under a running evaluation's kvpress worker: never removed


def _prune_references(folder: Path, keep: int) -> None:
    """Remove all but the ``keep`` most recently used exported references, sparing any used in the last
    :data:`IN_USE_S` seconds (another run may be reading it), and half-written ones (``.tmp``) as old as that."""
    now, found = time.time(), []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for d in entries:
        with contextlib.suppress(OSError):
            if d.is_dir():
                found.append((d.stat().st_mtime, d))
    done = sorted((x for x in found if x[1].suffix != ".tmp"), key=lambda x: x[0], reverse=True)
    stale = [x for x in found if x[1].suffix == ".tmp"]
    for mtime, d in done[keep:] + stale:
        if now - mtime > IN_USE_S:
            shutil.rmtree(d, ignore_errors=True)


def default_kvpress_python() -> str | None:
    """``.venv-kvpress/bin/python`` of the checkout (``make kvpress-env``), or $CCMEM_KVPRESS_PYTHON."""
    env = os.environ.get("CCMEM_KVPRESS_PYTHON")
    if env:
        return env
    p = Path(__file__).resolve().parents[3] / ".venv-kvpress" / "bin" / "python"
    return str(p) if p.exists() else None


def run_kvpress(python: str, model_dir: Path, presses: list[str], jobs: list[tuple[int, list[Group], Budget]],
                batch_size: int = 32) -> tuple[dict[str, dict[int, Scores]], dict[str, dict[int, list[int]]]]:
    """Score every (t, groups, budget) job under each press in kvpress's environment (a budget for all the groups
    of a job, or one per group)."""
    groups_json = [{"context": flat(g.chunks), "budget": b,
                    "queries": [{"input": q.input, "targets": q.targets} for q in g.queries]}
                   for _, groups, budget in jobs for g, b in zip(groups, per_unit(budget, len(groups)))]
    with tempfile.TemporaryDirectory() as tmp:
        job, res = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"model": str(model_dir), "presses": list(presses), "groups": groups_json,
                                   "batch_size": batch_size, "threads": torch.get_num_threads()}))
        worker = Path(__file__).with_name("kvpress_worker.py")
        r = subprocess.run([python, str(worker), str(job), str(res)], stdout=subprocess.PIPE, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"the kvpress worker failed (exit {r.returncode}); run `make kvpress-env` to rebuild "
                               f"its environment. Output:\n{r.stdout[-2000:]}")
        data = json.loads(res.read_text())
    scores: dict[str, dict[int, Scores]] = {}
    held: dict[str, dict[int, list[int]]] = {}
    for p in presses:
        k = 0
        scores[p], held[p] = {}, {}
        for t, groups, _ in jobs:
            scores[p][t] = [[[tuple(x) for x in q] for q in g] for g in data["scores"][p][k:k + len(groups)]]
            held[p][t] = data["held"][p][k:k + len(groups)]
            k += len(groups)
    return scores, held


# ------------------------------------------------------------------------------------------------ run
def evaluate(suite: Suite, cfg: EvalConfig, load_model: Callable[[], Any] | None = None,
             progress: bool = True, tokenizer: Any = None, reference_memo: dict | None = None,
             replicates_out: dict | None = None) -> dict[str, Any]:
    """Run every method of ``cfg`` on ``suite``; returns the result dict (rows, margins, headline, agreement).
    ``tokenizer``: the model's, needed by the KVzip press. ``reference_memo``: a dict kept across runs of the same
    suite and base model (the frontier's budgets), so no context and full context, which no budget changes, are
    scored once. ``replicates_out``: filled with the bootstrap replicates by (method, t); replicate r draws the same
    units in every run with the same seed, so margins between runs (the frontier's budgets) stay paired."""
    from ..config import CompressionConfig
    from ..model import CompressedModel
    from ..recipe import prepare_model

    def fresh(stage1: bool):
        if load_model is not None:
            return load_model()
        return prepare_model(cfg.model, cfg.base_adapter if stage1 else None, device=cfg.device)[0]

    methods = methods_for(cfg)
    if cfg.control:  # every CCM adapter once more, on another context's memory (other_context)
        methods += [control(m) for m in list(methods) if m.kind == "trained" and m.name.startswith("ccm_")]
    sink = 0  # CCM-concat's sink slot: with one, equal KV gives the training-free methods one token more
    for name, path in cfg.adapters.items():
        if name == "ccm_concat":  # the training-free budget follows CCM-concat's n_tok
            _, header = CompressedModel.read_adapter(path)
            cfg.n_tok, sink = header["compression"]["n_tok"], int(bool(header["compression"].get("sink")))
    ts = list(suite.ts)
    groups = {t: suite.groups(t) for t in ts}
    other = {t: other_context(groups[t]) for t in ts} if cfg.control else {}
    # equal KV: CCM-concat's slots; read with a raw tail, each unit's own (the tail's turns count with their tokens)
    ccm_concat = next((m for m in methods if m.name == "ccm_concat" and isinstance(m, Compressed) and m.raw_tail), None)
    budgets: dict[int, Budget] = {
        t: [ccm_concat.slots(g.chunks, cfg.n_tok, 0) for g in groups[t]] if ccm_concat
        else cfg.n_tok * suite.steps(t) + sink for t in ts}
    mode = cfg.mode if cfg.mode != "auto" else (
        "parallel" if all(len(g.queries) == 1 for g in groups[ts[0]]) else "online")
    scores: dict[tuple[str, int], Scores] = {}
    agreement: dict[str, float] = {}
    notes: list[str] = []
    generated: dict[tuple[str, int], list[bool]] = {}  # exact-match hits, for suites that generate

    def run_method(m: Method, ccm: Any) -> None:
        for t in tqdm(ts, desc=m.name, disable=not progress):
            g, b = (other[t] if m.kind == "control" else groups[t]), budgets[t]
            if reference_memo is not None and m.kind == "reference" and (m.name, t) in reference_memo:
                scores[(m.name, t)], hits = reference_memo[(m.name, t)]
                if hits is not None:
                    generated[(m.name, t)] = hits
                continue
            key = None
            if cache is not None and m.kind in ("reference", "training-free"):  # no/full context take no budget
                key = cache.key(m, g, None if m.kind == "reference" else b)
            hit = cache.get(key, f"{m.name} t={t}", g) if key else None
            if hit is not None:
                scores[(m.name, t)] = hit["scores"]
                if hit.get("hits") is not None:
                    generated[(m.name, t)] = hit["hits"]
                if hit.get("agreement") is not None:
                    agreement[m.name] = max(agreement.get(m.name, 0.0), hit["agreement"])
                if reference_memo is not None and m.kind == "reference":
                    reference_memo[(m.name, t)] = (scores[(m.name, t)], generated.get((m.name, t)))
                continue
            diff = None
            if isinstance(m, NoContext) and t != ts[0] and _same_queries(g, groups[ts[0]]):
                scores[(m.name, t)] = scores[(m.name, ts[0])]  # no context and the same queries: same scores
                if (m.name, ts[0]) in generated:
                    generated[(m.name, t)] = generated[(m.name, ts[0])]
            else:
                if mode == "parallel":
                    scores[(m.name, t)] = score_parallel(m, ccm, g, b, cfg.batch_size)
                else:
                    scores[(m.name, t)] = score_online(m, ccm, g, b, max(cfg.batch_size, 32))
                if cfg.generate and hasattr(suite, "generate"):
                    generated[(m.name, t)] = suite.generate(m, ccm, g, b)
                if cfg.check:
                    part = [Group(x.id, x.chunks, x.queries[:8]) for x in g[:cfg.check]]
                    pb = per_unit(b, len(g))[:len(part)]
                    a = score_parallel(m, ccm, part, pb, cfg.batch_size)
                    o = score_online(m, ccm, part, pb, 32)
                    diff = max_abs_diff(a, o)
                    agreement[m.name] = max(agreement.get(m.name, 0.0), diff)
            if key:
                cache.put(key, f"{m.name} t={t}", scores[(m.name, t)], hits=generated.get((m.name, t)),
                          agreement=diff)
            if reference_memo is not None and m.kind == "reference":
                reference_memo[(m.name, t)] = (scores[(m.name, t)], generated.get((m.name, t)))

    # reference model: no context, full context, training-free budgets
    base = fresh(stage1=True)
    per_slot = bytes_per_slot(base)
    cache = None
    if cfg.score_cache:
        cache = ScoreCache(cfg.score_cache, _cache_setting(base, suite, cfg, mode, tokenizer))
    ref = CompressedModel.attach(base, CompressionConfig(variant="concat_recur", n_tok=cfg.n_tok))
    calib = None
    if any(g.calibration for g in groups[ts[0]]):
        key = cache.key("calibration", groups[ts[0]], 0) if cache else None
        hit = cache.get(key, "calibration", groups[ts[0]], calibration=True) if key else None
        calib = hit["scores"] if hit else score_online(NoContext("none", "", "reference"), ref, groups[ts[0]], 0, 64,
                                                       calibration=True)
        if key and not hit:
            cache.put(key, "calibration", calib)
    for m in methods:
        if m.kind in ("reference", "training-free") and not isinstance(m, Press):
            run_method(m, ref)
    presses = [m for m in methods if isinstance(m, Press)]
    press_held: dict[str, dict[int, list[int]]] = {}
    if presses:
        py = cfg.kvpress_python or default_kvpress_python()
        if py is None:
            notes.append("kvpress presses skipped: no kvpress environment (run `make kvpress-env` or set "
                         "CCMEM_KVPRESS_PYTHON)")
            methods = [m for m in methods if not isinstance(m, Press)]
        else:
            keys, hits = {}, {}
            versions = _kvpress_versions(py) if cache is not None else None
            if versions is not None:  # the worker runs on the CPU whatever the device: its float sums count too
                from ..hardware import cpu_name

                worker = {"kvpress": versions, "cpu": cpu_name(), "threads": torch.get_num_threads(),
                          "capability": torch.backends.cpu.get_cpu_capability()}
                for m in presses:
                    for t in ts:
                        keys[(m.name, t)] = cache.key(m, groups[t], budgets[t], worker=worker)
                        hits[(m.name, t)] = cache.get(keys[(m.name, t)], f"{m.name} t={t}", groups[t],
                                                      need=("held",))
            todo = [m for m in presses if any(hits.get((m.name, t)) is None for t in ts)]
            for m in presses:
                press_held[m.press] = {}
                if m not in todo:
                    for t in ts:
                        scores[(m.name, t)], press_held[m.press][t] = hits[(m.name, t)]["scores"], hits[
                            (m.name, t)]["held"]
            if todo:
                ref.detach(remove_weights=True)
                model_dir = export_reference(base, f"{weights_digest(base)}|{tokenizer_digest(tokenizer)}", tokenizer)
                jobs = [(t, groups[t], budgets[t]) for t in ts]
                ps, held = run_kvpress(py, model_dir, [m.press for m in todo], jobs, max(cfg.batch_size, 32))
                for m in todo:
                    for t in ts:
                        scores[(m.name, t)], press_held[m.press][t] = ps[m.press][t], held[m.press][t]
                        if keys:
                            cache.put(keys[(m.name, t)], f"{m.name} t={t}", ps[m.press][t], held=held[m.press][t])
                notes.append(f"kvpress run from {py} on {model_dir}")
    del ref, base

    # trained adapters, one model load each
    for m in methods:
        if m.kind != "trained":
            continue
        ccm = CompressedModel.from_pretrained(m.adapter, fresh(stage1=False),
                                              raw_tail=m.raw_tail if isinstance(m, Compressed) else None)
        run_method(m, ccm)
        for c in methods:
            if c.kind == "control" and c.adapter == m.adapter and c.peer == m.name:
                run_method(c, ccm)
        del ccm

    if cache is not None:
        cache.prune()
    if cache is not None and cache.note():
        notes.append(cache.note())

    # rows
    rows = []
    for m in methods:
        for t in ts:
            met = suite.aggregate(groups[t], scores[(m.name, t)], calib)
            if (m.name, t) in generated:
                met["exact_match"] = sum(generated[(m.name, t)]) / max(len(generated[(m.name, t)]), 1)
            unit_budget = per_unit(budgets[t], len(groups[t]))
            if isinstance(m, Press):
                slots = sum(press_held[m.press][t]) / len(groups[t])
            else:
                slots = sum(m.slots(g.chunks, cfg.n_tok, b) for g, b in zip(groups[t], unit_budget)) / len(groups[t])
            peak = sum(m.peak_slots(g.chunks, cfg.n_tok, b) for g, b in zip(groups[t], unit_budget)) / len(groups[t])
            rows.append({"t": t, "method": m.name, "label": m.label, "kind": m.kind, **met,
                         "kv_slots": slots, "kv_kib": slots * per_slot / 1024, "peak_kv_kib": peak * per_slot / 1024,
                         "budget_slots": budgets[t] if isinstance(budgets[t], int)
                         else sum(unit_budget) / len(unit_budget)})
    _gap(rows, suite.metric)
    margins = _margins(rows, methods, suite.metric, suite.higher_is_better)
    peak_margins = _margins(rows, methods, suite.metric, suite.higher_is_better, kv="peak_kv_kib")
    context = _context_value(rows, methods, suite.metric, suite.higher_is_better)
    versus = _adapter_margins(rows, methods, suite.metric, suite.higher_is_better)
    if cfg.bootstrap:
        from .intervals import add_intervals, replicates

        reps = {(m.name, t): replicates(suite, groups[t], scores[(m.name, t)], calib, suite.metric, cfg.bootstrap,
                                        cfg.bootstrap_seed) for m in methods for t in ts}
        add_intervals(rows, margins, reps, suite.metric, suite.higher_is_better)
        add_intervals([], peak_margins, reps, suite.metric, suite.higher_is_better)
        add_intervals([], context, reps, suite.metric, suite.higher_is_better, other="control")
        add_intervals([], versus, reps, suite.metric, suite.higher_is_better, other="other")
        if replicates_out is not None:
            replicates_out.update(reps)
    return {"rows": rows, "margins": margins, "peak_margins": peak_margins, "context_value": context,
            "adapter_margins": versus, "rivals": rivals(methods),
            "agreement": agreement, "mode": mode,
            "notes": notes,
            "methods": [{"name": m.name, "label": m.label, "kind": m.kind, "adapter": m.adapter,
                         "peer": m.peer if m.kind == "trained" else None,
                         **({"raw_tail": m.raw_tail} if isinstance(m, Compressed) else {})} for m in methods],
            "bytes_per_slot": per_slot, "config": {**asdict(cfg), **suite.describe(), "ts": ts}}


def other_context(groups: list[Group]) -> list[Group]:
    """The control's groups: each keeps its queries but reads the context of the next group with as many chunks
    (rotated in a fixed order). A trained memory can help a query two ways: by what it holds of this context, or by
    a prior it learned (the reply's format, the domain) that any context gives; scored on another context, only the
    prior is left, so the adapter's own row minus this one is what its memory of the context is worth."""
    by_len: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_len.setdefault(len(g.chunks), []).append(i)
    source = list(range(len(groups)))
    for idx in by_len.values():
        for a, b in zip(idx, idx[1:] + idx[:1]):
            source[a] = b
    return [Group(g.id, groups[j].chunks, g.queries, g.calibration) for g, j in zip(groups, source)]


def _same_queries(a: list[Group], b: list[Group]) -> bool:
    return len(a) == len(b) and all(
        len(x.queries) == len(y.queries)
        and all(p.input == q.input and p.targets == q.targets for p, q in zip(x.queries, y.queries))
        for x, y in zip(a, b))


def _gap(rows: list[dict], metric: str) -> None:
    by = {(r["t"], r["method"]): r[metric] for r in rows}
    for r in rows:
        none, full = by.get((r["t"], "none")), by.get((r["t"], "full"))
        ok = none is not None and full is not None and none != full
        r["gap_recovered"] = (r[metric] - none) / (full - none) if ok else None


def _margins(rows: list[dict], methods: list[Method], metric: str, higher: bool, kv: str = "kv_kib") -> list[dict]:
    """Per t and per CCM-concat: its margin over the best other method whose KV is at most its own (positive =
    CCM-concat better). Trained baselines are compared with the CCM-concat of the same training budget.
    ``kv="peak_kv_kib"`` compares by the KV alive at the peak of reading the context instead of the KV held after
    it: an online session must bound that too, which one-shot presses over the whole history (KVzip, SnapKV) do
    not. CCM's other layout (CCM-merge) is no rival either: it is the same method with a smaller memory, shown
    beside it; the rivals are the training-free methods, the presses and the trained baselines (Gisting and the
    non-recurrent layouts), as :func:`rivals` lists them."""
    by = {(r["t"], r["method"]): r for r in rows}
    peers = sorted({m.name for m in methods if m.kind == "trained" and m.name.startswith("ccm_concat")})
    against = {p: rivals(methods, p, main="ccm_concat" in peers) for p in peers}
    out = []
    for t in sorted({r["t"] for r in rows}):
        for p in peers:
            pr = by[(t, p)]
            best = None
            for name in against[p]:
                r = by[(t, name)]
                if r[kv] > pr[kv] * (1 + 1e-9):
                    continue
                margin = (pr[metric] - r[metric]) if higher else (r[metric] - pr[metric])
                if best is None or margin < best["margin"]:
                    best = {"t": t, "ccm": p, "best_other": name, "ccm_value": pr[metric], "other_value": r[metric],
                            "margin": margin}
            if best:
                out.append(best)
    return out


def rivals(methods: list[Method], peer: str = "ccm_concat", main: bool = True) -> list[str]:
    """The methods CCM-concat ``peer`` is measured against at equal KV: training-free methods and presses (only for
    the main CCM-concat when ``main``, i.e. the run has one), no context, and the trained baselines whose peer it is.
    Not full context (the ceiling), not a control (the adapter itself on another context), not CCM itself
    (another CCM-concat, or CCM-merge: the same method's smaller memory)."""
    out = []
    for m in methods:
        if m.name == "full" or m.kind == "control" or m.name.startswith("ccm_"):
            continue
        if m.kind == "trained" and m.peer != peer:
            continue
        if m.kind != "trained" and peer != "ccm_concat" and main:
            continue  # training-free methods are compared with the main CCM-concat
        out.append(m.name)
    return out


def _context_value(rows: list[dict], methods: list[Method], metric: str, higher: bool) -> list[dict]:
    """Per t and per adapter with a control: its metric minus its control's (positive = better on its own context).
    Both rows ask the same queries with memories of equal size, so what is left is what the memory holds of *this*
    context; the adapter's gain over no context minus this is the prior any memory gives."""
    by = {(r["t"], r["method"]): r for r in rows}
    out = []
    for c in methods:
        if c.kind != "control":
            continue
        for t in sorted({r["t"] for r in rows}):
            own, ctl = by[(t, c.peer)][metric], by[(t, c.name)][metric]
            out.append({"t": t, "ccm": c.peer, "control": c.name, "ccm_value": own, "control_value": ctl,
                        "margin": (own - ctl) if higher else (ctl - own)})
    return out


def _adapter_margins(rows: list[dict], methods: list[Method], metric: str, higher: bool) -> list[dict]:
    """Per t: the main CCM-concat against every other CCM-concat adapter of the run (``ccm_concat_*``, controls
    aside; positive = the main one better), with both KVs. Two adapters scored on the same units in one run are
    compared pairwise, replicate by replicate, which two result files cannot do: this is how a new adapter is told
    apart from the one it may replace. Other layouts (merge, Gisting) hold other KV and meet CCM-concat in the
    margins at equal KV instead."""
    by = {(r["t"], r["method"]): r for r in rows}
    if not any(m.name == "ccm_concat" for m in methods):
        return []
    others = [m.name for m in methods
              if m.kind == "trained" and m.name.startswith("ccm_concat_") and m.name != "ccm_concat"]
    out = []
    for t in sorted({r["t"] for r in rows}):
        main = by[(t, "ccm_concat")]
        for o in others:
            r = by[(t, o)]
            out.append({"t": t, "ccm": "ccm_concat", "other": o, "ccm_value": main[metric], "other_value": r[metric],
                        "margin": (main[metric] - r[metric]) if higher else (r[metric] - main[metric]),
                        "ccm_kv_kib": main.get("kv_kib"), "other_kv_kib": r.get("kv_kib")})
    return out


def headline(result: dict[str, Any], metric: str, unit: str, min_t: int = 4) -> dict[str, Any]:
    """CCM-concat's margin over the best other method at equal KV budget, worst case over t >= ``min_t``."""
    ms = [m for m in result["margins"] if m["t"] >= min_t] or result["margins"]
    worst = min(ms, key=lambda m: m["margin"])
    others = sorted({m["best_other"] for m in ms})
    ci = worst.get("margin_ci")
    return {"metric": f"ccm_concat_margin_worst_t_ge_{min_t}", "value": round(worst["margin"], 4), "target": 0.0,
            "higher_is_better": True, "unit": unit,
            **({"interval_95": [round(x, 4) for x in ci]} if ci else {}),
            "meaning": f"min over t >= {min_t} of CCM-concat's {metric} margin over the best other method holding at "
                       f"most its KV (positive = CCM-concat better); worst at t={worst['t']} against "
                       f"{worst['best_other']} ({worst['ccm']}); methods that were best somewhere: {others}"}


def main_command() -> str:
    return "ccmem " + " ".join(sys.argv[1:])


# ------------------------------------------------------------------------------------------------ named suites
SUITES: dict[str, dict[str, Any]] = {
    "chitchat": {
        "base_adapter": "adapters/chitchat-stage1",
        "adapters": {"ccm_concat": "adapters/chitchat-concat", "ccm_merge": "adapters/chitchat-merge",
                     "ccm_concat_cpu": "adapters/chitchat-concat-cpu", "concat_nr_cpu": "adapters/chitchat-concat-nr",
                     "merge_nr_cpu": "adapters/chitchat-merge-nr", "gist_cpu": "adapters/chitchat-gist",
                     "gist_online_cpu": "adapters/chitchat-gist"},
        "peers": {"concat_nr_cpu": "ccm_concat_cpu", "merge_nr_cpu": "ccm_concat_cpu", "gist_cpu": "ccm_concat_cpu",
                  "gist_online_cpu": "ccm_concat_cpu"},
        "title": "Chit-chat next-turn perplexity: every method per time step (SmolLM2-135M-Instruct)",
        "unit": "ppl",
    },
    "icl": {
        "base_adapter": None,
        "adapters": {"ccm_concat": "adapters/icl-concat", "ccm_merge": "adapters/icl-merge",
                     "concat_nr": "adapters/icl-concat-nr", "merge_nr": "adapters/icl-merge-nr",
                     "gist": "adapters/icl-gist", "gist_online": "adapters/icl-gist"},
        "peers": {},
        "title": "In-context learning on unseen tasks: accuracy per time step (SmolLM2-135M-Instruct)",
        "unit": "accuracy",
    },
    "recall": {
        "base_adapter": "adapters/chitchat-stage1",
        "adapters": {"ccm_concat": "adapters/chitchat-concat", "ccm_merge": "adapters/chitchat-merge"},
        "peers": {},
        "title": "Recall of a fact stated d turns earlier in a chit-chat dialog (SmolLM2-135M-Instruct)",
        "unit": "accuracy",
    },
}


FRONTIER_TS = {"chitchat": (8, 12), "icl": (8, 16), "recall": (8, 16)}


def build_suite(suite: str, tok: Any, limit: int | None, ts: list[int] | None, format: str = "plain",
                facts: int = 1, dialogs: str = "chitchat") -> Suite:
    """A named suite on ``tok`` (``limit``: dialogs, items per task or facts per distance; ``format``: how the
    dialog suites render turns, ``plain`` or ``template``; ``facts``: facts stated per fact turn, recall only;
    ``dialogs``: where the dialog suites take their dialogs, ``chitchat`` or a held-out script source)."""
    from ..data.scripts import parse_dialogs

    if facts != 1 and suite != "recall":
        raise ValueError(f"facts per turn is an option of the recall suite, not of {suite!r}; leave it at 1")
    if dialogs != "chitchat" and suite not in ("chitchat", "recall"):
        raise ValueError(f"--dialogs is an option of the chitchat and recall suites, not of {suite!r}")
    parse_dialogs(dialogs)
    if suite == "chitchat":
        from .suites import ChitchatSuite

        return ChitchatSuite(tok, dialogs=limit or 100, format=format, source=dialogs, **({"ts": ts} if ts else {}))
    if suite == "recall":
        from .suites import RecallSuite

        return RecallSuite(tok, items=limit or 100, format=format, facts=facts, source=dialogs,
                           **({"ts": ts} if ts else {}))
    from .suites import IclSuite

    return IclSuite(tok, items=limit or 100, **({"ts": ts} if ts else {}))


def seen_domain(adapters: dict[str, str], dialogs: str) -> None:
    """Refuse to score an adapter on every run of a script source whose training plays its recipe trained on: those
    numbers would mix seen plays with unseen ones. ``<source>:test`` reads the held-out plays only."""
    from ..recipe import adapter_scripts

    seen = sorted(k for k, v in adapters.items() if v and dialogs in adapter_scripts(v))
    if seen:
        raise ValueError(f"{', '.join(seen)} trained on {dialogs}'s training plays (a recipe part source: script, "
                         f"its own or that of an adapter it started from); score on the plays it never saw with "
                         f"--dialogs {dialogs}:test")


def dialog_format_of(adapters: dict[str, str], format: str, suite: str) -> tuple[str, list[str]]:
    """(format, notes): ``auto`` takes the dialog format the adapters' recipes were trained on (a checkpoint's from
    its run folder), ``plain`` when none says; an adapter without any recipe is named in the notes, since the format
    it is scored in is then a guess."""
    from ..recipe import adapter_dialog_format, recipe_file

    notes: list[str] = []
    if format == "auto":
        found = {k: f for k, f in ((k, adapter_dialog_format(v)) for k, v in adapters.items()) if f}
        if len(set(found.values())) > 1:
            raise ValueError(f"the adapters were trained on different dialog formats ({found}); score them in "
                             "separate runs, or pick one with --format plain|template")
        format = next(iter(found.values()), "plain")
        if suite != "icl":
            notes = [f"{k}: {v} has no recipe.yaml (nor has its run folder), so the format it was trained on is "
                     f"unknown; the dialog suites render {format} turns (pass --format to choose)"
                     for k, v in adapters.items() if recipe_file(v) is None]
    if format not in ("plain", "template"):
        raise ValueError(f"format must be auto, plain or template, got {format!r}")
    return format, notes


def run_named(suite: str, out_dir: str | Path = "benchmarks/results", name: str | None = None,
              adapters: dict[str, str] | None = None, limit: int | None = None, ts: list[int] | None = None,
              command: str | None = None, frontier: bool = False, format: str = "auto", facts: int = 1,
              dialogs: str = "chitchat", **cfg_kw: Any) -> tuple[dict[str, Any], list[Path]]:
    """``ccmem eval``: build a named suite on the default model, run every method whose adapter exists, write the
    JSON / markdown / PNG reports. Missing adapters are listed in the report's notes, never silently dropped.
    ``frontier``: every method at several KV budgets instead (:mod:`.frontier`), at the suite's frontier steps.
    ``format``: how the dialog suites render turns; ``auto`` takes the format the adapters were trained on
    (:func:`ccmem.recipe.adapter_dialog_format`; ``plain`` when none says), so an adapter is scored on its own text.
    ``facts``: the recall suite with that many facts stated in the fact turn, one of them asked. ``dialogs``: the
    dialog suites on a held-out domain (:mod:`ccmem.data.scripts`; ``<source>:test``: its held-out plays only)
    instead of the chit-chat test split."""
    from ..models import load_tokenizer

    t0 = time.perf_counter()
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; known: {sorted(SUITES)}")
    d = SUITES[suite]
    wanted = dict(d["adapters"]) if adapters is None else dict(adapters)
    stray = sorted(set(cfg_kw.get("raw_tails") or {}) - set(wanted))
    if stray:
        raise ValueError(f"a raw tail is set for {stray}, which no adapter of this run is called; name the method "
                         f"as in its adapter (runs: {sorted(wanted)})")
    present = {k: v for k, v in wanted.items() if (Path(v) / "adapter.safetensors").exists()}
    notes = [f"{k}: adapter {v} not found, method skipped" for k, v in wanted.items() if k not in present]
    cfg_kw.setdefault("base_adapter", d["base_adapter"])
    cfg = EvalConfig(adapters=present,
                     peers={k: v for k, v in d["peers"].items() if v in present}, **cfg_kw)
    seen_domain({**present, "base adapter": cfg.base_adapter}, dialogs)
    py = cfg.kvpress_python or default_kvpress_python()
    if cfg.presses and not py:  # before any scoring, not in the notes
        raise ConfigError(f"the comparison includes the kvpress presses {', '.join(cfg.presses)}, but there is no "
                          "kvpress environment (.venv-kvpress of the checkout, or $CCMEM_KVPRESS_PYTHON); build it "
                          "with `make kvpress-env`, or pass --presses '' to compare without them (the headline then "
                          "leaves them out)")
    if cfg.presses and shutil.which(py) is None:
        where = ("the run's kvpress_python" if cfg.kvpress_python else
                 "$CCMEM_KVPRESS_PYTHON" if os.environ.get("CCMEM_KVPRESS_PYTHON") else "the checkout")
        raise ConfigError(f"the kvpress python {py!r} (from {where}) is not an executable file; point it at the "
                          "python of an environment with kvpress (`make kvpress-env` builds .venv-kvpress), or pass "
                          "--presses '' to compare without the presses")
    tok = load_tokenizer(cfg.model)
    format, format_notes = dialog_format_of(present, format, suite)
    notes += format_notes
    if frontier:
        from .frontier import frontier as run_frontier
        from .frontier import write as write_frontier

        s = build_suite(suite, tok, limit, ts or list(FRONTIER_TS[suite]), format, facts, dialogs)
        res = run_frontier(s, cfg, tokenizer=tok)
        res["notes"] = notes + res["notes"]
        res["name"] = name or f"frontier_{suite}"
        res["command"] = command or main_command()
        res["environment"] = _environment_with_kvpress(cfg)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        res = {**{k: res.pop(k) for k in ("name", "command", "headline", "environment", "config")}, **res}
        return res, write_frontier(Path(out_dir), res["name"], res)
    s = build_suite(suite, tok, limit, ts, format, facts, dialogs)
    res = evaluate(s, cfg, tokenizer=tok)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["notes"] = notes + res["notes"]
    res["title"] = (d["title"] + (f" ({facts} facts stated together, one asked)" if facts > 1 else "")
                    + (f" on {dialogs} dialogs (a held-out domain)" if dialogs != "chitchat" else ""))
    res["command"] = command or main_command()
    res["name"] = name or f"eval_{suite}"
    res["headline"] = headline(res, s.metric, d["unit"])
    res["environment"] = _environment_with_kvpress(cfg)
    ordered = {k: res.pop(k) for k in ("name", "command", "headline", "environment", "config")}
    res = {**ordered, **res}
    from .report import write

    return res, write(Path(out_dir), res["name"], res, res["methods"], s.metric, s.higher_is_better)


def _cache_setting(base: Any, suite: Suite, cfg: EvalConfig, mode: str, tokenizer: Any) -> dict[str, Any]:
    """What a cached score depends on beyond its method, groups and budget (see :mod:`.score_cache`)."""
    import transformers

    from ..hardware import device_name

    device = next(base.parameters()).device
    return {"model": weights_digest(base), "config": config_digest(base), "device": f"{device} {device_name(device)}",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "mode": mode, "batch_size": cfg.batch_size,
            "check": cfg.check, "generate": cfg.generate and hasattr(suite, "generate"), "suite": suite.describe(),
            "transformers": transformers.__version__, "tokenizer": tokenizer_digest(tokenizer)}


def _kvpress_versions(py: str) -> str | None:
    """kvpress, transformers and torch versions of kvpress's environment (its package metadata: kvpress has no
    ``__version__``), or None where that environment cannot say."""
    r = subprocess.run([py, "-c", "from importlib.metadata import version as v; "
                        "print(v('kvpress'), v('transformers'), v('torch'))"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 and len(r.stdout.split()) == 3 else None


def _environment_with_kvpress(cfg: EvalConfig) -> dict[str, Any]:
    from .report import environment

    extra = {}
    py = cfg.kvpress_python or default_kvpress_python()
    if py and cfg.presses:
        versions = _kvpress_versions(py)
        if versions is not None:
            extra = {"kvpress_env": dict(zip(("kvpress", "transformers", "torch"), versions.split()))}
    return environment(extra)
