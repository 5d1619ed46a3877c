"""⟨COMP⟩ and SUM token ids: where they live in the id space, and which positions of a batch hold them.

The special ids sit just past the base vocabulary (``base .. base + m - 1``): the first ``n_tok`` are ⟨COMP⟩, the next
``n_tok`` (merge variants only) are SUM placeholders. The LM head is never extended, so they can never be predicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import CompressionConfig


@dataclass(frozen=True)
class CompTokens:
    """The id layout of the special tokens for one model and config."""

    base: int
    n_tok: int
    merging: bool

    @classmethod
    def for_config(cls, base: int, config: CompressionConfig) -> CompTokens:
        return cls(base=base, n_tok=config.n_tok, merging=config.merging)

    @property
    def n_special(self) -> int:
        return 2 * self.n_tok if self.merging else self.n_tok

    @property
    def comp_ids(self) -> list[int]:
        return list(range(self.base, self.base + self.n_tok))

    @property
    def sum_ids(self) -> list[int]:
        if not self.merging:
            return []
        return list(range(self.base + self.n_tok, self.base + 2 * self.n_tok))

    @property
    def names(self) -> list[str]:
        """Tokenizer strings of the special tokens, in id order."""
        return [f"<COMP{k}>" for k in range(self.n_special)]

    def is_special(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.base) & (ids < self.base + self.n_special)

    def is_comp(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.base) & (ids < self.base + self.n_tok)

    def is_sum(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.merging:
            return torch.zeros_like(ids, dtype=torch.bool)
        return (ids >= self.base + self.n_tok) & (ids < self.base + 2 * self.n_tok)


def register_with_tokenizer(tokenizer, tokens: CompTokens) -> None:
    """Add ``<COMP0..m-1>`` as special tokens and check that the tokenizer gives them the ids ccmem uses."""
    tokenizer.add_special_tokens({"additional_special_tokens": tokens.names}, replace_extra_special_tokens=False)
    got = tokenizer.convert_tokens_to_ids(tokens.names)
    want = list(range(tokens.base, tokens.base + tokens.n_special))
    if got != want:
        from .errors import IncompatibleError

        raise IncompatibleError(
            f"the tokenizer assigned ids {got} to {tokens.names}, but the model expects {want}; "
            "pass the tokenizer that belongs to this model, without other added tokens"
        )
