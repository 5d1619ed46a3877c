"""Attention masks of the parallel training forward, as pure functions of token ids.

Every builder returns a boolean (B, 1, N, N) tensor, True where a query may attend to a key, with the causal and
padding masks already applied. :func:`to_additive` turns it into the float mask transformers expects (a boolean 4D
mask is silently wrong under eager attention). The rules follow method.md §3:

- ``block(x)``: how many group-ending tokens lie at or after x; blocks are delimited by the last token of a group.
- ``concat_recur``: same block, or the key is a ⟨COMP⟩ token (all earlier memory groups).
- ``merge_recur``: same block, or the key lies in the SUM group that closes the previous block.
- ``concat``: same block, or (query in the final block and key is ⟨COMP⟩).
- ``merge``: same block, or (query is SUM and key is ⟨COMP⟩), or (query in the final block and key is SUM).
- ``gist``: the ``merge_recur`` rule on ⟨COMP⟩ ids (one group after the whole context).
"""

from __future__ import annotations

import torch

from .tokens import CompTokens


def reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    """For each position, how many marked positions lie at or after it (along the last dim)."""
    return x + x.sum(-1, keepdim=True) - x.cumsum(-1)


def causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Plain causal + padding mask (B, 1, N, N): the full-context baseline."""
    n = attention_mask.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril()
    return (causal[None] & attention_mask.bool()[:, None, :])[:, None]


def _pair(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast per-token features to (B, N_q, 1) and (B, 1, N_k)."""
    return q[:, :, None], k[:, None, :]


def comp_attention_mask(
    input_ids: torch.Tensor,
    tokens: CompTokens,
    variant: str,
    attention_mask: torch.Tensor | None = None,
    sink: bool = False,
) -> torch.Tensor:
    """Boolean (B, 1, N, N) mask of the parallel forward for ``variant`` (see the module docstring)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pad = attention_mask.bool()
    comp, summ = tokens.is_comp(input_ids), tokens.is_sum(input_ids)
    comp_first, comp_last = input_ids == tokens.comp_ids[0], input_ids == tokens.comp_ids[-1]

    if variant in ("concat_recur", "concat"):
        ends = comp_last
    elif variant == "merge_recur":
        if not tokens.merging:
            raise ValueError("merge_recur needs SUM tokens: build CompTokens with merging=True")
        ends = input_ids == tokens.sum_ids[-1]
    elif variant == "merge":
        ends = comp_last | (input_ids == tokens.sum_ids[-1])
    elif variant == "gist":
        ends = comp_last
    else:
        raise ValueError(f"unknown variant {variant!r}")

    block = reverse_cumsum(ends.long())
    bq, bk = _pair(block, block)
    allowed = bq == bk
    if variant == "concat_recur":
        allowed = allowed | comp[:, None, :]
    elif variant in ("merge_recur", "gist"):
        first = (input_ids == tokens.sum_ids[0]) if variant == "merge_recur" else comp_first
        pre = reverse_cumsum(first.long()) - first.long()  # groups whose first token lies strictly after the key
        allowed = allowed | (pre[:, None, :] == bq)
    elif variant == "concat":
        allowed = allowed | ((bq == 0) & comp[:, None, :])
    elif variant == "merge":
        allowed = allowed | (summ[:, :, None] & comp[:, None, :]) | ((bq == 0) & summ[:, None, :])

    if sink:
        first_valid = pad & (attention_mask.long().cumsum(-1) == 1)
        allowed = allowed | first_valid[:, None, :]
    return allowed[:, None] & causal_mask(attention_mask)


def online_mask(key_valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """Mask (B, 1, q_len, K) for ``q_len`` new tokens that sit at the end of a cache of K slots.

    Queries see every valid slot at or before their own index: memory slots, earlier tokens and themselves.
    """
    k_len = key_valid.shape[-1]
    q_idx = torch.arange(k_len - q_len, k_len, device=key_valid.device)
    k_idx = torch.arange(k_len, device=key_valid.device)
    causal = k_idx[None, :] <= q_idx[:, None]
    return (causal[None] & key_valid.bool()[:, None, :])[:, None]


def to_additive(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """0 where attention is allowed, the dtype's minimum elsewhere (finite, so fully masked rows never make NaNs)."""
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)
