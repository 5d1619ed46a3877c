"""Bootstrap intervals: hand-checked cases, pairing across methods, and resampling units of each suite."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from ccmem.evaluation import Group, IclSuite, Query, gap_recovered
from ccmem.evaluation.intervals import (
    add_intervals,
    interval,
    percentile,
    pooled_ppl_replicates,
    ppl_margin_blocks,
    replicates,
)
from ccmem.evaluation.suites import Suite


class MeanSuite(Suite):
    """One value per group, carried as its only score; the metric is their mean."""

    name, metric, higher_is_better, ts = "mean", "value", True, (1,)

    def aggregate(self, groups, scores, calib):
        return {"value": sum(s[0][0][0] for s in scores) / len(scores)}


def data(values):
    return [Group(f"g{i}", [], [Query([1], [[2]])]) for i in range(len(values))], [[[(v, 1)]] for v in values]


def test_percentile_matches_numpy():
    r = random.Random(1)
    xs = [r.gauss(0, 1) for _ in range(257)]
    for q in (0.0, 0.025, 0.5, 0.975, 1.0):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, 100 * q)), abs=1e-12)
    assert interval(list(range(101))) == pytest.approx([2.5, 97.5])
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_two_groups_hand_checked():
    """Two contexts scoring a and b: a resample is (a, a), (a, b), (b, a) or (b, b), so the replicate mean is a, the
    midpoint or b with probabilities 1/4, 1/2, 1/4, and the central 95 % interval is exactly [a, b]."""
    groups, scores = data([0.2, 0.6])
    reps = replicates(MeanSuite(), groups, scores, None, "value", 4000, seed=0)
    assert set(round(x, 9) for x in reps) == {0.2, 0.4, 0.6}
    assert abs(sum(abs(x - 0.4) < 1e-9 for x in reps) / 4000 - 0.5) < 0.03
    assert interval(reps) == pytest.approx([0.2, 0.6])


def test_constant_metric_has_a_point_interval_and_width_shrinks_with_n():
    groups, scores = data([0.5] * 10)
    assert interval(replicates(MeanSuite(), groups, scores, None, "value", 200, 0)) == [0.5, 0.5]
    r = random.Random(0)
    widths = []
    for n in (25, 400):
        g, s = data([float(r.random() < 0.5) for _ in range(n)])
        lo, hi = interval(replicates(MeanSuite(), g, s, None, "value", 1000, 0))
        widths.append(hi - lo)
    # binomial: width ~ 4 * sqrt(p(1-p)/n) = 0.4 at n = 25, 0.1 at n = 400
    assert 0.3 < widths[0] < 0.5 and 0.07 < widths[1] < 0.13


def test_paired_margins_and_gap():
    """Replicate r draws the same contexts for every method: a method equal to another plus 0.1 everywhere has a
    margin interval of exactly [0.1, 0.1], however noisy each method is alone."""
    r = random.Random(3)
    base = [r.random() for _ in range(30)]
    suite = MeanSuite()
    reps = {}
    for name, shift in (("ccm_concat", 0.1), ("window", 0.0), ("none", -0.2), ("full", 0.3)):
        g, s = data([v + shift for v in base])
        reps[(name, 1)] = replicates(suite, g, s, None, "value", 300, seed=7)
    rows = [{"t": 1, "method": n, "value": 0.0, "gap_recovered": 0.0} for n in ("ccm_concat", "window")]
    margins = [{"t": 1, "ccm": "ccm_concat", "best_other": "window", "margin": 0.1}]
    add_intervals(rows, margins, reps, "value", higher=True)
    assert margins[0]["margin_ci"] == pytest.approx([0.1, 0.1])
    assert rows[0]["value_ci"][1] - rows[0]["value_ci"][0] > 0.05  # alone, each method is noisy
    assert rows[0]["gap_recovered_ci"] == pytest.approx([0.6, 0.6])  # (0.1 + 0.2) / (0.3 + 0.2), every draw
    assert rows[1]["gap_recovered_ci"] == pytest.approx([0.4, 0.4])


def test_icl_resamples_items_within_each_task():
    groups = [Group(f"task{k}", [], [Query([k], [[1], [2]], i % 2) for i in range(5)]) for k in range(3)]
    scores = [[[(-1.0, 1), (-2.0, 1)] for _ in range(5)] for _ in range(3)]
    g, s, c = IclSuite.resample(None, groups, scores, scores, random.Random(0))
    assert [x.id for x in g] == ["task0", "task1", "task2"]
    assert all(len(x.queries) == 5 and len(y) == 5 for x, y in zip(g, s)) and c is not None
    # stratified: every task keeps only its own items (input [k]), and some item is drawn twice
    assert all(q.input == [k] for k, x in enumerate(g) for q in x.queries)
    assert any(len({id(q) for q in x.queries}) < 5 for x in g)


def test_stream_margin_interval_is_paired_over_blocks():
    import math

    # a constant per-token gain of 0.1 nats: every replicate has the same margin, e^2.1 - e^2.0
    ours, other = [2.0] * 1000, [2.1] * 1000
    lo, hi = ppl_margin_blocks(ours, other, block=100, n=200)
    assert lo == pytest.approx(math.exp(2.1) - math.exp(2.0)) and hi == pytest.approx(lo)
    # two blocks, hand-checked: block A (ours 1, other 2), block B (both 1); with k copies of A among a replicate's
    # 2 draws its margin is e^((k + 2) / 2) - e^1: k = 0 -> 0, k = 1 -> e^1.5 - e^1, k = 2 -> e^2 - e^1
    ours, other = [1.0, 1.0], [2.0, 1.0]
    reps = {0: 0.0, 1: math.exp(1.5) - math.exp(1.0), 2: math.exp(2.0) - math.exp(1.0)}
    lo, hi = ppl_margin_blocks(ours, other, block=1, n=400)
    assert lo == pytest.approx(reps[0]) and hi == pytest.approx(reps[2])
    # the same noise on both runs cancels (paired): the interval stays a point at the shift
    rng = random.Random(0)
    noise = [rng.uniform(0, 3) for _ in range(2000)]
    lo, hi = ppl_margin_blocks(noise, noise, block=50, n=100)
    assert lo == hi == 0.0
    # a small gain on noisy NLLs: the interval holds the point estimate and, paired, excludes 0
    ours = list(noise)
    other = [x + 0.05 for x in noise]
    point = math.exp(sum(other) / len(other)) - math.exp(sum(ours) / len(ours))
    lo, hi = ppl_margin_blocks(ours, other, block=50, n=300)
    assert 0 < lo <= point <= hi
    with pytest.raises(ValueError, match="same tokens"):
        ppl_margin_blocks([1.0, 2.0], [1.0])


def test_pooled_ppl_replicates_hand_checked_and_paired():
    """Two one-token episodes of ppl 2 and 8: a resample pools (2, 2), (2, 8), (8, 2) or (8, 8), i.e. ppl 2, 4 or 8
    with probabilities 1/4, 1/2, 1/4, so the 95 % interval is [2, 8]. A method with log 2 more per token than the
    first on every episode has exactly twice its ppl in every replicate (paired), and gap recovered is exact too."""
    a = [(math.log(2), 1), (math.log(8), 1)]
    b = [(x + math.log(2) * c, c) for x, c in a]
    reps = pooled_ppl_replicates({"a": a, "b": b}, n=4000, seed=0)
    assert {round(x, 9) for x in reps["a"]} == {2.0, 4.0, 8.0}
    assert abs(sum(abs(x - 4) < 1e-9 for x in reps["a"]) / 4000 - 0.5) < 0.03
    assert interval(reps["a"]) == pytest.approx([2.0, 8.0])
    assert all(y == pytest.approx(2 * x) for x, y in zip(reps["a"], reps["b"]))
    # paired, so gap recovered of b between none = b and full = a is exactly 0 (and 1 for a) in every replicate
    assert all(gap_recovered(y, x, y) == 0 and gap_recovered(y, x, x) == pytest.approx(1)
               for x, y in zip(reps["a"], reps["b"]))
    assert pooled_ppl_replicates({"a": a}, n=50, seed=3) == pooled_ppl_replicates({"a": a}, n=50, seed=3)
    with pytest.raises(ValueError, match="same"):
        pooled_ppl_replicates({"a": a, "b": b[:1]})


def test_perplexity_per_episode_pools_to_the_total(make_ccm):
    """``scoring.perplexity`` keeps each episode's (nll, tokens): they sum to the pooled numbers and equal the
    episode scored alone, whatever batch it sat in (left padding changes nothing)."""
    from ccmem.data.episode import Episode
    from ccmem.scoring import perplexity

    ccm = make_ccm()
    eps = [Episode([[5, 6, 7], [8, 9]], [20, 21], [22, 23, 24]), Episode([[10, 11]], [30], [31]),
           Episode([[12, 13, 14, 15]], [40, 41, 42], [43, 44])]
    r = perplexity(ccm, eps, "compress", batch_size=2)
    assert [c for _, c in r.per_episode] == [3, 1, 2]
    assert r.nll == pytest.approx(sum(x for x, _ in r.per_episode)) and r.tokens == 6
    for e, (x, c) in zip(eps, r.per_episode):
        alone = perplexity(ccm, [e], "compress", batch_size=1)
        assert alone.tokens == c and alone.nll == pytest.approx(x, abs=1e-4)
