"""Attention masks of the parallel training forward: small rule functions of token ids, and what each backend needs.

A rule is a function ``(batch, head, q, kv) -> bool`` (transformers' ``masking_utils`` convention), combined with
``and_masks`` / ``or_masks``. :func:`comp_mask_function` builds the rule of a batch; :func:`dense_mask` evaluates
it into a boolean (B, 1, N, N) tensor for SDPA (:func:`to_additive` makes the float mask eager needs: a boolean 4D
mask is silently wrong under eager attention), and the same rule can become a FlexAttention ``BlockMask``. The rules
follow method.md §3:

- ``block(x)``: how many group-ending tokens lie at or after x; blocks are delimited by the last token of a group.
- ``concat_recur``: same block, or the key is a ⟨COMP⟩ token (all earlier memory groups).
- ``merge_recur``: same block, or the key lies in the SUM group that closes the previous block.
- ``concat``: same block, or (query in the final block and key is ⟨COMP⟩).
- ``merge``: same block, or (query is SUM and key is ⟨COMP⟩), or (query in the final block and key is SUM).
- ``gist``: the ``merge_recur`` rule on ⟨COMP⟩ ids (one group after the whole context).

All of it within one episode: ``segments`` (B, N) numbers the episodes packed into a row (block-diagonal rule),
and every rule is causal and hides padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.masking_utils import and_masks, causal_mask_function, or_masks, padding_mask_function

from .tokens import CompTokens

Rule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    """For each position, how many marked positions lie at or after it (along the last dim)."""
    return x + x.sum(-1, keepdim=True) - x.cumsum(-1)


def default_segments(attention_mask: torch.Tensor) -> torch.Tensor:
    """One episode per row: segment 0 for tokens, -1 for padding."""
    return torch.where(attention_mask.bool(), 0, -1)


def segment_starts(segments: torch.Tensor) -> torch.Tensor:
    """(B, N) bool, True at the first token of each segment (of each run of equal ids)."""
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return first


def segment_start_index(segments: torch.Tensor) -> torch.Tensor:
    """(B, N) index of the first token of each position's segment."""
    idx = torch.arange(segments.shape[-1], device=segments.device).expand_as(segments)
    return torch.where(segment_starts(segments), idx, 0).cummax(-1).values


def segment_end_index(segments: torch.Tensor) -> torch.Tensor:
    """(B, N) index of the last token of each position's segment."""
    n = segments.shape[-1]
    last = torch.ones_like(segments, dtype=torch.bool)
    last[:, :-1] = segments[:, 1:] != segments[:, :-1]
    idx = torch.arange(n, device=segments.device).expand_as(segments)
    marked = torch.where(last, idx, n)
    return marked.flip(-1).cummin(-1).values.flip(-1)


def causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Plain causal + padding mask (B, 1, N, N): the full-context baseline."""
    n = attention_mask.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril()
    return (causal[None] & attention_mask.bool()[:, None, :])[:, None]


def _key(flags: torch.Tensor) -> Rule:
    return lambda b, h, q, kv: flags[b, kv]


def _query(flags: torch.Tensor) -> Rule:
    return lambda b, h, q, kv: flags[b, q]


def _same(feature: torch.Tensor) -> Rule:
    return lambda b, h, q, kv: feature[b, q] == feature[b, kv]


def _group_ends(input_ids: torch.Tensor, tokens: CompTokens, variant: str) -> torch.Tensor:
    """(B, N) bool: the tokens that close a block (the last token of a ⟨COMP⟩ or SUM group)."""
    if variant in ("concat_recur", "concat", "gist"):
        return input_ids == tokens.comp_ids[-1]
    if variant == "merge_recur":
        if not tokens.merging:
            raise ValueError("merge_recur needs SUM tokens: build CompTokens with merging=True")
        return input_ids == tokens.sum_ids[-1]
    if variant == "merge":
        return (input_ids == tokens.comp_ids[-1]) | (input_ids == tokens.sum_ids[-1])
    raise ValueError(f"unknown variant {variant!r}")


def comp_mask_function(
    input_ids: torch.Tensor,
    tokens: CompTokens,
    variant: str,
    attention_mask: torch.Tensor | None = None,
    sink: bool = False,
    segments: torch.Tensor | None = None,
) -> Rule:
    """The rule of the parallel forward for ``variant`` over a batch (see the module docstring)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pad = attention_mask.bool()
    if segments is None:
        segments = default_segments(attention_mask)
    comp, summ = tokens.is_comp(input_ids), tokens.is_sum(input_ids)
    comp_first = input_ids == tokens.comp_ids[0]
    ends = _group_ends(input_ids, tokens, variant)
    block = reverse_cumsum(ends.long())
    # a token's block counted within its own episode: 0 = the episode's final block (input and output)
    last = segment_end_index(segments)
    own = block - (block.gather(-1, last) - ends.long().gather(-1, last))
    final = own == 0

    if variant == "concat_recur":
        extra: Rule = _key(comp)
    elif variant in ("merge_recur", "gist"):
        first = (input_ids == tokens.sum_ids[0]) if variant == "merge_recur" else comp_first
        pre = reverse_cumsum(first.long()) - first.long()  # groups whose first token lies strictly after the key
        extra = lambda b, h, q, kv: pre[b, kv] == block[b, q]  # noqa: E731
    elif variant == "concat":
        extra = and_masks(_query(final), _key(comp))
    else:  # merge
        extra = or_masks(and_masks(_query(summ), _key(comp)), and_masks(_query(final), _key(summ)))
    rule = or_masks(_same(block), extra)
    if sink:
        rule = or_masks(rule, _key(pad & segment_starts(segments)))
    return and_masks(rule, _same(segments), causal_mask_function, padding_mask_function(pad))


def memory_mask_function(
    input_ids: torch.Tensor,
    tokens: CompTokens,
    variant: str,
    attention_mask: torch.Tensor | None = None,
    sink: bool = False,
    segments: torch.Tensor | None = None,
) -> Rule:
    """Where a query reads compressed memory: a visible ⟨COMP⟩/SUM key of an earlier block (what the online loop
    holds in its memory slots; a group read by its own block is being written, not memory). The memory gate
    (:mod:`ccmem.gate`) biases exactly these entries."""
    visible = comp_mask_function(input_ids, tokens, variant, attention_mask, sink, segments)
    block = reverse_cumsum(_group_ends(input_ids, tokens, variant).long())
    other = lambda b, h, q, kv: block[b, q] != block[b, kv]  # noqa: E731
    return and_masks(visible, _key(tokens.is_special(input_ids)), other)


def full_context_mask_function(attention_mask: torch.Tensor, segments: torch.Tensor | None = None) -> Rule:
    """Plain causal attention within each episode (stage 1 and the full-context reference)."""
    if segments is None:
        segments = default_segments(attention_mask)
    return and_masks(causal_mask_function, padding_mask_function(attention_mask.bool()), _same(segments))


def raw_context_mask_function(
    input_ids: torch.Tensor,
    tokens: CompTokens,
    attention_mask: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> Rule:
    """Every token reads the raw tokens before it in its episode and never a ⟨COMP⟩/SUM key (a special query reads
    only itself, so no row is empty): with skip position ids this is the model on the uncompressed past, on the very
    rows of the compressed forward, which makes it the teacher of distillation (``TrainConfig.distill``)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    raw = _key(~tokens.is_special(input_ids))
    itself = lambda b, h, q, kv: q == kv  # noqa: E731
    return and_masks(or_masks(raw, itself), full_context_mask_function(attention_mask, segments))


def raw_and_memory_mask_function(
    input_ids: torch.Tensor,
    tokens: CompTokens,
    variant: str,
    attention_mask: torch.Tensor | None = None,
    sink: bool = False,
    segments: torch.Tensor | None = None,
) -> Rule:
    """The compressed rule, plus: every raw token also reads every raw token before it in its episode. ⟨COMP⟩/SUM
    queries keep their compressed rule, so the memory is the one the compressed forward writes; text rows read it
    *and* the uncompressed past. As a distillation teacher (``TrainConfig.teacher = "raw+memory"``) it has whatever
    prior the adapter's memory gives any context on top of the raw past, so the student is pulled towards what the
    raw past adds, not back to the base model."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    special = tokens.is_special(input_ids)
    raw = and_masks(_query(~special), _key(~special), full_context_mask_function(attention_mask, segments))
    return or_masks(comp_mask_function(input_ids, tokens, variant, attention_mask, sink, segments), raw)


def dense_mask(rule: Rule, batch: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Evaluate a rule on the whole (B, 1, N, N) grid at once (broadcast indices, no vmap)."""
    b = torch.arange(batch, device=device)[:, None, None, None]
    h = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]
    q = torch.arange(n, device=device)[None, None, :, None]
    kv = torch.arange(n, device=device)[None, None, None, :]
    return rule(b, h, q, kv).expand(batch, 1, n, n)


def comp_attention_mask(
    input_ids: torch.Tensor,
    tokens: CompTokens,
    variant: str,
    attention_mask: torch.Tensor | None = None,
    sink: bool = False,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean (B, 1, N, N) mask of the parallel forward for ``variant`` (see the module docstring)."""
    rule = comp_mask_function(input_ids, tokens, variant, attention_mask, sink, segments)
    return dense_mask(rule, *input_ids.shape, device=input_ids.device)


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
