"""Every evaluation method runs end to end on a tiny model and fixture suite, in both modes, and the modes agree;
kvpress (in its own environment) reproduces full context exactly when its budget keeps every token."""

from __future__ import annotations

import random

import pytest
from conftest import tiny_ccm, tiny_model

from ccmem.evaluation import EvalConfig, Group, IclSuite, Query, Suite, evaluate, headline
from ccmem.evaluation.methods import FullContext
from ccmem.evaluation.report import rerender, write
from ccmem.evaluation.runner import default_kvpress_python, export_reference, run_kvpress, score_online

VARIANTS = {"ccm_concat": "concat_recur", "ccm_merge": "merge_recur", "concat_nr": "concat", "merge_nr": "merge",
            "gist": "gist"}


class TinySuite(Suite):
    """Three contexts of random chunks; two multiple-choice queries each, with calibration queries."""

    name, metric, higher_is_better, ts = "tiny", "acc_norm", True, (1, 2, 4)

    def groups(self, t):
        rng = random.Random(0)
        out = []
        for g in range(3):
            chunks = [[rng.randrange(3, 120) for _ in range(rng.randint(3, 6))] for _ in range(max(self.ts))][:t]
            qs = [Query([rng.randrange(3, 120) for _ in range(3)], [[rng.randrange(3, 120)] * k for k in (1, 2, 3)],
                        rng.randrange(3)) for _ in range(2)]
            out.append(Group(f"g{g}", chunks, qs, [Query([5], q.targets, q.answer) for q in qs]))
        return out

    aggregate = IclSuite.aggregate

    def describe(self):
        return {"suite": "tiny"}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, variant in VARIANTS.items():
        tiny_ccm(variant=variant, seed=0).save_pretrained(d / name)
        out[name] = str(d / name)
    out["gist_online"] = out["gist"]
    tiny_ccm(variant="concat_recur", seed=0, raw_tail=1).save_pretrained(d / "tail")
    out["ccm_concat_tail"] = str(d / "tail")
    return out


@pytest.mark.parametrize("mode", ["parallel", "online"])
def test_every_method_runs_and_modes_agree(adapters, mode, tmp_path, monkeypatch):
    monkeypatch.setenv("CCMEM_CACHE", str(tmp_path / "cache"))
    presses = ("snapkv", "streamingllm", "knorm") if default_kvpress_python() else ()
    cfg = EvalConfig(adapters=adapters, presses=presses, mode=mode, check=3, batch_size=4, bootstrap=200)
    res = evaluate(TinySuite(), cfg, load_model=lambda: tiny_model(seed=0), progress=False)
    names = {m["name"] for m in res["methods"]}
    expected = {"none", "full", "window", "streamingllm", *adapters} | {f"kvpress_{p}" for p in presses}
    assert names == expected
    assert len(res["rows"]) == len(expected) * 3
    # the full-context row is the suite's metric on an independent online scoring of the same groups
    ref_scores = score_online(FullContext("full", "", "reference"), tiny_ccm(seed=0), TinySuite().groups(4), 0)
    want = TinySuite().aggregate(TinySuite().groups(4), ref_scores, None)["acc_norm"]
    assert {(r["t"], r["method"]): r for r in res["rows"]}[(4, "full")]["acc_norm"] == pytest.approx(want)
    # parallel forward == online loop for every method that has both
    assert set(res["agreement"]) == expected - {f"kvpress_{p}" for p in presses}
    assert max(res["agreement"].values()) < 1e-4, res["agreement"]
    by = {(r["t"], r["method"]): r for r in res["rows"]}
    # KV accounting: concat grows n per step, merge and gist hold n, window/presses hold the budget
    for t in (1, 2, 4):
        assert by[(t, "ccm_concat")]["kv_slots"] == 2 * t
        # the raw tail holds the newest chunk's tokens (3..6 in TinySuite) instead of its 2 slots
        tail = [len(g.chunks[-1]) for g in TinySuite().groups(t)]
        assert by[(t, "ccm_concat_tail")]["kv_slots"] == 2 * (t - 1) + sum(tail) / len(tail)
        assert by[(t, "ccm_merge")]["kv_slots"] == by[(t, "gist")]["kv_slots"] == 2
        assert by[(t, "window")]["kv_slots"] == 2 * t == by[(t, "streamingllm")]["kv_slots"]
        assert by[(t, "gist")]["peak_kv_kib"] > by[(t, "gist")]["kv_kib"]
        for p in presses:
            assert by[(t, f"kvpress_{p}")]["kv_slots"] == 2 * t
    assert res["margins"] and all(m["ccm"] == "ccm_concat" for m in res["margins"])
    # concat meets no context, the training-free methods, the presses and the trained baselines, not CCM-merge
    assert set(res["rivals"]) == expected - {"full", "ccm_concat", "ccm_concat_tail", "ccm_merge"}
    assert {m["best_other"] for m in res["margins"]} <= set(res["rivals"])
    for r in res["rows"]:  # paired bootstrap intervals on every row, gap and margin
        lo, hi = r["acc_norm_ci"]
        assert 0.0 <= lo <= hi <= 1.0
    assert all(by[(t, "full")]["gap_recovered_ci"] in ([1.0, 1.0], None) for t in (1, 2, 4))
    for m in res["margins"]:
        assert m["margin_ci"][0] <= m["margin_ci"][1]
    # by peak KV, the one-shot presses and Gisting (which read the whole history) are no competitors
    assert {m["t"] for m in res["peak_margins"]} == {1, 2, 4} and all(m["margin_ci"] for m in res["peak_margins"])
    assert not any(m["best_other"].startswith(("kvpress_", "gist")) for m in res["peak_margins"])
    res.update(title="tiny", command="pytest", headline=headline(res, "acc_norm", "acc", min_t=2))
    assert len(res["headline"]["interval_95"]) == 2
    paths = write(tmp_path, "tiny", res, res["methods"], "acc_norm", True)
    assert all(p.stat().st_size > 0 for p in paths)
    md = paths[1].read_text()
    assert "| t |" in md and "bootstrap intervals" in md and "margin_ci" in md and "smaller peak KV" in md
    res["config"]["suite"] = "icl"  # re-rendering from the JSON alone gives the same table
    paths[0].write_text(__import__("json").dumps(res))
    assert rerender(paths[0])[1].read_text() == md


def test_raw_tail_override_scores_as_an_adapter_saved_with_the_tail(adapters, tmp_path, monkeypatch):
    """``--raw-tail NAME=K``: the concat adapter read with a tail of 1 scores exactly as the same weights saved with
    that tail (``ccm_concat_tail``), and counts the tail's tokens in its KV; a name no adapter has is refused."""
    from ccmem import CompressedModel
    from ccmem.evaluation.runner import run_named

    monkeypatch.setenv("CCMEM_CACHE", str(tmp_path / "cache"))
    loaded = []  # the raw tail of every model the run loads: the override must reach the model, not only the row
    real = CompressedModel.from_pretrained.__func__

    def spy(cls, *a, **kw):
        ccm = real(cls, *a, **kw)
        loaded.append(ccm.config.raw_tail)
        return ccm

    monkeypatch.setattr(CompressedModel, "from_pretrained", classmethod(spy))
    cfg = EvalConfig(adapters={"ccm_concat": adapters["ccm_concat"], "ccm_concat_t1": adapters["ccm_concat"],
                               "ccm_concat_tail": adapters["ccm_concat_tail"]},
                     raw_tails={"ccm_concat_t1": 1}, presses=(), training_free=(), check=1, batch_size=4, bootstrap=0)
    res = evaluate(TinySuite(), cfg, load_model=lambda: tiny_model(seed=0), progress=False)
    assert loaded == [0, 1, 1]
    by = {(r["t"], r["method"]): r for r in res["rows"]}
    for t in (1, 2, 4):
        for k in ("acc_norm", "kv_slots"):
            assert by[(t, "ccm_concat_t1")][k] == by[(t, "ccm_concat_tail")][k]
        assert by[(t, "ccm_concat_t1")]["kv_slots"] > by[(t, "ccm_concat")]["kv_slots"]
    assert {m["name"]: m.get("raw_tail") for m in res["methods"]}["ccm_concat_t1"] == 1
    assert "raw tail 1" in {m["name"]: m["label"] for m in res["methods"]}["ccm_concat_t1"]
    assert res["agreement"]["ccm_concat_t1"] < 1e-4
    from ccmem.errors import ConfigError
    from ccmem.evaluation.methods import trained

    for name, k, why in (("gist_online", 1, "gist"), ("gist", 1, "gist"), ("ccm_concat", -1, "raw_tail")):
        with pytest.raises(ConfigError, match=why):  # refused when the run is set up, before anything is scored
            trained(name, adapters[name], raw_tail=k)
    with pytest.raises(ValueError, match="ccm_concat_x"):
        run_named("chitchat", tmp_path, adapters={"ccm_concat": adapters["ccm_concat"]},
                  raw_tails={"ccm_concat_x": 1})


@pytest.mark.parametrize("variant,sink,tail", [("concat_recur", True, 0), ("concat_recur", True, 1),
                                               ("merge_recur", True, 0), ("concat_recur", False, 2),
                                               ("gist", True, 0)])
def test_kv_columns_count_what_the_session_holds(tmp_path, variant, sink, tail):
    """A row's KV slots are what the online session really keeps: its memory (the sink slot included) plus the raw
    tail's tokens; and with a sink adapter as CCM-concat, the training-free budget gets the same one slot more, with
    a raw tail each unit's own slots (the tail's tokens too), so the window holds exactly what CCM-concat holds."""
    from ccmem.evaluation.methods import control, trained

    ccm = tiny_ccm(variant=variant, seed=0, sink=sink, raw_tail=tail)
    ccm.save_pretrained(tmp_path / "a")
    name = {"merge_recur": "ccm_merge", "gist": "gist"}.get(variant, "ccm_concat")
    m = trained(name, str(tmp_path / "a"))
    for t in (1, 2, 4):
        for g in TinySuite().groups(t):
            mem = m.session(ccm, g.chunks, 0).memory
            held = mem.slots_per_row()[0] + mem.tail_tokens()[0]
            assert m.slots(g.chunks, 2, 0) == held, (t, held)
            if name != "gist":
                assert control(m).slots(g.chunks, 2, 0) == held
    if name == "ccm_concat":
        cfg = EvalConfig(adapters={"ccm_concat": str(tmp_path / "a")}, presses=(), training_free=("window",),
                         check=0, batch_size=4, bootstrap=0)
        res = evaluate(TinySuite(), cfg, load_model=lambda: tiny_model(seed=0), progress=False)
        by = {(r["t"], r["method"]): r for r in res["rows"]}
        for t in (1, 2, 4):
            if tail:
                want = [m.slots(g.chunks, 2, 0) for g in TinySuite().groups(t)]
                assert by[(t, "window")]["budget_slots"] == pytest.approx(sum(want) / len(want))
                assert by[(t, "window")]["kv_slots"] == pytest.approx(by[(t, "ccm_concat")]["kv_slots"])
            else:
                assert by[(t, "window")]["budget_slots"] == 2 * t + int(sink)


@pytest.mark.parametrize("mode", ["parallel", "online"])
def test_equal_kv_with_a_raw_tail_read_gives_every_press_the_tail(adapters, tmp_path, monkeypatch, mode):
    """`--raw-tail ccm_concat=K` on an adapter trained without a tail: the presses and the window get, unit by unit,
    the slots CCM-concat holds for that unit with the tail (not n_tok per step): what each is handed is checked
    dialog by dialog, and the rows' KV columns agree."""
    import ccmem.evaluation.runner as runner
    from ccmem.evaluation.methods import Window

    monkeypatch.setenv("CCMEM_CACHE", str(tmp_path / "cache"))
    handed: list[tuple[tuple, int]] = []  # (the unit's context, budget) each time the window builds it
    key = lambda chunks: tuple(map(tuple, chunks))  # noqa: E731
    for fn in ("session", "episode"):
        real = getattr(Window, fn)
        monkeypatch.setattr(Window, fn, lambda self, ccm_or_ep, *a, _real=real, _fn=fn: (
            handed.append((key(a[0] if _fn == "session" else ccm_or_ep.chunks), a[-1])),
            _real(self, ccm_or_ep, *a))[1])
    jobs: list = []
    real_run = runner.run_kvpress
    monkeypatch.setattr(runner, "run_kvpress", lambda py, d, ps, j, *a: (jobs.extend(j), real_run(py, d, ps, j, *a))[1])
    presses = ("snapkv",) if default_kvpress_python() else ()
    cfg = EvalConfig(adapters={"ccm_concat": adapters["ccm_concat"]}, raw_tails={"ccm_concat": 1}, mode=mode,
                     presses=presses, training_free=("window",), check=2, batch_size=4, bootstrap=0)
    res = evaluate(TinySuite(), cfg, load_model=lambda: tiny_model(seed=0), progress=False)
    by = {(r["t"], r["method"]): r for r in res["rows"]}
    own = {key(g.chunks): len(g.chunks[-1]) + 2 * (t - 1)  # the unit's context -> CCM-concat's slots (no sink)
           for t in TinySuite.ts for g in TinySuite().groups(t)}
    assert handed and all(b == own[c] for c, b in handed), handed
    assert len({b for _, b in handed}) > len(TinySuite.ts)  # units of one t got different budgets
    for _t, groups, budget in jobs:
        assert budget == [own[key(g.chunks)] for g in groups]
    assert len(jobs) == (len(TinySuite.ts) if presses else 0)
    for t in (2, 4):
        groups = TinySuite().groups(t)
        want = sum(len(g.chunks[-1]) + 2 * (t - 1) for g in groups) / len(groups)
        assert by[(t, "ccm_concat")]["kv_slots"] == pytest.approx(want) != 2 * t
        for other in ("window", *(f"kvpress_{p}" for p in presses)):
            assert by[(t, other)]["kv_slots"] == pytest.approx(want), other


def test_per_unit_budgets():
    from ccmem.evaluation.core import per_unit

    assert per_unit(5, 3) == [5, 5, 5] and per_unit([1, 2], 2) == [1, 2]
    with pytest.raises(ValueError, match="3 budgets for 2 units"):
        per_unit([1, 2, 3], 2)


def test_other_context_rotates_contexts_of_equal_length():
    from ccmem.evaluation.runner import other_context

    groups = [Group(f"g{i}", [[i]] * n, [Query([i], [[1]], 0)]) for i, n in enumerate([2, 3, 2, 2, 1])]
    rot = other_context(groups)
    assert [g.id for g in rot] == [g.id for g in groups] and [g.queries for g in rot] == [g.queries for g in groups]
    assert [g.chunks for g in rot] == [[[2]] * 2, [[1]] * 3, [[3]] * 2, [[0]] * 2, [[4]]]  # 0->2->3->0; alone: own


def test_control_scores_the_adapter_on_another_context(adapters, tmp_path, monkeypatch):
    """--control: each CCM adapter once more on the memory of another context; a row of its own, kind control,
    never a competitor in the margins, and exactly the adapter scored on the rotated groups."""
    import ccmem.evaluation.runner as runner
    from ccmem import CompressedModel
    from ccmem.evaluation.methods import trained
    from ccmem.evaluation.runner import other_context

    monkeypatch.setenv("CCMEM_CACHE", str(tmp_path / "cache"))
    cfg = EvalConfig(adapters={"ccm_concat": adapters["ccm_concat"]}, presses=(), check=0, batch_size=4,
                     bootstrap=0, control=True, mode="online")
    read = {}  # (method, t) -> the contexts it was scored on
    real = runner.score_online
    monkeypatch.setattr(runner, "score_online", lambda m, ccm, g, *a, **kw: (
        read.setdefault((m.name, len(g[0].chunks)), [x.chunks for x in g]), real(m, ccm, g, *a, **kw))[1])
    res = evaluate(TinySuite(), cfg, load_model=lambda: tiny_model(seed=0), progress=False)
    for t in (1, 2, 4):
        assert read[("ccm_concat_other", t)] == [x.chunks for x in other_context(TinySuite().groups(t))]
        assert read[("ccm_concat_other", t)] != read[("ccm_concat", t)] == [x.chunks for x in TinySuite().groups(t)]
    kinds = {m["name"]: m["kind"] for m in res["methods"]}
    assert kinds["ccm_concat_other"] == "control"
    assert all(m["best_other"] != "ccm_concat_other" for m in res["margins"])
    by = {(r["t"], r["method"]): r for r in res["rows"]}
    ccm = CompressedModel.from_pretrained(adapters["ccm_concat"], tiny_model(seed=0))
    g = TinySuite().groups(4)
    want = TinySuite().aggregate(g, score_online(trained("ccm_concat", adapters["ccm_concat"]), ccm,
                                                 other_context(g), 8), None)
    assert by[(4, "ccm_concat_other")]["acc_norm"] == pytest.approx(want["acc_norm"])
    assert by[(4, "ccm_concat_other")]["kv_slots"] == by[(4, "ccm_concat")]["kv_slots"]


def test_context_value_hand_checked(adapters):
    """Lower-is-better metric: the adapter at 50 ppl, its control at 60 -> worth 10; the interval is over the
    per-replicate differences of the same draws (paired), not of two independent intervals."""
    from ccmem.evaluation.intervals import add_intervals
    from ccmem.evaluation.methods import control, trained
    from ccmem.evaluation.runner import _context_value

    own = trained("ccm_concat", adapters["ccm_concat"])
    methods = [own, control(own)]
    rows = [{"t": 4, "method": "ccm_concat", "ppl": 50.0}, {"t": 4, "method": "ccm_concat_other", "ppl": 60.0}]
    cv = _context_value(rows, methods, "ppl", higher=False)
    assert cv == [{"t": 4, "ccm": "ccm_concat", "control": "ccm_concat_other", "ccm_value": 50.0,
                   "control_value": 60.0, "margin": 10.0}]
    reps = {("ccm_concat", 4): [50.0, 52.0, 48.0], ("ccm_concat_other", 4): [60.0, 55.0, 61.0]}
    add_intervals([], cv, reps, "ppl", higher=False, other="control")
    assert cv[0]["margin_ci"] == pytest.approx([3.0 + 0.025 * 2 * 7, 13.0 - 0.025 * 2 * 3])  # of [3, 10, 13]


def test_context_value_is_the_adapter_minus_its_control_with_a_paired_interval(adapters, tmp_path, monkeypatch):
    """--control also reports, per t, the adapter's metric minus its control's (what its memory of the right context
    is worth) with an interval from the same paired replicates; it is written to the markdown report. (The tiny
    adapter ties with its control here; sign and pairing arithmetic are checked by test_context_value_hand_checked.)"""
    from ccmem.evaluation.intervals import interval
    from ccmem.evaluation.report import write

    monkeypatch.setenv("CCMEM_CACHE", str(tmp_path / "cache"))
    cfg = EvalConfig(adapters={"ccm_concat": adapters["ccm_concat"]}, presses=(), check=0, batch_size=4,
                     bootstrap=30, control=True, mode="online")
    reps: dict = {}
    res = evaluate(TinySuite(), cfg, load_model=lambda: tiny_model(seed=0), progress=False, replicates_out=reps)
    by = {(r["t"], r["method"]): r["acc_norm"] for r in res["rows"]}
    cv = {c["t"]: c for c in res["context_value"]}
    assert sorted(cv) == [1, 2, 4]
    for t, c in cv.items():
        assert (c["ccm"], c["control"]) == ("ccm_concat", "ccm_concat_other")
        assert c["margin"] == pytest.approx(by[(t, "ccm_concat")] - by[(t, "ccm_concat_other")])
        diffs = [a - b for a, b in zip(reps[("ccm_concat", t)], reps[("ccm_concat_other", t)])]
        assert c["margin_ci"] == pytest.approx(interval(diffs))
    res.update(title="t", command="c", headline={"metric": "m", "value": 0, "target": 0, "higher_is_better": True,
                                                 "meaning": ""})
    md = write(tmp_path, "cv", res, res["methods"], "acc_norm", True)[1].read_text()
    assert "each adapter minus its control" in md and "ccm_concat_other" in md.split("minus its control")[1]


def test_adapter_margins_hand_checked(adapters):
    """Lower-is-better metric: the main adapter at 40 ppl, another CCM-concat at 45 -> +5 for the main one; its
    control, a merge adapter and a Gisting baseline (other KV: they meet it in the equal-KV margins) are left out;
    no main CCM-concat, no comparison."""
    from ccmem.evaluation.methods import control, trained
    from ccmem.evaluation.runner import _adapter_margins

    own, old = trained("ccm_concat", adapters["ccm_concat"]), trained("ccm_concat_old", adapters["ccm_concat"])
    methods = [own, old, control(own), trained("ccm_merge", adapters["ccm_merge"]), trained("gist", adapters["gist"])]
    rows = [{"t": 4, "method": "ccm_concat", "ppl": 40.0, "kv_kib": 6.0},
            {"t": 4, "method": "ccm_concat_old", "ppl": 45.0, "kv_kib": 6.0},
            {"t": 4, "method": "ccm_concat_other", "ppl": 60.0, "kv_kib": 6.0},
            {"t": 4, "method": "ccm_merge", "ppl": 30.0, "kv_kib": 2.0},
            {"t": 4, "method": "gist", "ppl": 30.0, "kv_kib": 2.0}]
    assert _adapter_margins(rows, methods, "ppl", higher=False) == [
        {"t": 4, "ccm": "ccm_concat", "other": "ccm_concat_old", "ccm_value": 40.0, "other_value": 45.0,
         "margin": 5.0, "ccm_kv_kib": 6.0, "other_kv_kib": 6.0}]
    assert _adapter_margins(rows[1:2], [old], "ppl", higher=False) == []


def test_equal_kv_margins_meet_the_rivals_not_ccm_itself(adapters):
    """CCM-concat (40 ppl, 6 KiB) against every method at equal or smaller KV: CCM-merge at 2 KiB is better (30) but
    is CCM itself, so the worst margin is against Gisting (35 -> -5), not merge (-10); no context counts, full context
    and the control do not; the run lists what it compared with."""
    from ccmem.evaluation.methods import REFERENCE, TRAINING_FREE, control, trained
    from ccmem.evaluation.runner import _margins, rivals

    own = trained("ccm_concat", adapters["ccm_concat"])
    methods = [REFERENCE["none"](), REFERENCE["full"](), TRAINING_FREE["window"](), own, control(own),
               trained("ccm_merge", adapters["ccm_merge"]), trained("gist", adapters["gist"])]
    rows = [{"t": 4, "method": m, "ppl": v, "kv_kib": kv} for m, v, kv in (
        ("none", 60.0, 0.0), ("full", 20.0, 50.0), ("window", 45.0, 6.0), ("ccm_concat", 40.0, 6.0),
        ("ccm_concat_other", 39.0, 6.0), ("ccm_merge", 30.0, 2.0), ("gist", 35.0, 2.0))]
    assert rivals(methods) == ["none", "window", "gist"]
    assert _margins(rows, methods, "ppl", higher=False) == [
        {"t": 4, "ccm": "ccm_concat", "best_other": "gist", "ccm_value": 40.0, "other_value": 35.0, "margin": -5.0}]


def test_two_adapters_in_one_run_get_a_paired_margin(adapters, tmp_path, monkeypatch):
    """Two adapters scored in one run: the main one minus the other per t, with the interval of the per-replicate
    differences of the same draws, written to the markdown report."""
    from ccmem.evaluation.intervals import interval
    from ccmem.evaluation.report import write

    monkeypatch.setenv("CCMEM_CACHE", str(tmp_path / "cache"))
    cfg = EvalConfig(adapters={"ccm_concat": adapters["ccm_concat"], "ccm_concat_tail": adapters["ccm_concat_tail"]},
                     presses=(), check=0, batch_size=4, bootstrap=30, mode="online")
    reps: dict = {}
    res = evaluate(TinySuite(), cfg, load_model=lambda: tiny_model(seed=0), progress=False, replicates_out=reps)
    by = {(r["t"], r["method"]): r["acc_norm"] for r in res["rows"]}
    am = {a["t"]: a for a in res["adapter_margins"]}
    assert sorted(am) == [1, 2, 4] and len(res["adapter_margins"]) == 3
    assert any(a["margin"] != 0 for a in am.values())  # the tail changes what the tiny adapter scores
    for t, a in am.items():
        assert (a["ccm"], a["other"]) == ("ccm_concat", "ccm_concat_tail")
        assert a["margin"] == pytest.approx(by[(t, "ccm_concat")] - by[(t, "ccm_concat_tail")])
        diffs = [x - y for x, y in zip(reps[("ccm_concat", t)], reps[("ccm_concat_tail", t)])]
        assert a["margin_ci"] == pytest.approx(interval(diffs))
    res.update(title="t", command="c", headline={"metric": "m", "value": 0, "target": 0, "higher_is_better": True,
                                                 "meaning": ""})
    md = write(tmp_path, "am", res, res["methods"], "acc_norm", True)[1].read_text()
    assert "other CCM-concat adapters of this run" in md
    assert "ccm_concat_tail" in md.split("other CCM-concat adapters of this run")[1]


def test_gisting_online_differs_from_gisting(adapters):
    """Same adapter, two layouts: the whole history in one group vs each chunk alone."""
    from ccmem import CompressedModel
    from ccmem.evaluation.methods import trained

    ccm = CompressedModel.from_pretrained(adapters["gist"], tiny_model(seed=0))
    g = TinySuite().groups(4)
    a = score_online(trained("gist", adapters["gist"]), ccm, g, 8)
    b = score_online(trained("gist_online", adapters["gist"]), ccm, g, 8)
    assert abs(a[0][0][0][0] - b[0][0][0][0]) > 1e-4
    one = [Group(x.id, x.chunks[:1], x.queries) for x in g]  # one chunk: both layouts are the same computation
    a = score_online(trained("gist", adapters["gist"]), ccm, one, 2)
    b = score_online(trained("gist_online", adapters["gist"]), ccm, one, 2)
    assert abs(a[0][0][0][0] - b[0][0][0][0]) < 1e-5


@pytest.mark.skipif(default_kvpress_python() is None, reason="needs the kvpress environment (make kvpress-env)")
def test_kvpress_full_budget_equals_full_context(tmp_path, monkeypatch):
    """Across the environment boundary: a press whose budget keeps every token scores exactly like full context,
    and a smaller budget leaves exactly that many tokens in the cache."""
    monkeypatch.setenv("CCMEM_CACHE", str(tmp_path))
    model = tiny_model(seed=0)
    groups = TinySuite().groups(4)
    d = export_reference(model, "tiny")
    lens = [sum(map(len, g.chunks)) for g in groups]
    full_jobs = [(4, groups, max(lens))]
    ps, held = run_kvpress(default_kvpress_python(), d, ["snapkv", "knorm"], full_jobs)
    ccm = tiny_ccm(seed=0)
    ref = score_online(FullContext("full", "", "reference"), ccm, groups, 0)
    for p in ("snapkv", "knorm"):
        assert held[p][4] == lens
        diff = max(abs(x[0] - y[0]) for ga, gb in zip(ps[p][4], ref) for qa, qb in zip(ga, gb)
                   for x, y in zip(qa, qb))
        assert diff < 1e-4, diff
    ps, held = run_kvpress(default_kvpress_python(), d, ["snapkv", "streamingllm", "knorm"], [(4, groups, 5)])
    for p in ("snapkv", "streamingllm", "knorm"):
        assert held[p][4] == [5, 5, 5]
        assert ps[p][4] != ref


SINK_PROBE = """
import json, sys
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
sys.path.insert(0, sys.argv[1])
from kvpress_worker import make_press

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 128, (1, 40))
full, cache = DynamicCache(), DynamicCache()
with torch.no_grad():
    model(input_ids=ids, past_key_values=full, use_cache=True)
    with make_press("snapkv", int(sys.argv[2]), 40)(model):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
kept = []
for layer in range(cfg.num_hidden_layers):
    k_full, k = full.layers[layer].keys[0], cache.layers[layer].keys[0]
    kept += [bool((k[h] - k_full[h, 0]).abs().amax(-1).min() < 1e-6) for h in range(k.shape[0])]
print(json.dumps({"sink_kept": kept, "length": cache.get_seq_length()}))
"""


@pytest.mark.skipif(default_kvpress_python() is None, reason="needs the kvpress environment (make kvpress-env)")
@pytest.mark.parametrize("budget", [2, 4])
def test_kvpress_snapkv_keeps_the_sink_at_tiny_budgets(tmp_path, budget):
    """SnapKV's pooling lends the first token's attention to its neighbours, so at 2-4 slots it evicted the attention
    sink (chit-chat ppl 645 at 2 slots); the worker's SnapKV keeps the first token in every layer and head."""
    import json
    import subprocess
    from pathlib import Path

    import ccmem.evaluation.runner as runner

    script = tmp_path / "probe.py"
    script.write_text(SINK_PROBE)
    worker_dir = str(Path(runner.__file__).parent)
    r = subprocess.run([default_kvpress_python(), str(script), worker_dir, str(budget)], capture_output=True,
                       text=True, check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["length"] == budget
    assert all(out["sink_kept"]), out


@pytest.mark.skipif(default_kvpress_python() is None, reason="needs the kvpress environment (make kvpress-env)")
def test_kvzip_sinks_leave_most_of_a_small_budget_to_its_scores():
    """KVzip always keeps its n_sink first tokens; with n_sink = min(4, budget) a 4-slot budget kept exactly the first
    4 tokens of the context (recall at d = 1: 0.2, below no context). At most a quarter of the budget is sinks now."""
    import json
    import subprocess
    from pathlib import Path

    import ccmem.evaluation.runner as runner

    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from kvpress_worker import make_press; "
            "print(json.dumps({b: make_press('kvzip', b, 100).n_sink for b in (1, 2, 4, 8, 16, 64)}))")
    r = subprocess.run([default_kvpress_python(), "-c", code, str(Path(runner.__file__).parent)],
                       capture_output=True, text=True, check=True)
    sinks = {int(b): n for b, n in json.loads(r.stdout.strip().splitlines()[-1]).items()}
    assert sinks == {1: 1, 2: 1, 4: 1, 8: 2, 16: 4, 64: 4}


def word_tokenizer():
    """A word-level tokenizer whose ids fit the tiny models' 128-token vocabulary (KVzip tokenizes a prompt)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "Repeat the previous context exactly . part of starting with".split()
    tk = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


@pytest.mark.skipif(default_kvpress_python() is None, reason="needs the kvpress environment (make kvpress-env)")
def test_kvzip_press_keeps_budget_per_head_and_full_budget_is_full_context(tmp_path, monkeypatch):
    """KVzip evicts head-wise (masking): on average exactly `budget` pairs per layer and head stay readable, the
    scores then differ from full context, and a budget that keeps every token is full context."""
    monkeypatch.setenv("CCMEM_CACHE", str(tmp_path))
    groups = TinySuite().groups(4)
    d = export_reference(tiny_model(seed=0), "tiny-kvzip", word_tokenizer())
    assert (d / "tokenizer_config.json").exists()
    lens = [sum(map(len, g.chunks)) for g in groups]
    ref = score_online(FullContext("full", "", "reference"), tiny_ccm(seed=0), groups, 0)
    ps, held = run_kvpress(default_kvpress_python(), d, ["kvzip"], [(4, groups, max(lens)), (2, groups, 6)])
    assert held["kvzip"][4] == lens
    diff = max(abs(x[0] - y[0]) for ga, gb in zip(ps["kvzip"][4], ref) for qa, qb in zip(ga, gb)
               for x, y in zip(qa, qb))
    assert diff < 1e-4, diff
    assert held["kvzip"][2] == [6, 6, 6]
    assert ps["kvzip"][2] != ref


def test_raw_context_session_equals_plain_forward():
    """add_raw (the full-context and window baselines in session form) is exactly the causal model on the text."""
    import torch

    ccm = tiny_ccm(seed=0)
    s = ccm.session()
    s.add_raw([5, 6, 7])
    s.add_raw([8, 9])
    online, _ = s.logits([10, 11])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    plain = ccm.parallel_forward(ids, torch.ones_like(ids)).logits[:, -2:]
    torch.testing.assert_close(online, plain, atol=1e-5, rtol=0)
    assert s.memory.num_slots == 5 and int(s.memory.offset) == 5
    # forks score like the original row and leave it untouched
    f = s.fork(3)
    sc = f.score([[10], [10], [12]], [[11], [11], [13]])
    assert float(sc.logprob[0]) == pytest.approx(float(sc.logprob[1]))
    assert float(sc.logprob[0]) == pytest.approx(float(s.score([10], [11]).logprob[0]), abs=1e-5)
    f.add_context([[3, 4], [3, 4], [3, 4]])
    assert s.memory.num_slots == 5 and f.memory.num_slots == 7


def test_raw_context_refused_by_a_merge_memory():
    from ccmem import ConfigError

    s = tiny_ccm(variant="merge_recur", seed=0).session()
    with pytest.raises(ConfigError, match="concat memory"):
        s.add_raw([5, 6, 7])


def test_frontier_points_at_every_budget(adapters, tmp_path, monkeypatch):
    import ccmem.evaluation.runner as runner
    from ccmem.evaluation.frontier import frontier
    from ccmem.evaluation.frontier import write as write_frontier

    monkeypatch.setenv("CCMEM_CACHE", str(tmp_path / "cache"))
    cfg = EvalConfig(adapters={"ccm_concat": adapters["ccm_concat"], "ccm_merge": adapters["ccm_merge"]},
                     presses=(), check=0, batch_size=4, bootstrap=50)
    scored = []  # (method, contexts) per scoring call: no and full context, which no budget changes, are scored once
    for fn in ("score_online", "score_parallel"):
        real = getattr(runner, fn)
        monkeypatch.setattr(runner, fn, lambda m, ccm, g, *a, _real=real, **kw: (
            scored.append((m.name, len(g[0].chunks))), _real(m, ccm, g, *a, **kw))[1])
    res = frontier(TinySuite(), cfg, per_step=(1, 3), load_model=lambda: tiny_model(seed=0), progress=False)
    assert sorted(c for m, c in scored if m == "full") == [1, 2, 4]
    assert sorted(c for m, c in scored if m == "window") == [1, 1, 2, 2, 4, 4]
    by = {(p["t"], p["method"], p["per_step"]): p for p in res["points"]}
    for t in (1, 2, 4):
        for k in (1, 3):  # the training-free methods at k slots per step
            assert by[(t, "window", k)]["kv_slots"] == k * t == by[(t, "streamingllm", k)]["kv_slots"]
        assert by[(t, "ccm_concat", None)]["kv_slots"] == 2 * t and by[(t, "ccm_merge", None)]["kv_slots"] == 2
        assert by[(t, "window", 3)]["acc_norm_ci"][0] <= by[(t, "window", 3)]["acc_norm_ci"][1]
    assert {(r["t"], r["method"]) for r in res["references"]} == {(t, m) for t in (1, 2, 4) for m in ("none", "full")}
    assert [m["t"] for m in res["margins"]] == [1, 2, 4] and all(m["margin_ci"] for m in res["margins"])
    assert res["headline"]["value"] == pytest.approx(min(m["margin"] for m in res["margins"]), abs=1e-4)
    paths = write_frontier(tmp_path, "frontier_tiny", res)
    text = paths[1].read_text()
    assert all(p.stat().st_size > 0 for p in paths) and "| t | method | per_step |" in text and "Headline:" in text


def test_frontier_keeps_the_control_point_out_of_the_margins(adapters, tmp_path, monkeypatch):
    """--frontier --control: the adapter's control (its score on another context's memory) is a point of its own at
    the adapter's KV, plotted, never the competitor a margin is taken against."""
    from ccmem.evaluation.frontier import frontier
    from ccmem.evaluation.frontier import write as write_frontier

    monkeypatch.setenv("CCMEM_CACHE", str(tmp_path / "cache"))
    cfg = EvalConfig(adapters={"ccm_concat": adapters["ccm_concat"]}, presses=(), training_free=("window",),
                     check=0, batch_size=4, bootstrap=20, control=True)
    res = frontier(TinySuite(), cfg, per_step=(1,), load_model=lambda: tiny_model(seed=0), progress=False)
    by = {(p["t"], p["method"]): p for p in res["points"]}
    for t in (1, 2, 4):
        assert by[(t, "ccm_concat_other")]["kind"] == "control" and by[(t, "ccm_concat_other")]["per_step"] is None
        assert by[(t, "ccm_concat_other")]["kv_kib"] == by[(t, "ccm_concat")]["kv_kib"]
    assert [m["best_other"] for m in res["margins"]] == ["window"] * 3
    assert {r["method"] for r in res["kv_to_match"]} == {"window"}
    paths = write_frontier(tmp_path, "frontier_tiny", res)
    assert "ccm_concat_other" in paths[1].read_text() and paths[2].stat().st_size > 0


def test_margins_by_peak_kv_hand_case(adapters):
    """By held KV a one-shot press at CCM's budget is the best other; by peak KV (it prefilled the whole history) it
    is no competitor and the window is."""
    from ccmem.evaluation.methods import REFERENCE, TRAINING_FREE, press, trained
    from ccmem.evaluation.runner import _margins

    methods = [REFERENCE["full"](), trained("ccm_concat", adapters["ccm_concat"]), TRAINING_FREE["window"](),
               press("kvzip")]
    rows = [{"t": 4, "method": n, "acc_norm": a, "kv_kib": kv, "peak_kv_kib": peak} for n, a, kv, peak in (
        ("full", 0.9, 100, 100), ("ccm_concat", 0.7, 8, 8), ("window", 0.5, 8, 8), ("kvpress_kvzip", 0.85, 8, 100))]
    (held,) = _margins(rows, methods, "acc_norm", True)
    (peak,) = _margins(rows, methods, "acc_norm", True, kv="peak_kv_kib")
    assert (held["best_other"], held["margin"]) == ("kvpress_kvzip", pytest.approx(-0.15))
    assert (peak["best_other"], peak["margin"]) == ("window", pytest.approx(0.2))


def test_frontier_headline_and_kv_to_match_hand_case():
    """The frontier's margin takes the best point of any other method at any budget holding at most the trained
    method's KV (controls, ccm_concat siblings and CCM-merge are no competitors), with a paired interval from the
    replicates; the KV a method needs to match is read off its frontier, log-linear between the bracketing budgets."""
    import math

    from ccmem.evaluation.frontier import headline, kv_to_match, margins

    def pt(method, kind, k, kv, acc):
        return {"t": 8, "method": method, "kind": kind, "per_step": k, "kv_kib": kv, "acc_norm": acc}

    points = [pt("ccm_concat", "trained", None, 10, 0.7), pt("ccm_concat_other", "control", None, 10, 0.3),
              pt("ccm_concat_cpu", "trained", None, 10, 0.95), pt("ccm_merge", "trained", None, 5, 0.99),
              *(pt("window", "training_free", k, 5 * k, a) for k, a in ((1, 0.4), (2, 0.6), (4, 0.8), (8, 0.9))),
              *(pt("kvzip", "press", k, 5 * k, a) for k, a in ((1, 0.75), (2, 0.9), (4, 0.95), (8, 0.96))),
              *(pt("streamingllm", "training_free", k, 5 * k, a) for k, a in ((1, 0.1), (2, 0.2), (4, 0.3), (8, 0.5)))]
    res = {"points": points, "ts": [8], "metric": "acc_norm", "higher_is_better": True}
    reps = {("ccm_concat", None, 8): [0.7, 0.6, 0.8], ("kvzip", 2, 8): [0.9, 0.95, 0.85]}
    (m,) = margins(res, reps)
    assert (m["best_other"], m["other_per_step"]) == ("kvzip", 2) and m["margin"] == pytest.approx(-0.2)
    assert m["margin_ci"] == pytest.approx([-0.35 + 0.15 * 0.05, -0.2 + 0.15 * 0.95])
    need = {r["method"]: r for r in kv_to_match(res)}
    assert set(need) == {"window", "kvzip", "streamingllm"}
    assert need["window"]["ratio"] == pytest.approx(math.sqrt(200) / 10) and not need["window"]["at_smallest_budget"]
    assert need["kvzip"]["ratio"] == pytest.approx(0.5) and need["kvzip"]["at_smallest_budget"]
    assert need["streamingllm"]["ratio"] is None and need["streamingllm"]["max_ratio"] == pytest.approx(4.0)
    res["margins"], res["kv_to_match"] = [m], list(need.values())
    h = headline(res)
    assert h["value"] == pytest.approx(-0.2) and h["interval_95"][1] < 0 and "kvzip 0.5x" in h["meaning"]
    assert "streamingllm > 4x" in h["meaning"]


@pytest.mark.parametrize("flag,want", [(None, "adapters/chitchat-stage1"), ("none", None), ("x/stage1", "x/stage1")])
def test_eval_base_adapter_option(monkeypatch, flag, want):
    """`ccmem eval --base-adapter`: the suite's stage-1 reference by default, the plain base model with 'none' (for
    adapters trained without stage 1), or a given folder."""
    from ccmem.cli import main
    from ccmem.evaluation import runner

    seen = {}

    def capture(suite, cfg, **kw):
        seen["cfg"] = cfg
        raise KeyboardInterrupt  # stop before any model is scored

    monkeypatch.setattr(runner, "evaluate", capture)
    monkeypatch.setattr(runner, "build_suite", lambda *a: None)
    with pytest.raises(KeyboardInterrupt):
        main(["eval", "--suite", "chitchat", "--presses", "", *(["--base-adapter", flag] if flag else [])])
    assert seen["cfg"].base_adapter == want


@pytest.mark.parametrize("flags,want", [([], True), (["--no-generate"], False)])
def test_eval_no_generate_option(monkeypatch, flags, want):
    """`ccmem eval --no-generate`: recall by multiple choice only (its greedy replies take most of its time)."""
    from ccmem.cli import main
    from ccmem.evaluation import runner

    seen = {}

    def capture(suite, cfg, **kw):
        seen["cfg"] = cfg
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "evaluate", capture)
    monkeypatch.setattr(runner, "build_suite", lambda *a: None)
    with pytest.raises(KeyboardInterrupt):
        main(["eval", "--suite", "recall", "--presses", "", *flags])
    assert seen["cfg"].generate is want


def _adapter_with_recipe(folder, formats):
    import yaml

    folder.mkdir(parents=True)
    (folder / "adapter.safetensors").write_bytes(b"")
    parts = [{"source": "chitchat", **({"format": f} if f else {})} for f in formats] + [{"source": "icl"}]
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"data": {"source": "mix", "parts": parts}}))
    return folder


@pytest.mark.parametrize("formats,flag,want", [(["template"], None, "template"), ([None], None, "plain"),
                                               (["template"], "plain", "plain"), ([], None, "plain")])
def test_eval_format_follows_the_adapter_recipe(tmp_path, monkeypatch, formats, flag, want):
    """`ccmem eval --format auto` scores the dialog suites in the format the adapter was trained on (its recipe.yaml);
    an explicit --format wins; adapters of two formats in one run are refused."""
    from ccmem.cli import main
    from ccmem.evaluation import runner

    seen = {}

    def capture(*args):
        seen["format"] = args[4]
        raise KeyboardInterrupt  # stop before any model is loaded

    monkeypatch.setattr(runner, "build_suite", capture)
    ad = _adapter_with_recipe(tmp_path / "a", formats) if formats else tmp_path
    if not formats:
        (tmp_path / "adapter.safetensors").write_bytes(b"")  # an adapter folder without a recipe
    with pytest.raises(KeyboardInterrupt):
        main(["eval", "--suite", "recall", "--presses", "", "--adapter", f"ccm_concat={ad}",
              *(["--format", flag] if flag else [])])
    assert seen["format"] == want
    other = _adapter_with_recipe(tmp_path / "b", [None])
    if formats == ["template"] and flag is None:
        with pytest.raises(ValueError, match="different dialog formats"):
            main(["eval", "--suite", "recall", "--presses", "", "--adapter", f"ccm_concat={ad}",
                  "--adapter", f"ccm_merge={other}"])


def test_eval_format_of_a_training_checkpoint_comes_from_its_run(tmp_path):
    """A checkpoint (``<run>/checkpoints/step_N``) holds no recipe of its own: its run folder's recipe.yaml (written
    by ``ccmem train``) gives the format; with neither, the notes say which format was assumed."""
    from ccmem.evaluation.runner import dialog_format_of

    _adapter_with_recipe(tmp_path / "run", ["template"])
    ckpt = tmp_path / "run" / "checkpoints" / "step_000005"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter.safetensors").write_bytes(b"")
    assert dialog_format_of({"ccm_concat": str(ckpt)}, "auto", "recall") == ("template", [])
    (tmp_path / "run" / "recipe.yaml").unlink()
    fmt, notes = dialog_format_of({"ccm_concat": str(ckpt)}, "auto", "chitchat")
    assert fmt == "plain" and len(notes) == 1 and "no recipe.yaml" in notes[0] and "--format" in notes[0]
    assert dialog_format_of({"ccm_concat": str(ckpt)}, "template", "chitchat") == ("template", [])
    assert dialog_format_of({"ccm_concat": str(ckpt)}, "auto", "icl") == ("plain", [])


def test_chitchat_suite_in_the_chat_template():
    """The chit-chat suite in template format reads the same dialogs as plain, each turn a chat message."""
    from ccmem.data.dialog import TemplateFormat
    from ccmem.evaluation.suites import ChitchatSuite
    from ccmem.models import load_tokenizer

    tok = load_tokenizer()
    plain, tmpl = ChitchatSuite(tok, dialogs=3, ts=(2,)), ChitchatSuite(tok, dialogs=3, ts=(2,), format="template")
    assert [d.id for d in plain.dialogs] == [d.id for d in tmpl.dialogs]
    fmt = TemplateFormat(tok)
    for d, g in zip(tmpl.dialogs, tmpl.groups(2)):
        ep = fmt.episode(d, 4)
        assert g.chunks == ep.chunks and g.queries[0].input == ep.input
        assert g.queries[0].targets == [ep.output[:-1]]  # EOS (the end-of-turn) excluded, as in plain
    assert tmpl.describe()["format"] == "template" and plain.describe()["format"] == "plain"


def test_eval_general_script_runs_what_it_says(tmp_path, monkeypatch):
    """scripts/eval_general.sh: each suite's command parses as `ccmem eval` and asks for the adapter beside the
    reference, both with the chat's raw tail on dialog suites (none on ICL), baselines on the plain base model and a
    control; REF=none scores the adapter alone; an unknown suite or a folder without an adapter stops before any run."""
    import os
    import shlex
    import subprocess
    from pathlib import Path

    from ccmem import cli

    root = Path(__file__).resolve().parent.parent
    adapter = tmp_path / "step_000123"
    tiny_ccm("llama").save_pretrained(adapter)

    def commands(*args, **env):
        out = subprocess.run(["bash", "scripts/eval_general.sh", *args], cwd=root, capture_output=True, text=True,
                             env={**os.environ, "DRY": "1", **env})
        return out.returncode, [shlex.split(line)[1:] for line in out.stdout.splitlines()], out.stderr

    seen, report = [], tmp_path / "report.md"
    report.write_text("(report)")

    def run_named(suite, out, name, adapters, limit, ts, **kw):  # only what the commands ask for is under test
        seen.append((suite, name, adapters, limit, ts, kw))
        return None, [report] * 3

    monkeypatch.setattr("ccmem.evaluation.runner.run_named", run_named)
    rc, cmds, _ = commands(str(adapter))
    assert rc == 0 and len(cmds) == 4
    for argv in cmds:
        assert cli.main(argv) == 0
    by = {name: (suite, adapters, limit, ts, kw) for suite, name, adapters, limit, ts, kw in seen}
    both = {"ccm_concat": str(adapter), "ccm_concat_ref": "adapters/general-chat"}
    office = by["eval_chitchat_office_general_step_000123"]
    assert office[0] == "chitchat" and office[1] == both and office[4]["dialogs"] == "office"
    assert office[4]["raw_tails"] == {"ccm_concat": 1, "ccm_concat_ref": 1} and office[4]["base_adapter"] is None
    assert by["eval_chitchat_general_step_000123"][4]["dialogs"] == "chitchat"
    icl = by["eval_icl_general_step_000123"]
    assert icl[0] == "icl" and icl[2] == 100 and icl[3] == [4, 8, 16] and icl[4]["raw_tails"] == {}
    recall = by["eval_recall_3facts_general_step_000123"]
    assert recall[4]["facts"] == 3 and recall[4]["presses"] == ("kvzip",) and recall[4]["generate"] is False
    assert all(kw["control"] for *_, kw in by.values() if _[0] != "recall")
    assert all(kw["score_cache"].endswith("eval-scores") for *_, kw in by.values())
    rc, cmds, _ = commands(str(adapter), "icl", "mine", REF="none")
    assert rc == 0 and len(cmds) == 1 and "ccm_concat_ref=adapters/general-chat" not in cmds[0]
    assert cmds[0][cmds[0].index("--name") + 1] == "eval_icl_general_mine"
    rc, cmds, err = commands(str(adapter), "icl bogus")
    assert rc == 2 and cmds == [] and "unknown suite bogus" in err
    rc, cmds, err = commands(str(tmp_path / "nothing"))
    assert rc == 2 and cmds == [] and "holds no adapter" in err


def test_score_cache_rescores_only_the_adapters_and_misses_on_any_change(adapters, tmp_path, monkeypatch):
    """With a score cache a second run scores only the trained method and its control (no calibration, no kvpress
    worker) and gives the same rows, margins, intervals and parallel-vs-online checks; a press new to the run goes to
    the worker alone; other weights, code, groups or budgets miss; an unreadable entry is scored anew and named in the
    notes; a folder that cannot be written leaves the run whole."""
    import json
    import sys

    import ccmem.evaluation.runner as runner
    import ccmem.evaluation.score_cache as score_cache

    monkeypatch.setenv("CCMEM_CACHE", str(tmp_path / "cache"))
    scored, worker = [], []
    real_parallel, real_online = runner.score_parallel, runner.score_online
    monkeypatch.setattr(runner, "score_parallel", lambda m, *a: (scored.append(m.name), real_parallel(m, *a))[1])
    monkeypatch.setattr(runner, "score_online", lambda m, *a, **kw: (
        scored.append("calibration") if kw.get("calibration") else None, real_online(m, *a, **kw))[1])

    def fake_kvpress(py, model_dir, presses, jobs, batch_size=32):  # scores as full context, holds each budget
        worker.append(list(presses))
        return ({p: {t: real_online(FullContext("full", "", "reference"), tiny_ccm(seed=0), g, 0)
                     for t, g, _ in jobs} for p in presses},
                {p: {t: runner.per_unit(b, len(g)) for t, g, b in jobs} for p in presses})

    monkeypatch.setattr(runner, "run_kvpress", fake_kvpress)
    monkeypatch.setattr(runner, "_kvpress_versions", lambda py: "0.5.5 5.2.0 2.13.0")
    baselines = {"none", "full", "window", "streamingllm", "calibration"}
    adapters_only = {"ccm_concat", "ccm_concat_other"}

    def run(seed=0, suite=None, presses=("snapkv",), folder="scores", adapter="ccm_concat", check=1):
        cfg = EvalConfig(adapters={"ccm_concat": adapters[adapter]}, presses=presses, mode="parallel", check=check,
                         batch_size=4, bootstrap=50, control=True, kvpress_python=sys.executable,
                         score_cache=str(tmp_path / folder))
        scored.clear(), worker.clear()
        return evaluate(suite or TinySuite(), cfg, load_model=lambda: tiny_model(seed=seed), progress=False)

    first = run()
    assert set(scored) == baselines | adapters_only and worker == [["snapkv"]]
    again = run()
    assert set(scored) == adapters_only and worker == []
    for k in ("rows", "margins", "peak_margins", "context_value", "agreement"):
        assert again[k] == first[k], k
    assert any("score cache" in n and "kvpress_snapkv t=4" in n and "calibration" in n for n in again["notes"])
    both = run(presses=("snapkv", "knorm"))  # only the new press goes to the worker
    assert set(scored) == adapters_only and worker == [["knorm"]]
    assert [r for r in both["rows"] if r["method"] != "kvpress_knorm"] == first["rows"]
    entries = sorted((tmp_path / "scores").rglob("*.json"))
    entries[0].write_text("{not json")
    entries[1].write_text(json.dumps({"scores": [[[[0.0, 1]]]]}))  # parses, but fits no groups of the run
    res = run(presses=("snapkv", "knorm"))
    broken = [n for n in res["notes"] if "unreadable score-cache entries" in n]
    labels = broken[0].split("anew: ")[1].split(", ") if len(broken) == 1 else []
    assert len(labels) == 2  # only the broken entries' methods are scored anew (no context at t > 1 is a copy of t = 1)
    methods = {label.split(" t=")[0] for label in labels}
    assert set(scored) - adapters_only <= {m for m in methods if not m.startswith("kvpress_")}
    assert {p for w in worker for p in w} == {m.removeprefix("kvpress_") for m in methods if m.startswith("kvpress_")}
    assert res["rows"] == both["rows"] and json.loads(entries[0].read_text())["scores"]
    assert len(json.loads(entries[1].read_text())["scores"]) == 3  # rewritten: one score list per group
    run(seed=1)  # other reference weights: everything scored anew
    assert set(scored) == baselines | adapters_only and worker == [["snapkv"]]
    run(check=0)  # budgets and weights as before, but the agreement check is part of what an entry holds
    assert baselines - {"calibration"} <= set(scored)
    monkeypatch.setattr(score_cache, "code_digest", lambda: "edited")  # the scoring code changed
    run()
    assert set(scored) == baselines | adapters_only and worker == [["snapkv"]]
    run(adapter="ccm_concat_tail")  # a raw tail: other budgets for the window and the press
    assert {"window", "streamingllm"} <= set(scored) and worker == [["snapkv"]] and "none" not in scored

    class Shorter(TinySuite):
        ts = (1, 2)

        def groups(self, t):
            return TinySuite().groups(t)

    run(suite=Shorter())  # t = 1, 2 are the same groups and budgets: served; nothing new to score
    assert set(scored) == adapters_only and worker == []

    class Redrawn(TinySuite):  # its groups draw other tokens
        ts = (1, 2)

    run(suite=Redrawn())
    assert set(scored) == baselines | adapters_only and worker == [["snapkv"]]
    (tmp_path / "a_file").write_text("not a folder")  # a cache folder that cannot be made, even by root
    res = run(folder="a_file/scores")
    assert any("could not be written" in n for n in res["notes"]) and res["rows"] == first["rows"]
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_score_cache_and_exported_references_are_bounded(tmp_path, monkeypatch):
    """The score cache drops its least recently used entries (written or served) once over its size, and names how
    many in its note; the kvpress reference models kept on disk are the most recently used few."""
    import os

    import ccmem.evaluation.runner as runner
    from ccmem.evaluation.score_cache import ScoreCache

    cache = ScoreCache(tmp_path / "scores", {"model": "tiny"})
    groups = TinySuite().groups(1)
    scores = [[[(-1.0, len(t)) for t in q.targets] for q in g.queries] for g in groups]
    keys = [cache.key(f"m{i}", groups, i) for i in range(3)]
    for i, k in enumerate(keys):
        cache.put(k, f"m{i}", scores)
        os.utime(cache._path(k), (1000 + i, 1000 + i))  # written in order m0, m1, m2
    assert cache.get(keys[0], "m0", groups) is not None  # served: m0 is now the most recently used
    size = cache._path(keys[0]).stat().st_size
    assert cache.prune(max_bytes=10 * size) == 0
    assert cache.prune(max_bytes=2 * size) == 1
    assert [cache._path(k).exists() for k in keys] == [True, False, True]
    assert "1 least recently used score-cache entries removed" in cache.note()

    monkeypatch.setenv("CCMEM_CACHE", str(tmp_path / "cache"))
    model = tiny_model(seed=0)
    made = []
    for i in range(runner.KEEP_REFERENCES):
        made.append(runner.export_reference(model, f"ref{i}"))
        os.utime(made[-1], (2000 + i, 2000 + i))
    assert runner.export_reference(model, "ref0") == made[0]  # used again (not rewritten): now the newest
    made.append(runner.export_reference(model, "new"))  # the least recently used one (ref1) makes room
    kept = {d.name for d in made[0].parent.iterdir()}
    assert kept == {d.name for d in made} - {made[1].name} and len(kept) == runner.KEEP_REFERENCES
    assert (made[-1] / "config.json").exists()
    (made[0].parent / "crashed.tmp").mkdir()  # a half-written export of a crashed run, a day old
    os.utime(made[0].parent / "crashed.tmp", (2000, 2000))
    made += [runner.export_reference(model, "newer"), runner.export_reference(model, "newest")]
    kept = {d.name for d in made[0].parent.iterdir()}  # ref2 (old) and the stale .tmp go; the ones used in the
    assert kept == {made[i].name for i in (0, 3, 4, 5)}  # last hours stay, even past KEEP_REFERENCES (in use)
    cache.folder = tmp_path / "nowhere"
    assert cache.prune(max_bytes=0) == 0  # a missing folder: nothing to do, no error


def test_weights_digest_sees_every_tensor_and_dtype_and_0_dim_buffers():
    """Gemma keeps a 0-dim scale buffer; a bf16 copy of the same weights is another model; one changed value or
    config field is another model."""
    import torch

    from ccmem.evaluation.score_cache import config_digest, weights_digest

    m = tiny_model(seed=0)
    m.register_buffer("scale", torch.tensor(2.0))
    d = weights_digest(m)
    twin = tiny_model(seed=0)
    twin.register_buffer("scale", torch.tensor(2.0))
    assert weights_digest(twin) == d
    m.scale.fill_(3.0)
    assert weights_digest(m) != d
    m.scale.fill_(2.0)
    with torch.no_grad():
        next(m.parameters())[0, 0] += 1e-3
    assert weights_digest(m) != d
    assert weights_digest(tiny_model(seed=0).to(torch.bfloat16)) != weights_digest(tiny_model(seed=0))
    other = tiny_model(seed=0, rms_norm_eps=1e-3)
    assert config_digest(other) != config_digest(tiny_model(seed=0)) and weights_digest(other) == weights_digest(
        tiny_model(seed=0))


def test_eval_without_a_kvpress_environment_stops_before_scoring(monkeypatch, capsys):
    """Presses asked for (the default) but no kvpress environment: the run stops before it scores anything, naming
    `make kvpress-env` and `--presses ''`, instead of writing a headline that silently leaves the presses out; the
    ``ccmem`` command prints it as one line (exit status 2), and `--presses ''` goes on."""
    from ccmem.cli import console, main
    from ccmem.errors import ConfigError
    from ccmem.evaluation import runner

    monkeypatch.delenv("CCMEM_KVPRESS_PYTHON", raising=False)
    monkeypatch.delenv("CCMEM_DEBUG", raising=False)
    found = runner.default_kvpress_python
    monkeypatch.setattr(runner, "default_kvpress_python", lambda: None)
    monkeypatch.setattr(runner, "build_suite", lambda *a: pytest.fail("suite built before the refusal"))
    with pytest.raises(ConfigError, match="make kvpress-env"):
        main(["eval", "--suite", "chitchat"])
    assert console(["eval", "--suite", "chitchat", "--presses", "snapkv"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ccmem: error: the comparison includes the kvpress presses snapkv") and "Traceback" not in err

    monkeypatch.setattr(runner, "default_kvpress_python", found)
    monkeypatch.setenv("CCMEM_KVPRESS_PYTHON", "/nonexistent/kvpress/bin/python")  # set, but to nothing
    with pytest.raises(ConfigError, match=r"/nonexistent/kvpress/bin/python.*CCMEM_KVPRESS_PYTHON.*not an executable"):
        main(["eval", "--suite", "chitchat"])
    monkeypatch.delenv("CCMEM_KVPRESS_PYTHON")
    monkeypatch.setattr(runner, "default_kvpress_python", lambda: None)

    def stop(*a):
        raise KeyboardInterrupt  # past the check: the suite is being built

    monkeypatch.setattr(runner, "build_suite", stop)
    with pytest.raises(KeyboardInterrupt):
        main(["eval", "--suite", "chitchat", "--presses", ""])
