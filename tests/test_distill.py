"""Distillation from the model that read the raw past: the raw-context forward is exactly the plain model on the
uncompressed tokens (same rows as the compressed forward, padded or packed), and the distillation loss is the KL to
it, mixed with cross-entropy by ``TrainConfig.distill``."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_ccm, tiny_model
from test_exactness import EPISODES

from ccmem import episode_ids, pad_batch
from ccmem.data.collate import IGNORE, Collator, kl_at, loss_positions
from ccmem.data.episode import Episode
from ccmem.masks import comp_mask_function, dense_mask, raw_and_memory_mask_function
from ccmem.sequence import pack_rows
from ccmem.training import TrainConfig, Trainer

TOL = 1e-4


@pytest.mark.parametrize("arch,variant", [("llama", "concat_recur"), ("qwen2", "merge_recur"),
                                          ("mistral", "concat")])
def test_raw_context_forward_is_the_plain_model_on_the_raw_tokens(arch, variant):
    ccm = tiny_ccm(arch, variant, memory_gate=-1.0, sink=True)  # random LoRA, gate and ⟨COMP⟩ embeddings
    plain = tiny_model(arch, 0)  # the same weights, nothing attached
    rows = [episode_ids(c, t, ccm.tokens, variant) for c, t in EPISODES]
    for ids, am, seg in [(*pad_batch(rows, 0), None), pack_rows(rows, 256, 0)[:3]]:
        with torch.no_grad():
            out = ccm.model(input_ids=ids, **ccm.parallel_inputs(ids, am, segments=seg, raw_context=True)).logits
            compressed = ccm.model(input_ids=ids, **ccm.parallel_inputs(ids, am, segments=seg)).logits
        assert torch.isfinite(out).all()
        for b, row in enumerate(rows):
            special = ccm.tokens.is_special(torch.tensor(row)).tolist()
            raw = [i for i, s in zip(row, special) if not s]
            with torch.no_grad():
                ref = plain(input_ids=torch.tensor([raw])).logits[0]
            if seg is None:  # left padded: row b ends at the end
                r, start = b, ids.shape[1] - len(row)
            else:  # packed: both episodes in row 0, one after the other
                r, start = 0, sum(len(x) for x in rows[:b])
            where = [start + j for j, s in enumerate(special) if not s]
            assert torch.allclose(out[r, where], ref, atol=TOL)
            # and the compressed forward differs where the memory is read (the test could not pass trivially)
            assert not torch.allclose(compressed[r, where[-3:]], ref[-3:], atol=1e-2)


def test_kl_at_by_hand():
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    labels = torch.tensor([[IGNORE, 4, IGNORE, 5], [IGNORE, IGNORE, 6, 1]])
    keep = loss_positions(labels)
    assert keep.tolist() == [0, 1, 2]
    kl = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                    reduction="none").sum(-1)  # KL(t || s) per row
    rows = (labels[:, 1:] != IGNORE)
    assert kl_at(s, t, labels, keep) == pytest.approx(float(kl[rows].mean()), abs=1e-6)
    w = torch.tensor([[0.0, 2.0, 0.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    by_hand = float((kl[rows] * torch.tensor([2.0, 2.0, 1.0, 1.0])).sum() / 6)
    assert kl_at(s, t, labels, keep, weights=w) == pytest.approx(by_hand, abs=1e-6)
    assert float(kl_at(t, t, labels, keep)) == pytest.approx(0.0, abs=1e-6)


def _batch(ccm):
    eps = [Episode(c, t[:-2], t[-2:]) for c, t in EPISODES]
    return Collator(ccm.tokens, ccm.config.variant, mode="compress", pad_id=0)(eps)


def test_distillation_loss_is_the_kl_to_the_raw_past_mixed_with_cross_entropy(tmp_path):
    ccm = tiny_ccm("llama")
    tr = Trainer(ccm, [], TrainConfig(output_dir=str(tmp_path), max_steps=1, distill=1.0))
    batch = _batch(ccm)
    ccm.model.eval()
    with torch.no_grad():
        ce = float(tr._forward_loss(batch)[0])
        kl = float(tr._forward_loss(batch, distill=1.0)[0])
        half = float(tr._forward_loss(batch, distill=0.5)[0])
        # by hand: the plain model on each episode's raw tokens is the teacher
        ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        keep = loss_positions(labels)
        student = ccm.model(input_ids=ids, logits_to_keep=keep, **ccm.parallel_inputs(ids, am)).logits
        teacher = torch.zeros_like(student)
        plain = tiny_model("llama", 0)
        for b in range(ids.shape[0]):
            real = am[b].bool() & ~ccm.tokens.is_special(ids[b])
            ref = plain(input_ids=ids[b, real][None]).logits[0]
            index = torch.full((ids.shape[1],), -1, dtype=torch.long)
            index[real] = torch.arange(int(real.sum()))
            for k, p in enumerate(keep.tolist()):
                if index[p] >= 0:
                    teacher[b, k] = ref[index[p]]
    assert kl == pytest.approx(float(kl_at(student, teacher, labels, keep)), rel=1e-4)
    assert kl > 0.01 and half == pytest.approx(0.5 * ce + 0.5 * kl, rel=1e-5)


def test_distillation_trains_the_memory_towards_the_raw_past(tmp_path):
    """With the KL alone (no labels used) the compressed model's predictions approach the raw-context model's."""
    from test_training import key_task, make_toy_ccm

    ccm = make_toy_ccm()  # confident predictions: the raw-context teacher is far from the untrained memory
    tr = Trainer(ccm, key_task(64, 0), TrainConfig(output_dir=str(tmp_path), max_steps=150, batch_size=16, lr=1e-2,
                                                   distill=1.0, warmup_ratio=0.0))
    hist = tr.fit()
    assert "ce" in hist[0] and hist[0]["loss"] > 0.5, hist[0]
    assert sum(h["loss"] for h in hist[-5:]) / 5 < 0.5 * hist[0]["loss"], [h["loss"] for h in hist]


def test_distill_setting_is_checked():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        TrainConfig(distill=1.5)
    with pytest.raises(ValueError, match="compress"):
        TrainConfig(distill=0.5, mode="full")


@pytest.mark.parametrize("variant", ["concat_recur", "merge_recur"])
def test_raw_and_memory_teacher_mask(variant):
    """⟨COMP⟩/SUM rows keep the compressed rule (the memory is the student's); text rows read the compressed rule's
    keys and every earlier raw token of their episode, nothing more."""
    ccm = tiny_ccm("llama", variant)
    rows = [episode_ids(c, t, ccm.tokens, variant) for c, t in EPISODES]
    ids, am, seg = pack_rows(rows, 256, 0)[:3]
    for s_ids, s_am, s_seg in [(ids, am, seg), (*pad_batch(rows, 0), None)]:
        both = dense_mask(raw_and_memory_mask_function(s_ids, ccm.tokens, variant, s_am, True, s_seg), *s_ids.shape)
        comp = dense_mask(comp_mask_function(s_ids, ccm.tokens, variant, s_am, True, s_seg), *s_ids.shape)
        special = ccm.tokens.is_special(s_ids)
        assert torch.equal(both[:, 0][special], comp[:, 0][special])
        segs = torch.where(s_am.bool(), 0, -1) if s_seg is None else s_seg
        n = s_ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        raw_past = (~special)[:, None, :] & causal & (segs[:, :, None] == segs[:, None, :]) & s_am.bool()[:, None, :]
        want = comp[:, 0] | raw_past
        text = ~special & s_am.bool()
        assert torch.equal(both[:, 0][text], want[text])
        assert (both[:, 0][text] & ~comp[:, 0][text]).any()  # it does add the raw past


def test_raw_and_memory_teacher_in_the_loss(tmp_path):
    ccm = tiny_ccm("llama", memory_gate=-1.0, sink=True)
    tr = Trainer(ccm, [], TrainConfig(output_dir=str(tmp_path), max_steps=1, distill=1.0, teacher="raw+memory"))
    batch = _batch(ccm)
    ccm.model.eval()
    with torch.no_grad():
        kl = float(tr._forward_loss(batch, distill=1.0)[0])
        ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        keep = loss_positions(labels)
        student = ccm.model(input_ids=ids, logits_to_keep=keep, **ccm.parallel_inputs(ids, am)).logits
        teacher = ccm.model(input_ids=ids, logits_to_keep=keep,
                            **ccm.parallel_inputs(ids, am, raw_and_memory=True)).logits
        raw = ccm.model(input_ids=ids, logits_to_keep=keep, **ccm.parallel_inputs(ids, am, raw_context=True)).logits
    assert kl == pytest.approx(float(kl_at(student, teacher, labels, keep)), rel=1e-4)
    assert kl > 1e-4 and not torch.allclose(teacher, raw, atol=1e-3)  # neither the student nor the raw teacher
    with pytest.raises(ValueError, match="teacher"):
        TrainConfig(teacher="base")
    with pytest.raises(ValueError, match="exclude"):
        ccm.parallel_inputs(ids, am, raw_context=True, raw_and_memory=True)
