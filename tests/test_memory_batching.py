"""Memories of different sessions stacked into one batch (the server's batched step) and split back: the batched
compress / generate / score equal what each session gives alone."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_ccm

from ccmem import CompressedMemory

HISTORIES = [[[5, 6, 7], [8, 9], [10, 11, 12]], [[20, 21, 22, 23]], []]  # sessions at different points, one fresh
NEW = [[30, 31], [32, 33, 34], [35]]
PROMPTS = [[40, 41], [42], [43, 44, 45]]


def alone(ccm, history):
    s = ccm.session()
    for c in history:
        s.add_context(c)
    return s


@pytest.mark.parametrize("variant", ["concat_recur", "merge_recur"])
@pytest.mark.parametrize("sink", [False, True])
def test_stacked_step_equals_each_session_alone(variant, sink):
    ccm = tiny_ccm("llama", variant, sink=sink)
    singles = [alone(ccm, h) for h in HISTORIES]
    batch = ccm.session(batch_size=len(singles))
    batch.memory = CompressedMemory.stack([s.memory for s in singles])
    assert batch.generate(PROMPTS, max_new_tokens=5, eos_token_id=None) == [
        s.generate(p, max_new_tokens=5, eos_token_id=None) for s, p in zip(singles, PROMPTS)]
    batch.add_context(NEW)
    for s, c in zip(singles, NEW):
        s.add_context(c)
    back = batch.memory.unstack()
    for s, m in zip(singles, back):
        assert m.num_slots == s.memory.num_slots and m.has_sink == s.memory.has_sink
        assert torch.equal(m.offset, s.memory.offset) and torch.equal(m.steps, s.memory.steps)
        one = ccm.session()
        one.memory = m
        a, _ = one.logits([50, 51, 52])
        b, _ = s.logits([50, 51, 52])
        assert (a - b).abs().max() <= 1e-5


def test_stack_refuses_other_configs():
    a, b = tiny_ccm("llama", n_tok=2), tiny_ccm("llama", n_tok=3)
    with pytest.raises(Exception, match="cannot share a batch"):
        CompressedMemory.stack([alone(a, [[5, 6]]).memory, alone(b, [[5, 6]]).memory])
