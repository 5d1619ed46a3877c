"""Every method the evaluation compares, each reduced to two operations on one context (a list of chunks):

- ``session(chunks)``: a single-row :class:`~ccmem.session.Session` whose memory holds what the method keeps of the
  context (compressed slots, raw tokens, or nothing): the online loop, what a deployment runs;
- ``episode(ep)`` + ``layout``: the same thing as one parallel forward (the collator's layout and the variant whose
  mask it uses): fast evaluation of many contexts at once.

Both paths score the same queries on top of the memory, so a method's two numbers must agree (checked by the runner).
The kvpress presses are not here: they run in kvpress's own environment (``kvpress_worker.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..data.episode import Episode
from .core import budget_episode, context_slots


def flat(chunks: list[list[int]]) -> list[int]:
    return [t for c in chunks for t in c]


@contextlib.contextmanager
def variant_view(ccm: Any, variant: str | None) -> Iterator[Any]:
    """Temporarily read an adapter under another variant's layout (Gisting-online: a gist adapter compressing each
    chunk alone, i.e. the non-recurrent concat layout)."""
    if variant is None or variant == ccm.config.variant:
        yield ccm
        return
    old = ccm.config
    ccm.config = dataclasses.replace(old, variant=variant)
    try:
        yield ccm
    finally:
        ccm.config = old


@dataclass
class Method:
    """One row of the comparison. ``kind``: reference (no/full context), trained (needs an adapter),
    training-free (a KV budget policy) or control (a trained adapter on another context; ``peer`` names it)."""

    name: str
    label: str
    kind: str
    adapter: str | None = None  # adapter folder (trained methods)
    peer: str = "ccm_concat"  # the CCM-concat trained with the same budget, compared against this method

    def slots(self, chunks: list[list[int]], n_tok: int, budget: int) -> int:
        """KV slots held for the context after processing it."""
        raise NotImplementedError

    def peak_slots(self, chunks: list[list[int]], n_tok: int, budget: int) -> int:
        """KV slots alive at the peak of processing the context (Gisting reads the whole history every step)."""
        return self.slots(chunks, n_tok, budget)

    def session(self, ccm: Any, chunks: list[list[int]], budget: int):
        raise NotImplementedError

    def episode(self, ep: Episode, budget: int) -> tuple[Episode, str, str | None]:
        """(episode, collator mode, variant override) of the parallel forward."""
        raise NotImplementedError


class NoContext(Method):
    def slots(self, chunks, n_tok, budget):
        return 0

    def session(self, ccm, chunks, budget):
        return ccm.session()

    def episode(self, ep, budget):
        return ep, "none", None


class FullContext(Method):
    def slots(self, chunks, n_tok, budget):
        return len(flat(chunks))

    def session(self, ccm, chunks, budget):
        s = ccm.session()
        if chunks:
            s.add_raw(flat(chunks))
        return s

    def episode(self, ep, budget):
        return ep, "full", None


@dataclass
class Window(Method):
    """The last ``budget`` context tokens (sink=False), or the first token plus the last ``budget - 1``
    (StreamingLLM); the kept tokens are re-indexed from position 0, as in a rolling cache."""

    sink: bool = False

    def slots(self, chunks, n_tok, budget):
        return min(budget, len(flat(chunks)))

    def session(self, ccm, chunks, budget):
        s = ccm.session()
        kept = budget_episode(Episode(chunks, [], []), budget, self.sink).chunks
        if kept:
            s.add_raw(kept[0])
        return s

    def episode(self, ep, budget):
        return budget_episode(ep, budget, self.sink), "full", None


@dataclass
class Compressed(Method):
    """A trained compressor read chunk by chunk: CCM-concat / CCM-merge (recurrent), the non-recurrent concat /
    merge variants, and Gisting-online (a gist adapter read under the non-recurrent concat layout)."""

    variant: str | None = None  # layout override (Gisting-online)
    raw_tail: int = 0  # the adapter's raw tail: its newest chunks are held as raw tokens
    sink: bool = False  # the adapter keeps the session's first token as one more slot once it compresses

    def slots(self, chunks, n_tok, budget):
        layout = "merge" if self.name.startswith(("ccm_merge", "merge")) else "concat"
        return context_slots(Episode(chunks, [], []), layout, n_tok, self.raw_tail, self.sink)

    def session(self, ccm, chunks, budget):
        with variant_view(ccm, self.variant):
            s = ccm.session()
            for c in chunks:
                s.add_context(c)
        return s

    def episode(self, ep, budget):
        return ep, "compress", self.variant


@dataclass
class Gisting(Method):
    """Gisting with a fixed context: one ⟨COMP⟩ group compressed from the whole history, redone at every step."""

    sink: bool = False  # a sink adapter keeps the history's first token as one more slot

    def slots(self, chunks, n_tok, budget):
        return n_tok + int(self.sink) if chunks else 0

    def peak_slots(self, chunks, n_tok, budget):
        return len(flat(chunks)) + n_tok if chunks else 0

    def session(self, ccm, chunks, budget):
        with variant_view(ccm, "concat"):  # one chunk, no earlier memory: the gist layout
            s = ccm.session()
            if chunks:
                s.add_context(flat(chunks))
        return s

    def episode(self, ep, budget):
        one = [flat(ep.chunks)] if ep.chunks else []
        return Episode(one, ep.input, ep.output, ep.options, ep.answer, ep.id, dict(ep.meta)), "compress", "gist"


@dataclass
class Press(Method):
    """A kvpress press compressing the full history to the budget (scored by ``kvpress_worker.py``)."""

    press: str = ""

    def slots(self, chunks, n_tok, budget):
        return min(budget, len(flat(chunks)))

    def peak_slots(self, chunks, n_tok, budget):
        return len(flat(chunks))


REFERENCE = {"none": lambda: NoContext("none", "no context", "reference"),
             "full": lambda: FullContext("full", "full context", "reference")}
TRAINING_FREE: dict[str, Callable[[], Method]] = {
    "window": lambda: Window("window", "sliding window", "training-free", sink=False),
    "streamingllm": lambda: Window("streamingllm", "StreamingLLM (sink + window)", "training-free", sink=True),
}
PRESSES = {"snapkv": "kvpress SnapKV", "streamingllm": "kvpress StreamingLLM", "knorm": "kvpress Knorm",
           "tova": "kvpress TOVA", "expected_attention": "kvpress ExpectedAttention", "kvzip": "kvpress KVzip"}
TRAINED_LABELS = {"ccm_concat": "CCM-concat", "ccm_merge": "CCM-merge", "concat_nr": "concat (non-recurrent)",
                  "merge_nr": "merge (non-recurrent)", "gist": "Gisting", "gist_online": "Gisting-online"}


def trained(name: str, adapter: str, peer: str = "ccm_concat", raw_tail: int | None = None) -> Method:
    """A trained method by name; names with a suffix (``ccm_concat_cpu``) keep the base name's behaviour.
    ``raw_tail``: read the adapter with this raw tail instead of its own (``CompressedModel.from_pretrained``)."""
    base = next((b for b in sorted(TRAINED_LABELS, key=len, reverse=True) if name.startswith(b)), None)
    if base is None:
        raise ValueError(f"unknown trained method {name!r}; names start with one of {sorted(TRAINED_LABELS)}")
    label = TRAINED_LABELS[base] + (f" [{name[len(base) + 1:]}]" if name != base else "")
    from ..config import CompressionConfig
    from ..model import CompressedModel

    compression = CompressedModel.read_adapter(adapter)[1]["compression"]
    own = compression.get("raw_tail", 0)
    tail = own if raw_tail is None else raw_tail
    if tail != own:  # the config's own check, now rather than at model load after the other methods have run
        CompressionConfig.from_dict({**compression, "raw_tail": tail})
        label += f" (raw tail {tail})"
    sink = bool(compression.get("sink", False))
    if base == "gist":
        return Gisting(name, label, "trained", adapter, peer, sink=sink)
    return Compressed(name, label, "trained", adapter, peer, variant="concat" if base == "gist_online" else None,
                      raw_tail=tail, sink=sink)


def control(m: Method) -> Method:
    """The control row of a trained compressor: the same adapter and layout, scored with the memory of another
    context (``runner.other_context``), so what its memory holds of the right context shows apart from its prior."""
    if not isinstance(m, Compressed):
        raise ValueError(f"no control for {m.name!r}: only a compressor read chunk by chunk has one")
    return Compressed(f"{m.name}_other", f"{m.label} on another context (control)", "control", m.adapter, m.name,
                      variant=m.variant, raw_tail=m.raw_tail, sink=m.sink)


def press(name: str) -> Method:
    if name not in PRESSES:
        raise ValueError(f"unknown kvpress press {name!r}; known: {sorted(PRESSES)}")
    return Press(f"kvpress_{name}", PRESSES[name], "training-free", press=name)
