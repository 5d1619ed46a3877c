"""Streaming: re-rotated keys equal keys computed at the new positions, equal KV budgets across methods, bounded
memory and cache, on tiny random models."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch
from conftest import tiny_ccm

from ccmem.streaming import KV, StreamConfig, Streamer, rope_inv_freq, stream_all


def test_rerotated_cache_equals_keys_computed_at_new_positions():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ccm = tiny_ccm("llama", "concat_recur")
    model = ccm.model
    pre = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, a, o, i=i: pre.__setitem__(i, o))
             for i, layer in enumerate(model.model.layers)]
    x = torch.randint(3, 100, (1, 20))
    with torch.no_grad():
        out = model(input_ids=x, use_cache=True)
    for h in hooks:
        h.remove()
    kv = KV([la.keys for la in out.cache.layers], [la.values for la in out.cache.layers], ["win"] * 20)
    keep = [0] + list(range(8, 20))  # evict 7 tokens after the first
    moved = kv.select(keep, rope_inv_freq(model))

    heads, dim = model.config.num_key_value_heads, model.config.head_dim
    pos = torch.arange(len(keep))[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    ref_keys = []
    for i in range(len(kv.keys)):
        k = pre[i][:, keep].view(1, len(keep), heads, dim).transpose(1, 2)
        ref_keys.append(apply_rotary_pos_emb(k, k, cos, sin)[1])
        assert torch.allclose(moved.keys[i], ref_keys[i], atol=1e-5)

    y = torch.randint(3, 100, (1, 3))
    with torch.no_grad():
        got = model(input_ids=y, cache=moved.cache(), position_ids=torch.arange(13, 16)[None]).logits
        ref = model(input_ids=y, cache=KV(ref_keys, moved.values, moved.kinds).cache(),
                    position_ids=torch.arange(13, 16)[None]).logits
    assert (got - ref).abs().max() < 1e-4


@pytest.mark.parametrize("variant", ["concat_recur", "merge_recur"])
def test_equal_budgets_and_bounded_cache(variant):
    ccm = tiny_ccm("llama", variant, sink=True)
    cfg = StreamConfig(window=40, chunk=16, mem_slots=6, sink=1)
    tokens = [random.Random(0).randrange(3, 120) for _ in range(400)]
    runs = stream_all(ccm, tokens, cfg)
    sizes = {m: r.cache_sizes for m, r in runs.items()}
    assert sizes["ccm"] == sizes["streamingllm"] == sizes["window"]
    assert len(sizes["ccm"]) == len(tokens) - 1 and max(sizes["ccm"]) <= cfg.window
    for r in runs.values():
        assert len(r.nll) == len(tokens) - 1
    assert runs["ccm"].ppl != runs["streamingllm"].ppl


def test_a_budget_that_never_evicts_is_full_context():
    """Nothing to compress or evict: every method's per-token loss is the model's own on the whole text."""
    import math

    ccm = tiny_ccm("llama", "concat_recur", sink=True)
    tokens = [random.Random(1).randrange(3, 120) for _ in range(120)]
    runs = stream_all(ccm, tokens, StreamConfig(window=200, chunk=16, mem_slots=6, sink=1))
    with torch.no_grad():
        logp = torch.log_softmax(ccm.model(input_ids=torch.tensor([tokens])).logits[0, :-1].float(), -1)
    want = [-float(logp[i, tokens[i + 1]]) for i in range(len(tokens) - 1)]
    for r in runs.values():
        assert max(abs(a - b) for a, b in zip(r.nll, want)) < 1e-4
        assert math.isclose(r.ppl, math.exp(sum(want) / len(want)), rel_tol=1e-5)


def test_memory_slots_are_fifo_and_capped():
    ccm = tiny_ccm("llama", "concat_recur", sink=True)
    s = Streamer(ccm, "ccm", StreamConfig(window=40, chunk=16, mem_slots=6, sink=1))
    kinds_seen = []
    orig = s._event

    def spy(kv):
        new = orig(kv)
        kinds_seen.append(new.kinds)
        return new

    s._event = spy
    s.run(list(range(3, 120)) * 3)
    assert len(kinds_seen) > 4
    for kinds in kinds_seen:
        assert kinds[0] == "sink" and kinds.count("mem") <= 6 and kinds.count("sink") == 1
        assert kinds == sorted(kinds, key=["sink", "mem", "win"].index)
    assert kinds_seen[-1].count("mem") == 6


PEAK = """
import resource, sys, random
sys.path.insert(0, "tests")
from conftest import tiny_ccm
from ccmem.streaming import StreamConfig, Streamer
ccm = tiny_ccm("llama", "concat_recur", sink=True)
r = random.Random(0)
n = int(sys.argv[1])
Streamer(ccm, "ccm", StreamConfig(window=160, chunk=64)).run([r.randrange(3, 120) for _ in range(n)])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_peak_memory_is_bounded():
    peaks = []
    for n in (10_000, 100_000):
        out = subprocess.run([sys.executable, "-c", PEAK, str(n)], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-1500:]
        peaks.append(int(out.stdout.split()[-1]))
    assert peaks[1] <= 1.05 * peaks[0], peaks


def test_books_and_stream_episodes(tmp_path):
    from ccmem.data.text import read_books, stream_episodes

    (tmp_path / "b.txt").write_text("second book")
    (tmp_path / "a.txt").write_text("first book")
    assert read_books(tmp_path) == ["first book", "second book"]
    assert read_books(tmp_path / "a.txt") == ["first book"]
    with pytest.raises(FileNotFoundError, match="no book"):
        read_books(tmp_path / "missing")
    toks = list(range(1000))
    eps = stream_episodes(toks, 5, steps=2, chunk=8, window=6, target=4, seed=3)
    for e in eps:
        o = e.chunks[0][0]
        assert e.chunks == [toks[o:o + 8], toks[o + 8:o + 16]]
        assert e.input == toks[o + 16:o + 22] and e.output == toks[o + 22:o + 26]
    assert [e.id for e in eps] == [e.id for e in stream_episodes(toks, 5, 2, 8, 6, 4, seed=3)]
    with pytest.raises(ValueError, match="fewer than one episode"):
        stream_episodes(toks[:10], 1, chunk=8)


def test_stream_episodes_with_ranges_cover_the_cache_shapes():
    """``steps`` / ``window`` as [lo, hi] ranges: every value in the range occurs, episodes stay contiguous text,
    the draw is seeded, and a malformed range is refused with the field named."""
    from ccmem.data.text import stream_episodes

    toks = list(range(5000))
    eps = stream_episodes(toks, 400, steps=[1, 4], chunk=8, window=[5, 9], target=4, seed=1)
    assert {len(e.chunks) for e in eps} == {1, 2, 3, 4} and {len(e.input) for e in eps} == {5, 6, 7, 8, 9}
    for e in eps:
        flat = [t for c in e.chunks for t in c] + e.input + e.output
        assert flat == toks[flat[0]:flat[0] + len(flat)] and len(e.output) == 4
        assert all(len(c) == 8 for c in e.chunks)
    again = stream_episodes(toks, 400, steps=[1, 4], chunk=8, window=[5, 9], target=4, seed=1)
    assert [(e.id, len(e.chunks), len(e.input)) for e in eps] == [(e.id, len(e.chunks), len(e.input)) for e in again]
    # a fixed value draws nothing extra: the same episodes as before ranges existed
    assert [e.id for e in stream_episodes(toks, 5, 2, 8, [6, 6], 4, seed=3)] == \
        [e.id for e in stream_episodes(toks, 5, 2, 8, 6, 4, seed=3)]
    for bad in ([4, 1], [0, 2], [1, 2, 3], "2"):
        with pytest.raises(ValueError, match="data.steps must be"):
            stream_episodes(toks, 1, steps=bad, chunk=8)


def test_stream_cli_on_the_real_model(capsys):
    from ccmem.cli import main

    assert main(["stream", "--tokens", "300", "--window", "96",
                 "--chunk", "32"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"ccm", "streamingllm", "window"} <= set(rows)
    assert all(" 96 |" in rows[m] for m in ("ccm", "streamingllm", "window"))
