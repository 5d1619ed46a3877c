"""Raw tail (``raw_tail=k``): the newest k chunks stay raw and are compressed only when they leave the tail. The
parallel layout (collator) and the online session must compute the same thing, and KV accounting counts the tail."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, tiny_ccm
from test_exactness import EPISODES, VARIANTS

from ccmem import pad_batch
from ccmem.data.collate import Collator, split_tail
from ccmem.data.episode import Episode
from ccmem.errors import ConfigError

TOL = 1e-4


def parallel_tail_logits(ccm, episodes, side="left"):
    col = Collator(ccm.tokens, ccm.config.variant, raw_tail=ccm.config.raw_tail)
    rows = [col.row(Episode(c, t, []))[0] for c, t in episodes]
    ids, am = pad_batch(rows, 0, side=side)
    with torch.no_grad():
        out = ccm.model(input_ids=ids, use_cache=False, **ccm.parallel_inputs(ids, am))
    res = []
    for b, (_, tail) in enumerate(episodes):
        pos = am[b].nonzero().squeeze(-1)
        res.append(out.logits[b, pos[-len(tail):]])
    return res


def online_session(ccm, episodes):
    s = ccm.session(batch_size=len(episodes))
    for t in range(max(len(c) for c, _ in episodes)):
        s.add_context([c[t] if t < len(c) else None for c, _ in episodes])
    return s


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("k", [1, 2, 6])
def test_parallel_equals_online_with_raw_tail(arch, attn, variant, k):
    """k = 6 exceeds every episode's chunk count: nothing is compressed, everything is raw."""
    ccm = tiny_ccm(arch, variant, attn, raw_tail=k, sink=variant == "concat_recur")
    side = "left" if arch != "qwen2" else "right"
    want = parallel_tail_logits(ccm, EPISODES, side)
    s = online_session(ccm, EPISODES)
    got, valid = s.logits([t for _, t in EPISODES])
    for b, (chunks, tail) in enumerate(EPISODES):
        assert valid[b].sum() == len(tail)
        err = (want[b] - got[b, : len(tail)]).abs().max()
        assert err <= TOL, (b, err)
        assert s.memory.tail[b] == chunks[-k:]
        assert int(s.memory.steps[b]) == max(len(chunks) - k, 0)


def test_raw_tail_changes_what_is_read():
    """Not vacuous: with a tail the last chunk is read verbatim, so the logits differ from the fully compressed
    memory, and scoring / generation read the tail too."""
    a, b = tiny_ccm("llama", raw_tail=0), tiny_ccm("llama", raw_tail=1)
    chunks, tail = EPISODES[0]
    la, _ = online_session(a, [EPISODES[0]]).logits(tail)
    sb = online_session(b, [EPISODES[0]])
    lb, _ = sb.logits(tail)
    assert (la - lb).abs().max() > 1e-2
    # score and generate see [memory | tail | prompt]: the same as a fresh session given the tail as prompt text
    fresh = sb.fork(1)
    fresh.memory.tail = [[]]
    assert fresh.memory.tail_tokens() == [0]
    prompt = chunks[-1] + tail[:2]
    s1 = sb.score(tail[:2], tail[2:])
    s2 = fresh.score(prompt, tail[2:])
    assert torch.allclose(s1.logprob, s2.logprob, atol=TOL)
    assert sb.generate(tail[:2], max_new_tokens=6, eos_token_id=None) == fresh.generate(
        prompt, max_new_tokens=6, eos_token_id=None)


def test_kv_accounting_counts_the_tail():
    ccm = tiny_ccm("llama", raw_tail=2)
    s = ccm.session()
    chunks = EPISODES[0][0]
    reports = [s.add_context(c) for c in chunks]
    per_slot = s.memory.bytes_per_slot()
    for t, rep in enumerate(reports, 1):
        compressed = max(t - 2, 0)
        tail = sum(len(c) for c in chunks[max(t - 2, 0):t])
        assert rep.slots == [2 * compressed]
        assert rep.tail_tokens == [tail]
        assert rep.memory_bytes == (2 * compressed + tail) * per_slot
        assert rep.tokens == [len(chunks[t - 3]) if t > 2 else 0]


def test_tail_survives_save_load_and_fork(tmp_path):
    ccm = tiny_ccm("llama", raw_tail=1)
    s = online_session(ccm, [EPISODES[0]])
    s.save(tmp_path / "m.safetensors")
    s2 = ccm.session()
    s2.load(tmp_path / "m.safetensors")
    assert s2.memory.tail == s.memory.tail == [[EPISODES[0][0][-1]]]
    q = EPISODES[0][1]
    assert torch.equal(s.logits(q)[0], s2.logits(q)[0])
    f = s.fork(2)
    f.add_context([[1, 2], None])
    assert f.memory.tail == [[[1, 2]], [EPISODES[0][0][-1]]] and s.memory.tail == [[EPISODES[0][0][-1]]]
    other = tiny_ccm("llama", raw_tail=2)
    with pytest.raises(Exception, match="raw_tail"):
        other.session().load(tmp_path / "m.safetensors")


def test_split_tail_and_config_errors():
    assert split_tail([[1], [2, 3], [4]], [9], 2) == ([[1]], [2, 3, 4, 9])
    assert split_tail([[1]], [9], 3) == ([], [1, 9])
    assert split_tail([[1]], [9], 0) == ([[1]], [9])
    with pytest.raises(ConfigError, match="raw_tail"):
        tiny_ccm("llama", raw_tail=-1)
    with pytest.raises(ConfigError, match="gist"):
        tiny_ccm("llama", "gist", raw_tail=1)


def test_training_step_with_everything_in_the_tail(tmp_path):
    """A micro-batch whose chunks all sit in the raw tail has no ⟨COMP⟩ row and no gradient: the step goes on."""
    from ccmem.training import TrainConfig, Trainer

    ccm = tiny_ccm("llama", raw_tail=1)
    eps = [Episode([[5, 6, 7]], [8, 9], [10, 11]), Episode([[5, 6], [7, 8]], [9], [10])]
    tr = Trainer(ccm, eps, TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=1, grad_accum=2, lr=1e-2))
    before = [p.detach().clone() for p in ccm.trainable_parameters()]
    hist = tr.fit()
    assert len(hist) == 2 and all(h["loss"] > 0 for h in hist)
    assert any(not torch.equal(a, b) for a, b in zip(before, ccm.trainable_parameters()))


def test_an_adapter_read_with_another_tail(tmp_path):
    """``from_pretrained(..., raw_tail=k)`` reads an adapter saved without a tail exactly as the same weights saved
    with one: the tail is a reading layout, not a weight. A gist adapter has no tail; the files keep theirs."""
    from conftest import tiny_model

    from ccmem import CompressedModel

    plain, tailed = tiny_ccm("llama", raw_tail=0), tiny_ccm("llama", raw_tail=1)
    assert all(torch.equal(a, b) for a, b in zip(plain.trainable_parameters(), tailed.trainable_parameters()))
    plain.save_pretrained(tmp_path / "plain")
    read = CompressedModel.from_pretrained(tmp_path / "plain", tiny_model("llama"), raw_tail=1)
    assert read.config.raw_tail == 1
    q = EPISODES[0][1]
    got, want = online_session(read, [EPISODES[0]]), online_session(tailed, [EPISODES[0]])
    assert got.memory.tail == [[EPISODES[0][0][-1]]]
    assert torch.equal(got.logits(q)[0], want.logits(q)[0])
    assert not torch.allclose(got.logits(q)[0], online_session(plain, [EPISODES[0]]).logits(q)[0], atol=1e-2)
    again = CompressedModel.from_pretrained(tmp_path / "plain", tiny_model("llama"))  # the file is unchanged
    assert again.config.raw_tail == 0
    warm = tiny_ccm("llama", raw_tail=1)  # load_adapter (warm start, resume) takes it as well
    with torch.no_grad():
        for p in warm.trainable_parameters():
            p.add_(1.0)
    warm.load_adapter(tmp_path / "plain")
    assert warm.config.raw_tail == 1
    assert torch.equal(online_session(warm, [EPISODES[0]]).logits(q)[0], want.logits(q)[0])
    tiny_ccm("llama", "gist").save_pretrained(tmp_path / "gist")
    with pytest.raises(ConfigError, match="gist"):
        CompressedModel.from_pretrained(tmp_path / "gist", tiny_model("llama"), raw_tail=1)
