"""Collator: episodes -> left-padded parallel-training batches, with labels on the output O (+EOS) only."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..sequence import episode_ids, pack_rows, pad_batch
from ..tokens import CompTokens
from .episode import Episode

IGNORE = -100
MODES = ("compress", "full", "none")


class Collator:
    """Builds ``input_ids``, ``attention_mask``, ``labels`` for one of three layouts:

    - ``compress``: every chunk followed by its ⟨COMP⟩ group (and SUM group for merge variants), then I, O;
    - ``full``: all chunks as plain text, then I, O (the full-context model, stage 1);
    - ``none``: I, O only (the no-context baseline).

    ``max_length`` counts text tokens only (⟨COMP⟩ tokens excluded, as in the reference): the oldest chunks are
    dropped until the episode fits; an episode whose I + O alone do not fit is refused. ``raw_tail=k`` keeps the
    last k chunks uncompressed, read as text just before the input (``CompressionConfig.raw_tail``). ``pack=L``
    packs the episodes into rows of at most L tokens (with ``segments``) instead of padding each to the longest.
    ``loss_per="episode"`` adds ``loss_weights`` (1 / the episode's target tokens on each of them), so the loss is
    the mean over episodes of each episode's mean: a batch of B then trains exactly like B batches of 1
    accumulated, whatever the layout (``"token"``, the default, weighs every target token alike). ``owner`` holds
    the index of the episode each label belongs to (-1 elsewhere), so a loss can be split by episode in any layout.
    """

    def __init__(self, tokens: CompTokens | None, variant: str = "concat_recur", mode: str = "compress",
                 pad_id: int = 0, max_length: int = 1024, raw_tail: int = 0, pack: int = 0, loss_per: str = "token"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if loss_per not in ("token", "episode"):
            raise ValueError(f"loss_per must be 'token' or 'episode', got {loss_per!r}")
        if mode == "compress" and tokens is None:
            raise ValueError("compress mode needs the model's CompTokens")
        self.tokens, self.variant, self.mode, self.pad_id, self.max_length = tokens, variant, mode, pad_id, max_length
        self.raw_tail, self.pack, self.loss_per = raw_tail, pack, loss_per

    def fit(self, ep: Episode) -> Episode:
        budget = self.max_length - len(ep.input) - len(ep.output)
        if budget < 0:
            raise ValueError(f"episode {ep.id}: input + output ({len(ep.input) + len(ep.output)} tokens) exceed "
                             f"max_length {self.max_length}")
        chunks = list(ep.chunks)
        while chunks and sum(map(len, chunks)) > budget:
            chunks.pop(0)
        return Episode(chunks, ep.input, ep.output, ep.options, ep.answer, ep.id, ep.meta)

    def row(self, ep: Episode) -> tuple[list[int], list[int]]:
        ep = self.fit(ep)
        tail = ep.input + ep.output
        if self.mode == "compress":
            ids = episode_ids(*split_tail(ep.chunks, tail, self.raw_tail), self.tokens, self.variant)
        elif self.mode == "full":
            ids = [t for c in ep.chunks for t in c] + tail
        else:
            ids = list(tail)
        labels = [IGNORE] * (len(ids) - len(ep.output)) + list(ep.output)
        return ids, labels

    def __call__(self, episodes: Sequence[Episode]) -> dict[str, torch.Tensor]:
        rows = [self.row(ep) for ep in episodes]
        if self.pack:
            ids, mask, seg, place = pack_rows([r[0] for r in rows], self.pack, self.pad_id)
            out = {"input_ids": ids, "attention_mask": mask, "labels": torch.full_like(ids, IGNORE), "segments": seg}
        else:
            ids, mask = pad_batch([r[0] for r in rows], self.pad_id, side="left")
            out = {"input_ids": ids, "attention_mask": mask, "labels": torch.full_like(ids, IGNORE)}
            place = [(b, ids.shape[1] - len(r[0])) for b, r in enumerate(rows)]
        if self.loss_per == "episode":
            out["loss_weights"] = torch.zeros(ids.shape, dtype=torch.float32)
        out["owner"] = torch.full_like(ids, -1)
        for j, ((b, start), (_, lab)) in enumerate(zip(place, rows)):
            t = torch.tensor(lab, dtype=torch.long)
            out["labels"][b, start:start + len(lab)] = t
            out["owner"][b, start:start + len(lab)] = torch.where(t != IGNORE, j, -1)
            if self.loss_per == "episode":
                n = int((t != IGNORE).sum())
                out["loss_weights"][b, start:start + len(lab)] = (t != IGNORE).float() / max(n, 1)
        return out


def split_tail(chunks: Sequence[Sequence[int]], tail: Sequence[int], raw_tail: int
               ) -> tuple[list[Sequence[int]], list[int]]:
    """(chunks to compress, uncompressed tail): the last ``raw_tail`` chunks move in front of the tail."""
    cut = max(len(chunks) - raw_tail, 0)
    return list(chunks[:cut]), [t for c in chunks[cut:] for t in c] + list(tail)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy. ``logits`` may cover only the last K positions (``logits_to_keep=K``); labels are
    aligned to them. ``reduction="sum"`` returns (sum, count) for pooled perplexities, ``"rows"`` the same per row."""
    k, n = logits.shape[1], labels.shape[1]
    return lm_loss_at(logits[:, :-1], labels, torch.arange(n - k, n - 1, device=labels.device), reduction)


def keep_for_loss(labels: torch.Tensor) -> int:
    """How many final logits a loss on ``labels`` needs (left padding puts every output at the end)."""
    valid = (labels != IGNORE).long()
    first = torch.where(valid.any(-1), valid.argmax(-1), torch.full_like(valid[:, 0], labels.shape[1]))
    return int(labels.shape[1] - first.min()) + 1


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits some row's loss needs (the one before each labelled token): the ``logits_to_keep``
    index that makes the LM head run on target rows only, wherever they sit (packed rows, left padding)."""
    need = (labels[:, 1:] != IGNORE).any(0)
    return need.nonzero().squeeze(-1)


def _at(per_token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Labels (or loss weights) of the next token after each kept logit row."""
    return per_token[:, positions + 1]


def lm_loss_at(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor, reduction: str = "mean",
               weights: torch.Tensor | None = None):
    """Next-token cross-entropy of logits kept at ``positions`` (see :func:`loss_positions`); with ``weights`` (per
    label position, e.g. the collator's ``loss_weights``) the mean is weighted by them. ``reduction="rows"``
    returns (sum, count) per row, for intervals over episodes."""
    target = _at(labels, positions)
    if weights is not None and reduction == "mean":
        w = _at(weights, positions).reshape(-1)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                               ignore_index=IGNORE, reduction="none")
        return (ce * w).sum() / w.sum().clamp(min=1e-12)
    if reduction == "rows":
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                               ignore_index=IGNORE, reduction="none")  # 0 where ignored
        return ce.view(target.shape).sum(-1), (target != IGNORE).sum(-1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    count = (target != IGNORE).sum()
    if reduction == "sum":
        return loss, count
    return loss / count.clamp(min=1)


def loss_by_owner(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor, owner: torch.Tensor,
                  n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of the next-token cross-entropy for each of ``n`` episodes of a batch (``owner``: the collator's
    episode index of every label), in any layout: padded rows, or several episodes packed in one row."""
    target, own = _at(labels, positions).reshape(-1), _at(owner, positions).reshape(-1)
    rows = (own >= 0).nonzero().squeeze(-1)  # labelled rows only: no cross-entropy of padding or context rows
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1])[rows].float(), target[rows],
                                           reduction="none")
    sums = torch.zeros(n, dtype=torch.float64, device=ce.device).index_add_(0, own[rows], ce.double())
    counts = torch.zeros(n, dtype=torch.float64, device=ce.device).index_add_(
        0, own[rows], torch.ones_like(ce, dtype=torch.float64))
    return sums, counts


def kl_at(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
          weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean KL(teacher || student) of the next-token distributions at the labelled rows of ``positions`` (logits as
    kept by :func:`loss_positions`), weighted like :func:`lm_loss_at`: the whole distribution of the model that read
    the raw past is the target, a denser signal per token than the one sampled next token."""
    rows = _at(labels, positions).reshape(-1) != IGNORE
    log_s = torch.log_softmax(student.reshape(-1, student.shape[-1])[rows].float(), -1)
    log_t = torch.log_softmax(teacher.reshape(-1, teacher.shape[-1])[rows].float(), -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    if weights is None:
        return kl.mean() if kl.numel() else kl.sum()
    w = _at(weights, positions).reshape(-1)[rows]
    return (kl * w).sum() / w.sum().clamp(min=1e-12)
