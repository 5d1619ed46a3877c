"""Exported training data (`ccmem data export`, `data.source: episodes`): the file gives exactly the episodes the
recipe's live sources give for every (index, epoch), trains exactly like them, and bad files are refused clearly."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from ccmem.cli import main
from ccmem.data import Episode, EpisodeFile, write_episodes
from ccmem.errors import ConfigError, CorruptFileError, InputError


class _Source:
    """Episodes that depend on (index, epoch), with token ids above 2**16 when ``big``."""

    def __init__(self, n: int, big: bool = False):
        self.n, self.big = n, big

    def __len__(self) -> int:
        return self.n

    def get(self, i: int, epoch: int = 0) -> Episode:
        g = torch.Generator().manual_seed(1000 * epoch + i)
        top = 70_000 if self.big else 500
        chunks = [torch.randint(0, top, (int(torch.randint(0, 9, (1,), generator=g)),), generator=g).tolist()
                  for _ in range(1 + (i + epoch) % 4)]
        return Episode(chunks, [i, epoch], torch.randint(0, top, (3,), generator=g).tolist())


@pytest.mark.parametrize("name,big", [("eps.safetensors", False), ("eps.safetensors.xz", False),
                                      ("eps.safetensors", True)])
def test_file_gives_the_sources_episodes(tmp_path, name, big):
    src = _Source(13, big)
    val = [src.get(i, 9) for i in range(3)]
    path = write_episodes(tmp_path / name, src, val, epochs=2, meta={"vocab": 7}, progress=False)
    f = EpisodeFile(path)
    assert len(f) == 13 and f.epochs == 2 and f.meta == {"vocab": 7}
    for e in range(2):
        for i in range(13):
            got, want = f.get(i, e), src.get(i, e)
            assert (got.chunks, got.input, got.output) == (want.chunks, want.input, want.output)
    assert [(v.chunks, v.input, v.output) for v in f.val] == [(v.chunks, v.input, v.output) for v in val]
    with pytest.warns(UserWarning, match="repeats epoch 0"):
        assert f.get(4, 2).chunks == src.get(4, 0).chunks


def test_bad_files_are_refused(tmp_path):
    path = write_episodes(tmp_path / "eps.safetensors.xz", _Source(5), [], epochs=1, meta={}, progress=False)
    with pytest.raises(InputError, match="no such episode file"):
        EpisodeFile(tmp_path / "missing.safetensors")
    cut = tmp_path / "cut.safetensors.xz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match="truncated"):
        EpisodeFile(cut)
    other = tmp_path / "other.safetensors"
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, dtype=np.int32)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(InputError, match="not a ccmem episode file"):
        EpisodeFile(other)
    assert not hasattr(EpisodeFile(path), "names")  # not exported from a mixture: no parts

    class Parts(_Source):  # a mixture whose part table does not cover its episodes
        names, starts = ["a", "b"], [0, 2, 9]

    bad = write_episodes(tmp_path / "parts.safetensors", Parts(5), [], epochs=1, meta={}, progress=False)
    with pytest.raises(CorruptFileError, match="mixture parts .* do not fit its 5 episodes"):
        EpisodeFile(bad)



def test_training_from_the_file_equals_training_from_the_sources(tmp_path, tiny_folder):
    """The same recipe (a mix of two dialog files) trained on its live sources and on their export: identical
    losses step by step, each part's too, across an epoch boundary (dialogs are cut differently in each epoch)."""
    rows = [{"id": f"d{i}", "turns": [f"hello {i}", f"hi there {i}", f"how are you {i}", "fine", f"bye {i}"]}
            for i in range(12)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    parts = [{"source": "jsonl", "path": str(tmp_path / n), "eval_fraction": 0.2} for n in ("d.jsonl", "e.jsonl")]
    recipe = {"model": str(tiny_folder), "data": {"source": "mix", "parts": parts},
              "compression": {"variant": "concat_recur", "n_tok": 1},
              "train": {"max_steps": 4, "batch_size": 4, "mixed_precision": "no", "eval_batches": 1}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "eps.safetensors.xz"
    assert main(["data", "export", str(tmp_path / "recipe.yaml"), "-o", str(out), "--epochs", "3"]) == 0
    f = EpisodeFile(out)
    assert f.meta["data"]["source"] == "mix" and f.epochs == 3 and len(f.val) >= 1
    assert f.names == [f"jsonl:{tmp_path}/d.jsonl", f"jsonl:{tmp_path}/e.jsonl"]
    assert f.starts[0] == 0 < f.starts[1] < f.starts[2] == len(f)

    def train(name: str, *extra: str) -> list[tuple]:
        assert main(["train", str(tmp_path / "recipe.yaml"), f"train.output_dir={tmp_path}/{name}",
                     f"output={tmp_path}/{name}/adapter", *extra, "--device", "cpu"]) == 0
        log = [json.loads(r) for r in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        return [(r["loss"], r["part_loss"], r["part_tokens"]) for r in log]

    live = train("live")
    assert len(f) * 1 < 4 * 4  # the 4 steps of 4 episodes cross an epoch boundary
    assert train("file", "data.source=episodes", f"data.path={out}") == live
    assert {k for _, p, _ in live for k in p} == set(f.names)

    from ccmem.recipe import build_data

    class Tok:  # a tokenizer of another vocabulary
        vocab_size = 3

        def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
            return ["a", "b", "c"][: len(ids)]

    with pytest.raises(ConfigError, match="export it again with this model"):
        build_data(Tok(), {"source": "episodes", "path": str(out)}, 42)
    from transformers import AutoTokenizer

    with pytest.raises(ConfigError, match="export again with train.seed=7"):  # other cuts than the live sources'
        build_data(AutoTokenizer.from_pretrained(tiny_folder), {"source": "episodes", "path": str(out)}, 7)


def test_resume_drops_log_rows_after_the_checkpoint(tmp_path, tiny_folder):
    """A run killed after its last checkpoint has logged steps it will redo; the resumed run's log holds each step
    once, from the checkpoint's history."""
    rows = [{"id": f"d{i}", "turns": [f"hello {i}", f"hi {i}", f"how are you {i}", "fine"]} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"model": str(tiny_folder), "data": {"source": "jsonl", "path": str(tmp_path / "d.jsonl")},
              "compression": {"variant": "concat_recur", "n_tok": 1},
              "train": {"batch_size": 2, "mixed_precision": "no", "save_every": 2, "eval_batches": 1,
                        "output_dir": str(tmp_path / "run")}, "output": str(tmp_path / "adapter")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    log = tmp_path / "run" / "train_log.jsonl"
    assert main(["train", str(tmp_path / "recipe.yaml"), "train.max_steps=2", "--device", "cpu"]) == 0
    with log.open("a") as f:  # what a run killed during step 3, after logging it, leaves behind
        f.write(json.dumps({"step": 3, "loss": -1.0}) + "\n")
    assert main(["train", str(tmp_path / "recipe.yaml"), "train.max_steps=3", "--device", "cpu"]) == 0
    got = [json.loads(r) for r in log.read_text().splitlines()]
    assert [r["step"] for r in got] == [1, 2, 3] and got[-1]["loss"] > 0


def test_gpu_pack_exports_again_when_the_file_is_stale(tmp_path, monkeypatch):
    """scripts/gpu_pack.py reuses an earlier export only if it holds the recipe's data section and seed and, for a
    mix, the parts table the per-part training log needs."""
    import sys
    from pathlib import Path

    from ccmem.data import Mixture

    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
    import gpu_pack

    data = {"source": "mix", "parts": [{"source": "jsonl", "path": "a"}, {"source": "jsonl", "path": "b"}]}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": data, "train": {"seed": 5}}))
    monkeypatch.setattr(gpu_pack, "RECIPE", str(recipe))
    from ccmem.recipe import load_recipe

    data = load_recipe(recipe)["data"]  # as `ccmem data export` records it (the recipe over the defaults)
    out = tmp_path / "eps.safetensors"
    assert not gpu_pack._export_is_current(out)  # none yet
    mix = Mixture([_Source(3), _Source(2)], names=["jsonl:a", "jsonl:b"])
    write_episodes(out, mix, [], 1, {"data": data, "seed": 5}, progress=False)
    assert gpu_pack._export_is_current(out)
    write_episodes(out, _Source(5), [], 1, {"data": data, "seed": 5}, progress=False)  # an export without parts
    assert not gpu_pack._export_is_current(out)
    write_episodes(out, mix, [], 1, {"data": data, "seed": 6}, progress=False)
    assert not gpu_pack._export_is_current(out)
    write_episodes(out, mix, [], 1, {"data": {**data, "parts": data["parts"][:1]}, "seed": 5}, progress=False)
    assert not gpu_pack._export_is_current(out)
    out.write_bytes(b"not an episode file")
    assert not gpu_pack._export_is_current(out)
