"""Memory gate (``memory_gate``): a learned per-layer, per-head bias on the attention logits of compressed-memory
slots. Parallel and online must bias the same entries, a closed gate must make the memory invisible, an open one
(0) must be the plain method, and raw slots, the sink and the raw tail are never gated."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, tiny_ccm
from test_exactness import EPISODES, VARIANTS, online, parallel, tail_logits

from ccmem import CompressedModel
from ccmem.errors import ConfigError
from ccmem.gate import gate_parameters
from ccmem.streaming import StreamConfig, Streamer

TOL = 1e-4


def set_gates(ccm, value=None, std=3.0, seed=5):
    """Gates far from 0 (random per head, or one value), so a mistake in which entries they bias shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gate_parameters(ccm.model).values():
            p.copy_(torch.full(p.shape, float(value)) if value is not None else torch.randn(p.shape, generator=g) * std)


def parallel_logits(ccm, episodes, side):
    ids, am = parallel(ccm, episodes, side)
    with torch.no_grad():
        out = ccm.model(input_ids=ids, use_cache=False, **ccm.parallel_inputs(ids, am))
    return tail_logits(out.logits, am, episodes, side)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sink", [False, True])
def test_gated_parallel_equals_online(arch, attn, variant, sink):
    ccm = tiny_ccm(arch, variant, attn, sink=sink, memory_gate=0.0)
    set_gates(ccm)
    side = "left" if arch != "qwen2" else "right"
    par = parallel_logits(ccm, EPISODES, side)
    got, _ = online(ccm, EPISODES).logits([t for _, t in EPISODES])
    for b, (_, tail) in enumerate(EPISODES):
        err = (par[b] - got[b, : len(tail)]).abs().max()
        assert err <= TOL, (b, err)


@pytest.mark.parametrize("variant", ["concat_recur", "merge_recur"])
def test_gated_parallel_equals_online_with_raw_tail(variant):
    from test_raw_tail import online_session, parallel_tail_logits

    ccm = tiny_ccm("llama", variant, raw_tail=1, memory_gate=0.0)
    set_gates(ccm)
    want = parallel_tail_logits(ccm, EPISODES)
    got, _ = online_session(ccm, EPISODES).logits([t for _, t in EPISODES])
    for b, (_, tail) in enumerate(EPISODES):
        assert (want[b] - got[b, : len(tail)]).abs().max() <= TOL


def test_gate_changes_the_output_and_zero_gate_is_the_plain_method():
    plain = tiny_ccm("llama", memory_gate=None)
    gated = tiny_ccm("llama", memory_gate=0.0)  # same seed: same LoRA and ⟨COMP⟩ weights, gates filled after them
    for k, p in plain.trainable_named_parameters().items():
        assert torch.equal(p, gated.trainable_named_parameters()[k])
    set_gates(gated, 0.0)
    tails = [t for _, t in EPISODES]
    a, _ = online(plain, EPISODES).logits(tails)
    b, _ = online(gated, EPISODES).logits(tails)
    assert (a - b).abs().max() <= 1e-5
    set_gates(gated)
    c, _ = online(gated, EPISODES).logits(tails)
    assert (a - c).abs().max() > 1e-2


@pytest.mark.parametrize("variant", ["concat_recur", "merge_recur"])
def test_closed_gate_hides_the_memory(variant):
    """A gate of -30 leaves e^-30 of the attention on memory: the input is read as if there were no context."""
    ccm = tiny_ccm("llama", variant, memory_gate=-30.0)
    set_gates(ccm, -30.0)  # tiny_ccm randomises every trainable tensor, the gates too
    (chunks, tail), = EPISODES[:1]
    s = online(ccm, [(chunks, tail)])
    got, _ = s.logits(tail)
    with torch.no_grad():
        alone = ccm.model(input_ids=torch.tensor([tail])).logits  # same relative positions, no memory
    assert (got[0, : len(tail)] - alone[0]).abs().max() <= 1e-4
    set_gates(ccm, 0.0)
    opened, _ = s.logits(tail)
    assert (opened[0, : len(tail)] - alone[0]).abs().max() > 1e-2


def test_raw_slots_and_sink_are_not_gated(tmp_path):
    """add_raw keeps verbatim tokens (the full-context baseline): a closed gate must not hide them, also after the
    memory is saved and loaded."""
    ccm = tiny_ccm("llama", memory_gate=-30.0)
    set_gates(ccm, -30.0)
    chunks, tail = EPISODES[0]
    s = ccm.session()
    for c in chunks:
        s.add_raw(c)
    got, _ = s.logits(tail)
    flat = [t for c in chunks for t in c] + tail
    with torch.no_grad():
        full = ccm.model(input_ids=torch.tensor([flat])).logits[0, -len(tail):]
    assert (got[0, : len(tail)] - full).abs().max() <= 1e-4
    s.save(tmp_path / "m.safetensors")
    s2 = ccm.session()
    s2.load(tmp_path / "m.safetensors")
    assert bool(s2.memory.raw.all()) and s2.memory.raw.shape[0] == s.memory.num_slots
    again, _ = s2.logits(tail)
    assert torch.allclose(again, got, atol=1e-6)


def test_memory_slots_flags():
    ccm = tiny_ccm("llama", sink=True, memory_gate=-2.0)
    s = ccm.session()
    s.add_context([1, 2, 3])
    s.add_context([4, 5])
    assert s.memory.memory_slots().tolist() == [False, True, True, True, True]  # sink, then 2 x n_tok slots


def test_gate_saved_with_the_adapter(tmp_path):
    from conftest import tiny_model

    ccm = tiny_ccm("llama", memory_gate=-4.0)
    set_gates(ccm)
    ccm.save_pretrained(tmp_path / "a")
    back = CompressedModel.from_pretrained(tmp_path / "a", tiny_model("llama"))
    assert back.config.memory_gate == -4.0
    mine, theirs = gate_parameters(ccm.model), gate_parameters(back.model)
    assert len(mine) == 2 and mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k])
    back.detach(remove_weights=True)
    assert not gate_parameters(back.model)


def test_gate_is_trainable_and_config_checked():
    ccm = tiny_ccm("llama", memory_gate=-6.0)
    names = [n for n in ccm.trainable_named_parameters() if n.startswith("gate.")]
    assert len(names) == 2 and all(ccm.trainable_named_parameters()[n].requires_grad for n in names)
    assert tuple(ccm.trainable_named_parameters()[names[0]].shape) == (4,)  # one per query head
    for bad in (True, "open", 100.0):
        with pytest.raises(ConfigError, match="memory_gate"):
            tiny_ccm("llama", memory_gate=bad)


def test_gradient_reaches_the_gate():
    from ccmem.data.episode import Episode
    from ccmem.recurrent import recurrent_loss

    ccm = tiny_ccm("llama", memory_gate=-1.0)
    loss = recurrent_loss(ccm, [Episode([[5, 6, 7], [8, 9]], [20, 21], [22, 23])])
    loss.backward()
    grads = [p.grad for p in gate_parameters(ccm.model).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_streaming_with_a_gate_runs_and_a_closed_gate_hides_memory():
    import random

    r = random.Random(0)
    tokens = [r.randrange(3, 120) for _ in range(120)]
    cfg = StreamConfig(window=40, chunk=16, mem_slots=6, sink=1)
    closed_ccm, opened_ccm = tiny_ccm("llama", memory_gate=-30.0), tiny_ccm("llama", memory_gate=-30.0)
    set_gates(closed_ccm, -30.0)
    set_gates(opened_ccm, 3.0)
    closed = Streamer(closed_ccm, "ccm", cfg).run(tokens)
    opened = Streamer(opened_ccm, "ccm", cfg).run(tokens)
    assert len(closed.nll) == len(opened.nll) == len(tokens) - 1
    assert abs(closed.ppl - opened.ppl) > 1e-3
