"""Chat messages rendered by the tokenizer's own template, one message per compressed chunk."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from ccmem import CompressedModel, CompressionConfig
from ccmem.chat_template import generation_prompt_ids, message_ids, render_ids
from ccmem.errors import InputError

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nbe kind<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = "system user assistant be kind hi hello there my dog is called pixel what name ok".split()


def chat_tokenizer(template: str | None = CHATML):
    """A word-level tokenizer with ChatML's special tokens, small enough for the tiny models' 128 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = template
    return tok


CONVO = [{"role": "user", "content": "hi my dog is called pixel"}, {"role": "assistant", "content": "hello there"},
         {"role": "user", "content": "what is my dog name"}, {"role": "assistant", "content": "pixel"}]


def test_messages_one_at_a_time_equal_the_whole_conversation():
    tok = chat_tokenizer()
    pieces = [message_ids(tok, m, first=i == 0) for i, m in enumerate(CONVO)]
    assert sum(pieces, []) == render_ids(tok, CONVO)
    assert pieces[0][:2] == [1, 3]  # the template's default system prompt opens the session
    assert generation_prompt_ids(tok) == [1, 5]  # <|im_start|> assistant
    assert render_ids(tok, CONVO[:1], add_generation_prompt=True) == pieces[0] + generation_prompt_ids(tok)


def test_real_smollm2_template_is_incremental():
    from ccmem.models import load_tokenizer

    tok = load_tokenizer("smollm2")
    pieces = [message_ids(tok, m, first=i == 0) for i, m in enumerate(CONVO)]
    assert sum(pieces, []) == render_ids(tok, CONVO)
    assert tok.decode(generation_prompt_ids(tok)) == "<|im_start|>assistant\n"


def test_bad_messages_and_templates_are_refused():
    tok = chat_tokenizer()
    for bad, match in (({"role": "user"}, "role' and 'content"), ({"role": "robot", "content": "hi"}, "robot"),
                       ({"role": "user", "content": "  "}, "empty"), ("hi", "dict")):
        with pytest.raises(InputError, match=match):
            message_ids(tok, bad, first=False)
    with pytest.raises(InputError, match="system message can only open"):
        message_ids(tok, {"role": "system", "content": "be kind"}, first=False)
    with pytest.raises(InputError, match="no chat template"):
        message_ids(chat_tokenizer(None), CONVO[0], first=True)
    last_only = "{% for m in messages %}{% if loop.last %}<|im_start|>{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(InputError, match="incrementally"):
        message_ids(chat_tokenizer(last_only), CONVO[2], first=False)


def test_session_reply_compresses_message_and_reply():
    tok = chat_tokenizer()
    ccm = CompressedModel.attach(tiny_model("llama"), CompressionConfig(n_tok=2, lora_dropout=0.0), tokenizer=tok)
    s = ccm.session()
    s.add_message(CONVO[0])
    assert s.memory.num_slots == 2 and int(s.memory.offset[0]) == len(message_ids(tok, CONVO[0], True))
    text = s.reply(CONVO[2], max_new_tokens=4)
    assert isinstance(text, str)
    assert s.memory.num_slots == 6  # the question and the reply: two more chunks
    # the reply is what generate gives for the rendered message plus the generation prompt, on the same memory
    t = ccm.session()
    t.add_message(CONVO[0])
    ids = message_ids(tok, CONVO[2], first=False) + generation_prompt_ids(tok)
    assert tok.decode(t.generate(ids, max_new_tokens=4), skip_special_tokens=True).strip() == text
    two = ccm.session(batch_size=2)
    with pytest.raises(InputError, match="one conversation"):
        two.add_message(CONVO[0])
    assert torch.equal(t.memory.offset, torch.tensor([len(message_ids(tok, CONVO[0], True))]))


def test_template_dialog_format_is_the_rendered_conversation():
    """Training episodes in the template format hold exactly the tokens of the rendered conversation, the target
    turn is the assistant's and ends at the end-of-turn token."""
    from ccmem.data.dialog import Dialog, TemplateFormat

    tok = chat_tokenizer()
    fmt = TemplateFormat(tok)
    d = Dialog("d", ("hi my dog is called pixel", "hello there", "what is my dog name", "pixel"))
    for k in (2, 3, 4):
        ep = fmt.episode(d, k)
        roles = ["assistant" if (k - 1 - i) % 2 == 0 else "user" for i in range(k)]
        convo = [{"role": r, "content": t} for r, t in zip(roles, d.turns[:k])]
        flat = sum(ep.chunks, []) + ep.input + ep.output
        assert flat == render_ids(tok, convo)  # (this tokenizer drops ChatML's newlines)
        assert ep.output[-1] == tok.eos_token_id and ep.input[-2:] == generation_prompt_ids(tok)
        assert len(ep.chunks) == k - 2
    assert fmt.episode(d, 4, eos=False).output[-1] != tok.eos_token_id


def test_recipe_dialog_format_choice():
    from ccmem.data.dialog import DialogFormat, TemplateFormat
    from ccmem.errors import ConfigError
    from ccmem.recipe import dialog_format

    tok = chat_tokenizer()
    assert type(dialog_format(tok, {})) is DialogFormat
    assert type(dialog_format(tok, {"format": "template"})) is TemplateFormat
    with pytest.raises(ConfigError, match="data.format"):
        dialog_format(tok, {"format": "chatml"})
