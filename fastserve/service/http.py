"""The HTTP front of a service, on starlette (routes) and uvicorn (the server).

=====================  ==================================================================
``POST /v1/infer``      ``{"inputs": {"x": [[...]]}}`` as JSON, or as msgpack with each
                        tensor ``{"dtype", "shape", "data": <raw bytes>}`` (large tensors);
                        the answer ``{"outputs": {...}}`` comes in the request's format
``GET /healthz``        the process is alive
``GET /readyz``         200 when every wanted replica is ready and work is admitted, else 503
``GET /v1/status``      plan, replicas, ranks, queue, requests, restarts (JSON)
``GET /metrics``        Prometheus text
``POST /v1/scale``      ``{"replicas": N}``: N replicas, or N replicas' worth when the
                        service widens stages (``replicas.widen``)   (token)
``POST /v1/drain``      admit nothing more, answer what was admitted   (token)
``POST /v1/stop``       drain, then stop the server and the ranks        (token)
=====================  ==================================================================

Every body is bounded in size (``limits.max_body_bytes``) and in time (headers within
``limits.header_timeout_s``, the body within ``limits.body_timeout_s`` after them), and every
field checked before use: a malformed request gets a 4xx naming what is wrong, never a 500, and
nothing is unpickled. A request whose client goes away is withdrawn: if no replica has taken it
yet, it is never run. Management routes need ``Authorization: Bearer TOKEN``; without a token
file they are off.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import math
from functools import partial
from typing import Any, Callable

import msgpack
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from fastserve.errors import InputsError, ServiceError
from fastserve.graph.dtypes import torch_dtype
from fastserve.service.connections import guarded_protocol
from fastserve.service.service import Service

MSGPACK = "application/msgpack"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
MAX_DIMS = 8
INLINE_PARSE_BYTES = 64 << 10  # larger bodies are parsed in a thread, off the event loop


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        self.status = status
        super().__init__(message)


def error_response(message: str, status: int) -> JSONResponse:
    """The JSON error every route answers with."""
    return refused(ServiceError(message, status))


def refused(e: ServiceError) -> JSONResponse:
    """``e`` as an answer: its status, its headers (Retry-After for a 503). A message that
    quotes a client's text may hold lone surrogates (JSON's ``\\ud800``), which UTF-8 cannot
    carry: they are written as escapes."""
    message = str(e).encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": message}, status_code=e.status, headers=e.headers)


async def _body(request: Request, limit: int, bound: str = "limits.max_body_bytes", *,
                timeout_s: float) -> bytes:
    """The request body, refused (413) past ``limit`` bytes without reading the rest;
    ``bound`` names where the limit comes from. A body that takes longer than ``timeout_s``
    to arrive is refused (408): a client sending a byte now and then would hold its
    connection, and its part of the server, for ever."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BadRequest(f"the body is larger than {limit} bytes ({bound})", 413)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BadRequest(f"the body is larger than {limit} bytes ({bound})", 413)
                chunks.append(chunk)
    except TimeoutError:
        raise BadRequest(f"the body did not arrive within {timeout_s:g} s "
                         f"(limits.body_timeout_s)", 408) from None
    return b"".join(chunks)


async def client_gone(request: Request) -> None:
    """Return when the client of ``request``, whose body has been read, disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _inputs(kind: str, body: bytes, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The input tensors of a body of content type ``kind`` (msgpack, else JSON)."""
    if kind == MSGPACK:
        try:
            # the body is already bounded by max_body_bytes
            doc = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise BadRequest(f"the body is not msgpack: {type(e).__name__}") from None
        return _inputs_msgpack(doc, dtypes)
    try:
        doc = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"the body is not JSON: {str(e)[:200]}") from None
    return _inputs_json(doc, dtypes)


def _inputs_json(doc: Any, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    inputs = _inputs_map(doc)
    out = {}
    for name, value in inputs.items():
        dtype = _dtype_of(name, dtypes)
        if not isinstance(value, list):
            raise BadRequest(f"input '{name}': expected a nested list of numbers, got "
                             f"{type(value).__name__}")
        try:
            t = torch.tensor(value, dtype=dtype)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise BadRequest(f"input '{name}': not a rectangular list of numbers "
                             f"({str(e).splitlines()[0][:200]})") from None
        # rectangular (torch.tensor checked it), so t.dim() - 1 flattenings reach the values;
        # type() of each, not isinstance: a bool is an int to isinstance, and not a number here
        flat = value
        for _ in range(t.dim() - 1):
            flat = list(itertools.chain.from_iterable(flat))
        kinds = set(map(type, flat))
        allowed, what = ({bool}, "true or false") if dtype == torch.bool else \
            ({int, float}, "numbers") if dtype.is_floating_point else ({int}, "integers")
        if not kinds <= allowed:
            raise BadRequest(f"input '{name}' is {str(dtype).removeprefix('torch.')}: its "
                             f"values must be {what}, not "
                             f"{', '.join(sorted(k.__name__ for k in kinds - allowed))}")
        # torch wraps integers into a narrow type (-1 becomes 255 in uint8)
        if allowed == {int} and flat:
            info = torch.iinfo(dtype)
            if min(flat) < info.min or max(flat) > info.max:
                raise BadRequest(f"input '{name}' holds a value beyond the range of "
                                 f"{str(dtype).removeprefix('torch.')}")
        # JSON has no NaN or Infinity (refused while parsing), but 1e400 reads as inf and 1e39
        # overflows float32
        if dtype.is_floating_point and flat and \
                max(map(abs, flat)) > torch.finfo(dtype).max:
            raise BadRequest(f"input '{name}' holds a value beyond the range of "
                             f"{str(dtype).removeprefix('torch.')}")
        out[name] = t
    return out


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _inputs_msgpack(doc: Any, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    inputs = _inputs_map(doc)
    out = {}
    for name, value in inputs.items():
        dtype = _dtype_of(name, dtypes)
        if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
            raise BadRequest(f"input '{name}': expected a map with exactly dtype, shape and "
                             f"data")
        want = str(dtype).removeprefix("torch.")
        if value["dtype"] != want:
            raise BadRequest(f"input '{name}': dtype {str(value['dtype'])[:40]!r}, the graph "
                             f"takes {want}")
        shape = value["shape"]
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 31
                for d in shape):
            raise BadRequest(f"input '{name}': shape must be a list of at most {MAX_DIMS} "
                             f"sizes from 0 to 2^31")
        data = value["data"]
        size = dtype.itemsize * math.prod(shape)
        if not isinstance(data, bytes) or len(data) != size:
            raise BadRequest(f"input '{name}': data must be {size} raw bytes for shape "
                             f"{shape}, got {len(data) if isinstance(data, bytes) else 'no bytes'}")
        if dtype == torch.bool and data.translate(None, b"\x00\x01"):
            raise BadRequest(f"input '{name}': bool data must be bytes 0 and 1")
        t = torch.frombuffer(bytearray(data), dtype=dtype) if size else \
            torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape)
    return out


def _inputs_map(doc: Any) -> dict:
    if not isinstance(doc, dict) or set(doc) != {"inputs"} or not isinstance(doc["inputs"], dict):
        raise BadRequest('expected {"inputs": {name: tensor, ...}}')
    if not all(isinstance(k, str) for k in doc["inputs"]):
        raise BadRequest("input names must be strings")
    return doc["inputs"]


def _dtype_of(name: str, dtypes: dict[str, torch.dtype]) -> torch.dtype:
    if name not in dtypes:
        raise BadRequest(f"'{name[:80]}' is not an input of this graph (its inputs: "
                         f"{', '.join(dtypes)})")
    return dtypes[name]


def _pack(outputs: dict[str, torch.Tensor]) -> bytes:
    return msgpack.packb({"outputs": {
        k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""}
        for k, t in outputs.items()}})


def make_app(service: Service, token: str | None = None,
             on_stop: Callable[[], None] = lambda: None) -> Starlette:
    """The ASGI app over ``service``. ``on_stop`` is called after ``POST /v1/stop`` has
    drained the service (the server uses it to exit)."""
    dtypes = {i.name: torch_dtype(i.dtype) for i in service.graph.spec.inputs}
    limit = service.config.limits.max_body_bytes
    wait_s = service.config.limits.deadline_s + 5.0
    read_body = partial(_body, timeout_s=service.config.limits.body_timeout_s)

    # a large body is parsed off the event loop (a 60 MB JSON body takes seconds, which would
    # stall every other route), one at a time (parsing JSON takes many times its bytes)
    parsing = asyncio.Semaphore(1)

    async def parse_apart(kind: str, body: bytes) -> dict[str, torch.Tensor]:
        await parsing.acquire()
        work = asyncio.ensure_future(asyncio.to_thread(_inputs, kind, body, dtypes))

        def parsed(f: asyncio.Future) -> None:
            # the slot is the thread's: a request cancelled meanwhile does not free it early
            parsing.release()
            if not f.cancelled():
                f.exception()  # (retrieved: its request may be gone)

        work.add_done_callback(parsed)
        return await asyncio.shield(work)

    async def answer(request: Request, future) -> dict[str, torch.Tensor] | Response:
        """The outputs of ``future``, or the answer to give instead: 504 past the wait, and
        nothing anyone reads if the client went away (the request is withdrawn)."""
        waiting = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait((waiting, gone), timeout=wait_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if waiting.done():
            return waiting.result()  # (a ServiceError is the caller's to answer)
        if gone.done() and not gone.cancelled():
            if not service.withdraw(future, "cancelled"):  # answered just now: nobody reads it
                waiting.add_done_callback(lambda f: f.cancelled() or f.exception())
            return error_response("the client went away", 499)
        if not service.withdraw(future, "timeout"):  # its answer came just now
            return await waiting
        return error_response("no answer within the deadline", 504)

    async def infer(request: Request) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            service.admits()  # refusing before the body is read is what keeps overload cheap
            if kind not in (MSGPACK, "application/json", ""):
                raise BadRequest(f"content type {kind[:80]!r}: send application/json or "
                                 f"{MSGPACK}", 415)
            body = await read_body(request, limit)
            inputs = _inputs(kind, body, dtypes) if len(body) <= INLINE_PARSE_BYTES else \
                await parse_apart(kind, body)
            future = service.submit(inputs)
        except BadRequest as e:
            service.count_outcome("invalid")
            return error_response(str(e), e.status)
        except InputsError as e:
            return error_response(e.reason if not e.key else f"input '{e.key}': {e.reason}", 400)
        except ServiceError as e:
            return refused(e)
        try:
            outputs = await answer(request, future)
        except ServiceError as e:
            return refused(e)
        if isinstance(outputs, Response):
            return outputs
        if kind == MSGPACK or MSGPACK in request.headers.get("accept", ""):
            return Response(_pack(outputs), media_type=MSGPACK)
        try:  # JSON has no NaN or infinity: starlette refuses to write them (allow_nan=False)
            return JSONResponse({"outputs": {k: v.tolist() for k, v in outputs.items()}})
        except ValueError:  # (the model's answer to these inputs: not the service's fault)
            return error_response(f"the outputs hold NaN or infinity, which JSON cannot carry: ask "
                                  f"for them as {MSGPACK} (an Accept header)", 422)

    def authorized(request: Request) -> Response | None:
        if token is None:
            return error_response("management is off: start the service with a token file "
                          "(--token-file)", 403)
        # the scheme is case-insensitive (RFC 7235); the token is compared in constant time
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            return error_response("a valid 'Authorization: Bearer TOKEN' header is required", 401)
        return None

    async def scale(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        try:
            doc = json.loads(await read_body(request, 4096, "a scale request's bound"))
        except BadRequest as e:
            return error_response(str(e), e.status)
        except (ValueError, RecursionError):
            return error_response('expected {"replicas": N}', 400)
        n = doc.get("replicas") if isinstance(doc, dict) else None
        if not isinstance(n, int) or isinstance(n, bool):
            return error_response('expected {"replicas": N} with an integer N', 400)
        try:
            await asyncio.to_thread(service.scale, n, "manual")
        except ServiceError as e:
            return refused(e)
        return JSONResponse({"replicas": n})

    # the one drain every drain and stop call waits for: a second call answers when the
    # service has drained, not while the first call's drain still runs
    draining: list[asyncio.Future] = []

    async def drained() -> None:
        if not draining:
            draining.append(asyncio.ensure_future(asyncio.to_thread(service.stop, True)))
        try:
            await asyncio.shield(draining[0])
        except Exception:
            if draining and draining[0].done():  # a failed drain is tried again by the next
                draining.clear()
            raise

    async def drain(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        await drained()
        return JSONResponse({"drained": True, "requests": dict(service.outcomes)})

    async def stop(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        await drained()
        on_stop()
        return JSONResponse({"stopped": True, "requests": dict(service.outcomes)})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"alive": True})

    async def readyz(request: Request) -> Response:
        ready = service.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def status(request: Request) -> Response:
        return JSONResponse(service.status())

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(service.metrics.render(), media_type=PROMETHEUS)

    extra = []
    if service.generating:
        from fastserve.service.openai import routes as completion_routes

        extra = completion_routes(service, read_body)
    return Starlette(routes=[
        *extra,
        Route("/v1/infer", infer, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/v1/status", status, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/scale", scale, methods=["POST"]),
        Route("/v1/drain", drain, methods=["POST"]),
        Route("/v1/stop", stop, methods=["POST"]),
    ])


def serve_http(service: Service, host: str, port: int, token: str | None,
               ready: Callable[[str], None] = lambda url: None) -> None:
    """Serve ``service`` over HTTP until ``POST /v1/stop`` or a signal."""
    import uvicorn

    server: uvicorn.Server | None = None

    def exit_server() -> None:
        if server is not None:
            server.should_exit = True

    app = make_app(service, token, on_stop=exit_server)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=5,
                            http=guarded_protocol(service.config.limits.header_timeout_s,
                                                  service.config.limits.body_timeout_s),
                            # longer than clients keep idle connections in their pools: a
                            # POST on a connection the server just closed is not retried
                            timeout_keep_alive=75)
    server = uvicorn.Server(config)
    original = server.startup

    async def startup(sockets=None) -> None:
        await original(sockets)
        bound = server.servers[0].sockets[0].getsockname() if server.servers else (host, port)
        ready(f"http://{host}:{bound[1]}")

    server.startup = startup
    server.run()
