"""``ccmem serve`` with the official ``openai`` client against a live server on 127.0.0.1 (tiny model)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
import torch
from conftest import tiny_model

from ccmem import CompressedModel, CompressionConfig
from ccmem.server import Engine, ServerConfig, create_app
from ccmem.server.engine import Limits
from ccmem.server.main import ThreadedServer
from ccmem.server.store import SessionStore

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nbe kind<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
KEYS = ("key-one", "key-two")
N_TOK = 2


def server_tokenizer():
    """Word-level ChatML tokenizer filling the tiny models' 128 ids, so every generated id decodes to a word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "system user assistant be kind hi my dog is called pixel what name".split()
    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    vocab.update({f"w{i}": len(vocab) for i in range(128 - len(vocab))})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    return tok


def make_engine(data_dir, max_queue=4, raw_tail=0):
    model = tiny_model("llama", initializer_range=0.2)
    ccm = CompressedModel.attach(model, CompressionConfig(n_tok=N_TOK, lora_dropout=0.0, raw_tail=raw_tail),
                                 tokenizer=server_tokenizer())
    torch.manual_seed(0)
    return Engine(ccm, SessionStore(data_dir), Limits(max_messages=8, max_message_tokens=40, max_new_tokens=16,
                                                      max_queue=max_queue))


class Live:
    """A uvicorn server in a thread on a free port."""

    def __init__(self, engine, keys=KEYS, max_request_bytes=20_000):
        app = create_app(engine, ServerConfig(api_keys=set(keys), max_request_bytes=max_request_bytes,
                                              model_name="tiny"))
        self.engine = engine
        self.threaded = ThreadedServer(app)
        self.url = self.threaded.url

    def client(self, key=KEYS[0]):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def get(self, path, key=KEYS[0]):
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self):
        self.threaded.stop()
        self.engine.store.close()


@pytest.fixture
def live(tmp_path):
    s = Live(make_engine(tmp_path / "store"))
    yield s
    s.stop()


def ask(client, sid, messages, **kw):
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=kw.pop("max_tokens", 6),
                                          temperature=kw.pop("temperature", 0), extra_headers={"X-Session-Id": sid},
                                          **kw)


def session(live, sid, key=KEYS[0]):
    status, body = live.get(f"/v1/sessions/{sid}", key)
    return status, (json.loads(body) if status == 200 else None)


U1 = {"role": "user", "content": "hi my dog is called pixel"}
U2 = {"role": "user", "content": "what is my dog name"}


def test_models_health_and_multi_turn_memory_growth(live):
    c = live.client()
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r1 = ask(c, "a", [U1])
    assert r1.choices[0].message.role == "assistant" and r1.usage.completion_tokens >= 1
    assert r1.usage.total_tokens == r1.usage.prompt_tokens + r1.usage.completion_tokens
    _, s = session(live, "a")
    assert s["turns"] == 2 and s["slots"] == 2 * N_TOK  # the question and the reply, n_tok slots each
    ask(c, "a", [U2])  # only the new message: the server continues from memory
    _, s = session(live, "a")
    assert s["turns"] == 4 and s["slots"] == 4 * N_TOK and s["bytes"] > 0
    status, body = live.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = live.get("/metrics")
    assert status == 200 and b"ccmem_tokens_generated" in body and b"ccmem_sessions_stored 1.0" in body


def test_streaming_equals_plain_reply(live):
    c = live.client()
    plain = ask(c, "p", [U1]).choices[0].message.content
    stream = ask(c, "q", [U1], stream=True)
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert "".join(pieces).strip() == plain.strip() and finish in ("stop", "length")
    assert session(live, "q")[1]["turns"] == 2


def test_resent_history_compresses_only_new_turns_and_edited_history_restarts(live):
    c = live.client()
    r1 = ask(c, "h", [U1]).choices[0].message.content
    history = [U1, {"role": "assistant", "content": r1}]
    ask(c, "h", history + [U2])  # an OpenAI client resends everything
    assert session(live, "h")[1]["turns"] == 4  # U1 and r1 were not compressed again
    edited = [{"role": "user", "content": "hi my dog is called what"}, {"role": "assistant", "content": r1}]
    ask(c, "h", edited + [U2])
    assert session(live, "h")[1]["turns"] == 4  # a new memory: the 2 edited messages + question + reply


def test_sessions_are_private_to_their_key(live):
    ask(live.client(KEYS[0]), "mine", [U1])
    assert session(live, "mine", KEYS[1])[0] == 404
    assert live.get("/v1/sessions/mine/memory", KEYS[1])[0] == 404
    ask(live.client(KEYS[1]), "mine", [U1])  # the same name under another key is another session
    assert session(live, "mine", KEYS[1])[1]["turns"] == 2 and session(live, "mine", KEYS[0])[1]["turns"] == 2
    with pytest.raises(openai.AuthenticationError):
        ask(live.client("wrong-key"), "x", [U1])


@pytest.mark.parametrize("messages,kw,match", [
    ([U1] * 9, {}, "limit of 8"),
    ([{"role": "user", "content": "w1 " * 50}], {}, "more than the limit of 40"),
    ([U1], {"max_tokens": 17}, "max_tokens"),
    ([U1, {"role": "assistant", "content": "hi"}], {}, "last message must be the user"),
    ([{"role": "user", "content": " "}], {}, "empty"),
    ([{"role": "robot", "content": "hi"}], {}, "robot"),
    ([U1], {"n": 2}, "n must be 1"),
])
def test_every_limit_is_a_clear_400(live, messages, kw, match):
    with pytest.raises(openai.BadRequestError, match=match):
        ask(live.client(), "lim", messages, **kw)
    assert session(live, "lim")[0] == 404  # nothing was created


def test_oversized_body_is_413(live):
    with pytest.raises(openai.APIStatusError) as e:
        ask(live.client(), "big", [{"role": "user", "content": "w1 " * 8000}])
    assert e.value.status_code == 413


def test_full_queue_is_429(tmp_path):
    live = Live(make_engine(tmp_path / "store", max_queue=1))
    try:
        live.engine.slots.acquire()  # one request already waits
        with pytest.raises(openai.RateLimitError):
            ask(live.client(), "busy", [U1])
        live.engine.slots.release()
        assert ask(live.client(), "busy", [U1]).choices[0].message.content is not None
    finally:
        live.stop()


def test_restart_serves_every_session_where_it_stopped_and_memory_export_import(tmp_path):
    live = Live(make_engine(tmp_path / "store"))
    ask(live.client(), "keep", [U1])
    status, blob = live.get("/v1/sessions/keep/memory")
    assert status == 200 and len(blob) > 1000
    before = session(live, "keep")[1]
    live.stop()
    live = Live(make_engine(tmp_path / "store"))  # a new process would see the same store
    try:
        assert session(live, "keep")[1]["slots"] == before["slots"]
        ask(live.client(), "keep", [U2])
        assert session(live, "keep")[1]["turns"] == 4
        req = urllib.request.Request(live.url + "/v1/sessions/copy/memory", data=blob, method="PUT",
                                     headers={"Authorization": f"Bearer {KEYS[0]}"})
        with urllib.request.urlopen(req) as r:
            assert json.loads(r.read())["slots"] == before["slots"]
        bad = urllib.request.Request(live.url + "/v1/sessions/bad/memory", data=blob[:-10], method="PUT",
                                     headers={"Authorization": f"Bearer {KEYS[0]}"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad)
        assert e.value.code == 400
        req = urllib.request.Request(live.url + "/v1/sessions/keep", method="DELETE",
                                     headers={"Authorization": f"Bearer {KEYS[0]}"})
        with urllib.request.urlopen(req) as r:
            assert json.loads(r.read())["deleted"] is True
        assert session(live, "keep")[0] == 404
    finally:
        live.stop()


def test_a_tail_server_keeps_the_newest_message_raw_and_a_server_without_it_refuses_its_sessions(tmp_path):
    """--raw-tail 1: after a turn the reply stays raw (its tokens in the tail, the user message compressed); a server
    restarted with the same tail continues the session, one with another tail refuses it naming the fix (an
    IncompatibleError: HTTP 400, as every CCMError) and serves it anew once it is deleted; a full-history server
    takes no tail."""
    from ccmem.errors import IncompatibleError, InputError

    e = make_engine(tmp_path / "store", raw_tail=1)
    e.chat("o", "s", [U1], max_new_tokens=4, temperature=0)
    mem = e.hot[("o", "s")][0].memory
    assert mem.tail_tokens()[0] > 0 and mem.num_slots == N_TOK  # one message compressed, one raw
    e.hot[("o", "s")][0].save(tmp_path / "m.safetensors")
    assert e.import_memory("o", "copy", str(tmp_path / "m.safetensors")).turns == 2  # the raw reply counts as a turn
    e.store.close()
    e = make_engine(tmp_path / "store", raw_tail=1)
    assert e.chat("o", "s", [U2], max_new_tokens=4, temperature=0).session.turns == 4
    e.store.close()
    e = make_engine(tmp_path / "store", raw_tail=0)
    refused = r"another compression config \(raw_tail differ\).*with the --raw-tail it was saved.*DELETE"
    with pytest.raises(IncompatibleError, match=refused) as err:
        e.chat("o", "s", [U2], max_new_tokens=4, temperature=0)
    assert err.value.fields == ("raw_tail",)
    assert e.forget("o", "s")
    assert e.chat("o", "s", [U1], max_new_tokens=4, temperature=0).session.turns == 2  # anew, without a tail
    assert e.hot[("o", "s")][0].memory.tail_tokens()[0] == 0
    e.store.close()
    tail = make_engine(tmp_path / "other", raw_tail=1)
    with pytest.raises(InputError, match="leave out --raw-tail"):
        Engine(tail.ccm, tail.store, full_history=True)
    tail.store.close()


def test_a_server_with_another_adapter_refuses_a_stored_session_naming_the_fix(tmp_path):
    """Sessions are stored with the adapter that wrote them: a server restarted on another adapter (e.g. a new
    default) refuses such a session naming --adapter and DELETE, keeps the file, and serves it anew once deleted."""
    from conftest import randomize

    from ccmem.errors import IncompatibleError

    e = make_engine(tmp_path / "store")
    e.chat("o", "s", [U1], max_new_tokens=4, temperature=0)
    e.store.close()
    e = make_engine(tmp_path / "store")
    randomize(e.ccm, seed=3)
    with pytest.raises(IncompatibleError, match=r"saved by another adapter.*with the --adapter it was saved.*DELETE"
                       ) as err:
        e.chat("o", "s", [U2], max_new_tokens=4, temperature=0)
    assert err.value.fields == ("adapter",) and e.store.get("o", "s").file  # the stored session is kept
    with pytest.raises(IncompatibleError, match="another adapter than this server's.*--adapter that wrote it"):
        e.import_memory("o", "copy", str(e.store.path(e.store.get("o", "s"))))
    assert e.forget("o", "s")
    assert e.chat("o", "s", [U1], max_new_tokens=4, temperature=0).session.turns == 2
    e.store.close()


def test_a_refused_session_is_a_400_plain_and_streamed_and_counted_as_400(tmp_path):
    """Over HTTP the refusal is the same 400 whether the request streams or not: the plain reply's status, the
    stream's error event (code 400, with the fix named) and /metrics all say 400, never 500."""
    from conftest import randomize

    e = make_engine(tmp_path / "store")
    e.chat("public", "s", [U1], max_new_tokens=4, temperature=0)
    e.store.close()
    e = make_engine(tmp_path / "store")
    randomize(e.ccm, seed=3)
    live = Live(e, keys=())  # without keys every request is the owner "public"
    try:
        with pytest.raises(openai.BadRequestError, match="another adapter"):
            ask(live.client(), "s", [U2])
        req = urllib.request.Request(
            live.url + "/v1/chat/completions", method="POST", headers={"Content-Type": "application/json",
                                                                     "X-Session-Id": "s"},
            data=json.dumps({"model": "tiny", "messages": [U2], "max_tokens": 4, "stream": True}).encode())
        with urllib.request.urlopen(req) as r:
            events = [line.removeprefix(b"data: ") for line in r.read().splitlines() if line.startswith(b"data: ")]
        error = json.loads(events[-2])["error"]
        assert events[-1] == b"[DONE]" and error["code"] == 400 and error["type"] == "invalid_request_error"
        assert "--adapter" in error["message"] and "DELETE" in error["message"]
        metrics = live.get("/metrics")[1].decode()
        assert 'ccmem_requests_total{status="400"} 2.0' in metrics and 'status="500"' not in metrics
    finally:
        live.stop()


def test_kill_9_mid_load_loses_no_answered_turn(tmp_path):
    """A real `ccmem serve` process, killed with SIGKILL while clients are mid-conversation, restarted on the same
    store: every answered turn is in its session's memory, every memory file passes its checksum, and a session that
    was idle during the crash is exactly as it was."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from ccmem import io
    from ccmem.server.store import SessionStore

    model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
    model, tok = tiny_model("llama", initializer_range=0.2), server_tokenizer()
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    CompressedModel.attach(model, CompressionConfig(n_tok=N_TOK, lora_dropout=0.0), tokenizer=tok
                           ).save_pretrained(adapter_dir)
    (tmp_path / "keys").write_text(KEYS[0] + "\n")

    def start():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        p = subprocess.Popen([sys.executable, "-m", "ccmem", "serve", "--model", str(model_dir), "--adapter",
                              str(adapter_dir), "--data-dir", str(tmp_path / "store"), "--port", str(port),
                              "--api-keys-file", str(tmp_path / "keys"), "--max-new-tokens", "8"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                return p, openai.OpenAI(base_url=url + "/v1", api_key=KEYS[0], max_retries=0, timeout=30)
            except OSError:
                time.sleep(0.1)
        p.kill()
        raise RuntimeError("the server did not start")

    proc, client = start()
    ask(client, "idle", [U1], max_tokens=4)
    idle_before = client.get("/sessions/idle", cast_to=object)
    answered = {f"s{i}": 0 for i in range(4)}
    stop = threading.Event()

    def talk(sid):
        while not stop.is_set():
            try:
                ask(client, sid, [U1 if answered[sid] % 2 == 0 else U2], max_tokens=4)
            except Exception:  # noqa: BLE001 - the server was killed under this request
                return
            answered[sid] += 1

    threads = [threading.Thread(target=talk, args=(sid,)) for sid in answered]
    for t in threads:
        t.start()
    while sum(answered.values()) < 10:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stop.set()
    for t in threads:
        t.join()

    store = SessionStore(tmp_path / "store")  # as the restarted server sees it
    files = list((tmp_path / "store" / "memory").iterdir())
    assert files and all(f.suffix == ".safetensors" for f in files)  # partial writes were swept
    for f in files:
        io.load_checked(f)  # raises on any checksum or truncation problem
    store.close()
    proc, client = start()
    try:
        for sid, n in answered.items():
            turns = client.get(f"/sessions/{sid}", cast_to=object)["turns"]
            assert 2 * n <= turns <= 2 * n + 2, (sid, n, turns)  # + the turn in flight if it committed
        assert client.get("/sessions/idle", cast_to=object) == idle_before
        ask(client, "s0", [U2], max_tokens=4)  # and the conversation goes on
    finally:
        proc.kill()
        proc.wait()


def test_full_history_server_keeps_every_token(tmp_path):
    """The baseline mode of serve_load: the same server keeping raw keys/values grows by every token, ccmem by
    n_tok slots per message."""
    eng = make_engine(tmp_path / "store")
    full = Engine(eng.ccm, SessionStore(tmp_path / "full"), eng.limits, full_history=True)
    a = eng.chat("o", "x", [U1], max_new_tokens=4, temperature=0)
    b = full.chat("o", "x", [U1], max_new_tokens=4, temperature=0)
    assert a.text == b.text  # the first answer reads the same (empty) memory
    assert a.session.slots == 2 * N_TOK and b.session.slots == b.session.tokens > 2 * N_TOK
    eng.store.close()
    full.store.close()


def test_real_default_model_serves_a_conversation(tmp_path):
    from ccmem.demo import default_adapter
    from ccmem.models import load_model

    model, tok = load_model("smollm2")
    ccm = CompressedModel.from_pretrained(default_adapter("concat"), model, tokenizer=tok)
    live = Live(Engine(ccm, SessionStore(tmp_path / "store")))
    try:
        c = live.client()
        r = ask(c, "real", [{"role": "user", "content": "Hi! I just got back from a hiking trip in Colorado."}],
                max_tokens=12)
        assert r.choices[0].message.content.strip()
        r = ask(c, "real", [{"role": "user", "content": "Where did I go hiking?"}], max_tokens=12, stream=True)
        text = "".join(ch.choices[0].delta.content or "" for ch in r if ch.choices)
        assert text.strip()
        s = session(live, "real")[1]
        assert s["turns"] == 4 and s["slots"] == 4 * ccm.config.n_tok and s["tokens_compressed"] > 30
    finally:
        live.stop()


@pytest.mark.parametrize("full_history,raw_tail", [(False, 0), (True, 0), (False, 1)])
def test_requests_of_different_sessions_are_batched_and_answer_as_alone(tmp_path, full_history, raw_tail):
    """Requests waiting together (sessions at different points, one fresh) run as one batched step and get exactly
    the greedy replies and memories they get one at a time (also with a raw tail: rows with tails of different
    lengths stacked)."""
    def engine(name):
        e = make_engine(tmp_path / name, raw_tail=raw_tail)
        if full_history:
            e = Engine(e.ccm, e.store, e.limits, full_history=True)
        return e

    histories = {"a": [U1], "b": [U1, U2], "c": []}
    asks = {"a": U2, "b": {"role": "user", "content": "what is my name"}, "c": U1}
    solo, batched = engine("solo"), engine("batched")
    for e in (solo, batched):
        for sid, msgs in histories.items():
            for m in msgs:
                e.chat("o", sid, [m], max_new_tokens=4, temperature=0)
    want = {sid: solo.chat("o", sid, [m], max_new_tokens=5, temperature=0) for sid, m in asks.items()}
    got: dict = {}
    streamed: dict = {sid: [] for sid in asks}
    with batched.model_lock:  # the worker takes a first request and waits: the three others queue up together
        first = threading.Thread(target=batched.chat, args=("o", "z", [U1]), kwargs={"max_new_tokens": 2})
        first.start()
        while batched.jobs or batched.worker is None:
            time.sleep(0.01)
        threads = [threading.Thread(target=lambda s=sid, m=m: got.__setitem__(
            s, batched.chat("o", s, [m], max_new_tokens=5, temperature=0, on_text=streamed[s].append)))
            for sid, m in asks.items()]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while len(batched.jobs) < 3 and time.time() < deadline:
            time.sleep(0.01)
    for t in [first, *threads]:
        t.join(timeout=60)
    assert batched.stats["largest_batch"] == 3
    for sid in asks:
        assert got[sid].text == want[sid].text and got[sid].finish_reason == want[sid].finish_reason
        assert "".join(streamed[sid]).strip() == got[sid].text
        assert got[sid].session.slots == want[sid].session.slots and got[sid].session.turns == want[sid].session.turns
        a, b = solo.hot[("o", sid)][0], batched.hot[("o", sid)][0]
        assert a.memory.tail_tokens() == b.memory.tail_tokens()
        assert (a.memory.tail_tokens()[0] > 0) == bool(raw_tail)  # the newest message (the reply) is kept raw
        la, _ = a.logits([5, 6, 7])
        lb, _ = b.logits([5, 6, 7])
        assert (la - lb).abs().max() <= 1e-4
    solo.store.close()
    batched.store.close()


def test_cold_sessions_leave_ram_and_come_back_from_disk(tmp_path):
    eng = make_engine(tmp_path / "store")
    eng.hot_bytes = 1  # at most one session in RAM
    ref = make_engine(tmp_path / "ref")
    for e in (eng, ref):
        e.chat("o", "a", [U1], max_new_tokens=3, temperature=0)
        e.chat("o", "b", [U1], max_new_tokens=3, temperature=0)
    assert list(eng.hot) == [("o", "b")] and len(ref.hot) == 2
    x = eng.chat("o", "a", [U2], max_new_tokens=4, temperature=0)  # reloaded from its file
    y = ref.chat("o", "a", [U2], max_new_tokens=4, temperature=0)
    assert x.text == y.text and x.session.turns == y.session.turns == 4 and list(eng.hot) == [("o", "a")]
    eng.store.close()
    ref.store.close()
