"""The Ray Serve edge: OpenAI-compatible HTTP over the merged model (SPEC §2, stage 3).

Co-located topology: each replica loads the primary base once and runs the carry-on and the
merge beside it. `model: "base"` is the plain base; any other model id names a carry-on
directory in the registry, loaded on first use and kept per replica in an LRU
(`@serve.multiplexed`). The registry is scanned at request time, so carry-ons exported after
start are served without a redeploy; on a multi-node cluster it must be a shared local path.

    POST /v1/completions   GET /v1/models   GET /health
"""

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from carryon_ray.artifacts import load_carryon
from carryon_ray.bases import FrozenBase
from carryon_ray.config import BaseSpec, PipelineConfig, ServeSpec
from carryon_ray.merged import MergedModel, SamplingParams
from carryon_ray.stages.placement import gpus_per_actor, role_resources

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# No `from __future__ import annotations` here: Serve's class-based FastAPI view must resolve
# the request model's annotation at runtime.

logger = logging.getLogger(__name__)

APP_NAME = "carryon"
BASE_MODEL_ID = "base"
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
REPLICA_NUM_CPUS = 1.0

app = FastAPI(title="carryon_ray")


class APIError(Exception):
    """A request error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body)


@app.exception_handler(APIError)
async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return error_response(error.status, error.message, param=error.param, code=error.code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """Pydantic's 422 becomes OpenAI's 400, naming every bad field."""
    problems, params = [], []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"] if part != "body") or "body"
        params.append(where)
        problems.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
    return error_response(400, "; ".join(problems), param=params[0] if params else None)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    return error_response(error.status_code, str(error.detail))


class CompletionRequest(BaseModel):
    """OpenAI's /v1/completions body; `carryon_alpha` overrides the carry-on's α."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    user: str | None = None
    carryon_alpha: float | None = Field(None, ge=0.0)


def carryon_dir(registry: Path, model_id: str) -> Path:
    """Validate a model id before touching the filesystem; 400 if malformed, 404 if unknown."""
    if not MODEL_ID.match(model_id) or ".." in model_id:
        raise APIError(
            400,
            f"model '{model_id}' is not a valid id: use letters, digits, '_', '.', '-' "
            "(no '..', no slashes), starting with a letter or digit",
            param="model",
            code="invalid_model",
        )
    directory = registry / model_id
    if not (directory / "config.json").is_file():
        choices = [BASE_MODEL_ID, *list_carryons(registry)]
        raise APIError(
            404,
            f"model '{model_id}' does not exist; choose one of {choices}",
            param="model",
            code="model_not_found",
        )
    return directory


def list_carryons(registry: Path) -> list[str]:
    """Carry-on names in the registry (half-written `.partial` directories are skipped)."""
    if not registry.is_dir():
        return []
    return sorted(
        path.name
        for path in registry.iterdir()
        if MODEL_ID.match(path.name)
        and path.name != BASE_MODEL_ID
        and (path / "config.json").is_file()
    )


def model_card(model_id: str, *, created: int, root: str, parent: str | None) -> dict:
    """One entry of OpenAI's model list; `root` is the base, `parent` what a carry-on extends."""
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "carryon_ray",
        "root": root,
        "parent": parent,
    }


def complete(
    merged: MergedModel,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    alpha: float | None,
    stops: list[str],
    tokenizer: "PreTrainedTokenizerBase",
) -> tuple[str, int, str]:
    """Generate until EOS, a stop string or the budget: (text, completion tokens, finish reason)."""
    generated: list[int] = []
    for token in merged.stream(prompt_ids, params, alpha=alpha):
        generated.append(token)
        if token in params.stop_token_ids:
            return tokenizer.decode(generated, skip_special_tokens=True), len(generated), "stop"
        if stops:
            text = tokenizer.decode(generated, skip_special_tokens=True)
            cuts = [text.find(stop) for stop in stops if stop in text]
            if cuts:
                return text[: min(cuts)], len(generated), "stop"
    return tokenizer.decode(generated, skip_special_tokens=True), len(generated), "length"


@serve.deployment
@serve.ingress(app)
class CarryOnServer:
    """One replica: the primary base loaded once, carry-ons loaded on demand (LRU)."""

    def __init__(self, base_spec: BaseSpec, spec: ServeSpec, registry: str) -> None:
        self.spec = spec
        self.registry = Path(registry)
        self.base = FrozenBase(base_spec)
        self.plain = MergedModel(self.base)
        eos = self.base.tokenizer.eos_token_id
        self.stop_token_ids = () if eos is None else (int(eos),)
        # The LRU size comes from the config, so the multiplexed loader is wired per instance.
        self.get_carryon = serve.multiplexed(
            max_num_models_per_replica=spec.max_carryons_per_replica
        )(self._loader())
        logger.info("replica ready: base '%s', registry %s", self.base.name, self.registry)

    def _loader(self) -> Callable[[str], Awaitable[MergedModel]]:
        async def get_carryon(model_id: str) -> MergedModel:
            """model_id is `<name>@<version>`: a re-exported carry-on gets a fresh entry."""
            directory = carryon_dir(self.registry, model_id.rsplit("@", 1)[0])
            try:
                carry_on, layout, artifact = await asyncio.to_thread(
                    load_carryon, directory, running_bases=[self.base.identity()]
                )
            except FileNotFoundError as error:
                raise APIError(404, str(error), param="model", code="model_not_found") from error
            except ValueError as error:
                raise APIError(400, str(error), param="model", code="carryon_mismatch") from error
            logger.info("loaded carry-on %s (alpha %s)", directory.name, artifact["alpha"])
            return MergedModel(
                self.base, carry_on, layout, alpha=artifact["alpha"], head=self.plain.head
            )

        return get_carryon

    async def _model(self, model_id: str) -> MergedModel:
        if model_id == BASE_MODEL_ID:
            return self.plain
        stat = (carryon_dir(self.registry, model_id) / "config.json").stat()
        return await self.get_carryon(f"{model_id}@{stat.st_mtime_ns}.{stat.st_ino}")

    @app.get("/health")
    async def health(self) -> dict:
        return {
            "status": "ok",
            "base": self.base.name,
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    @app.get("/v1/models")
    async def models(self) -> dict:
        entries = [model_card(BASE_MODEL_ID, created=0, root=self.base.name, parent=None)]
        for name in list_carryons(self.registry):
            created = int((self.registry / name / "config.json").stat().st_mtime)
            entries.append(model_card(name, created=created, root=self.base.name, parent="base"))
        return {"object": "list", "data": entries}

    @app.post("/v1/completions")
    async def completions(self, request: CompletionRequest) -> dict:
        if request.stream:
            raise APIError(
                400,
                "stream=true is not supported on /v1/completions yet; send stream=false",
                param="stream",
            )
        if request.max_tokens > self.spec.max_new_tokens_limit:
            raise APIError(
                400,
                f"max_tokens={request.max_tokens} exceeds this server's limit of "
                f"{self.spec.max_new_tokens_limit}",
                param="max_tokens",
            )
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if any(stop == "" for stop in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        merged = await self._model(request.model)
        prompt_ids = self.base.tokenizer(request.prompt)["input_ids"]
        try:
            merged.check_length(len(prompt_ids))
        except ValueError as error:
            raise APIError(
                400, str(error), param="prompt", code="context_length_exceeded"
            ) from error
        params = SamplingParams(
            max_new_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop_token_ids=self.stop_token_ids,
        )
        # Generation takes seconds: run it in a thread so the event loop keeps answering.
        text, completion_tokens, finish_reason = await asyncio.to_thread(
            complete,
            merged,
            prompt_ids,
            params,
            alpha=request.carryon_alpha,
            stops=stops,
            tokenizer=self.base.tokenizer,
        )
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            ],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": completion_tokens,
                "total_tokens": len(prompt_ids) + completion_tokens,
            },
        }


def build_app(
    config: PipelineConfig,
    registry: str | Path,
    *,
    resources: dict[str, float] | None = None,
    num_gpus: float = 0.0,
) -> serve.Application:
    """The Serve application: `num_replicas` replicas placed by `resources` (default
    `serve.resources`, i.e. only on nodes with the `inference` custom resource)."""
    registry = Path(registry).expanduser().resolve()
    if not registry.is_dir():
        raise FileNotFoundError(
            f"carry-on registry {registry} does not exist; export a carry-on first"
        )
    actor_options = {
        "num_cpus": REPLICA_NUM_CPUS,
        "num_gpus": num_gpus,
        "resources": dict(config.serve.resources if resources is None else resources),
    }
    deployment = CarryOnServer.options(
        num_replicas=config.serve.num_replicas, ray_actor_options=actor_options
    )
    return deployment.bind(config.primary, config.serve, str(registry))


def run_server(
    config: PipelineConfig, registry: str | Path, *, blocking: bool
) -> DeploymentHandle | None:
    """Deploy on the running Ray cluster (the caller runs `ray.init`) and return once the
    replicas are ready; with `blocking`, serve until Ctrl-C, then shut Serve down cleanly."""
    resources = role_resources(config.serve.resources)
    num_gpus = gpus_per_actor(resources)
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
    try:
        handle = serve.run(
            build_app(config, registry, resources=resources, num_gpus=num_gpus),
            name=APP_NAME,
            route_prefix="/",
        )
        logger.info("serving on http://%s:%d/v1", config.serve.host, config.serve.port)
        while blocking:
            time.sleep(1.0)
        return handle
    except KeyboardInterrupt:
        logger.info("interrupted: shutting Serve down")
        serve.shutdown()
        if not blocking:
            raise
        return None
