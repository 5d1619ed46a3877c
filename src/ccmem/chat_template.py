"""Chat messages as the tokenizer's own chat template renders them, one message at a time.

A compressed session never holds the whole conversation, so a message cannot be rendered by re-rendering the
history. Instead, a message's ids are what the template adds when that message follows a short stand-in history of
the right shape (``render(history + [m]) - render(history)``), checked to be a true prefix extension; the first
message of a session is rendered alone (with the template's default system prompt, if it has one). For ChatML
(SmolLM2, Qwen) this gives exactly the ids of rendering the full conversation at once (tested).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InputError

ROLES = ("system", "user", "assistant")
_STANDIN = "ok"


def check_message(message: Any) -> dict[str, str]:
    """A message is ``{"role": "system" | "user" | "assistant", "content": str}``; anything else is refused."""
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
        raise InputError(f"a chat message is a dict with 'role' and 'content', got {message!r}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise InputError(f"message role {role!r} is not one of {', '.join(ROLES)}")
    if not isinstance(content, str) or (role != "assistant" and not content.strip()):
        # an assistant turn may be empty (a model can end its turn at once); the others carry the conversation
        raise InputError(f"the {role} message's content is empty (or not text); send some text")
    return {"role": role, "content": content}


def _template(tokenizer: Any) -> None:
    if tokenizer is None:
        raise InputError("chat messages need a tokenizer; attach the model with tokenizer=...")
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"{type(tokenizer).__name__} has no chat template; set tokenizer.chat_template or pass plain text/ids"
        )


def render_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
               ) -> list[int]:
    """The ids of the conversation as the template renders it (the template writes any BOS itself)."""
    _template(tokenizer)
    text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _extension(tokenizer: Any, history: list[dict[str, str]], message: dict[str, str] | None) -> list[int]:
    before = render_ids(tokenizer, history)
    after = render_ids(tokenizer, history + [message]) if message else render_ids(tokenizer, history, True)
    if after[: len(before)] != before:
        raise InputError(
            "this chat template does not render a conversation incrementally (adding a message changes what came "
            "before it), so single messages cannot be compressed one at a time; pass plain text instead"
        )
    return after[len(before):]


def message_ids(tokenizer: Any, message: Mapping[str, str], first: bool) -> list[int]:
    """The ids one message adds to a conversation (``first``: it opens the session)."""
    m = check_message(message)
    if first:
        return render_ids(tokenizer, [m])
    if m["role"] == "system":
        raise InputError("a system message can only open a session; send it first (or reset the session)")
    user, bot = {"role": "user", "content": _STANDIN}, {"role": "assistant", "content": _STANDIN}
    history = [user] if m["role"] == "assistant" else [user, bot]
    return _extension(tokenizer, history, m)


def generation_prompt_ids(tokenizer: Any) -> list[int]:
    """What the template adds to let the assistant speak (``<|im_start|>assistant\\n`` for ChatML)."""
    return _extension(tokenizer, [{"role": "user", "content": _STANDIN}], None)
