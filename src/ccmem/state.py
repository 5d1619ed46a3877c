"""Per-forward state shared by the hooks: computed once from the input ids, read by every layer.

Linear layers never see the input ids, so the token gate of the conditional LoRA reaches
them through this object, which the embedding hook refreshes at the start of every forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardState:
    gate: torch.Tensor | None = None  # (B, N) 1.0 at ⟨COMP⟩/SUM rows, 0.0 elsewhere
    any_special: bool = False
    any_sum: bool = False  # SUM rows in this batch (they need the MergePlan of the parallel forward)
    special: torch.Tensor | None = None  # (B, N) bool, ⟨COMP⟩/SUM positions
    rows: torch.Tensor | None = None  # flat indices (into B*N) of the ⟨COMP⟩/SUM rows: where the gated LoRA fires
    slots: torch.Tensor | None = None  # (B, N) row of the special embedding table
