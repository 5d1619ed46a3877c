"""ccmem: compressed context memory for online language-model interaction (Kim et al., ICLR 2024)."""

from .cache import CompressedCache
from .config import VARIANTS, CompressionConfig
from .errors import (
    AlreadyAttachedError,
    CCMError,
    ConfigError,
    CorruptFileError,
    IncompatibleError,
    InputError,
    UnsupportedModelError,
)
from .masks import causal_mask, comp_attention_mask, online_mask, to_additive
from .memory import CompressedMemory
from .model import SUPPORTED_MODEL_TYPES, CompressedModel
from .positions import skip_position_ids
from .sequence import episode_ids, pad_batch
from .session import Score, Session, StepReport
from .tokens import CompTokens

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "SUPPORTED_MODEL_TYPES",
    "AlreadyAttachedError",
    "CCMError",
    "CompTokens",
    "CompressedCache",
    "CompressedMemory",
    "CompressedModel",
    "CompressionConfig",
    "ConfigError",
    "CorruptFileError",
    "IncompatibleError",
    "InputError",
    "Score",
    "Session",
    "StepReport",
    "UnsupportedModelError",
    "causal_mask",
    "comp_attention_mask",
    "episode_ids",
    "online_mask",
    "pad_batch",
    "skip_position_ids",
    "to_additive",
]
