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

from .config import CompressionConfig
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


def require_online(config: CompressionConfig, source: str | None = None) -> None:
    """Refuse a compression config without an online memory (``config.online``) with an error that says what to use.

    One refusal for every place that would run a session on it (the session itself, the chat before it loads the
    model, the load benchmark before its first half), so their messages cannot drift apart."""
    if not config.online:
        what = f"adapter {source} is a gist adapter" if source else "the gist variant"
        raise ConfigError(
            f"{what}: it recompresses the whole history at every step and has no online memory for a session; "
            "use a concat_recur or merge_recur adapter"
        )


class Session:
    """An online interaction with bounded memory. One row per independent conversation in the batch."""

    def __init__(self, ccm: Any, batch_size: int = 1, grad: bool = False) -> None:
        """``grad=True`` keeps the autograd graph through the memory, for training the recurrence step by step
        (back-propagation through the online loop, as RMT/AutoCompressor-style training does)."""
        self.grad = grad
        require_online(ccm.config)
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

    def _stamp(self) -> None:
        """The memory now holds slots this adapter wrote: record it (the last writer; not while training through
        the loop, where the weights change every step and the memory is not kept)."""
        if not self.grad:
            self.memory.adapter = self.ccm.adapter_id()

    def save(self, path: str | os.PathLike) -> None:
        self.memory.save(path)

    def load(self, path: str | os.PathLike, any_adapter: bool = False) -> None:
        """Continue from a saved memory (see :meth:`CompressedMemory.load`: one written by another adapter is
        refused unless ``any_adapter``)."""
        mem = CompressedMemory.load(path, self.ccm, any_adapter=any_adapter)
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
        _, cache, _ = self._run(self.cache(), visible, ids, valid, pos)
        m, n = mem.num_slots, cfg.n_tok
        layers = cache.layers
        if cfg.sink:
            first = active & (mem.steps == 0)
            if bool(first.any()):
                mem.add_sink([la.keys[:, :, m:m + 1] for la in layers], [la.values[:, :, m:m + 1] for la in layers],
                             first)
        mem.add_step([la.keys[:, :, -n:] for la in layers], [la.values[:, :, -n:] for la in layers], active, lens)
        self._stamp()

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
        _, cache, _ = self._run(self.cache(), self.memory.valid, ids, valid, pos)
        m = self.memory.num_slots
        self.memory.add_raw([la.keys[:, :, m:] for la in cache.layers], [la.values[:, :, m:] for la in cache.layers],
                            valid.bool(), lens)
        if not self.ccm.config.conditional:  # a conditional LoRA leaves verbatim tokens to the base model
            self._stamp()
        return StepReport(tokens=[len(r) if r else 0 for r in rows], slots=self.memory.slots_per_row(),
                          memory_bytes=self.memory.kv_bytes)

    def cache(self, position: int | None = None) -> Any:
        """The memory as a transformers ``Cache`` (:class:`~ccmem.cache.CompressedCache`), a fresh view: a forward
        appends to it, never to the memory. ``position``: where new tokens start counting (default: the memory's
        text offset when every row shares it). For ``model.generate`` use :meth:`generation_inputs`, which also
        reads the raw tail and handles rows at different points."""
        from .cache import CompressedCache

        return CompressedCache.from_memory(self.memory, position)

    def generation_inputs(self, prompt: Any) -> dict[str, Any]:
        """Keyword arguments for ``model.generate`` that continue each row from its memory:

            out = ccm.model.generate(**session.generation_inputs(prompts), max_new_tokens=32, streamer=...)
            replies = out[:, inputs["input_ids"].shape[1]:]

        Rows may stand at different points (memories of different sizes and text offsets, prompts of different
        lengths): prompts (each behind its row's raw tail) are left-padded, ``position_ids`` number each row from
        its own text offset, and the 2D ``attention_mask`` marks, at the cache's key positions, which memory slots
        each row holds and which prompt tokens are real."""
        rows = self._rows(prompt)
        mem, dev = self.memory, self.ccm.device
        full = [mem.tail_ids(b) + r for b, r in enumerate(rows)]
        width, slots = max(map(len, full)), mem.num_slots
        start = max(int(mem.offset.max()), slots)  # key positions [start - M, start) hold the memory
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=dev)
        pos = torch.ones(len(rows), width, dtype=torch.long, device=dev)
        mask = torch.zeros(len(rows), start + width, dtype=torch.long, device=dev)
        mask[:, start - slots:start] = mem.valid.long()
        for b, f in enumerate(full):
            pad = width - len(f)
            ids[b, pad:] = torch.tensor(f, device=dev)
            pos[b, pad:] = int(mem.offset[b]) + torch.arange(len(f), device=dev)
            mask[b, start + pad:] = 1
        if int(pos.max()) >= self.ccm.max_positions:
            raise InputError(f"this input reaches position {int(pos.max())}, past the model's "
                             f"{self.ccm.max_positions}; shorten it or start a new session (reset)")
        return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "cache": self.cache(start)}

    # ---------------------------------------------------------------- chat messages
    def _single_row(self, what: str) -> None:
        if self.batch_size != 1:
            raise InputError(f"{what} takes one conversation; this session has {self.batch_size} rows")

    @property
    def fresh(self) -> bool:
        """Nothing read yet (row 0): the next chat message opens the conversation (template opening included)."""
        return int(self.memory.steps[0]) == 0 and not self.memory.tail[0]

    def add_message(self, message: dict[str, str]) -> StepReport:
        """Compress one chat message (``{"role": ..., "content": ...}``) rendered by the tokenizer's chat template
        (:mod:`ccmem.chat_template`): one message is one chunk."""
        from .chat_template import message_ids

        self._single_row("add_message")
        return self.add_context(message_ids(self.ccm.tokenizer, message, first=self.fresh))

    def reply(self, message: dict[str, str], compress: bool = True, **generate_kwargs: Any) -> str:
        """Answer a user message from memory with the chat template's generation prompt; then (``compress``) the
        message and the reply join the memory as two chunks. Returns the reply text. ``generate_kwargs`` go to
        :meth:`generate` (the end-of-turn token of the tokenizer stops it)."""
        from .chat_template import generation_prompt_ids, message_ids

        self._single_row("reply")
        tok = self.ccm.tokenizer
        first = self.fresh
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
        logits, _, _ = self._run(self.cache(), self.memory.valid, ids, valid, pos)
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

    @torch.no_grad()
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
        stop_strings: list[str] | None = None,
        **generate_kwargs: Any,
    ) -> list[list[int]] | list[int]:
        """Reply to ``queries`` from memory with transformers' ``generate`` on the memory's cache
        (:meth:`generation_inputs`); greedy by default. The memory is not changed (compress the turn afterwards with
        :meth:`add_context`). Returns the new token ids (without the end token) per row. ``eos_token_id=None``
        uses the tokenizer's; ``seed`` samples reproducibly without touching the global RNG; ``on_token(row,
        token_id)`` is called for every token as it is produced; other keywords go to ``generate``."""
        single = _is_single(queries)
        inputs = self.generation_inputs(queries)
        if eos_token_id is None and self.ccm.tokenizer is not None:
            eos_token_id = self.ccm.tokenizer.eos_token_id
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                              "eos_token_id": eos or None, "pad_token_id": eos[0] if eos else 0, **generate_kwargs}
        if do_sample:
            kw.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
        if repetition_penalty != 1.0:
            kw["repetition_penalty"] = repetition_penalty
        if stop_strings:
            kw.update(stop_strings=list(stop_strings), tokenizer=self.ccm.tokenizer)
        if on_token is not None:
            kw["streamer"] = _RowStreamer(on_token, set(eos))
        with torch.random.fork_rng(devices=[self.ccm.device] if self.ccm.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            out = self.ccm.model.generate(**inputs, **kw)
        out = out[:, inputs["input_ids"].shape[1]:].tolist()
        replies = [r[: next((i for i, t in enumerate(r) if t in eos), len(r))] for r in out]
        return replies[0] if single else replies


class _RowStreamer:
    """transformers' streamer protocol as ``on_token(row, token)`` calls, each row up to its end token (generate
    first puts the prompt, then one token per row and step)."""

    def __init__(self, on_token: Any, eos: set[int]) -> None:
        self.on_token, self.eos, self.prompt, self.done = on_token, eos, True, None

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:
            self.prompt = False
            return
        toks = value.reshape(-1).tolist()
        if self.done is None:
            self.done = [False] * len(toks)
        for b, t in enumerate(toks):
            if self.done[b] or t in self.eos:
                self.done[b] = True
                continue
            self.on_token(b, t)

    def end(self) -> None:
        pass


def _is_single(x: Any) -> bool:
    """One row given bare (a string, a 1-D tensor or a flat list of ids) rather than a list of rows."""
    return isinstance(x, str) or (isinstance(x, torch.Tensor) and x.dim() == 1) or (
        isinstance(x, (list, tuple)) and (len(x) == 0 or isinstance(x[0], int)))
