"""The online loop: add context chunks (compress them into memory), score continuations, generate replies.

Every call runs the model on ``[memory | new tokens]`` with explicit position ids (the memory's text offset plus
skip positions) and an explicit 4D mask, so rows of a batch may have different lengths (right padding) and the
memory's invalid slots stay invisible. This is the step-by-step computation that the parallel forward reproduces.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError, InputError
from .masks import online_mask, to_additive
from .memory import CompressedMemory
from .positions import skip_position_ids
from .sequence import pad_batch

Rows = Sequence[Sequence[int] | None]


def _grad_mode(fn):
    """Run a Session method without autograd unless the session was made with ``grad=True``."""
    import functools

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with torch.set_grad_enabled(self.grad):
            return fn(self, *args, **kwargs)

    return wrapper


@dataclass
class StepReport:
    """What one compression step did, per row: text tokens read, memory slots and bytes afterwards."""

    tokens: list[int]
    slots: list[int]
    memory_bytes: int
    tail_tokens: list[int] | None = None  # raw-tail tokens per row (raw_tail > 0), counted in memory_bytes


@dataclass
class Score:
    """Log-likelihood of continuations, per row."""

    logprob: torch.Tensor  # (B,) summed log-probability of the scored tokens
    ntokens: torch.Tensor  # (B,) number of scored tokens
    token_logprobs: list[torch.Tensor]

    @property
    def nll(self) -> torch.Tensor:
        return -self.logprob

    @property
    def ppl(self) -> float:
        """Token-pooled perplexity over all rows."""
        return float(torch.exp(self.nll.sum() / self.ntokens.sum().clamp(min=1)))


class Session:
    """An online interaction with bounded memory. One row per independent conversation in the batch."""

    def __init__(self, ccm: Any, batch_size: int = 1, grad: bool = False) -> None:
        """``grad=True`` keeps the autograd graph through the memory, for training the recurrence step by step
        (back-propagation through the online loop, as RMT/AutoCompressor-style training does)."""
        self.grad = grad
        if ccm.config.variant == "gist":
            raise ConfigError(
                "the gist variant recompresses the whole history at every step and has no online memory; "
                "use concat_recur or merge_recur for a session"
            )
        self.ccm = ccm
        self.batch_size = batch_size
        self.reset()

    # ---------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget everything: an empty memory."""
        dtype = self.ccm.model.get_input_embeddings().weight.dtype
        self.memory = CompressedMemory.empty(
            self.batch_size, self.ccm.fingerprint(), self.ccm.config, dtype, self.ccm.device
        )

    def save(self, path: str | os.PathLike) -> None:
        self.memory.save(path)

    def load(self, path: str | os.PathLike) -> None:
        mem = CompressedMemory.load(path, self.ccm)
        self.memory, self.batch_size = mem, mem.batch_size

    # ---------------------------------------------------------------- input handling
    def _ids(self, x: Any) -> list[int] | None:
        if x is None:
            return None
        if isinstance(x, str):
            if self.ccm.tokenizer is None:
                raise InputError("text input needs a tokenizer; attach the model with tokenizer=... or pass ids")
            return self.ccm.tokenizer(x, add_special_tokens=False)["input_ids"]
        if isinstance(x, torch.Tensor):
            x = x.tolist()
        return [int(t) for t in x]

    def _rows(self, x: Any, allow_none: bool = False) -> list[list[int] | None]:
        rows = [self._ids(x)] if _is_single(x) else [self._ids(r) for r in x]
        if len(rows) != self.batch_size:
            raise InputError(f"got {len(rows)} rows for a session of batch size {self.batch_size}")
        for b, r in enumerate(rows):
            if r is None and not allow_none:
                raise InputError(f"row {b} is None; every row needs tokens here")
            if r is not None and len(r) == 0:
                raise InputError(f"row {b} is empty; pass at least one token (or None to skip the row)")
            if r is not None and any(self.ccm.tokens.is_special(torch.tensor(r)).tolist()):
                raise InputError(f"row {b} contains ⟨COMP⟩/SUM ids; ccmem inserts them itself")
        return rows

    # ---------------------------------------------------------------- one forward on memory
    def _run(self, cache, key_valid: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor):
        if int(pos.masked_fill(valid == 0, 0).max()) >= self.ccm.max_positions:
            raise InputError(
                f"this input reaches position {int(pos.max())}, past the model's {self.ccm.max_positions}; "
                "shorten it or start a new session (reset)"
            )
        kv = torch.cat([key_valid, valid.bool()], 1)
        dtype = self.ccm.model.get_input_embeddings().weight.dtype
        mask = to_additive(online_mask(kv, ids.shape[1]), dtype)
        extra = {}
        if self.ccm.gated:  # the memory's compressed slots are the first columns; the gate biases them
            mem = self.memory.memory_slots()
            cols = torch.zeros(kv.shape[1], dtype=dtype, device=kv.device)
            cols[: mem.shape[0]] = mem.to(dtype)
            extra["ccmem_memory"] = cols.view(1, 1, 1, -1)
        out = self.ccm.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                             **extra)
        return out.logits, out.cache, kv

    def _batch(self, rows: list[list[int] | None], suffix: list[int] = (), tail: bool = True
               ) -> tuple[torch.Tensor, ...]:
        """Right-padded ids + ``suffix`` (e.g. the ⟨COMP⟩ group) at a common index, with validity and positions.
        ``tail``: put each row's raw-tail tokens in front of its ids (inputs read on top of the memory)."""
        dev = self.ccm.device
        filled = [r if r is not None else [] for r in rows]
        if tail:
            filled = [self.memory.tail_ids(b) + r for b, r in enumerate(filled)]
        ids, valid = pad_batch(filled, pad_id=0, side="right")
        if suffix:
            active = torch.tensor([r is not None for r in rows], dtype=torch.long)[:, None]
            ids = torch.cat([ids, torch.tensor([list(suffix)] * len(rows), dtype=torch.long)], 1)
            valid = torch.cat([valid, active.expand(-1, len(suffix))], 1)
        ids, valid = ids.to(dev), valid.to(dev)
        special = self.ccm.tokens.is_special(ids)
        pos = skip_position_ids(special, self.ccm.config.n_tok, valid, self.memory.offset)
        lens = torch.tensor([len(r) for r in filled], dtype=torch.long, device=dev)
        return ids, valid, pos, lens

    # ---------------------------------------------------------------- public API
    @_grad_mode
    def add_context(self, chunks: Any) -> StepReport:
        """Compress one chunk per row into memory (None skips a row): h(t) = g(Mem(t-1), c(t)).

        With ``raw_tail=k`` the chunk first joins the row's raw tail; the chunk that leaves the tail (the row's
        (k+1)-th newest) is the one compressed."""
        rows = self._rows(chunks, allow_none=True)
        if all(r is None for r in rows):
            raise InputError("every row is None; nothing to compress")
        k, mem = self.ccm.config.raw_tail, self.memory
        if k:
            leaving: list[list[int] | None] = []
            for b, r in enumerate(rows):
                if r is not None:
                    mem.tail[b] = mem.tail[b] + [r]  # a new list: forks share nothing mutable
                leaving.append(mem.tail[b][0] if len(mem.tail[b]) > k else None)
                if leaving[-1] is not None:
                    mem.tail[b] = mem.tail[b][1:]
            rows = leaving
        if any(r is not None for r in rows):
            self._compress(rows)
        return StepReport(tokens=[len(r) if r else 0 for r in rows], slots=mem.slots_per_row(),
                          memory_bytes=mem.kv_bytes, tail_tokens=mem.tail_tokens())

    def _compress(self, rows: list[list[int] | None]) -> None:
        mem, cfg = self.memory, self.ccm.config
        ids, valid, pos, lens = self._batch(rows, suffix=self.ccm.tokens.comp_ids, tail=False)
        active = torch.tensor([r is not None for r in rows], device=ids.device)
        visible = mem.valid if cfg.recurrent else mem.valid & mem.sink_slots()[None]
        _, cache, _ = self._run(mem.to_cache(), visible, ids, valid, pos)
        m, n = mem.num_slots, cfg.n_tok
        layers = cache.layers
        if cfg.sink:
            first = active & (mem.steps == 0)
            if bool(first.any()):
                mem.add_sink([la.keys[:, :, m:m + 1] for la in layers], [la.values[:, :, m:m + 1] for la in layers],
                             first)
        mem.add_step([la.keys[:, :, -n:] for la in layers], [la.values[:, :, -n:] for la in layers], active, lens)

    @_grad_mode
    def add_raw(self, chunks: Any) -> StepReport:
        """Keep one chunk per row uncompressed: its tokens' keys/values join the memory verbatim. This is the
        full-context (or sliding-window) baseline in the session's terms; it needs a concat memory."""
        rows = self._rows(chunks, allow_none=True)
        if self.ccm.config.merging:
            raise ConfigError("add_raw needs a concat memory; a merge memory averages its slots")
        if any(self.memory.tail):
            raise ConfigError("add_raw cannot follow chunks waiting in the raw tail; use add_context")
        ids, valid, pos, lens = self._batch(rows, tail=False)
        _, cache, _ = self._run(self.memory.to_cache(), self.memory.valid, ids, valid, pos)
        m = self.memory.num_slots
        self.memory.add_raw([la.keys[:, :, m:] for la in cache.layers], [la.values[:, :, m:] for la in cache.layers],
                            valid.bool(), lens)
        return StepReport(tokens=[len(r) if r else 0 for r in rows], slots=self.memory.slots_per_row(),
                          memory_bytes=self.memory.kv_bytes)

    @torch.no_grad()
    def cache(self) -> Any:
        """The memory as a transformers ``Cache`` (:class:`~ccmem.cache.CompressedCache`); the raw tail, if any, is
        read into it first. For ``model.generate`` use :meth:`generation_inputs`, which adds the 2D mask that tells
        generate where the new tokens start. Every row must stand at the same point (same text offset, every slot
        valid, equal tails): use
        :meth:`generate` for rows that differ. A fresh view each call; the memory is not changed."""
        from .cache import CompressedCache

        mem = self.memory
        if len(set(mem.offset.tolist())) != 1 or not bool(mem.valid.all()) or len({len(mem.tail_ids(b)) for b in
                                                                                 range(self.batch_size)}) != 1:
            raise InputError(
                "model.generate reads one position for every row, but this session's rows have compressed different "
                "amounts of text (or hold unused slots or raw tails of different lengths); use Session.generate, "
                "which handles each row apart, or one session per conversation"
            )
        cache = CompressedCache.from_memory(mem)
        tail = [mem.tail_ids(b) for b in range(self.batch_size)]
        if tail[0]:
            self.ccm.model(input_ids=torch.tensor(tail, device=self.ccm.device), cache=cache, use_cache=True)
        return cache

    def generation_inputs(self, prompt: Any) -> dict[str, Any]:
        """Keyword arguments for ``model.generate`` that continue from the memory exactly as :meth:`generate` does:

            out = ccm.model.generate(**session.generation_inputs(prompt), max_new_tokens=32, streamer=...)
            reply = out[:, len(prompt):]

        ``input_ids`` is the prompt alone; ``attention_mask`` covers the positions the memory stands for plus the
        prompt (transformers' form for "the cache holds the past, these are the new tokens"), so generate numbers
        the prompt from the memory's text offset."""
        rows = self._rows(prompt)
        if len({len(r) for r in rows}) != 1:
            raise InputError("model.generate takes prompts of one length per batch; pad them or use Session.generate")
        cache = self.cache()
        ids = torch.tensor(rows, device=self.ccm.device)
        mask = torch.ones(len(rows), cache.get_seq_length() + ids.shape[1], dtype=torch.long, device=ids.device)
        return {"input_ids": ids, "attention_mask": mask, "cache": cache}

    # ---------------------------------------------------------------- chat messages
    def _single_row(self, what: str) -> None:
        if self.batch_size != 1:
            raise InputError(f"{what} takes one conversation; this session has {self.batch_size} rows")

    def _opens(self) -> bool:
        return int(self.memory.steps[0]) == 0 and not self.memory.tail[0]

    def add_message(self, message: dict[str, str]) -> StepReport:
        """Compress one chat message (``{"role": ..., "content": ...}``) rendered by the tokenizer's chat template
        (:mod:`ccmem.chat_template`): one message is one chunk."""
        from .chat_template import message_ids

        self._single_row("add_message")
        return self.add_context(message_ids(self.ccm.tokenizer, message, first=self._opens()))

    def reply(self, message: dict[str, str], compress: bool = True, **generate_kwargs: Any) -> str:
        """Answer a user message from memory with the chat template's generation prompt; then (``compress``) the
        message and the reply join the memory as two chunks. Returns the reply text. ``generate_kwargs`` go to
        :meth:`generate` (the end-of-turn token of the tokenizer stops it)."""
        from .chat_template import generation_prompt_ids, message_ids

        self._single_row("reply")
        tok = self.ccm.tokenizer
        first = self._opens()
        ids = message_ids(tok, message, first=first)
        out = self.generate(ids + generation_prompt_ids(tok), **generate_kwargs)
        text = tok.decode(out, skip_special_tokens=True).strip()
        if compress:
            self.add_context(ids)
            self.add_context(message_ids(tok, {"role": "assistant", "content": text}, first=False))
        return text

    def fork(self, n: int) -> Session:
        """A new session of ``n`` rows, each starting from this single-row session's memory (the memory tensors are
        shared, not copied; later steps write new tensors, so the forks never disturb each other or this one)."""
        s = Session.__new__(Session)
        s.grad, s.ccm, s.batch_size = self.grad, self.ccm, n
        s.memory = self.memory.repeat(n)
        return s

    @_grad_mode
    def logits(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, L, V) of uncompressed tokens read on top of the memory, and their validity (B, L)."""
        rows = self._rows(inputs)
        ids, valid, pos, _ = self._batch(rows)
        logits, _, _ = self._run(self.memory.to_cache(), self.memory.valid, ids, valid, pos)
        skip = self.memory.tail_tokens()
        if any(skip):  # drop the raw tail's positions: the caller asked about its own tokens only
            width = max(len(r) for r in rows)
            idx = torch.tensor([[min(s + j, ids.shape[1] - 1) for j in range(width)] for s in skip],
                               device=logits.device)
            logits = logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))
            valid = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=valid.device)
        return logits, valid

    @_grad_mode
    def score(self, prompts: Any, targets: Any) -> Score:
        """Log-likelihood of ``targets`` given memory + ``prompts`` (the prompt itself is not scored)."""
        p_rows, t_rows = self._rows(prompts), self._rows(targets)
        logits, _ = self.logits([p + t for p, t in zip(p_rows, t_rows)])
        logp = torch.log_softmax(logits.float(), -1)
        per_row, lp_sum = [], []
        for b, (p, t) in enumerate(zip(p_rows, t_rows)):
            idx = torch.arange(len(p) - 1, len(p) + len(t) - 1, device=logits.device)
            lp = logp[b, idx, torch.tensor(t, device=logits.device)]
            per_row.append(lp)
            lp_sum.append(lp.sum())
        return Score(torch.stack(lp_sum), torch.tensor([len(t) for t in t_rows]), per_row)

    @_grad_mode
    def generate(
        self,
        queries: Any,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        on_token: Any = None,
    ) -> list[list[int]] | list[int]:
        """Reply to ``queries`` from memory; greedy by default. The memory is not changed (compress the turn
        afterwards with :meth:`add_context`). Returns the new token ids (without the end token) per row.
        ``on_token(row, token_id)`` is called for every token as it is produced (streaming)."""
        single = _is_single(queries)
        rows = self._rows(queries)
        if eos_token_id is None and self.ccm.tokenizer is not None:
            eos_token_id = self.ccm.tokenizer.eos_token_id
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        processors = _warpers(do_sample, temperature, top_k, top_p, repetition_penalty)
        gen = torch.Generator(device=self.ccm.device)
        if seed is not None:
            gen.manual_seed(seed)

        ids, valid, pos, lens = self._batch(rows)
        logits, cache, kv = self._run(self.memory.to_cache(), self.memory.valid, ids, valid, pos)
        b_idx = torch.arange(len(rows), device=ids.device)
        next_logits = logits[b_idx, lens - 1]
        out: list[list[int]] = [[] for _ in rows]
        done = torch.zeros(len(rows), dtype=torch.bool, device=ids.device)
        text_len = self.memory.offset + lens
        history = ids
        for _ in range(max_new_tokens):
            scores = processors(history, next_logits.float()) if processors else next_logits.float()
            if do_sample:
                tok = torch.multinomial(torch.softmax(scores, -1), 1, generator=gen).squeeze(1)
            else:
                tok = scores.argmax(-1)
            for b in range(len(rows)):
                if not done[b]:
                    if int(tok[b]) in eos:
                        done[b] = True
                    else:
                        out[b].append(int(tok[b]))
                        if on_token is not None:
                            on_token(b, int(tok[b]))
            if bool(done.all()):
                break
            step_valid = (~done).long()[:, None]
            tok = tok.masked_fill(done, 0)
            history = torch.cat([history, tok[:, None]], 1)
            logits, cache, kv = self._run(cache, kv, tok[:, None], step_valid, text_len[:, None])
            text_len = text_len + 1
            next_logits = logits[:, -1]
        return out[0] if single else out


def _is_single(x: Any) -> bool:
    """One row given bare (a string, a 1-D tensor or a flat list of ids) rather than a list of rows."""
    return isinstance(x, str) or (isinstance(x, torch.Tensor) and x.dim() == 1) or (
        isinstance(x, (list, tuple)) and (len(x) == 0 or isinstance(x[0], int)))


def _warpers(do_sample: bool, temperature: float, top_k: int, top_p: float, repetition_penalty: float = 1.0):
    """transformers' own logits processors; None when plain greedy decoding needs none."""
    if not do_sample and repetition_penalty == 1.0:
        return None
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if not do_sample:
        return procs
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return procs
