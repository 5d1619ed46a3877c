"""The FlexAttention backend (``attn_implementation="flex"``): the parallel forward's rule becomes a block-sparse
``BlockMask`` (no N x N tensor); results equal the sdpa backend, and sessions on a flex model still work."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, tiny_ccm
from test_exactness import EPISODES, VARIANTS, online, parallel, tail_logits
from test_gate import set_gates
from torch.nn.attention.flex_attention import BlockMask


def logits(ccm, side="right"):
    ids, am = parallel(ccm, EPISODES, side)
    extra = ccm.parallel_inputs(ids, am)
    with torch.no_grad():
        out = ccm.model(input_ids=ids, use_cache=False, **extra)
    return tail_logits(out.logits, am, EPISODES, side), extra


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sink", [False, True])
def test_flex_parallel_equals_sdpa_and_online(arch, variant, sink):
    flex, sdpa = tiny_ccm(arch, variant, "flex", sink=sink), tiny_ccm(arch, variant, "sdpa", sink=sink)
    got, extra = logits(flex)
    assert isinstance(extra["attention_mask"], BlockMask)
    want, _ = logits(sdpa)
    on, _ = online(flex, EPISODES).logits([t for _, t in EPISODES])  # sessions read dense masks (sdpa kernel)
    for b, (_, tail) in enumerate(EPISODES):
        assert (got[b] - want[b]).abs().max() <= 1e-4
        assert (got[b] - on[b, : len(tail)]).abs().max() <= 1e-4


def test_flex_with_gate_and_full_context():
    flex, sdpa = tiny_ccm("llama", "concat_recur", "flex", memory_gate=0.0), tiny_ccm("llama", memory_gate=0.0)
    set_gates(flex)
    set_gates(sdpa)
    got, _ = logits(flex)
    want, _ = logits(sdpa)
    for b in range(len(EPISODES)):
        assert (got[b] - want[b]).abs().max() <= 1e-4
    ids, am = parallel(flex, EPISODES, "right")
    with torch.no_grad():
        a = flex.model(input_ids=ids, use_cache=False, **flex.parallel_inputs(ids, am, full_context=True)).logits
        b = sdpa.model(input_ids=ids, use_cache=False, **sdpa.parallel_inputs(ids, am, full_context=True)).logits
    assert ((a - b).abs() * am[..., None]).max() <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no CPU backward (torch 2.13)")
def test_flex_training_gradients_equal_sdpa():
    flex, sdpa = tiny_ccm("llama", "concat_recur", "flex"), tiny_ccm("llama", "concat_recur", "sdpa")
    flex.model.to("cuda")
    sdpa.model.to("cuda")
    ids, am = (x.cuda() for x in parallel(flex, EPISODES, "right"))
    grads = []
    for m in (flex, sdpa):
        out = m.model(input_ids=ids, labels=ids.masked_fill(am == 0, -100), use_cache=False,
                      **m.parallel_inputs(ids, am))
        out.loss.backward()
        grads.append([p.grad.clone() for p in m.trainable_parameters() if p.grad is not None])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU training")
def test_flex_training_on_cpu_is_refused_clearly(tmp_path):
    from ccmem.data.episode import Episode
    from ccmem.errors import ConfigError
    from ccmem.training import TrainConfig, Trainer

    with pytest.raises(ConfigError, match="flex attention backend cannot train on a CPU"):
        Trainer(tiny_ccm("llama", "concat_recur", "flex"), [Episode([[5, 6]], [7], [8])],
                TrainConfig(output_dir=str(tmp_path)))
