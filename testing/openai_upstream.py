"""A real OpenAI-compatible model server on loopback, for tests and benchmarks.

It stands in for Ollama, vLLM, llama.cpp's server or LM Studio: a Starlette app served by
Hypercorn's trio worker, speaking the OpenAI HTTP API closely enough that the official
``openai`` client and modelnet's ``openai:`` backend both talk to it unchanged:

- ``GET /v1/models``
- ``POST /v1/chat/completions`` (``stream: true`` answers with server-sent events in
  OpenAI's chunk format, ending ``data: [DONE]``; ``stream_options.include_usage`` adds the
  usage chunk)
- ``POST /v1/completions`` (streaming too)
- ``POST /v1/embeddings`` (``encoding_format`` ``float`` or ``base64``, ``dimensions``)

Answers are deterministic and computed from the input by a tiny rule-based model
(:func:`chat_reply`): arithmetic ``what is 2 + 3`` → ``5``, a greeting → a greeting,
anything else → ``You said: <the last user message>``, prefixed by ``[<system>]`` when a
system message is given. "Tokens" are whitespace-separated words; ``max_tokens`` cuts the
answer (``finish_reason: "length"``). Embeddings are modelnet's embedded feature-hashing
embedder, so they are real vectors that put similar texts close together.

Faults for tests are set on :attr:`Upstream.faults` while it runs: latency before each
answer, a delay between streamed chunks, an HTTP status to fail with (``500``, ``429``…)
for the next N requests or all of them, a hang (no answer until the server closes), and
malformed bodies (bad JSON, broken SSE). Every request is recorded in
:attr:`Upstream.requests` (path, Authorization header, JSON body).

    async with open_upstream(["tiny-chat", "tiny-embed"], api_key="sk-test") as upstream:
        upstream.base_url  # "http://127.0.0.1:<port>/v1"
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import re
import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from modelnet.models.embedded import hashed_embedding

DEFAULT_MODELS = ("tiny-chat", "tiny-embed")
CREATED = 1_700_000_000  # a fixed "created" time: answers are deterministic
MAX_DIMENSIONS = 4096
# The malformed bodies a fault can send, by fault name.
MALFORMED = ("json", "sse")


@dataclasses.dataclass
class Faults:
    """What the server does wrong; change it while the server runs."""

    latency: float = 0.0  # seconds before answering any request
    chunk_delay: float = 0.0  # seconds between streamed chunks
    status: int | None = None  # answer with this HTTP error status …
    times: int | None = None  # … for this many requests (None: every request)
    hang: bool = False  # accept the request and never answer (until the server closes)
    malformed: str | None = None  # "json": a 200 whose body is not JSON; "sse": a broken event stream
    models_too: bool = False  # whether the faults also hit GET /v1/models


@dataclasses.dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    authorization: str | None
    body: Any  # the parsed JSON body, or None


# -- the tiny deterministic model ---------------------------------------------------------

_SUM = re.compile(r"what is (-?\d+)\s*([-+*])\s*(-?\d+)", re.IGNORECASE)
_GREETING = re.compile(r"^\s*(hello|hi|hey)\b", re.IGNORECASE)


def chat_reply(messages: Sequence[Mapping[str, Any]]) -> str:
    """The full answer of the rule-based chat model to ``messages`` (before ``max_tokens``)."""
    system = " ".join(str(m.get("content", "")) for m in messages if m.get("role") == "system").strip()
    users = [str(m.get("content", "")) for m in messages if m.get("role") == "user"]
    last = users[-1].strip() if users else ""
    match = _SUM.search(last)
    if match:
        a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
        answer = str(a + b if op == "+" else a - b if op == "-" else a * b)
    elif _GREETING.match(last):
        answer = f"Hello! You sent {len(messages)} messages."
    else:
        answer = f"You said: {last}"
    return f"[{system}] {answer}" if system else answer


def completion_reply(prompt: str) -> str:
    """The completion model continues a prompt with its words in reverse order."""
    return " " + " ".join(reversed(prompt.split()))


def split_tokens(text: str) -> list[str]:
    """The server's "tokens": each word with the whitespace before it; they join back into ``text``."""
    return re.findall(r"\s*\S+", text) or [text]


def limit_tokens(text: str, max_tokens: int | None) -> tuple[list[str], str]:
    """``text``'s tokens cut to ``max_tokens``, and the finish reason."""
    tokens = split_tokens(text)
    if max_tokens is not None and len(tokens) > max_tokens:
        return tokens[:max_tokens], "length"
    return tokens, "stop"


def _count_tokens(text: str) -> int:
    return len(text.split())


# -- the server -----------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.response = JSONResponse(
            {"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status
        )


class Upstream:
    """The server's state: its models, key, faults and what it has seen."""

    def __init__(self, models: Sequence[str], api_key: str | None, context_length: int | None) -> None:
        self.models = list(models)
        self.api_key = api_key
        self.context_length = context_length
        self.faults = Faults()
        self.requests: list[Seen] = []
        self.base_url = ""  # set once bound: "http://127.0.0.1:<port>/v1"
        self.closing = trio.Event()
        self._ids = 0
        self.app = Starlette(
            routes=[
                Route("/v1/models", self._list_models, methods=["GET"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
            ]
        )

    # -- common request handling --

    async def _enter(self, request: Request, *, faults: bool = True) -> Any:
        """Record, authenticate, apply faults, parse the body: the body, or _Refused."""
        body: Any = None
        raw = await request.body()
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        self.requests.append(Seen(request.method, request.url.path, request.headers.get("authorization"), body))
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise _Refused(401, "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key")
        if faults:
            f = self.faults
            if f.latency:
                await trio.sleep(f.latency)
            if f.hang:
                await self.closing.wait()
                raise _Refused(503, "the server is shutting down", "server_error")
            if f.status is not None and (f.times is None or f.times > 0):
                if f.times is not None:
                    f.times -= 1
                kind = "rate_limit_exceeded" if f.status == 429 else "server_error" if f.status >= 500 else "invalid_request_error"
                raise _Refused(f.status, f"injected failure: HTTP {f.status}", kind)
        if request.method == "POST" and not isinstance(body, dict):
            raise _Refused(400, "the body must be a JSON object")
        return body

    def _model(self, body: Mapping[str, Any]) -> str:
        model = body.get("model")
        if not isinstance(model, str):
            raise _Refused(400, "you must provide a model parameter", param="model")
        if model not in self.models:
            raise _Refused(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return model

    def _next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self._ids:08d}"

    async def _handle(self, request: Request, answer: Any, *, faults: bool = True) -> Response:
        try:
            body = await self._enter(request, faults=faults)
            if self.faults.malformed == "json" and faults:
                return Response(b'{"id": "broken", "choices": [', media_type="application/json")
            return await answer(body)
        except _Refused as refused:
            return refused.response

    # -- endpoints --

    async def _list_models(self, request: Request) -> Response:
        async def answer(body: Any) -> Response:
            data = []
            for model in self.models:
                entry: dict[str, Any] = {"id": model, "object": "model", "created": CREATED, "owned_by": "modelnet-test"}
                if self.context_length is not None:
                    entry["max_model_len"] = self.context_length  # as vLLM reports it
                data.append(entry)
            return JSONResponse({"object": "list", "data": data})

        return await self._handle(request, answer, faults=self.faults.models_too)

    async def _chat(self, request: Request) -> Response:
        async def answer(body: Mapping[str, Any]) -> Response:
            model = self._model(body)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
            ):
                raise _Refused(400, "messages must be a non-empty list of {role, content} objects", param="messages")
            max_tokens = _max_tokens(body)
            tokens, finish = limit_tokens(chat_reply(messages), max_tokens)
            prompt_tokens = sum(_count_tokens(m["content"]) for m in messages)
            usage = _usage(prompt_tokens, len(tokens))
            ident = self._next_id("chatcmpl")
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return self._stream_chat(ident, model, tokens, finish, usage if include_usage else None)
            message = {"role": "assistant", "content": "".join(tokens)}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            return JSONResponse(
                {"id": ident, "object": "chat.completion", "created": CREATED, "model": model, "system_fingerprint": None, "choices": [choice], "usage": usage}
            )

        return await self._handle(request, answer)

    async def _completions(self, request: Request) -> Response:
        async def answer(body: Mapping[str, Any]) -> Response:
            model = self._model(body)
            prompt = body.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise _Refused(400, "prompt must be a non-empty string", param="prompt")
            tokens, finish = limit_tokens(completion_reply(prompt), _max_tokens(body))
            usage = _usage(_count_tokens(prompt), len(tokens))
            ident = self._next_id("cmpl")
            if body.get("stream"):
                return self._stream_completion(ident, model, tokens, finish)
            choice = {"text": "".join(tokens), "index": 0, "logprobs": None, "finish_reason": finish}
            return JSONResponse({"id": ident, "object": "text_completion", "created": CREATED, "model": model, "choices": [choice], "usage": usage})

        return await self._handle(request, answer)

    async def _embeddings(self, request: Request) -> Response:
        async def answer(body: Mapping[str, Any]) -> Response:
            model = self._model(body)
            inputs = body.get("input")
            if isinstance(inputs, str):
                inputs = [inputs]
            if not isinstance(inputs, list) or not inputs or not all(isinstance(text, str) and text for text in inputs):
                raise _Refused(400, "input must be a non-empty string or a list of them", param="input")
            dimensions = body.get("dimensions", 256)
            if not isinstance(dimensions, int) or isinstance(dimensions, bool) or not 1 <= dimensions <= MAX_DIMENSIONS:
                raise _Refused(400, f"dimensions must be an integer in 1..{MAX_DIMENSIONS}", param="dimensions")
            encoding = body.get("encoding_format", "float")
            if encoding not in ("float", "base64"):
                raise _Refused(400, "encoding_format must be float or base64", param="encoding_format")
            data = []
            for index, text in enumerate(inputs):
                vector = hashed_embedding(text, dimensions)
                if encoding == "base64":  # what the openai client asks for by default: float32, little-endian
                    encoded: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
                else:
                    encoded = vector
                data.append({"object": "embedding", "index": index, "embedding": encoded})
            tokens = sum(_count_tokens(text) for text in inputs)
            return JSONResponse({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

        return await self._handle(request, answer)

    # -- server-sent events --

    def _events(self, payloads: list[dict[str, Any]]) -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            for index, payload in enumerate(payloads):
                if index and self.faults.chunk_delay:
                    await trio.sleep(self.faults.chunk_delay)
                if self.faults.malformed == "sse" and index == 1:
                    yield b"data: {not json\n\n"
                    return
                yield b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    def _stream_chat(self, ident: str, model: str, tokens: list[str], finish: str, usage: dict[str, int] | None) -> StreamingResponse:
        def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {"id": ident, "object": "chat.completion.chunk", "created": CREATED, "model": model, "system_fingerprint": None, "choices": [choice]}

        payloads = [chunk({"role": "assistant", "content": ""}, None)]
        payloads += [chunk({"content": token}, None) for token in tokens]
        payloads.append(chunk({}, finish))
        if usage is not None:
            payloads.append({"id": ident, "object": "chat.completion.chunk", "created": CREATED, "model": model, "system_fingerprint": None, "choices": [], "usage": usage})
        return self._events(payloads)

    def _stream_completion(self, ident: str, model: str, tokens: list[str], finish: str) -> StreamingResponse:
        def chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
            return {"id": ident, "object": "text_completion", "created": CREATED, "model": model, "choices": [choice]}

        return self._events([chunk(token, None) for token in tokens] + [chunk("", finish)])


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _Refused(400, "max_tokens must be a positive integer", param="max_tokens")
    return value


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@contextlib.asynccontextmanager
async def open_upstream(
    models: Sequence[str] = DEFAULT_MODELS,
    *,
    api_key: str | None = None,
    context_length: int | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[Upstream]:
    """Serve an OpenAI-compatible upstream on ``host:port`` (0: a free port) until the block ends.

    ``context_length``, when given, is reported per model as vLLM does (``max_model_len``).
    """
    upstream = Upstream(models, api_key, context_length)
    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    config.graceful_timeout = 1.0  # a hung request is released by ``closing``; don't wait long
    config.accesslog = None
    config.errorlog = None
    config.loglevel = "WARNING"
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: hypercorn_serve(upstream.app, config, shutdown_trigger=stop.wait, task_status=task_status))
        upstream.base_url = binds[0].rstrip("/") + "/v1"
        try:
            yield upstream
        finally:
            upstream.closing.set()
            stop.set()
