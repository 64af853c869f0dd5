"""Text in and out: a tokenizer, and the text of a sequence as its tokens come, with stop
strings.

A model with a transformers tokenizer saved in a directory uses it (read from disk only, no code
from the directory runs). Otherwise text is UTF-8 bytes, one token per byte, which any
vocabulary of 256 or more takes: enough to drive the shipped graphs, whose weights are random.

A chat (a list of ``{role, content}`` messages) becomes a prompt through the tokenizer's chat
template when it has one (transformers renders it in a sandboxed Jinja environment), else as
``role: content`` lines followed by ``assistant:``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from fastserve.errors import FastServeError


def plain_chat(messages: Sequence[dict]) -> str:
    """A chat as text for a model without a chat template."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class ByteTokenizer:
    """One token per UTF-8 byte; ids past 255 (the model may produce them) read as U+FFFD."""

    name = "bytes"
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i if 0 <= i < 256 else 0xFF for i in ids).decode("utf-8", errors="replace")

    def chat(self, messages: Sequence[dict]) -> list[int]:
        return self.encode(plain_chat(messages))


class HFTokenizer:
    """A transformers tokenizer saved with ``save_pretrained`` in a directory."""

    def __init__(self, path: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise FastServeError("a tokenizer directory needs transformers: pip install "
                                 "'fastserve[capture]'") from None
        if not Path(path).is_dir():
            raise FastServeError(f"tokenizer '{path}' is not a directory (save one with "
                                 f"tokenizer.save_pretrained(DIR))")
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                     trust_remote_code=False)
        except Exception as e:  # transformers raises several types for a bad directory
            raise FastServeError(f"cannot load the tokenizer in '{path}': {e}") from None
        self.name = path
        self.eos_token_id = self.tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    def chat(self, messages: Sequence[dict]) -> list[int]:
        """The prompt of a chat, through the tokenizer's chat template if it has one; a
        :class:`ValueError` naming why the template refused the messages (templates may check
        the order of roles). A template that fails otherwise is the server's error."""
        if not getattr(self.tok, "chat_template", None):
            return self.encode(plain_chat(messages))
        from jinja2 import TemplateError  # what templates raise, raise_exception(...) included

        try:
            ids = self.tok.apply_chat_template([dict(m) for m in messages],
                                               add_generation_prompt=True, tokenize=True)
        except TemplateError as e:  # the messages' fault; anything else is the server's
            raise ValueError(f"the tokenizer's chat template refused the messages: {e}") \
                from None
        if not isinstance(ids, (list, tuple)):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]


def load_tokenizer(path: str | None):
    return HFTokenizer(path) if path else ByteTokenizer()


class TextStream:
    """The text of one sequence as tokens arrive: :meth:`add` returns the new text that is
    final, holding back a tail that may still turn into a stop string or complete a character;
    ``stopped`` once a stop string appeared (the text ends before it)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters given out
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                self.stopped = True
                text = text[:at]
        if self.stopped:
            return self._take(text, len(text))
        hold = max([len(s) - 1 for s in self.stop] + [0])
        # a character still coming: byte-level decoders show one U+FFFD for its bytes so far,
        # byte-fallback ones (Llama's) one per byte, and both give the character once whole
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
        return self._take(text, max(self.sent, len(text) - hold))

    def flush(self) -> str:
        """What is left once the sequence has ended."""
        text = self.tokenizer.decode(self.ids)
        if self.stopped:
            return ""
        return self._take(text, len(text))

    def _take(self, text: str, upto: int) -> str:
        out = text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return out
