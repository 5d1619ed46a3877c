"""Per-forward state shared by the hooks: computed once from the input ids, read by every layer.

Linear layers never see the input ids, so the ⟨COMP⟩ rows of the conditional LoRA reach them through this object.
A pre-hook on the decoder resets it at the start of every forward and the embedding hook fills it from that
forward's ids, so nothing computed for one forward is read by the next (a forward without ids is refused).
It is not cleared after the forward: gradient checkpointing re-runs the layers during backward and needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class ForwardState:
    any_special: bool = False
    any_sum: bool = False  # SUM rows in this batch (they need the MergePlan of the parallel forward)
    special: torch.Tensor | None = None  # (B, N) bool, ⟨COMP⟩/SUM positions
    rows: torch.Tensor | None = None  # flat indices (into B*N) of the ⟨COMP⟩/SUM rows: where the gated LoRA fires
    slots: torch.Tensor | None = None  # (B, N) row of the special embedding table

    def reset(self) -> None:
        """Back to "no ⟨COMP⟩ row": what a forward sees before its embedding hook has run."""
        for f in fields(self):
            setattr(self, f.name, f.default)
