"""Packed rows: several episodes in one row with block-diagonal mask rules, positions restarting per episode and
merge means per episode give exactly what one padded row per episode gives; the LM head runs on target rows only."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_ccm
from test_exactness import EPISODES

from ccmem import episode_ids, pad_batch
from ccmem.data.collate import IGNORE, Collator, lm_loss, lm_loss_at, loss_positions
from ccmem.data.episode import Episode
from ccmem.sequence import pack_rows

THREE = [*EPISODES, ([[50, 51, 52, 53], [54, 55]], [56, 57])]
TOL = 1e-4


def test_pack_rows_first_fit_in_order():
    rows = [[1] * 5, [2] * 4, [3] * 3, [4] * 2, [5] * 9]
    ids, mask, seg, place = pack_rows(rows, max_tokens=9, pad_id=0)
    assert place == [(0, 0), (0, 5), (1, 0), (1, 3), (2, 0)]
    assert ids.shape == (3, 9)
    assert ids[0].tolist() == [1] * 5 + [2] * 4 and seg[0].tolist() == [0] * 5 + [1] * 4
    assert ids[1].tolist()[:5] == [3, 3, 3, 4, 4] and mask[1].tolist() == [1] * 5 + [0] * 4
    assert seg[1].tolist() == [0, 0, 0, 1, 1, -1, -1, -1, -1]
    big = pack_rows([[7] * 12], max_tokens=9, pad_id=0)[0]
    assert big.shape == (1, 12)  # an over-long sequence gets a row of its own


@pytest.mark.parametrize("variant", ["concat_recur", "merge_recur", "concat", "merge", "gist"])
@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_padded(variant, sink, attn):
    ccm = tiny_ccm("llama", variant, attn, sink=sink)
    rows = [episode_ids(c, t, ccm.tokens, variant) for c, t in THREE]
    ids, am = pad_batch(rows, 0, side="left")
    pids, pam, seg, place = pack_rows(rows, max_tokens=sum(map(len, rows)), pad_id=0)
    assert pids.shape[0] == 1
    with torch.no_grad():
        padded = ccm.model(input_ids=ids, use_cache=False, **ccm.parallel_inputs(ids, am)).logits
        packed = ccm.model(input_ids=pids, use_cache=False, **ccm.parallel_inputs(pids, pam, segments=seg)).logits
    for i, r in enumerate(rows):
        b, start = place[i]
        want = padded[i, ids.shape[1] - len(r):]
        got = packed[b, start:start + len(r)]
        assert (want - got).abs().max() <= TOL, (i, (want - got).abs().max())


def test_packed_full_context_rows_do_not_see_each_other():
    ccm = tiny_ccm("llama")
    rows = [[5, 6, 7, 8], [9, 10, 11]]
    pids, pam, seg, _ = pack_rows(rows, 16, 0)
    with torch.no_grad():
        packed = ccm.model(input_ids=pids, **ccm.parallel_inputs(pids, pam, full_context=True, segments=seg)).logits
        alone = ccm.model(input_ids=torch.tensor([rows[1]])).logits
    assert torch.allclose(packed[0, 4:7], alone[0], atol=TOL)


@pytest.mark.parametrize("variant", ["concat_recur", "merge_recur"])
def test_packed_training_loss_and_gradients_equal_padded(variant):
    ccm = tiny_ccm("llama", variant)
    eps = [Episode(c, t[:-2], t[-2:]) for c, t in THREE]
    grads = []
    for pack in (0, 64):
        col = Collator(ccm.tokens, variant, pack=pack)
        b = col(eps)
        assert ("segments" in b) == bool(pack)
        keep = loss_positions(b["labels"])
        extra = ccm.parallel_inputs(b["input_ids"], b["attention_mask"], segments=b.get("segments"))
        logits = ccm.model(input_ids=b["input_ids"], use_cache=False, logits_to_keep=keep, **extra).logits
        assert logits.shape[1] == len(keep) < b["input_ids"].shape[1]
        loss = lm_loss_at(logits, b["labels"], keep)
        ccm.model.zero_grad()
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in ccm.trainable_parameters()]))
    (la, ga), (lb, gb) = grads
    assert la == pytest.approx(lb, abs=1e-5)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-5)


def test_loss_at_positions_equals_loss_on_all_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    labels = torch.tensor([[IGNORE, 3, IGNORE, IGNORE, 4, 5, IGNORE], [IGNORE] * 6 + [2]])
    keep = loss_positions(labels)
    assert keep.tolist() == [0, 3, 4, 5]
    assert torch.allclose(lm_loss_at(logits[:, keep], labels, keep), lm_loss(logits, labels))
