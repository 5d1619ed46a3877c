"""Data sources on tiny fixture files in each source's exact schema: parsed text, counted problems, strict errors and
episode construction. No model, no network: the tokenizer is a word-level fake."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from ccmem.data import (
    LAMP2_LABELS,
    RowError,
    clean_text,
    lamp2_entry,
    lamp2_episodes,
    load_dailydialog,
    load_jsonl_dialogs,
    load_jsonl_episodes,
    load_lamp2,
    load_metaicl,
    load_soda,
    metaicl_episodes,
)


class WordTok:
    """One id per whitespace-separated word (ids from 1; EOS is 0). Records every text it was asked to encode."""

    eos_token_id = 0

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.calls: list[str] = []

    def _ids(self, text: str) -> list[int]:
        self.calls.append(text)
        return [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        if isinstance(text, list):
            return {"input_ids": [self._ids(t) for t in text]}
        return {"input_ids": self._ids(text)}

    def words(self, ids: list[int]) -> str:
        inv = {v: k for k, v in self.vocab.items()}
        return " ".join("<eos>" if i == 0 else inv[i] for i in ids)


def write_jsonl(path, rows):
    """Rows are dicts (dumped) or raw strings (written as they are, e.g. broken JSON)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- sources.py (JSONL)
DIALOG_LINES = [
    {"id": "d1", "turns": [" hi ", "hello, how are you?", "fine"]},  # line 1: kept, turns stripped
    "{not json",                                                    # line 2: invalid JSON
    {"id": "d3", "text": ["a", "b"]},                               # line 3: missing "turns"
    {"turns": "hi there"},                                          # line 4: not a list
    {"turns": ["hi", 5]},                                           # line 5: non-string turn
    {"turns": ["hi", "   "]},                                       # line 6: empty turn
    {"turns": ["hi", "x" * 50]},                                    # line 7: over-long turn (limit 40)
    {"turns": ["alone"]},                                           # line 8: too few turns
    "",                                                             # line 9: blank, skipped silently
    {"turns": ["a", "b"]},                                          # line 10: kept, id defaults to file:line
]


def test_jsonl_dialogs_counts_malformed_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DIALOG_LINES)
    dialogs, report = load_jsonl_dialogs(path, max_turn_chars=40)
    assert [(d.id, d.turns) for d in dialogs] == [("d1", ("hi", "hello, how are you?", "fine"))]
    assert report == Counter({"invalid JSON": 1, "missing field": 3, "empty turn": 1, "over-long turn": 1,
                              "too few turns": 2})  # 2-turn dialogs have nothing to compress (method.md §7.2)
    assert len(load_jsonl_dialogs(path, max_turn_chars=40, min_turns=2)[0]) == 2


@pytest.mark.parametrize("line,what", [(2, "invalid JSON"), (3, "missing field"), (4, "missing field"),
                                       (5, "missing field"), (6, "empty turn"), (7, "over-long turn"),
                                       (8, "too few turns")])
def test_jsonl_dialogs_strict_names_file_and_line(tmp_path, line, what):
    rows = [DIALOG_LINES[0], DIALOG_LINES[line - 1]]  # the bad row lands on line 2
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(RowError, match=f"^{re.escape(str(path))}:2: {what}"):
        load_jsonl_dialogs(path, strict=True, max_turn_chars=40)


def test_jsonl_episodes_counts_and_strict(tmp_path):
    tok = WordTok()
    rows = [
        {"id": "e1", "context": ["the cat", "sat down"], "input": "where ?", "output": "on mat"},  # kept
        "[1, 2",                                                                              # invalid JSON
        ["context"],                                                                          # not an object
        {"context": "the cat", "input": "q", "output": "a"},                                  # context not a list
        {"context": ["c"], "input": 3, "output": "a"},                                        # input not a string
        {"context": ["c", " "], "input": "q", "output": "a"},                                 # empty chunk
        {"context": ["c"], "input": "q", "output": "  "},                                     # empty output
        {"context": [], "input": "q", "output": "a"},                                         # kept, no context
    ]
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    eps, report = load_jsonl_episodes(path, tok)
    assert [e.id for e in eps] == ["e1", f"{path}:8"]
    e = eps[0]
    assert [tok.words(c) for c in e.chunks] == ["the cat", "sat down"]
    assert tok.words(e.input) == "where ?" and tok.words(e.output) == "on mat <eos>"
    assert eps[1].chunks == [] and tok.words(eps[1].output) == "a <eos>"
    assert report == Counter({"invalid JSON": 1, "missing field": 3, "empty turn": 1, "empty input or output": 1})
    strict_file = write_jsonl(tmp_path / "s.jsonl", [rows[0], rows[7], rows[2]])
    with pytest.raises(RowError, match=f"^{re.escape(str(strict_file))}:3: missing field"):
        load_jsonl_episodes(strict_file, tok, strict=True)
    one = write_jsonl(tmp_path / "one.jsonl", [rows[6]])
    with pytest.raises(RowError, match=f"^{re.escape(str(one))}:1: empty input or output"):
        load_jsonl_episodes(one, tok, strict=True)


# ------------------------------------------------------------------------------------------- DailyDialog / SODA
@pytest.mark.parametrize("raw,clean", [
    ("Hi , how are you ? ", "Hi, how are you?"),
    ("I ’ m fine . It ’ s 3.5 dollars , isn ’ t it ?", "I'm fine. It's 3.5 dollars, isn't it?"),
    ("  Well  ...  ( maybe ) ; ok : 50 % !", "Well... (maybe); ok: 50%!"),
    ("Already clean.", "Already clean."),
])
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


DD_ROWS = [
    {"dialog": ["Say , Jim , how about a beer ? ", " You know that is tempting . ", "Do you really think so ? "],
     "act": [3, 4, 2], "emotion": [0, 0, 0]},                                       # 0: kept
    {"dialog": ["Hi !", "Hello ."], "act": [1, 1], "emotion": [0, 0]},              # 1: only 2 turns
    {"dialog": ["Hi !", "  ", "Bye ."], "act": [1, 1, 1], "emotion": [0, 0, 0]},     # 2: empty turn
    {"act": [1], "emotion": [0]},                                                   # 3: missing dialog
    {"dialog": ["Hi !", None, "Bye ."], "act": [1, 1, 1], "emotion": [0, 0, 0]},     # 4: non-string turn
    {"dialog": ["One .", "Two ?", "Three !", "Four ."], "act": [1, 2, 1, 1], "emotion": [0, 0, 0, 0]},  # 5: kept
]
DD_TURNS = [("dailydialog-{s}-0",
             ("Say, Jim, how about a beer?", "You know that is tempting.", "Do you really think so?")),
            ("dailydialog-{s}-5", ("One.", "Two?", "Three!", "Four."))]
DD_REPORT = Counter({"too few turns": 1, "empty turn": 1, "missing field": 2})


def test_dailydialog_jsonl_in_hub_schema(tmp_path):
    path = write_jsonl(tmp_path / "dd.jsonl", DD_ROWS)
    dialogs, report = load_dailydialog(str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert [(d.id, d.turns) for d in dialogs] == [(i.format(s="train"), t) for i, t in DD_TURNS]
    assert report == DD_REPORT


def test_dailydialog_parquet_in_hub_schema(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    schema = pa.schema([("dialog", pa.list_(pa.string())), ("act", pa.list_(pa.int64())),
                        ("emotion", pa.list_(pa.int64()))])
    pq.write_table(pa.Table.from_pylist(DD_ROWS, schema=schema), tmp_path / "dd.parquet")
    dialogs, report = load_dailydialog(tmp_path / "dd.parquet", split="validation", cache_dir=str(tmp_path / "c"))
    assert [(d.id, d.turns) for d in dialogs] == [(i.format(s="validation"), t) for i, t in DD_TURNS]
    assert report == DD_REPORT


@pytest.mark.parametrize("bad,what", [(1, "too few turns"), (2, "empty turn"), (3, "missing field"),
                                      (4, "missing field")])
def test_dailydialog_strict_names_file_and_row(tmp_path, bad, what):
    path = write_jsonl(tmp_path / "dd.jsonl", [DD_ROWS[0], DD_ROWS[bad]])
    with pytest.raises(RowError, match=rf"^{re.escape(str(path))} \[train\] row 1: {what}"):
        load_dailydialog(str(path), strict=True, cache_dir=str(tmp_path / "cache"))


def test_dailydialog_rows_and_token_filters():
    tok = WordTok()
    rows = [
        {"dialog": "Hi . __eou__ Hello . __eou__", "act": [], "emotion": []},   # raw text, not a list
        {"dialog": ["a b", "c d e f", "g"]},                                     # turn of 4 tokens > 3
        {"dialog": ["a b c", "d e f", "g h i"]},                                 # 9 tokens > 8 in total
        {"dialog": ["a b", "c d e", "f g h"]},                                   # 8 tokens: kept
    ]
    dialogs, report = load_dailydialog(rows, tokenizer=tok, max_turn_tokens=3, max_total_tokens=8)
    assert [d.id for d in dialogs] == ["dailydialog-train-3"]
    assert report == Counter({"missing field": 1, "over-long turn": 1, "over-long dialog": 1})
    # default total limits: 400 tokens for train, 600 for evaluation splits
    long = [{"dialog": [" ".join(["w"] * 100)] * 5}]  # 5 turns of 100 tokens = 500
    assert load_dailydialog(long, "train", tokenizer=tok)[1] == Counter({"over-long dialog": 1})
    assert len(load_dailydialog(long, "validation", tokenizer=tok)[0]) == 1
    assert load_dailydialog([{"dialog": ["w " * 129, "a", "b"]}], "test", tokenizer=tok)[1] == \
        Counter({"over-long turn": 1})


def test_hub_names_go_to_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, split=None, cache_dir=None, revision=None):
        calls.append((name, split, revision))
        if name == "daily_dialog" and revision is None:
            raise RuntimeError("Dataset scripts are no longer supported, but found daily_dialog.py")
        if name == "broken/repo":
            raise RuntimeError("something else")
        return [DD_ROWS[0]] if name == "daily_dialog" else [{"dialogue": ["a", "b", "c"], "original_index": 3}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dialogs, _ = load_dailydialog(split="test")
    assert calls == [("daily_dialog", "test", None), ("daily_dialog", "test", "refs/convert/parquet")]
    assert [d.id for d in dialogs] == ["dailydialog-test-0"]
    calls.clear()
    dialogs, _ = load_soda(split="validation")
    assert calls == [("allenai/soda", "validation", None)] and [d.id for d in dialogs] == ["soda-validation-3"]
    with pytest.raises(RuntimeError, match="something else"):
        load_soda("broken/repo")


SODA_ROWS = [
    {"head": "PersonX moves", "relation": "xIntent", "tail": "to live", "literal": "Ali moves.",
     "narrative": "Ali moves to a new town.", "dialogue": ["Hey , Ali.", "Hi! I just moved here.", "Welcome!"],
     "speakers": ["Sam", "Ali", "Sam"], "PersonX": "Ali", "PersonY": "", "PersonZ": "", "original_index": 7,
     "split": "train", "head_answer": "Yes", "pmi_head_answer": "Yes", "relation_tail_answer": "Yes",
     "pmi_relation_tail_answer": "Yes"},
    {"narrative": "n", "dialogue": ["Hi.", "Bye."], "speakers": ["A", "B"], "original_index": 8},          # too few
    {"narrative": "n", "dialogue": ["Hi.", "", "Bye."], "speakers": ["A", "B", "A"], "original_index": 9},  # empty
    {"narrative": "n", "speakers": ["A", "B", "A"], "original_index": 10},                                # missing
    {"narrative": "n", "dialogue": ["One.", "Two.", "Three."], "speakers": ["A", "B", "A"]},              # kept, no id
    {"narrative": "n", "dialogue": ["Uno.", "Dos.", "Tres."], "speakers": ["A", "B", "A"], "original_index": 12},
]


def test_soda_jsonl_in_hub_schema(tmp_path):
    path = write_jsonl(tmp_path / "soda.jsonl", SODA_ROWS)
    dialogs, report = load_soda(str(path), split="validation", cache_dir=str(tmp_path / "cache"))
    assert [(d.id, d.turns) for d in dialogs] == [
        ("soda-validation-7", ("Hey, Ali.", "Hi! I just moved here.", "Welcome!")),
        ("soda-validation-4", ("One.", "Two.", "Three.")),
        ("soda-validation-12", ("Uno.", "Dos.", "Tres.")),
    ]
    assert report == Counter({"too few turns": 1, "empty turn": 1, "missing field": 1})
    # max_dialogs keeps the first dialogs that pass, and stops reading there
    dialogs, report = load_soda(str(path), split="validation", max_dialogs=2, cache_dir=str(tmp_path / "cache"))
    assert [d.id for d in dialogs] == ["soda-validation-7", "soda-validation-4"]
    assert report == Counter({"too few turns": 1, "empty turn": 1, "missing field": 1})
    dialogs, report = load_soda(str(path), split="validation", max_dialogs=1, cache_dir=str(tmp_path / "cache"))
    assert [d.id for d in dialogs] == ["soda-validation-7"] and report == Counter()


def test_soda_strict_names_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "soda.jsonl", SODA_ROWS)
    with pytest.raises(RowError, match=rf"^{re.escape(str(path))} \[train\] row 1: too few turns"):
        load_soda(str(path), strict=True, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(RowError, match=r"^<rows> \[train\] row 0: empty turn"):
        load_soda([SODA_ROWS[2]], strict=True)


# ------------------------------------------------------------------------------------------- MetaICL
def mrow(task, x, y, options=()):
    return {"task": task, "input": x, "output": y, "options": list(options)}


def test_load_metaicl_folder_counts_and_strict(tmp_path):
    folder = tmp_path / "metaicl"
    folder.mkdir()
    good_a = mrow("glue-rte", "premise one", "entailment", ["entailment", "not_entailment"])
    write_jsonl(folder / "a.jsonl", [
        good_a,                                                                   # 1 kept
        '{"task": "glue-rte", "input": "broken"',                                 # 2 invalid JSON
        {"task": "glue-rte", "input": "x", "output": "entailment"},               # 3 missing options
        {"task": "glue-rte", "input": ["x"], "output": "y", "options": []},       # 4 wrong type
        mrow("glue-rte", "premise two", "maybe", ["entailment", "not_entailment"]),  # 5 output not in options
        mrow("glue-rte", "premise three", "  ", []),                             # 6 empty output
        mrow("glue-rte", "premise four", " not_entailment ", ["entailment", "not_entailment"]),  # 7 kept (strip)
    ])
    write_jsonl(folder / "b.jsonl", [mrow("quarel", "q one", "free text")])  # no options: any output is fine
    (folder / "notes.txt").write_text("ignored")
    tasks, report = load_metaicl(folder)
    assert sorted(tasks) == ["glue-rte", "quarel"]
    assert [r["input"] for r in tasks["glue-rte"]] == ["premise one", "premise four"]
    assert tasks["glue-rte"][0] == good_a and tasks["quarel"] == [mrow("quarel", "q one", "free text")]
    assert report == Counter({"invalid JSON": 1, "missing field": 2, "output not in options": 1,
                              "empty output": 1})
    with pytest.raises(RowError, match=f"^{re.escape(str(folder / 'a.jsonl'))}:2: invalid JSON"):
        load_metaicl(folder, strict=True)
    single = write_jsonl(tmp_path / "one.jsonl", [good_a, mrow("glue-rte", "p", "maybe", ["yes", "no"])])
    with pytest.raises(RowError, match=f"^{re.escape(str(single))}:2: output not in options"):
        load_metaicl(single, strict=True)
    assert load_metaicl(single)[1] == Counter({"output not in options": 1})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        load_metaicl(empty)


def task_examples(task, n, opts=("yes", "no")):
    return [mrow(task, f"{task} question {i}", opts[i % 2], opts) for i in range(n)]


def test_metaicl_episodes_training_demonstrations():
    tok = WordTok()
    a, b = task_examples("ta", 12), task_examples("tb", 3)
    examples = a + b + [mrow("ta", " ".join(["long"] * 20), "yes", ["yes", "no"])]  # 1 + 20 + 1 + 1 = 23 > 22
    eps, report = metaicl_episodes(examples, tok, k=4, seed=3, max_example_length=22)
    assert report == Counter({"over-long example": 1})
    assert len(eps) == 15 and [e.meta["task"] for e in eps] == ["ta"] * 12 + ["tb"] * 3
    texts_a = {f"Input: {ex['input']} Output: {ex['output']}" for ex in a}
    for i, e in enumerate(eps[:12]):
        demos = [tok.words(c) for c in e.chunks]
        assert len(demos) == 4 and len(set(demos)) == 4              # k draws, without replacement
        assert set(demos) <= texts_a                                   # same task, over-long one never drawn
        assert f"Input: ta question {i} Output: {a[i]['output']}" not in demos  # never itself
        assert tok.words(e.input) == f"Input: ta question {i} Output:"
        assert tok.words(e.output) == f"{a[i]['output']} <eos>"
        assert [tok.words(o) for o in e.options] == ["yes", "no"] and e.answer == i % 2
        assert e.id == f"metaicl-ta-{i}"
    assert all(len(e.chunks) == 2 for e in eps[12:])                   # a task of 3 has only 2 others
    # prefixes are separate tokens and every piece is encoded stripped, with no special tokens
    assert tok("Input:", add_special_tokens=False)["input_ids"] == eps[0].input[:1]
    again, _ = metaicl_episodes(examples, tok, k=4, seed=3, max_example_length=22)
    other, _ = metaicl_episodes(examples, tok, k=4, seed=4, max_example_length=22)
    assert [e.chunks for e in again] == [e.chunks for e in eps]
    assert [e.chunks for e in other] != [e.chunks for e in eps]


def test_metaicl_episodes_strip_options_and_fixed_demos():
    tok = WordTok()
    test = [mrow("ta", "  spaced input ", " b ", ["a", " b", "a", "c"]), mrow("ta", "free", "text")]
    demos = ([mrow("tb", "other task", "no", [])] + [mrow("ta", f"demo {i}", "a", ["a", "b"]) for i in range(5)]
             + [mrow("ta", "too long " * 10, "a", ["a", "b"])])
    eps, report = metaicl_episodes(test, tok, k=3, demos=demos, max_example_length=12)
    assert report == Counter({"over-long demonstration": 1})
    assert all(t == t.strip() for t in tok.calls)
    e = eps[0]
    assert [tok.words(c) for c in e.chunks] == [f"Input: demo {i} Output: a" for i in range(3)]  # first k, in order
    assert tok.words(e.input) == "Input: spaced input Output:" and tok.words(e.output) == "b <eos>"
    assert [tok.words(o) for o in e.options] == ["a", "b", "c"] and e.answer == 1  # de-duplicated options
    assert eps[1].options is None and eps[1].answer is None and tok.words(eps[1].output) == "text <eos>"
    # max_length: demonstrations are added while they fit in max_length - len(input) - len(y)
    eps, _ = metaicl_episodes(test[:1], tok, k=3, demos=demos, max_example_length=12, max_length=4 + 1 + 2 * 5)
    assert len(eps[0].chunks) == 2
    # an example whose output is not an option is counted, not given a wrong answer index
    eps, report = metaicl_episodes([mrow("ta", "x", "z", ["a", "b"])], tok, k=0)
    assert eps == [] and report == Counter({"output not in options": 1})
    # the cap counts the prefixes and the gold output: exactly max_example_length tokens is kept
    edge = [mrow("tc", " ".join(["w"] * 9), "a"), mrow("tc", " ".join(["w"] * 10), "a")]  # 12 and 13 tokens
    eps, report = metaicl_episodes(edge, tok, k=1, max_example_length=12)
    assert [len(e.input) + len(e.output) - 1 for e in eps] == [12] and report == Counter({"over-long example": 1})


# ------------------------------------------------------------------------------------------- LaMP-2
INSTRUCTION = ("Which category does this article relate to among the following categories? Just answer with the "
               "category name without further explanation. categories: [women, religion, politics, style & beauty, "
               "entertainment, culture & arts, sports, science & technology, travel, business, crime, education, "
               "healthy living, parents, food & drink] article:")


def entry(i, category="sports", text=None):
    return {"text": text or f"text {i}", "title": f"title {i}", "category": category, "id": f"p{i}"}


def lamp_files(tmp_path):
    questions = [
        {"id": "110", "input": f"{INSTRUCTION} Beets are a powerhouse .", "profile": [entry(1), entry(2, "travel")]},
        {"id": "111", "input": f"{INSTRUCTION} x", "profile": "none"},                        # 1 profile not a list
        {"id": "112", "input": f"{INSTRUCTION} x", "profile": [{"text": "t", "title": "t"}]},  # 2 entry w/o category
        {"id": "113", "input": "Which category? no article here", "profile": []},            # 3 no "article:"
        {"id": "114", "input": f"{INSTRUCTION} An article: with a colon.", "profile": []},   # 4 kept
        {"id": "115", "input": f"{INSTRUCTION} no gold", "profile": []},                     # 5 no gold output
    ]
    outputs = {"task": "LaMP_2", "golds": [{"id": "110", "output": "food & drink"}, {"id": "111", "output": "crime"},
                                           {"id": "112", "output": "crime"}, {"id": "113", "output": "crime"},
                                           {"id": "114", "output": "politics"}, {"id": 116}]}
    q, o = tmp_path / "dev_questions.json", tmp_path / "dev_outputs.json"
    q.write_text(json.dumps(questions, indent=1))
    o.write_text(json.dumps(outputs))
    return q, o


def test_load_lamp2_rows_counts_and_strict(tmp_path):
    q, o = lamp_files(tmp_path)
    rows, report = load_lamp2(q, o)
    assert rows == [
        {"id": "110", "instruction": INSTRUCTION, "article": "Beets are a powerhouse .",
         "profile": [entry(1), entry(2, "travel")], "label": "food & drink"},
        {"id": "114", "instruction": INSTRUCTION, "article": "An article: with a colon.", "profile": [],
         "label": "politics"},
    ]
    assert report == Counter({"missing field": 3, "missing article": 1, "missing gold": 1})
    rows, report = load_lamp2(q)  # no outputs file: labels unknown, no gold needed
    assert [r["id"] for r in rows] == ["110", "114", "115"] and rows[2]["label"] is None
    assert report == Counter({"missing field": 2, "missing article": 1})
    with pytest.raises(RowError, match=rf"^{re.escape(str(o))} golds\[5\]: missing field"):
        load_lamp2(q, o, strict=True)
    with pytest.raises(RowError, match=rf"^{re.escape(str(q))} row 1 \(id 111\): missing field"):
        load_lamp2(q, strict=True)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"id": "1",\n')
    with pytest.raises(RowError, match=f"^{re.escape(str(broken))}:3: invalid JSON"):
        load_lamp2(broken)  # an unreadable file raises even when not strict


def lamp_row(rid, profile, label="sports"):
    return {"id": rid, "instruction": "Pick a category.", "article": "big match today", "profile": profile,
            "label": label}


def test_lamp2_episodes(tmp_path):
    assert len(LAMP2_LABELS) == len(set(LAMP2_LABELS)) == 15
    tok = WordTok()
    full = [entry(i, LAMP2_LABELS[i % 15]) for i in range(20)]
    short = [entry(100 + i) for i in range(3)]
    long_text = " ".join(["word"] * 12)
    rows = [
        lamp_row("a", full, "style & beauty"),
        lamp_row("b", short),
        lamp_row("c", [entry(i) for i in range(10)] + [entry(50, text=long_text)]),  # 1 of 11 over-long: kept
        lamp_row("d", [entry(i) for i in range(5)] + [entry(50, text=long_text)]),   # 5/6 < 0.9: dropped
        lamp_row("e", [entry(50, text=long_text)]),                                  # nothing left
        lamp_row("f", short, "sport"),                                               # not a label
        lamp_row("g", short, None),                                                  # no gold
    ]
    # an entry is "the category for the article: " (5 words) + text + " is " + category: "text i" -> 9 tokens,
    # the long text -> 19 tokens; the limit drops entries of 15 tokens or more
    eps, report = lamp2_episodes(rows, tok, k=16, seed=42, max_entry_tokens=15)
    assert report == Counter({"over-long profile entry": 3, "low kept-profile ratio": 1, "empty profile": 1,
                              "unknown label": 1, "missing label": 1})
    assert [e.id for e in eps] == ["lamp2-a", "lamp2-b", "lamp2-c"]
    a, b, c = eps
    texts_full = [tok.words(tok(lamp2_entry(p), add_special_tokens=False)["input_ids"]) for p in full]
    chunks_a = [tok.words(ch) for ch in a.chunks]
    assert len(chunks_a) == 16 and len(set(chunks_a)) == 16 and set(chunks_a) <= set(texts_full)  # no replacement
    assert chunks_a[0].startswith('the category for the article: "text')
    chunks_b = [tok.words(ch) for ch in b.chunks]
    assert len(chunks_b) == 16 and set(chunks_b) == {f'the category for the article: "text {100 + i}" is "sports"'
                                                      for i in range(3)}                      # with replacement
    assert all("word" not in tok.words(ch) for ch in c.chunks) and len(c.chunks) == 16
    assert tok.words(a.input) == "Pick a category. Input: big match today Output:"
    assert tok.words(a.output) == "style & beauty <eos>" and a.answer == 3
    assert [tok.words(o) for o in a.options] == list(LAMP2_LABELS) and b.answer == LAMP2_LABELS.index("sports")
    same, _ = lamp2_episodes(rows, tok, k=16, seed=42, max_entry_tokens=15)
    other, _ = lamp2_episodes(rows, tok, k=16, seed=1337, max_entry_tokens=15)
    assert [e.chunks for e in same] == [e.chunks for e in eps]
    assert [e.chunks for e in other] != [e.chunks for e in eps]
    # entries of max_entry_tokens tokens or more are dropped, shorter ones kept
    at_limit = entry(0, text=" ".join(["w"] * 8))  # 5 + 8 + 1 + 1 = 15 tokens
    below = entry(1, text=" ".join(["v"] * 7))     # 14 tokens
    edge, report = lamp2_episodes([lamp_row("h", [at_limit] + [below] * 12)], tok, k=4, max_entry_tokens=15)
    assert report == Counter({"over-long profile entry": 1})
    assert [len(ch) for ch in edge[0].chunks] == [14] * 4
    # max_length removes entries from the end until chunks + input + output fit
    first5 = sum(len(ch) for ch in a.chunks[:5])
    fit, _ = lamp2_episodes(rows[:1], tok, k=16, max_entry_tokens=15, max_length=len(a.input) + 4 + first5)
    assert fit[0].chunks == a.chunks[:5]
    fit, _ = lamp2_episodes(rows[:1], tok, k=16, max_entry_tokens=15, max_length=len(a.input) + 4 + first5 - 1)
    assert fit[0].chunks == a.chunks[:4]


def test_chitchat_corpus_loads_real_dialogs():
    from ccmem.data import load_chitchat, split_dialogs

    dialogs, report = load_chitchat()
    assert len(dialogs) > 3000 and all(len(d.turns) >= 3 and all(d.turns) for d in dialogs)
    assert report["empty turn"] == 10  # dropped whole: removing a turn would swap the speakers after it
    splits = split_dialogs(dialogs, seed=0)
    ids = [{d.id for d in v} for v in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(len(d.turns) >= 14 for d in splits["test"]) >= 150
