"""Pooled perplexity of episodes' outputs under the parallel formulation (method.md §8), for the compressed,
full-context and no-context layouts: one masked forward per batch, EOS excluded. The library's own measurement (the
demo's per-turn quality); the evaluation suites build on it, never the other way round."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .data.collate import Collator, keep_for_loss, lm_loss
from .data.episode import Episode, strip_eos
from .metrics import perplexity as pooled_perplexity


@dataclass
class PPL:
    nll: float
    tokens: int
    # (nll, tokens) of each episode, in order: what a bootstrap over episodes resamples
    per_episode: list[tuple[float, int]] = field(default_factory=list)

    @property
    def ppl(self) -> float:
        return pooled_perplexity(self.nll, self.tokens)


@torch.no_grad()
def perplexity(ccm, episodes: Sequence[Episode], mode: str = "compress", batch_size: int = 16,
               eos: int | None = None, max_length: int = 4096, progress: bool = False) -> PPL:
    """Pooled perplexity of the episodes' outputs. ``mode``: compress | full | none (see :class:`Collator`)."""
    from tqdm.auto import tqdm

    collate = Collator(ccm.tokens, ccm.config.variant, mode=mode, max_length=max_length,
                       raw_tail=ccm.config.raw_tail)
    ccm.model.eval()
    dev = ccm.device
    rows: list[tuple[float, int]] = []
    steps = range(0, len(episodes), batch_size)
    for i in tqdm(steps, desc=f"ppl {mode}", disable=not progress, leave=False):
        b = collate([strip_eos(e, eos) for e in episodes[i:i + batch_size]])
        ids, am, labels = b["input_ids"].to(dev), b["attention_mask"].to(dev), b["labels"].to(dev)
        extra = ccm.parallel_inputs(ids, am, full_context=mode != "compress")
        logits = ccm.model(input_ids=ids, use_cache=False, logits_to_keep=keep_for_loss(labels), **extra).logits
        s, c = lm_loss(logits, labels, reduction="rows")
        rows += zip(s.tolist(), c.tolist())
    return PPL(sum(s for s, _ in rows), sum(c for _, c in rows), rows)
