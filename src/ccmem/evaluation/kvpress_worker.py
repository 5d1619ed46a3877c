"""Score queries after NVIDIA kvpress compressed each context to a KV budget. Runs inside kvpress's own environment
(kvpress 0.5.5 pins transformers < 5.3, ccmem pins 5.24), so it imports nothing from ccmem: it reads a job JSON and
writes a result JSON (``python kvpress_worker.py job.json out.json``).

Job: ``{"model": dir, "presses": [...], "groups": [{"context": ids, "budget": B, "queries": [{"input": ids,
"targets": [ids, ...]}]}]}``. Result: ``{press: [[[[loglik, ntok] per target] per query] per group]}``.

``"tokenizer": dir`` (optional) is the model's tokenizer, which KVzip needs for its repeat prompt. Head-wise presses
(KVzip) keep the cache's length and mask evicted keys; their ``held`` is the mean number kept per layer and head.

The context is prefilled under the press (``compression_ratio = 1 - (B + 0.5) / L`` keeps exactly B tokens), then
every query + target is read on top of the compressed cache with positions continuing from L and no
``cache_position`` (passing one makes the mask non-causal), so every scored token sees only the compressed cache.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import sys

import torch


def make_press(name: str, budget: int, length: int):
    import kvpress

    ratio = max(0.0, 1.0 - (budget + 0.5) / length)
    if name == "snapkv":
        # half the budget for the observation window: with window = budget - 1 a single slot is chosen by attention,
        # the attention sink is evicted and perplexity explodes (2361 vs 9.5 at B = 24 on a 182-token probe).
        # The first token is always kept: SnapKV's pooling (kernel 5) lends the sink's attention to tokens 1-2, so at
        # 2-4 slots one of them was kept in its place and perplexity exploded again (645 at B = 2 on chit-chat).
        return _sink_kept(kvpress.SnapKVPress)(compression_ratio=ratio, window_size=max(1, min(64, budget // 2)))
    if name == "streamingllm":
        return kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=max(1, min(4, budget - 1)))
    if name == "knorm":
        return kvpress.KnormPress(compression_ratio=ratio)
    if name == "tova":
        return kvpress.TOVAPress(compression_ratio=ratio)
    if name == "expected_attention":
        return kvpress.ExpectedAttentionPress(compression_ratio=ratio)
    if name == "kvzip":
        # query-agnostic: scores each KV pair by the attention it gets while the model repeats the context, then
        # evicts the lowest across all layers and heads (head-wise, so the cache keeps its length and the evicted
        # keys are masked). It prunes int(L*H*length*ratio) pairs: the 1e-9 keeps float error from rounding
        # L*H*(length - budget) down by one, so on average exactly `budget` pairs per layer and head stay.
        # Its n_sink first tokens are always kept: a quarter of the budget at most (up to its default 4), so small
        # budgets are still chosen by score (n_sink = budget = 4 kept exactly the first 4 tokens: recall at d = 1 0.2).
        return kvpress.KVzipPress(compression_ratio=(length - budget) / length + 1e-9,
                                  n_sink=max(1, min(4, budget // 4)))
    raise ValueError(f"unknown press {name!r}; known: snapkv, streamingllm, knorm, tova, expected_attention, kvzip")


@functools.cache
def _sink_kept(press_cls: type) -> type:
    """``press_cls`` whose scores rank the first ``n_sink`` tokens (the attention sink) above every other token, so a
    scorer press keeps them whatever its pooling did to their score (StreamingLLM and KVzip keep sinks the same way)."""

    @dataclasses.dataclass
    class SinkKept(press_cls):
        n_sink: int = 1

        def score(self, *args, **kwargs):
            scores = super().score(*args, **kwargs)
            scores[..., :self.n_sink] = scores.max() + 1
            return scores

    SinkKept.__name__ = SinkKept.__qualname__ = f"SinkKept{press_cls.__name__}"
    return SinkKept


def _layers(model) -> list:
    return [layer.self_attn for layer in model.model.layers]


def _masked_slots(model, length: int) -> float | None:
    """Mean KV pairs kept per layer and head after a head-wise (masking) press, or None when nothing is masked."""
    idx = [getattr(m, "masked_key_indices", None) for m in _layers(model)]
    if all(i is None for i in idx):
        return None
    heads = model.config.num_key_value_heads
    masked = sum(len(i[0]) for i in idx if i is not None)
    return length - masked / (len(idx) * heads)


def _expand_masks(saved: list, n: int) -> None:
    """A head-wise press masks keys of batch row 0; the queries read the cache repeated n times: mask every row."""
    for m, idx in saved:
        if idx is None:
            continue
        b, h, s = idx
        m.masked_key_indices = (torch.arange(n).repeat_interleave(len(h)), h.repeat(n), s.repeat(n))


@torch.no_grad()
def run_group(model, press_name: str, group: dict, batch_size: int = 32) -> tuple[list, int]:
    from transformers import DynamicCache

    ctx, budget = group["context"], group["budget"]
    cache = DynamicCache()
    for m in _layers(model):  # nothing masked by an earlier group's head-wise press survives into this one
        m.masked_key_indices = None
    if ctx:
        ids = torch.tensor([ctx])
        if budget < len(ctx) and budget > 0:
            with make_press(press_name, budget, len(ctx))(model):
                model(input_ids=ids, past_key_values=cache, use_cache=True)
        elif budget > 0:
            model(input_ids=ids, past_key_values=cache, use_cache=True)
    cached = cache.get_seq_length() if ctx and budget > 0 else 0  # slots in the cache, masked ones included
    saved = [(m, getattr(m, "masked_key_indices", None)) for m in _layers(model)]
    kept = _masked_slots(model, cached) if cached else None
    held = round(kept, 3) if kept is not None else cached
    rows = [(qi, ti, q["input"], t) for qi, q in enumerate(group["queries"]) for ti, t in enumerate(q["targets"])]
    out = [[None] * len(q["targets"]) for q in group["queries"]]
    for s in range(0, len(rows), batch_size):
        part = rows[s:s + batch_size]
        seqs = [p[2] + p[3] for p in part]
        n = max(map(len, seqs))
        ids = torch.zeros(len(seqs), n, dtype=torch.long)
        am = torch.zeros(len(seqs), cached + n, dtype=torch.long)
        am[:, :cached] = 1
        for b, sq in enumerate(seqs):
            ids[b, :len(sq)] = torch.tensor(sq)
            am[b, cached:cached + len(sq)] = 1
        pos = (len(ctx) if budget > 0 else 0) + torch.arange(n)[None].expand(len(seqs), -1)
        kw = {}
        _expand_masks(saved, len(seqs))
        if cached:
            c = copy.deepcopy(cache)
            c.batch_repeat_interleave(len(seqs))
            kw["past_key_values"] = c
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=bool(cached),
                                       **kw).logits.float(), -1)
        for b, (qi, ti, inp, tgt) in enumerate(part):
            idx = torch.arange(len(inp) - 1, len(inp) + len(tgt) - 1)
            out[qi][ti] = [float(logp[b, idx, torch.tensor(tgt)].sum()), len(tgt)]
    return out, held


def main(job_path: str, out_path: str) -> None:
    from transformers import AutoModelForCausalLM

    job = json.load(open(job_path))
    torch.set_num_threads(job.get("threads", torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(job["model"], torch_dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    if job.get("tokenizer"):  # KVzip reads its repeat prompt with the tokenizer at config.name_or_path
        model.config._name_or_path = job["tokenizer"]
    result: dict = {"scores": {}, "held": {}}
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    for press in job["presses"]:
        scores, held = [], []
        for g in tqdm(job["groups"], desc=f"kvpress {press}", file=sys.stderr):
            s, h = run_group(model, press, g, job.get("batch_size", 32))
            scores.append(s)
            held.append(h)
        result["scores"][press], result["held"][press] = scores, held
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
