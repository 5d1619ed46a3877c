"""Merge memory: the running mean Mem(t) = (1 - 1/t) Mem(t-1) + (1/t) h(t), in parallel and online form.

In the parallel forward every SUM_k token's keys/values (after RoPE, in every layer) are replaced by the mean of the
COMP_k keys/values at or before it, so one pass reproduces the recurrence (method.md §3.1). Online, the memory
object applies :func:`running_mean` after each step.
"""

from __future__ import annotations

import torch

from .tokens import CompTokens


def sum_average_weights(input_ids: torch.Tensor, tokens: CompTokens) -> torch.Tensor | None:
    """(B, N, N) averaging matrix: row i (a SUM_k position) holds 1/t on each COMP_k at or before i.

    Returns None when the batch holds no SUM token, so callers can skip the work.
    """
    if not tokens.merging:
        return None
    is_sum = tokens.is_sum(input_ids)
    if not bool(is_sum.any()):
        return None
    n = input_ids.shape[-1]
    slot_q = input_ids - tokens.sum_ids[0]  # k for SUM_k
    slot_k = input_ids - tokens.comp_ids[0]  # k for COMP_k
    match = is_sum[:, :, None] & tokens.is_comp(input_ids)[:, None, :] & (slot_q[:, :, None] == slot_k[:, None, :])
    lower = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()
    w = (match & lower).float()
    return w / w.sum(-1, keepdim=True).clamp(min=1.0)


def apply_sum_average(
    key: torch.Tensor, value: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace SUM rows of key/value (B, H, N, D) by their averages; other rows are untouched."""
    keep = (weights.sum(-1) == 0).to(key.dtype)[:, None, :, None]
    w = weights.to(key.dtype)[:, None]
    return keep * key + w @ key, keep * value + w @ value


def running_mean(old: torch.Tensor, new: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Mean after ``step`` (B,) earlier updates: (1 - 1/(step+1)) old + 1/(step+1) new, per batch row."""
    a = (1.0 / (step.to(old.dtype) + 1.0)).view(-1, *([1] * (old.dim() - 1)))
    return (1 - a) * old + a * new
