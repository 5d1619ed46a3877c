"""benchmarks/checkpoint_probe.py: the parts it scores are the recipe's validation episodes and the chit-chat suite's
held-out episodes; margins are paired (an adapter against itself is exactly 0); no/full context do not depend on the
adapter loaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import randomize
from transformers import AutoModelForCausalLM, AutoTokenizer

from ccmem import CompressedModel, CompressionConfig
from ccmem.evaluation.suites import ChitchatSuite
from ccmem.recipe import build_data
from ccmem.scoring import perplexity

_SPEC = importlib.util.spec_from_file_location(
    "checkpoint_probe", Path(__file__).resolve().parents[1] / "benchmarks" / "checkpoint_probe.py")
probe = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(probe)

RECIPE = {"train": {"seed": 5}, "data": {"source": "mix", "parts": [
    {"source": "chitchat", "format": "template", "split_seed": 0, "max_turn_tokens": 128, "eval_dialogs": 3},
    {"source": "icl", "per_task": 40, "task_seed": 0, "k_max": 4, "train_episodes": 20, "eval_episodes": 2},
]}}


def test_parts_margins_and_shared_baselines(tiny_folder, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    sets = probe.probe_sets(RECIPE, tok, "office", dialogs=2, ts=[2, 4])
    assert list(sets) == ["chitchat", "icl", "held out: office, t = 2", "held out: office, t = 4"]
    chit_val = build_data(tok, RECIPE["data"]["parts"][0], 5)[1]
    assert [e.id for e in sets["chitchat"]] == [e.id for e in chit_val] and len(chit_val) == 3
    suite = ChitchatSuite(tok, dialogs=2, ts=[2, 4], format="template", source="office")
    for g, ep in zip(suite.groups(4), sets["held out: office, t = 4"]):  # the suite's context and target
        assert g.chunks == ep.chunks and g.queries[0].input == ep.input
        assert g.queries[0].targets[0] == ep.output[:-1]  # the suite drops the EOS, as the probe's scoring does

    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    ccm = CompressedModel.attach(model, CompressionConfig(n_tok=2, lora_dropout=0.0), tokenizer=tok)
    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        randomize(ccm, seed)
        paths[name] = str(tmp_path / name)
        ccm.save_pretrained(paths[name])
    sets = {k: v[:2] for k, v in sets.items()}
    rows = probe.probe(ccm, {"a": paths["a"], "a_again": paths["a"], "b": paths["b"]}, sets, batch=2, bootstrap=50)
    by = {(r["part"], r["method"]): r for r in rows}
    for part in sets:
        assert by[(part, "a_again")]["margin_vs_ref"] == 0 and by[(part, "a_again")]["margin_ci"] == [0, 0]
        b, a = by[(part, "b")], by[(part, "a")]
        assert b["margin_vs_ref"] == pytest.approx(a["ppl"] - b["ppl"], abs=2e-4) and b["margin_vs_ref"] != 0
        assert b["margin_ci"][0] <= b["margin_vs_ref"] <= b["margin_ci"][1]
        assert "margin_vs_ref" not in a and a["tokens"] == b["tokens"] > 0
    # ``b`` is loaded now: the shared baselines read the same, so they are scored once
    none = perplexity(ccm, sets["icl"], mode="none", eos=tok.eos_token_id).ppl
    assert none == pytest.approx(by[("icl", "no context")]["ppl"], rel=1e-4)
