"""Exceptions that name the problem and the fix, so a user never has to read a traceback to recover."""

from __future__ import annotations


class CCMError(Exception):
    """Base class of every error ccmem raises on purpose."""


class ConfigError(CCMError, ValueError):
    """An invalid compression configuration."""


class IncompatibleError(CCMError, ValueError):
    """An adapter or memory file that was made for another base model or another configuration. ``fields``: the
    compression-config fields that differ, or ``("adapter",)`` for a memory written by another adapter (empty for
    any other mismatch), so a front end can name its own flag."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = tuple(fields)


class CorruptFileError(CCMError, OSError):
    """A truncated or corrupted adapter or memory file."""


class InputError(CCMError, ValueError):
    """Bad user input: an empty chunk, one that overflows the position range, a malformed batch."""


class AlreadyAttachedError(CCMError, RuntimeError):
    """A model that already carries ccmem (hooks, attention backend or ⟨COMP⟩/LoRA weights) from another attach:
    a second attach would stack hooks and reuse or shadow the first one's weights."""


class UnsupportedModelError(CCMError, TypeError):
    """A model architecture that ccmem cannot attach to."""
