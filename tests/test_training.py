"""Collator layouts, exact resume, real 2-process data parallelism, and a learnable task that training solves."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from ccmem import CompressedModel, CompressionConfig, CompTokens
from ccmem.data import Collator, Episode
from ccmem.data.collate import keep_for_loss, lm_loss
from ccmem.training import NonFiniteLossError, TrainConfig, Trainer, global_batch

EP = Episode(chunks=[[11, 12], [13]], input=[14], output=[15, 2])
V = 100
X = -100


@pytest.mark.parametrize(
    "variant,ids",
    [
        ("concat_recur", [11, 12, 100, 101, 13, 100, 101, 14, 15, 2]),
        ("concat", [11, 12, 100, 101, 13, 100, 101, 14, 15, 2]),
        ("merge_recur", [11, 12, 100, 101, 102, 103, 13, 100, 101, 102, 103, 14, 15, 2]),
        ("merge", [11, 12, 100, 101, 13, 100, 101, 102, 103, 14, 15, 2]),
        ("gist", [11, 12, 13, 100, 101, 14, 15, 2]),
    ],
)
def test_collator_layouts(variant, ids):
    toks = CompTokens(V, 2, merging=variant.startswith("merge"))
    b = Collator(toks, variant)([EP])
    assert b["input_ids"].tolist() == [ids]
    assert b["labels"].tolist() == [[X] * (len(ids) - 2) + [15, 2]]
    assert b["attention_mask"].tolist() == [[1] * len(ids)]


def test_collator_full_none_padding_and_truncation():
    toks = CompTokens(V, 2, merging=False)
    short = Episode([[21]], [22], [23])
    full = Collator(toks, mode="full")([EP, short])
    assert full["input_ids"].tolist() == [[11, 12, 13, 14, 15, 2], [0, 0, 0, 21, 22, 23]]
    assert full["attention_mask"].tolist() == [[1] * 6, [0, 0, 0, 1, 1, 1]]
    assert full["labels"].tolist() == [[X, X, X, X, 15, 2], [X, X, X, X, X, 23]]
    assert Collator(toks, mode="none")([EP])["input_ids"].tolist() == [[14, 15, 2]]
    # max_length counts text only: the oldest chunk is dropped first, COMP tokens do not count
    cut = Collator(toks, max_length=4)([EP])["input_ids"].tolist()
    assert cut == [[13, 100, 101, 14, 15, 2]]
    with pytest.raises(ValueError, match="exceed"):
        Collator(toks, max_length=2)([EP])


def test_loss_on_kept_logits_equals_full_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 10)
    labels = torch.tensor([[X, X, X, X, 3, 4], [X, X, X, X, X, 5]])
    k = keep_for_loss(labels)
    assert k == 3
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 10), labels[:, 1:].reshape(-1))
    assert torch.allclose(lm_loss(logits[:, -k:], labels), full)


def test_global_batches_cover_each_epoch_once():
    seen = [i for s in range(5) for i, e in global_batch(s, 10, 4, seed=1) if e == 0]
    assert sorted(seen) == list(range(10))
    assert global_batch(3, 10, 4, 1) == global_batch(3, 10, 4, 1)


def test_global_batch_is_constant_time_per_sample():
    """The epoch permutation is computed once per epoch, not once per sample (100k episodes: 34 ms per sample
    before); the order is the one the per-sample shuffle gave, so old runs resume exactly."""
    import time

    from ccmem.training import epoch_permutation

    n = 200_000
    global_batch(0, n, 8, seed=5)
    t0 = time.perf_counter()
    batches = [global_batch(s, n, 64, seed=5) for s in range(1, 51)]
    per_sample = (time.perf_counter() - t0) / (50 * 64)
    assert per_sample < 1e-3  # one shuffle of 200k items alone takes ~0.1 s
    perm = list(range(n))
    random.Random("5:perm:0").shuffle(perm)
    assert [i for i, _ in batches[0]] == perm[64:128] and list(epoch_permutation(n, 5, 0)) == perm


def test_embedding_learning_rate_is_separate(tmp_path):
    ccm = make_toy_ccm()
    tr = Trainer(ccm, key_task(16, 0), TrainConfig(output_dir=str(tmp_path), max_steps=10, batch_size=4, lr=1e-3,
                                                   emb_lr=5e-2, warmup_ratio=0.0))
    groups = tr.opt.param_groups
    emb = ccm.trainable_named_parameters()["comp_embedding"]
    assert [len(g["params"]) for g in groups] == [len(ccm.trainable_parameters()) - 1, 1]
    assert groups[1]["params"][0] is emb and groups[1]["lr"] == 5e-2 and groups[0]["lr"] == 1e-3
    tr.fit(stop_after=2)
    assert groups[1]["lr"] / groups[0]["lr"] == pytest.approx(50)  # one schedule scales both


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for CPUs")
@pytest.mark.parametrize("emulated", [True, False])
def test_bf16_recipe_trains_in_fp32_on_a_cpu_without_native_bf16(tmp_path, monkeypatch, capsys, emulated):
    """A recipe tuned with bf16 on an AVX512-BF16 CPU ran 20x slower on an AVX2 one (7 against 149 tokens/s): there
    the trainer takes fp32, says so, and every log row records the precision it ran in and the CPU's vector
    instructions."""
    from accelerate.state import AcceleratorState

    import ccmem.hardware

    monkeypatch.setattr(ccmem.hardware, "cpu_bf16_native", lambda: not emulated)
    AcceleratorState._reset_state(True)  # accelerate keeps one precision per process
    try:
        tr = Trainer(make_toy_ccm(), key_task(8, 0), TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2,
                                                                mixed_precision="bf16"))
        row = tr.train_step()
    finally:
        AcceleratorState._reset_state(True)
    assert row["precision"] == ("no" if emulated else "bf16")
    assert torch.backends.cpu.get_cpu_capability() in row["hardware"]
    assert ("native bf16" in row["hardware"]) is not emulated
    assert ("no native bf16" in capsys.readouterr().out) is emulated


def test_memory_gate_trains_with_its_own_learning_rate(tmp_path):
    """Gates start nearly closed (-4): the recall task is still learned (the memory is read through them) and the
    gates move at their own learning rate."""
    ccm = CompressedModel.attach(tiny_model("llama", initializer_range=0.3),
                                 CompressionConfig(n_tok=2, lora_dropout=0.0, memory_gate=-4.0))
    tr = Trainer(ccm, key_task(256, 0), TrainConfig(output_dir=str(tmp_path), max_steps=150, batch_size=16, lr=1e-2,
                                                    gate_lr=0.1))
    gates = [p for n, p in ccm.trainable_named_parameters().items() if n.startswith("gate.")]
    assert len(tr.opt.param_groups) == 3 and tr.opt.param_groups[2]["params"] == gates
    assert tr.opt.param_groups[2]["initial_lr"] == 0.1
    hist = tr.fit()
    assert sum(h["loss"] for h in hist[-10:]) / 10 < 0.5
    assert float((torch.cat([g.detach() for g in gates]) + 4.0).abs().max()) > 0.5
    assert tr.evaluate(key_task(64, 1)) < 1.2


# ---------------------------------------------------------------- toy task
def key_task(n: int, seed: int) -> list[Episode]:
    """A key (one of 4 tokens) hides at the end of the last context chunk; the output must recall it."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        key = r.randint(10, 13)
        chunks = [[r.randint(70, 120) for _ in range(r.randint(2, 4))] for _ in range(r.randint(1, 3))]
        chunks[-1] += [5, key]
        out.append(Episode(chunks, [6], [key]))
    return out


def make_toy_ccm(variant: str = "concat_recur", dropout: float = 0.0) -> CompressedModel:
    # a larger init range lets a 2-layer random model express confident predictions
    return CompressedModel.attach(tiny_model("llama", initializer_range=0.3),
                                  CompressionConfig(variant=variant, n_tok=2, lora_dropout=dropout))


@pytest.mark.parametrize("variant", ["concat_recur", "merge_recur"])
def test_training_learns_to_use_memory(tmp_path, variant):
    ccm = make_toy_ccm(variant)
    tr = Trainer(ccm, key_task(256, 0), TrainConfig(output_dir=str(tmp_path), max_steps=150, batch_size=16, lr=1e-2))
    hist = tr.fit()
    assert hist[0]["loss"] > 5 and sum(h["loss"] for h in hist[-10:]) / 10 < 0.1
    held_out = key_task(64, 1)
    with_memory = tr.evaluate(held_out)
    tr.collate = Collator(None, mode="none")
    without = tr.evaluate(held_out)
    assert with_memory < 1.2 < 100 < without  # the key is only recoverable from the compressed memory


def test_resume_equals_uninterrupted(tmp_path):
    cfg = dict(max_steps=6, batch_size=4, lr=1e-2, save_every=3)
    a = Trainer(make_toy_ccm(dropout=0.1), key_task(32, 0), TrainConfig(output_dir=str(tmp_path / "a"), **cfg))
    a.fit()

    b = Trainer(make_toy_ccm(dropout=0.1), key_task(32, 0), TrainConfig(output_dir=str(tmp_path / "b"), **cfg))
    b.fit(stop_after=3)  # "killed" after 3 steps; a new process picks it up from the checkpoint
    c = Trainer(make_toy_ccm(dropout=0.1), key_task(32, 0), TrainConfig(output_dir=str(tmp_path / "b"), **cfg))
    assert c.resume() and c.step == 3
    c.fit()
    for (k, x), y in zip(a.ccm.trainable_named_parameters().items(), c.ccm.trainable_parameters()):
        assert torch.allclose(x, y, atol=1e-6), k
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in c.history], abs=1e-6)


def test_time_limit_saves_a_resumable_checkpoint(tmp_path):
    cfg = dict(max_steps=6, batch_size=4, lr=1e-2, output_dir=str(tmp_path))
    a = Trainer(make_toy_ccm(), key_task(32, 0), TrainConfig(max_minutes=1e-6, **cfg))
    a.fit()
    assert a.step == 1 and a.latest_checkpoint().name == "step_000001"
    b = Trainer(make_toy_ccm(), key_task(32, 0), TrainConfig(**cfg))
    assert b.resume() and b.step == 1
    for x, y in zip(a.ccm.trainable_parameters(), b.ccm.trainable_parameters()):
        assert torch.equal(x, y)


def test_stop_at_keeps_the_schedule_and_resumes_into_the_uninterrupted_run(tmp_path):
    cfg = dict(max_steps=6, batch_size=4, lr=1e-2)
    a = Trainer(make_toy_ccm(), key_task(32, 0), TrainConfig(output_dir=str(tmp_path / "a"), **cfg))
    a.fit()
    b = Trainer(make_toy_ccm(), key_task(32, 0), TrainConfig(output_dir=str(tmp_path / "b"), stop_at=4, **cfg))
    b.fit()  # no save_every: the stop step is saved all the same
    assert b.step == 4 and b.latest_checkpoint().name == "step_000004"
    assert [h["lr"] for h in b.history] == [h["lr"] for h in a.history[:4]]  # the 6-step cosine, not a 4-step one
    c = Trainer(make_toy_ccm(), key_task(32, 0), TrainConfig(output_dir=str(tmp_path / "b"), **cfg))
    assert c.resume() and c.step == 4
    c.fit()
    for x, y in zip(a.ccm.trainable_parameters(), c.ccm.trainable_parameters()):
        assert torch.allclose(x, y, atol=1e-6)
    with pytest.raises(ValueError, match="stop_at"):
        TrainConfig(stop_at=-1)


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
    tr = Trainer(make_toy_ccm(), key_task(32, 0), TrainConfig(output_dir=str(tmp_path), max_steps=4, batch_size=4,
                                                              save_every=1))
    tr.fit(stop_after=1)
    good = {k: v.clone() for k, v in tr.ccm.trainable_named_parameters().items()}
    with torch.no_grad():
        tr.ccm.trainable_parameters()[0].fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="step_000001"):
        tr.fit()
    assert tr.step == 1 and tr.latest_checkpoint().name == "step_000001"
    tr.ccm.load_adapter(tr.latest_checkpoint())
    assert all(torch.equal(good[k], v) for k, v in tr.ccm.trainable_named_parameters().items())


def test_two_process_ddp_matches_one_process(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    worker = str(Path(__file__).parent / "ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    one = subprocess.run([sys.executable, worker, str(tmp_path / "one"), "2"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", worker, str(tmp_path / "two"),
                          "1"], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "world 2" in two.stdout and "world 1" in one.stdout
    w1, w2 = torch.load(tmp_path / "one" / "weights.pt"), torch.load(tmp_path / "two" / "weights.pt")
    start = make_toy_ccm().trainable_named_parameters()
    assert sum(not torch.equal(w1[k], start[k]) for k in w1) > len(w1) // 2  # training moved the weights
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), (k, (w1[k] - w2[k]).abs().max())
    # each part's loss of a step is summed over both ranks' episodes: the same as one process saw
    h1, h2 = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("one", "two"))
    assert [r["part_tokens"] for r in h1] == [r["part_tokens"] for r in h2]
    assert any(len(r["part_tokens"]) == 2 for r in h1)
    for a, b in zip(h1, h2):
        assert a["part_loss"] == pytest.approx(b["part_loss"], abs=1e-5)


@pytest.mark.parametrize("variant", ["concat_recur", "merge_recur"])
def test_parallel_and_recurrent_training_give_the_same_gradients(variant):
    from conftest import randomize

    from ccmem.recurrent import recurrent_loss

    ccm = make_toy_ccm(variant)
    randomize(ccm, std=0.05)
    eps = key_task(3, 5)
    b = Collator(ccm.tokens, variant)(eps)
    out = ccm.parallel_forward(b["input_ids"], b["attention_mask"]).logits
    lm_loss(out, b["labels"]).backward()
    par = {k: p.grad.clone() for k, p in ccm.trainable_named_parameters().items()}
    for p in ccm.trainable_parameters():
        p.grad = None
    rec_loss = recurrent_loss(ccm, eps)
    rec_loss.backward()
    for k, p in ccm.trainable_named_parameters().items():  # equal up to fp32 rounding (relative to the scale)
        rec = p.grad if p.grad is not None else torch.zeros_like(p)  # last-layer q/o: unused, so None here
        assert (par[k] - rec).abs().max() <= 1e-5 * par[k].abs().max() + 1e-7, k
    assert sum(p.grad is not None and p.grad.abs().max() > 1e-3 for p in ccm.trainable_parameters()) > 10


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    runs = []
    for ckpt in (False, True):
        tr = Trainer(make_toy_ccm(), key_task(32, 0), TrainConfig(output_dir=str(tmp_path / str(ckpt)), max_steps=2,
                                                                  batch_size=4, gradient_checkpointing=ckpt))
        tr.fit()
        runs.append(tr)
    assert runs[1].ccm.model.is_gradient_checkpointing
    assert [h["loss"] for h in runs[0].history] == pytest.approx([h["loss"] for h in runs[1].history], abs=1e-5)
    for a, b in zip(runs[0].ccm.trainable_parameters(), runs[1].ccm.trainable_parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_compiled_forward_trains_like_eager(tmp_path):
    """train.compile traces the hooked model with torch.compile (backend "eager": dynamo capture without code
    generation, the part that can break on ccmem's hooks); the losses and weights match the uncompiled run."""
    runs = []
    for backend in ("", "eager"):
        ccm = make_toy_ccm()
        tr = Trainer(ccm, key_task(16, 0), TrainConfig(output_dir=str(tmp_path / (backend or "plain")), max_steps=3,
                                                       batch_size=4, lr=1e-2, compile=backend, warmup_ratio=0.0))
        runs.append(([h["loss"] for h in tr.fit()], ccm.trainable_parameters()))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-5)
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="train.compile"):
        TrainConfig(compile="fast")


@pytest.mark.parametrize("pack", [0, 64])
def test_episode_mean_loss_batch_equals_accumulated_batches_of_one(tmp_path, pack):
    """loss_per='episode': one micro-batch of 4 episodes (padded or packed) takes the same steps as 4 accumulated
    micro-batches of 1 (the layout a CPU run uses), though the episodes' outputs differ in length; the token mean
    does not."""
    r = random.Random(3)
    eps = [Episode([[r.randint(20, 90) for _ in range(r.randint(2, 5))] for _ in range(r.randint(1, 3))], [6],
                   [r.randint(20, 90) for _ in range(r.randint(1, 6))]) for _ in range(16)]
    common = dict(max_steps=3, lr=1e-2, warmup_ratio=0.0)

    def run(name: str, **kw) -> Trainer:
        tr = Trainer(make_toy_ccm(), eps, TrainConfig(output_dir=str(tmp_path / name), **common, **kw))
        tr.fit()
        return tr

    ones = run("ones", batch_size=1, grad_accum=4)
    four = run("four", batch_size=4, grad_accum=1, pack=pack, loss_per="episode")
    tokens = run("tokens", batch_size=4, grad_accum=1, pack=pack)
    assert [h["loss"] for h in four.history] == pytest.approx([h["loss"] for h in ones.history], abs=1e-5)
    assert abs(tokens.history[0]["loss"] - ones.history[0]["loss"]) > 1e-3

    def gap(a: Trainer, b: Trainer) -> float:
        pairs = zip(a.ccm.trainable_parameters(), b.ccm.trainable_parameters())
        return max(float((x - y).abs().max()) for x, y in pairs)

    # Adam steps of 1e-2 turn float rounding of near-zero gradients into ~2e-5; the token mean moves 0.04 away
    assert gap(ones, four) < 1e-4 < gap(ones, tokens) / 10


def test_evaluate_given_episodes_scores_all_of_them(tmp_path):
    """Periodic evaluation caps at eval_batches batches; episodes passed in (the run's final validation) are all
    scored, whatever the batch size."""
    held = key_task(6, 1)
    tr = Trainer(make_toy_ccm(), key_task(8, 0), TrainConfig(output_dir=str(tmp_path), batch_size=1, eval_batches=2),
                 eval_data=held)
    assert tr.evaluate() == pytest.approx(tr.evaluate(held[:2]))
    one_by_one = [tr.evaluate([e]) for e in held]
    assert min(one_by_one) < tr.evaluate(held) < max(one_by_one)
    assert tr.evaluate(held) != pytest.approx(tr.evaluate())
