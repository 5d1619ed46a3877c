"""Token layout of one episode for the parallel forward: every chunk followed by its ⟨COMP⟩ (and SUM) group.

concat_recur / concat / gist: ``c1 C | c2 C | ... | cT C | tail``
merge_recur:                   ``c1 C S | c2 C S | ... | cT C S | tail``
merge (non-recurrent):         ``c1 C | ... | cT C S | tail``
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .tokens import CompTokens


def episode_ids(chunks: Sequence[Sequence[int]], tail: Sequence[int], tokens: CompTokens, variant: str) -> list[int]:
    """Flat id list for chunks c(1..T) and the uncompressed tail (input I and output O)."""
    out: list[int] = []
    if variant == "gist":
        for c in chunks:
            out += list(c)
        if chunks:
            out += tokens.comp_ids
        return out + list(tail)
    for c in chunks:
        out += list(c) + tokens.comp_ids
        if variant == "merge_recur":
            out += tokens.sum_ids
    if variant == "merge" and chunks:
        out += tokens.sum_ids
    return out + list(tail)


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) of equal-length rows, padded on ``side``."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(n - len(r), n) if side == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(list(r), dtype=torch.long)
        mask[b, sl] = 1
    return ids, mask
