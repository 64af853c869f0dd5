"""OpenAI-style completion routes of a generating service.

=============================  ==================================================================
``POST /v1/completions``        ``{"prompt": "text" | [ids], "max_tokens": 16, "temperature",
                                "top_p", "top_k", "seed", "stop", "stream"}`` -> a
                                ``text_completion`` (with each choice's ``token_ids``)
``POST /v1/chat/completions``   ``{"messages": [{"role", "content"}, ...], ...}`` -> a
                                ``chat.completion``; the messages become one prompt
                                (the tokenizer's chat template, else ``role: content``
                                lines, then ``assistant:``)
=============================  ==================================================================

With ``"stream": true`` the answer is server-sent events, one ``data: {chunk}`` per token's new
text and ``data: [DONE]`` at the end. Every field is checked before anything is queued (a 400
names it); fields OpenAI clients send that do not apply here are accepted only with their
neutral value (``n: 1``, ``echo: false``...). A client that goes away cancels its generation.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fastserve.errors import ServiceError
from fastserve.generate.text import TextStream
from fastserve.graph.decode import Sampling
from fastserve.service.http import BadRequest, client_gone, error_response, refused
from fastserve.service.service import Service

MAX_BODY = 4 << 20  # a completion's body (a prompt far past any context), whatever
# limits.max_body_bytes allows tensors: it is parsed on the event loop
MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 256
ROLES = ("system", "user", "assistant")
# OpenAI fields that do not apply here, and the one value each may have
NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None,
           "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None}


def _is_neutral(value: Any, neutral: Any) -> bool:
    if value is None:
        return True
    if isinstance(neutral, bool) or neutral is None:
        return value is neutral
    return type(value) in (int, float) and value == neutral


def _number(doc: dict, key: str, default: float, low: float, high: float,
            integer: bool = False) -> Any:
    v = doc.get(key, default)
    if v is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kinds) or not low <= v <= high:
        raise BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'} from "
                         f"{low} to {high}")
    return v


def _unicode(text: str) -> bool:
    """Whether ``text`` is Unicode text that UTF-8 can carry: JSON's ``\\ud800`` escapes
    decode to lone surrogates, which no tokenizer takes."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _stops(doc: dict) -> list[str]:
    v = doc.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS and _unicode(s)
            for s in stops):
        raise BadRequest(f"'stop' must be a string or a list of at most {MAX_STOPS} strings "
                         f"of 1 to {MAX_STOP_CHARS} characters (Unicode text)")
    return stops


def _message(m: Any) -> bool:
    if not isinstance(m, dict) or not set(m) <= {"role", "content", "name"}:
        return False
    text = [m.get("content"), m.get("name", "")]
    return m.get("role") in ROLES and all(isinstance(t, str) and _unicode(t) for t in text)


def _prompt_of(doc: dict, service: Service, chat: bool) -> list[int]:
    if chat:
        messages = doc.get("messages")
        if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES or \
                not all(_message(m) for m in messages):
            raise BadRequest(f"'messages' must be a list of 1 to {MAX_MESSAGES} "
                             f"{{role: {'|'.join(ROLES)}, content: text, name: text "
                             f"(optional)}} (Unicode text)")
        try:
            return service.tokenizer.chat(messages)
        except ValueError as e:
            raise BadRequest(str(e)) from None
    prompt = doc.get("prompt")
    if isinstance(prompt, str) and _unicode(prompt):
        return service.tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise BadRequest("'prompt' must be Unicode text or a non-empty list of token ids")


def parse(doc: Any, service: Service, chat: bool) -> tuple[list[int], int, Sampling, list[str],
                                                           bool]:
    """The prompt ids, max_tokens, sampling, stop strings and stream flag of a request body."""
    if not isinstance(doc, dict):
        raise BadRequest("expected a JSON object")
    known = {"model", "user", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
             "stream", "messages" if chat else "prompt", *NEUTRAL}
    unknown = sorted(str(k)[:40] for k in doc if k not in known)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(known))}")
    for key, neutral in NEUTRAL.items():
        if not _is_neutral(doc.get(key), neutral):
            raise BadRequest(f"'{key}' can only be {json.dumps(neutral)} here")
    for key in ("model", "user"):
        if key in doc and not isinstance(doc[key], str):
            raise BadRequest(f"'{key}' must be a string")
    limit = service.config.generation.max_tokens
    max_tokens = _number(doc, "max_tokens", 16, 1, limit, integer=True)
    try:
        sampling = Sampling(float(_number(doc, "temperature", 1.0, 0, 2)),
                            _number(doc, "top_k", 0, 0, 1 << 20, integer=True),
                            float(_number(doc, "top_p", 1.0, 1e-9, 1.0)),
                            _number(doc, "seed", secrets.randbits(62), 0, (1 << 63) - 1,
                                    integer=True))
    except ValueError as e:
        raise BadRequest(str(e)) from None
    stream = doc.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false")
    return _prompt_of(doc, service, chat), max_tokens, sampling, _stops(doc), stream


class _Run:
    """One completion as the event loop sees it: its events through an asyncio queue, its text
    through a :class:`TextStream`."""

    def __init__(self, service: Service, prompt: list[int], max_tokens: int,
                 sampling: Sampling, stops: list[str]) -> None:
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(service.tokenizer, stops)
        self.wait_s = service.config.limits.deadline_s + service.config.limits.hang_s + 5
        eos = service.tokenizer.eos_token_id
        self.eos = {eos} if eos is not None else set()
        self.completion = service.complete(
            prompt, lambda kind, value: loop.call_soon_threadsafe(
                self.events.put_nowait, (kind, value)),
            max_tokens, sampling, (eos,) if eos is not None else ())
        self.prompt_tokens = len(prompt)

    async def pieces(self) -> AsyncIterator[tuple[str, list[int], str | None]]:
        """(new text, new token ids, finish reason or None) as tokens come."""
        answered = False
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(self.events.get(), self.wait_s)
                except asyncio.TimeoutError:
                    error = ServiceError("no token within the deadline", 504)
                    self.completion.fail(error)  # counted as a timeout, then cancelled below
                    raise error from None
                if kind == "error":
                    raise value
                if kind == "token":
                    if self.text.stopped:
                        continue
                    if value in self.eos:  # its id is reported, its text is not the answer's
                        yield "", [value], None
                        continue
                    piece = self.text.add(value)
                    if self.text.stopped:
                        answered = True
                        yield piece, [value], "stop"
                        return
                    yield piece, [value], None
                else:
                    answered = True
                    yield self.text.flush(), [], "length" if value == "length" else "stop"
                    return
        finally:  # nothing more is read: the answer is whole, or its client went away
            self.completion.cancel(gone=not answered)


def routes(service: Service, body) -> list[Route]:
    """The completion routes; ``body(request, limit, bound)`` reads a bounded body."""
    model = service.graph.name

    async def handle(request: Request, chat: bool) -> Response:
        try:
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind not in ("application/json", ""):
                raise BadRequest(f"content type {kind[:80]!r}: send application/json", 415)
            limit = service.config.limits.max_body_bytes
            raw = await body(request, min(limit, MAX_BODY), "limits.max_body_bytes" if
                             limit <= MAX_BODY else "a completion's bound")
            try:
                doc = json.loads(raw)
            except (ValueError, RecursionError) as e:
                raise BadRequest(f"the body is not JSON: {str(e)[:200]}") from None
            prompt, max_tokens, sampling, stops, stream = parse(doc, service, chat)
            run = _Run(service, prompt, max_tokens, sampling, stops)
        except BadRequest as e:  # a bad field (400), or a body over the limit (413)
            service.count_outcome("invalid")
            return error_response(str(e), e.status)
        except ServiceError as e:
            return refused(e)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        created = int(time.time())
        if stream:
            return StreamingResponse(_sse(run, ident, created, model, chat),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, ids, reason = "", [], None
        watch = asyncio.create_task(_until_gone(request, run))
        try:
            async for piece, new, finish in run.pieces():
                text, ids, reason = text + piece, ids + new, finish or reason
        except ServiceError as e:
            return refused(e)
        finally:
            watch.cancel()
        choice = {"index": 0, "finish_reason": reason, "token_ids": ids}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else
                      {"text": text, "logprobs": None})
        return JSONResponse({
            "id": ident, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice],
            "usage": {"prompt_tokens": run.prompt_tokens, "completion_tokens": len(ids),
                      "total_tokens": run.prompt_tokens + len(ids)}})

    async def completions(request: Request) -> Response:
        return await handle(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await handle(request, chat=True)

    return [Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"])]


async def _until_gone(request: Request, run: _Run) -> None:
    """Cancel ``run`` when its client disconnects before the whole answer is ready (a
    streamed answer notices by its writes failing)."""
    await client_gone(request)
    run.completion.cancel(gone=True)


async def _sse(run: _Run, ident: str, created: int, model: str, chat: bool
               ) -> AsyncIterator[bytes]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: str, ids: list[int], finish: str | None, role: bool = False) -> bytes:
        choice = {"index": 0, "finish_reason": finish, "token_ids": ids}
        delta = {"role": "assistant", "content": piece} if role else {"content": piece}
        choice.update({"delta": delta} if chat else {"text": piece})
        doc = {"id": ident, "object": kind, "created": created, "model": model,
               "choices": [choice]}
        return f"data: {json.dumps(doc)}\n\n".encode()

    if chat:  # as OpenAI's stream does: the role first, in a delta of its own
        yield chunk("", [], None, role=True)
    try:
        async for piece, ids, finish in run.pieces():
            yield chunk(piece, ids, finish)
    except ServiceError as e:
        yield f"data: {json.dumps({'error': str(e), 'status': e.status})}\n\n".encode()
    yield b"data: [DONE]\n\n"
