"""The recurrent (step-by-step) training loss: compress chunk by chunk with autograd through the memory, then
score the output. It computes the same loss and gradients as the parallel forward, only slower; it exists as the
baseline the parallel formulation is measured against, and as a check of that equivalence."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .data.episode import Episode


def recurrent_loss(ccm, episodes: Sequence[Episode]) -> torch.Tensor:
    """Mean next-token loss on the outputs, computed through the online loop with gradients."""
    s = ccm.session(batch_size=len(episodes), grad=True)
    for t in range(max(len(e.chunks) for e in episodes)):
        s.add_context([e.chunks[t] if t < len(e.chunks) else None for e in episodes])
    logits, _ = s.logits([e.input + e.output for e in episodes])
    total, count = logits.new_zeros(()), 0
    for b, e in enumerate(episodes):
        start = len(e.input) - 1
        pred = logits[b, start:start + len(e.output)]
        total = total + torch.nn.functional.cross_entropy(pred.float(), torch.tensor(e.output, device=pred.device),
                                                          reduction="sum")
        count += len(e.output)
    return total / count
