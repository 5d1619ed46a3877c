"""``CompressedCache``: the compressed memory as a transformers ``Cache``, so ``model.generate`` continues from it.

A memory of M slots stands for ``offset`` text tokens (the number compressed so far), so its cache layers report two
different lengths, through the cache-layer contract transformers' masks and ``generate`` read:

- ``get_seq_length()`` / the query offset: ``offset`` + tokens appended since, i.e. the next token's position (the
  skip positions of method.md §4: what the online loop gives it);
- ``get_mask_sizes(q)``: ``M + appended + q`` key/value slots, numbered from ``offset - M``, so memory slots come
  before every new token and the new tokens are causal among themselves.

``model.generate(**session.generation_inputs(prompts), ...)`` therefore continues every row from its memory, with
streamers, stop strings, sampling and ``GenerationConfig`` from transformers; :meth:`Session.generate` is exactly
that call. The session's own forwards read the same object. The memory is never modified: each
``session.cache()`` is a fresh view whose appended tokens are dropped with it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .errors import InputError


class CompressedLayer(DynamicLayer):
    """One layer: M memory slots first, then whatever a forward appends."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, offset: int) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.device, self.is_initialized = keys.device, True
        self.slots, self.offset = keys.shape[-2], int(offset)

    @property
    def appended(self) -> int:
        return self.keys.shape[-2] - self.slots

    def get_seq_length(self) -> int:
        return self.offset + self.appended

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2] + query_length, self.offset - self.slots

    def crop(self, tokens_to_remove: int) -> None:
        """Drop appended tokens (a negative count, as transformers passes it); the memory itself cannot be cropped."""
        if tokens_to_remove > 0:  # the legacy form: the length to keep, counted in positions
            tokens_to_remove = tokens_to_remove - self.get_seq_length()
        if -tokens_to_remove > self.appended:
            raise InputError(f"cannot crop {-tokens_to_remove} tokens: only {self.appended} were appended to the "
                             "memory, which itself cannot be cropped")
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        """Back to the memory alone (what was appended since is dropped)."""
        self.keys, self.values = self.keys[..., : self.slots, :], self.values[..., : self.slots, :]


class CompressedCache(DynamicCache):
    """The memory's keys/values per layer (all rows at the same text offset), viewed as a growing cache."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], offset: int,
                 memory_slots: torch.Tensor | None = None) -> None:
        super().__init__()
        self.layers = [CompressedLayer(k, v, offset) for k, v in zip(keys, values, strict=True)]
        self.memory_slots = memory_slots  # (M,) bool: compressed slots (what a memory gate biases)

    @classmethod
    def from_memory(cls, memory: Any, position: int | None = None) -> CompressedCache:
        """A view of a :class:`~ccmem.memory.CompressedMemory` (in the dtype the model reads it in). ``position``:
        where new tokens start (default: the rows' text offset, the largest when they differ; callers that mix rows
        pass explicit position ids and a 2D mask, as :meth:`~ccmem.session.Session.generation_inputs` does)."""
        keys, values = memory.keys, memory.values
        if memory.cache_dtype is not None:
            keys, values = [k.to(memory.cache_dtype) for k in keys], [v.to(memory.cache_dtype) for v in values]
        offset = int(memory.offset.max()) if position is None else position
        return cls(keys, values, offset, memory.memory_slots())

    @property
    def memory_length(self) -> int:
        return self.layers[0].slots if self.layers else 0

    def memory_columns(self, query_length: int, dtype: torch.dtype) -> torch.Tensor:
        """(1, 1, 1, K) 0/1: which of the K keys a forward of ``query_length`` tokens reads are memory slots."""
        k = self.layers[0].keys.shape[-2] + query_length
        cols = torch.zeros(k, dtype=dtype, device=self.layers[0].keys.device)
        if self.memory_slots is not None:
            cols[: self.memory_slots.shape[0]] = self.memory_slots.to(dtype)
        return cols.view(1, 1, 1, -1)
