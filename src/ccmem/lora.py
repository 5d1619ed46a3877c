"""Token-gated (conditional) LoRA on the attention projections, attached with forward hooks.

``y = W x + g * (B A dropout(x)) * alpha / r`` where g is 1 at ⟨COMP⟩/SUM rows and 0 elsewhere, so on any input
without ⟨COMP⟩ tokens the model is exactly the base model; the delta is computed on the gated rows alone (gather,
compute, scatter-add). With ``conditional=False`` g is 1 everywhere (plain LoRA,
the paper's ablation and the stage-1 full-context fine-tune). The base ``nn.Linear`` modules stay in place; the LoRA
weights hang off them as a ``ccmem_lora`` child, so the base state dict keeps its keys.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .state import ForwardState

ATTR = "ccmem_lora"


class LoRA(nn.Module):
    """Low-rank delta B·A, kept in fp32 whatever the base dtype."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # B = 0: the adapted model starts equal to the base
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x.to(self.A.dtype)) @ self.A.t() @ self.B.t()) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale


def target_linears(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` whose name ends in one of ``targets`` (q_proj, k_proj, ...), by qualified name."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            out[name] = mod
    return out


def attach_lora(
    model: nn.Module, targets: tuple[str, ...], r: int, alpha: float, dropout: float, state: ForwardState,
    conditional: bool = True,
) -> list:
    """Add a LoRA to each target projection and a hook that adds its gated delta; returns the hook handles.

    Whether the LoRA is gated is fixed here, not read from the per-forward state: a state that was reset (or never
    filled) then means "no ⟨COMP⟩ row", i.e. the base model, never "LoRA on every row"."""
    handles = []
    for lin in target_linears(model, targets).values():
        if not hasattr(lin, ATTR):
            lora = LoRA(lin.in_features, lin.out_features, r, alpha, dropout).to(lin.weight.device)
            lora.train(lin.training)  # a module added to a model in eval mode must not run dropout
            setattr(lin, ATTR, lora)

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            lora = getattr(module, ATTR)
            if not conditional:  # plain LoRA: every row
                return out + lora(args[0]).to(out.dtype)
            if not state.any_special:
                return out  # no ⟨COMP⟩ row in this batch: exactly the base model, and no wasted compute
            # the delta of the ⟨COMP⟩/SUM rows alone: gather them, compute, scatter-add back
            rows = state.rows
            flat = out.reshape(-1, out.shape[-1])
            delta = lora(args[0].reshape(-1, args[0].shape[-1]).index_select(0, rows))
            return flat.index_add(0, rows, delta.to(out.dtype)).view_as(out)

        handles.append(lin.register_forward_hook(hook))
    return handles


def lora_linears(model: nn.Module) -> list[nn.Linear]:
    """The projections that carry a LoRA."""
    return [m for m in model.modules() if isinstance(getattr(m, ATTR, None), LoRA)]


def lora_modules(model: nn.Module) -> dict[str, LoRA]:
    """The attached LoRA modules by the qualified name of their projection."""
    return {name: getattr(m, ATTR) for name, m in model.named_modules() if isinstance(getattr(m, ATTR, None), LoRA)}


@torch.no_grad()
def merge_and_remove_lora(model: nn.Module) -> int:
    """Fold every attached LoRA into its base weight (W <- W + B A alpha/r) and delete it; returns how many.

    This is stage 2 of the two-stage recipe: the full-context LoRA becomes part of the base model.
    Hooks must be removed by the caller (``CompressedModel.detach``) before or after.
    """
    count = 0
    for lin in lora_linears(model):
        lin.weight += getattr(lin, ATTR).delta_weight().to(lin.weight.dtype)
        delattr(lin, ATTR)
        count += 1
    return count
