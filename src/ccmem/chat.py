"""``ccmem chat``: talk to the default model with compressed memory. Each turn (yours and the model's) is
compressed into n slots once it leaves the raw tail (the newest turn, verbatim, for the shipped general adapter;
``--raw-tail 0`` compresses every turn as soon as it is answered); commands start with a slash (/help). Turns are
rendered with the tokenizer's chat template (ChatML for SmolLM2), the format the default adapter
(``adapters/general-chat-decay``, :func:`ccmem.demo.chat_adapter`) was trained on; ``--plain`` uses ``A: / B:``
lines."""

from __future__ import annotations

import sys

HELP = """commands:
  /stats            memory size and what has been compressed
  /reset            forget everything
  /save PATH        save the memory (safetensors)
  /load PATH        load a saved memory
  /variant NAME     switch between concat and merge (starts a fresh memory)
  /quit             leave"""


VARIANT_NAMES = {"concat_recur": "concat", "merge_recur": "merge"}  # what --variant and /variant call them


class Chat:
    def __init__(self, variant: str = "concat", adapter: str | None = None, device: str | None = None,
                 max_new_tokens: int = 48, template: bool = True, raw_tail: int | None = None):
        from dataclasses import replace

        from .config import CompressionConfig
        from .demo import chat_adapter, chat_raw_tail, stop_ids
        from .memory import bytes_per_slot
        from .model import CompressedModel
        from .models import load_model
        from .session import require_online

        def load(v: str) -> CompressedModel:
            path = adapter or chat_adapter(v)
            tail = raw_tail if raw_tail is not None else chat_raw_tail(path)
            # a missing or damaged adapter, or a tail it cannot be read with, is refused before the model loads
            _, header = CompressedModel.read_adapter(path)
            config = CompressionConfig.from_dict(header["compression"])
            require_online(config, str(path))
            if tail is not None:
                replace(config, raw_tail=tail)
            return CompressedModel.from_pretrained(path, *load_model(device=device), raw_tail=tail)

        self._load = load
        self.models: dict = {}
        self.adapter = adapter
        self.ccm = self._model(variant)
        # an adapter given by path is read as the variant it was trained as, whatever --variant says
        self.variant = VARIANT_NAMES.get(self.ccm.config.variant, self.ccm.config.variant) if adapter else variant
        self.models = {self.variant: self.ccm}
        self.tok = self.ccm.tokenizer
        self.per_slot = bytes_per_slot(self.ccm.model)
        self.template = template and bool(getattr(self.tok, "chat_template", None))
        # a templated turn ends at the end-of-turn token; a plain one at the end of its line
        self.stops = [self.tok.eos_token_id] if self.template else stop_ids(self.tok)
        self.max_new_tokens = max_new_tokens
        self.session = self.ccm.session()

    def _model(self, variant: str):
        if variant not in self.models:
            self.models[variant] = self._load(variant)
        return self.models[variant]

    def _enc(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def stats(self) -> str:
        m = self.session.memory
        tail = sum(m.tail_tokens())
        read = int(m.offset[0]) + tail  # the memory counts what it compressed; the tail is read verbatim
        kept = f"{m.num_slots} slots" + (f" + {tail} tokens of the newest turns kept raw" if tail else "")
        n = int(m.steps[0])
        return (f"variant {self.variant}, {n} turn{'s' if n != 1 else ''} compressed ({int(m.offset[0])} tokens) "
                f"into {kept} = {m.kv_bytes / 1024:.0f} KiB "
                f"(full context would hold {read * self.per_slot / 1024:.0f} KiB)")

    def reply(self, user: str) -> tuple[str, str]:
        if self.template:
            m = self.session.memory
            before, tokens, steps = m.num_slots, int(m.offset[0]), int(m.steps[0])
            text = self.session.reply({"role": "user", "content": user.strip()}, max_new_tokens=self.max_new_tokens,
                                      eos_token_id=self.stops, repetition_penalty=1.3) or "..."
            m = self.session.memory
            tail = sum(m.tail_tokens())
            n = int(m.steps[0]) - steps  # with a raw tail the newest turns wait uncompressed
            into = ("into the running mean" if self.ccm.config.merging  # a merge memory averages: no new slots
                    else f"-> {m.num_slots - before} slots")
            did = (f"compress {n} turn{'s' if n != 1 else ''}, {int(m.offset[0]) - tokens} tokens {into}" if n
                   else "kept raw in the tail, nothing compressed this turn")
            return text, (f"[{did} (memory key/value size = {m.num_slots}" + (f" + {tail} raw tail" if tail else "")
                          + f", {m.kv_bytes / 1024:.0f} KiB)]")
        user_turn = self._enc(f"A: {user.strip()}\n")
        prompt = user_turn + self._enc("B:")
        ids = self.session.generate(prompt, max_new_tokens=self.max_new_tokens, eos_token_id=self.stops,
                                    repetition_penalty=1.3)
        text = self.tok.decode(ids, skip_special_tokens=True).strip() or "..."
        bot_turn = self._enc(f"B: {text}\n")
        notes = []
        for turn in (user_turn, bot_turn):
            rep = self.session.add_context(turn)  # with a raw tail: the turn leaving it is compressed
            if rep.tokens[0]:
                notes.append(f"{rep.tokens[0]}" + ("" if self.ccm.config.merging else f" -> {self.ccm.config.n_tok}"))
        m = self.session.memory
        tail = sum(m.tail_tokens())
        did = (f"compress {', '.join(notes)} tokens" + (" into the running mean" if self.ccm.config.merging else "")
               if notes else "kept raw in the tail, nothing compressed this turn")
        return text, (f"[{did} (memory key/value size = {m.num_slots}"
                      + (f" + {tail} raw tail" if tail else "") + f", {rep.memory_bytes / 1024:.0f} KiB)]")

    def command(self, line: str) -> str | None:
        cmd, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if cmd in ("quit", "exit", "q"):
            return None
        if cmd == "help":
            return HELP
        if cmd == "stats":
            return self.stats()
        if cmd == "reset":
            self.session.reset()
            return "memory cleared"
        if cmd == "save":
            if not arg:
                return "usage: /save PATH"
            self.session.save(arg)
            return f"saved {self.session.memory.num_slots} slots to {arg}"
        if cmd == "load":
            if not arg:
                return "usage: /load PATH"
            try:
                self.session.load(arg)
            except Exception as e:  # show the library's message, keep the current memory
                hints = {("raw_tail",): f" (this chat keeps {self.ccm.config.raw_tail} raw tail turn(s): start it "
                                        "with --raw-tail K to match the file)",
                         ("adapter",): " (start the chat with --adapter PATH of the adapter that saved it)"}
                hint = hints.get(getattr(e, "fields", ()), "")
                return f"could not load {arg}: {e}{hint}"
            return f"loaded {self.session.memory.num_slots} slots from {arg}"
        if cmd == "variant":
            if arg not in ("concat", "merge"):
                return "usage: /variant concat|merge"
            if self.adapter and arg != self.variant:
                return (f"this chat runs the adapter {self.adapter} ({self.variant}); /variant switches between the "
                        "default adapters: start `ccmem chat` without --adapter for that")
            self.variant, self.ccm = arg, self._model(arg)
            self.session = self.ccm.session()
            return f"switched to {arg} (fresh memory)"
        return f"unknown command /{cmd}; /help lists them"


def run_chat(variant: str = "concat", adapter: str | None = None, device: str | None = None,
             template: bool = True, raw_tail: int | None = None) -> int:
    print("loading SmolLM2-135M-Instruct with the CCM adapter ...", flush=True)
    chat = Chat(variant, adapter, device, template=template, raw_tail=raw_tail)
    fmt = "chat template" if chat.template else "A: / B: lines"
    print(f"ready ({chat.variant}, {fmt}). Type a message; /help for commands.", flush=True)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            out = chat.command(line.strip())
            if out is None:
                return 0
            print(out, flush=True)
            continue
        text, note = chat.reply(line)
        print(f"bot> {text}\n{note}", flush=True)


if __name__ == "__main__":
    sys.exit(run_chat())
