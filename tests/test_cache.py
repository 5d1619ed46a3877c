"""``CompressedCache``: the memory as a transformers Cache that ``model.generate`` continues from. Session.generate is
that call; greedy output is checked against a decoding loop of plain forwards on the memory."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, tiny_ccm
from test_exactness import EPISODES, online
from test_gate import set_gates
from transformers.generation.streamers import BaseStreamer

from ccmem.cache import CompressedCache
from ccmem.errors import InputError


class Collect(BaseStreamer):
    def __init__(self):
        self.tokens: list[int] = []

    def put(self, value):
        self.tokens += value.reshape(-1).tolist()

    def end(self):
        pass


def greedy_by_forwards(s, prompt, n):
    """Reference: n greedy steps, each a full forward of prompt + reply on the memory (no cache reuse, no generate)."""
    out: list[int] = []
    for _ in range(n):
        logits, _ = s.logits(prompt + out)
        out.append(int(logits[0, len(prompt) + len(out) - 1].argmax()))
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", ["concat_recur", "merge_recur"])
def test_model_generate_equals_greedy_forwards(arch, attn, variant):
    ccm = tiny_ccm(arch, variant, attn)
    chunks, prompt = EPISODES[0]
    s = online(ccm, [(chunks, prompt)])
    streamer = Collect()
    inputs = s.generation_inputs(prompt)
    out = ccm.model.generate(**inputs, max_new_tokens=8, do_sample=False, streamer=streamer, pad_token_id=0,
                             eos_token_id=None)
    got = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert got == greedy_by_forwards(s, prompt, 8) == s.generate(prompt, max_new_tokens=8, eos_token_id=None)
    assert streamer.tokens[len(prompt):] == got  # the streamer sees the prompt, then each new token


@pytest.mark.parametrize("cfg", [{"sink": True}, {"raw_tail": 1}, {"memory_gate": 0.0}, {"n_tok": 4}])
def test_generate_with_sink_tail_gate_and_more_slots_than_text(cfg):
    ccm = tiny_ccm("llama", "concat_recur", **cfg)
    if "memory_gate" in cfg:
        set_gates(ccm)
    chunks = [[5], [6, 7], [8]] if cfg.get("n_tok") == 4 else EPISODES[1][0]  # 12 slots for 4 text tokens
    s = online(ccm, [(chunks, EPISODES[1][1])])
    prompt = EPISODES[1][1]
    assert s.generate(prompt, max_new_tokens=8, eos_token_id=None) == greedy_by_forwards(s, prompt, 8)


def test_batch_of_two_different_memories_equals_each_alone():
    ccm = tiny_ccm("llama", "merge_recur", sink=True)
    both = online(ccm, EPISODES)  # 5 and 4 chunks: different offsets and slot validity
    prompts = [[20, 21, 22], [41]]  # different lengths: left-padded
    inputs = both.generation_inputs(prompts)
    out = ccm.model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = out[:, inputs["input_ids"].shape[1]:].tolist()
    for b, (chunks, _) in enumerate(EPISODES):
        alone = online(ccm, [(chunks, prompts[b])])
        assert got[b] == alone.generate(prompts[b], max_new_tokens=6, eos_token_id=None)


def test_sampling_with_a_seed_is_reproducible_and_leaves_the_global_rng_alone():
    ccm = tiny_ccm("llama")
    s = online(ccm, EPISODES[:1])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = s.generate([20, 21], max_new_tokens=10, do_sample=True, temperature=1.5, seed=7, eos_token_id=None)
    assert torch.equal(torch.rand(1), before)
    b = s.generate([20, 21], max_new_tokens=10, do_sample=True, temperature=1.5, seed=7, eos_token_id=None)
    c = s.generate([20, 21], max_new_tokens=10, do_sample=True, temperature=1.5, seed=8, eos_token_id=None)
    assert a == b != c


def test_stop_strings_end_the_reply():
    from conftest import tiny_model

    from ccmem import CompressedModel, CompressionConfig
    from ccmem.models import load_tokenizer

    tok = load_tokenizer("smollm2")  # a real tokenizer: transformers' stop strings read its vocabulary
    model = tiny_model("llama", vocab_size=len(tok), initializer_range=0.2)
    ccm = CompressedModel.attach(model, CompressionConfig(lora_dropout=0.0), tokenizer=tok)
    s = ccm.session()
    s.add_context([5, 6, 7])
    free = s.generate([8, 9], max_new_tokens=10, eos_token_id=None)
    word = tok.decode(free[3:4])
    assert word and word not in tok.decode(free[:3])
    stopped = s.generate([8, 9], max_new_tokens=10, eos_token_id=None, stop_strings=[word])
    assert stopped == free[:4]  # up to and including the token that completes the stop string


def test_cache_contract_positions_and_sizes():
    ccm = tiny_ccm("llama")
    s = online(ccm, EPISODES[:1])
    c = s.cache()
    assert isinstance(c, CompressedCache)
    m, text = s.memory.num_slots, int(s.memory.offset[0])
    assert c.get_seq_length() == text and c.memory_length == m
    assert c.get_mask_sizes(3, 0) == (m + 3, text - m)
    with torch.no_grad():
        ccm.model(input_ids=torch.tensor([[20, 21]]), cache=c, use_cache=True)
    assert c.get_seq_length() == text + 2 and c.layers[0].keys.shape[-2] == m + 2
    c.crop(-1)
    assert c.get_seq_length() == text + 1
    with pytest.raises(InputError, match="cannot crop"):
        c.crop(-2)
    c.reset()
    assert c.get_seq_length() == text and s.memory.num_slots == m  # the memory itself never changes
