"""The server's model work: open a session (hot, on disk or new), compress what is new, answer, save, answer back.

One model serves every session, and an attached model keeps per-forward state, so model work runs one request at a
time (a lock); requests beyond ``max_queue`` waiting are refused (:class:`QueueFull`, HTTP 429). Hot sessions stay in
RAM in LRU order while their memories fit ``hot_bytes``; colder ones are reloaded from their file (they are saved
after every turn anyway).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from ..chat_template import check_message, generation_prompt_ids, message_ids
from ..errors import InputError
from ..session import Session
from .store import SessionMeta, SessionStore
from .transcript import link, plan


class QueueFull(RuntimeError):
    """More requests are waiting for the model than the server accepts."""


@dataclass
class Limits:
    max_messages: int = 256
    max_message_tokens: int = 2048
    max_new_tokens: int = 1024
    max_queue: int = 16


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    session: SessionMeta


class _Deltas(BaseStreamer):
    """Turns generated ids into text pieces as they come (decoding the whole reply each time keeps multi-token
    characters intact); the first ``put`` is the prompt and is skipped."""

    def __init__(self, tok: Any, on_text: Callable[[str], None]) -> None:
        self.tok, self.on_text, self.ids, self.sent, self.prompt = tok, on_text, [], "", True

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:
            self.prompt = False
            return
        self.ids += value.reshape(-1).tolist()
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if len(text) > len(self.sent) and not text.endswith("\ufffd"):
            self.on_text(text[len(self.sent):])
            self.sent = text

    def end(self) -> None:
        pass


class Engine:
    def __init__(self, ccm: Any, store: SessionStore, limits: Limits | None = None, hot_bytes: int = 1 << 30,
                 model_name: str = "ccmem", full_history: bool = False) -> None:
        """``full_history``: keep every message's raw keys/values instead of compressing them (the baseline a
        plain server with per-session KV caching is: memory grows with every token said)."""
        if ccm.tokenizer is None:
            raise InputError("the server needs a model attached with its tokenizer")
        if full_history and ccm.config.merging:
            raise InputError("a full-history server needs a concat model (a merge memory averages its slots)")
        self.full_history = full_history
        self.ccm, self.tok, self.store = ccm, ccm.tokenizer, store
        self.limits, self.hot_bytes, self.model_name = limits or Limits(), hot_bytes, model_name
        self.hot: OrderedDict[tuple[str, str], tuple[Session, SessionMeta]] = OrderedDict()
        self.model_lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(self.limits.max_queue)
        self.stats = {"tokens_compressed": 0, "tokens_generated": 0}

    # ------------------------------------------------------------------ sessions
    def _open(self, owner: str, sid: str) -> tuple[Session, SessionMeta]:
        key = (owner, sid)
        if key in self.hot:
            self.hot.move_to_end(key)
            return self.hot[key]
        meta = self.store.get(owner, sid)
        session = self.ccm.session()
        if meta is None:
            meta = SessionMeta(owner, sid)
        elif meta.file:
            session.load(self.store.path(meta))
        self.hot[key] = (session, meta)
        return session, meta

    def _evict(self) -> None:
        while len(self.hot) > 1 and self.hot_memory_bytes() > self.hot_bytes:
            self.hot.popitem(last=False)  # saved after its last turn: reloaded from disk when needed

    def hot_memory_bytes(self) -> int:
        return sum(s.memory.kv_bytes for s, _ in self.hot.values())

    def forget(self, owner: str, sid: str) -> bool:
        with self.model_lock:
            self.hot.pop((owner, sid), None)
            return self.store.delete(owner, sid)

    def session_meta(self, owner: str, sid: str) -> SessionMeta | None:
        hot = self.hot.get((owner, sid))
        return hot[1] if hot else self.store.get(owner, sid)

    def import_memory(self, owner: str, sid: str, path: str) -> SessionMeta:
        """A session whose memory is a saved file (checked against this model); its transcript is unknown, so the
        next request continues from the memory with whatever it sends."""
        with self.model_lock:
            session = self.ccm.session()
            session.load(path)
            old = self.store.get(owner, sid)
            meta = SessionMeta(owner, sid, created=old.created if old else time.time())
            meta.turns = int(session.memory.steps[0])
            self._count(session, meta)
            self.store.save(meta, session)
            self.hot[(owner, sid)] = (session, meta)
            self._evict()
            return meta

    def _keep(self, session: Session, ids: list[int]) -> None:
        """One message joins the session: compressed into n_tok slots, or (full history) kept verbatim."""
        if self.full_history:
            session.add_raw(ids)
        else:
            session.add_context(ids)

    def _count(self, session: Session, meta: SessionMeta) -> None:
        meta.slots, meta.bytes = session.memory.num_slots, session.memory.kv_bytes
        meta.tokens = int(session.memory.offset[0]) + sum(session.memory.tail_tokens())

    # ------------------------------------------------------------------ one request
    def check(self, messages: Any, max_new_tokens: int) -> list[dict[str, str]]:
        """Validate a request before it waits for the model (every problem is the client's: InputError)."""
        if not isinstance(messages, list) or not messages:
            raise InputError("messages must be a non-empty list of {role, content}")
        if len(messages) > self.limits.max_messages:
            raise InputError(f"{len(messages)} messages, more than this server's limit of {self.limits.max_messages}")
        out = [check_message(m) for m in messages]
        if out[-1]["role"] != "user":
            raise InputError("the last message must be the user's (the one to answer)")
        for m in out:
            n = len(self.tok(m["content"], add_special_tokens=False)["input_ids"])
            if n > self.limits.max_message_tokens:
                raise InputError(f"a {m['role']} message has {n} tokens, more than the limit of "
                                 f"{self.limits.max_message_tokens}; split it")
        if not 1 <= max_new_tokens <= self.limits.max_new_tokens:
            raise InputError(f"max_tokens must be in [1, {self.limits.max_new_tokens}], got {max_new_tokens}")
        return out

    def chat(self, owner: str, sid: str, messages: list[dict[str, str]], max_new_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
             on_text: Callable[[str], None] | None = None) -> Reply:
        if not self.slots.acquire(blocking=False):
            raise QueueFull(f"more than {self.limits.max_queue} requests are waiting; retry shortly")
        try:
            with self.model_lock:
                return self._chat(owner, sid, messages, max_new_tokens, temperature, top_p, seed, stop, on_text)
        finally:
            self.slots.release()

    def _chat(self, owner, sid, messages, max_new_tokens, temperature, top_p, seed, stop, on_text) -> Reply:
        session, meta = self._open(owner, sid)
        p = plan(meta.chain, messages[:-1])
        if p.restart:
            session.reset()
            meta.chain, meta.turns, meta.tokens = [], 0, 0
        before = meta.tokens
        read = 0
        for m in p.new:
            ids = message_ids(self.tok, m, first=session._opens())
            read += len(ids)
            self._keep(session, ids)
            meta.chain.append(link(meta.chain[-1] if meta.chain else "", m))
            meta.turns += 1
        user = messages[-1]
        ids = message_ids(self.tok, user, first=session._opens())
        prompt = ids + generation_prompt_ids(self.tok)
        read += len(prompt)
        if seed is not None:
            torch.manual_seed(seed)
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0,
                              "eos_token_id": self.tok.eos_token_id, "pad_token_id": self.tok.pad_token_id
                              if self.tok.pad_token_id is not None else self.tok.eos_token_id}
        if temperature > 0:
            kw.update(temperature=temperature, top_p=top_p)
        if stop:
            kw.update(stop_strings=list(stop), tokenizer=self.tok)
        if on_text is not None:
            kw["streamer"] = _Deltas(self.tok, on_text)
        with torch.no_grad():
            out = self.ccm.model.generate(**session.generation_inputs(prompt), **kw)
        new = out[0, len(prompt):].tolist()
        eos = self.tok.eos_token_id
        finish = "stop" if (eos in new) or len(new) < max_new_tokens else "length"
        if eos in new:
            new = new[: new.index(eos)]
        text = self.tok.decode(new, skip_special_tokens=True)
        for s in stop or []:
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        self._keep(session, ids)
        text = text.strip()
        reply = {"role": "assistant", "content": text}
        self._keep(session, message_ids(self.tok, reply, first=False))
        for m in (user, reply):
            meta.chain.append(link(meta.chain[-1] if meta.chain else "", m))
        meta.turns += 2
        self._count(session, meta)
        self.store.save(meta, session)
        self._evict()
        self.stats["tokens_compressed"] += meta.tokens - before
        self.stats["tokens_generated"] += len(new)
        return Reply(text, read, len(new), finish, meta)
