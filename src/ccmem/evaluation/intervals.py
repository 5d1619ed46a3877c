"""95 % bootstrap intervals for every metric, gap recovered and margin of an evaluation run.

Resampling is over the suite's units (dialogs for chit-chat, facts for recall, items within each task for ICL: see
``Suite.resample``) and **paired**: replicate r draws the same units for every method at a time step, so a margin's
interval reflects how the two methods differ on the same contexts, not two independent noises. Percentile intervals;
replicate r of every method uses ``random.Random(seed + r)``, so a run is reproducible. A streamed text has no such
units: :func:`ppl_margin_blocks` resamples runs of consecutive tokens instead.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from ..metrics import perplexity

LEVEL = 0.95


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("no values")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def interval(values: Sequence[float], level: float = LEVEL) -> list[float]:
    """Central percentile interval [lo, hi] holding ``level`` of the replicates."""
    a = (1 - level) / 2
    return [percentile(values, a), percentile(values, 1 - a)]


def replicates(suite: Any, groups: list, scores: list, calib: list | None, metric: str, n: int, seed: int
               ) -> list[float]:
    """The suite's metric on ``n`` paired resamples of one method's scores at one time step."""
    out = []
    for r in range(n):
        g, s, c = suite.resample(groups, scores, calib, random.Random(seed + r))
        out.append(suite.aggregate(g, s, c)[metric])
    return out


def add_intervals(rows: list[dict], margins: list[dict], reps: dict[tuple[str, int], list[float]], metric: str,
                  higher: bool, level: float = LEVEL, other: str = "best_other") -> None:
    """Write ``<metric>_ci``, ``gap_recovered_ci`` (rows) and ``margin_ci`` (margins: ``m["ccm"]`` minus
    ``m[other]``, in the better direction) from paired replicates ``reps[(method, t)]``."""
    for r in rows:
        rep = reps.get((r["method"], r["t"]))
        if rep is None:
            continue
        r[f"{metric}_ci"] = interval(rep, level)
        none, full = reps.get(("none", r["t"])), reps.get(("full", r["t"]))
        if none and full and r.get("gap_recovered") is not None:
            gaps = [(x - a) / (b - a) for x, a, b in zip(rep, none, full) if b != a]
            r["gap_recovered_ci"] = interval(gaps, level) if gaps else None
    for m in margins:
        a, b = reps.get((m["ccm"], m["t"])), reps.get((m[other], m["t"]))
        if a and b:
            diffs = [(x - y) if higher else (y - x) for x, y in zip(a, b)]
            m["margin_ci"] = interval(diffs, level)


def pooled_ppl_replicates(per_episode: dict[str, Sequence[tuple[float, int]]], n: int = 1000, seed: int = 0
                          ) -> dict[str, list[float]]:
    """Paired bootstrap of pooled perplexities over episodes: replicate r draws one list of episode indices, with
    replacement, from ``random.Random(seed + r)`` and pools every method's (nll, tokens) over those same episodes, so
    a difference or gap recovered computed replicate by replicate is paired. ``per_episode[method]`` lists each
    episode's (nll sum, token count) in one shared order (:class:`ccmem.scoring.PPL`'s ``per_episode``)."""
    sizes = {len(v) for v in per_episode.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every method must score the same, non-empty list of episodes; got sizes {sorted(sizes)}")
    m = sizes.pop()
    out: dict[str, list[float]] = {k: [] for k in per_episode}
    for r in range(n):
        idx = draw(m, random.Random(seed + r))
        for k, rows in per_episode.items():
            out[k].append(perplexity(sum(rows[i][0] for i in idx), sum(rows[i][1] for i in idx)))
    return out


def ppl_margin_blocks(nll_ours: Sequence[float], nll_other: Sequence[float], block: int = 500, n: int = 1000,
                      seed: int = 0, level: float = LEVEL) -> list[float]:
    """Interval of ``ppl(other) - ppl(ours)`` over one stream scored twice (the same tokens, per-token NLLs): a paired
    block bootstrap. Neighbouring tokens are not independent, so the unit is a run of ``block`` consecutive tokens;
    replicate r draws as many blocks as the stream holds, with replacement, from ``random.Random(seed + r)``."""
    if len(nll_ours) != len(nll_other) or not nll_ours:
        raise ValueError(f"the two runs must score the same tokens; got {len(nll_ours)} and {len(nll_other)} NLLs")
    starts = range(0, len(nll_ours), block)
    sums = [(sum(nll_ours[i:i + block]), sum(nll_other[i:i + block]), len(nll_ours[i:i + block])) for i in starts]
    out = []
    for r in range(n):
        rng = random.Random(seed + r)
        pick = [sums[rng.randrange(len(sums))] for _ in sums]
        count = sum(c for _, _, c in pick)
        out.append(math.exp(sum(b for _, b, _ in pick) / count) - math.exp(sum(a for a, _, _ in pick) / count))
    return interval(out, level)


def draw(n: int, rng: random.Random) -> list[int]:
    """n indices in [0, n) with replacement: one bootstrap resample of n units."""
    return [rng.randrange(n) for _ in range(n)]


def resample_groups(groups: list, scores: list, calib: list | None, rng: random.Random
                    ) -> tuple[list, list, list | None]:
    """Draw len(groups) groups with replacement (the unit is a context: a dialog, a fact)."""
    idx = draw(len(groups), rng)
    return [groups[i] for i in idx], [scores[i] for i in idx], [calib[i] for i in idx] if calib else calib


def resample_queries(groups: list, scores: list, calib: list | None, rng: random.Random
                     ) -> tuple[list, list, list | None]:
    """Within each group, draw its queries with replacement (stratified: a group is a task of fixed size)."""
    from dataclasses import replace

    g2, s2, c2 = [], [], [] if calib else calib
    for gi, g in enumerate(groups):
        idx = [rng.randrange(len(g.queries)) for _ in g.queries]
        g2.append(replace(g, queries=[g.queries[i] for i in idx]))
        s2.append([scores[gi][i] for i in idx])
        if calib:
            c2.append([calib[gi][i] for i in idx])
    return g2, s2, c2
