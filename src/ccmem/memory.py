"""The compressed context memory: per-layer ⟨COMP⟩ keys/values, plus the sink slot and position offset.

Layout along the slot axis: ``[sink (optional) | slots]``. Concat variants append n slots per step; merge variants
keep n slots holding the running mean of h(1..t). Each batch row has its own valid-slot mask, step count and
position offset (the number of text tokens it has compressed), so rows may receive different numbers of chunks.
With ``raw_tail=k`` the newest k chunks of each row wait, as token ids, in ``tail``; they are read as raw text in
front of every input (their keys/values are recomputed on top of the current memory, which is what the parallel
layout computes) and compressed when they leave the tail.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from . import io
from .config import CompressionConfig
from .errors import CorruptFileError, IncompatibleError
from .merging import running_mean


def bytes_per_slot(model: Any) -> int:
    """Key + value bytes of one token slot across all layers of ``model`` in its weights' dtype."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * model.get_input_embeddings().weight.element_size()


@dataclass
class CompressedMemory:
    keys: list[torch.Tensor]  # per layer (B, H_kv, M, D), RoPE already applied
    values: list[torch.Tensor]
    valid: torch.Tensor  # (B, M) bool
    offset: torch.Tensor  # (B,) text tokens processed so far
    steps: torch.Tensor  # (B,) chunks compressed so far
    has_sink: bool
    config: CompressionConfig
    fingerprint: dict[str, Any]
    tail: list[list[list[int]]] = field(default_factory=list)  # per row, the raw chunks not yet compressed
    cache_dtype: torch.dtype | None = None  # the model's dtype when the slots are held in fp32 (merge in bf16/fp16)
    raw: torch.Tensor | None = None  # (M,) bool: slots written by add_raw (verbatim tokens, never gated)
    # the adapter that last compressed into it (CompressedModel.adapter_id); None while it holds no compressed slot
    # (verbatim tokens are the base model's) and in files older than the field
    adapter: str | None = None

    def __post_init__(self) -> None:
        if not self.tail:
            self.tail = [[] for _ in range(self.valid.shape[0])]
        if self.raw is None:
            self.raw = torch.zeros(self.valid.shape[1], dtype=torch.bool, device=self.valid.device)

    @classmethod
    def empty(cls, batch_size: int, fingerprint: dict[str, Any], config: CompressionConfig,
              dtype: torch.dtype, device: torch.device) -> CompressedMemory:
        f = fingerprint
        shape = (batch_size, f["num_key_value_heads"], 0, f["head_dim"])
        layers = f["num_hidden_layers"]
        # a merge memory is a running mean: held in fp32, it does not drift from the parallel form step after step
        low = config.merging and dtype in (torch.bfloat16, torch.float16)
        cache_dtype, dtype = (dtype, torch.float32) if low else (None, dtype)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
            offset=torch.zeros(batch_size, dtype=torch.long, device=device),
            steps=torch.zeros(batch_size, dtype=torch.long, device=device),
            has_sink=False,
            config=config,
            fingerprint=dict(fingerprint),
            cache_dtype=cache_dtype,
        )

    # ---------------------------------------------------------------- size
    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def num_slots(self) -> int:
        """Key/value slots held per row (including the sink), the memory's length in tokens."""
        return self.valid.shape[1]

    def slots_per_row(self) -> list[int]:
        return self.valid.sum(-1).tolist()

    @property
    def nbytes(self) -> int:
        """Bytes of all key/value tensors held."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def tail_tokens(self) -> list[int]:
        """Raw tail tokens per row (read uncompressed in front of every input)."""
        return [sum(len(c) for c in row) for row in self.tail]

    def tail_ids(self, b: int) -> list[int]:
        return [t for c in self.tail[b] for t in c]

    @property
    def kv_bytes(self) -> int:
        """Key/value bytes of the context as the model reads it: the memory tensors plus the raw tail's tokens."""
        return self.nbytes + sum(self.tail_tokens()) * self.bytes_per_slot()

    def bytes_per_slot(self) -> int:
        """Bytes of one slot as the model reads it (a merge memory held in fp32 is read in the model's dtype)."""
        k = self.keys[0]
        size = torch.empty(0, dtype=self.cache_dtype).element_size() if self.cache_dtype else k.element_size()
        return 2 * len(self.keys) * k.shape[1] * k.shape[3] * size

    def memory_slots(self) -> torch.Tensor:
        """(M,) bool, True at compressed slots (not the sink, not raw tokens): what a memory gate biases."""
        return ~self.sink_slots() & ~self.raw

    def sink_slots(self) -> torch.Tensor:
        """(M,) bool, True at the sink slot."""
        m = torch.zeros(self.num_slots, dtype=torch.bool, device=self.valid.device)
        if self.has_sink:
            m[0] = True
        return m

    # ---------------------------------------------------------------- update
    def add_sink(self, ks: list[torch.Tensor], vs: list[torch.Tensor], rows: torch.Tensor) -> None:
        """Store (B, H, 1, D) sink keys/values for ``rows`` (bool (B,)), creating the sink slot if needed."""
        r = rows.view(-1, 1, 1, 1)
        dt = self.keys[0].dtype
        ks, vs = [k.to(dt) for k in ks], [v.to(dt) for v in vs]
        if not self.has_sink:
            self.keys = [torch.cat([torch.where(r, k, torch.zeros_like(k)), m], 2) for k, m in zip(ks, self.keys)]
            self.values = [torch.cat([torch.where(r, v, torch.zeros_like(v)), m], 2) for v, m in zip(vs, self.values)]
            self.valid = torch.cat([rows[:, None], self.valid], 1)
            self.raw = torch.cat([self.raw.new_zeros(1), self.raw])
            self.has_sink = True
        else:
            self.keys = [torch.cat([torch.where(r, k, m[:, :, :1]), m[:, :, 1:]], 2) for k, m in zip(ks, self.keys)]
            self.values = [torch.cat([torch.where(r, v, m[:, :, :1]), m[:, :, 1:]], 2)
                           for v, m in zip(vs, self.values)]
            self.valid = torch.cat([self.valid[:, :1] | rows[:, None], self.valid[:, 1:]], 1)

    def add_step(
        self, ks: list[torch.Tensor], vs: list[torch.Tensor], rows: torch.Tensor, n_text: torch.Tensor
    ) -> None:
        """Write h(t) (per layer (B, H, n, D)) for the rows in ``rows``: append (concat) or running mean (merge)."""
        n = ks[0].shape[2]
        dt = self.keys[0].dtype
        ks, vs = [k.to(dt) for k in ks], [v.to(dt) for v in vs]
        s = 1 if self.has_sink else 0
        held = self.num_slots - s
        if not self.config.merging or held == 0:
            self.keys = [torch.cat([m, k], 2) for m, k in zip(self.keys, ks)]
            self.values = [torch.cat([m, v], 2) for m, v in zip(self.values, vs)]
            self.valid = torch.cat([self.valid, rows[:, None].expand(-1, n)], 1)
            self.raw = torch.cat([self.raw, self.raw.new_zeros(n)])
        else:
            r = rows.view(-1, 1, 1, 1)
            step = self.steps
            self.keys = [torch.cat([m[:, :, :s], torch.where(r, running_mean(m[:, :, s:], k, step), m[:, :, s:])], 2)
                         for m, k in zip(self.keys, ks)]
            self.values = [torch.cat([m[:, :, :s], torch.where(r, running_mean(m[:, :, s:], v, step), m[:, :, s:])],
                                     2) for m, v in zip(self.values, vs)]
            self.valid = self.valid | torch.cat([torch.zeros_like(self.valid[:, :s]), rows[:, None].expand(-1, n)], 1)
        self.offset = self.offset + torch.where(rows, n_text, torch.zeros_like(n_text))
        self.steps = self.steps + rows.long()

    def add_raw(self, ks: list[torch.Tensor], vs: list[torch.Tensor], valid: torch.Tensor,
                n_text: torch.Tensor) -> None:
        """Append uncompressed token keys/values (per layer (B, H, L, D)), ``valid`` (B, L): full-context and
        sliding-window baselines hold raw tokens in the same structure, so one scoring path serves every method."""
        if self.config.merging:
            raise ValueError("raw tokens cannot share a merge memory (its slots are a running mean)")
        self.keys = [torch.cat([m, k], 2) for m, k in zip(self.keys, ks)]
        self.values = [torch.cat([m, v], 2) for m, v in zip(self.values, vs)]
        self.valid = torch.cat([self.valid, valid.bool()], 1)
        self.raw = torch.cat([self.raw, self.raw.new_ones(valid.shape[1])])
        self.offset = self.offset + n_text
        self.steps = self.steps + (n_text > 0).long()

    def repeat(self, n: int) -> CompressedMemory:
        """A batch of ``n`` copies of this single-row memory (score several continuations of one context)."""
        if self.batch_size != 1:
            raise ValueError(f"repeat needs a single-row memory, this one has {self.batch_size} rows")
        return CompressedMemory(
            keys=[k.expand(n, -1, -1, -1) for k in self.keys], values=[v.expand(n, -1, -1, -1) for v in self.values],
            valid=self.valid.expand(n, -1), offset=self.offset.expand(n), steps=self.steps.expand(n),
            has_sink=self.has_sink, config=self.config, fingerprint=dict(self.fingerprint),
            tail=[[list(c) for c in self.tail[0]] for _ in range(n)], cache_dtype=self.cache_dtype, raw=self.raw,
            adapter=self.adapter)

    @classmethod
    def stack(cls, mems: list[CompressedMemory]) -> CompressedMemory:
        """Single-row memories of different sizes as one batch (a server serving several sessions in one forward):
        each row's slots first, then invalid padding; a sink slot when any row has one (invalid in the others).
        :meth:`unstack` gives back each row's own memory."""
        first = mems[0]
        for m in mems:
            if m.batch_size != 1:
                raise ValueError("stack takes single-row memories")
            if m.config.to_dict() != first.config.to_dict() or m.fingerprint != first.fingerprint:
                raise IncompatibleError("memories of different models or compression configs cannot share a batch")
        written = {m.adapter for m in mems} - {None}  # None: no compressed slot yet, or a file older than the field
        if len(written) > 1:
            raise IncompatibleError("memories written by different adapters cannot share a batch")
        sink = any(m.has_sink for m in mems)
        body = max(m.num_slots - int(m.has_sink) for m in mems)
        ref = first.keys[0]

        def row(m: CompressedMemory, x: torch.Tensor | None, fill: Any) -> torch.Tensor:
            """One row's slot axis laid out as [sink? | body | padding]; x is (..., M) or (1, H, M, D)."""
            s = int(m.has_sink)
            dim = 2 if x is not None and x.dim() == 4 else -1
            parts = []
            if sink:
                parts.append(x.narrow(dim, 0, 1) if s else fill(1))
            b = x.narrow(dim, s, x.shape[dim] - s)
            parts += [b, fill(body - b.shape[dim])]
            return torch.cat(parts, dim)

        def kv(x: torch.Tensor) -> Any:
            return lambda n: x.new_zeros(x.shape[0], x.shape[1], n, x.shape[3])

        keys = [torch.cat([row(m, m.keys[i], kv(m.keys[i])) for m in mems]) for i in range(len(first.keys))]
        values = [torch.cat([row(m, m.values[i], kv(m.values[i])) for m in mems]) for i in range(len(first.values))]
        valid = torch.cat([row(m, m.valid, lambda n, m=m: m.valid.new_zeros(1, n)) for m in mems])
        raws = torch.stack([row(m, m.raw[None], lambda n, m=m: m.raw.new_zeros(1, n))[0] for m in mems])
        if bool(((raws != raws.any(0)) & valid).any()):
            raise IncompatibleError("rows hold raw and compressed slots at the same index; they cannot be batched")
        return cls(keys=keys, values=values, valid=valid, offset=torch.cat([m.offset for m in mems]),
                   steps=torch.cat([m.steps for m in mems]), has_sink=sink, config=first.config,
                   fingerprint=dict(first.fingerprint), tail=[m.tail[0] for m in mems],
                   cache_dtype=first.cache_dtype, raw=raws.any(0).to(ref.device),
                   adapter=next(iter(written), None))

    def unstack(self) -> list[CompressedMemory]:
        """Each row as its own single-row memory holding only its valid slots (the inverse of :meth:`stack`)."""
        out = []
        for b in range(self.batch_size):
            keep = self.valid[b]
            has_sink = self.has_sink and bool(keep[0])
            out.append(CompressedMemory(
                keys=[k[b:b + 1, :, keep] for k in self.keys], values=[v[b:b + 1, :, keep] for v in self.values],
                valid=self.valid[b:b + 1, keep], offset=self.offset[b:b + 1], steps=self.steps[b:b + 1],
                has_sink=has_sink, config=self.config, fingerprint=dict(self.fingerprint),
                tail=[[list(c) for c in self.tail[b]]], cache_dtype=self.cache_dtype, raw=self.raw[keep],
                adapter=self.adapter))
        return out

    # ---------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> None:
        """Save to one safetensors file whose JSON header names the model, config, adapter and format version."""
        tensors = {"valid": self.valid, "offset": self.offset, "steps": self.steps, "raw": self.raw}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            tensors[f"k.{i}"] = k
            tensors[f"v.{i}"] = v
        header = {"format_version": io.FORMAT_VERSION, "kind": "memory", "compression": self.config.to_dict(),
                  "base": self.fingerprint, "has_sink": self.has_sink, "tail": self.tail}
        if self.adapter is not None:
            header["adapter"] = self.adapter
        io.save_checked(path, tensors, header)

    @classmethod
    def load(cls, path: str | os.PathLike, ccm: Any, any_adapter: bool = False) -> CompressedMemory:
        """Load a memory for ``ccm`` (a CompressedModel); refuses one made for another model or config, and one
        written by another adapter: its slots are that adapter's compression, and read or extended by another they
        give worse answers with no error to say why. ``any_adapter=True`` loads it all the same (e.g. to carry a
        session over to a retrained adapter, knowingly)."""
        tensors, header = io.load_checked(path, kind="memory file")
        if header.get("kind") != "memory":
            raise IncompatibleError(f"{path} holds a ccmem {header.get('kind')!r} file, not a memory")
        if header.get("format_version", 0) > io.FORMAT_VERSION:
            raise IncompatibleError(f"{path} uses memory format {header['format_version']}; upgrade ccmem")
        ccm.check_fingerprint(header["base"], f"memory file {path}")
        ccm.check_config(header["compression"], f"memory file {path}")
        written = header.get("adapter")  # files older than the field have none: nothing to check
        if written is not None and not isinstance(written, str):
            raise CorruptFileError(f"{path}: the memory header's adapter is malformed; the file is damaged")
        if written is not None and not any_adapter and written != ccm.adapter_id():
            raise IncompatibleError(
                f"memory file {path} was written by another adapter (sha256 {written[:12]}) than the one this model "
                f"holds ({ccm.adapter_id()[:12]}); load it with the adapter that wrote it, start a new memory, or "
                "pass any_adapter=True to read it with this one anyway", fields=("adapter",))
        layers = header["base"]["num_hidden_layers"]
        dev = ccm.device
        return cls(
            keys=[tensors[f"k.{i}"].to(dev) for i in range(layers)],
            values=[tensors[f"v.{i}"].to(dev) for i in range(layers)],
            valid=tensors["valid"].to(dev),
            offset=tensors["offset"].to(dev),
            steps=tensors["steps"].to(dev),
            has_sink=bool(header["has_sink"]),
            config=CompressionConfig.from_dict(header["compression"]),
            fingerprint=header["base"],
            tail=_tail(header.get("tail"), tensors["valid"].shape[0], path),
            cache_dtype=_cache_dtype(tensors["k.0"].dtype, ccm),
            raw=tensors["raw"].to(dev).bool() if "raw" in tensors else None,  # files before gates have no raw flags
            adapter=written,
        )


def _cache_dtype(held: torch.dtype, ccm: Any) -> torch.dtype | None:
    model = ccm.model.get_input_embeddings().weight.dtype
    return model if held != model else None


def _tail(raw: Any, rows: int, path: Any) -> list[list[list[int]]]:
    """The raw tail from a memory file's header, checked (files older than raw tails have none)."""
    if raw is None:
        return [[] for _ in range(rows)]
    ok = isinstance(raw, list) and len(raw) == rows and all(
        isinstance(r, list) and all(isinstance(c, list) and all(isinstance(t, int) for t in c) for c in r)
        for r in raw)
    if not ok:
        raise IncompatibleError(f"{path}: the memory header's raw tail is malformed; the file is damaged")
    return raw
