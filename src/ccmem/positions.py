""""Skip" position ids: text tokens are numbered as if no ⟨COMP⟩ tokens existed (method.md §4).

The j-th (1-based) token of a ⟨COMP⟩ or SUM group after a chunk whose last text token sits at p gets p + j, which is
exactly the position the online loop gives it when it feeds the group after the chunk with a running offset.
"""

from __future__ import annotations

import torch


def skip_position_ids(
    special: torch.Tensor,
    n_tok: int,
    attention_mask: torch.Tensor | None = None,
    offset: torch.Tensor | int = 0,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Position ids (B, N) for a batch whose ⟨COMP⟩/SUM tokens are flagged by ``special`` (B, N).

    ``offset`` (int or (B,)) is the number of text tokens already processed in earlier calls. Padding gets
    position ``offset + 1``: it is masked anyway, and this keeps it inside the model's range. ``segments``
    (B, N) numbers episodes packed into one row: each starts again from position 0.
    """
    from .masks import segment_start_index

    special = special.long()
    if attention_mask is None:
        attention_mask = torch.ones_like(special)
    attention_mask = attention_mask.long()
    text = attention_mask * (1 - special)
    pos = text.cumsum(-1) - 1
    if segments is not None:
        start = segment_start_index(segments)
        pos = pos - (text.cumsum(-1) - text).gather(-1, start)
    pos = pos.masked_fill(attention_mask == 0, 1)
    pos = pos + special * ((special.cumsum(-1) - 1) % n_tok + 1)
    if isinstance(offset, torch.Tensor):
        offset = offset.to(pos.device).view(-1, 1)
    return pos + offset
