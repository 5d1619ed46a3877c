"""The HTTP API: OpenAI's chat-completions shape (plain and SSE), plus sessions, health and Prometheus metrics.

A session is named by the ``X-Session-Id`` header, else the request's ``prompt_cache_key`` or ``user``; a request
without a name gets a fresh session whose id comes back in ``X-Session-Id``. A session belongs to the API key that
created it: any other key gets 404, as if it did not exist. No pickle anywhere: memories travel as checked
safetensors files, metadata as JSON and SQLite rows.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..errors import CCMError, InputError
from .engine import Engine, QueueFull

SESSION_HEADER = "X-Session-Id"
MAX_ID = 128


@dataclass
class ServerConfig:
    api_keys: set[str] = field(default_factory=set)  # empty: no authentication (local use only)
    max_request_bytes: int = 1 << 20
    model_name: str = "ccmem-smollm2-135m"


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _refusal(e: Exception) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) of a failed chat request, the same whether it streams or not."""
    if isinstance(e, QueueFull):
        return 429, "rate_limit_error"
    if isinstance(e, CCMError):
        return 400, "invalid_request_error"
    return 500, "server_error"


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    app = FastAPI(title="ccmem", version="1")
    reg = CollectorRegistry()
    m_requests = Counter("ccmem_requests", "chat requests by HTTP status", ["status"], registry=reg)
    m_latency = Histogram("ccmem_request_seconds", "chat request latency", registry=reg,
                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
    m_hot = Gauge("ccmem_sessions_hot", "sessions held in RAM", registry=reg)
    m_stored = Gauge("ccmem_sessions_stored", "sessions on disk", registry=reg)
    m_bytes = Gauge("ccmem_hot_memory_bytes", "key/value bytes of the sessions held in RAM", registry=reg)
    m_comp = Gauge("ccmem_tokens_compressed", "text tokens compressed since start", registry=reg)
    m_gen = Gauge("ccmem_tokens_generated", "tokens generated since start", registry=reg)

    def owner_of(request: Request) -> str | None:
        if not config.api_keys:
            return "public"
        auth = request.headers.get("authorization", "")
        key = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        if key not in config.api_keys:
            return None
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @app.middleware("http")
    async def guard(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and int(size) > config.max_request_bytes:
            return _error(413, f"request body of {size} bytes exceeds the limit of {config.max_request_bytes}")
        if request.url.path.startswith("/v1/") and owner_of(request) is None:
            return _error(401, "missing or unknown API key (Authorization: Bearer <key>)", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": config.model_name, "sessions_hot": len(engine.hot)}

    @app.get("/metrics")
    def metrics():
        m_hot.set(len(engine.hot))
        m_stored.set(engine.store.count())
        m_bytes.set(engine.hot_memory_bytes())
        m_comp.set(engine.stats["tokens_compressed"])
        m_gen.set(engine.stats["tokens_generated"])
        return Response(generate_latest(reg), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "ccmem"}]}

    def session_id(request: Request, body: dict[str, Any]) -> str:
        sid = request.headers.get(SESSION_HEADER) or body.get("prompt_cache_key") or body.get("user")
        sid = str(sid) if sid else f"s-{uuid.uuid4().hex}"
        if len(sid) > MAX_ID:
            raise InputError(f"session id longer than {MAX_ID} characters")
        return sid

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.perf_counter()
        owner = owner_of(request)
        try:
            raw = await request.body()
            if len(raw) > config.max_request_bytes:
                raise InputError(f"request body exceeds the limit of {config.max_request_bytes} bytes")
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise InputError(f"the body is not JSON: {e}") from e
            if not isinstance(body, dict):
                raise InputError("the body must be a JSON object")
            sid = session_id(request, body)
            max_new = int(body.get("max_completion_tokens") or body.get("max_tokens") or 256)
            messages = engine.check(body.get("messages"), max_new)
            if int(body.get("n", 1)) != 1:
                raise InputError("n must be 1: one reply per turn keeps one memory per session")
            stop = body.get("stop")
            stop = [stop] if isinstance(stop, str) else list(stop or [])
            params = dict(max_new_tokens=max_new, temperature=float(body.get("temperature", 1.0)),
                          top_p=float(body.get("top_p", 1.0)), seed=body.get("seed"), stop=stop)
        except (InputError, ValueError, TypeError) as e:
            m_requests.labels("400").inc()
            return _error(400, str(e))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        headers = {SESSION_HEADER: sid}

        def response(reply) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion", "created": created, "model": config.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                                 "finish_reason": reply.finish_reason}],
                    "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                              "total_tokens": reply.prompt_tokens + reply.completion_tokens},
                    "ccmem": {"session": reply.session.public()}}

        if not body.get("stream"):
            try:
                reply = await asyncio.to_thread(engine.chat, owner, sid, messages, **params)
            except (QueueFull, CCMError) as e:
                status, etype = _refusal(e)
                m_requests.labels(str(status)).inc()
                return _error(status, str(e), etype)
            m_requests.labels("200").inc()
            m_latency.observe(time.perf_counter() - t0)
            return JSONResponse(response(reply), headers=headers)

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("delta", piece))

        def work() -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ("done", engine.chat(owner, sid, messages,
                                                                                 on_text=on_text, **params)))
            except Exception as e:  # noqa: BLE001 - reported to the client as the stream's last event
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

        if not engine.slots.acquire(blocking=False):  # refuse before the stream starts, with a status code
            m_requests.labels("429").inc()
            return _error(429, f"more than {engine.limits.max_queue} requests are waiting; retry shortly",
                          "rate_limit_error")
        engine.slots.release()
        threading.Thread(target=work, daemon=True).start()

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> str:
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": config.model_name,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage is not None:
                c["usage"] = usage
            return f"data: {json.dumps(c)}\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await queue.get()
                if kind == "delta":
                    yield chunk({"content": value})
                elif kind == "error":  # the status a plain request would have had, in /metrics and the event
                    status, etype = _refusal(value)
                    m_requests.labels(str(status)).inc()
                    yield f"data: {json.dumps({'error': {'message': str(value), 'type': etype, 'code': status}})}\n\n"
                    break
                else:
                    r = response(value)
                    m_requests.labels("200").inc()
                    m_latency.observe(time.perf_counter() - t0)
                    yield chunk({}, value.finish_reason, r["usage"])
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.get("/v1/sessions/{sid}")
    def get_session(sid: str, request: Request):
        meta = engine.session_meta(owner_of(request), sid)
        if meta is None:
            return _error(404, f"no session {sid!r}", "not_found_error")
        return meta.public()

    @app.delete("/v1/sessions/{sid}")
    def delete_session(sid: str, request: Request):
        if not engine.forget(owner_of(request), sid):
            return _error(404, f"no session {sid!r}", "not_found_error")
        return {"id": sid, "object": "session.deleted", "deleted": True}

    @app.get("/v1/sessions/{sid}/memory")
    def export_memory(sid: str, request: Request):
        meta = engine.session_meta(owner_of(request), sid)
        path = engine.store.path(meta) if meta else None
        if path is None or not path.exists():
            return _error(404, f"no saved memory for session {sid!r}", "not_found_error")
        return Response(path.read_bytes(), media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{path.name}"'})

    @app.put("/v1/sessions/{sid}/memory")
    async def import_memory(sid: str, request: Request):
        data = await request.body()
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / "memory.safetensors"
            f.write_bytes(data)
            try:
                meta = await asyncio.to_thread(engine.import_memory, owner_of(request), sid, str(f))
            except (CCMError, ValueError, OSError) as e:
                return _error(400, f"not a memory for this model: {e}")
        return meta.public()

    return app
