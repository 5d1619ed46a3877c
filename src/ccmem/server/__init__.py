"""``ccmem serve``: an OpenAI-compatible chat server whose sessions keep compressed memory.

- :mod:`.transcript`: which of a request's messages are new (digest chain of the compressed messages);
- :mod:`.store`: durable sessions (checked memory files written atomically, metadata in SQLite WAL);
- :mod:`.engine`: the model work (one session at a time on the model, hot sessions in an LRU bounded in bytes);
- :mod:`.app`: the HTTP API (FastAPI): chat completions (plain and SSE), models, sessions, health, metrics.
"""

from .app import ServerConfig, create_app
from .engine import Engine

__all__ = ["Engine", "ServerConfig", "create_app"]
