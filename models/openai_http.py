"""A backend for any server that speaks the OpenAI HTTP API: Ollama, vLLM, llama.cpp, LM Studio.

Spec (``modelnet node --model …`` or the config file's ``models`` list)::

    openai:http://127.0.0.1:11434/v1                      every model its /v1/models lists
    openai:http://127.0.0.1:11434/v1#llama3.2             only this one
    openai:http://127.0.0.1:8000/v1#m1,nomic-embed=embed  several; ``=task`` sets a model's task
    openai:https://api.example.com/v1?key_env=EXAMPLE_KEY&timeout=60&context=8192#m1

Query options: ``key_env`` names the environment variable holding the API key (default
``MODELNET_OPENAI_API_KEY``; no key, no Authorization header), ``timeout`` the seconds the
server may stay silent while answering (default 120), ``context`` the context length to
declare when the server does not report one.

A model's task decides the endpoint: ``chat`` → ``/chat/completions`` (streamed: one
:class:`Chunk` per delta, then the full text), ``completion`` → ``/completions`` (streamed
likewise), ``embed`` → ``/embeddings`` (the vector). Without ``=task`` a model whose id
contains ``embed`` is an embedding model and every other one a chat model. Model ids are
published as network names: lowercased, characters outside ``[a-z0-9._:-]`` replaced by
``-`` (``Qwen/Qwen2.5-7B`` → ``qwen-qwen2.5-7b``); the upstream still gets its own id.

HTTP and protocol failures become typed errors: 400/413/422 → :class:`InvalidInput` (the
asker's input is at fault), 404 → :class:`UnknownModel`, 429 → :class:`UpstreamBusy`,
timeouts → :class:`UpstreamTimeout`, refused connections → :class:`UpstreamUnavailable`,
401/403/5xx and malformed JSON or event streams → :class:`UpstreamError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx
import trio

from .base import (
    CHAT,
    COMPLETION,
    EMBED,
    Backend,
    Chunk,
    InvalidInput,
    ModelError,
    ModelInfo,
    Output,
    UnknownModel,
    UpstreamBusy,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    check_param_names,
    check_text,
    decode_messages,
    float_param,
    int_param,
    str_param,
)

logger = logging.getLogger(__name__)

DEFAULT_KEY_ENV = "MODELNET_OPENAI_API_KEY"
DEFAULT_READ_TIMEOUT = 120.0  # a large model on a small machine can think long before its first token
CONNECT_TIMEOUT = 5.0
KEEPALIVE_SECONDS = 5.0  # idle pooled connections close after this
TASKS = (CHAT, COMPLETION, EMBED)
MAX_MODEL_NAME_CHARS = 58  # what a capability record accepts after "model:"
MAX_MODELS = 64  # what one capability record holds
MAX_BODY_BYTES = 16 << 20  # a JSON answer (model list, embeddings, error) we read at most
MAX_EVENT_BYTES = 1 << 20  # one server-sent event
MAX_EMBEDDING_DIMENSIONS = 65536
MAX_INPUT_BYTES = 1 << 20  # the network's own cap on a request's input
DEFAULT_INPUT_BYTES = 256 << 10  # when the context length is unknown
BYTES_PER_TOKEN = 8  # generous: English averages ~4 bytes a token, so the server decides near the edge
_NAME_CHARS = re.compile(r"[^a-z0-9._:-]")

# Parameters each task accepts, forwarded to the server under the same name.
_SAMPLING = ("temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty", "frequency_penalty")
PARAMS = {
    CHAT: (*_SAMPLING, "system", "input_format"),
    COMPLETION: _SAMPLING,
    EMBED: ("dimensions",),
}


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed ``openai:`` spec."""

    base_url: str  # ends in /v1 or wherever the API lives, without a trailing slash
    models: tuple[tuple[str, str | None], ...]  # (upstream id, declared task or None)
    key_env: str
    read_timeout: float
    context_length: int | None

    @classmethod
    def parse(cls, argument: str) -> "Spec":
        url = urllib.parse.urlsplit(argument)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ModelError(f"openai:<url> wants an http(s) URL such as http://127.0.0.1:11434/v1, not {argument!r}")
        options = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        unknown = sorted(set(options) - {"key_env", "timeout", "context"})
        if unknown:
            raise ModelError(f"unknown options {unknown} in {argument!r}; valid: key_env, timeout, context")
        key_env = options.get("key_env", [DEFAULT_KEY_ENV])[-1]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):
            raise ModelError(f"key_env must name an environment variable, not {key_env!r}")
        read_timeout = _positive("timeout", options.get("timeout", [DEFAULT_READ_TIMEOUT])[-1], float)
        context = options.get("context")
        context_length = None if context is None else int(_positive("context", context[-1], int))
        models: list[tuple[str, str | None]] = []
        for item in filter(None, (part.strip() for part in url.fragment.split(","))):
            model, _, task = item.partition("=")
            if task and task not in TASKS:
                raise ModelError(f"model {model!r}: task must be one of {', '.join(TASKS)}, not {task!r}")
            models.append((model, task or None))
        base = urllib.parse.urlunsplit((url.scheme, url.netloc, url.path.rstrip("/"), "", ""))
        return cls(base, tuple(models), key_env, read_timeout, context_length)


def _positive(name: str, text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        value = -1
    if not 0 < value < math.inf:
        raise ModelError(f"option {name} must be a positive {kind.__name__}, not {text!r}")
    return value


def network_name(model_id: str) -> str:
    """The name a model is published under (a valid ``model:<name>`` capability tag)."""
    return _NAME_CHARS.sub("-", model_id.strip().lower())[:MAX_MODEL_NAME_CHARS]


def default_task(model_id: str) -> str:
    return EMBED if "embed" in model_id.lower() else CHAT


@dataclasses.dataclass(frozen=True)
class _Served:
    upstream_id: str
    info: ModelInfo


class OpenAIBackend(Backend):
    """The models of one OpenAI-compatible server.

    Models named in the spec are served from construction on; without names, the models
    are those :meth:`discover` reads from ``/v1/models`` (call it, or :meth:`warm`, before
    the node is built). HTTP connections are pooled per trio run and close after
    ``KEEPALIVE_SECONDS`` idle, or at :meth:`aclose`.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        models: Sequence[str | tuple[str, str | None]] = (),
        *,
        api_key: str | None = None,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        context_length: int | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.label = _without_credentials(self.base_url)  # for logs and messages: never user:pass@
        self.api_key = api_key
        self.read_timeout = read_timeout
        self.context_length = context_length
        self._declared = [(m, None) if isinstance(m, str) else m for m in models]
        self._models: dict[str, _Served] = {}
        for model_id, task in self._declared:
            self._add(model_id, task or default_task(model_id), context_length)
        self._discovered = False
        self._client: httpx.AsyncClient | None = None
        self._client_run: object = None

    @classmethod
    def from_spec(cls, argument: str) -> "OpenAIBackend":
        spec = Spec.parse(argument)
        api_key = os.environ.get(spec.key_env)
        if api_key is None and spec.key_env != DEFAULT_KEY_ENV:
            raise ModelError(f"environment variable {spec.key_env} (key_env) is not set")
        return cls(spec.base_url, spec.models, api_key=api_key, read_timeout=spec.read_timeout, context_length=spec.context_length)

    # -- what we serve --------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        return [served.info for served in self._models.values()]

    def upstream_id(self, model: str) -> str:
        """The id the server knows ``model`` by."""
        return self._served(model).upstream_id

    def _served(self, model: str) -> _Served:
        return self._models[self.info(model).name]  # info() raises UnknownModel

    def _add(self, model_id: str, task: str, context_length: int | None) -> None:
        name = network_name(model_id)
        if not name or not name.strip("-"):
            logger.warning("%s: model id %r has no usable name; skipped", self.label, model_id)
            return
        if name in self._models and self._models[name].upstream_id != model_id:
            logger.warning("%s: models %r and %r share the name %r; serving the first", self.label, self._models[name].upstream_id, model_id, name)
            return
        if len(self._models) >= MAX_MODELS and name not in self._models:
            logger.warning("%s: more than %d models; %r skipped", self.label, MAX_MODELS, model_id)
            return
        input_bytes = DEFAULT_INPUT_BYTES if context_length is None else context_length * BYTES_PER_TOKEN
        description = {
            CHAT: "chat completions",
            COMPLETION: "text completions",
            EMBED: "embeddings",
        }[task]
        self._models[name] = _Served(
            model_id,
            ModelInfo(
                name=name,
                task=task,
                tags=("openai-api",),
                description=f"{model_id[:200]} ({description}) from an OpenAI-compatible server; params: {', '.join(PARAMS[task])}",
                max_input_bytes=max(1, min(MAX_INPUT_BYTES, input_bytes)),
                streaming=task != EMBED,
                context_length=context_length,
                max_output_tokens=context_length if task != EMBED else None,
            ),
        )

    async def discover(self) -> list[ModelInfo]:
        """Read ``/models``: serve every listed model, or, with models named, learn their context length.

        Raises :class:`UpstreamError` when the list cannot be read and no model was named.
        """
        try:
            body = await self._get_json("/models")
            listed = _model_entries(body)
        except UpstreamError as exc:
            if not self._declared:
                raise UpstreamError(f"cannot list the models of {self.label}: {exc}", exc.status) from None
            logger.warning("%s: cannot list models (%s); serving the declared ones", self.label, exc)
            return self.models()
        tasks = dict(self._declared)
        if self._declared:
            missing = [m for m in tasks if m not in listed]
            if missing:
                logger.warning("%s does not list %s; serving them anyway", self.label, missing)
            chosen = list(tasks)
        else:
            chosen = list(listed)
        self._models.clear()
        for model_id in chosen:
            context = self.context_length or listed.get(model_id)
            self._add(model_id, tasks.get(model_id) or default_task(model_id), context)
        self._discovered = True
        logger.info("%s serves %s", self.label, ", ".join(self._models) or "no models")
        return self.models()

    async def warm(self) -> None:
        if not self._discovered:
            await self.discover()

    async def aclose(self) -> None:
        """Close pooled connections (they also close by themselves when idle)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- running --------------------------------------------------------------------------

    async def run(self, model: str, text: str, params: Mapping[str, Any]) -> AsyncIterator[Chunk | Output]:
        served = self._served(model)
        info = served.info
        text = check_text(info, text)
        check_param_names(params, PARAMS[info.task])
        body: dict[str, Any] = {"model": served.upstream_id}
        if info.task == EMBED:
            if "dimensions" in params:
                body["dimensions"] = int_param(params, "dimensions", 0, 1, MAX_EMBEDDING_DIMENSIONS)
            body.update(input=text, encoding_format="float")
            yield Output(_embedding(await self._post_json("/embeddings", body)))
            return
        body.update(_sampling(params, info))
        if info.task == CHAT:
            messages = decode_messages(text, params)
            if "system" in params:
                messages.insert(0, {"role": "system", "content": str_param(params, "system", "")})
            body.update(messages=messages, stream=True)
            path, pick = "/chat/completions", _chat_delta
        else:
            body.update(prompt=text, stream=True)
            path, pick = "/completions", _completion_text
        pieces: list[str] = []
        async for event in self._post_events(path, body):
            piece = pick(event)
            if piece:
                pieces.append(piece)
                yield Chunk(piece)
        yield Output("".join(pieces))

    # -- HTTP -----------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        # One pool per trio run: a pooled connection belongs to the event loop that opened it.
        run = trio.lowlevel.current_root_task()
        if self._client is None or self._client_run is not run:
            headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            url = httpx.URL(self.base_url)
            # credentials in the URL go as basic auth (what httpx would do with them), so
            # that the URL httpx logs for every request does not carry them
            auth = httpx.BasicAuth(url.username, url.password) if url.username or url.password else None
            self._client = httpx.AsyncClient(
                base_url=self.label,
                auth=auth,
                headers=headers,
                timeout=httpx.Timeout(self.read_timeout, connect=CONNECT_TIMEOUT),
                limits=httpx.Limits(max_connections=64, keepalive_expiry=KEEPALIVE_SECONDS),
            )
            self._client_run = run
        return self._client

    async def _get_json(self, path: str) -> Any:
        async with _exchange(self._http(), "GET", path, None) as response:
            return _json(await _read_bounded(response), path)

    async def _post_json(self, path: str, body: Mapping[str, Any]) -> Any:
        async with _exchange(self._http(), "POST", path, body) as response:
            return _json(await _read_bounded(response), path)

    async def _post_events(self, path: str, body: Mapping[str, Any]) -> AsyncIterator[Any]:
        decoder = SSEDecoder()
        finished = False
        async with _exchange(self._http(), "POST", path, body) as response:
            async for data in response.aiter_bytes():
                for payload in decoder.feed(data):
                    if payload == "[DONE]":
                        return
                    event = _json(payload.encode(), path)
                    if isinstance(event, dict) and "error" in event:
                        raise UpstreamError(f"{path} failed mid-stream: {_error_message(event)}")
                    finished = finished or _finish_reason(event) is not None
                    yield event
        if not finished:  # some servers end without [DONE], but never without a finish reason
            raise UpstreamError(f"{path}: the event stream ended before the answer did")


@contextlib.asynccontextmanager
async def _exchange(client: httpx.AsyncClient, method: str, path: str, body: Mapping[str, Any] | None) -> AsyncIterator[httpx.Response]:
    """One HTTP request, its response open inside the block; httpx's errors come out typed."""
    try:
        response = await client.send(client.build_request(method, path, json=body), stream=True)
        try:
            if response.status_code >= 400:
                raise _status_error(path, response.status_code, await _read_bounded(response, 64 << 10))
            yield response  # errors while the caller reads the body pass through here too
        finally:
            await response.aclose()
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(f"{path}: the model server did not answer in time ({type(exc).__name__})") from None
    except httpx.TransportError as exc:
        raise UpstreamUnavailable(f"{path}: cannot reach the model server: {exc or type(exc).__name__}") from None


def _status_error(path: str, status: int, detail: bytes) -> ModelError:
    try:
        message = _error_message(json.loads(detail))
    except ValueError:
        message = detail.decode("utf-8", "replace").strip()[:300] or "no details"
    text = f"{path}: HTTP {status}: {message}"
    # The body is the model server's (it may echo our key or name internals): local text
    # only; a remote asker is told the kind of failure and the status (``public``).
    if status in (400, 413, 422):
        return InvalidInput(f"the model server refused the input: {text}", public=f"the model server refused the input (HTTP {status})")
    if status == 404:
        return UnknownModel(text, public="the model server does not know the model (HTTP 404)")
    if status == 429:
        return UpstreamBusy(text, status)
    if status in (401, 403):
        return UpstreamError(f"{text} (is the API key in the key_env variable right?)", status)
    return UpstreamError(text, status)


def _without_credentials(url: str) -> str:
    """``url`` without the ``user:pass@`` part it may carry."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _error_message(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"][:300]
    if isinstance(error, str):
        return error[:300]
    return json.dumps(body)[:300]


async def _read_bounded(response: httpx.Response, limit: int = MAX_BODY_BYTES) -> bytes:
    data = bytearray()
    async for piece in response.aiter_bytes():
        data += piece
        if len(data) > limit:
            raise UpstreamError(f"answer larger than {limit} bytes")
    return bytes(data)


def _json(data: bytes, path: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UpstreamError(f"{path}: malformed JSON from the model server: {exc}") from None


class SSEDecoder:
    """Server-sent events (the subset OpenAI-compatible servers use), as the ``data`` of each event.

    ``feed(bytes)`` returns the events completed by those bytes. Lines starting ``:`` are
    comments; ``event:``, ``id:`` and ``retry:`` are read and ignored; several ``data:``
    lines in one event are joined with newlines. An event longer than ``MAX_EVENT_BYTES``
    or bytes that are not UTF-8 raise :class:`UpstreamError`.
    """

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._buffer = bytearray()
        self._data: list[str] = []
        self._size = 0

    def feed(self, data: bytes) -> list[str]:
        self._buffer += data
        events: list[str] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            raw = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[: end + 1]
            self._line(raw, events)
        if len(self._buffer) + self._size > self.max_event_bytes:
            raise UpstreamError(f"a server-sent event exceeds {self.max_event_bytes} bytes")
        return events

    def _line(self, raw: bytes, events: list[str]) -> None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UpstreamError("the event stream is not UTF-8") from None
        if not line:
            if self._data:
                events.append("\n".join(self._data))
            self._data, self._size = [], 0
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if name == "data":
            value = value[1:] if value.startswith(" ") else value
            self._size += len(raw)
            if self._size > self.max_event_bytes:
                raise UpstreamError(f"a server-sent event exceeds {self.max_event_bytes} bytes")
            self._data.append(value)


def _choice(event: Any) -> Mapping[str, Any] | None:
    if not isinstance(event, dict):
        raise UpstreamError(f"a streamed event is not an object: {str(event)[:100]}")
    choices = event.get("choices")
    if choices is None or choices == []:
        return None  # e.g. the usage chunk
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise UpstreamError("a streamed event has malformed choices")
    return choices[0]


def _finish_reason(event: Any) -> str | None:
    choice = _choice(event)
    reason = None if choice is None else choice.get("finish_reason")
    return reason if isinstance(reason, str) else None


def _chat_delta(event: Any) -> str:
    choice = _choice(event)
    if choice is None:
        return ""
    delta = choice.get("delta") or {}
    content = delta.get("content") if isinstance(delta, dict) else None
    if content is not None and not isinstance(content, str):
        raise UpstreamError("a chat delta's content is not text")
    return content or ""


def _completion_text(event: Any) -> str:
    choice = _choice(event)
    text = None if choice is None else choice.get("text")
    if text is not None and not isinstance(text, str):
        raise UpstreamError("a completion chunk's text is not text")
    return text or ""


def _embedding(body: Any) -> list[float]:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise UpstreamError("/embeddings: the answer has no data")
    vector = data[0].get("embedding")
    if (
        not isinstance(vector, list)
        or not 0 < len(vector) <= MAX_EMBEDDING_DIMENSIONS
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in vector)
    ):
        raise UpstreamError("/embeddings: the embedding is not a list of finite numbers")
    return [float(x) for x in vector]


def _model_entries(body: Any) -> dict[str, int | None]:
    """Model ids from a ``/models`` answer, each with the context length it reports, if any."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise UpstreamError("/models: the answer has no data list")
    found: dict[str, int | None] = {}
    for entry in data:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        context = None
        meta = entry.get("meta")
        # vLLM: max_model_len; llama.cpp: meta.n_ctx_train; others: context_length / context_window.
        for value in (entry.get("max_model_len"), entry.get("context_length"), entry.get("context_window"), meta.get("n_ctx_train") if isinstance(meta, dict) else None):
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                context = value
                break
        found[entry["id"]] = context
    return found


def _sampling(params: Mapping[str, Any], info: ModelInfo) -> dict[str, Any]:
    """Checked sampling parameters, in the server's names."""
    body: dict[str, Any] = {}
    if "temperature" in params:
        body["temperature"] = float_param(params, "temperature", 0.0, 2.0)
    if "top_p" in params:
        body["top_p"] = float_param(params, "top_p", 0.0, 1.0)
    for name in ("presence_penalty", "frequency_penalty"):
        if name in params:
            body[name] = float_param(params, name, -2.0, 2.0)
    if "max_tokens" in params:
        body["max_tokens"] = int_param(params, "max_tokens", 0, 1, info.max_output_tokens or 1 << 20)
    if "seed" in params:
        body["seed"] = int_param(params, "seed", 0, -(1 << 63), (1 << 63) - 1)
    if "stop" in params:
        stop = str_param(params, "stop", "")
        if not stop:
            raise InvalidInput("parameter 'stop' must not be empty")
        body["stop"] = stop
    return body
