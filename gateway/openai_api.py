"""OpenAI's HTTP API as data: request bodies parsed into checked values, answers rendered.

Pure: no I/O and no clock (ids and ``created`` times are parameters). Each parser takes the
raw body and returns a frozen value or raises :class:`ApiError` (400) naming the field, the
way OpenAI does. Fields OpenAI defines but the network cannot honour (``n`` > 1, tools,
log-probabilities) are refused rather than ignored; a few that only label or store a
request (``user``, ``metadata``…) are accepted and have no effect; anything else is an
unrecognised argument, as on OpenAI.

modelnet's own additions ride in one object, ``"modelnet": {"params": {...}, "timeout": s}``
(the official client sends it with ``extra_body=``): ``params`` go to the model verbatim
(e.g. ``{"sentences": 2}`` for a summariser), ``timeout`` bounds the routed request.
Answers carry ``"modelnet": {provider, model, capability, usage, receipt, …}`` beside the
OpenAI fields.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import struct
from collections.abc import Iterable, Mapping
from typing import Any

from modelnet.models.base import CHAT, COMPLETION, encode_messages

from .errors import invalid

Param = str | int | float | bool | None

# Tasks whose models generate text from a prompt: OpenAI's sampling parameters mean
# something to them. Other tasks (sentiment, keywords…) never see those parameters.
GENERATIVE_TASKS = frozenset({CHAT, COMPLETION})
MAX_TIMEOUT = 300.0  # seconds; a provider stops work after this anyway (Config.max_request_seconds)
MAX_EMBEDDING_INPUTS = 2048  # as OpenAI
MAX_VECTOR_DIMENSIONS = 65536
MAX_JSON_DEPTH_ERROR = "the request body nests too deeply"

# OpenAI field -> (request parameter, kind, low, high)
_SAMPLING: dict[str, tuple[str, type, float, float]] = {
    "temperature": ("temperature", float, 0.0, 2.0),
    "top_p": ("top_p", float, 0.0, 1.0),
    "max_tokens": ("max_tokens", int, 1, 2**31 - 1),
    "max_completion_tokens": ("max_tokens", int, 1, 2**31 - 1),
    "seed": ("seed", int, -(2**63), 2**63 - 1),
    "presence_penalty": ("presence_penalty", float, -2.0, 2.0),
    "frequency_penalty": ("frequency_penalty", float, -2.0, 2.0),
}
# Accepted, no effect on the answer.
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "stream_options", "logit_bias",
                      "parallel_tool_calls", "prompt_cache_key", "safety_identifier", "modalities"})
_COMMON = frozenset({"model", "stream", "n", "stop", "modelnet", *_SAMPLING, *_IGNORED})
_CHAT_FIELDS = _COMMON | {"messages", "tools", "tool_choice", "functions", "function_call", "logprobs",
                          "top_logprobs", "response_format"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "logprobs", "best_of"}
_EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user", "modelnet"})


# -- requests -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
    """The ``modelnet`` extension object."""

    params: Mapping[str, Param] = dataclasses.field(default_factory=dict)
    timeout: float | None = None


@dataclasses.dataclass(frozen=True)
class Message:
    role: str  # system, developer, user or assistant
    content: str


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]
    stream: bool
    sampling: Mapping[str, Param]  # OpenAI sampling fields, under modelnet parameter names
    options: Options

    def input_for(self, task: str | None) -> tuple[str, dict[str, Param]]:
        """The input text and parameters a model of ``task`` is asked with.

        A chat model gets the one user turn as text (system messages as its ``system``
        parameter), or the whole conversation as JSON messages (``input_format:
        messages``); a completion model gets the conversation as a transcript (``role:
        text`` paragraphs); any other model (a classifier) gets the last user message,
        which is what it should judge, and none of OpenAI's sampling parameters.
        """
        system = [m.content for m in self.messages if m.role in ("system", "developer")]
        turns = [m for m in self.messages if m.role not in ("system", "developer")]
        params: dict[str, Param] = dict(self.sampling) if task in GENERATIVE_TASKS else {}
        if task == CHAT and (len(turns) > 1 or turns[0].role != "user"):
            text, format_params = encode_messages([{"role": m.role, "content": m.content} for m in self.messages])
            params.update(format_params)
        elif task == CHAT:
            text = turns[0].content
            if system:
                params["system"] = "\n\n".join(system)
        elif task in GENERATIVE_TASKS:
            text = turns[0].content if len(turns) == 1 else "\n\n".join(f"{m.role}: {m.content}" for m in turns)
        else:
            users = [m for m in turns if m.role == "user"]
            text = (users or turns)[-1].content
        params.update(self.options.params)  # explicit modelnet params win
        return text, params


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str
    stream: bool
    sampling: Mapping[str, Param]
    options: Options

    def params_for(self, task: str | None) -> dict[str, Param]:
        params: dict[str, Param] = dict(self.sampling) if task in GENERATIVE_TASKS else {}
        params.update(self.options.params)
        return params


@dataclasses.dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str, ...]
    encoding_format: str  # "float" or "base64"
    dimensions: int | None
    options: Options


def decode_body(body: bytes) -> dict[str, Any]:
    """The JSON object in ``body``, or a 400."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise invalid(MAX_JSON_DEPTH_ERROR) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise invalid("the request body must be a JSON object")
    return value


def parse_chat(body: bytes) -> ChatRequest:
    fields = _fields(body, _CHAT_FIELDS)
    for name in ("tools", "functions"):
        if fields.get(name):
            raise invalid("tool and function calls are not supported by this gateway", name)
    if fields.get("tool_choice") not in (None, "none") or fields.get("function_call") not in (None, "none"):
        raise invalid("tool and function calls are not supported by this gateway", "tool_choice")
    if fields.get("logprobs") or fields.get("top_logprobs"):
        raise invalid("log-probabilities are not supported by this gateway", "logprobs")
    response_format = fields.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise invalid("only response_format {\"type\": \"text\"} is supported", "response_format")
    raw = fields.get("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid("'messages' must be a non-empty array", "messages")
    messages = tuple(_message(item, i) for i, item in enumerate(raw))
    if all(m.role in ("system", "developer") for m in messages):
        raise invalid("'messages' needs at least one user or assistant message", "messages")
    return ChatRequest(_model(fields), messages, _stream(fields), _sampling(fields), _options(fields))


def parse_completion(body: bytes) -> CompletionRequest:
    fields = _fields(body, _COMPLETION_FIELDS)
    if fields.get("echo"):
        raise invalid("echo is not supported by this gateway", "echo")
    if fields.get("suffix"):
        raise invalid("suffix is not supported by this gateway", "suffix")
    if fields.get("logprobs") is not None:
        raise invalid("log-probabilities are not supported by this gateway", "logprobs")
    if fields.get("best_of") not in (None, 1):
        raise invalid("best_of must be 1", "best_of")
    prompt = fields.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise invalid("'prompt' must be one string (batched and token prompts are not supported)", "prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise invalid("'prompt' must be a non-empty string", "prompt")
    return CompletionRequest(_model(fields), prompt, _stream(fields), _sampling(fields), _options(fields))


def parse_embeddings(body: bytes) -> EmbeddingRequest:
    fields = _fields(body, _EMBEDDING_FIELDS)
    raw = fields.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs:
        raise invalid("'input' must be a non-empty string or array of strings", "input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise invalid(f"'input' holds more than {MAX_EMBEDDING_INPUTS} items", "input")
    for item in inputs:
        if not isinstance(item, str):
            raise invalid("'input' must hold strings (token arrays are not supported)", "input")
        if not item.strip():
            raise invalid("'input' cannot contain an empty string", "input")
    encoding = fields.get("encoding_format", "float")
    if encoding is None:
        encoding = "float"
    if encoding not in ("float", "base64"):
        raise invalid("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dimensions = fields.get("dimensions")
    if dimensions is not None and not _is_int(dimensions, 1, MAX_VECTOR_DIMENSIONS):
        raise invalid(f"'dimensions' must be an integer in 1..{MAX_VECTOR_DIMENSIONS}", "dimensions")
    return EmbeddingRequest(_model(fields), tuple(inputs), encoding, dimensions, _options(fields))


def _fields(body: bytes, known: frozenset[str]) -> dict[str, Any]:
    fields = decode_body(body)
    unknown = sorted(name for name in fields if name not in known)
    if unknown:
        raise invalid(f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])
    if fields.get("n") not in (None, 1):
        raise invalid("n must be 1: one answer per request", "n")
    return fields


def _model(fields: Mapping[str, Any]) -> str:
    model = fields.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("'model' must be a non-empty string", "model")
    return model.strip()


def _stream(fields: Mapping[str, Any]) -> bool:
    stream = fields.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise invalid("'stream' must be a boolean", "stream")
    return stream


def _is_number(value: Any, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _sampling(fields: Mapping[str, Any]) -> dict[str, Param]:
    params: dict[str, Param] = {}
    for name, (target, kind, low, high) in _SAMPLING.items():
        value = fields.get(name)
        if value is None:
            continue
        ok = _is_int(value, int(low), int(high)) if kind is int else _is_number(value, low, high)
        if not ok:
            what = "an integer" if kind is int else "a number"
            raise invalid(f"'{name}' must be {what} in {low:g}..{high:g}", name)
        params[target] = float(value) if kind is float else value
    stop = fields.get("stop")
    if isinstance(stop, list) and len(stop) == 1:
        stop = stop[0]
    if isinstance(stop, str) and stop:
        params["stop"] = stop
    elif isinstance(stop, list) and stop:
        # Request parameters are scalars and backends take one stop sequence.
        raise invalid("'stop' takes one sequence through this gateway", "stop")
    elif stop not in (None, "", []):
        raise invalid("'stop' must be a string", "stop")
    return params


def _options(fields: Mapping[str, Any]) -> Options:
    raw = fields.get("modelnet")
    if raw is None:
        return Options()
    if not isinstance(raw, dict):
        raise invalid("'modelnet' must be an object", "modelnet")
    unknown = sorted(name for name in raw if name not in ("params", "timeout"))
    if unknown:
        raise invalid(f"unknown 'modelnet' fields: {', '.join(map(str, unknown))}", "modelnet")
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise invalid("'modelnet.params' must be an object", "modelnet.params")
    for name, value in params.items():
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise invalid(f"'modelnet.params.{name}' must be a string, number, boolean or null", "modelnet.params")
    timeout = raw.get("timeout")
    if timeout is not None and not (_is_number(timeout, 0.0, MAX_TIMEOUT) and timeout > 0):
        raise invalid(f"'modelnet.timeout' must be a number of seconds in (0, {MAX_TIMEOUT:g}]", "modelnet.timeout")
    return Options(dict(params), None if timeout is None else float(timeout))


def _message(item: Any, index: int) -> Message:
    param = f"messages[{index}]"
    if not isinstance(item, dict):
        raise invalid(f"{param} must be an object", param)
    role = item.get("role")
    if role in ("tool", "function"):
        raise invalid(f"{param}: tool and function messages are not supported by this gateway", param)
    if role not in ("system", "developer", "user", "assistant"):
        raise invalid(f"{param}.role must be system, developer, user or assistant", f"{param}.role")
    content = item.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{param}.content: only text parts are supported", f"{param}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise invalid(f"{param}.content must be a string or an array of text parts", f"{param}.content")
    return Message(role, content)


# -- answers --------------------------------------------------------------------------


def output_text(value: Any) -> str:
    """A model's output as the text of an answer: text as is, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON")


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default).encode("utf-8")


def chat_completion(*, id: str, created: int, model: str, content: str, extension: Mapping[str, Any]) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    return _answer(id, "chat.completion", created, model, choice, usage=True, extension=extension)


def chat_chunk(
    *, id: str, created: int, model: str, delta: Mapping[str, Any], finish_reason: str | None = None,
    extension: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    choice = {"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish_reason}
    return _answer(id, "chat.completion.chunk", created, model, choice, usage=False, extension=extension)


def text_completion(
    *, id: str, created: int, model: str, text: str, finish_reason: str | None = "stop",
    extension: Mapping[str, Any] | None = None, chunk: bool = False,
) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return _answer(id, "text_completion", created, model, choice, usage=not chunk, extension=extension)


def _answer(id: str, kind: str, created: int, model: str, choice: dict, *, usage: bool, extension) -> dict[str, Any]:
    answer: dict[str, Any] = {"id": id, "object": kind, "created": created, "model": model,
                              "system_fingerprint": None, "choices": [choice]}
    if usage:
        # Providers report bytes and compute time, not tokens: token counts would be a guess.
        # What we have is in the modelnet extension; OpenAI's usage stays null.
        answer["usage"] = None
    if extension is not None:
        answer["modelnet"] = dict(extension)
    return answer


def vector_of(value: Any) -> list[float] | None:
    """The embedding in a model's output (a list of finite numbers, or ``{"embedding": …}``)."""
    if isinstance(value, dict):
        value = value.get("embedding", value.get("vector"))
    if not isinstance(value, list) or not 0 < len(value) <= MAX_VECTOR_DIMENSIONS:
        return None
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value):
        return None
    return [float(x) for x in value]


def embedding_list(
    *, model: str, vectors: Iterable[list[float]], encoding_format: str, extension: Mapping[str, Any]
) -> dict[str, Any]:
    data = []
    for index, vector in enumerate(vectors):
        embedding: Any = vector
        if encoding_format == "base64":  # what the official client asks for by default
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {"object": "list", "data": data, "model": model, "usage": None, "modelnet": dict(extension)}


def model_list(entries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": [dict(entry, object="model") for entry in entries]}


def sse(data: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying JSON, as OpenAI frames them."""
    return b"data: " + dumps(data) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
