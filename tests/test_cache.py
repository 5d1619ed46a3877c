"""``CompressedCache``: the memory as a transformers Cache that ``model.generate`` continues from, equal to
``Session.generate`` token for token."""

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


def generate_both(ccm, chunks, prompt, n=8):
    s = online(ccm, [(chunks, prompt)])
    want = s.generate(prompt, max_new_tokens=n, eos_token_id=None)
    streamer = Collect()
    out = ccm.model.generate(**s.generation_inputs(prompt), max_new_tokens=n, do_sample=False, streamer=streamer,
                             pad_token_id=0, eos_token_id=None)
    got = out[0, len(prompt):].tolist()
    return want, got, streamer.tokens, s


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", ["concat_recur", "merge_recur"])
def test_model_generate_equals_session_generate(arch, attn, variant):
    ccm = tiny_ccm(arch, variant, attn, lora_dropout=0.0)
    chunks, prompt = EPISODES[0]
    want, got, streamed, _ = generate_both(ccm, chunks, prompt)
    assert got == want
    assert streamed[len(prompt):] == want  # the streamer sees the prompt, then each new token


@pytest.mark.parametrize("cfg", [{"sink": True}, {"raw_tail": 1}, {"memory_gate": 0.0}, {"n_tok": 4}])
def test_model_generate_with_sink_tail_gate_and_more_slots_than_text(cfg):
    ccm = tiny_ccm("llama", "concat_recur", **cfg)
    if "memory_gate" in cfg:
        set_gates(ccm)
    chunks = [[5], [6, 7], [8]] if cfg.get("n_tok") == 4 else EPISODES[1][0]  # 12 slots for 4 text tokens
    want, got, _, s = generate_both(ccm, chunks, EPISODES[1][1])
    assert got == want
    if cfg.get("n_tok") == 4:
        assert s.memory.num_slots > int(s.memory.offset[0])


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


def test_rows_at_different_points_are_refused():
    ccm = tiny_ccm("llama")
    s = online(ccm, EPISODES)  # 5 and 4 chunks
    with pytest.raises(InputError, match="Session.generate"):
        s.cache()
