"""RoPE decoder families beyond Llama / Mistral / Qwen2: Gemma 2 and 3 (soft-capping, q/k norms, sliding-window
layer types), Phi-3 (fused qkv projection), OLMo 2 / 3 (q/k norms), Granite (multipliers) and SmolLM3 (layers
without RoPE). Tiny random configs; the same promises as for the first families."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import COMMON, randomize
from test_cache import Collect
from test_exactness import EPISODES, online, parallel, tail_logits
from test_gate import set_gates

from ccmem import SUPPORTED_MODEL_TYPES, CompressedModel, CompressionConfig
from ccmem.errors import UnsupportedModelError
from ccmem.gate import gate_parameters
from ccmem.lora import lora_modules

FAMILIES = {
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(head_dim=16, sliding_window=64)),
    "gemma3_text": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, dict(head_dim=16, sliding_window=64)),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(pad_token_id=0, eos_token_id=1, bos_token_id=1)),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, dict(pad_token_id=0, eos_token_id=1, bos_token_id=1)),
    "olmo3": (T.Olmo3Config, T.Olmo3ForCausalLM, dict(sliding_window=64, pad_token_id=0, eos_token_id=1,
                                                      bos_token_id=1)),
    "granite": (T.GraniteConfig, T.GraniteForCausalLM, dict(embedding_multiplier=2.0, attention_multiplier=0.2,
                                                            residual_multiplier=0.5, logits_scaling=2.0)),
    "smollm3": (T.SmolLM3Config, T.SmolLM3ForCausalLM, dict(no_rope_layer_interval=2, pad_token_id=0,
                                                            eos_token_id=1, bos_token_id=1)),
}
BACKENDS = {name: ("eager",) if name == "gemma2" else ("sdpa", "eager") for name in FAMILIES}
CASES = [(f, a, v) for f in FAMILIES for a in BACKENDS[f] for v in ("concat_recur", "merge_recur")]
TOL = 1e-4


def family_model(name: str, seed: int = 0):
    cfg_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**COMMON, **extra})).eval()
    assert model.config.model_type == name
    return model


def family_ccm(name, variant="concat_recur", attn="eager", **cfg):
    ccm = CompressedModel.attach(family_model(name), CompressionConfig(variant=variant, n_tok=2, lora_dropout=0.0,
                                                                       **cfg), attn_implementation=attn)
    randomize(ccm, 1)
    return ccm


def assert_parallel_equals_online(ccm):
    ids, am = parallel(ccm, EPISODES, "right")
    with torch.no_grad():
        out = ccm.model(input_ids=ids, use_cache=False, **ccm.parallel_inputs(ids, am))
    par = tail_logits(out.logits, am, EPISODES, "right")
    got, _ = online(ccm, EPISODES).logits([t for _, t in EPISODES])
    for b, (_, tail) in enumerate(EPISODES):
        assert (par[b] - got[b, : len(tail)]).abs().max() <= TOL


def test_every_family_is_listed():
    assert set(FAMILIES) <= set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("name,attn,variant", CASES)
def test_parallel_equals_online(name, attn, variant):
    ccm = family_ccm(name, variant, attn)
    assert len(lora_modules(ccm.model)) == 2 * len(ccm.config.target_modules)
    assert_parallel_equals_online(ccm)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_plain_text_is_exactly_the_base_model_and_generate_continues_from_memory(name):
    ccm = family_ccm(name)
    base = family_model(name)
    base.set_attn_implementation("eager")  # the backend the ccm model runs (sdpa and eager differ by float noise)
    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.equal(ccm.model(input_ids=x).logits, base(input_ids=x).logits)
    chunks, prompt = EPISODES[0]
    s = online(ccm, [(chunks, prompt)])
    want = s.generate(prompt, max_new_tokens=6, eos_token_id=None)
    out = ccm.model.generate(**s.generation_inputs(prompt), max_new_tokens=6, do_sample=False, streamer=Collect(),
                             pad_token_id=0, eos_token_id=None)
    assert out[0, len(prompt):].tolist() == want


def test_fused_qkv_gets_its_own_default_targets_and_gates():
    ccm = family_ccm("phi3", memory_gate=0.0)
    set_gates(ccm)
    assert ccm.config.target_modules == ("qkv_proj", "o_proj")
    assert len(gate_parameters(ccm.model)) == 2
    assert_parallel_equals_online(ccm)


def test_sdpa_less_family_and_unknown_family_are_refused_clearly():
    model = family_model("gemma2")
    with pytest.raises(UnsupportedModelError, match="attn_implementation='eager'"):
        CompressedModel.attach(model, CompressionConfig())
    assert not any("ccmem" in n for n, _ in model.named_parameters())  # nothing was attached
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4))
    with pytest.raises(UnsupportedModelError, match="gemma3_text.*phi3|phi3.*gemma3_text"):
        CompressedModel.attach(gpt2, CompressionConfig())
