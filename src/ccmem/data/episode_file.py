"""Training data as one file of token ids: a recipe's episodes built once, for a fixed number of epochs, and read
back anywhere.

Building a recipe's data needs its sources (the chit-chat corpus, GeoNames, WordNet, ...) and a few CPU minutes; a
machine lent for minutes (a GPU) has neither. ``ccmem data export`` writes what the trainer would draw, episode i of
epoch e for every (i, e), into one safetensors file (optionally xz-compressed); ``data.source: episodes`` trains from
it and sees exactly the episodes the live sources give, so a run resumed from the file continues the same data order.
Only what training reads is kept: context chunks, input and output (no multiple-choice options).
"""

from __future__ import annotations

import json
import lzma
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptFileError, InputError
from .episode import Episode

FORMAT = "ccmem-episodes"
VERSION = 1


def _flatten(episodes: Sequence[Episode]) -> tuple[list[int], list[int], list[int]]:
    """(tokens, segment lengths, segments per episode): an episode is its chunks, then its input, then its output."""
    tokens: list[int] = []
    seg_len: list[int] = []
    n_seg: list[int] = []
    for e in episodes:
        segs = [*e.chunks, e.input, e.output]
        for s in segs:
            tokens += s
            seg_len.append(len(s))
        n_seg.append(len(segs))
    return tokens, seg_len, n_seg


def write_episodes(path: str | Path, train: Any, val: Sequence[Episode], epochs: int, meta: dict[str, Any],
                   progress: bool = True) -> Path:
    """Write ``train.get(i, e)`` for every i < len(train), e < epochs, and the validation episodes, to ``path``
    (``.safetensors``, or ``.safetensors.xz`` compressed). ``meta`` (JSON-able) is stored beside them."""
    from safetensors.numpy import save

    from ..training import Source

    if epochs < 1:
        raise ValueError("epochs must be at least 1")
    src, n = Source(train), len(train)
    order = [(i, e) for e in range(epochs) for i in range(n)]
    if progress:
        from tqdm.auto import tqdm

        order = tqdm(order, desc="export episodes", unit="ep")
    tr = _flatten([src.get(i, e) for i, e in order])
    va = _flatten(list(val))
    top = max(max(tr[0], default=0), max(va[0], default=0))
    dtype = np.uint16 if top < 2 ** 16 else np.int32
    arrays = {"tokens": np.asarray(tr[0], dtype=dtype), "seg_len": np.asarray(tr[1], dtype=np.int32),
              "n_seg": np.asarray(tr[2], dtype=np.int32), "val_tokens": np.asarray(va[0], dtype=dtype),
              "val_seg_len": np.asarray(va[1], dtype=np.int32), "val_n_seg": np.asarray(va[2], dtype=np.int32)}
    header = {"format": FORMAT, "version": str(VERSION), "size": str(n), "epochs": str(epochs),
              "meta": json.dumps(meta, sort_keys=True)}
    if hasattr(train, "names") and hasattr(train, "starts"):  # a mixture: its parts, for the per-part training log
        header["parts"] = json.dumps({"names": list(train.names), "starts": list(train.starts)})
    blob = save(arrays, metadata=header)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(lzma.compress(blob, preset=9) if path.name.endswith(".xz") else blob)
    tmp.replace(path)
    return path


class EpisodeFile:
    """An exported episode file as a training source: ``get(i, epoch)`` is the episode the recipe's live sources
    gave for (i, epoch). Epochs past the exported ones wrap around, with a warning."""

    def __init__(self, path: str | Path):
        from safetensors import SafetensorError
        from safetensors.numpy import load

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such episode file; write one with `ccmem data export RECIPE -o FILE`")
        blob = self.path.read_bytes()
        try:
            if self.path.name.endswith(".xz"):
                blob = lzma.decompress(blob)
            arrays = load(blob)
            header = _header(blob)
        except (lzma.LZMAError, SafetensorError, ValueError, EOFError) as err:
            raise CorruptFileError(f"{self.path}: not a readable episode file ({err}); it may be truncated; export it "
                                   "again with `ccmem data export`") from err
        if header.get("format") != FORMAT or int(header.get("version", 0)) > VERSION:
            raise InputError(f"{self.path}: not a ccmem episode file of version <= {VERSION} "
                             f"(format {header.get('format')!r}, version {header.get('version')!r})")
        try:
            train = _Table(arrays["tokens"], arrays["seg_len"], arrays["n_seg"])
            val = _Table(arrays["val_tokens"], arrays["val_seg_len"], arrays["val_n_seg"])
        except (KeyError, ValueError) as err:
            raise CorruptFileError(f"{self.path}: its episode tables do not fit together ({err!r}); export it again "
                                   "with `ccmem data export`") from err
        self.size, self.epochs = int(header["size"]), int(header["epochs"])
        self.meta: dict[str, Any] = json.loads(header.get("meta", "{}"))
        self._train = train
        if len(self._train) != self.size * self.epochs:
            raise CorruptFileError(f"{self.path}: holds {len(self._train)} episodes, its header says "
                             f"{self.size} x {self.epochs} epochs; export it again")
        self.val = [val.episode(j, f"val:{j}") for j in range(len(val))]
        self._warned = False
        if "parts" in header:  # exported from a mixture: its part names and where each starts, as a Mixture has
            try:
                parts = json.loads(header["parts"])
                self.names, self.starts = [str(x) for x in parts["names"]], [int(x) for x in parts["starts"]]
                ok = (len(self.starts) == len(self.names) + 1 and self.starts[0] == 0
                      and self.starts[-1] == self.size and self.starts == sorted(self.starts)
                      and len(set(self.names)) == len(self.names))
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise CorruptFileError(f"{self.path}: its mixture parts {header['parts'][:200]!r} do not fit its "
                                       f"{self.size} episodes; export it again with `ccmem data export`")

    def __len__(self) -> int:
        return self.size

    def get(self, i: int, epoch: int = 0) -> Episode:
        if epoch >= self.epochs and not self._warned:
            warnings.warn(f"{self.path} holds {self.epochs} epochs; epoch {epoch} repeats epoch "
                          f"{epoch % self.epochs} (export more epochs to train on fresh cuts)", stacklevel=2)
            self._warned = True
        return self._train.episode((epoch % self.epochs) * self.size + i, f"{epoch}:{i}")


class _Table:
    """Flat token ids cut into segments, segments grouped into episodes."""

    def __init__(self, tokens: np.ndarray, seg_len: np.ndarray, n_seg: np.ndarray):
        self.tokens = tokens
        self.seg_start = np.concatenate([[0], np.cumsum(seg_len, dtype=np.int64)])
        self.ep_start = np.concatenate([[0], np.cumsum(n_seg, dtype=np.int64)])
        if self.seg_start[-1] != len(tokens) or self.ep_start[-1] != len(seg_len):
            raise ValueError("segment lengths do not add up to the token count")

    def __len__(self) -> int:
        return len(self.ep_start) - 1

    def episode(self, k: int, id_: str) -> Episode:
        a, b = int(self.ep_start[k]), int(self.ep_start[k + 1])
        segs = [self.tokens[self.seg_start[s]:self.seg_start[s + 1]].tolist() for s in range(a, b)]
        return Episode(segs[:-2], segs[-2], segs[-1], id=id_)


def _header(blob: bytes) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (the format stores an 8-byte length, then the JSON header)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]).get("__metadata__", {})
