"""Metrics of method.md §8, as pure functions on log-likelihoods and token lists (no model inside)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def perplexity(nll_sum: float, tokens: int) -> float:
    """Token-pooled perplexity exp(sum NLL / tokens) (EOS already excluded by the caller)."""
    return math.exp(nll_sum / max(tokens, 1))


def multiple_choice(option_ll: Sequence[Sequence[float]], option_len: Sequence[Sequence[int]],
                    answers: Sequence[int], base_ll: Sequence[Sequence[float]] | None = None) -> dict[str, float]:
    """Accuracy from option log-likelihoods, per example: ``acc`` = argmax of the summed LL, ``acc_norm`` = argmax of
    the mean per-token LL, ``acc_base`` = argmax of (LL - LL of the same option without context). Every example
    counts (the reference skipped the last one of each task, method.md §11 P2)."""
    if not answers:
        raise ValueError("no examples")
    hits = {"acc": 0, "acc_norm": 0, "acc_base": 0}
    for i, gold in enumerate(answers):
        lls, lens = option_ll[i], option_len[i]
        hits["acc"] += _argmax(lls) == gold
        hits["acc_norm"] += _argmax([ll / max(n, 1) for ll, n in zip(lls, lens)]) == gold
        if base_ll is not None:
            hits["acc_base"] += _argmax([ll - b for ll, b in zip(lls, base_ll[i])]) == gold
    out = {k: v / len(answers) for k, v in hits.items()}
    if base_ll is None:
        del out["acc_base"]
    return out


def label_accuracy(label_ll: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """LaMP-2 style: the predicted label is the argmax of the summed log-likelihood over the label set."""
    return sum(_argmax(ll) == gold for ll, gold in zip(label_ll, answers)) / max(len(answers), 1)


def rouge_l(prediction: Sequence, reference: Sequence) -> float:
    """ROUGE-L F1 from the longest common subsequence of two token (or word) sequences."""
    if not prediction or not reference:
        return 0.0
    prev = [0] * (len(reference) + 1)
    for p in prediction:
        cur = [0]
        for j, r in enumerate(reference, 1):
            cur.append(prev[j - 1] + 1 if p == r else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(prediction), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])
