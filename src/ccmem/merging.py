"""Merge memory: the running mean Mem(t) = (1 - 1/t) Mem(t-1) + (1/t) h(t), in parallel and online form.

In the parallel forward every SUM_k token's keys/values (after RoPE, in every layer) are replaced by the mean of the
COMP_k keys/values at or before it within its own episode, so one pass reproduces the recurrence (method.md §3.1).
The means are cumulative sums along the sequence, accumulated in fp32 whatever the model dtype (no N×N averaging
matrix). Online, the memory object applies :func:`running_mean` after each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokens import CompTokens


@dataclass
class MergePlan:
    """Where each SUM row of one parallel forward takes its mean from; computed once, applied in every layer."""

    comp: torch.Tensor  # (n, B, N) float32: 1 at COMP_k rows
    is_sum: torch.Tensor  # (n, B, N) bool: SUM_k rows
    count: torch.Tensor  # (n, B, N) float32: COMP_k rows at or before each position in its episode (at least 1)
    before: torch.Tensor | None  # (B, N) index of the last token before the position's episode, None: one per row
    has_before: torch.Tensor | None  # (B, N) bool

    @property
    def length(self) -> int:
        return self.comp.shape[-1]


def merge_plan(input_ids: torch.Tensor, tokens: CompTokens, segments: torch.Tensor | None = None
               ) -> MergePlan | None:
    """The plan of a batch, or None when it holds no SUM token (callers skip the work)."""
    if not tokens.merging:
        return None
    is_sum = torch.stack([input_ids == s for s in tokens.sum_ids])
    if not bool(is_sum.any()):
        return None
    comp = torch.stack([input_ids == c for c in tokens.comp_ids]).float()
    count = comp.cumsum(-1)
    before = has_before = None
    if segments is not None:
        from .masks import segment_start_index

        start = segment_start_index(segments)
        has_before = start > 0
        before = (start - 1).clamp(min=0)
        count = count - torch.where(has_before, count.gather(-1, before.expand_as(count)), 0)
    return MergePlan(comp, is_sum, count.clamp(min=1.0), before, has_before)


def _merge_one(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    out = x
    xf = x.float()
    for k in range(plan.comp.shape[0]):
        c = (xf * plan.comp[k][:, None, :, None]).cumsum(2)
        if plan.before is not None:
            prior = c.gather(2, plan.before[:, None, :, None].expand_as(c))
            c = c - torch.where(plan.has_before[:, None, :, None], prior, 0.0)
        mean = (c / plan.count[k][:, None, :, None]).to(x.dtype)
        out = torch.where(plan.is_sum[k][:, None, :, None], mean, out)
    return out


def apply_merge(key: torch.Tensor, value: torch.Tensor, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace SUM rows of key/value (B, H, N, D) by their running means; other rows are untouched."""
    return _merge_one(key, plan), _merge_one(value, plan)


def running_mean(old: torch.Tensor, new: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Mean after ``step`` (B,) earlier updates: (1 - 1/(step+1)) old + 1/(step+1) new, per batch row, computed in
    fp32 (a bf16 running mean would drift further from the parallel form at every step)."""
    a = (1.0 / (step.float() + 1.0)).view(-1, *([1] * (old.dim() - 1)))
    return ((1 - a) * old.float() + a * new.float()).to(old.dtype)
