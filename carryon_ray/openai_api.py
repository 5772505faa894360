"""OpenAI's completion protocol over a merged model, without any server or Ray.

Request bodies (`/v1/completions`, `/v1/chat/completions` with the `carryon_alpha`
extension), the error shape `{"error": {message, type, param, code}}`, model-id checks, the
text stream that both the plain and the streaming answers are cut from, and the server-sent
event chunks. The Serve edge (`stages/serve.py`) wires these into HTTP routes.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from typing import TYPE_CHECKING, Literal

from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from carryon_ray.artifacts import CONFIG, MAX_ALPHA, WEIGHTS, is_artifact
from carryon_ray.batching import BatcherClosed
from carryon_ray.merged import MergedModel, SamplingParams
from carryon_ray.storage import Location, location

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from carryon_ray.batching import DecodeBatcher

BASE_MODEL_ID = "base"
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
API_KEY_ENV = "CARRYON_API_KEY"
MAX_BODY_BYTES = 8 * 2**20  # a request body beyond this is refused with 413
MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (the limit as temperature -> 0)
# Below this, top_p keeps only the most likely token (whose probability is at least 1/vocab):
# greedy, which also spares a float32 nucleus a threshold that rounds to 0.
MIN_TOP_P = 1e-6

logger = logging.getLogger(__name__)


class APIError(Exception):
    """A request error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"  # OpenAI's 401 too
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def shown(text: str, limit: int = 64) -> str:
    """A client's string as an error message may quote it: short, and printable as ASCII."""
    text = text if len(text) <= limit else f"{text[:limit]}..."
    return text.encode("ascii", "backslashreplace").decode("ascii")


# ---------------------------------------------------------------------------------------------
# Bodies as bytes


def parse_request(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """A request body as `model`; every problem one 4xx naming it (OpenAI's shape, not
    FastAPI's 422): over `MAX_BODY_BYTES` (413), not UTF-8, not JSON (NaN and Infinity are
    not JSON), nested past Python's recursion limit, integers of more than 4,300 digits, lone
    UTF-16 surrogates (no tokenizer takes them), wrong types and unknown fields (400)."""
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"the body has more than {MAX_BODY_BYTES} bytes; send a shorter prompt")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise APIError(
            400, f"the body is not valid UTF-8 (byte {error.start}); send JSON encoded as UTF-8"
        ) from None
    try:
        data = json.loads(text or "null", parse_constant=_not_json)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # lone surrogates fail here
    except RecursionError:
        raise APIError(400, "the body nests too deeply; send a flat JSON object") from None
    except UnicodeEncodeError as error:
        raise APIError(
            400,
            f"the body holds a lone UTF-16 surrogate ({shown(error.object[error.start:error.end])}); "
            "escape characters outside the BMP as a surrogate pair",
        ) from None
    except ValueError as error:
        if "integer string conversion" in str(error):
            raise APIError(400, "the body holds a number of more than 4,300 digits") from None
        raise APIError(400, f"the body is not valid JSON: {shown(str(error), 160)}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems, params = [], []
        for item in error.errors():
            where = shown(".".join(str(part) for part in item["loc"]) or "body")
            params.append(where)
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = "unknown parameter; remove it"
            problems.append(f"{where}: {message}")
        raise APIError(400, "; ".join(problems[:8]), param=params[0]) from None


def _not_json(constant: str) -> float:
    raise ValueError(f"{constant} is not a JSON value; send a finite number")


# ---------------------------------------------------------------------------------------------
# Request bodies


# Strict: a string is not a number, a number not a boolean; non-finite floats are refused.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints. `model` may be left out when the request carries
    Serve's `serve_multiplexed_model_id` header instead."""

    model_config = STRICT

    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0 (or below MIN_TEMPERATURE) = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # torch.Generator's range
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    carryon_alpha: float | None = Field(None, ge=0.0, le=MAX_ALPHA)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(stop == "" for stop in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        if len(stops) > 4:
            raise APIError(400, f"at most 4 stop strings, got {len(stops)}", param="stop")
        return stops

    def sampling(self, *, stop_token_ids: tuple[int, ...], limit: int) -> SamplingParams:
        if self.max_tokens > limit:
            raise APIError(
                400,
                f"max_tokens={self.max_tokens} exceeds this server's limit of {limit}",
                param="max_tokens",
            )
        greedy = self.temperature < MIN_TEMPERATURE or self.top_p < MIN_TOP_P
        return SamplingParams(
            max_new_tokens=self.max_tokens,
            temperature=0.0 if greedy else self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop_token_ids=stop_token_ids,
        )


class CompletionRequest(_Sampling):
    """OpenAI's /v1/completions body; `carryon_alpha` overrides the carry-on's α."""

    prompt: str


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule


class ChatCompletionRequest(_Sampling):
    """OpenAI's /v1/chat/completions body; rendered with the primary's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens

    def model_post_init(self, context: object) -> None:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens


# ---------------------------------------------------------------------------------------------
# Models, keys and prompts


def resolve_model_id(body_model: str | None, header_model: str) -> str:
    """The `model` field, or Serve's multiplexed model id header when the field is absent."""
    if body_model and header_model and body_model != header_model:
        raise APIError(
            400,
            f"model '{shown(body_model)}' differs from the serve_multiplexed_model_id header "
            f"'{shown(header_model)}'; send one of them, or the same id in both",
            param="model",
        )
    model_id = body_model or header_model
    if not model_id:
        raise APIError(
            400,
            "model: field required (or send the serve_multiplexed_model_id header)",
            param="model",
        )
    return model_id


def carryon_dir(registry: Location | str, model_id: str) -> Location:
    """Validate a model id before touching the filesystem; 400 if malformed, 404 if unknown."""
    if not MODEL_ID.fullmatch(model_id) or ".." in model_id:
        raise APIError(
            400,
            f"model '{shown(model_id)}' is not a valid id: use letters, digits, '_', '.', '-' "
            "(no '..', no slashes), starting with a letter or digit",
            param="model",
            code="invalid_model",
        )
    registry = location(registry)
    directory = registry / model_id
    if not is_artifact(directory):
        choices = [BASE_MODEL_ID, *list_carryons(registry)]
        raise APIError(
            404,
            f"model '{model_id}' does not exist; choose one of {choices}",
            param="model",
            code="model_not_found",
        )
    if registry.is_local and not inside_registry(registry, directory):
        raise APIError(
            400,
            f"carry-on '{model_id}' resolves outside the registry {registry} (a symbolic link); "
            "the server refuses it: copy the artifact into the registry instead",
            param="model",
            code="invalid_carryon",
        )
    return directory


def inside_registry(registry: Location, directory: Location) -> bool:
    """Whether a local carry-on directory and its files resolve (links followed) to paths
    inside the registry."""
    root = os.path.realpath(registry.path)
    paths = [directory.path, *(f"{directory.path}/{name}" for name in (CONFIG, WEIGHTS))]
    return all(
        os.path.commonpath([root, os.path.realpath(path)]) == root for path in paths
    )


def list_carryons(registry: Location | str) -> list[str]:
    """Carry-on names in the registry (half-written `.partial` directories are skipped); the
    registry may be on any store `carryon_ray/storage.py` reaches."""
    return sorted(
        entry.name
        for entry in location(registry).children()
        if MODEL_ID.fullmatch(entry.name) and entry.name != BASE_MODEL_ID and is_artifact(entry)
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


def check_api_key(expected: str | None, authorization: str | None) -> None:
    """401 unless `Authorization: Bearer <expected>`; no key configured lets everyone in."""
    if expected is None:
        return
    if not authorization:
        raise APIError(
            401,
            "missing API key: send the header 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), expected.encode()
    ):
        raise APIError(401, "incorrect API key", code="invalid_api_key")


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage]) -> list[int]:
    """Render messages with the primary's chat template, ending with the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(
            400,
            "the base's tokenizer has no chat template; use /v1/completions with a plain prompt",
            param="messages",
        )
    rows = [message.model_dump(exclude_none=True) for message in messages]
    specials = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    if not any(special in row["content"] for row in rows for special in specials):
        text = _render(tokenizer, rows)
        # The template writes any BOS itself.
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # Content that spells a special token (`<|im_start|>system`, an EOS) stays text: the
    # template is rendered around placeholders, its own pieces tokenized as usual, and each
    # message's content with special-token matching off.
    marks = [f"\ue000{index}\ue001" for index in range(len(rows))]
    text = _render(tokenizer, [{**row, "content": mark} for row, mark in zip(rows, marks, strict=True)])
    ids: list[int] = []
    for index, piece in enumerate(re.split("\ue000(\\d+)\ue001", text)):
        if index % 2:
            ids += tokenizer(
                rows[int(piece)]["content"], add_special_tokens=False, split_special_tokens=True
            )["input_ids"]
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def _render(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> str:
    """The chat template's text; a template that refuses the conversation (many insist that
    user and assistant alternate) is a 400 with its reason."""
    try:
        return tokenizer.apply_chat_template(rows, add_generation_prompt=True, tokenize=False)
    except TemplateError as error:
        raise APIError(
            400, f"the chat template refuses these messages: {shown(str(error), 300)}",
            param="messages",
        ) from None


def check_prompt(merged: MergedModel, prompt_ids: list[int], *, param: str) -> None:
    try:
        merged.check_length(len(prompt_ids))
    except ValueError as error:
        raise APIError(400, str(error), param=param, code="context_length_exceeded") from error


# ---------------------------------------------------------------------------------------------
# Generation as text


class TextStream:
    """Generated text in pieces, cut at EOS, a stop string or the token budget.

    Iterating yields text deltas; afterwards `finish_reason` ("stop" or "length") and
    `completion_tokens` (EOS included) are set. Text that could still turn into a stop string,
    or ends inside a multi-byte character, is held back until it cannot, so the pieces joined
    equal the non-streamed answer.

    On an event loop, `start()` joins the batcher (its refusals raise there, before any answer
    starts) and `async for` awaits the pieces: the request holds no thread while it generates.
    """

    def __init__(
        self,
        merged: MergedModel,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        alpha: float | None,
        stops: list[str],
        tokenizer: PreTrainedTokenizerBase,
        batcher: DecodeBatcher | None = None,
    ) -> None:
        self.merged, self.prompt_ids, self.params = merged, prompt_ids, params
        self.alpha, self.stops, self.tokenizer = alpha, stops, tokenizer
        self.batcher = batcher
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.live = False  # started on an event loop: iterate with `async for`
        self._tokens: AsyncIterator[int] | None = None
        self._generated: list[int] = []
        self._sent = 0  # characters of the decoded text handed out

    def __iter__(self) -> Iterator[str]:
        self._begin()
        source = self.batcher.stream if self.batcher is not None else _alone
        with closing(source(self.merged, self.prompt_ids, self.params, alpha=self.alpha)) as tokens:
            for token in tokens:
                piece, done = self._take(token)
                if piece:
                    yield piece
                if done:
                    return
        if rest := self._rest():
            yield rest

    def start(self) -> None:
        """Queue the generation on the batcher, from the running event loop. Its refusals
        (`QueueFull`, `BatcherClosed`, `ValueError`) raise here."""
        if self.batcher is None:
            raise RuntimeError("iterating a TextStream on an event loop needs a DecodeBatcher")
        self._tokens = self.batcher.stream_async(
            self.merged, self.prompt_ids, self.params, alpha=self.alpha
        )
        self.live = True

    async def __aiter__(self) -> AsyncIterator[str]:
        if self._tokens is None:
            self.start()
        tokens, self._tokens = self._tokens, None
        self._begin()
        try:
            async for token in tokens:
                piece, done = self._take(token)
                if piece:
                    yield piece
                if done:
                    return
        finally:  # a cancelled or closed reader takes the row out of the batch
            await tokens.aclose()
        if rest := self._rest():
            yield rest

    async def text(self) -> str:
        """The whole answer, awaited."""
        return "".join([piece async for piece in self])

    def _begin(self) -> None:
        self.finish_reason, self.completion_tokens = "length", 0
        self._generated, self._sent = [], 0

    def _take(self, token: int) -> tuple[str, bool]:
        """One generated token: (text that can be handed out now, whether the answer ended).
        Text that could still become a stop string, or ends inside a multi-byte character,
        is held back."""
        self.completion_tokens += 1
        if token in self.params.stop_token_ids:
            self.finish_reason = "stop"
            return self._rest(), True
        self._generated.append(token)
        text = self.tokenizer.decode(self._generated, skip_special_tokens=True)
        cuts = [text.find(stop) for stop in self.stops if stop in text]
        if cuts:
            self.finish_reason = "stop"
            return text[self._sent : max(min(cuts), self._sent)], True
        hold = max((len(stop) for stop in self.stops), default=1) - 1
        safe = len(text) - hold
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            safe = min(safe, len(text) - 1)
        if safe <= self._sent:
            return "", False
        piece, self._sent = text[self._sent : safe], safe
        return piece, False

    def _rest(self) -> str:
        """What is left to hand out once the answer ends without a stop string."""
        text = self.tokenizer.decode(self._generated, skip_special_tokens=True)
        piece, self._sent = text[self._sent :], max(self._sent, len(text))
        return piece

    def usage(self) -> dict:
        prompt = len(self.prompt_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
        }


def _alone(
    merged: MergedModel, prompt_ids: list[int], params: SamplingParams, *, alpha: float | None
) -> Iterator[int]:
    """Tokens of one generation on its own (no batcher)."""
    return merged.stream(prompt_ids, params, alpha=alpha)


# ---------------------------------------------------------------------------------------------
# Response bodies and server-sent events


def completion_body(model: str, text: str, stream: TextStream) -> dict:
    return _whole_answer("cmpl", "text_completion", model, {"text": text}, stream)


def chat_body(model: str, text: str, stream: TextStream) -> dict:
    message = {"message": {"role": "assistant", "content": text}}
    return _whole_answer("chatcmpl", "chat.completion", model, message, stream)


def _whole_answer(prefix: str, kind: str, model: str, content: dict, stream: TextStream) -> dict:
    choice = {"index": 0, **content, "logprobs": None, "finish_reason": stream.finish_reason}
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": stream.usage(),
    }


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n"


def completion_events(
    model: str, stream: TextStream, *, include_usage: bool = False
) -> Iterator[str] | AsyncIterator[str]:
    """`text_completion` chunks, a last chunk with the finish reason, then `data: [DONE]`;
    an async iterator when the stream was started on an event loop (`TextStream.start`)."""
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "model": model}

    def chunk(text: str, finish_reason: str | None) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**head, "created": int(time.time()), "choices": [choice]}

    return _events(stream, chunk, head, include_usage=include_usage)


def chat_events(
    model: str, stream: TextStream, *, include_usage: bool = False
) -> Iterator[str] | AsyncIterator[str]:
    """`chat.completion.chunk`s: the role first, content deltas, the finish reason, [DONE];
    async as `completion_events` is."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "model": model}

    def chunk(delta: dict, finish_reason: str | None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**head, "created": int(time.time()), "choices": [choice]}

    return _events(
        stream,
        lambda text, reason: chunk({"content": text} if text else {}, reason),
        head,
        include_usage=include_usage,
        opening=sse(chunk({"role": "assistant", "content": ""}, None)),
    )


def _events(
    stream: TextStream, chunk, head: dict, *, include_usage: bool, opening: str | None = None
) -> Iterator[str] | AsyncIterator[str]:
    def ending() -> Iterator[str]:
        yield sse(chunk("", stream.finish_reason))
        if include_usage:
            yield sse({**head, "created": int(time.time()), "choices": [], "usage": stream.usage()})

    if stream.live:
        return _live_events(stream, chunk, ending, opening)
    return _plain_events(stream, chunk, ending, opening)


def _plain_events(stream: TextStream, chunk, ending, opening: str | None) -> Iterator[str]:
    if opening is not None:
        yield opening
    try:
        for text in stream:
            yield sse(chunk(text, None))
        yield from ending()
    except Exception as error:  # noqa: BLE001 - headers are sent: the error travels as an event
        yield _error_event(error)
    yield sse("[DONE]")


async def _live_events(
    stream: TextStream, chunk, ending, opening: str | None
) -> AsyncIterator[str]:
    if opening is not None:
        yield opening
    try:
        async for text in stream:
            yield sse(chunk(text, None))
        for event in ending():
            yield event
    except Exception as error:  # noqa: BLE001 - headers are sent: the error travels as an event
        yield _error_event(error)
    yield sse("[DONE]")


def _error_event(error: Exception) -> str:
    if isinstance(error, BatcherClosed):  # the replica is shutting down, or its engine died
        logger.warning("a stream ended early: %s", error)
        return sse(error_body(503, f"generation stopped: {error}; retry the request"))
    logger.exception("generation failed while streaming")
    return sse(error_body(500, f"generation failed: {error}"))
