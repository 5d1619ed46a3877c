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
    from ..demo import default_adapter
    from ..model import CompressedModel
    from ..models import cache_dir, load_model
    from .app import ServerConfig, create_app
    from .engine import Engine, Limits
    from .store import SessionStore

    model, tok = load_model(args.model, device=args.device)
    adapter = args.adapter or str(default_adapter("concat"))
    ccm = CompressedModel.from_pretrained(adapter, model, tokenizer=tok)
    store = SessionStore(args.data_dir or cache_dir() / "server")
    limits = Limits(max_messages=args.max_messages, max_message_tokens=args.max_message_tokens,
                    max_new_tokens=args.max_new_tokens, max_queue=args.max_queue)
    engine = Engine(ccm, store, limits, hot_bytes=args.hot_mib << 20)
    keys = api_keys(args.api_keys_file)
    if not keys:
        print("warning: no API keys (--api-keys-file or CCMEM_API_KEYS): every client shares one owner",
              file=sys.stderr)
    return create_app(engine, ServerConfig(api_keys=keys, max_request_bytes=args.max_request_bytes,
                                           model_name=args.model_name))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a local folder or a hub id")
    p.add_argument("--adapter", default=None, help="adapter folder (default: the shipped chit-chat CCM-concat)")
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


def run(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run(build(args), host=args.host, port=args.port, log_level="warning")
    return 0
