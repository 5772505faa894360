"""OpenAI's completion protocol over a merged model, without any server or Ray.

Request bodies (`/v1/completions`, `/v1/chat/completions` with the `carryon_alpha`
extension), the error shape `{"error": {message, type, param, code}}`, model-id checks, and
the answers cut from a `text_stream.TextStream`: whole bodies and server-sent event chunks,
with OpenAI's logprobs shapes. The Serve edge (`stages/serve.py`) wires these into HTTP routes.
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
from typing import TYPE_CHECKING, Literal

from jinja2 import TemplateError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from carryon_ray.artifacts import CONFIG, MAX_ALPHA, WEIGHTS, is_artifact
from carryon_ray.batching import BatcherClosed
from carryon_ray.detokenize import token_bytes, token_text
from carryon_ray.merged import MAX_TOP_LOGPROBS, MergedModel, SamplingParams
from carryon_ray.storage import VERSION_NAME, Location, location
from carryon_ray.text_stream import TextStream, TokenLogprob

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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


# Parameters of OpenAI's API this server does not implement: accepted at the values that
# leave sampling as it is (what clients send as defaults), refused with a 400 naming them
# otherwise. `metadata`, `user`, `prompt_cache_key` and `safety_identifier` only tag a
# request and are taken as they come.
NEUTRAL: dict[str, tuple[object, ...]] = {
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "top_k": (0, -1),  # vLLM's extension: 0 or -1 turn it off
    "best_of": (1,),
    "suffix": ("",),
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "store": (False,),
    "service_tier": ("auto", "default"),
    "modalities": (["text"],),
}


def _neutral(value: object, info: ValidationInfo) -> object:
    allowed = NEUTRAL[info.field_name]
    if value is not None and value not in allowed:
        choices = " or ".join(json.dumps(choice) for choice in (None, *allowed))
        raise ValueError(
            f"this server does not implement {info.field_name}; leave it out or send {choices}"
        )
    return value


class _Sampling(BaseModel):
    """Fields shared by both endpoints. `model` may be left out when the request carries
    Serve's `serve_multiplexed_model_id` header instead."""

    model_config = STRICT

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)  # 0: completions with echo only (scoring)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0 (or below MIN_TEMPERATURE) = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # torch.Generator's range
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    carryon_alpha: float | None = Field(None, ge=0.0, le=MAX_ALPHA)
    # Not implemented: only their neutral values (NEUTRAL).
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    top_k: int | None = None

    _neutral = field_validator(
        "presence_penalty", "frequency_penalty", "logit_bias", "top_k", check_fields=False
    )(_neutral)

    def model_post_init(self, context: object) -> None:
        if self.max_completion_tokens is None:
            return
        if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise APIError(
                400,
                f"max_tokens={self.max_tokens} and max_completion_tokens="
                f"{self.max_completion_tokens} differ; send one of them",
                param="max_completion_tokens",
            )
        self.max_tokens = self.max_completion_tokens

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(stop == "" for stop in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        if len(stops) > 4:
            raise APIError(400, f"at most 4 stop strings, got {len(stops)}", param="stop")
        return stops

    def top_logprobs_count(self) -> int | None:
        """How many alternatives each token's log-probability comes with; None: no logprobs."""
        return None

    def default_max_tokens(self, *, limit: int, room: int | None) -> int:
        return 16  # OpenAI's default for completions

    def sampling(
        self, *, stop_token_ids: tuple[int, ...], limit: int, room: int | None = None
    ) -> SamplingParams:
        """`limit`: the server's max_tokens limit; `room`: context tokens the prompt leaves
        (None: not known, the limit alone bounds a default)."""
        max_tokens = self.max_tokens
        if max_tokens is None:
            max_tokens = self.default_max_tokens(limit=limit, room=room)
        elif max_tokens > limit:
            param = "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"
            raise APIError(
                400,
                f"{param}={max_tokens} exceeds this server's limit of {limit}",
                param=param,
            )
        greedy = self.temperature < MIN_TEMPERATURE or self.top_p < MIN_TOP_P
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=0.0 if greedy else self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop_token_ids=stop_token_ids,
            logprobs=self.top_logprobs_count(),
        )


class CompletionRequest(_Sampling):
    """OpenAI's /v1/completions body; `carryon_alpha` overrides the carry-on's α.

    `prompt` is a string or a list of token ids, or a one-element list of either (one
    prompt per request). `logprobs: k` returns each token's log-probability and its k most
    likely alternatives; `echo` puts the prompt before the completion (with `logprobs`, the
    prompt's tokens are scored too, the first one null); `max_tokens: 0` with `echo` scores a
    prompt without generating."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    _neutral_completion = field_validator("best_of", "suffix")(_neutral)

    @field_validator("prompt", mode="plain")
    @classmethod
    def _one_prompt(cls, value: object) -> str | list[int]:
        def ids(items: object) -> bool:  # a bool is not a token id
            return isinstance(items, list) and all(type(item) is int for item in items)

        if (
            isinstance(value, list)
            and value
            and all(isinstance(item, str) or ids(item) for item in value)
            and not ids(value)
        ):
            if len(value) > 1:
                raise ValueError(
                    f"{len(value)} prompts in one request; this server answers one prompt per "
                    "request (n=1): send them as separate requests"
                )
            value = value[0]
        if isinstance(value, str) or (ids(value) and value):
            return value
        raise ValueError(
            "prompt must be a string or a non-empty list of token ids (or a one-element list "
            "of either)"
        )

    def model_post_init(self, context: object) -> None:
        super().model_post_init(context)
        if self.max_tokens == 0 and not self.echo:
            raise APIError(
                400,
                "max_tokens=0 generates nothing; send max_tokens >= 1, or echo=true to score "
                "the prompt",
                param="max_tokens",
            )

    def top_logprobs_count(self) -> int | None:
        return self.logprobs


def _content_text(value: object) -> object:
    """Chat content given as OpenAI's content parts: the text parts joined by newlines (as
    vLLM does); any other part is refused."""
    if not isinstance(value, list):
        return value
    texts = []
    for number, part in enumerate(value):
        if not (isinstance(part, dict) and part.get("type") == "text"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(
                f"content part {number} is of type {shown(str(kind))}; this server takes "
                "text parts only ({'type': 'text', 'text': ...})"
            )
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise ValueError(f"content part {number} must be {{'type': 'text', 'text': string}}")
        texts.append(part["text"])
    return "\n".join(texts)


class ChatMessage(BaseModel):
    model_config = STRICT

    # "developer" is OpenAI's newer name for "system", and is rendered as one.
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule

    _parts = field_validator("content", mode="before")(_content_text)

    def model_post_init(self, context: object) -> None:
        if self.role == "developer":
            self.role = "system"


class ChatCompletionRequest(_Sampling):
    """OpenAI's /v1/chat/completions body; rendered with the primary's chat template.
    Without max_tokens the answer may fill the context (up to the server's limit).
    `logprobs: true` returns each token's log-probability, with `top_logprobs` alternatives."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None  # no tools: no effect either way
    functions: list | None = None
    function_call: str | dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None

    _neutral_chat = field_validator(
        "response_format", "tools", "tool_choice", "functions", "function_call", "store",
        "service_tier", "modalities",
    )(_neutral)

    def model_post_init(self, context: object) -> None:
        super().model_post_init(context)
        if self.max_tokens == 0:
            raise APIError(400, "max_tokens must be >= 1", param="max_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def default_max_tokens(self, *, limit: int, room: int | None) -> int:
        return limit if room is None else max(0, min(limit, room))


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


def check_model_id(model_id: str) -> tuple[str, str | None]:
    """(name, version or None) of `NAME` or `NAME@VERSION`; 400 when either is malformed. Done
    before any file access or access check, so every caller gets the same answer for it."""
    name, pinned, version = model_id.partition("@")
    if not MODEL_ID.fullmatch(name) or ".." in name:
        raise APIError(
            400,
            f"model '{shown(model_id)}' is not a valid id: use letters, digits, '_', '.', '-' "
            "(no '..', no slashes), starting with a letter or digit, optionally followed by "
            "'@VERSION' to pin a version",
            param="model",
            code="invalid_model",
        )
    if pinned and (name == BASE_MODEL_ID or not VERSION_NAME.fullmatch(version)):
        raise APIError(
            400,
            f"model '{shown(model_id)}': '{shown(version)}' is not a carry-on version (the "
            "registry names versions by their UTC time, e.g. 20260101T120000.000000000-0123abcd)",
            param="model",
            code="invalid_model",
        )
    return name, version if pinned else None


def model_not_found(model_id: str) -> APIError:
    """The one 404 for a model that does not exist and for one the caller may not use: the
    answer tells a caller nothing about other tenants' models (and names none)."""
    return APIError(
        404,
        f"model '{shown(model_id)}' does not exist; GET /v1/models lists the models you can use",
        param="model",
        code="model_not_found",
    )


def carryon_dir(registry: Location | str, model_id: str) -> Location:
    """Validate a model id (`NAME` or `NAME@VERSION`) before touching the filesystem; 400 if
    malformed, 404 if unknown. `NAME` is the current version, `NAME@VERSION` any stored one."""
    name, version = check_model_id(model_id)
    registry = location(registry)
    directory = registry / name
    if version is not None:
        directory = directory.version(version)
    if not is_artifact(directory):
        raise model_not_found(model_id)
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
    files = directory.current() or directory  # the version its pointer names
    paths = [directory.path, files.path, *(f"{files.path}/{name}" for name in (CONFIG, WEIGHTS))]
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


def checked_token_ids(prompt_ids: list[int], vocab_size: int) -> list[int]:
    """A prompt given as token ids; 400 for an id outside the tokenizer's vocabulary."""
    bad = next((token for token in prompt_ids if not 0 <= token < vocab_size), None)
    if bad is not None:
        raise APIError(
            400,
            f"prompt holds token id {shown(str(bad))}, outside the vocabulary [0, {vocab_size})",
            param="prompt",
        )
    return prompt_ids


def check_prompt(merged: MergedModel, prompt_ids: list[int], *, param: str) -> None:
    try:
        merged.check_length(len(prompt_ids))
    except ValueError as error:
        raise APIError(400, str(error), param=param, code="context_length_exceeded") from error


# ---------------------------------------------------------------------------------------------
# Response bodies and server-sent events


def completion_logprobs(
    tokenizer: PreTrainedTokenizerBase, entries: list[TokenLogprob]
) -> dict:
    """OpenAI's completions shape: {tokens, token_logprobs, top_logprobs, text_offset}, each
    alternative named by its text (ids with the same text keep the likelier)."""
    top_logprobs = []
    for entry in entries:
        if entry.top is None:
            top_logprobs.append(None)
            continue
        named: dict[str, float] = {}
        for token, logprob in entry.top:
            named.setdefault(token_text(tokenizer, token), logprob)
        top_logprobs.append(named)
    return {
        "tokens": [token_text(tokenizer, entry.token) for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": top_logprobs,
        "text_offset": [entry.offset for entry in entries],
    }


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, entries: list[TokenLogprob]) -> dict:
    """OpenAI's chat shape: {content: [{token, logprob, bytes, top_logprobs}], refusal}."""

    def named(token: int, logprob: float) -> dict:
        return {
            "token": token_text(tokenizer, token),
            "logprob": logprob,
            "bytes": list(token_bytes(tokenizer, token)),
        }

    content = [
        {
            **named(entry.token, entry.logprob),
            "top_logprobs": [named(token, logprob) for token, logprob in entry.top or ()],
        }
        for entry in entries
    ]
    return {"content": content, "refusal": None}


def completion_body(model: str, text: str, stream: TextStream) -> dict:
    echo = stream.echo
    logprobs = None
    if stream.params.logprobs is not None:
        entries = (echo.logprobs if echo is not None else []) + stream.logprobs
        logprobs = completion_logprobs(stream.tokenizer, entries)
    text = text if echo is None else echo.text + text
    return _whole_answer("cmpl", "text_completion", model, {"text": text}, stream, logprobs)


def chat_body(model: str, text: str, stream: TextStream) -> dict:
    message = {"message": {"role": "assistant", "content": text}}
    logprobs = None
    if stream.params.logprobs is not None:
        logprobs = chat_logprobs(stream.tokenizer, stream.logprobs)
    return _whole_answer("chatcmpl", "chat.completion", model, message, stream, logprobs)


def _whole_answer(
    prefix: str, kind: str, model: str, content: dict, stream: TextStream, logprobs: dict | None
) -> dict:
    choice = {"index": 0, **content, "logprobs": logprobs, "finish_reason": stream.finish_reason}
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
    """`text_completion` chunks (the echoed prompt first, when asked), a last chunk with the
    finish reason, then `data: [DONE]`; an async iterator when the stream was started on an
    event loop (`TextStream.start`). With logprobs, each chunk carries those of its tokens."""
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "model": model}
    wanted = stream.params.logprobs is not None

    def chunk(
        text: str, finish_reason: str | None, entries: list[TokenLogprob] | None = None
    ) -> dict:
        entries = stream.drain() if entries is None else entries
        logprobs = completion_logprobs(stream.tokenizer, entries) if wanted else None
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**head, "created": int(time.time()), "choices": [choice]}

    opening = None
    if stream.echo is not None:
        opening = sse(chunk(stream.echo.text, None, stream.echo.logprobs))
    return _events(stream, chunk, head, include_usage=include_usage, opening=opening)


def chat_events(
    model: str, stream: TextStream, *, include_usage: bool = False
) -> Iterator[str] | AsyncIterator[str]:
    """`chat.completion.chunk`s: the role first, content deltas, the finish reason, [DONE];
    async as `completion_events` is. With logprobs, a chunk carries those of its tokens."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "model": model}
    wanted = stream.params.logprobs is not None

    def chunk(delta: dict, finish_reason: str | None, logprobs: dict | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**head, "created": int(time.time()), "choices": [choice]}

    def piece(text: str, finish_reason: str | None) -> dict:
        entries = stream.drain()
        logprobs = chat_logprobs(stream.tokenizer, entries) if wanted and entries else None
        return chunk({"content": text} if text else {}, finish_reason, logprobs)

    return _events(
        stream,
        piece,
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
