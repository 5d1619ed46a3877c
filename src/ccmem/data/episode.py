"""The one episode schema every source produces and every collator and evaluator consumes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Episode:
    """Context chunks c(1..T) (each will be compressed), the uncompressed input I and the target output O, as token
    ids. ``options``/``answer`` carry multiple-choice data for evaluation."""

    chunks: list[list[int]]
    input: list[int]
    output: list[int]
    options: list[list[int]] | None = None
    answer: int | None = None
    id: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.chunks)

    def truncated(self, t: int) -> Episode:
        """The same episode with only the last ``t`` context chunks."""
        return Episode(self.chunks[len(self.chunks) - t:] if t else [], self.input, self.output, self.options,
                       self.answer, self.id, dict(self.meta))


def strip_eos(ep: Episode, eos: int | None) -> Episode:
    """The episode without a trailing end token on its output (perplexities are reported without EOS)."""
    if eos is not None and ep.output and ep.output[-1] == eos:
        return Episode(ep.chunks, ep.input, ep.output[:-1], ep.options, ep.answer, ep.id, ep.meta)
    return ep
