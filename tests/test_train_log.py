"""Per-part training losses of a mixed recipe: each part's logged loss is that part's own cross-entropy in every batch
layout; the log reads back into windows, a table and a plot (`ccmem train-curve`); a damaged log is refused."""

from __future__ import annotations

import json
import math
import random

import pytest
from test_training import key_task, make_toy_ccm

from ccmem import train_log
from ccmem.cli import main
from ccmem.data import Episode, Mixture
from ccmem.data.dialog import part_of
from ccmem.errors import InputError
from ccmem.training import TrainConfig, Trainer, global_batch


def other_task(n: int, seed: int) -> list[Episode]:
    """Longer, unpredictable outputs: a part with a loss far from key_task's."""
    r = random.Random(seed)
    return [Episode([[r.randint(70, 120) for _ in range(3)]], [7], [r.randint(20, 60) for _ in range(r.randint(2, 5))])
            for _ in range(n)]


@pytest.mark.parametrize("batch_size,pack", [(1, 0), (4, 0), (4, 64)])
def test_part_losses_are_each_parts_own_cross_entropy(tmp_path, batch_size, pack):
    mix = Mixture([key_task(12, 0), other_task(20, 1)], names=["keys", "noise"])
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=3, batch_size=batch_size, grad_accum=8 // batch_size,
                      lr=0.0, warmup_ratio=0.0, pack=pack, save_every=3)
    tr = Trainer(make_toy_ccm(), mix, cfg)
    tr.fit()
    for step, row in enumerate(tr.history):
        drawn: dict[str, list[Episode]] = {}
        for i, e in global_batch(step, len(mix), 8, cfg.seed):
            drawn.setdefault(mix.names[part_of(mix.starts, i)], []).append(mix.get(i, e))
        assert row["part_loss"].keys() == drawn.keys()
        for name, eps in drawn.items():  # lr 0: the weights the step scored with, scored again one part at a time
            assert row["part_tokens"][name] == sum(len(e.output) for e in eps)
            assert row["part_loss"][name] == pytest.approx(math.log(tr.evaluate(eps)), abs=1e-4)
        assert abs(row["part_loss"].get("keys", 0) - row["part_loss"].get("noise", 0)) > 0.01
    again = Trainer(make_toy_ccm(), mix, cfg)
    assert again.resume() and again.history == tr.history  # the nested fields survive the checkpoint


def test_mixture_names_and_parts():
    mix = Mixture([[1, 2], [], [3]], names=["a", "b", "c"])
    assert [part_of(mix.starts, i) for i in range(3)] == [0, 0, 2] and [mix.get(i) for i in range(3)] == [1, 2, 3]
    assert Mixture([[1]]).names == ["part0"]
    with pytest.raises(ValueError, match="unique name"):
        Mixture([[1], [2]], names=["a", "a"])


def test_part_names_number_repeated_sources():
    from ccmem.recipe import part_names

    parts = [{"source": "chitchat"}, {"source": "script", "name": "shakespeare"}, {"source": "text", "path": "kjv:old"},
             {"source": "chitchat"}]
    assert part_names(parts) == ["chitchat#1", "script:shakespeare", "text:kjv:old", "chitchat#2"]


def rows() -> list[dict]:
    return [
        {"step": 1, "loss": 3.0},  # logged before per-part losses existed
        {"step": 2, "loss": 2.0, "part_loss": {"a": 1.0, "b": 4.0}, "part_tokens": {"a": 10, "b": 30}},
        {"step": 3, "loss": 1.0, "part_loss": {"a": 3.0}, "part_tokens": {"a": 30}},
        {"step": 4, "loss": 5.0, "ce": 2.5, "part_loss": {"b": 2.0}, "part_tokens": {"b": 10}},  # distilled: ce
    ]


def test_windows_pool_each_part_over_its_tokens(tmp_path):
    wins = train_log.windows(rows(), 2)
    assert [(w["first"], w["last"], w["steps"]) for w in wins] == [(1, 2, 2), (3, 4, 2)]
    assert wins[0]["loss"] == pytest.approx(2.5) and wins[1]["loss"] == pytest.approx(1.75)
    assert wins[0]["parts"] == {"a": 1.0, "b": 4.0}
    assert wins[1]["parts"] == {"a": 3.0, "b": 2.0} and wins[1]["part_tokens"] == {"a": 30, "b": 10}
    whole = train_log.pooled_parts(rows())
    assert whole == {"a": pytest.approx((10 + 90) / 40), "b": pytest.approx((120 + 20) / 40)}
    md = train_log.table(wins)
    assert md.splitlines()[0] == "| steps | loss | a | b |" and "| 3-4 | 1.750 | 3.000 | 2.000 |" in md
    png = train_log.plot(wins, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least one step"):
        train_log.windows(rows(), 0)


def test_train_curve_cli_and_damaged_logs(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows()))
    assert main(["train-curve", str(run), "--window", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 1-2 | 2.500 | 1.000 | 4.000 |" in out and (run / "train_curve.png").stat().st_size > 1000
    assert main(["train-curve", str(run / "train_log.jsonl"), "-o", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").is_file()

    with pytest.raises(InputError, match="no training log"):
        train_log.read_log(tmp_path / "nowhere")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows()[0]) + "\n{\"step\": 2, \"loss\n")
    with pytest.raises(InputError, match=r"bad.jsonl:2: not a JSON row"):
        train_log.read_log(bad)
    bad.write_text(json.dumps({"step": 1, "loss": float("nan")}) + "\n")
    with pytest.raises(InputError, match=r":1: a log row needs"):
        train_log.read_log(bad)
    bad.write_text(json.dumps({"step": 1, "loss": 2.0, "part_loss": {"a": None}}) + "\n")
    with pytest.raises(InputError, match="must map part names to numbers"):
        train_log.read_log(bad)
    bad.write_text("\n")
    with pytest.raises(InputError, match="empty"):
        train_log.read_log(bad)
    bad.write_text(json.dumps(rows()[0]) + "\n" + json.dumps(rows()[1])[:20])  # the trainer mid-way through a row
    assert train_log.read_log(bad) == rows()[:1]
