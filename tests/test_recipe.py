"""`ccmem train` end to end on a tiny model that shares SmolLM2's tokenizer: the two-stage recipe, the CLI
overrides, resume, and the stage-1 LoRA folded into the base when the stage-2 adapter is loaded."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from ccmem import CompressedModel
from ccmem.cli import main
from ccmem.lora import merge_and_remove_lora
from ccmem.models import load_model


def test_two_stage_recipe_through_the_cli(tmp_path, tiny_folder):
    common = [f"model={tiny_folder}", "train.max_steps=3", "train.batch_size=2", "data.eval_dialogs=2",
              "train.mixed_precision=no", "train.save_every=2"]
    assert main(["train", "configs/chitchat_stage1.yaml", *common, f"train.output_dir={tmp_path}/r1",
                 f"output={tmp_path}/stage1", "--device", "cpu"]) == 0
    assert main(["train", "configs/chitchat_concat.yaml", *common, f"train.output_dir={tmp_path}/r2",
                 f"base_adapter={tmp_path}/stage1", f"output={tmp_path}/concat", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "concat" / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["train_dialogs"] > 2000
    assert len((tmp_path / "concat" / "train_log.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "r2" / "checkpoints" / "step_000002" / "trainer_state.pt").is_file()

    # loading the stage-2 folder folds stage 1 into the base first: same as merging it by hand
    m1, _ = load_model(str(tiny_folder))
    auto = CompressedModel.from_pretrained(tmp_path / "concat", m1)
    m2, _ = load_model(str(tiny_folder))
    s1 = CompressedModel.from_pretrained(tmp_path / "stage1", m2)
    s1.detach()
    merge_and_remove_lora(m2)
    s1.detach(remove_weights=True)
    with torch.no_grad():
        for name, w in m2.named_parameters():
            if "q_proj.weight" in name:
                assert torch.allclose(dict(m1.named_parameters())[name], w)
                assert not torch.equal(w, dict(load_model(str(tiny_folder))[0].named_parameters())[name])
    assert auto.config.variant == "concat_recur"

    # rerunning the same command resumes from the last checkpoint instead of starting over
    assert main(["train", "configs/chitchat_concat.yaml", *common, "train.max_steps=4",
                 f"train.output_dir={tmp_path}/r2", f"base_adapter={tmp_path}/stage1", f"output={tmp_path}/concat",
                 "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "concat" / "train_summary.json").read_text())["steps"] == 4


def test_mix_source_and_dialog_cuts():
    """``data.source: mix`` interleaves its parts in the ratio of their sizes; ``cut: end`` trains each dialog at
    its natural end, ``cut: uniform`` at every t."""
    from ccmem.data import DialogEpisodes, Mixture
    from ccmem.errors import ConfigError
    from ccmem.models import load_tokenizer
    from ccmem.recipe import build_data

    tok = load_tokenizer()
    chit = {"source": "chitchat", "eval_dialogs": 3, "cut": "end"}
    icl = {"source": "icl", "train_episodes": 40, "eval_episodes": 2}
    train, val, report = build_data(tok, {"source": "mix", "parts": [chit, icl]}, seed=0)
    assert isinstance(train, Mixture) and len(val) == 5
    n_chit = len(train.parts[0])
    assert len(train) == n_chit + 40 and n_chit > 2000
    assert any(k.startswith("icl: task") for k in report) and any(k.startswith("chitchat: ") for k in report)
    dialogs = train.parts[0].dialogs
    assert train.get(0).id == f"{dialogs[0].id}:{len(dialogs[0].turns)}"  # the natural end
    assert train.get(n_chit + 3).meta["task"]  # an ICL episode
    uniform = DialogEpisodes(dialogs, train.parts[0].fmt, seed=0)
    ks = {int(uniform.get(i, e).id.rsplit(":", 1)[1]) for i in range(len(dialogs)) for e in range(2)
          if len(dialogs[i].turns) == 10}
    assert ks == set(range(3, 11))
    with pytest.raises(ConfigError, match="parts"):
        build_data(tok, {"source": "mix"}, seed=0)
    with pytest.raises(ValueError, match="cut"):
        DialogEpisodes(dialogs, train.parts[0].fmt, cut="middle")


def _source_fixture(source: str, d) -> dict:
    """A data section for ``source`` over fixture files in the hub's / the documented schema."""
    from test_data_sources import entry, write_jsonl

    turns = lambda i: [f"hello number {i} .", f"hi there {i} , how are you ?", "fine thanks", "good to hear"]  # noqa: E731
    if source == "jsonl":
        return {"source": "jsonl", "path": str(write_jsonl(d / "dialogs.jsonl",
                                                           [{"id": f"d{i}", "turns": turns(i)} for i in range(30)]))}
    if source == "jsonl_episodes":
        rows = [{"id": f"e{i}", "context": [f"fact {i}", "more"], "input": "Q:", "output": f"{i}"} for i in range(30)]
        return {"source": "jsonl", "kind": "episodes", "path": str(write_jsonl(d / "eps.jsonl", rows))}
    if source == "dailydialog":
        rows = [{"dialog": turns(i), "act": [1] * 4, "emotion": [0] * 4} for i in range(30)]
        return {"source": "dailydialog", "path": str(write_jsonl(d / "dd.jsonl", rows))}
    if source == "soda":
        rows = [{"narrative": "n", "dialogue": turns(i), "speakers": ["A", "B"] * 2, "original_index": i}
                for i in range(30)]
        return {"source": "soda", "path": str(write_jsonl(d / "soda.jsonl", rows))}
    if source == "metaicl":
        (d / "metaicl").mkdir()
        rows = [{"task": "t", "input": f"question {i}", "output": "yes" if i % 2 else "no", "options": ["yes", "no"]}
                for i in range(40)]
        write_jsonl(d / "metaicl" / "t.jsonl", rows)
        return {"source": "metaicl", "path": str(d / "metaicl"), "k": 4}
    rows = [{"id": str(i), "input": f"Which category does this article relate to among the following categories? "
             f"Just answer with the category name without further explanation. categories: [women, religion, "
             f"politics, style & beauty, entertainment, culture & arts, sports, science & technology, travel, "
             f"business, crime, education & health, food & drink] article: story {i}",
             "profile": [entry(j, "travel") for j in range(3)]} for i in range(30)]
    golds = {"task": "LaMP_2", "golds": [{"id": str(i), "output": "sports"} for i in range(30)]}
    (d / "q.json").write_text(json.dumps(rows))
    (d / "o.json").write_text(json.dumps(golds))
    return {"source": "lamp", "questions": str(d / "q.json"), "outputs": str(d / "o.json"), "k": 2}


@pytest.mark.parametrize("source", ["jsonl", "jsonl_episodes", "dailydialog", "soda", "metaicl", "lamp"])
def test_recipe_per_data_source(tmp_path, tiny_folder, source):
    """Every loader is reachable from a recipe and trains end to end."""
    import yaml

    recipe = {"model": str(tiny_folder), "data": _source_fixture(source, tmp_path),
              "compression": {"variant": "concat_recur", "n_tok": 1},
              "train": {"max_steps": 2, "batch_size": 2, "mixed_precision": "no", "output_dir": str(tmp_path / "r"),
                        "eval_batches": 1}, "output": str(tmp_path / "adapter")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "recipe.yaml"), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "adapter" / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_dialogs"] > 20 and summary["validation_dialogs"] >= 0
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
    # the run folder holds the resolved recipe too (its checkpoints have none of their own)
    assert (tmp_path / "r" / "recipe.yaml").read_text() == (tmp_path / "adapter" / "recipe.yaml").read_text()


def test_recipe_source_errors(tiny_folder):
    from ccmem.errors import ConfigError
    from ccmem.models import load_tokenizer
    from ccmem.recipe import build_data

    tok = load_tokenizer()
    with pytest.raises(ConfigError, match="needs data.path"):
        build_data(tok, {"source": "metaicl"}, 0)
    with pytest.raises(ConfigError, match="known: chitchat"):
        build_data(tok, {"source": "nope"}, 0)


def test_general_recipe_runs_and_resumes(tmp_path, tiny_folder):
    """The cross-session recipe: its mix builds, a time-boxed run saves a resumable checkpoint, and the adapter
    carries its sink and memory gate."""
    common = [f"model={tiny_folder}", "train.max_steps=2", "train.grad_accum=1", "train.save_every=1",
              f"train.output_dir={tmp_path}/run", f"output={tmp_path}/adapter", "--device", "cpu"]
    assert main(["train", "configs/general_concat.yaml", *common]) == 0
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["compression"]
    assert cfg["sink"] is True and cfg["memory_gate"] == -4.0
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step_000002"]  # keep_checkpoints: 1
    assert main(["train", "configs/general_concat.yaml", *common[:-4], "train.max_steps=3",
                 f"train.output_dir={tmp_path}/run", f"output={tmp_path}/adapter", "--device", "cpu"]) == 0
    rows = [json.loads(r) for r in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 3  # resumed at step 2
    summary = json.loads((tmp_path / "adapter" / "train_summary.json").read_text())
    assert summary["trained_samples"] == 3 and summary["trained_tokens"] == sum(r["tokens"] for r in rows) > 0
    where = f"{rows[0]['hardware']}, {'fp32' if rows[0]['precision'] == 'no' else rows[0]['precision']}"
    assert list(summary["hardware"]) == [where] and summary["hardware"][where]["steps"] == 3
    assert "threads" in rows[0]["hardware"]
    # the mix's parts are logged apart (`ccmem train-curve`), pooled in the summary and drawn beside the log
    names = {"chitchat", "recall", "icl"}
    assert all(r["part_loss"].keys() <= names and sum(r["part_tokens"].values()) > 0 for r in rows)
    assert summary["part_loss"].keys() == {k for r in rows for k in r["part_loss"]}
    assert (tmp_path / "run" / "train_curve.png").stat().st_size > 1000
    # shipping the checkpoint as an adapter: the same recipe at max_steps = its step trains nothing and writes it
    from safetensors.torch import load_file

    assert main(["train", "configs/general_concat.yaml", *common[:-4], "train.max_steps=3",
                 f"train.output_dir={tmp_path}/run", f"output={tmp_path}/shipped", "--device", "cpu"]) == 0
    assert len((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()) == 3
    got, want = (load_file(p / "adapter.safetensors") for p in (tmp_path / "shipped", ckpts[0].parent / "step_000003"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert json.loads((tmp_path / "shipped" / "train_summary.json").read_text())["steps"] == 3


def _start_adapter(folder, tiny_folder, compression: dict) -> None:
    """An adapter of random non-zero weights (a fresh LoRA's B is 0) to warm-start a recipe from."""
    from ccmem import CompressionConfig

    start = CompressedModel.attach(load_model(str(tiny_folder))[0], CompressionConfig(**compression))
    with torch.no_grad():
        for p in start.trainable_parameters():
            p.normal_(0, 0.02)
    start.save_pretrained(folder)


def test_chat_general_recipe_warm_starts_from_an_adapter(tmp_path, tiny_folder):
    """configs/general_chat.yaml: its four-part mix (template chit-chat and recall, ICL, KJV text) trains, and
    `init_adapter` starts the run from another adapter's weights; an adapter of another compression config is refused
    before any data is built; a resumed run ignores init_adapter."""
    from safetensors.torch import load_file

    from ccmem.errors import IncompatibleError
    from ccmem.recipe import load_recipe

    _start_adapter(tmp_path / "start", tiny_folder, load_recipe("configs/general_chat.yaml")["compression"])
    common = [f"model={tiny_folder}", "train.grad_accum=1", "train.save_every=1", f"output={tmp_path}/chat",
              "train.mixed_precision=no"]  # one process: accelerate keeps the first precision it was given
    import ccmem.recipe

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ccmem.recipe, "build_data", lambda *a: pytest.fail("data built before the refusal"))
        with pytest.raises(IncompatibleError, match="n_tok"):
            main(["train", "configs/general_chat.yaml", *common, "train.max_steps=0", "compression.n_tok=1",
                  f"train.output_dir={tmp_path}/c1", f"init_adapter={tmp_path}/start", "--device", "cpu"])
    assert not (tmp_path / "chat").exists()
    # one Adam step moves each weight by about its lr (1e-3; the gates 1e-2): the run starts from the given weights,
    # not a fresh init (LoRA B = 0, about 0.08 away from these at the largest); then a resume that names another
    # init_adapter and another time limit: it reads its checkpoint, and the run's record keeps its real start
    assert main(["train", "configs/general_chat.yaml", *common, "train.max_steps=1", "train.warmup_ratio=0",
                 f"train.output_dir={tmp_path}/c0", f"init_adapter={tmp_path}/start", "--device", "cpu"]) == 0
    a, b = load_file(tmp_path / "start" / "adapter.safetensors"), load_file(tmp_path / "chat" / "adapter.safetensors")
    assert a.keys() == b.keys()
    moved = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert 0 < moved < 0.015, moved
    first = (tmp_path / "c0" / "recipe.yaml").read_text()
    assert main(["train", "configs/general_chat.yaml", *common, "train.max_steps=2", "train.warmup_ratio=0",
                 f"train.output_dir={tmp_path}/c0", f"init_adapter={tmp_path}/gone", "train.max_minutes=7",
                 "--device", "cpu"]) == 0
    record = yaml.safe_load((tmp_path / "c0" / "recipe.yaml").read_text())
    assert record["init_adapter"] == f"{tmp_path}/start" and record["train"]["max_minutes"] == 55
    assert record == {**yaml.safe_load(first), "train": {**yaml.safe_load(first)["train"], "max_steps": 2}}
    assert yaml.safe_load((tmp_path / "chat" / "recipe.yaml").read_text()) == record
    summary = json.loads((tmp_path / "chat" / "train_summary.json").read_text())
    assert summary["steps"] == 2 and "total_samples" not in summary  # the start has no totals of its own to add
    assert summary["warm_start"] == {"adapter": f"{tmp_path}/start",
                                     "totals": "unknown (no train_summary.json or trainer state)"}


def test_tail_recipe_warm_starts_from_an_adapter_without_a_tail(tmp_path, tiny_folder):
    """configs/general_chat_tail.yaml: the general adapter's weights (saved without a raw tail) start a run that
    trains and ships with a tail of one chunk; the recipe differs from general_chat.yaml in the tail and schedule."""
    from safetensors.torch import load_file

    from ccmem.recipe import load_recipe

    tail, plain = load_recipe("configs/general_chat_tail.yaml"), load_recipe("configs/general_chat.yaml")
    assert tail["compression"] == {**plain["compression"], "raw_tail": 1} and tail["data"] == plain["data"]
    _start_adapter(tmp_path / "start", tiny_folder, plain["compression"])
    before = {"steps": 5, "trained_samples": 40, "trained_tokens": 9000, "hardware": {"cpu": {"steps": 5, "hours": 1}},
              "warm_start": {"adapter": "older"}, "total_samples": 100, "total_tokens": 20000}
    (tmp_path / "start" / "train_summary.json").write_text(json.dumps(before))
    assert main(["train", "configs/general_chat_tail.yaml", f"model={tiny_folder}", "train.grad_accum=1",
                 "train.max_steps=1", "train.warmup_ratio=0", "train.mixed_precision=no",
                 "data={source: recall, format: template, split_seed: 0, eval_episodes: 2, facts: 3}",  # one part: fast
                 f"train.output_dir={tmp_path}/run", f"init_adapter={tmp_path}/start", f"output={tmp_path}/out",
                 "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["compression"]["raw_tail"] == 1
    a, b = load_file(tmp_path / "start" / "adapter.safetensors"), load_file(tmp_path / "out" / "adapter.safetensors")
    moved = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert 0 < moved < 0.015, moved  # one Adam step from the given weights, not a fresh init
    # the folder says what its weights saw in all: this run's step plus the start adapter's own totals
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["trained_samples"] == 1 and summary["trained_tokens"] > 0
    assert summary["warm_start"] == {"adapter": f"{tmp_path}/start", "steps": 5, "trained_samples": 40,
                                     "trained_tokens": 9000, "hardware": before["hardware"], "total_samples": 100,
                                     "total_tokens": 20000, "warm_start": {"adapter": "older"}}  # its own start too
    assert summary["total_samples"] == 101 and summary["total_tokens"] == summary["trained_tokens"] + 20000


def test_warm_start_totals_from_a_checkpoint_read_its_trainer_state(tmp_path):
    """A start that is a training checkpoint (no train_summary.json) counts the history its trainer state was saved
    with: samples from the rows that have them, its config's global batch for older rows."""
    from ccmem.recipe import with_warm_start

    ck = tmp_path / "run" / "checkpoints" / "step_000002"
    ck.mkdir(parents=True)
    rows = [{"step": 1, "seconds": 3600.0, "tokens_per_s": 2.0},  # before the log kept samples: the config's batch
            {"step": 2, "seconds": 1800.0, "samples": 5, "tokens": 70, "hardware": "gpu"}]
    torch.save({"step": 2, "config": {"batch_size": 2, "grad_accum": 3}, "history": rows}, ck / "trainer_state.pt")
    own = {"trained_samples": 8, "trained_tokens": 100, "hardware": {"cpu": {"steps": 1, "hours": 0.1}}}
    out = with_warm_start(own, str(ck))
    assert out["warm_start"] == {"adapter": str(ck), "steps": 2, "trained_samples": 6 + 5, "trained_tokens": 7200 + 70,
                                 "hardware": {"unrecorded": {"steps": 1, "hours": 1.0},
                                              "gpu": {"steps": 1, "hours": 0.5}}}
    assert (out["total_samples"], out["total_tokens"]) == (19, 7370)
    assert with_warm_start(own, None) == own
    # that run was itself warm-started (its run folder's recipe.yaml says from what): its start's totals count too
    first = tmp_path / "first"
    first.mkdir()
    (first / "train_summary.json").write_text(json.dumps({"trained_samples": 40, "trained_tokens": 9000,
                                                          "total_samples": 100, "total_tokens": 20000}))
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump({"init_adapter": str(first)}))
    out = with_warm_start(own, str(ck))
    assert out["warm_start"]["total_samples"] == 11 + 100 and out["warm_start"]["total_tokens"] == 7270 + 20000
    assert (out["total_samples"], out["total_tokens"]) == (8 + 11 + 100, 100 + 7270 + 20000)
    assert out["warm_start"]["warm_start"]["adapter"] == str(first)  # the chain of starts, named
    # an ancestor that is gone or unreadable is marked unknown, not dropped; a cycle is counted once
    for recipe, why in ((f"init_adapter: {tmp_path / 'gone'}\n", "no train_summary"), ("[not, a, mapping]\n", None),
                        (f"init_adapter: {ck}\n", "cycle")):
        (tmp_path / "run" / "recipe.yaml").write_text(recipe)
        out = with_warm_start(own, str(ck))
        assert out["warm_start"]["trained_samples"] == 11 and out["total_samples"] == 8 + 11
        assert why is None or why in out["warm_start"]["warm_start"]["totals"]
    (tmp_path / "run" / "recipe.yaml").write_text(f"init_adapter: {first}\n")
    (first / "train_summary.json").write_text("{damaged")  # an unreadable start: its error named, the run's kept
    out = with_warm_start(own, str(ck))
    assert "JSONDecodeError" in out["warm_start"]["warm_start"]["totals"] and out["total_samples"] == 8 + 11


def test_warm_start_totals_of_the_general_chat_start():
    """The committed start of configs/general_chat.yaml (general-concat's step-900 checkpoint, batch 1 x 8) read
    from its trainer state: 900 steps x 8 episodes."""
    from ccmem.recipe import load_recipe, with_warm_start

    init = load_recipe("configs/general_chat.yaml")["init_adapter"]
    start = with_warm_start({"trained_samples": 0, "trained_tokens": 0}, init)["warm_start"]
    assert start["steps"] == 900 and start["trained_samples"] == 7200 and start["trained_tokens"] > 1_000_000


def test_plays_recipe_adds_the_training_plays_to_the_general_mix(tmp_path, tiny_folder):
    """configs/general_chat_plays.yaml: general_chat.yaml's mix and compression plus Shakespeare's training plays,
    warm-started from the general adapter; its script part trains end to end through `ccmem train`."""
    from ccmem.recipe import load_recipe

    plays, plain = load_recipe("configs/general_chat_plays.yaml"), load_recipe("configs/general_chat.yaml")
    assert plays["compression"] == plain["compression"] and plays["init_adapter"] == "adapters/general-chat"
    extra = [p for p in plays["data"]["parts"] if p not in plain["data"]["parts"]]
    assert [p["source"] for p in extra] == ["script"] and extra[0]["name"] == "shakespeare"
    assert len(plays["data"]["parts"]) == len(plain["data"]["parts"]) + 1
    assert main(["train", "configs/general_chat_plays.yaml", f"model={tiny_folder}", "train.grad_accum=1",
                 "train.max_steps=2", "train.warmup_ratio=0", "train.mixed_precision=no", "init_adapter=null",
                 "data={source: script, name: shakespeare, format: template, eval_dialogs: 2}",  # one part: fast
                 f"train.output_dir={tmp_path}/run", f"output={tmp_path}/out", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["data_report"]["train runs of >= 3 turns"] > 2000
    assert summary["validation_dialogs"] == 2


def test_weighted_part_reads_its_source_weight_times_an_epoch():
    """A part's ``weight`` changes its share of the mix, not its data: weight 2 reads every item twice an epoch
    (under two of the source's epochs), weight 0.5 half of them, the rest in the next epoch, in shuffled order."""
    from ccmem.data import Weighted
    from ccmem.errors import ConfigError
    from ccmem.models import load_tokenizer
    from ccmem.recipe import build_data, recipe_parts

    class Src:
        def __len__(self) -> int:
            return 10

        def get(self, i: int, epoch: int = 0) -> tuple[int, int]:
            return i, epoch

    twice = Weighted(Src(), 2)
    assert len(twice) == 20 and sorted(twice.get(i) for i in range(20)) == [(i, e) for i in range(10) for e in (0, 1)]
    assert sorted(twice.get(i, 1) for i in range(20)) == [(i, e) for i in range(10) for e in (2, 3)]
    half = Weighted(Src(), 0.5)
    first, second = ([half.get(i, e) for i in range(5)] for e in (0, 1))
    assert sorted(first + second) == [(i, 0) for i in range(10)] and first != [(i, 0) for i in range(5)]
    assert [Weighted(Src(), 0.5, seed=1).get(i) for i in range(5)] != first  # the recipe's seed orders it
    for bad in (0, -1, True, "2", float("inf")):
        with pytest.raises(ValueError, match="number > 0"):
            Weighted(Src(), bad)

    tok = load_tokenizer()
    icl = {"source": "icl", "train_episodes": 40, "eval_episodes": 2}
    train, val, report = build_data(tok, {"source": "mix", "parts": [icl, {**icl, "weight": 1.5}]}, seed=0)
    assert len(train) == 40 + 60 and train.names == ["icl#1", "icl#2"]
    assert report["icl#2: weight (episodes an epoch / its episodes)"] == 1.5
    assert len(val) == 4
    with pytest.raises(ConfigError, match="data part text: a part's weight must be a finite number > 0"):
        build_data(tok, {"source": "mix", "parts": [{"source": "text", "weight": 0}]}, seed=0)
    with pytest.raises(ConfigError, match="each of data.parts"):
        build_data(tok, {"source": "mix", "parts": ["chitchat"]}, seed=0)
    with pytest.raises(ConfigError, match=r"data.weight \(2\) weighs one part of a mix.*drop it"):
        build_data(tok, {**icl, "weight": 2}, seed=0)  # outside a mix it would be silently ignored
    mix = {"source": "mix", "parts": [icl, {**icl, "weight": 1.5}]}
    alone = [build_data(tok, p, seed=0)[0] for p in recipe_parts(mix)]  # as the probe reads a mix's parts
    assert [len(a) for a in alone] == [40, 40]


def test_the_command_prints_a_user_error_as_one_line(tmp_path, monkeypatch, capsys):
    """`ccmem train` on a recipe that is not there, or that misspells a key: one line naming the problem, exit status
    2; with CCMEM_DEBUG=1 the exception itself, for its traceback; an error that may be a bug keeps its traceback."""
    from ccmem.cli import console
    from ccmem.errors import ConfigError

    missing = tmp_path / "nope.yaml"
    monkeypatch.delenv("CCMEM_DEBUG", raising=False)
    assert console(["train", str(missing)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("ccmem: error: FileNotFoundError") and str(missing) in err[0]
    for text, why in (("train: {max_step: 3}\n", "unknown key(s) ['max_step'] in train"),
                      ("train: [1, 2\n", "not valid YAML"), ("- a list\n", "must be a mapping")):
        (tmp_path / "bad.yaml").write_text(text)
        assert console(["train", str(tmp_path / "bad.yaml")]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and why in err[0], err
    (tmp_path / "ok.yaml").write_text("train: {max_steps: 3}\n")
    assert console(["train", str(tmp_path / "ok.yaml"), "train.lr=[1"]) == 2  # an override that is not YAML
    assert "train.lr=[1" in capsys.readouterr().err
    monkeypatch.setenv("CCMEM_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        console(["train", str(missing)])
    monkeypatch.setenv("CCMEM_DEBUG", "0")
    assert console(["train", str(missing)]) == 2 and "FileNotFoundError" in capsys.readouterr().err
    monkeypatch.setattr("ccmem.cli.main", lambda argv: int("not a number"))  # not a user's error: raised as it is
    with pytest.raises(ValueError):
        console(["train", str(missing)])
    monkeypatch.setattr("ccmem.cli.main", lambda argv: (_ for _ in ()).throw(ConfigError("fix it so")))
    assert console([]) == 2 and capsys.readouterr().err == "ccmem: error: fix it so\n"


def test_run_record_keeps_the_runs_start_and_first_time_limit():
    """A resume's record: the run's own ``init_adapter`` (even none) and first sitting's ``train.max_minutes`` stay;
    anything else is the new recipe's; no record (a first sitting) or an unreadable one is the recipe as given."""
    from ccmem.recipe import run_record

    cfg = {"init_adapter": "b", "train": {"max_minutes": 9, "max_steps": 20}, "output": "o2"}
    assert run_record(cfg, None) == cfg and run_record(cfg, None) is not cfg
    assert run_record(cfg, ["not", "a", "mapping"]) == cfg
    prev = {"init_adapter": "a", "train": {"max_minutes": 55, "max_steps": 10}, "output": "o1"}
    assert run_record(cfg, prev) == {"init_adapter": "a", "train": {"max_minutes": 55, "max_steps": 20}, "output": "o2"}
    fresh = run_record(cfg, {"train": {"max_steps": 10}})  # started fresh, with no time limit: it stays so
    assert fresh["init_adapter"] is None and "max_minutes" not in fresh["train"]
    merge = run_record({**cfg, "init_across_variants": False}, {**prev, "init_across_variants": True})
    assert (merge["init_adapter"], merge["init_across_variants"]) == ("a", True)  # the start, read as it was
    assert cfg["init_adapter"] == "b" and cfg["train"]["max_minutes"] == 9  # the recipe itself untouched


def test_a_larger_lora_grows_from_a_smaller_adapter_computing_the_same_function(tmp_path, tiny_folder):
    """``grow``: a rank-16 LoRA on attention + MLP (another alpha / r scale) takes a rank-8 attention adapter and
    reads a session exactly as the adapter does; without it the adapter is refused with nothing changed (and a
    recipe's refusal names ``init_grow``); a smaller model than the adapter, or one with a gate it lacks, is refused."""
    from ccmem import CompressionConfig
    from ccmem.errors import IncompatibleError

    mlp = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def attach(seed: int, **kw) -> CompressedModel:
        ccm = CompressedModel.attach(load_model(str(tiny_folder))[0], CompressionConfig(
            n_tok=2, sink=True, lora_dropout=0.0, **{"memory_gate": -4.0, **kw}))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in ccm.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        ccm.model.eval()
        return ccm

    def read(ccm: CompressedModel) -> torch.Tensor:
        s = ccm.session()
        for chunk in ([5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]):
            s.add_context([chunk])
        return s.logits([[20, 21, 22]])[0]

    small = attach(0)
    small.save_pretrained(tmp_path / "small")
    big = attach(1, lora_r=16, lora_alpha=16.0, target_modules=mlp)
    before = {k: v.detach().clone() for k, v in big.trainable_named_parameters().items()}
    with pytest.raises(IncompatibleError):
        big.load_adapter(tmp_path / "small")
    assert all(torch.equal(before[k], v) for k, v in big.trainable_named_parameters().items())
    big.load_adapter(tmp_path / "small", grow=True)
    want = read(small)
    assert torch.allclose(read(big), want, atol=1e-5), float((read(big) - want).abs().max())
    assert not torch.allclose(read(attach(2)), want, atol=1e-3)  # the comparison can tell adapters apart
    got = big.trainable_named_parameters()
    new_a = [k for k in got if k.endswith(".A") and "mlp" in k]
    assert new_a and all(torch.equal(got[k], before[k]) for k in new_a)  # new directions start at the model's own
    big.save_pretrained(tmp_path / "big")
    with pytest.raises(IncompatibleError, match="rank 16 is above this model's 8"):
        attach(3, target_modules=mlp).load_adapter(tmp_path / "big", grow=True)
    with pytest.raises(IncompatibleError, match="no gate"):
        nogate = attach(4, memory_gate=None)
        nogate.save_pretrained(tmp_path / "nogate")
        attach(5, lora_r=16).load_adapter(tmp_path / "nogate", grow=True)
    import ccmem.recipe

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ccmem.recipe, "build_data", lambda *a: pytest.fail("data built before the refusal"))
        with pytest.raises(IncompatibleError, match="init_grow: true"):
            main(["train", "configs/general_chat.yaml", f"model={tiny_folder}", "compression.lora_r=16",
                  f"init_adapter={tmp_path / 'small'}", f"train.output_dir={tmp_path}/run", "--device", "cpu"])
    # the capacity pair's grown branch (scripts/capacity_pair.sh), end to end: one step from the grown weights
    assert main(["train", "configs/general_chat_capacity.yaml", f"model={tiny_folder}", "train.grad_accum=1",
                 "train.max_steps=1", "train.warmup_ratio=0", "train.mixed_precision=no", "compression.lora_r=16",
                 "compression.lora_alpha=32", f"compression.target_modules=[{', '.join(mlp)}]", "init_grow=true",
                 "data={source: recall, format: template, split_seed: 0, eval_episodes: 2, facts: 3}",
                 f"train.output_dir={tmp_path}/grow-run", f"init_adapter={tmp_path / 'small'}",
                 f"output={tmp_path}/grow-out", "--device", "cpu"]) == 0
    out = json.loads((tmp_path / "grow-out" / "adapter_config.json").read_text())["compression"]
    assert (out["lora_r"], out["target_modules"]) == (16, list(mlp))
    assert yaml.safe_load((tmp_path / "grow-out" / "recipe.yaml").read_text())["init_grow"] is True


def test_a_merge_run_warm_starts_from_a_concat_adapter_only_when_asked(tmp_path, tiny_folder):
    """``init_across_variants``: a merge model takes a concat adapter's LoRA, gates and ⟨COMP⟩ rows, keeping its own
    SUM rows (and back: a concat model takes a merge adapter's ⟨COMP⟩ rows); without it the other variant is refused
    with nothing changed, and a recipe's refusal names the key; n_tok must still agree."""
    from ccmem import CompressionConfig
    from ccmem.errors import IncompatibleError

    def attach(variant: str, seed: int, n_tok: int = 2) -> CompressedModel:
        ccm = CompressedModel.attach(load_model(str(tiny_folder))[0], CompressionConfig(
            variant=variant, n_tok=n_tok, sink=True, memory_gate=-4.0))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in ccm.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return ccm

    concat = attach("concat_recur", 0)
    concat.save_pretrained(tmp_path / "concat")
    merge = attach("merge_recur", 1)
    before = {k: v.detach().clone() for k, v in merge.trainable_named_parameters().items()}
    with pytest.raises(IncompatibleError, match="variant"):
        merge.load_adapter(tmp_path / "concat")
    assert all(torch.equal(before[k], v) for k, v in merge.trainable_named_parameters().items())
    merge.load_adapter(tmp_path / "concat", across_variants=True)
    got, src = merge.trainable_named_parameters(), concat.trainable_named_parameters()
    assert got.keys() == src.keys()
    for k in src:
        if k == "comp_embedding":  # 2 ⟨COMP⟩ rows from the concat adapter, the 2 SUM rows the merge model's own
            assert torch.equal(got[k][:2], src[k]) and torch.equal(got[k][2:], before[k][2:])
        else:
            assert torch.equal(got[k], src[k]), k
    merge.save_pretrained(tmp_path / "merge")
    back = attach("concat_recur", 2)
    back.load_adapter(tmp_path / "merge", across_variants=True)
    assert torch.equal(back.trainable_named_parameters()["comp_embedding"], got["comp_embedding"][:2])
    gist = attach("gist", 4)  # the Gisting branch (configs/general_gist_decay.yaml): every weight carries over
    gist.load_adapter(tmp_path / "concat", across_variants=True)
    assert all(torch.equal(v, src[k]) for k, v in gist.trainable_named_parameters().items())
    for n_tok in (1, 3):  # fewer or more rows than the file's: refused as another config, never a shape error
        with pytest.raises(IncompatibleError, match="n_tok"):
            attach("merge_recur", 3, n_tok=n_tok).load_adapter(tmp_path / "concat", across_variants=True)
    import ccmem.recipe

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ccmem.recipe, "build_data", lambda *a: pytest.fail("data built before the refusal"))
        with pytest.raises(IncompatibleError, match="init_across_variants: true"):
            main(["train", "configs/general_chat.yaml", f"model={tiny_folder}", "compression.variant=merge_recur",
                  f"init_adapter={tmp_path / 'concat'}", f"train.output_dir={tmp_path}/run", "--device", "cpu"])
    # the shipped merge branch's recipe, end to end from that concat adapter: one step from its weights
    from safetensors.torch import load_file

    assert main(["train", "configs/general_merge_decay.yaml", f"model={tiny_folder}", "train.grad_accum=1",
                 "train.max_steps=1", "train.warmup_ratio=0", "train.mixed_precision=no",
                 "data={source: recall, format: template, split_seed: 0, eval_episodes: 2, facts: 3}",
                 f"train.output_dir={tmp_path}/merge-run", f"init_adapter={tmp_path / 'concat'}",
                 f"output={tmp_path}/merge-out", "--device", "cpu"]) == 0
    a, b = load_file(tmp_path / "concat" / "adapter.safetensors"), load_file(tmp_path / "merge-out" /
                                                                             "adapter.safetensors")
    moved = max(float((a[k].float() - b[k].float()[:len(a[k])]).abs().max()) for k in a)
    assert 0 < moved < 0.015, moved  # one Adam step from the concat weights (the ⟨COMP⟩ rows among them)
    assert json.loads((tmp_path / "merge-out" / "adapter_config.json").read_text())["compression"]["variant"] == \
        "merge_recur"


def test_a_run_cannot_start_from_its_own_checkpoints(tmp_path, tiny_folder, monkeypatch):
    """init_adapter inside the run's own output_dir would count the checkpoint's steps twice (the run resumes it and
    its lineage adds it again): refused before the model loads, naming the fix."""
    import ccmem.recipe
    from ccmem.errors import ConfigError

    monkeypatch.setattr(ccmem.recipe, "prepare_model", lambda *a, **k: pytest.fail("model loaded before the refusal"))
    with pytest.raises(ConfigError, match="one of this run's own checkpoints.*drop init_adapter"):
        main(["train", "configs/general_chat.yaml", f"model={tiny_folder}", f"train.output_dir={tmp_path}/run",
              f"init_adapter={tmp_path}/run/checkpoints/step_000010", "--device", "cpu"])
