"""The one configuration object: which compression variant, how many ⟨COMP⟩ tokens, and the LoRA that writes them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError

#: Variants with an online loop. "recur" variants let the compression of c(t) read Mem(t-1).
VARIANTS = ("concat_recur", "merge_recur", "concat", "merge", "gist")
RECURRENT = ("concat_recur", "merge_recur")
MERGING = ("merge_recur", "merge")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class CompressionConfig:
    """How a model compresses its context.

    variant: ``concat_recur`` (CCM-concat), ``merge_recur`` (CCM-merge), ``concat`` / ``merge`` (non-recurrent:
        each chunk is compressed without seeing the memory) or ``gist`` (one group after the whole context).
    n_tok: ⟨COMP⟩ tokens written per chunk. Merge variants also reserve ``n_tok`` SUM placeholders.
    sink: keep the first token of the session as an attention sink that every later token can see.
    conditional: apply the LoRA delta only at ⟨COMP⟩/SUM rows (the method); ``False`` is the plain-LoRA ablation.
    raw_tail: the newest ``raw_tail`` chunks stay as raw tokens, read with the input; a chunk is compressed only
        when it leaves this tail (the last turn usually matters most, and a window keeps it verbatim).
    memory_gate: ``None`` (the paper's method) or the initial value of a learned per-layer, per-head bias on the
        attention logits of memory slots (:mod:`ccmem.gate`); a negative start (e.g. -6) makes an untrained memory
        nearly invisible instead of harmful.
    """

    variant: str = "concat_recur"
    n_tok: int = 2
    sink: bool = False
    conditional: bool = True
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    raw_tail: int = 0
    memory_gate: float | None = None
    target_modules: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGETS)

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        self.validate()

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if not isinstance(self.n_tok, int) or isinstance(self.n_tok, bool) or self.n_tok < 1:
            raise ConfigError(f"n_tok must be a positive integer, got {self.n_tok!r}")
        if not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ConfigError(f"lora_r must be a positive integer, got {self.lora_r!r}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.raw_tail, int) or isinstance(self.raw_tail, bool) or self.raw_tail < 0:
            raise ConfigError(f"raw_tail must be a non-negative integer (chunks kept raw), got {self.raw_tail!r}")
        if self.raw_tail and not self.online:
            raise ConfigError("raw_tail needs an online variant; gist recompresses the whole history every step")
        if self.memory_gate is not None and (isinstance(self.memory_gate, bool) or not isinstance(
                self.memory_gate, (int, float)) or not -30.0 <= self.memory_gate <= 30.0):
            raise ConfigError(f"memory_gate must be None or a number in [-30, 30] (a logit bias), got "
                              f"{self.memory_gate!r}")
        if not self.target_modules:
            raise ConfigError("target_modules is empty; the default is q_proj, k_proj, v_proj, o_proj")

    @property
    def recurrent(self) -> bool:
        return self.variant in RECURRENT

    @property
    def merging(self) -> bool:
        return self.variant in MERGING

    @property
    def online(self) -> bool:
        """Whether a memory can be carried chunk by chunk (a session, a raw tail); gist rebuilds its slots from the
        whole history at every step instead."""
        return self.variant != "gist"

    @property
    def n_special(self) -> int:
        """Rows of the new embedding table: n ⟨COMP⟩ plus, for merge variants, n SUM placeholders."""
        return 2 * self.n_tok if self.merging else self.n_tok

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_r

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressionConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown compression config keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**d)
