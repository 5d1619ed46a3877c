"""Long-text domains for streaming: the reST prose extractor on a hand-written page, texts by name, the chit-chat
stream holding only its split's dialogs, and a multi-text recipe drawing its episodes evenly over its texts."""

from __future__ import annotations

from pathlib import Path

import pytest

from ccmem.data import text as T

PAGE = """\
.. _tut-intro:

****************
An Informal Page
****************

Python is *easy*: call :func:`len <builtins.len>` on ``[1, 2]``, see `the docs`_.
Also :class:`~collections.OrderedDict` works.

.. note::

   A note that is dropped.
   Over two lines.

An example follows::

   >>> print(1)
   1

+-------+-----+
| table | row |
+-------+-----+

   >>> x = 1
Last paragraph.
"""


def test_rst_prose_keeps_paragraphs_and_drops_markup():
    assert T.rst_prose(PAGE) == (
        "An Informal Page\n\n"
        "Python is *easy*: call len on [1, 2], see the docs.\n"
        "Also collections.OrderedDict works.\n\n"
        "An example follows:\n\n"
        "Last paragraph.")


def test_named_text_refuses_unknown_names_and_reads_books(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a known name"):
        T.named_text("no-such-text")
    with pytest.raises(ValueError, match="unknown KJV part"):
        T.named_text("kjv:apocrypha")
    (tmp_path / "a.txt").write_text("one book")
    assert T.named_text(str(tmp_path)) == "one book"


def test_chitchat_stream_holds_only_its_split():
    from ccmem.data import load_chitchat, split_dialogs

    parts = split_dialogs(load_chitchat()[0], seed=0)
    train = T.chitchat_text("train")
    first = parts["train"][0]
    assert train.startswith(f"A: {first.turns[0].strip()}\nB: {first.turns[1].strip()}")
    assert train.count("\n\n") == len(parts["train"]) - 1
    held_out = [d for d in parts["validation"] + parts["test"] if len(d.turns[0]) > 60][:50]
    assert held_out and not any(f"A: {d.turns[0].strip()}\n" in train for d in held_out)


@pytest.mark.skipif(not T.DEVIL_DICT.is_file(), reason="needs Debian's dict-devil")
def test_devils_dictionary_is_the_book():
    text = T.devils_dictionary()
    assert text.startswith("PREFACE") and 300_000 < len(text) < 400_000
    assert "GHOST, n.  The outward and visible sign of an inward fear." in text
    assert "00-database" not in text


@pytest.mark.skipif(not list(Path("/usr/share/doc").glob("python3*/html/_sources")),
                    reason="needs Debian's python3.11-doc")
def test_python_docs_are_prose():
    text = T.named_text("pydocs:tutorial")
    assert 150_000 < len(text) < 400_000
    lines = text.splitlines()
    assert not any(ln.startswith((">>>", ".. ", "+--", "|")) for ln in lines) and ":func:`" not in text
    assert "Python is an easy to learn, powerful programming language." in text


@pytest.mark.skipif(not (T.FORTUNES / "literature").is_file(), reason="needs Debian's fortunes")
def test_fortunes_are_quotations_without_the_held_out_texts():
    text = T.named_text("fortunes")
    quotes = text.split("\n\n")
    assert 2_000_000 < len(text) < 2_600_000 and len(quotes) > 12_000
    assert "A horse!  A horse!  My kingdom for a horse!\n-- Wm. Shakespeare, \"Richard III\"" in quotes
    # the jars' "%" separator lines are gone, and no quotation is empty or padded
    assert not any(ln == "%" for q in quotes for ln in q.splitlines()) and all(q.strip() == q and q for q in quotes)
    # the scoring texts stay held out: no Bierce (the definitions jar quotes him), no Bible verse by chapter
    assert "Bierce" not in text and "Devil's Dictionary" not in text and not T.HELD_OUT_QUOTE.search(text)
    assert T.fortunes_text() == text  # a fixed order: the same text every time


def test_a_list_of_texts_splits_the_episodes_evenly(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ccmem.recipe import text_data

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i + 1 for i in range(300)}}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    (tmp_path / "long.txt").write_text(" ".join(f"w{i % 100}" for i in range(5000)))
    (tmp_path / "short.txt").write_text(" ".join(f"w{100 + i % 100}" for i in range(2000)))
    d = {"path": [str(tmp_path / "long.txt"), str(tmp_path / "short.txt")], "steps": 2, "chunk": 8, "window": 8,
         "target": 4, "train_episodes": 9, "eval_episodes": 2}
    train, val, report = text_data(tok, d, seed=0)
    from_short = [e for e in train if e.chunks[0][0] > 100]
    assert len(train) == 9 and len(from_short) == 4 and len(val) == 2
    assert report["text tokens"] == 7000 and report[f"text tokens {tmp_path / 'short.txt'}"] == 2000
    again, _, _ = text_data(tok, d, seed=0)
    assert [e.id for e in again] == [e.id for e in train]
    with pytest.raises(ValueError, match="names no text"):
        text_data(tok, {**d, "path": []}, seed=0)
