"""Evaluation under the parallel formulation (method.md §8): token perplexity of outputs (EOS excluded) for the
compressed, full-context and no-context layouts, and the KV memory each layout holds for its context."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data.collate import Collator, keep_for_loss, lm_loss
from .data.episode import Episode


@dataclass
class PPL:
    nll: float
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))


def strip_eos(ep: Episode, eos: int | None) -> Episode:
    if eos is not None and ep.output and ep.output[-1] == eos:
        return Episode(ep.chunks, ep.input, ep.output[:-1], ep.options, ep.answer, ep.id, ep.meta)
    return ep


@torch.no_grad()
def perplexity(ccm, episodes: Sequence[Episode], mode: str = "compress", batch_size: int = 16,
               eos: int | None = None, max_length: int = 4096, progress: bool = False) -> PPL:
    """Pooled perplexity of the episodes' outputs. ``mode``: compress | full | none (see :class:`Collator`)."""
    from tqdm.auto import tqdm

    collate = Collator(ccm.tokens, ccm.config.variant, mode=mode, max_length=max_length)
    ccm.model.eval()
    dev = ccm.device
    nll, count = 0.0, 0
    steps = range(0, len(episodes), batch_size)
    for i in tqdm(steps, desc=f"ppl {mode}", disable=not progress, leave=False):
        b = collate([strip_eos(e, eos) for e in episodes[i:i + batch_size]])
        ids, am, labels = b["input_ids"].to(dev), b["attention_mask"].to(dev), b["labels"].to(dev)
        extra = ccm.parallel_inputs(ids, am, full_context=mode != "compress")
        logits = ccm.model(input_ids=ids, use_cache=False, logits_to_keep=keep_for_loss(labels), **extra).logits
        s, c = lm_loss(logits, labels, reduction="sum")
        nll += float(s)
        count += int(c)
    return PPL(nll, count)


def context_slots(ep: Episode, method: str, n_tok: int) -> int:
    """KV slots a method holds for the context of ``ep`` (the input itself is never compressed)."""
    if method == "full":
        return sum(len(c) for c in ep.chunks)
    if method == "concat":
        return n_tok * len(ep.chunks)
    if method == "merge":
        return n_tok if ep.chunks else 0
    return 0


def bytes_per_slot(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * model.get_input_embeddings().weight.element_size()


def gap_recovered(none: float, full: float, method: float) -> float:
    """Fraction of the no-context -> full-context perplexity gap that a method closes."""
    return (none - method) / (none - full) if none != full else float("nan")
