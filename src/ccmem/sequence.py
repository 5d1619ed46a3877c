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


def pack_rows(rows: Sequence[Sequence[int]], max_tokens: int, pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Pack sequences into as few rows of at most ``max_tokens`` as first-fit in order gives (a sequence longer than
    ``max_tokens`` gets a row of its own). Returns ids, attention mask, segments (B, N) (the sequence's number in
    its row, -1 for padding) and where each sequence went, (row, start)."""
    bins: list[list[int]] = []
    place: list[tuple[int, int]] = []
    for i, r in enumerate(rows):
        for b, members in enumerate(bins):
            used = sum(len(rows[j]) for j in members)
            if used + len(r) <= max_tokens:
                members.append(i)
                place.append((b, used))
                break
        else:
            bins.append([i])
            place.append((len(bins) - 1, 0))
    n = max(sum(len(rows[j]) for j in m) for m in bins)
    ids = torch.full((len(bins), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(bins), n), dtype=torch.long)
    seg = torch.full((len(bins), n), -1, dtype=torch.long)
    counts = [0] * len(bins)
    for i, (b, start) in enumerate(place):
        r = rows[i]
        ids[b, start:start + len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[b, start:start + len(r)] = 1
        seg[b, start:start + len(r)] = counts[b]
        counts[b] += 1
    return ids, mask, seg, place
