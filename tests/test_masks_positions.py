"""Pure-function tests of the parallel-training attention masks, skip position ids and SUM averaging weights.

The expected matrices are transcribed by hand from the diagrams and worked examples of method.md §3 and §4
(n = 2 ⟨COMP⟩ tokens, base vocabulary V = 100, text ids 1..7, pad id 0).
"""

from __future__ import annotations

import pytest
import torch

from ccmem.masks import comp_attention_mask, online_mask, to_additive
from ccmem.merging import apply_merge, merge_plan
from ccmem.positions import skip_position_ids
from ccmem.tokens import CompTokens

V, N_TOK, PAD = 100, 2, 0
C0, C1, S0, S1 = V, V + 1, V + 2, V + 3
CONCAT_TOKENS = CompTokens(base=V, n_tok=N_TOK, merging=False)
MERGE_TOKENS = CompTokens(base=V, n_tok=N_TOK, merging=True)

# --- method.md §3 diagrams ------------------------------------------------------------------------------------------

CONCAT_SEQ = [1, 2, C0, C1, 3, 4, C0, C1, 5, 6, 7]

CONCAT_RECUR_MASK = [
    # t1 t2 C0 C1 t3 t4 C0 C1 t5 t6 t7
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # t1
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # t2
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # C0
    [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # C1
    [0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # t3
    [0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # t4
    [0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # C0
    [0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # C1
    [0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0],  # t5
    [0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0],  # t6
    [0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1],  # t7
]

CONCAT_MASK = [
    # t1 t2 C0 C1 t3 t4 C0 C1 t5 t6 t7
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # t1
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # t2
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # C0
    [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # C1
    [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],  # t3
    [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0],  # t4
    [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0],  # C0
    [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0],  # C1
    [0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0],  # t5
    [0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0],  # t6
    [0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1],  # t7
]

MERGE_RECUR_SEQ = [1, 2, C0, C1, S0, S1, 3, 4, C0, C1, S0, S1, 5, 6, 7]

MERGE_RECUR_MASK = [
    # t1 t2 C0 C1 S0 S1 t3 t4 C0 C1 S0 S1 t5 t6 t7
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # t1
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # t2
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # C0
    [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # C1
    [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # S0
    [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # S1
    [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # t3
    [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # t4
    [0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # C0
    [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # C1
    [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # S0
    [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # S1
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0],  # t5
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0],  # t6
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],  # t7
]

MERGE_SEQ = [1, 2, C0, C1, 3, 4, C0, C1, S0, S1, 5, 6, 7]

MERGE_MASK = [
    # t1 t2 C0 C1 t3 t4 C0 C1 S0 S1 t5 t6 t7
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # t1
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # t2
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # C0
    [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # C1
    [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # t3
    [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # t4
    [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # C0
    [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # C1
    [0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0],  # S0
    [0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0],  # S1
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0],  # t5
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0],  # t6
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],  # t7
]

GIST_SEQ = [1, 2, 3, 4, C0, C1, 5, 6, 7]

GIST_MASK = [
    # t1 t2 t3 t4 C0 C1 t5 t6 t7
    [1, 0, 0, 0, 0, 0, 0, 0, 0],  # t1
    [1, 1, 0, 0, 0, 0, 0, 0, 0],  # t2
    [1, 1, 1, 0, 0, 0, 0, 0, 0],  # t3
    [1, 1, 1, 1, 0, 0, 0, 0, 0],  # t4
    [1, 1, 1, 1, 1, 0, 0, 0, 0],  # C0
    [1, 1, 1, 1, 1, 1, 0, 0, 0],  # C1
    [0, 0, 0, 0, 1, 1, 1, 0, 0],  # t5
    [0, 0, 0, 0, 1, 1, 1, 1, 0],  # t6
    [0, 0, 0, 0, 1, 1, 1, 1, 1],  # t7
]

# variant -> (tokens, diagram sequence, diagram mask, a second, shorter sequence of a different shape)
CASES = {
    "concat_recur": (CONCAT_TOKENS, CONCAT_SEQ, CONCAT_RECUR_MASK, [1, C0, C1, 2, 3, 4, C0, C1, 5]),
    "concat": (CONCAT_TOKENS, CONCAT_SEQ, CONCAT_MASK, [1, C0, C1, 2, 3, 4, C0, C1, 5]),
    "merge_recur": (MERGE_TOKENS, MERGE_RECUR_SEQ, MERGE_RECUR_MASK, [1, C0, C1, S0, S1, 2, 3, 4]),
    "merge": (MERGE_TOKENS, MERGE_SEQ, MERGE_MASK, [1, 2, 3, C0, C1, S0, S1, 4]),
    "gist": (CONCAT_TOKENS, GIST_SEQ, GIST_MASK, [1, C0, C1, 2, 3]),
}
VARIANTS = list(CASES)


def pad_rows(rows: list[list[int]], side: str, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad rows with PAD to the longest length plus ``extra`` on ``side``; returns (input_ids, attention_mask)."""
    width = max(len(r) for r in rows) + extra
    ids, am = [], []
    for r in rows:
        fill = width - len(r)
        if side == "left":
            ids.append([PAD] * fill + r)
            am.append([0] * fill + [1] * len(r))
        else:
            ids.append(r + [PAD] * fill)
            am.append([1] * len(r) + [0] * fill)
    return torch.tensor(ids), torch.tensor(am)


def valid_block(mask: torch.Tensor, am_row: torch.Tensor) -> torch.Tensor:
    """The (valid queries x valid keys) sub-block of one (N, N) mask."""
    idx = am_row.nonzero().squeeze(-1)
    return mask[idx][:, idx]


# --- 1. diagrams ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_mask_matches_method_diagram(variant):
    tokens, seq, expected, _ = CASES[variant]
    mask = comp_attention_mask(torch.tensor([seq]), tokens, variant)
    assert mask.shape == (1, 1, len(seq), len(seq))
    assert mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], torch.tensor(expected, dtype=torch.bool))


def test_merge_recur_needs_sum_tokens_and_unknown_variant_is_rejected():
    ids = torch.tensor([CONCAT_SEQ])
    with pytest.raises(ValueError, match="SUM"):
        comp_attention_mask(ids, CONCAT_TOKENS, "merge_recur")
    with pytest.raises(ValueError, match="unknown variant"):
        comp_attention_mask(ids, CONCAT_TOKENS, "nonsense")


# --- 2. padding -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_keeps_valid_block_and_hides_pad_keys(variant, side):
    tokens, seq, expected, _ = CASES[variant]
    ids, am = pad_rows([seq], side, extra=2)
    mask = comp_attention_mask(ids, tokens, variant, attention_mask=am)[0, 0]
    assert mask.shape == (len(seq) + 2, len(seq) + 2)
    assert torch.equal(valid_block(mask, am[0]), torch.tensor(expected, dtype=torch.bool))
    pad_cols = (am[0] == 0).nonzero().squeeze(-1)
    assert pad_cols.numel() == 2
    assert not mask[:, pad_cols].any()


# --- 3. batching ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_equals_each_row_alone(variant, side):
    tokens, seq, _, other = CASES[variant]
    ids, am = pad_rows([seq, other], side)
    batch = comp_attention_mask(ids, tokens, variant, attention_mask=am)
    assert batch.shape == (2, 1, ids.shape[1], ids.shape[1])
    for b, row in enumerate([seq, other]):
        alone_padded = comp_attention_mask(ids[b : b + 1], tokens, variant, attention_mask=am[b : b + 1])
        assert torch.equal(batch[b], alone_padded[0])
        alone = comp_attention_mask(torch.tensor([row]), tokens, variant)[0, 0]
        assert torch.equal(valid_block(batch[b, 0], am[b]), alone)


# --- 4. attention sink ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_sink_makes_first_valid_token_visible_to_every_valid_query(variant, side):
    tokens, seq, _, other = CASES[variant]
    ids, am = pad_rows([seq, other], side, extra=2)
    plain = comp_attention_mask(ids, tokens, variant, attention_mask=am)[:, 0]
    sunk = comp_attention_mask(ids, tokens, variant, attention_mask=am, sink=True)[:, 0]
    for b in range(2):
        valid = am[b].bool()
        first = int(valid.nonzero()[0])
        assert sunk[b][valid, first].all()
        # Nothing else changes: other columns are as without the sink, pad keys stay hidden.
        others = torch.ones_like(valid)
        others[first] = False
        assert torch.equal(sunk[b][:, others], plain[b][:, others])
        assert not sunk[b][:, ~valid].any()
    if side == "left":
        # The diagram's t5 (first I/O token) cannot see t1 without the sink, and can with it.
        t5 = int(am[0].nonzero()[0]) + seq.index(5)
        first = int(am[0].nonzero()[0])
        assert not plain[0, t5, first]
        assert sunk[0, t5, first]


# --- 5. position ids ------------------------------------------------------------------------------------------------

# method.md §4 worked examples (n = 2)
POS_CONCAT_IDS = [PAD, PAD, 1, 2, 3, C0, C1, 4, 5, C0, C1, 6, 7]
POS_CONCAT_AM = [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
POS_CONCAT_EXPECTED = [1, 1, 0, 1, 2, 3, 4, 3, 4, 5, 6, 5, 6]
POS_MERGE_IDS = [1, 2, C0, C1, S0, S1, 3, 4, C0, C1, S0, S1, 5]
POS_MERGE_EXPECTED = [0, 1, 2, 3, 2, 3, 2, 3, 4, 5, 4, 5, 4]


def test_positions_left_padded_concat_example():
    ids = torch.tensor([POS_CONCAT_IDS])
    pos = skip_position_ids(CONCAT_TOKENS.is_special(ids), N_TOK, attention_mask=torch.tensor([POS_CONCAT_AM]))
    assert torch.equal(pos, torch.tensor([POS_CONCAT_EXPECTED]))


def test_positions_merge_example():
    ids = torch.tensor([POS_MERGE_IDS])
    pos = skip_position_ids(MERGE_TOKENS.is_special(ids), N_TOK)
    assert torch.equal(pos, torch.tensor([POS_MERGE_EXPECTED]))


def test_positions_int_offset_shifts_every_position():
    ids = torch.tensor([POS_CONCAT_IDS])
    pos = skip_position_ids(CONCAT_TOKENS.is_special(ids), N_TOK, torch.tensor([POS_CONCAT_AM]), offset=10)
    assert torch.equal(pos, torch.tensor([[p + 10 for p in POS_CONCAT_EXPECTED]]))


def test_positions_per_row_tensor_offset():
    ids = torch.tensor([POS_CONCAT_IDS, POS_MERGE_IDS])
    am = torch.tensor([POS_CONCAT_AM, [1] * len(POS_MERGE_IDS)])
    pos = skip_position_ids(MERGE_TOKENS.is_special(ids), N_TOK, am, offset=torch.tensor([3, 7]))
    expected = torch.tensor([[p + 3 for p in POS_CONCAT_EXPECTED], [p + 7 for p in POS_MERGE_EXPECTED]])
    assert torch.equal(pos, expected)


# --- 6. additive masks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_to_additive(dtype):
    allowed = torch.tensor(CONCAT_RECUR_MASK, dtype=torch.bool)[None, None]
    out = to_additive(allowed, dtype)
    assert out.dtype == dtype
    assert out.shape == allowed.shape
    assert (out[allowed] == 0).all()
    assert (out[~allowed] == torch.finfo(dtype).min).all()
    assert torch.isfinite(out).all()


# --- 7. online mask -------------------------------------------------------------------------------------------------


def test_online_mask_small_case():
    # Two memory slots (the second one invalid), then three new tokens n1 n2 n3.
    key_valid = torch.tensor([[1, 0, 1, 1, 1]])
    expected = torch.tensor(
        [
            # m0 m1 n1 n2 n3
            [1, 0, 1, 0, 0],  # n1
            [1, 0, 1, 1, 0],  # n2
            [1, 0, 1, 1, 1],  # n3
        ],
        dtype=torch.bool,
    )
    mask = online_mask(key_valid, q_len=3)
    assert mask.shape == (1, 1, 3, 5)
    assert torch.equal(mask[0, 0], expected)


# --- 8. SUM averaging weights ---------------------------------------------------------------------------------------


def test_merge_plan_hand_written():
    """The cumulative-sum means equal the hand-written averaging matrix (the old dense form) applied to K and V."""
    #                    0  1  2   3   4   5   6  7  8   9   10  11  12
    ids = torch.tensor([[1, 2, C0, C1, S0, S1, 3, 4, C0, C1, S0, S1, 5]])
    w = torch.zeros(1, 13, 13)
    w[0, 4, 2] = 1.0  # S0 at step 1: C0 of step 1
    w[0, 5, 3] = 1.0  # S1 at step 1: C1 of step 1
    w[0, 10, 2] = w[0, 10, 8] = 0.5  # S0 at step 2: mean of both C0
    w[0, 11, 3] = w[0, 11, 9] = 0.5  # S1 at step 2: mean of both C1
    plan = merge_plan(ids, MERGE_TOKENS)
    assert plan is not None and plan.length == 13
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 13, 4, generator=g), torch.randn(1, 2, 13, 4, generator=g)
    keep = (w.sum(-1) == 0).float()[:, None, :, None]
    mk, mv = apply_merge(k, v, plan)
    assert torch.allclose(mk, keep * k + w[:, None] @ k, atol=1e-6)
    assert torch.allclose(mv, keep * v + w[:, None] @ v, atol=1e-6)
    # bf16 keys: the means are accumulated in fp32 and rounded once
    kb = k.bfloat16()
    assert torch.equal(apply_merge(kb, kb, plan)[0][0, :, 10], ((k[0, :, 2] + k[0, :, 8]) / 2).bfloat16())


def test_merge_plan_restarts_in_each_packed_episode():
    one = [1, 2, C0, C1, S0, S1, 3, 4, C0, C1, S0, S1, 5]
    two = [6, C0, C1, S0, S1, 7]
    ids = torch.tensor([one + two])
    seg = torch.tensor([[0] * len(one) + [1] * len(two)])
    plan = merge_plan(ids, MERGE_TOKENS, seg)
    k = torch.randn(1, 1, len(one) + len(two), 3)
    out, _ = apply_merge(k, k, plan)
    n = len(one)
    assert torch.allclose(out[0, 0, n + 3], k[0, 0, n + 1])  # S0 of episode 2 = its own C0, not the mean of three
    assert torch.allclose(out[0, 0, 10], (k[0, 0, 2] + k[0, 0, 8]) / 2)


def test_merge_plan_none_without_sum_tokens():
    assert merge_plan(torch.tensor([CONCAT_SEQ]), CONCAT_TOKENS) is None
    assert merge_plan(torch.tensor([CONCAT_SEQ]), MERGE_TOKENS) is None
