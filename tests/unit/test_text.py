"""Text in and out: a transformers tokenizer read from a directory, chats through its chat
template (or plain ``role: content`` lines without one), and a template's refusal as a 400."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fastserve.generate.text import ByteTokenizer, HFTokenizer, TextStream, plain_chat
from fastserve.service.openai import BadRequest, parse

TEMPLATE = ("{% for m in messages %}{% if m.role == 'assistant' and loop.first %}"
            "{{ raise_exception('a chat starts with the user') }}{% endif %}"
            "<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def tokenizer_dir(path, template: str | None) -> str:
    """A character-level tokenizer built offline and saved as transformers saves one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(32, 127)} | {"\n": 10, "<eos>": 200, "<unk>": 201}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(path))
    return str(path)


def test_a_chat_goes_through_the_tokenizers_template(tmp_path):
    tok = HFTokenizer(tokenizer_dir(tmp_path, TEMPLATE))
    assert tok.eos_token_id == 200 and tok.decode(tok.encode("hi there")) == "hi there"
    assert tok.decode(tok.chat(CHAT)) == "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    with pytest.raises(ValueError, match="chat template refused .*starts with the user"):
        tok.chat([{"role": "assistant", "content": "hello"}])


def test_without_a_template_a_chat_is_role_lines(tmp_path):
    tok = HFTokenizer(tokenizer_dir(tmp_path, None))
    assert tok.decode(tok.chat(CHAT)) == "system: be brief\nuser: hi\nassistant:" \
        == plain_chat(CHAT)
    assert ByteTokenizer().chat(CHAT) == list(plain_chat(CHAT).encode())


def test_the_chat_route_uses_the_template_and_a_refusal_is_a_400(tmp_path):
    tok = HFTokenizer(tokenizer_dir(tmp_path, TEMPLATE))
    service = SimpleNamespace(tokenizer=tok, config=SimpleNamespace(
        generation=SimpleNamespace(max_tokens=32)))
    prompt, max_tokens, *_ = parse({"messages": CHAT, "max_tokens": 4}, service, chat=True)
    assert (prompt, max_tokens) == (tok.chat(CHAT), 4)
    with pytest.raises(BadRequest, match="starts with the user"):
        parse({"messages": [{"role": "assistant", "content": "x"}]}, service, chat=True)


def test_text_comes_out_final_and_stops_before_a_stop_string():
    tok = ByteTokenizer()
    stream = TextStream(tok, ["END"])
    # the last two characters are held back while they may still begin "END"
    assert [stream.add(t) for t in b"ab EN"] == ["", "", "a", "b", " "]
    assert stream.add(ord("D")) == "" and stream.stopped  # the text ends before the stop
    assert stream.add(ord("x")) == "" and stream.flush() == ""
    word = "é".encode()  # two bytes: nothing until the character is whole
    stream = TextStream(tok)
    assert stream.add(word[0]) == "" and stream.add(word[1]) == "é"


def test_a_byte_fallback_tokenizers_partial_characters_are_held_until_whole(tmp_path):
    """Llama-style byte fallback: the decoder shows one U+FFFD per byte of a character still
    coming; the stream gives the character once it is whole, and loses nothing."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<0x{b:02X}>": b for b in range(256)} | {"a": 256, "b": 257, "<unk>": 258}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path)
    hf = HFTokenizer(str(tmp_path))
    ids = [256, *"€".encode(), 257]  # a, three byte tokens, b
    assert [hf.decode(ids[:k]) for k in range(2, 5)] == ["a\ufffd", "a\ufffd\ufffd", "a€"]
    stream = TextStream(hf)
    assert [stream.add(t) for t in ids] == ["a", "", "", "€", "b"]
    assert stream.flush() == ""
