"""Evaluation under the parallel formulation (method.md §8): option log-likelihoods for the compressed, full-context
and no-context layouts, the KV memory each layout holds for its context, and budgeted episodes; the pooled
perplexity lives in the core (:mod:`ccmem.scoring`) and is re-exported here."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.collate import Collator, keep_for_loss
from ..data.episode import Episode, strip_eos  # noqa: F401  (re-exported)
from ..memory import bytes_per_slot  # noqa: F401  (re-exported)
from ..scoring import PPL, perplexity  # noqa: F401  (re-exported)


def context_slots(ep: Episode, method: str, n_tok: int, raw_tail: int = 0, sink: bool = False) -> int:
    """KV slots a method holds for the context of ``ep`` (the input itself is never compressed); a raw tail's
    chunks count with all their tokens, and a sink adapter's first token is one slot more once it compressed."""
    if method == "full":
        return sum(len(c) for c in ep.chunks)
    cut = max(len(ep.chunks) - raw_tail, 0) if method in ("concat", "merge") else len(ep.chunks)
    raw = sum(len(c) for c in ep.chunks[cut:])
    if method == "concat":
        return raw + (n_tok * cut + int(sink) if cut else 0)
    if method == "merge":
        return raw + (n_tok + int(sink) if cut else 0)
    return 0


Budget = int | Sequence[int]  # one KV budget for every unit, or one per unit (in the units' order)


def per_unit(budget: Budget, n: int) -> list[int]:
    """The budget of each of ``n`` units. Why per unit: equal KV with an adapter read with a raw tail is its own
    slots for each unit (the tail's turns count with their tokens), which differ from unit to unit."""
    if isinstance(budget, int):
        return [budget] * n
    if len(budget) != n:
        raise ValueError(f"{len(budget)} budgets for {n} units: give one budget, or one per unit")
    return list(budget)


def gap_recovered(none: float, full: float, method: float) -> float:
    """Fraction of the no-context -> full-context perplexity gap that a method closes."""
    return (none - method) / (none - full) if none != full else float("nan")


@torch.no_grad()
def option_logliks(ccm, episodes: Sequence[Episode], mode: str = "compress", batch_size: int = 16,
                   max_length: int = 4096) -> tuple[list[list[float]], list[list[int]]]:
    """Summed log-likelihood and length of every answer option of every episode (``options``), each option
    scored as the output after the episode's context and input, under the parallel formulation."""
    collate = Collator(ccm.tokens, ccm.config.variant, mode=mode, max_length=max_length,
                       raw_tail=ccm.config.raw_tail)
    flat = [(i, j, Episode(e.chunks, e.input, list(opt))) for i, e in enumerate(episodes)
            for j, opt in enumerate(e.options or [])]
    lls = [[0.0] * len(e.options or []) for e in episodes]
    lens = [[len(o) for o in (e.options or [])] for e in episodes]
    ccm.model.eval()
    for s in range(0, len(flat), batch_size):
        part = flat[s:s + batch_size]
        b = {k: v.to(ccm.device) for k, v in collate([p[2] for p in part]).items()}
        extra = ccm.parallel_inputs(b["input_ids"], b["attention_mask"], full_context=mode != "compress")
        keep = keep_for_loss(b["labels"])
        logits = ccm.model(input_ids=b["input_ids"], use_cache=False, logits_to_keep=keep, **extra).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        target = b["labels"][:, -keep + 1:]
        tok = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != -100)
        for (i, j, _), ll in zip(part, tok.sum(-1).tolist()):
            lls[i][j] = ll
    return lls, lens


def budget_episode(ep: Episode, budget: int, sink: bool) -> Episode:
    """Training-free baselines at a KV budget: keep the last ``budget`` context tokens (sliding window), or the
    first token plus the last ``budget - 1`` (StreamingLLM). Positions restart at 0, as in a re-indexed cache."""
    ctx = [t for c in ep.chunks for t in c]
    if budget <= 0 or not ctx:
        kept: list[int] = []
    elif sink and len(ctx) > budget:
        kept = ctx[:1] + ctx[len(ctx) - budget + 1:]
    else:
        kept = ctx[max(0, len(ctx) - budget):]
    return Episode([kept] if kept else [], ep.input, ep.output, ep.options, ep.answer, ep.id, dict(ep.meta))
