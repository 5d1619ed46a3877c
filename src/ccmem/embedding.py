"""A separate, trainable embedding table for the ⟨COMP⟩/SUM tokens, attached to the base embedding with hooks.

The base table and the LM head are left exactly as they are (so the base model's weights and state dict do not
change); ids at or past ``tokens.base`` are looked up in the new fp32 table instead. The same hook records which
rows are special, which is how the token-gated LoRA learns about the current batch. A pre-hook on the decoder that
owns the embedding resets that record at the start of every forward and refuses ``inputs_embeds`` without ids.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import InputError
from .state import ForwardState
from .tokens import CompTokens

ATTR = "ccmem_comp"


class CompEmbedding(nn.Module):
    """m × d embedding rows for ⟨COMP0..m-1⟩, initialised to strided means of the base vocabulary (method.md §2)."""

    def __init__(self, base_weight: torch.Tensor, n_special: int, vocab: int | None = None) -> None:
        super().__init__()
        vocab = vocab or base_weight.shape[0]
        rows = []
        with torch.no_grad():
            w = base_weight[:vocab].float()
            for k in range(n_special):
                rows.append(w[k::n_special].mean(0))
        # new_row[m-1-k] = mean(base[k], base[k+m], ...): every row is about the mean vocabulary embedding
        self.weight = nn.Parameter(torch.stack(rows[::-1]).contiguous())

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(index, self.weight)


def embedding_owner(model: nn.Module, emb: nn.Module) -> nn.Module:
    """The module that holds ``emb`` as a direct child (the decoder stack): every forward that embeds goes through it,
    whether the caller runs the LM head model or the bare decoder."""
    return next((m for m in model.modules() if any(c is emb for c in m.children())), model)


def attach_embedding(model: nn.Module, tokens: CompTokens, state: ForwardState, conditional: bool) -> list:
    """Install the table and the hooks on ``model.get_input_embeddings()`` and its decoder; returns the handles."""
    emb = model.get_input_embeddings()
    if not hasattr(emb, ATTR):
        table = CompEmbedding(emb.weight, tokens.n_special, vocab=min(tokens.base, emb.weight.shape[0]))
        table.to(emb.weight.device)
        table.train(emb.training)
        setattr(emb, ATTR, table)

    def pre_hook(module: nn.Module, args: tuple) -> tuple:
        ids = args[0]
        special = tokens.is_special(ids)
        state.any_special = bool(special.any())
        state.any_sum = state.any_special and tokens.merging and bool(tokens.is_sum(ids).any())
        state.special = special
        state.rows = special.reshape(-1).nonzero().squeeze(-1) if conditional and state.any_special else None
        state.slots = (ids - tokens.base).clamp(0, tokens.n_special - 1)
        return (ids.masked_fill(special, 0), *args[1:])

    def post_hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if not state.any_special:
            return out
        new = getattr(module, ATTR)(state.slots).to(out.dtype)
        return torch.where(state.special[..., None], new, out)

    def decoder_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state.reset()  # nothing of the previous forward survives into this one
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None and kwargs.get("inputs_embeds") is not None:
            raise InputError(
                "a model with ccmem attached needs input_ids: which rows are ⟨COMP⟩ tokens (the LoRA gate, the "
                "⟨COMP⟩ embeddings, merge averaging) is read from the ids and cannot be recovered from "
                "inputs_embeds; pass input_ids (⟨COMP⟩ ids included), or detach() to run the base model on embeddings"
            )

    decoder = embedding_owner(model, emb)
    return [decoder.register_forward_pre_hook(decoder_pre_hook, with_kwargs=True),
            emb.register_forward_pre_hook(pre_hook), emb.register_forward_hook(post_hook)]
