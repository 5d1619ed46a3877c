"""Attention functions registered with transformers' ``AttentionInterface``: sdpa or eager plus merge averaging.

Selecting ``ccmem_sdpa`` / ``ccmem_eager`` as a model's attention implementation changes one thing: when the forward
carries a :class:`~ccmem.merging.MergePlan` (keyword ``ccmem_merge``, which transformers passes down to every
attention call), the SUM rows' keys and values (already rotated by RoPE, already in the layer's key/value heads) are
replaced by the running mean of the matching ⟨COMP⟩ keys/values before attention is computed; when it carries
``ccmem_memory`` (which keys are compressed memory) and the adapter has a memory gate, the gate's per-head bias is
added to the mask on those keys (:mod:`ccmem.gate`). Everything else is
delegated to transformers' own sdpa function or to the model's own eager function, so no modeling file is forked.
The mask functions are registered under the same names, so 2D padding masks keep working (e.g. in ``generate``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .gate import ATTR as GATE_ATTR
from .gate import gated_mask
from .merging import MergePlan, apply_merge
from .state import ForwardState

BACKENDS = ("sdpa", "eager", "flex")
STATE_ATTR = "ccmem_state"


def _eager_for(module: torch.nn.Module) -> Callable:
    """The eager attention function of the module's own modeling file (handles softcapping, sinks, ...)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward; use the sdpa backend")
    return fn


def _make(backend: str) -> Callable:
    def attention(module, query, key, value, attention_mask, ccmem_merge: MergePlan | None = None,
                  ccmem_memory: torch.Tensor | None = None, **kwargs):
        state: ForwardState | None = getattr(module, STATE_ATTR, None)
        if ccmem_merge is not None:
            if key.shape[2] != ccmem_merge.length:
                raise RuntimeError(
                    "SUM tokens were fed on top of a key/value cache; merge averaging needs the whole sequence in "
                    "one forward (the parallel formulation) or the online memory's running mean"
                )
            key, value = apply_merge(key, value, ccmem_merge)
        elif state is not None and state.any_sum:
            raise RuntimeError(
                "this forward holds SUM tokens but no merge plan; run it through CompressedModel.parallel_forward "
                "or pass **ccm.parallel_inputs(ids, mask) to the model"
            )
        if isinstance(attention_mask, torch.Tensor) and attention_mask.is_floating_point() and (
                attention_mask.dtype != query.dtype):
            # under autocast the queries are bf16/fp16 while ccmem's mask was built in the weights' dtype
            attention_mask = attention_mask.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
        if backend == "flex" and isinstance(attention_mask, BlockMask):
            # the parallel forward's rule as a block-sparse FlexAttention mask; a gate enters as a score bias
            bias = None
            if ccmem_memory is not None and getattr(module, GATE_ATTR, None) is not None:
                gate = getattr(module, GATE_ATTR).to(query.dtype).view(1, -1, 1, 1)
                bias = gate * ccmem_memory.to(query.dtype)[..., : key.shape[2]]
            if query.device.type == "cpu":  # inductor's CPU code for flex fails to build here; eager flex is exact
                return _flex_eager(query, key, value, attention_mask, bias, kwargs.get("scaling"),
                                   kwargs.get("softcap"))
            return flex_attention_forward(module, query, key, value, attention_mask, position_bias=bias, **kwargs)
        if ccmem_memory is not None:
            attention_mask = gated_mask(module, _additive(attention_mask, query, key), ccmem_memory)
        fn = _eager_for(module) if backend == "eager" else sdpa_attention_forward  # flex: dense masks (sessions)
        return fn(module, query, key, value, attention_mask, **kwargs)

    return attention


def _flex_eager(query, key, value, block_mask, bias, scaling, softcap) -> tuple[torch.Tensor, None]:
    """FlexAttention without torch.compile (a reference implementation: right, not fast): the CPU path."""
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, q, kv):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if bias is not None:
            score = score + bias[b, h, q, kv]
        return score

    out = flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _additive(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The float (B, 1, q, K) form of whatever mask transformers built: None means causal with the queries at the
    end of the keys (what sdpa's ``is_causal`` skip stands for), a boolean mask marks the allowed entries."""
    if mask is not None and mask.is_floating_point():
        return mask
    if mask is None:
        q, k = query.shape[2], key.shape[2]
        mask = torch.arange(k, device=query.device)[None, :] <= torch.arange(k - q, k, device=query.device)[:, None]
        mask = mask[None, None]
    out = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
    return out.masked_fill_(~mask, torch.finfo(query.dtype).min)


def _from_zero(mask_fn: Callable) -> Callable:
    """transformers' mask builders index the 2D padding mask with key positions, which start below 0 when a
    compressed memory holds more slots than the text tokens it stands for (:mod:`ccmem.cache`): shift every position
    up by that much and pad the 2D mask with valid entries on the left."""

    def mask(*args, q_offset: Any = 0, kv_offset: Any = 0, attention_mask: torch.Tensor | None = None, **kwargs):
        if isinstance(kv_offset, int) and kv_offset < 0:
            if attention_mask is not None:
                attention_mask = torch.nn.functional.pad(attention_mask, (-kv_offset, 0), value=True)
            q_offset, kv_offset = q_offset - kv_offset, 0
        return mask_fn(*args, q_offset=q_offset, kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)

    return mask


def register_backends() -> None:
    """Register ``ccmem_sdpa`` and ``ccmem_eager`` (idempotent)."""
    for backend in BACKENDS:
        name = f"ccmem_{backend}"
        AttentionInterface.register(name, _make(backend))
        # flex takes ccmem's BlockMask in the parallel forward; any mask transformers builds (sessions, generate)
        # is the sdpa one, and the flex function hands it to sdpa
        AttentionMaskInterface.register(name, _from_zero(eager_mask if backend == "eager" else sdpa_mask))


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention blocks of a decoder: modules with an output projection and query (or fused qkv)
    projection."""
    def is_attention(m: torch.nn.Module) -> bool:
        return isinstance(getattr(m, "o_proj", None), torch.nn.Linear) and any(
            isinstance(getattr(m, q, None), torch.nn.Linear) for q in ("q_proj", "qkv_proj"))

    return [m for m in model.modules() if is_attention(m)]
