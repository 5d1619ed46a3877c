"""Which messages of a request are new: a chain of digests over the messages a session has compressed.

OpenAI clients resend the whole history with every request. A session stores ``chain[i]`` = sha256 of
``chain[i-1]`` and message i (role and content), so a resent history is recognised by comparing digests, and only
the messages after the stored prefix are compressed. A history that does not extend the stored one (edited or from
another conversation) starts a new memory instead of mixing two.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass


def link(prev: str, message: dict[str, str]) -> str:
    body = json.dumps([prev, message["role"], message["content"]], ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


def chain(messages: Sequence[dict[str, str]], start: str = "") -> list[str]:
    out, prev = [], start
    for m in messages:
        prev = link(prev, m)
        out.append(prev)
    return out


@dataclass
class Plan:
    restart: bool  # the history does not extend the stored one: a new memory
    new: list[dict[str, str]]  # history messages to compress before answering


def plan(stored: Sequence[str], history: Sequence[dict[str, str]]) -> Plan:
    """``history``: the request's messages before the last user message. An empty history continues the session
    (a client that sends only the new message); otherwise it must start with the stored messages."""
    if not history:
        return Plan(False, [])
    digests = chain(history)
    n = len(stored)
    if n and len(digests) >= n and digests[n - 1] == stored[-1]:
        return Plan(False, list(history[n:]))
    if not n:
        return Plan(False, list(history))
    return Plan(True, list(history))
