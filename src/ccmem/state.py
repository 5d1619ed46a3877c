"""Per-forward state shared by the hooks: computed once from the input ids, read by every layer.

Linear layers never see the input ids, so the token gate of the conditional LoRA and the SUM averaging matrix reach
them through this object, which the embedding hook refreshes at the start of every forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardState:
    gate: torch.Tensor | None = None  # (B, N) 1.0 at ⟨COMP⟩/SUM rows, 0.0 elsewhere
    any_special: bool = False
    sum_weights: torch.Tensor | None = None  # (B, N, N) SUM averaging matrix, or None
    special: torch.Tensor | None = None  # (B, N) bool, ⟨COMP⟩/SUM positions
    slots: torch.Tensor | None = None  # (B, N) row of the special embedding table
