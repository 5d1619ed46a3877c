"""benchmarks/train_pair.py: two branches' training logs paired step by step (same tokens), differences per part and
window with bootstrap intervals, and a refusal for runs that read different data."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "train_pair", Path(__file__).resolve().parents[1] / "benchmarks" / "train_pair.py")
train_pair = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(train_pair)


def _log(path: Path, shift: dict[str, float], steps: int = 12, tokens_of=None) -> Path:
    rng = random.Random(0)  # the same draws for both runs: the same episodes
    rows = []
    for s in range(1, steps + 1):
        pt = {"chitchat": rng.randint(10, 40), "recall": rng.randint(5, 15)}
        if tokens_of:
            pt = tokens_of(s, pt)
        pl = {p: rng.uniform(1, 4) + shift.get(p, 0.0) for p in pt}
        tokens = sum(pt.values())
        rows.append({"step": s, "loss": sum(pl[p] * pt[p] for p in pt) / tokens, "tokens": tokens,
                     "part_loss": pl, "part_tokens": pt})
    path.mkdir(parents=True, exist_ok=True)
    (path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pair_differences_per_part_and_window(tmp_path, monkeypatch):
    """B is 0.3 nats better on chit-chat and equal on recall at every step: each window says so exactly (an interval
    of one point), the overall row is the token-weighted share of it, and the headline (second half) is below 0."""
    a, b = _log(tmp_path / "a", {}), _log(tmp_path / "b", {"chitchat": -0.3})
    monkeypatch.setattr(train_pair, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(train_pair, "write_results", lambda name, cmd, head, cfg, rows, table: seen.update(
        head=head, rows=rows, table=table))
    seen: dict = {}
    monkeypatch.setattr(sys, "argv", ["train_pair.py", str(a), str(b), "--labels", "r8,grow", "--bootstrap", "50"])
    (tmp_path / "results").mkdir()
    train_pair.main()
    rows = {(r["steps"], r["part"]): r for r in seen["rows"]}
    assert sorted({k[0] for k in rows}) == ["1-4", "5-8", "9-12"]
    for w in ("1-4", "5-8", "9-12"):
        assert rows[(w, "chitchat")]["diff"] == pytest.approx(-0.3)
        assert rows[(w, "chitchat")]["diff_ci"] == pytest.approx([-0.3, -0.3])
        assert rows[(w, "recall")]["diff"] == pytest.approx(0.0, abs=1e-12)
        lo, hi = (int(x) for x in w.split("-"))
        logged = [json.loads(x) for x in (a / "train_log.jsonl").read_text().splitlines()][lo - 1:hi]
        share = sum(r["part_tokens"]["chitchat"] for r in logged) / sum(r["tokens"] for r in logged)
        assert rows[(w, "all")]["diff"] == pytest.approx(-0.3 * share)
    assert seen["head"]["value"] < 0 and seen["head"]["metric"] == "train_loss_grow_minus_r8_second_half"
    assert "grow - r8" in seen["table"] and (tmp_path / "results" / "train_pair.png").stat().st_size > 0


def test_runs_that_read_other_tokens_are_refused(tmp_path):
    a = _log(tmp_path / "a", {})
    b = _log(tmp_path / "b", {}, tokens_of=lambda s, pt: {**pt, "recall": pt["recall"] + (s == 5)})
    with pytest.raises(SystemExit, match="step 5: the runs read different tokens"):
        train_pair.paired_steps(train_pair.read_log(a), train_pair.read_log(b))
