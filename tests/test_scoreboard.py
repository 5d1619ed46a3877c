"""benchmarks/scoreboard.py: rows read from result files in the format `ccmem eval` writes, verdicts by interval,
checkpoint checks (no competitor) left out, a broken file named."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "scoreboard", Path(__file__).resolve().parents[1] / "benchmarks" / "scoreboard.py")
scoreboard = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(scoreboard)


def _write(folder: Path, name: str, value: float, ci, worst: tuple[int, str], frontier: bool = False, **cfg) -> None:
    config = {"suite": "chitchat", "adapters": {"ccm_concat": "adapters/general-chat"}, "training_free": ["window"],
              "presses": [], "peers": {}, "ts": [4, 8], **cfg}
    margins = [{"t": worst[0], "ccm": "ccm_concat", "best_other": worst[1], "margin": value},
               {"t": 99, "ccm": "ccm_concat", "best_other": "decoy", "margin": value + 5.0}]  # not the worst t
    report = {"name": name, "headline": {"metric": "ccm_margin_worst_t", "value": value, "interval_95": ci,
                                         "unit": "ppl"}, "margins": margins,
              "config": config, "environment": {"git_rev": "abc1234"},
              "context_value": [{"t": 8, "ccm": "ccm_concat", "margin": 1.5, "margin_ci": [0.5, 2.5]}]}
    if frontier:  # a frontier report keeps its per-step budgets
        report["per_step"] = [1, 2, 4, 8]
    (folder / f"{name}.json").write_text(json.dumps(report))


def test_rows_verdicts_and_what_is_left_out(tmp_path):
    _write(tmp_path, "eval_a", 2.0, [0.5, 3.0], (8, "kvpress_snapkv"),
           presses=["snapkv"])
    _write(tmp_path, "frontier_b", -1.0, [-4.0, 2.0], (4, "window"), frontier=True,
           dialogs_from="office", raw_tails={"ccm_concat": 1})
    points = [{"t": 4, "method": m, "ppl": v} for m, v in (("ccm_concat", 40.0), ("ccm_concat_other", 43.5))]
    _write(tmp_path, "run_d", 3.0, [1.0, 5.0], (4, "kvpress_kvzip"), dialogs_from="shakespeare:test")
    d = json.loads((tmp_path / "run_d.json").read_text())
    d.pop("context_value")
    (tmp_path / "run_d.json").write_text(json.dumps({**d, "points": points, "per_step": [1, 2], "metric": "ppl",
                                                     "higher_is_better": False}))
    _write(tmp_path, "eval_c", -0.3, [-0.5, -0.1], (8, "none"), training_free=[])
    _write(tmp_path, "eval_e", 3.5, [1.3, 6.4], (8, "gist"), training_free=[],  # trained rivals only
           adapters={"ccm_concat": "a", "ccm_concat_ref": "b", "ccm_merge": "c", "gist": "d", "gist_cpu": "e"},
           peers={"gist_cpu": "ccm_concat_cpu"})  # gist_cpu is another CCM-concat's rival
    _write(tmp_path, "eval_f", 3.5, [1.3, 6.4], (8, "gist"), training_free=[],  # a run that lists its rivals
           adapters={"ccm_concat": "a", "ccm_merge": "c", "gist": "d"})
    d = json.loads((tmp_path / "eval_f.json").read_text())
    (tmp_path / "eval_f.json").write_text(json.dumps({**d, "rivals": ["none", "kvpress_kvzip", "gist"]}))
    (tmp_path / "train_speed.json").write_text(json.dumps({"name": "speed", "headline": {"metric": "x", "value": 2}}))
    rows = {r["name"]: r for r in scoreboard.scoreboard(tmp_path)}
    # eval_c: references only; train_speed no eval
    assert set(rows) == {"eval_a", "frontier_b", "run_d", "eval_e", "eval_f"}
    assert (rows["eval_e"]["competitors"], rows["eval_e"]["worst_against"]) == ("ccm_merge, gist", "gist")
    assert rows["eval_f"]["competitors"] == "kvpress kvzip, gist"  # as the run says: no CCM-merge
    d = rows["run_d"]  # a frontier by its per-step budgets; its control is a point: 43.5 - 40.0, no interval
    assert (d["kind"], d["worst_against"], d["memory_value"]) == ("frontier", "kvpress_kvzip", "3.5 (t = 4)")
    assert d["data"] == "held-out works: shakespeare:test"  # held-out plays of a source a recipe may train on
    a, b = rows["eval_a"], rows["frontier_b"]
    assert (a["verdict"], a["worst_t"], a["worst_against"], a["kind"]) == ("ahead", 8, "kvpress_snapkv", "equal KV")
    assert a["competitors"] == "window, kvpress snapkv" and a["data"] == "own split"
    assert a["memory_value"] == "1.5 [0.5, 2.5] (t = 8)"
    assert (b["verdict"], b["worst_t"], b["worst_against"], b["kind"]) == ("level", 4, "window", "frontier")
    assert b["data"] == "held out: office" and b["adapter"] == "adapters/general-chat (raw tail 1)"
    assert scoreboard.verdict(-0.2, [-0.5, -0.1]) == "behind"


def test_a_broken_result_file_is_named(tmp_path):
    (tmp_path / "eval_x.json").write_text('{"name": "eval_x", "headline": ')
    with pytest.raises(SystemExit, match="eval_x.json: not a readable result file"):
        scoreboard.scoreboard(tmp_path)
    (tmp_path / "eval_x.json").unlink()
    with pytest.raises(SystemExit, match="no `ccmem eval` results"):
        scoreboard.scoreboard(tmp_path)
