"""Metrics against hand-computed values."""

import math

import pytest

from ccmem.metrics import label_accuracy, multiple_choice, perplexity, rouge_l


def test_perplexity():
    assert perplexity(3 * math.log(4), 3) == pytest.approx(4.0)


def test_multiple_choice_variants_disagree_as_computed_by_hand():
    # example 0: options of 1 and 4 tokens. Sum picks option 0 (-2 > -4); mean picks option 1 (-1 > -2).
    # example 1: calibration flips the choice: raw picks 0 (-1 > -3), minus base (-0.5, -5) picks 1 (2 > -0.5).
    ll = [[-2.0, -4.0], [-1.0, -3.0]]
    lens = [[1, 4], [2, 2]]
    base = [[-1.0, -1.0], [-0.5, -5.0]]
    out = multiple_choice(ll, lens, answers=[1, 1], base_ll=base)
    assert out == {"acc": 0.0, "acc_norm": 0.5, "acc_base": 0.5}
    assert multiple_choice(ll, lens, answers=[0, 0]) == {"acc": 1.0, "acc_norm": 0.5}
    with pytest.raises(ValueError):
        multiple_choice([], [], [])


def test_label_accuracy_counts_every_example():
    assert label_accuracy([[-1, -2, -3], [-5, -1, -2], [-3, -2, -1]], [0, 1, 0]) == pytest.approx(2 / 3)


def test_rouge_l():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5; P = R = 5/6
    assert rouge_l("the cat sat on the mat".split(), "the cat is on the mat".split()) == pytest.approx(5 / 6)
    # LCS = 2 of prediction 2, reference 4: P = 1, R = 0.5, F = 2/3
    assert rouge_l(["a", "b"], ["a", "x", "b", "y"]) == pytest.approx(2 / 3)
    assert rouge_l([], ["a"]) == 0.0 and rouge_l(["q"], ["a"]) == 0.0


def test_option_logliks_match_a_manual_computation():
    import torch
    from conftest import tiny_ccm

    from ccmem.data import Episode
    from ccmem.evaluation import option_logliks

    ccm = tiny_ccm("llama", "concat_recur")
    ep = Episode([[5, 6, 7], [8, 9]], [10, 11], [], options=[[12], [13, 14]], answer=1)
    lls, lens = option_logliks(ccm, [ep, ep], batch_size=3)
    assert lens == [[1, 2], [1, 2]] and lls[0] == pytest.approx(lls[1], abs=1e-5)
    s = ccm.session()
    for c in ep.chunks:
        s.add_context(c)
    for j, opt in enumerate(ep.options):
        want = float(s.score(ep.input, opt).logprob[0])
        assert lls[0][j] == pytest.approx(want, abs=1e-4)
    assert all(ll < 0 for ll in lls[0]) and isinstance(lls[0][0], float) and torch.is_tensor(s.score(
        ep.input, [12]).logprob)


def test_budget_episodes_keep_the_window_and_the_sink():
    from ccmem.data import Episode
    from ccmem.evaluation import budget_episode

    ep = Episode([[1, 2, 3], [4, 5], [6, 7, 8]], [9], [10])
    assert budget_episode(ep, 4, sink=False).chunks == [[5, 6, 7, 8]]
    assert budget_episode(ep, 4, sink=True).chunks == [[1, 6, 7, 8]]
    assert budget_episode(ep, 20, sink=True).chunks == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert budget_episode(ep, 0, sink=True).chunks == []
    assert budget_episode(ep, 4, sink=True).input == [9] and budget_episode(ep, 4, sink=True).output == [10]
