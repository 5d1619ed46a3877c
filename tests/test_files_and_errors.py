"""Save/load round trips and every bad input the core promises a clear error for (and no lost state)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize, tiny_ccm, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from ccmem import (
    AlreadyAttachedError,
    CompressedModel,
    CompressionConfig,
    ConfigError,
    CorruptFileError,
    IncompatibleError,
    InputError,
    UnsupportedModelError,
    episode_ids,
    io,
    pad_batch,
)
from ccmem.model import fold_stage1

CHUNKS = [[5, 6, 7], [8, 9], [10, 11, 12]]
TAIL = [20, 21, 22]


def fill(session):
    for c in CHUNKS:
        session.add_context(c)
    return session


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("variant", ["concat_recur", "merge_recur"])
def test_adapter_round_trip(tmp_path, variant):
    ccm = tiny_ccm("llama", variant, sink=True)
    ccm.save_pretrained(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["compression"]["variant"] == variant and cfg["base"]["hidden_size"] == 64

    loaded = CompressedModel.from_pretrained(tmp_path / "ad", tiny_model("llama"))
    assert loaded.config == ccm.config
    ids, am = pad_batch([episode_ids(CHUNKS, TAIL, ccm.tokens, variant)], 0)
    with torch.no_grad():
        assert torch.equal(ccm.parallel_forward(ids, am).logits, loaded.parallel_forward(ids, am).logits)


def test_load_adapter_into_attached_model(tmp_path):
    ccm = tiny_ccm("llama")
    ccm.save_pretrained(tmp_path)
    other = tiny_ccm("llama", seed=0)
    randomize(other, seed=99)
    other.load_adapter(tmp_path)
    for (k, a), b in zip(ccm.trainable_named_parameters().items(), other.trainable_parameters()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("variant", ["concat_recur", "merge_recur"])
def test_memory_round_trip(tmp_path, variant):
    ccm = tiny_ccm("llama", variant, sink=True)
    s = fill(ccm.session())
    before, _ = s.logits(TAIL)
    s.save(tmp_path / "mem.safetensors")
    s2 = ccm.session()
    s2.load(tmp_path / "mem.safetensors")
    after, _ = s2.logits(TAIL)
    assert torch.equal(before, after)
    assert s2.memory.num_slots == s.memory.num_slots and torch.equal(s2.memory.offset, s.memory.offset)
    # the loaded memory keeps working: one more step gives the same result in both sessions
    s.add_context([30, 31]), s2.add_context([30, 31])
    assert torch.equal(s.logits(TAIL)[0], s2.logits(TAIL)[0])


def test_memory_reports_slots_and_bytes():
    ccm = tiny_ccm("llama", "concat_recur", n_tok=2)
    s = fill(ccm.session())
    assert s.memory.num_slots == 6 and s.memory.slots_per_row() == [6]
    # 2 layers x (K+V) x 2 kv heads x 16 dims x 4 bytes per slot
    assert s.memory.bytes_per_slot() == 2 * 2 * 2 * 16 * 4
    assert s.memory.nbytes == 6 * s.memory.bytes_per_slot()
    m = tiny_ccm("llama", "merge_recur", n_tok=2)
    assert fill(m.session()).memory.num_slots == 2


# ---------------------------------------------------------------- wrong model / config
def test_adapter_for_another_model_is_refused(tmp_path):
    tiny_ccm("llama").save_pretrained(tmp_path)
    with pytest.raises(IncompatibleError, match="hidden_size"):
        CompressedModel.from_pretrained(tmp_path, tiny_model("llama", hidden_size=32, num_attention_heads=2,
                                                             num_key_value_heads=1))
    with pytest.raises(IncompatibleError, match="num_hidden_layers"):
        CompressedModel.from_pretrained(tmp_path, tiny_model("llama", num_hidden_layers=3))
    with pytest.raises(IncompatibleError, match="model_type"):
        CompressedModel.from_pretrained(tmp_path, tiny_model("mistral"))


def snapshot(model):
    """Everything an attach changes: weights (and which exist), trainability, hooks, attention backend."""
    return ({n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
            model.config._attn_implementation)


def same(a, b):
    (pa, ha, ia), (pb, hb, ib) = a, b
    return (pa.keys() == pb.keys() and all(torch.equal(pa[k][0], pb[k][0]) and pa[k][1] == pb[k][1] for k in pa)
            and ha == hb and ia == ib)


def test_failed_adapter_load_leaves_model_untouched(tmp_path):
    # an adapter for this very model (fingerprint and config fit) with one tensor of the wrong shape: it fails in
    # _load_tensors, after attaching, so from_pretrained's cleanup has to take everything off again
    tiny_ccm("llama").save_pretrained(tmp_path)
    tensors, header = io.load_checked(tmp_path / "adapter.safetensors")
    tensors["comp_embedding"] = tensors["comp_embedding"][:-1]
    io.save_checked(tmp_path / "adapter.safetensors", tensors, header)
    model = tiny_model("llama")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    snap = snapshot(model)
    with pytest.raises(IncompatibleError, match="comp_embedding has shape"):
        CompressedModel.from_pretrained(tmp_path, model)
    assert same(snapshot(model), snap)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    assert all(p.requires_grad for p in model.parameters())  # the model is handed back as it came
    assert not any("ccmem" in n for n, _ in model.named_parameters())
    CompressedModel.attach(model)  # nothing left behind that would block a new attach


def test_attach_twice_is_refused_and_model_left_untouched():
    ccm = tiny_ccm("llama")
    model = ccm.model
    ids = torch.tensor([[5, 6, 7, *ccm.tokens.comp_ids, 8, 9]])
    with torch.no_grad():
        before = ccm.parallel_forward(ids).logits
    snap = snapshot(model)
    with pytest.raises(AlreadyAttachedError, match=r"already has ccmem attached.*detach\(remove_weights=True\)"):
        CompressedModel.attach(model, CompressionConfig(n_tok=3))
    model.set_attn_implementation("sdpa")  # hooks and state still there: still attached
    with pytest.raises(AlreadyAttachedError, match="hooks on"):
        CompressedModel.attach(model)
    model.set_attn_implementation("ccmem_sdpa")
    assert same(snapshot(model), snap)
    with torch.no_grad():
        assert torch.equal(ccm.parallel_forward(ids).logits, before)

    ccm.detach()  # hooks off, weights kept: a new attach would reuse or shadow them
    with pytest.raises(AlreadyAttachedError, match=r"still carries.*detach\(remove_weights=True\)"):
        CompressedModel.attach(model)
    ccm.detach(remove_weights=True)
    again = CompressedModel.attach(model, CompressionConfig(n_tok=3))
    assert again.tokens.n_special == 3 and model.config._attn_implementation == "ccmem_sdpa"
    # the backend restored on detach is the original one, not the first attach's ccmem_sdpa
    assert again.detach(remove_weights=True).config._attn_implementation == "sdpa"


def test_attach_detach_attach_with_the_same_tokenizer(tiny_folder):
    """Detach cannot take added tokens back out of a tokenizer, so a second attach accepts the ⟨COMP⟩ tokens the first
    one registered (ids unchanged, text tokenized as before), refuses when they outnumber the new adapter's, and still
    refuses a tokenizer with any other token past the embedding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    vocab = model.get_input_embeddings().weight.shape[0]
    text = tok("Hello there, how are you?")["input_ids"]
    CompressedModel.attach(model, CompressionConfig(n_tok=2), tokenizer=tok).detach(remove_weights=True)
    again = CompressedModel.attach(model, CompressionConfig(n_tok=4), tokenizer=tok)
    assert again.tokens.comp_ids == list(range(vocab, vocab + 4))
    assert tok.convert_tokens_to_ids([f"<COMP{k}>" for k in range(4)]) == again.tokens.comp_ids
    assert tok("Hello there, how are you?")["input_ids"] == text
    again.detach(remove_weights=True)
    with pytest.raises(IncompatibleError, match="4 ⟨COMP⟩ tokens from an earlier attach.*afresh"):
        CompressedModel.attach(model, CompressionConfig(n_tok=2), tokenizer=tok)
    other = AutoTokenizer.from_pretrained(tiny_folder)
    other.add_tokens(["<my_token>"])
    with pytest.raises(IncompatibleError, match="embeds only"):
        CompressedModel.attach(model, CompressionConfig(n_tok=2), tokenizer=other)
    # the refusals left nothing attached (else AlreadyAttachedError): a fresh tokenizer attaches
    CompressedModel.attach(model, CompressionConfig(n_tok=2), tokenizer=AutoTokenizer.from_pretrained(tiny_folder))


def test_inputs_embeds_without_ids_is_refused_and_no_state_leaks():
    ccm = tiny_ccm("llama")
    base = tiny_model("llama")  # the same weights without ccmem
    text = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        embeds = base.get_input_embeddings()(text)
        want = base(input_ids=text).logits
        ccm.parallel_forward(torch.tensor([[5, 6, 7, *ccm.tokens.comp_ids, 8, 9]]))  # leaves ⟨COMP⟩ rows behind
        with pytest.raises(InputError, match="needs input_ids"):
            ccm.model(inputs_embeds=embeds)
        with pytest.raises(InputError, match="needs input_ids"):
            ccm.model.model(inputs_embeds=embeds)  # the bare decoder too
        ccm.parallel_forward(torch.tensor([[5, 6, 7, *ccm.tokens.comp_ids, 8, 9]]))
        assert torch.equal(ccm.model(input_ids=text).logits, want)
        assert torch.equal(ccm.detach()(inputs_embeds=embeds).logits, want)


def two_stage_adapter(folder, seed):
    """A stage-2 adapter folder with a random stage 1 (plain LoRA) in ``stage1/``."""
    stage1 = tiny_ccm("llama", conditional=False, seed=0)
    randomize(stage1, seed)
    stage1.save_pretrained(folder / "stage1")
    tiny_ccm("llama").save_pretrained(folder)
    return folder


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "ccmem" not in n}


def test_from_pretrained_twice_folds_stage1_once(tmp_path):
    ad = two_stage_adapter(tmp_path / "a", seed=5)
    once = tiny_model("llama")
    CompressedModel.from_pretrained(ad, once)
    twice = tiny_model("llama")
    CompressedModel.from_pretrained(ad, twice).detach(remove_weights=True)
    with pytest.warns(UserWarning, match="already folded"):
        second = CompressedModel.from_pretrained(ad, twice)
    w1, w2, w0 = base_weights(once), base_weights(twice), base_weights(tiny_model("llama"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not torch.equal(w1["model.layers.0.self_attn.q_proj.weight"], w0["model.layers.0.self_attn.q_proj.weight"])

    # a different stage 1 on top of the folded one is refused, before anything changes
    other = two_stage_adapter(tmp_path / "b", seed=6)
    second.detach(remove_weights=True)
    with pytest.raises(IncompatibleError, match="already hold stage-1"):
        CompressedModel.from_pretrained(other, twice)
    assert all(torch.equal(w, base_weights(twice)[k]) for k, w in w2.items())

    # the record travels with the weights: a saved and reloaded folded model is not folded again
    twice.save_pretrained(tmp_path / "folded")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "folded").eval()
    with pytest.warns(UserWarning, match="already folded"):
        assert fold_stage1(reloaded, ad / "stage1") is False
    w3 = base_weights(reloaded)
    assert all(torch.equal(w, w3[k]) for k, w in w2.items())


def test_stage2_that_does_not_fit_is_refused_before_stage1_is_folded(tmp_path):
    """The stage-1 fold changes the caller's model for good, so a stage-2 file whose tensors do not fit (well formed,
    checksummed, one tensor missing) is refused before it: the base weights stay as loaded, nothing stays attached."""
    from ccmem.model import ADAPTER_FILE

    ad = two_stage_adapter(tmp_path / "a", seed=5)
    tensors, header = io.load_checked(ad / ADAPTER_FILE)
    dropped = sorted(tensors)[0]
    io.save_checked(ad / ADAPTER_FILE, {k: v for k, v in tensors.items() if k != dropped}, header)
    model = tiny_model("llama")
    before = base_weights(model)
    with pytest.raises(IncompatibleError, match="missing"):
        CompressedModel.from_pretrained(ad, model)
    after = base_weights(model)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(model.config, "ccmem_stage1")
    io.save_checked(ad / ADAPTER_FILE, tensors, header)  # mended, the same model takes it: fold and attach
    CompressedModel.from_pretrained(ad, model)
    assert not torch.equal(base_weights(model)["model.layers.0.self_attn.q_proj.weight"],
                           before["model.layers.0.self_attn.q_proj.weight"])


def test_adapter_with_other_config_is_refused(tmp_path):
    tiny_ccm("llama", n_tok=2).save_pretrained(tmp_path)
    other = tiny_ccm("llama", n_tok=3)
    with pytest.raises(IncompatibleError, match="n_tok") as e:
        other.load_adapter(tmp_path)
    assert e.value.fields == ("n_tok",)  # structured, so chat and serve can name their own flag


@pytest.mark.parametrize("change", [dict(n_tok=3), dict(variant="merge_recur"), dict(sink=True)])
def test_memory_for_other_config_is_refused(tmp_path, change):
    ccm = tiny_ccm("llama", "concat_recur", n_tok=2)
    fill(ccm.session()).save(tmp_path / "m.safetensors")
    other = tiny_ccm("llama", **{"variant": "concat_recur", "n_tok": 2, **change})
    s = fill(other.session())
    keep = s.memory
    with pytest.raises(IncompatibleError, match=next(iter(change))):
        s.load(tmp_path / "m.safetensors")
    assert s.memory is keep  # nothing lost


def test_memory_written_by_another_adapter_is_refused(tmp_path):
    """A memory records the adapter that wrote it: the same adapter loads it (read from its file, in another dtype
    too); another adapter, or the same one after a training step, is refused naming the fix with nothing lost, unless
    asked (any_adapter); a file older than the field loads anywhere."""
    from safetensors import safe_open

    ccm = tiny_ccm("llama")
    randomize(ccm, seed=1)
    ccm.save_pretrained(tmp_path / "a")
    fill(ccm.session()).save(tmp_path / "m.safetensors")
    same = CompressedModel.from_pretrained(tmp_path / "a", tiny_model("llama"))
    with safe_open(str(tmp_path / "a" / "adapter.safetensors"), "pt") as f:
        stored = f.metadata()["sha256"]
    assert same.adapter_id() == ccm.adapter_id() == stored  # the adapter file's own checksum
    same.session().load(tmp_path / "m.safetensors")
    same.model.to(torch.bfloat16)
    assert same.adapter_id() == ccm.adapter_id()  # a dtype move is not another adapter
    other = tiny_ccm("llama")
    randomize(other, seed=2)
    s = fill(other.session())
    keep = s.memory
    with pytest.raises(IncompatibleError, match="another adapter.*load it with the adapter that wrote it") as e:
        s.load(tmp_path / "m.safetensors")
    assert e.value.fields == ("adapter",) and s.memory is keep
    s.load(tmp_path / "m.safetensors", any_adapter=True)
    assert s.memory.num_slots == fill(ccm.session()).memory.num_slots
    s.add_context([30, 31])  # the last writer is recorded: the carried-over session is now the other adapter's
    s.save(tmp_path / "carried.safetensors")
    other.session().load(tmp_path / "carried.safetensors")
    with pytest.raises(IncompatibleError, match="another adapter"):
        same.session().load(tmp_path / "carried.safetensors")
    before = ccm.adapter_id()
    with torch.no_grad():
        ccm.trainable_parameters()[0].add_(0.01)  # what an optimizer step does
    assert ccm.adapter_id() != before
    with pytest.raises(IncompatibleError, match="another adapter"):
        ccm.session().load(tmp_path / "m.safetensors")
    old = fill(other.session())
    old.memory.adapter = None  # as written before memories recorded their adapter
    old.save(tmp_path / "old.safetensors")
    ccm.session().load(tmp_path / "old.safetensors")
    from ccmem.chat import Chat

    chat = Chat.__new__(Chat)  # only /load under test: the chat's session on the trained-further model
    chat.ccm, chat.session = ccm, ccm.session()
    said = chat.command("/load " + str(tmp_path / "m.safetensors"))
    assert "another adapter" in said and "--adapter PATH" in said and chat.session.memory.num_slots == 0


def test_a_memory_names_the_adapter_that_last_compressed_into_it(tmp_path):
    """The id is recorded when slots are written, not when the session is made: an adapter loaded into an open
    session writes its own id; verbatim tokens (conditional LoRA) are the base model's and record none; an adapter
    saved from bf16 weights has one id in the process that saved it and in any that loads it; a stage 1 folded into
    the base is part of the id; batching keeps the id and refuses two; a malformed id is a damaged file."""
    from ccmem.errors import CorruptFileError
    from ccmem.memory import CompressedMemory

    a, b = tiny_ccm("llama"), tiny_ccm("llama")
    randomize(a, seed=1), randomize(b, seed=2)
    b.save_pretrained(tmp_path / "b")
    s = a.session()
    assert s.memory.adapter is None
    s.add_raw([5, 6, 7])
    assert s.memory.adapter is None  # only the base model wrote these
    a.load_adapter(tmp_path / "b")
    fill(s)
    assert s.memory.adapter == b.adapter_id() == a.adapter_id()
    low = tiny_ccm("llama")
    randomize(low, seed=3)
    low.model.to(torch.bfloat16)
    low.save_pretrained(tmp_path / "low")
    assert CompressedModel.from_pretrained(tmp_path / "low", tiny_model("llama")).adapter_id() == low.adapter_id()
    folded = tiny_ccm("llama")
    randomize(folded, seed=2)
    plain_id = folded.adapter_id()
    assert plain_id == b.adapter_id()
    folded.model.config.ccmem_stage1 = {"adapter": "x", "sha256": "0" * 64}
    assert folded.adapter_id() != plain_id
    rows = [fill(b.session()), fill(b.session())]
    for r in rows:
        r.add_context([40 + len(r.memory.tail)])
    both = CompressedMemory.stack([r.memory for r in rows])
    assert both.adapter == b.adapter_id() and {m.adapter for m in both.unstack()} == {b.adapter_id()}
    assert both.unstack()[0].repeat(2).adapter == b.adapter_id()
    with pytest.raises(IncompatibleError, match="different adapters"):
        CompressedMemory.stack([rows[0].memory, fill(tiny_ccm("llama").session()).memory])
    bad = fill(b.session())
    bad.memory.adapter = 5
    bad.save(tmp_path / "bad.safetensors")
    with pytest.raises(CorruptFileError, match="adapter is malformed"):
        b.session().load(tmp_path / "bad.safetensors")


def test_memory_for_other_model_is_refused(tmp_path):
    fill(tiny_ccm("llama").session()).save(tmp_path / "m.safetensors")
    with pytest.raises(IncompatibleError, match="num_hidden_layers"):
        CompressedModel.attach(tiny_model("llama", num_hidden_layers=3)).session().load(tmp_path / "m.safetensors")


def test_adapter_file_given_as_memory_is_refused(tmp_path):
    ccm = tiny_ccm("llama")
    ccm.save_pretrained(tmp_path)
    with pytest.raises(IncompatibleError, match="not a memory"):
        ccm.session().load(tmp_path / "adapter.safetensors")


# ---------------------------------------------------------------- damaged files
def saved_file(tmp_path, what):
    """(model, file, loader) for an adapter or a memory file written into tmp_path."""
    ccm = tiny_ccm("llama")
    if what == "adapter":
        ccm.save_pretrained(tmp_path)
        return ccm, tmp_path / "adapter.safetensors", lambda: ccm.load_adapter(tmp_path)
    path = tmp_path / "m.safetensors"
    fill(ccm.session()).save(path)
    return ccm, path, lambda: ccm.session().load(path)


@pytest.mark.parametrize("what", ["adapter", "memory"])
def test_truncated_file_is_detected(tmp_path, what):
    _, path, load = saved_file(tmp_path, what)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(CorruptFileError, match="truncated"):
        load()
    path.write_bytes(data[:5])
    with pytest.raises(CorruptFileError):
        load()


@pytest.mark.parametrize("what", ["adapter", "memory"])
def test_corrupted_bytes_are_detected(tmp_path, what):
    _, path, load = saved_file(tmp_path, what)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF  # flip one byte of tensor data: the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum"):
        load()


def test_missing_adapter_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CompressedModel.from_pretrained(tmp_path / "nope" / "deeper", tiny_model("llama"))


# ---------------------------------------------------------------- bad input
def test_empty_chunk_is_refused_and_memory_kept():
    """Empty ids and empty text (through a real tokenizer) are both refused before anything is compressed."""
    from test_chat_template import chat_tokenizer

    ccm = CompressedModel.attach(tiny_model("llama"), CompressionConfig(n_tok=2), tokenizer=chat_tokenizer())
    s = fill(ccm.session())
    before = [k.clone() for k in s.memory.keys]
    for empty in ([], "", [[]]):
        with pytest.raises(InputError, match="empty"):
            s.add_context(empty)
    assert all(torch.equal(a, b) for a, b in zip(before, s.memory.keys)) and s.memory.num_slots == 6


def test_chunk_past_position_range_is_refused_and_memory_kept():
    ccm = CompressedModel.attach(tiny_model("llama", max_position_embeddings=16), CompressionConfig(n_tok=2))
    s = ccm.session()
    s.add_context(list(range(3, 13)))  # 10 tokens: positions 0..9, COMP at 10, 11
    offset, slots = s.memory.offset.clone(), s.memory.num_slots
    with pytest.raises(InputError, match="position"):
        s.add_context(list(range(3, 11)))  # would need positions up to 19
    assert torch.equal(s.memory.offset, offset) and s.memory.num_slots == slots
    s.add_context([3, 4])  # still usable


def test_comp_ids_in_user_input_are_refused():
    ccm = tiny_ccm("llama")
    with pytest.raises(InputError, match="COMP"):
        ccm.session().add_context([5, ccm.tokens.comp_ids[0]])


def test_wrong_batch_size_is_refused():
    with pytest.raises(InputError, match="batch size"):
        tiny_ccm("llama").session(batch_size=2).add_context([[1, 2], [3], [4]])


def test_unsupported_architecture_names_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2"):
        CompressedModel.attach(gpt2)


def test_unsupported_attention_backend():
    with pytest.raises(UnsupportedModelError, match="sdpa"):
        CompressedModel.attach(tiny_model("llama"), attn_implementation="flash_attention_2")


@pytest.mark.parametrize("bad", [dict(variant="concatenate"), dict(n_tok=0), dict(lora_r=0), dict(lora_dropout=1.5),
                                 dict(target_modules=())])
def test_bad_config(bad):
    with pytest.raises(ConfigError):
        CompressionConfig(**bad)


def test_gist_has_no_online_session(tmp_path, monkeypatch, capsys):
    """One rule (``require_online``) refuses a gist adapter wherever a session would run on it: the session, the chat
    before its model loads, and the load benchmark before its ccmem half."""
    import importlib.util
    import sys
    from pathlib import Path

    from ccmem.session import require_online

    with pytest.raises(ConfigError, match="the gist variant: .*no online memory"):
        tiny_ccm("llama", "gist").session()
    for variant in ("concat_recur", "merge_recur", "concat", "merge"):  # every other variant passes
        assert CompressionConfig(variant=variant).online
        require_online(CompressionConfig(variant=variant))
    tiny_ccm("llama", "gist").save_pretrained(tmp_path / "gist")
    spec = importlib.util.spec_from_file_location(
        "serve_load", Path(__file__).parents[1] / "benchmarks" / "serve_load.py")
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    monkeypatch.setattr(serve_load, "run_mode", lambda *a, **k: pytest.fail("the ccmem half ran"))
    monkeypatch.setattr(sys, "argv", ["serve_load.py", "--adapter", str(tmp_path / "gist")])
    with pytest.raises(SystemExit):
        serve_load.main()
    assert f"adapter {tmp_path / 'gist'} is a gist adapter: " in capsys.readouterr().err


def test_shipped_adapters_are_found_or_named(tmp_path, monkeypatch):
    from ccmem.demo import adapters_dir, default_adapter

    assert (default_adapter("concat") / "adapter.safetensors").is_file()  # from the checkout
    monkeypatch.setenv("CCMEM_ADAPTERS", str(tmp_path))
    assert adapters_dir() == tmp_path and default_adapter("merge") == tmp_path / "chitchat-merge"


def test_chat_prefers_the_general_adapter(tmp_path, monkeypatch):
    """chat and serve load the newest general adapter (trained in the chat template) for concat once one exists;
    the chit-chat one before that and for merge."""
    from ccmem.demo import chat_adapter

    monkeypatch.setenv("CCMEM_ADAPTERS", str(tmp_path))
    assert chat_adapter("concat") == tmp_path / "chitchat-concat"
    tiny_ccm("llama").save_pretrained(tmp_path / "general-chat")
    assert chat_adapter("concat") == tmp_path / "general-chat" and chat_adapter() == tmp_path / "general-chat"
    assert chat_adapter("merge") == tmp_path / "chitchat-merge"
    tiny_ccm("llama").save_pretrained(tmp_path / "general-chat-decay")  # the newer general adapter comes first
    assert chat_adapter("concat") == tmp_path / "general-chat-decay" and chat_adapter("merge").name == "chitchat-merge"
    tiny_ccm("llama", variant="merge_recur").save_pretrained(tmp_path / "general-merge-decay")  # merge's general one
    assert chat_adapter("merge") == tmp_path / "general-merge-decay"
    assert chat_adapter("concat") == tmp_path / "general-chat-decay"


def test_chat_reads_the_general_adapter_with_a_tail_of_one_turn(tmp_path, monkeypatch):
    """The shipped general adapter is read with its newest turn raw unless a tail is asked for; any other adapter
    keeps its own tail (None: from_pretrained reads it from the file)."""
    from ccmem.chat import Chat
    from ccmem.demo import chat_raw_tail

    monkeypatch.setenv("CCMEM_ADAPTERS", str(tmp_path))
    tiny_ccm("llama").save_pretrained(tmp_path / "general-chat")
    assert chat_raw_tail(tmp_path / "general-chat") == 1 == chat_raw_tail(str(tmp_path / "." / "general-chat"))
    assert chat_raw_tail(tmp_path / "chitchat-concat") is None and chat_raw_tail("org/some-adapter") is None
    assert chat_raw_tail(tmp_path / "general-chat-decay") == 1  # every shipped general adapter, present or not
    assert chat_raw_tail(tmp_path / "general-merge-decay") == 1  # the merge branch too
    import shutil

    copy = shutil.copytree(tmp_path / "general-chat", tmp_path / "run" / "checkpoints" / "step_000600")
    assert chat_raw_tail(copy) == 1  # the same weights elsewhere (a training checkpoint): known by their sha256
    tiny_ccm("llama", seed=1).save_pretrained(tmp_path / "other")
    assert chat_raw_tail(tmp_path / "other") is None  # other weights of the same shape: their own tail
    from ccmem import CompressedModel

    CompressedModel.from_pretrained(tmp_path / "general-chat", tiny_model("llama", 0), raw_tail=2).save_pretrained(
        tmp_path / "own-tail")
    assert chat_raw_tail(tmp_path / "own-tail") is None  # the same weights saved with a tail of their own keep it
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter.safetensors").write_bytes(b"not a safetensors file")
    assert chat_raw_tail(tmp_path / "broken") is None  # left for loading to refuse with its own error
    monkeypatch.setattr("ccmem.demo.adapters_dir", lambda: (_ for _ in ()).throw(FileNotFoundError("no checkout")))
    assert chat_raw_tail("org/some-adapter") is None  # an install without the shipped adapters still chats
    monkeypatch.undo()
    monkeypatch.setenv("CCMEM_ADAPTERS", str(tmp_path))
    seen = []
    monkeypatch.setattr("ccmem.model.CompressedModel.from_pretrained",
                        classmethod(lambda cls, path, *a, raw_tail=None, **k: seen.append((path, raw_tail))))
    monkeypatch.setattr("ccmem.models.load_model", lambda device=None: (None, None))
    for adapter, tail in ((None, None), (None, 0), (None, 2), (str(tmp_path / "other"), None)):
        try:
            Chat(adapter=adapter, raw_tail=tail)
        except AttributeError:  # the stand-in model has no tokenizer: only the load is under test
            pass
    assert seen == [(tmp_path / "general-chat", 1), (tmp_path / "general-chat", 0), (tmp_path / "general-chat", 2),
                    (str(tmp_path / "other"), None)]
    tiny_ccm("llama").save_pretrained(tmp_path / "general-chat-decay")  # the newer general adapter, read the same way
    try:
        Chat()
    except AttributeError:
        pass
    assert seen[-1] == (tmp_path / "general-chat-decay", 1)
    tiny_ccm("llama", variant="merge_recur").save_pretrained(tmp_path / "general-merge-decay")
    try:
        Chat(variant="merge")
    except AttributeError:
        pass
    assert seen[-1] == (tmp_path / "general-merge-decay", 1)  # --variant merge: its general adapter, the same tail


def test_chat_refuses_a_bad_adapter_before_loading_the_model(tmp_path, monkeypatch):
    """`ccmem chat --adapter X` checks X (there, intact, an adapter, readable with the tail asked for) before it
    spends the model's load on it; the errors are the loader's own."""
    from ccmem.chat import Chat
    from ccmem.errors import ConfigError, CorruptFileError

    monkeypatch.setattr("ccmem.models.load_model", lambda device=None: pytest.fail("model loaded before the check"))
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        Chat(adapter=str(tmp_path / "nowhere"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptFileError, match="truncated or not a safetensors file"):
        Chat(adapter=str(tmp_path / "broken"))
    tiny_ccm("llama", variant="gist").save_pretrained(tmp_path / "gist")
    with pytest.raises(ConfigError, match="raw_tail needs an online variant|gist adapter"):
        Chat(adapter=str(tmp_path / "gist"), raw_tail=1)
    with pytest.raises(ConfigError, match="is a gist adapter.*no online memory"):
        Chat(adapter=str(tmp_path / "gist"))
    tiny_ccm("llama", variant="merge_recur").save_pretrained(tmp_path / "merge")
    with pytest.raises(ConfigError, match="raw_tail"):  # the tail asked for is checked against the file's config
        Chat(adapter=str(tmp_path / "merge"), raw_tail=-1)


def test_chat_reads_a_given_adapter_as_its_own_variant(tmp_path, monkeypatch, tiny_folder):
    """`ccmem chat --adapter X` names and runs X's own variant whatever --variant says, and /variant to the other one
    is refused with the way to get it (the shipped defaults), keeping the conversation."""
    from ccmem import CompressedModel, CompressionConfig
    from ccmem.chat import Chat
    from ccmem.models import load_model

    CompressedModel.attach(load_model(str(tiny_folder))[0], CompressionConfig(variant="merge_recur", n_tok=2),
                           ).save_pretrained(tmp_path / "merge")
    monkeypatch.setattr("ccmem.models.load_model", lambda device=None: load_model(str(tiny_folder)))
    chat = Chat(variant="concat", adapter=str(tmp_path / "merge"), max_new_tokens=2)
    assert chat.variant == "merge" and chat.stats().startswith("variant merge, 0 turns")
    _, note = chat.reply("hello there")
    assert "tokens into the running mean (memory key/value size = 2," in note and "->" not in note  # no new slots
    assert "without --adapter" in chat.command("/variant concat")
    assert chat.variant == "merge" and int(chat.session.memory.steps[0]) >= 1  # the conversation is kept
    assert chat.command("/variant merge") == "switched to merge (fresh memory)" and len(chat.models) == 1
