"""The server's model work: open a session (hot, on disk or new), compress what is new, answer, save, answer back.

One model serves every session, and an attached model keeps per-forward state, so one worker thread does all model
work. It takes the waiting requests of up to ``max_batch`` different sessions that share sampling settings and runs
them as one batch: their memories are stacked (:meth:`~ccmem.memory.CompressedMemory.stack`), the replies generated
together, the user messages and replies compressed in one forward each, and the memories split back. Requests of
one session stay in order; requests beyond ``max_queue`` waiting are refused (:class:`QueueFull`, HTTP 429).
Hot sessions stay in RAM in LRU order while their memories fit ``hot_bytes``; colder ones are reloaded from their
file (they are saved after every turn anyway).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..chat_template import check_message, generation_prompt_ids, message_ids
from ..errors import IncompatibleError, InputError
from ..memory import CompressedMemory
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


@dataclass
class _Job:
    owner: str
    sid: str
    messages: list[dict[str, str]]
    max_new_tokens: int
    sampling: tuple  # (temperature, top_p, seed, stop strings): requests batched together share these
    on_text: Callable[[str], None] | None
    done: threading.Event = field(default_factory=threading.Event)
    result: Reply | None = None
    error: Exception | None = None
    session: Any = None
    meta: Any = None
    before: int = 0
    read: int = 0
    ids: list[int] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)
    new: list[int] = field(default_factory=list)
    finish: str = "stop"


class _Text:
    """Generated ids to text pieces as they come (decoding the whole reply each time keeps multi-token characters
    intact)."""

    def __init__(self, tok: Any, on_text: Callable[[str], None]) -> None:
        self.tok, self.on_text, self.ids, self.sent = tok, on_text, [], ""

    def add(self, token: int) -> None:
        if token == self.tok.eos_token_id:
            return
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if len(text) > len(self.sent) and not text.endswith("\ufffd"):
            self.on_text(text[len(self.sent):])
            self.sent = text


class Engine:
    def __init__(self, ccm: Any, store: SessionStore, limits: Limits | None = None, hot_bytes: int = 1 << 30,
                 model_name: str = "ccmem", full_history: bool = False, max_batch: int = 8) -> None:
        """``full_history``: keep every message's raw keys/values instead of compressing them (the baseline a
        plain server with per-session KV caching is: memory grows with every token said)."""
        if ccm.tokenizer is None:
            raise InputError("the server needs a model attached with its tokenizer")
        if full_history and ccm.config.merging:
            raise InputError("a full-history server needs a concat model (a merge memory averages its slots)")
        if full_history and ccm.config.raw_tail:
            raise InputError("a full-history server keeps every message raw already: leave out --raw-tail")
        self.full_history = full_history
        self.ccm, self.tok, self.store = ccm, ccm.tokenizer, store
        self.limits, self.hot_bytes, self.model_name = limits or Limits(), hot_bytes, model_name
        self.hot: OrderedDict[tuple[str, str], tuple[Session, SessionMeta]] = OrderedDict()
        self.model_lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(self.limits.max_queue)
        self.stats = {"tokens_compressed": 0, "tokens_generated": 0, "largest_batch": 0}
        self.max_batch = max_batch
        self.jobs: deque[_Job] = deque()
        self.wake = threading.Condition()
        self.worker: threading.Thread | None = None

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
            try:
                session.load(self.store.path(meta))
            except IncompatibleError as e:
                if not e.fields:  # another base model or file format: the library's message names the fix
                    raise
                if e.fields == ("adapter",):
                    what, how = "by another adapter", "the --adapter"
                else:
                    what = f"with another compression config ({', '.join(e.fields)} differ)"
                    how = "the --raw-tail" if e.fields == ("raw_tail",) else "the adapter and --raw-tail"
                raise IncompatibleError(  # the fields, not the library's message: that names the server's file path
                    f"session {sid!r} was saved {what}; serve it with {how} it was saved with, or "
                    f"DELETE /v1/sessions/{sid} to start it anew", e.fields) from e
        self.hot[key] = (session, meta)
        return session, meta

    def _evict(self) -> None:
        while len(self.hot) > 1 and self.hot_memory_bytes() > self.hot_bytes:
            self.hot.popitem(last=False)  # saved after its last turn: reloaded from disk when needed

    def hot_memory_bytes(self) -> int:
        return sum(s.memory.kv_bytes for s, _ in list(self.hot.values()))  # a copy: the worker may be mutating it

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
            try:
                session.load(path)
            except IncompatibleError as e:
                if e.fields != ("adapter",):
                    raise
                raise IncompatibleError(  # the library's fix (any_adapter=True) is not the client's to take
                    "it was written by another adapter than this server's; import it into a server started with "
                    "the --adapter that wrote it", e.fields) from e
            old = self.store.get(owner, sid)
            meta = SessionMeta(owner, sid, created=old.created if old else time.time())
            meta.turns = int(session.memory.steps[0]) + len(session.memory.tail[0])  # compressed + raw tail
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
        """Answer one request (blocking). It waits with the others; the worker takes up to ``max_batch`` requests
        of different sessions with the same sampling settings into one batched step."""
        if not self.slots.acquire(blocking=False):
            raise QueueFull(f"more than {self.limits.max_queue} requests are waiting; retry shortly")
        try:
            job = _Job(owner, sid, messages, max_new_tokens, (float(temperature), float(top_p), seed,
                                                               tuple(stop or ())), on_text)
            with self.wake:
                self.jobs.append(job)
                self.wake.notify()
                if self.worker is None or not self.worker.is_alive():
                    self.worker = threading.Thread(target=self._work, daemon=True, name="ccmem-engine")
                    self.worker.start()
            job.done.wait()
            if job.error is not None:
                raise job.error
            return job.result
        finally:
            self.slots.release()

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:
            with self.wake:
                while not self.jobs:
                    self.wake.wait()
                batch = self._take()
            try:
                with self.model_lock:
                    self._step(batch)
            except Exception as e:  # noqa: BLE001 - every waiting request learns what went wrong
                for j in batch:
                    if j.result is None and j.error is None:
                        j.error = e
            for j in batch:
                j.done.set()

    def _take(self) -> list[_Job]:
        """The oldest request, plus later ones of other sessions with the same sampling settings (a session's
        requests stay in order: a second one waits for the next step)."""
        first = self.jobs.popleft()
        batch, seen, rest = [first], {(first.owner, first.sid)}, []
        while self.jobs and len(batch) < self.max_batch:
            j = self.jobs.popleft()
            if (j.owner, j.sid) in seen or j.sampling != first.sampling:
                rest.append(j)
                seen.add((j.owner, j.sid))
            else:
                batch.append(j)
                seen.add((j.owner, j.sid))
        self.jobs.extendleft(reversed(rest))
        return batch

    def _prepare(self, job: _Job) -> None:
        """Open the session, compress the history messages that are new, render the user message."""
        session, meta = self._open(job.owner, job.sid)
        p = plan(meta.chain, job.messages[:-1])
        if p.restart:
            session.reset()
            meta.chain, meta.turns, meta.tokens = [], 0, 0
        job.session, job.meta, job.before = session, meta, meta.tokens
        for m in p.new:
            ids = message_ids(self.tok, m, first=session.fresh)
            job.read += len(ids)
            self._keep(session, ids)
            meta.chain.append(link(meta.chain[-1] if meta.chain else "", m))
            meta.turns += 1
        job.ids = message_ids(self.tok, job.messages[-1], first=session.fresh)
        job.prompt = job.ids + generation_prompt_ids(self.tok)
        job.read += len(job.prompt)

    def _step(self, batch: list[_Job]) -> None:
        ready = []
        for j in batch:
            try:
                self._prepare(j)
                ready.append(j)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                j.error = e
        if not ready:
            return
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(ready))
        stop = ready[0].sampling[3]
        outs = self._generate(ready)
        eos = self.tok.eos_token_id
        replies = []
        for j, new in zip(ready, outs):
            finish = "stop" if (eos in new) or len(new) < j.max_new_tokens else "length"
            if eos in new:
                new = new[: new.index(eos)]
            text = self.tok.decode(new, skip_special_tokens=True)
            for s in stop:
                if s in text:
                    text, finish = text[: text.index(s)], "stop"
            j.new, j.finish = new, finish
            replies.append({"role": "assistant", "content": text.strip()})
        # keep the user messages and the replies: one batched forward each when several sessions share the step
        self._keep_rows(ready, [j.ids for j in ready])
        self._keep_rows(ready, [message_ids(self.tok, r, first=False) for r in replies])
        for j, reply in zip(ready, replies):
            meta = j.meta
            for m in (j.messages[-1], reply):
                meta.chain.append(link(meta.chain[-1] if meta.chain else "", m))
            meta.turns += 2
            self._count(j.session, meta)
            self.store.save(meta, j.session)
            self.stats["tokens_compressed"] += meta.tokens - j.before
            self.stats["tokens_generated"] += len(j.new)
            j.result = Reply(reply["content"], j.read, len(j.new), j.finish, meta)
        self._evict()

    def _batched(self, jobs: list[_Job]) -> Session:
        """One session whose rows are the jobs' sessions (memories stacked, padded with invalid slots)."""
        s = self.ccm.session(batch_size=len(jobs))
        s.memory = CompressedMemory.stack([j.session.memory for j in jobs])
        return s

    def _generate(self, jobs: list[_Job]) -> list[list[int]]:
        """The replies of one step: Session.generate (transformers' generate on the memories' cache), on the one
        session or on the jobs' sessions stacked into a batch."""
        temperature, top_p, seed, stop = jobs[0].sampling
        s = jobs[0].session if len(jobs) == 1 else self._batched(jobs)
        streams = [_Text(self.tok, j.on_text) if j.on_text is not None else None for j in jobs]

        def on_token(b: int, tok: int) -> None:
            if streams[b] is not None and len(streams[b].ids) < jobs[b].max_new_tokens:
                streams[b].add(tok)

        out = s.generate([j.prompt for j in jobs], max_new_tokens=max(j.max_new_tokens for j in jobs),
                         do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                         top_p=top_p, eos_token_id=self.tok.eos_token_id, on_token=on_token, seed=seed,
                         stop_strings=list(stop) or None)
        # generate stops each row at its end token; a row asked for fewer tokens than the longest is cut to its own
        return [o[: j.max_new_tokens] + ([self.tok.eos_token_id] if len(o) < j.max_new_tokens else [])
                for o, j in zip(out, jobs)]

    def _keep_rows(self, jobs: list[_Job], rows: list[list[int]]) -> None:
        if len(jobs) == 1:
            self._keep(jobs[0].session, rows[0])
            return
        s = self._batched(jobs)
        self._keep(s, rows)
        for j, m in zip(jobs, s.memory.unstack()):
            j.session.memory = m
