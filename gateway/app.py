"""The gateway: a Starlette app over a running :class:`~modelnet.p2p.node.Node`, served by
Hypercorn's trio worker in the caller's nursery.

    gateway = Gateway(node, Config(port=8080), plans={"triage": plan_tree, "custom": run_custom})
    url = await nursery.start(gateway.serve)     # "http://127.0.0.1:8080"

Each request names a model (see :mod:`.catalog`): a model this node serves itself runs
here (a prompt never leaves the machine when it need not); anything else is routed through
``Node.ask``, which finds, ranks and fails over between providers. A streamed answer
starts only once the first chunk (or the whole answer) is in, so a request that fails
before that gets a proper HTTP status; one that fails mid-stream ends with an error event,
as OpenAI's do. A registered plan is a model too (see :mod:`.plans`: what it streams,
the provenance it carries). :mod:`.guard` keeps browsers out, bounds bodies and concurrent
requests, and cancels a request's work when its client disconnects, streamed or not.

Authority: a gateway serves clients it cannot identify, so by default it lends them none of
its node's. A model this node serves under a non-public access policy is neither listed nor
served, and requests are routed as an anonymous peer's (public records only, no membership
certificate presented). ``Config.serve_private`` opts in to both: every client then acts
with the node's authority.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from modelnet.errors import ModelNetError, sole_error
from modelnet.models.base import Chunk as ModelChunk
from modelnet.models.base import InvalidInput, ModelError
from modelnet.models.base import Output as ModelOutput
from modelnet.p2p.node import Answer, Node, NoProvider, RequestFailed
from modelnet.p2p.plans import PlanFailed, execute
from modelnet.p2p.serving import ServedModel
from modelnet.protocols import plan as plan_protocol
from modelnet.protocols import reason
from modelnet.protocols.errors import LocalProtocolError

from . import openai_api as api
from . import plans as gateway_plans
from .catalog import Catalog, Target
from .config import Config
from .errors import ApiError, ListenError, invalid
from .guard import Guard

logger = logging.getLogger(__name__)

OnChunk = Callable[[str], None]
# A plan runner: (input text, on_chunk) -> (output, chunks), for composition written in
# code. A plan tree (modelnet.protocols.plan, e.g. from a plan file) is registered as is:
# the gateway executes it and answers with its trace.
PlanRunner = Callable[[str, OnChunk], Awaitable[tuple[Any, Sequence[str]]]]
Plan = plan_protocol.PlanNode | PlanRunner


@dataclasses.dataclass(frozen=True)
class Routed:
    """One answered request, whoever answered it."""

    output: Any
    chunks: tuple[str, ...]
    model: str  # the model (or plan) that answered
    extension: dict[str, Any]  # the "modelnet" object of the answer


class Gateway:
    def __init__(
        self,
        node: Node,
        config: Config = Config(),
        *,
        plans: Mapping[str, Plan] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.config = config
        self.plans = dict(plans or {})
        for tree in self.plans.values():
            if gateway_plans.is_plan(tree):
                plan_protocol.validate(tree)  # InvalidPlan now, not at the first request
        self.wall_clock = wall_clock
        self.catalog = Catalog(
            node, self.plans, tags=config.discovery_tags, ttl=config.catalog_ttl, lookup_timeout=config.lookup_timeout,
            private=config.serve_private,
        )  # fmt: skip
        self.url: str | None = None  # once serving
        self.app = Guard(Starlette(
            routes=[
                Route("/v1/models", self._endpoint(self._models), methods=["GET"]),
                Route("/v1/models/{model:path}", self._endpoint(self._model), methods=["GET"]),
                Route("/v1/chat/completions", self._endpoint(self._chat), methods=["POST"]),
                Route("/v1/completions", self._endpoint(self._completion), methods=["POST"]),
                Route("/v1/embeddings", self._endpoint(self._embeddings), methods=["POST"]),
            ],
            exception_handlers={HTTPException: _http_exception},
        ), config)  # fmt: skip

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve HTTP until cancelled; started with the URL it listens on."""
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        http = hypercorn.config.Config()
        http.bind = [f"{host}:{self.config.port}"]
        http.accesslog = None
        http.errorlog = logging.getLogger("modelnet.gateway.http")
        http.graceful_timeout = 1.0
        bound = False
        try:
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(functools.partial(hypercorn.trio.serve, self.app, http))
                bound = True
                self.url = binds[0]
                logger.info("gateway listening on %s", self.url)
                task_status.started(self.url)
        except BaseExceptionGroup as group:
            error = sole_error(group)
            if isinstance(error, OSError) and not bound:  # hypercorn binds inside nurseries of its own
                raise ListenError(f"cannot listen on {host}:{self.config.port}: {error.strerror or error}") from None
            raise

    # -- endpoints --------------------------------------------------------------------

    def _endpoint(self, handler: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Any]]:
        async def endpoint(request: Request) -> Any:
            try:
                self._authorize(request)
                return await handler(request)
            except ApiError as exc:
                return error_response(exc)
            except Exception:  # top of a request: log it, answer 500, keep serving
                logger.exception("%s %s failed", request.method, request.url.path)
                return error_response(ApiError(500, "the gateway failed to answer; see its log"))

        return endpoint

    def _authorize(self, request: Request) -> None:
        if not self.config.api_keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "You didn't provide an API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not self.config.key_matches(key.strip()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    async def _models(self, request: Request) -> Response:
        return json_response(api.model_list(await self.catalog.entries()))

    async def _model(self, request: Request) -> Response:
        name = request.path_params["model"]
        for entry in await self.catalog.entries():
            if entry["id"] == name:
                return json_response(dict(entry, object="model"))
        await self.catalog.resolve(name)  # found by name though not listed, or a 404
        return json_response({"id": name, "object": "model", "created": 0, "owned_by": "modelnet"})

    async def _chat(self, request: Request) -> Any:
        chat = api.parse_chat(await self._body(request))
        target = await self.catalog.resolve(chat.model)
        text, params = chat.input_for(target.task)
        return await self._generate(target, text, params, chat, _ChatEvents)

    async def _completion(self, request: Request) -> Any:
        completion = api.parse_completion(await self._body(request))
        target = await self.catalog.resolve(completion.model)
        return await self._generate(target, completion.prompt, completion.params_for(target.task), completion, _CompletionEvents)

    async def _generate(self, target: Target, text: str, params: dict[str, Any], request, events: type) -> Any:
        """A chat or text completion: streamed as events, or whole."""
        run = functools.partial(self.route, target, text, params, request.options.timeout)
        answer = events(events.PREFIX + secrets.token_hex(12), int(self.wall_clock()), target.id)
        if request.stream:
            return EventStream(run, answer)
        return json_response(answer.whole(await run()))

    async def _embeddings(self, request: Request) -> Response:
        embedding = api.parse_embeddings(await self._body(request))
        target = await self.catalog.resolve(embedding.model)
        params = dict(embedding.options.params)
        results: list[Routed | None] = [None] * len(embedding.inputs)
        failure: list[ApiError] = []
        limiter = trio.CapacityLimiter(self.config.max_parallel_embeddings)

        async def embed(index: int, text: str, cancel_scope: trio.CancelScope) -> None:
            async with limiter:
                try:
                    results[index] = await self.route(target, text, params, embedding.options.timeout)
                except ApiError as exc:  # the first failure fails the request; stop the rest
                    failure.append(exc)
                    cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for index, text in enumerate(embedding.inputs):
                nursery.start_soon(embed, index, text, nursery.cancel_scope)
        if failure:
            raise failure[0]
        vectors = []
        for routed in results:
            vector = api.vector_of(routed.output)
            if vector is None:
                raise invalid(f"{routed.model} does not produce embeddings (it answered {type(routed.output).__name__})", "model")
            if embedding.dimensions is not None and embedding.dimensions != len(vector):
                raise invalid(f"{routed.model} produces {len(vector)} dimensions, not {embedding.dimensions}", "dimensions")
            vectors.append(vector)
        extension = {"answers": [routed.extension for routed in results]}
        return json_response(
            api.embedding_list(
                model=results[0].model, vectors=vectors, encoding_format=embedding.encoding_format, extension=extension
            )
        )

    async def _body(self, request: Request) -> bytes:
        return await request.body()  # the guard read it whole, within max_body_bytes

    # -- routing ----------------------------------------------------------------------

    async def route(
        self,
        target: Target,
        text: str,
        params: Mapping[str, Any],
        timeout: float | None = None,
        on_chunk: OnChunk | None = None,
    ) -> Routed:
        """Answer one request for ``target``: a plan, a model of this node, or the network.

        Raises :class:`ApiError` with the status OpenAI clients expect.
        """
        budget = timeout or self.config.request_timeout or self.node.config.request_timeout
        params = dict(params)
        _check_request(target, text, params)
        if target.kind == "plan" and gateway_plans.is_plan(self.plans[target.id]):
            return await self._execute_plan(target, text, params, timeout or self.config.request_timeout)
        deadline = trio.current_time() + budget
        try:
            if target.kind == "plan":
                with trio.fail_at(deadline):
                    return await self._run_plan(target, text, on_chunk)
            local = [served for served in self.node.server.matching(target.capability, target.model) if self.catalog.usable(served)]
            if local:
                with trio.fail_at(deadline):
                    return await self._run_local(local[0], target, text, params, on_chunk)
            answer = await self._ask(target, text, params, budget, on_chunk)
        except trio.TooSlowError:
            raise ApiError(504, f"no answer within the deadline of {budget:g} s", code="deadline_exceeded") from None
        except NoProvider as exc:
            raise ApiError(503, f"{exc}: no node of the network serves it now", code="no_provider") from None
        except RequestFailed as exc:
            raise _failure(exc, trio.current_time() >= deadline) from None
        except ModelNetError as exc:  # a plan's own failure
            raise ApiError(502, f"{target.id} failed: {exc}", code="provider_failed") from None
        return Routed(answer.output, answer.chunks, answer.model, _answer_extension(answer))

    async def _ask(self, target: Target, text: str, params: dict[str, Any], budget: float, on_chunk: OnChunk | None) -> Answer:
        """Route through the network: as this node (``serve_private``), or anonymously."""
        sink = None if on_chunk is None else (lambda peer, chunk: on_chunk(chunk))
        return await self.node.ask(
            target.capability,
            text,
            params,
            model=target.model,
            timeout=budget,
            on_chunk=sink,
            anonymous=not self.config.serve_private,
        )

    async def _execute_plan(self, target: Target, text: str, params: Mapping[str, Any], timeout: float | None) -> Routed:
        """Run a plan tree through the node; the answer carries its trace."""
        tree = self.plans[target.id]
        if params:
            raise invalid(f"{target.id} is a plan: its steps carry their own params", "modelnet.params")
        budget = timeout or self.node.config.request_timeout * plan_protocol.critical_length(tree)
        started = trio.current_time()
        try:
            result = await execute(self.node, tree, text, timeout=budget, anonymous=not self.config.serve_private)
        except PlanFailed as exc:
            extension = gateway_plans.extension(target.id, exc.trace, exc.decisions, trio.current_time() - started)
            if trio.current_time() >= started + budget:
                raise ApiError(504, f"{target.id}: {exc}", code="deadline_exceeded", extension=extension) from None
            raise ApiError(502, f"{target.id} failed: {exc}", code="plan_failed", extension=extension) from None
        extension = gateway_plans.extension(target.id, result.trace, result.decisions, result.elapsed)
        return Routed(result.output, (), target.id, extension)

    async def _run_plan(self, target: Target, text: str, on_chunk: OnChunk | None) -> Routed:
        started = trio.current_time()
        output, chunks = await self.plans[target.id](text, on_chunk or (lambda chunk: None))
        extension = {"plan": target.id, "elapsed_ms": (trio.current_time() - started) * 1000}
        return Routed(output, tuple(chunks), target.id, extension)

    async def _run_local(
        self, served: ServedModel, target: Target, text: str, params: Mapping[str, Any], on_chunk: OnChunk | None
    ) -> Routed:
        name = served.info.name
        started = trio.current_time()
        chunks: list[str] = []
        output: Any = None
        try:
            async with contextlib.aclosing(served.backend.run(name, text, params)) as items:
                async for item in items:
                    if isinstance(item, ModelChunk):
                        chunks.append(item.text)
                        if on_chunk is not None:
                            on_chunk(item.text)
                    elif isinstance(item, ModelOutput):
                        output = item.value
        except InvalidInput as exc:
            raise invalid(f"{name}: {exc.public}", code="invalid_input") from None
        except ModelError as exc:  # HTTP clients get what a remote asker would: no upstream error bodies
            logger.warning("local model %s failed: %s", name, exc)
            raise ApiError(502, f"{name} failed: {exc.public}", code="provider_failed") from None
        usage = {
            "input_bytes": len(text.encode()),
            "output_bytes": len(reason.encode_output(output)),
            "compute_ms": (trio.current_time() - started) * 1000,
        }
        extension = {
            "provider": str(self.node.peer_id), "model": name, "capability": target.capability, "local": True,
            "usage": usage, "receipt": None, "elapsed_ms": usage["compute_ms"], "failed_attempts": 0,
        }  # fmt: skip
        return Routed(output, tuple(chunks), name, extension)


def _check_request(target: Target, text: str, params: dict[str, Any]) -> None:
    """The checks the reason protocol would make, as a 400 now rather than a failed route."""
    try:
        reason.Request(
            request_id=bytes(reason.REQUEST_ID_BYTES), capability=target.capability or "plan", input=text,
            params=params, budget=0.0, hop_limit=0, model=target.model,
        )  # fmt: skip
    except LocalProtocolError as exc:
        raise invalid(str(exc)) from None


def _failure(exc: RequestFailed, deadline_passed: bool) -> ApiError:
    if exc.code == reason.INVALID_INPUT:
        return invalid(str(exc), code="invalid_input")
    if deadline_passed:
        return ApiError(504, f"{exc} (the deadline passed)", code="deadline_exceeded")
    if exc.errors and all(attempt.code == reason.OVERLOADED for attempt in exc.errors):
        return ApiError(429, f"every provider is busy: {exc}", code="overloaded")
    return ApiError(502, str(exc), code="provider_failed")


def _answer_extension(answer: Answer) -> dict[str, Any]:
    return {
        "provider": str(answer.provider),
        "model": answer.model,
        "capability": answer.capability,
        "local": False,
        "usage": dataclasses.asdict(answer.usage),
        "receipt": base64.b64encode(answer.receipt).decode("ascii"),
        "elapsed_ms": answer.elapsed * 1000,
        "failed_attempts": len(answer.attempts),
    }


def _text(routed: Routed) -> str:
    """The answer as text: a model's streamed text is its chunks; others' output as JSON."""
    if isinstance(routed.output, str) or not routed.chunks:
        return api.output_text(routed.output)
    return "".join(routed.chunks)


# -- HTTP helpers ---------------------------------------------------------------------


def json_response(body: Mapping[str, Any], status: int = 200) -> Response:
    return Response(api.dumps(body), status_code=status, media_type="application/json")


def error_response(error: ApiError) -> Response:
    return json_response(error.body(), error.status)


async def _http_exception(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    return error_response(ApiError(status, f"{getattr(exc, 'detail', 'error')}: {request.method} {request.url.path}"))


@dataclasses.dataclass(frozen=True)
class _ChatEvents:
    PREFIX = "chatcmpl-"
    id: str
    created: int
    model: str  # what the client asked for: the answering model is known at the end

    def whole(self, routed: Routed) -> dict[str, Any]:
        return api.chat_completion(
            id=self.id, created=self.created, model=routed.model, content=_text(routed), extension=routed.extension
        )

    def head(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def piece(self, text: str) -> dict[str, Any]:
        return self._chunk({"content": text})

    def tail(self, routed: Routed) -> dict[str, Any]:
        return api.chat_chunk(
            id=self.id, created=self.created, model=routed.model, delta={}, finish_reason="stop", extension=routed.extension
        )

    def _chunk(self, delta: dict[str, Any]) -> dict[str, Any]:
        return api.chat_chunk(id=self.id, created=self.created, model=self.model, delta=delta)


@dataclasses.dataclass(frozen=True)
class _CompletionEvents:
    PREFIX = "cmpl-"
    id: str
    created: int
    model: str

    def whole(self, routed: Routed) -> dict[str, Any]:
        return api.text_completion(
            id=self.id, created=self.created, model=routed.model, text=_text(routed), extension=routed.extension
        )

    def head(self) -> list[dict[str, Any]]:
        return []

    def piece(self, text: str) -> dict[str, Any]:
        return api.text_completion(id=self.id, created=self.created, model=self.model, text=text, finish_reason=None, chunk=True)

    def tail(self, routed: Routed) -> dict[str, Any]:
        return api.text_completion(
            id=self.id, created=self.created, model=routed.model, text="", extension=routed.extension, chunk=True
        )


class EventStream:
    """An ASGI response streaming a routed answer as OpenAI's server-sent events."""

    HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]

    def __init__(self, run: Callable[..., Awaitable[Routed]], events: _ChatEvents | _CompletionEvents) -> None:
        self.run = run  # run(on_chunk=...) -> Routed, or ApiError
        self.events = events

    async def __call__(self, scope, receive, send) -> None:
        # Chunks are bounded by the node's max_answer_bytes, so the channel can be unbounded.
        chunk_sender, chunk_receiver = trio.open_memory_channel[str](math.inf)
        outcome: list[Routed | ApiError] = []

        async def work() -> None:
            async with chunk_sender:
                try:
                    outcome.append(await self.run(on_chunk=chunk_sender.send_nowait))
                except ApiError as exc:
                    outcome.append(exc)
                except Exception:  # top of a task: log it, end the stream with an error
                    logger.exception("a streamed answer failed")
                    outcome.append(ApiError(500, "the gateway failed to answer; see its log"))

        async def body(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        # A client that disconnects cancels all of this (the guard's watcher).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(work)
            started = False
            async with chunk_receiver:
                async for text in chunk_receiver:
                    if not started:
                        started = await self._start(send)
                    await body(api.sse(self.events.piece(text)))
            result = outcome[0]
            if isinstance(result, ApiError):
                if started:  # mid-stream: an error event, as OpenAI sends
                    await body(api.sse(result.body()), more=False)
                else:
                    await error_response(result)(scope, receive, send)
            else:
                if not started:
                    started = await self._start(send)
                    await body(api.sse(self.events.piece(_text(result))))
                await body(api.sse(self.events.tail(result)))
                await body(api.SSE_DONE, more=False)

    async def _start(self, send) -> bool:
        await send({"type": "http.response.start", "status": 200, "headers": self.HEADERS})
        for event in self.events.head():
            await send({"type": "http.response.body", "body": api.sse(event), "more_body": True})
        return True
