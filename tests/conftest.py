"""Tiny random decoders of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ccmem import CompressedModel, CompressionConfig

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    cfg_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**{**COMMON, **overrides})).eval()


def randomize(ccm: CompressedModel, seed: int = 1, std: float = 0.2) -> None:
    """Non-zero LoRA and ⟨COMP⟩ embeddings: a zero-initialised LoRA would make equivalence tests trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ccm.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_ccm(arch: str = "llama", variant: str = "concat_recur", attn: str = "sdpa", seed: int = 0,
             **cfg) -> CompressedModel:
    cfg.setdefault("n_tok", 2)
    cfg.setdefault("lora_dropout", 0.0)
    ccm = CompressedModel.attach(tiny_model(arch, seed), CompressionConfig(variant=variant, **cfg),
                                 attn_implementation=attn)
    randomize(ccm, seed + 1)
    return ccm


@pytest.fixture
def make_ccm():
    return tiny_ccm


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama saved with SmolLM2's tokenizer: recipes run end to end on real data in seconds."""
    from ccmem.models import load_model

    _, tok = load_model()
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
