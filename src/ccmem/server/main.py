"""``ccmem serve``: load the model and adapter, open the session store, run uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def api_keys(path: str | None) -> set[str]:
    """Keys from a file (one per line, # comments) and/or $CCMEM_API_KEYS (comma-separated)."""
    keys = {k.strip() for k in os.environ.get("CCMEM_API_KEYS", "").split(",") if k.strip()}
    if path:
        lines = Path(path).read_text().splitlines()
        keys |= {x.strip() for x in lines if x.strip() and not x.strip().startswith("#")}
    return keys


def build(args: argparse.Namespace):
    from ..demo import chat_adapter
    from ..model import CompressedModel
    from ..models import cache_dir, load_model
    from .app import ServerConfig, create_app
    from .engine import Engine, Limits
    from .store import SessionStore

    model, tok = load_model(args.model, device=args.device)
    adapter = args.adapter or str(chat_adapter("concat"))
    ccm = CompressedModel.from_pretrained(adapter, model, tokenizer=tok, raw_tail=args.raw_tail)
    store = SessionStore(args.data_dir or cache_dir() / "server")
    limits = Limits(max_messages=args.max_messages, max_message_tokens=args.max_message_tokens,
                    max_new_tokens=args.max_new_tokens, max_queue=args.max_queue)
    engine = Engine(ccm, store, limits, hot_bytes=args.hot_mib << 20, full_history=args.full_history)
    keys = api_keys(args.api_keys_file)
    if not keys:
        print("warning: no API keys (--api-keys-file or CCMEM_API_KEYS): every client shares one owner",
              file=sys.stderr)
    return create_app(engine, ServerConfig(api_keys=keys, max_request_bytes=args.max_request_bytes,
                                           model_name=args.model_name))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a local folder or a hub id")
    p.add_argument("--adapter", default=None,
                   help="adapter folder (default: the newest general adapter, adapters/general-chat-decay)")
    from ..cli import turn_count

    p.add_argument("--raw-tail", type=turn_count, default=None,
                   help="keep each session's K newest messages raw (their tokens, re-read in front of every request), "
                        "compressing a message only when it leaves the tail (default: the adapter's own; `ccmem chat` "
                        "reads the shipped adapter with 1). A stored session is served only with the tail it was "
                        "saved with")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", default=None, help="session store (default: ~/.cache/ccmem/server)")
    p.add_argument("--api-keys-file", default=None)
    p.add_argument("--hot-mib", type=int, default=1024, help="RAM for hot session memories")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20)
    p.add_argument("--max-messages", type=int, default=256)
    p.add_argument("--max-message-tokens", type=int, default=2048)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--model-name", default="ccmem-smollm2-135m")
    p.add_argument("--device", default=None)
    p.add_argument("--full-history", action="store_true",
                   help="keep every message's raw keys/values instead of compressing (the baseline server)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run(build(args), host=args.host, port=args.port, log_level="warning")
    return 0


class ThreadedServer:
    """uvicorn serving ``app`` on 127.0.0.1 from a background thread (a free port unless given): for tests,
    benchmarks and notebooks. ``stop()`` shuts it down."""

    def __init__(self, app, port: int = 0) -> None:
        import threading
        import time

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread stopped before it started (is the port free?)")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
