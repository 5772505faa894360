"""The Ray Serve edge: OpenAI-compatible HTTP over the merged model (SPEC §2, stage 3).

Co-located topology: each replica loads every configured base once (the primary, plus the
second bases a mixture-of-LLMs carry-on reads) and runs the carry-on and the merge beside them
(README, "Serve benchmark", says why). `model: "base"` is the plain base; any
other model id names a carry-on directory in the registry, loaded on first use and kept per
replica in an LRU (`@serve.multiplexed`). The registry is scanned at request time, so
carry-ons exported after start are served without a redeploy; on a multi-node cluster it must
be a shared local path.

    POST /v1/completions   POST /v1/chat/completions   (stream: true -> server-sent events)
    GET  /v1/models        GET  /health

Entry points: `carryon serve CONFIG`, `run_server(...)` from Python, and the app builder
`serve run carryon_ray.stages.serve:app_builder config=configs/demo.yaml`.
"""

import asyncio
import ipaddress
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, SecretStr
from ray import serve
from starlette.exceptions import HTTPException

from carryon_ray.access import Caller, ConcurrencyLimits, KeyTable, Slot, authenticate, load_keys
from carryon_ray.artifacts import ArtifactError, artifact_files, artifact_version, load_carryon
from carryon_ray.bases import FrozenBase
from carryon_ray.batching import (
    BatcherClosed,
    DecodeBatcher,
    QueueFull,
    in_passing_thread,
    side_executor,
)
from carryon_ray.config import BaseSpec, ServeSpec, load_config
from carryon_ray.merged import MergedModel, prompt_logprobs
from carryon_ray.openai_api import (
    API_KEY_ENV,
    BASE_MODEL_ID,
    MAX_BODY_BYTES,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    TextStream,
    carryon_dir,
    chat_body,
    chat_events,
    chat_prompt_ids,
    check_model_id,
    check_prompt,
    checked_token_ids,
    completion_body,
    completion_events,
    error_body,
    list_carryons,
    model_card,
    model_not_found,
    parse_request,
    resolve_model_id,
)
from carryon_ray.stages.placement import gpus_per_actor, granted_threads, role_resources
from carryon_ray.stages.serve_metrics import ServeMetrics
from carryon_ray.storage import Location, location
from carryon_ray.text_stream import Echo, echo_of

# No `from __future__ import annotations` here: Serve's class-based FastAPI view must resolve
# the handlers' annotations at runtime.

logger = logging.getLogger(__name__)

APP_NAME = "carryon"

app = FastAPI(title="carryon_ray")


class ErrorResponse(JSONResponse):
    """An error body as ASCII JSON: a message may quote any client string."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


@app.exception_handler(APIError)
async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return ErrorResponse(status_code=error.status, content=error.body())


@app.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    return ErrorResponse(
        status_code=error.status_code, content=error_body(error.status_code, str(error.detail))
    )


@app.exception_handler(Exception)
async def _server_error(request: Request, error: Exception) -> JSONResponse:
    logger.error("request failed: %s", error, exc_info=error)
    return ErrorResponse(status_code=500, content=error_body(500, "internal server error"))


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The JSON body as `model` (`openai_api.parse_request`: one 4xx naming the problem),
    read up to `MAX_BODY_BYTES` (413 beyond, before the rest is read). Parsed here, after the
    API key check, so 401 comes first."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the body has more than {MAX_BODY_BYTES} bytes; send a shorter prompt")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            break
    return parse_request(bytes(raw), model)


async def _releasing(chunks: AsyncIterator, slot: Slot) -> AsyncIterator:
    """A streamed body that gives its per-key slot back when it ends, fails or is cancelled
    (defined before the deployment class, which Serve captures where it is defined)."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        slot.release()


@dataclass
class LoadedCarryOn:
    """An LRU entry; `version` (mtime and inode of config.json) spots a re-export."""

    merged: MergedModel
    version: str
    on_evict: Callable[[], None] | None = None  # called once, when Serve's LRU drops it

    def __del__(self) -> None:
        """Serve's multiplexing calls this when its LRU evicts the entry (then the garbage
        collector does again: the callback runs once)."""
        on_evict, self.on_evict = self.on_evict, None
        if on_evict is not None:
            on_evict()


REMOTE_CHECK_SECONDS = 5.0  # how long a remote registry's answer about a carry-on is reused
RETRY_AFTER_SECONDS = 1  # told to a client refused because the batch's queue is full


@serve.deployment
@serve.ingress(app)
class CarryOnServer:
    """One replica: the bases loaded once, carry-ons loaded on demand (LRU)."""

    def __init__(
        self, base_specs: list[BaseSpec], spec: ServeSpec, registry: str, keys: KeyTable | None = None
    ) -> None:
        torch.set_num_threads(granted_threads(spec.torch_threads))
        self.spec = spec
        self.registry = location(registry)
        self.keys = keys  # per-tenant keys (by hash), else spec.api_key, else open
        self.limits = ConcurrencyLimits()
        self._checks: dict[str, tuple[Location, str, float]] = {}  # remote registries only
        self._refused: dict[str, tuple[str, APIError]] = {}  # id -> (artifact version, error)
        # Loaded on a thread that ends, so the engine's is the replica's only OpenMP team.
        bases = in_passing_thread(
            lambda: [FrozenBase(base_spec) for base_spec in base_specs], "base-loader"
        )
        self.base = bases[0]
        self.others = {base.name: base for base in bases[1:]}
        self.identities = [base.identity() for base in bases]
        self.plain = MergedModel(self.base)
        # The engine thread owns generation; carry-ons load on a side thread, so a load never
        # stalls running streams (`carryon_ray.batching`).
        self.batcher = DecodeBatcher(
            self.base,
            max_batch_size=spec.max_batch_size,
            kv_cache_tokens=spec.kv_cache_tokens,
            max_queued_requests=spec.max_queued_requests,
            prefill_chunk_tokens=spec.prefill_chunk_tokens,
        )
        self.load_executor = side_executor("carryon-loader")
        self.metrics = ServeMetrics(self.batcher)
        eos = self.base.tokenizer.eos_token_id
        self.stop_token_ids = () if eos is None else (int(eos),)
        # The LRU size comes from the config, so the multiplexed loader is wired per instance.
        self.get_carryon = serve.multiplexed(
            max_num_models_per_replica=spec.max_carryons_per_replica
        )(self._loader())
        logger.info("replica ready: base '%s', registry %s", self.base.name, self.registry)

    def _load(self, directory: Location) -> LoadedCarryOn:
        version = artifact_version(directory)
        bases = [self.base, *self.others.values()]
        shapes = {base.name: (base.num_layers, base.hidden_size) for base in bases}
        try:
            carry_on, layout, artifact = load_carryon(
                directory, running_bases=self.identities, running_shapes=shapes
            )
        except FileNotFoundError as error:
            raise APIError(404, str(error), param="model", code="model_not_found") from error
        except ArtifactError as error:
            raise APIError(
                400, f"{error}; re-export it (carryon run)", param="model", code="invalid_carryon"
            ) from error
        except ValueError as error:
            raise APIError(400, str(error), param="model", code="carryon_mismatch") from error
        logger.info("loaded carry-on %s (alpha %s)", directory.name, artifact["alpha"])
        mixture = {"others": self.others} if self.others else {}  # second bases it may read
        merged = MergedModel(
            self.base, carry_on, layout, alpha=artifact["alpha"], head=self.plain.head, **mixture
        )
        return LoadedCarryOn(merged, version)

    def _loader(self) -> Callable[[str], Awaitable[LoadedCarryOn]]:
        async def get_carryon(model_id: str) -> LoadedCarryOn:
            directory = carryon_dir(self.registry, model_id)
            loaded = await self._timed_load(model_id, directory, resident=True)
            loaded.on_evict = self.metrics.eviction_callback(model_id)
            return loaded

        return get_carryon

    async def _checked(self, model_id: str) -> tuple[Location, str]:
        """The carry-on's directory and published version; 400/404 before the LRU sees the id.
        Off the event loop; on an object store (several requests per check) a result is reused
        for `REMOTE_CHECK_SECONDS`, so a re-export is picked up within that time."""
        cached = self._checks.get(model_id)
        if cached is not None and time.monotonic() - cached[2] < REMOTE_CHECK_SECONDS:
            return cached[0], cached[1]

        def check() -> tuple[Location, str]:
            directory = carryon_dir(self.registry, model_id)
            return directory, artifact_version(directory)

        directory, version = await asyncio.to_thread(check)
        if not self.registry.is_local:
            self._checks[model_id] = (directory, version, time.monotonic())
        return directory, version

    async def _model(self, model_id: str) -> MergedModel:
        """The merged model for an id. A carry-on refused for its files (broken, or trained
        on other bases) is refused again without reading them until they change."""
        if model_id == BASE_MODEL_ID:
            self.metrics.name_model(model_id)
            return self.plain
        directory, version = await self._checked(model_id)
        self.metrics.name_model(model_id)  # found in the registry: a bounded tag
        refused = self._refused.get(model_id)
        if refused is not None and refused[0] == version:
            error = refused[1]  # a fresh exception: one raised again keeps growing its traceback
            raise APIError(error.status, error.message, param=error.param, code=error.code)
        try:
            loaded = await self.get_carryon(model_id)
            self.metrics.carryon_used(model_id)
            if loaded.version != version:  # re-exported since it was loaded
                fresh = await self._timed_load(model_id, directory, resident=False)
                loaded.merged, loaded.version = fresh.merged, fresh.version
        except APIError as error:
            if error.code in ("invalid_carryon", "carryon_mismatch"):
                self._refused[model_id] = (version, error)
            raise
        self._refused.pop(model_id, None)
        return loaded.merged

    async def _timed_load(
        self, model_id: str, directory: Location, *, resident: bool
    ) -> LoadedCarryOn:
        """`_load` on the loader thread, counted and timed in the metrics. Only the finished
        model reaches the engine (with the requests that name it), so streams running
        meanwhile keep their pace; one load at a time."""
        started = time.perf_counter()
        loaded = await asyncio.wrap_future(self.load_executor.submit(self._load, directory))
        self.metrics.carryon_loaded(model_id, time.perf_counter() - started, resident=resident)
        return loaded

    async def _torch_work(self, function, *args):
        """On the batcher's engine thread, awaited (see `carryon_ray.batching`: torch work in a
        second thread slows every decode step)."""
        try:
            future = self.batcher.submit(function, *args)
        except BatcherClosed as error:
            raise APIError(503, f"{error}; retry the request", code="engine_stopped") from error
        return await asyncio.wrap_future(future)

    def _authorize(self, request: Request) -> Caller:
        """The caller its key names (401 for a missing or unknown key; `carryon_ray.access`)."""
        key = self.spec.api_key
        return authenticate(
            request.headers.get("authorization"),
            keys=self.keys,
            shared_key=key and key.get_secret_value(),
        )

    async def _limited(self, caller: Caller, answer: Callable[[], Awaitable]):
        """`answer()` within the caller's per-key limit of concurrent requests (429 with
        Retry-After beyond it); a streamed answer holds its slot until the stream ends."""
        slot = self.limits.acquire(caller)
        if slot is None:
            return ErrorResponse(
                status_code=429,
                content=error_body(
                    429,
                    f"this API key already has {caller.max_concurrent_requests} requests in "
                    "flight, its limit; retry when one finishes",
                    code="rate_limit_exceeded",
                ),
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        try:
            response = await answer()
        except BaseException:
            slot.release()
            raise
        if isinstance(response, StreamingResponse):
            response.body_iterator = _releasing(response.body_iterator, slot)
        else:
            slot.release()
        return response

    async def _prepare(
        self,
        body: CompletionRequest | ChatCompletionRequest,
        prompt_ids: list[int] | None,
        caller: Caller,
    ) -> tuple[str, TextStream]:
        """Everything that can fail with a 4xx, done before any answer starts streaming."""
        model_id = resolve_model_id(body.model, serve.get_multiplexed_model_id())
        check_model_id(model_id)  # 400 for a malformed id, whoever asks
        if not caller.may_use(model_id):  # another tenant's model: exactly an unknown one
            raise model_not_found(model_id)
        stops = body.stops()
        merged = await self._model(model_id)
        if prompt_ids is None:
            # Tokenizing a long conversation takes a while: off the event loop.
            prompt_ids = await asyncio.to_thread(chat_prompt_ids, self.base.tokenizer, body.messages)
            param = "messages"
        else:
            param = "prompt"
        check_prompt(merged, prompt_ids, param=param)
        params = body.sampling(
            stop_token_ids=self.stop_token_ids,
            limit=self.spec.max_new_tokens_limit,
            room=merged.context_length - len(prompt_ids),
        )
        echo = None
        if isinstance(body, CompletionRequest) and body.echo:
            echo = await self._echo(merged, body, prompt_ids)
        stream = TextStream(
            merged,
            prompt_ids,
            params,
            alpha=body.carryon_alpha,
            stops=stops,
            tokenizer=self.base.tokenizer,
            batcher=self.batcher,
            echo=echo,
        )
        self.metrics.follow(stream)
        return model_id, stream

    async def _echo(
        self, merged: MergedModel, body: CompletionRequest, prompt_ids: list[int]
    ) -> Echo:
        """The prompt to put before the answer; with `logprobs`, its tokens scored by one
        prefill on the engine thread."""
        scores = None
        if body.logprobs is not None:
            score = partial(prompt_logprobs, top=body.logprobs, alpha=body.carryon_alpha)
            scores = await self._torch_work(score, merged, prompt_ids)
        return await asyncio.to_thread(echo_of, self.base.tokenizer, body.prompt, prompt_ids, scores)

    def batching_stats(self) -> dict:
        """Shared base steps so far and the sequences they carried (mean = rows / steps; the
        `queued_` ones count the steps taken while requests waited for room), the batch and
        queue now, and generations stopped because their client went away."""
        batcher = self.batcher
        return {
            "max_batch_size": batcher.max_batch_size,
            "steps": batcher.steps,
            "rows": batcher.rows,
            "mean_batch_size": round(batcher.mean_batch_size, 3),
            "queued_steps": batcher.queued_steps,
            "queued_rows": batcher.queued_rows,
            "mean_queued_batch_size": round(batcher.mean_queued_batch_size, 3),
            "running": batcher.running,
            "prefilling": batcher.prefilling,
            "waiting": batcher.waiting,
            "abandoned": batcher.abandoned,
            "kv_cache_tokens": batcher.kv_cache_tokens,
        }

    def check_health(self) -> None:
        """Serve's periodic check: a replica whose engine thread stopped cannot generate, so
        it must fail and be replaced."""
        if not self.batcher.alive:
            raise RuntimeError(self.batcher.closed_reason())

    async def __del__(self) -> None:
        """Serve's graceful shutdown ends here, once ongoing requests drained or timed out:
        stop the engine thread (streams still running end with an error event and [DONE])
        before the process exits under it, then let the ingress wrapper shut its app down."""
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            await asyncio.to_thread(batcher.close)
        parent = getattr(super(), "__del__", None)  # Serve's ASGI wrapper, when wrapped
        if parent is not None:
            await parent()

    @app.get("/health")
    async def health(self):
        if not self.batcher.alive:
            return JSONResponse(
                status_code=503, content=error_body(503, self.batcher.closed_reason())
            )
        return {
            "status": "ok",
            "base": self.base.name,
            "bases": [self.base.name, *self.others],
            "node_id": ray.get_runtime_context().get_node_id(),
            "batching": self.batching_stats(),
        }

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        """The base and the carry-ons the caller may use (current versions)."""
        caller = self._authorize(request)
        entries = [model_card(BASE_MODEL_ID, created=0, root=self.base.name, parent=None)]
        for name, created in await asyncio.to_thread(self._listing, caller):
            entries.append(model_card(name, created=created, root=self.base.name, parent="base"))
        return {"object": "list", "data": entries}

    def _listing(self, caller: Caller) -> list[tuple[str, int]]:
        """(carry-on, creation time) for the model list; file-system calls, so not on the loop."""
        listing = []
        for name in filter(caller.may_use, list_carryons(self.registry)):
            config = artifact_files(self.registry / name) / "config.json"
            listing.append((name, int(config.fs.get_file_info(config.path).mtime.timestamp())))
        return listing

    @staticmethod
    async def _respond(
        body: CompletionRequest | ChatCompletionRequest,
        model_id: str,
        stream: TextStream,
        events: Callable,
        whole: Callable,
    ):
        """Server-sent `events` when the request streams, else the `whole` answer at once.

        The generation joins the batcher's queue first, so a full queue (429) or a stopped
        engine (503) is answered before any stream starts. Tokens then arrive on this event
        loop: no thread waits for them, and a client that goes away cancels this task (or
        the stream), which takes its row out of the batch."""
        try:
            stream.start()
        except QueueFull as error:
            return JSONResponse(
                status_code=429,
                content=error_body(429, str(error), code="rate_limit_exceeded"),
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        except BatcherClosed as error:
            raise APIError(503, f"{error}; retry the request", code="engine_stopped") from error
        except ValueError as error:  # prompt + max_tokens beyond the cache budget
            raise APIError(400, str(error), param="max_tokens") from error
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                events(model_id, stream, include_usage=usage), media_type="text/event-stream"
            )
        try:
            text = await stream.text()
        except BatcherClosed as error:
            raise APIError(503, f"{error}; retry the request", code="engine_stopped") from error
        return whole(model_id, text, stream)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self.metrics.answer("completions", self._completions(request))

    async def _completions(self, request: Request):
        caller = self._authorize(request)
        return await self._limited(caller, partial(self._complete, request, caller))

    async def _complete(self, request: Request, caller: Caller):
        body = await parse_body(request, CompletionRequest)
        if isinstance(body.prompt, str):
            # A prompt of megabytes takes a second to tokenize: off the event loop.
            prompt_ids = (await asyncio.to_thread(self.base.tokenizer, body.prompt))["input_ids"]
        else:
            prompt_ids = checked_token_ids(body.prompt, len(self.base.tokenizer))
        model_id, stream = await self._prepare(body, prompt_ids, caller)
        return await self._respond(body, model_id, stream, completion_events, completion_body)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self.metrics.answer("chat_completions", self._chat_completions(request))

    async def _chat_completions(self, request: Request):
        caller = self._authorize(request)
        return await self._limited(caller, partial(self._chat, request, caller))

    async def _chat(self, request: Request, caller: Caller):
        body = await parse_body(request, ChatCompletionRequest)
        model_id, stream = await self._prepare(body, None, caller)
        return await self._respond(body, model_id, stream, chat_events, chat_body)


def registry_path(spec: ServeSpec, run_dir: str | Path | Location) -> Location:
    """`serve.registry`, else RUN_DIR/carryons: a local path or any pyarrow.fs URI."""
    return location(spec.registry) if spec.registry else location(run_dir) / "carryons"


def resolve_api_key(spec: ServeSpec) -> str | None:
    """`serve.api_key`, else the CARRYON_API_KEY environment variable, else no key. A variable
    set but empty is an error: it must not turn authentication off unnoticed. With
    `serve.keys_file` there is no shared key (the variable is ignored, with a warning)."""
    if spec.api_key is not None:
        return spec.api_key.get_secret_value()
    if spec.keys_file is not None:
        if os.environ.get(API_KEY_ENV) is not None:
            logger.warning("%s is ignored: serve.keys_file names the keys", API_KEY_ENV)
        return None
    value = os.environ.get(API_KEY_ENV)
    if value is not None and not value.strip():
        raise ValueError(
            f"{API_KEY_ENV} is set but empty; set a key, or unset it to serve without one"
        )
    return None if value is None else value.strip()


def warn_if_open(spec: ServeSpec) -> None:
    """A warning when `serve.host` is reachable from other machines and no API key is set."""
    try:
        loopback = spec.host == "localhost" or ipaddress.ip_address(spec.host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if not loopback and spec.keys_file is None and resolve_api_key(spec) is None:
        logger.warning(
            "serve.host is %s, reachable from other machines, and no API key is set: anyone "
            "who reaches the port can use every model; set %s or serve.api_key",
            spec.host,
            API_KEY_ENV,
        )


def deployment_options(spec: ServeSpec, *, resources: dict[str, float], num_gpus: float) -> dict:
    """Serve options: fixed `num_replicas` or an `autoscaling_config`, placed on `resources`."""
    options: dict = {
        "max_ongoing_requests": spec.max_ongoing_requests,
        "ray_actor_options": {
            "num_cpus": spec.num_cpus_per_replica,
            "num_gpus": num_gpus,
            "resources": dict(resources),
        },
    }
    if spec.autoscaling is not None:
        options["autoscaling_config"] = spec.autoscaling.model_dump()
    else:
        options["num_replicas"] = spec.num_replicas
    return options


def build_app(
    spec: ServeSpec,
    bases: list[BaseSpec],
    registry: str | Path | Location,
    *,
    resources: dict[str, float] | None = None,
    num_gpus: float = 0.0,
) -> serve.Application:
    """The Serve application, placed by `resources` (default `serve.resources`, i.e. only on
    nodes with the `inference` custom resource), one GPU per replica where `num_gpus` says."""
    registry = location(registry)
    if not registry.is_dir():
        raise FileNotFoundError(
            f"carry-on registry {registry} does not exist; export a carry-on first (carryon run)"
        )
    options = deployment_options(
        spec, resources=spec.resources if resources is None else resources, num_gpus=num_gpus
    )
    key = resolve_api_key(spec)
    spec = spec.model_copy(update={"api_key": None if key is None else SecretStr(key)})
    # Read on the driver (a file every replica could not reach is no error later): hashes only.
    keys = None if spec.keys_file is None else load_keys(spec.keys_file)
    return CarryOnServer.options(**options).bind(list(bases), spec, registry.uri, keys)


def placed_app(
    spec: ServeSpec, bases: list[BaseSpec], registry: str | Path, *, allow_unpinned: bool = False
) -> serve.Application:
    """`build_app` on the running cluster: a role it lacks is an error (under `allow_unpinned`,
    dropped with a warning), and each replica gets a GPU where the inference nodes have one."""
    resources = role_resources(spec.resources, allow_unpinned=allow_unpinned, key="serve.resources")
    return build_app(spec, bases, registry, resources=resources, num_gpus=gpus_per_actor(resources))


def app_builder(args: dict[str, str]) -> serve.Application:
    """Ray Serve app builder:

        serve run carryon_ray.stages.serve:app_builder config=configs/demo.yaml \\
            [registry=DIR] [serve.max_carryons_per_replica=64 ...]

    `config` is the pipeline YAML (default configs/demo.yaml), `registry` overrides
    `serve.registry`, and every other `section.key=value` is a config override. HTTP host and
    port are Serve's own (`serve run --host/--port`, or `http_options` in a Serve config).
    Without a connected cluster it joins RAY_ADDRESS or starts a local node with every role.
    """
    args = dict(args)
    path = args.pop("config", None)
    registry = args.pop("registry", None)
    config = load_config(path, [f"{key}={value}" for key, value in args.items()])
    if not ray.is_initialized():  # `serve run IMPORT_PATH` calls the builder before ray.init
        from carryon_ray.pipeline import ensure_ray

        ensure_ray()
    return placed_app(config.serve, config.bases, registry or registry_path(config.serve, config.run_dir),
                      allow_unpinned=config.allow_unpinned)


@dataclass(frozen=True)
class DeployResult:
    endpoint: str  # the OpenAI base URL
    app: str
    registry: str
    model: str | None  # the carry-on this pipeline exported, if it did

    def summary(self) -> dict:
        return asdict(self)


def deploy_stage(
    spec: ServeSpec, run_dir: Path, exported=None, *, bases: list[BaseSpec], allow_unpinned: bool = False
) -> DeployResult:
    """Deploy or update the Serve application on the running cluster (idempotent: the same
    app name is updated in place), with the registry that holds the exported carry-on. The
    application outlives the driver: under `ray job submit` it keeps serving after the job."""
    stop_on_sigterm()
    registry = registry_path(spec, run_dir)
    app = placed_app(spec, bases, registry, allow_unpinned=allow_unpinned)
    warn_if_open(spec)
    serve.start(http_options={"host": spec.host, "port": spec.port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    endpoint = f"http://{spec.host}:{spec.port}/v1"
    logger.info("deploy: serving %s on %s", registry, endpoint)
    return DeployResult(endpoint=endpoint, app=APP_NAME, registry=str(registry),
                        model=None if exported is None else exported.name)


def stop_on_sigterm() -> None:
    """Make SIGTERM stop the driver as Ctrl-C does (KeyboardInterrupt). Ray's core worker
    otherwise answers it with a native stack dump and an abort. Main thread only."""

    def stop(signum, frame) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def serve_until_interrupted() -> None:
    """Keep the driver alive (and so a local cluster) until Ctrl-C or SIGTERM, then stop
    Serve cleanly: Serve drains each replica's ongoing requests, then its engine stops."""
    stop_on_sigterm()
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        logger.info("interrupted: shutting Serve down")
        serve.shutdown()
