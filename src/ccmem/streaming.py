"""Streaming: endless text in a bounded KV cache laid out as ``[sink | compressed memory | sliding window]``
(method.md §6.3), plus the StreamingLLM (sink + window) and plain sliding-window baselines at the same budget.

Positions follow the cache: every key sits rotated at its current cache index, and new tokens take the next
indices. When the layout changes (window tokens evicted, ⟨COMP⟩ slots added or dropped), each kept key is
re-rotated by (new index - old index): RoPE rotations compose, R(a) R(b) = R(a + b), so this equals recomputing
the keys at their new positions, without touching the modeling code (tested against a from-scratch forward).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from .cache import CompressedCache

METHODS = ("ccm", "streamingllm", "window")


def rope_inv_freq(model: nn.Module) -> torch.Tensor:
    """The inverse frequencies of the model's rotary embedding."""
    for m in model.modules():
        if hasattr(m, "inv_freq") and "rotary" in type(m).__name__.lower():
            return m.inv_freq
    raise TypeError(f"{type(model).__name__} has no rotary embedding; streaming re-rotation needs RoPE")


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate keys (B, H, L, D), already rotated at some positions, by ``delta`` (L,) more positions."""
    if not bool((delta != 0).any()):
        return keys
    freqs = delta.to(inv_freq.device, torch.float32)[:, None] * inv_freq.float()[None]
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(keys.dtype), emb.sin().to(keys.dtype)
    half = keys.shape[-1] // 2
    rotated_half = torch.cat([-keys[..., half:], keys[..., :half]], -1)
    return keys * cos + rotated_half * sin


@dataclass
class KV:
    """A cache as plain per-layer tensors plus what each slot is ("sink", "mem" or "win")."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    kinds: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.kinds)

    def cache(self, upto: int | None = None) -> CompressedCache:
        """The first ``upto`` slots as the library's one cache type: positions continue from the slot count (the
        StreamingLLM layout numbers slots by their index), and its "mem" slots are what a memory gate biases."""
        n = len(self.kinds) if upto is None else upto
        mem = torch.tensor([k == "mem" for k in self.kinds[:n]], dtype=torch.bool, device=self.keys[0].device)
        return CompressedCache([k[:, :, :n] for k in self.keys], [v[:, :, :n] for v in self.values], n, mem)

    def select(self, idx: Sequence[int], inv_freq: torch.Tensor, extra: KV | None = None,
               extra_old_pos: Sequence[int] = ()) -> KV:
        """Keep slots ``idx`` (in that order) then the slots of ``extra``; re-rotate every key to its new index."""
        dev = self.keys[0].device
        new_k, new_v = [], []
        old = torch.tensor(list(idx) + list(extra_old_pos), device=dev)
        delta = torch.arange(len(old), device=dev) - old
        sel = torch.tensor(list(idx), dtype=torch.long, device=dev)
        for layer in range(len(self.keys)):
            k, v = self.keys[layer][:, :, sel], self.values[layer][:, :, sel]
            if extra is not None:
                k, v = torch.cat([k, extra.keys[layer]], 2), torch.cat([v, extra.values[layer]], 2)
            new_k.append(rotate_keys(k, delta, inv_freq))
            new_v.append(v)
        kinds = [self.kinds[i] for i in idx] + (list(extra.kinds) if extra is not None else [])
        return KV(new_k, new_v, kinds)


@dataclass
class StreamConfig:
    window: int = 160  # compress (or evict) when the cache reaches this many slots
    chunk: int = 64  # oldest window tokens compressed at once
    mem_slots: int = 8  # at most this many ⟨COMP⟩ slots (FIFO)
    sink: int = 1


@dataclass
class StreamResult:
    method: str
    nll: list[float]  # per predicted token
    cache_sizes: list[int]  # cache slots seen by each prediction
    seconds: float

    @property
    def ppl(self) -> float:
        return math.exp(sum(self.nll) / max(len(self.nll), 1))

    def running_ppl(self, every: int = 100) -> list[tuple[int, float]]:
        out, total = [], 0.0
        for i, x in enumerate(self.nll, 1):
            total += x
            if i % every == 0 or i == len(self.nll):
                out.append((i, math.exp(total / i)))
        return out


class Streamer:
    """Runs one method over a token stream. ``ccm`` is a CompressedModel (its base model serves the baselines:
    with no ⟨COMP⟩ token in the input the gated LoRA is inactive)."""

    def __init__(self, ccm, method: str = "ccm", config: StreamConfig | None = None,
                 budget_schedule: list[int] | None = None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        self.ccm, self.method, self.cfg = ccm, method, config or StreamConfig()
        self.inv_freq = rope_inv_freq(ccm.model)
        self.schedule = list(budget_schedule or [])  # cache sizes after each event (baselines copy CCM's)
        self.events: list[int] = []
        self.merged = 0

    @torch.no_grad()
    def _forward(self, kv: KV | None, ids: list[int], kinds: str = "win", upto: int | None = None):
        dev = self.ccm.device
        past = len(kv) if kv is not None and upto is None else (upto or 0)
        cache = kv.cache(upto) if kv is not None and past else DynamicCache()
        t = torch.tensor([ids], device=dev)
        pos = torch.arange(past, past + len(ids), device=dev)[None]
        mask = torch.ones(1, past + len(ids), dtype=torch.long, device=dev)
        out = self.ccm.model(input_ids=t, position_ids=pos, cache=cache, use_cache=True, attention_mask=mask)
        c = out.cache
        new = KV([la.keys[:, :, past:] for la in c.layers], [la.values[:, :, past:] for la in c.layers],
                 [kinds] * len(ids))
        return out.logits[0].float(), new

    def _append(self, kv: KV | None, new: KV) -> KV:
        if kv is None or not len(kv):
            return new
        return KV([torch.cat([a, b], 2) for a, b in zip(kv.keys, new.keys)],
                  [torch.cat([a, b], 2) for a, b in zip(kv.values, new.values)], kv.kinds + new.kinds)

    def _event(self, kv: KV) -> KV:
        cfg = self.cfg
        sink = [i for i, k in enumerate(kv.kinds) if k == "sink"]
        mem = [i for i, k in enumerate(kv.kinds) if k == "mem"]
        win = [i for i, k in enumerate(kv.kinds) if k == "win"]
        if self.method == "ccm":
            n = self.ccm.config.n_tok
            prev = len(sink) + len(mem)
            upto = prev + cfg.chunk
            _, comp = self._forward(kv, self.ccm.tokens.comp_ids, kinds="mem", upto=upto)
            comp_pos = list(range(upto, upto + n))
            if self.ccm.config.merging and mem:
                a = 1.0 / (self.merged + 1)
                # bring the new slots to the memory's indices, then take the running mean (keys and values)
                shift = torch.tensor([mem[j] - comp_pos[j] for j in range(n)], device=comp.keys[0].device)
                ck = [rotate_keys(k, shift, self.inv_freq) for k in comp.keys]
                sel = torch.tensor(mem, device=kv.keys[0].device)
                for layer in range(len(kv.keys)):
                    kv.keys[layer][:, :, sel] = (1 - a) * kv.keys[layer][:, :, sel] + a * ck[layer]
                    kv.values[layer][:, :, sel] = (1 - a) * kv.values[layer][:, :, sel] + a * comp.values[layer]
                new = kv.select(sink + mem + win[cfg.chunk:], self.inv_freq)
            else:
                overflow = max(0, len(mem) + n - cfg.mem_slots)
                keep = sink + mem[overflow:]
                new = kv.select(keep, self.inv_freq, extra=comp, extra_old_pos=comp_pos)
                new = self._append_window(new, kv, win[cfg.chunk:])
            self.merged += 1
            self.schedule.append(len(new))
            return new
        target = self.schedule[len(self.events)] if len(self.events) < len(self.schedule) else \
            len(kv) - cfg.chunk
        self.events.append(target)
        if self.method == "streamingllm":
            rest = mem + win
            keep = sink + rest[len(rest) - (target - len(sink)):]
        else:
            allk = sink + mem + win
            keep = allk[len(allk) - target:]
        return kv.select(keep, self.inv_freq)

    def _append_window(self, new: KV, old: KV, idx: list[int]) -> KV:
        """Append the kept window slots of ``old`` after ``new``'s slots, re-rotated to their new indices."""
        if not idx:
            return new
        tail = old.select(idx, self.inv_freq)  # rotated to indices 0..len-1
        shift = torch.full((len(idx),), len(new), device=tail.keys[0].device)
        tail.keys = [rotate_keys(k, shift, self.inv_freq) for k in tail.keys]
        return self._append(new, tail)

    def run(self, tokens: Sequence[int], progress: bool = False) -> StreamResult:
        from tqdm.auto import tqdm

        cfg, kv = self.cfg, None
        nll, sizes = [], []
        t0 = time.perf_counter()
        i = 0
        bar = tqdm(total=len(tokens) - 1, desc=f"stream {self.method}", disable=not progress, leave=False)
        while i < len(tokens) - 1:
            size = len(kv) if kv is not None else 0
            if size >= cfg.window:
                kv = self._event(kv)
                size = len(kv)
            block = tokens[i:min(i + cfg.window - size, len(tokens) - 1)]
            kinds = "win"
            if i == 0 and cfg.sink and self.method != "window":
                block, kinds = tokens[:1], "sink"
            logits, new = self._forward(kv, list(block), kinds)
            kv = self._append(kv, new)
            targets = torch.tensor(tokens[i + 1:i + 1 + len(block)], device=logits.device)
            nll += torch.nn.functional.cross_entropy(logits[: len(targets)], targets, reduction="none").tolist()
            sizes += [size + j + 1 for j in range(len(block))]
            i += len(block)
            bar.update(len(block))
        bar.close()
        return StreamResult(self.method, nll, sizes, time.perf_counter() - t0)


def stream_all(ccm, tokens: Sequence[int], config: StreamConfig | None = None, progress: bool = False
               ) -> dict[str, StreamResult]:
    """CCM first, then StreamingLLM and the sliding window on CCM's cache-size schedule (equal KV budget)."""
    ccm_run = Streamer(ccm, "ccm", config)
    out = {"ccm": ccm_run.run(tokens, progress)}
    for m in ("streamingllm", "window"):
        out[m] = Streamer(ccm, m, config, budget_schedule=ccm_run.schedule).run(tokens, progress)
    return out


def load_stream_tokens(tok, text: str = "kjv:new", start: int = 9000, length: int = 16000) -> list[int]:
    """Tokens [start, start + length) of a text (a name such as ``kjv:new`` or ``devil``, see
    :func:`ccmem.data.text.named_text`, or a PG-19-style file/folder)."""
    from .data.text import named_text

    ids = tok(named_text(text), add_special_tokens=False)["input_ids"]
    if len(ids) < start + length:
        start = max(0, len(ids) - length)
    return ids[start:start + length]


def run_stream(adapter: str, text: str = "kjv:new", tokens: int = 16000, start: int = 9000,
               config: StreamConfig | None = None, device: str | None = None, progress: bool = True) -> dict:
    """Stream a text through CCM, StreamingLLM and the sliding window at equal KV budgets; returns a summary."""
    from .memory import bytes_per_slot
    from .model import CompressedModel
    from .models import load_model

    model, tok = load_model(device=device)
    ccm = CompressedModel.from_pretrained(adapter, model, tokenizer=tok)
    ids = load_stream_tokens(tok, text, start, tokens)
    runs = stream_all(ccm, ids, config, progress=progress)
    per_slot = bytes_per_slot(model)
    return {"runs": runs, "tokens": len(ids), "bytes_per_slot": per_slot, "adapter": str(adapter), "text": text,
            "start": start, "config": config or StreamConfig()}
