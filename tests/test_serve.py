"""The Serve edge over one local Ray cluster: OpenAI-shaped HTTP answers (through the official
`openai` client too) that equal the in-process merged model, streaming that equals the plain
answer, model ids checked before any file access, 4xx with a reason, an optional API key, the
app builder, a registry scanned at request time, and a replica killed during traffic."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import ray
import requests
import torch
import yaml
from ray import serve

from carryon_ray.artifacts import load_carryon, save_carryon
from carryon_ray.bases import FrozenBase
from carryon_ray.batching import BatcherClosed
from carryon_ray.carry_on import CarryOn, CarryOnConfig
from carryon_ray.cli import main as carryon_main
from carryon_ray.config import PipelineConfig, ServeSpec, validate_config
from carryon_ray.merged import MergedModel, SamplingParams, prompt_logprobs
from carryon_ray.openai_api import API_KEY_ENV, ChatMessage, chat_prompt_ids
from carryon_ray.records import LayerRef, Layout
from carryon_ray.stages.serve import (
    CarryOnServer,
    app_builder,
    build_app,
    deploy_stage,
    deployment_options,
    resolve_api_key,
    stop_on_sigterm,
)
from tests.conftest import mixture_carryon, save_endless_model
from tests.ray_helpers import free_port

pytestmark = pytest.mark.ray

PROMPT = "Question: Natalia sold 48 clips"
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "How many clips did Natalia sell?"},
]
API_KEY = "sk-test-0123"
SERVE_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "serve.yaml"


def export_carryon(
    directory: Path, base: FrozenBase, *, seed: int, identity: dict[str, str] | None = None
) -> Path:
    """A carry-on whose Δ head is random (not zero), so the merged model differs from the base."""
    ref = LayerRef(base.name, base.num_layers, base.hidden_size)
    bases = [identity or base.identity()]
    layout = Layout.build(codec="absmax", residual=(ref, 8), sources=[(ref, 4)], bases=bases)
    torch.manual_seed(seed)
    carry_on = CarryOn(
        CarryOnConfig(
            input_dims=[base.hidden_size],
            output_dim=base.hidden_size,
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            max_positions=256,
        )
    )
    torch.nn.init.normal_(carry_on.delta.weight, std=1.0)
    return save_carryon(directory, carry_on, layout, alpha=1.0)


def serve_section(**extra) -> dict:
    return {"port": free_port(), "max_new_tokens_limit": 64, "max_carryons_per_replica": 2, **extra}


@pytest.fixture(scope="module")
def config(chat_model_dir) -> PipelineConfig:
    return validate_config(
        {
            "name": "serve-test",
            "bases": [{"name": "tiny", "path": str(chat_model_dir)}],
            "data": {"max_length": 64},
            "serve": serve_section(),
        }
    )


@pytest.fixture(scope="module")
def frozen_base(config) -> FrozenBase:
    return FrozenBase(config.primary)


@pytest.fixture(scope="module")
def server(local_ray, tmp_path_factory, config, frozen_base) -> tuple[str, Path]:
    """(base URL, registry) of one deployment on the module's own local cluster (`local_ray`)."""
    registry = tmp_path_factory.mktemp("registry")
    export_carryon(registry / "math", frozen_base, seed=1)
    (registry / "not-an-artifact").mkdir()
    deploy_stage(config.serve.model_copy(update={"registry": str(registry)}), registry.parent,
                 bases=config.bases)
    return f"http://127.0.0.1:{config.serve.port}", registry


@pytest.fixture(scope="module")
def secure_url(server, tmp_path_factory, chat_model_dir) -> str:
    """A second application, built by `app_builder` from a YAML with an API key and an
    autoscaling section, on the same Serve instance under /secure."""
    url, registry = server
    path = tmp_path_factory.mktemp("secure") / "secure.yaml"
    raw = {
        "name": "secure",
        "bases": [{"name": "tiny", "path": str(chat_model_dir)}],
        "data": {"max_length": 64},
        "serve": serve_section(
            api_key=API_KEY,
            autoscaling={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2},
        ),
    }
    path.write_text(yaml.safe_dump(raw))
    application = app_builder(
        {"config": str(path), "registry": str(registry), "serve.max_new_tokens_limit": "32"}
    )
    serve.run(application, name="secure", route_prefix="/secure")
    return f"{url}/secure"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    url, _ = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key="not-checked", max_retries=0, timeout=60)


def complete(url: str, **body) -> requests.Response:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, **body}
    return requests.post(f"{url}/v1/completions", json=body, timeout=60)


def reference(
    base: FrozenBase,
    directory: Path | None,
    prompt_ids: list[int],
    *,
    alpha: float | None = None,
    max_tokens: int = 8,
) -> str:
    """Greedy text from the in-process merged model, the reference for the server."""
    if directory is None:
        merged = MergedModel(base)
    else:
        carry_on, layout, artifact = load_carryon(directory, running_bases=[base.identity()])
        merged = MergedModel(base, carry_on, layout, alpha=artifact["alpha"])
    params = SamplingParams(
        max_new_tokens=max_tokens, temperature=0.0, stop_token_ids=(base.tokenizer.eos_token_id,)
    )
    ids = merged.generate(prompt_ids, params, alpha=alpha)
    return base.tokenizer.decode(ids, skip_special_tokens=True)


def expected_text(base: FrozenBase, directory: Path | None, *, alpha: float | None = None) -> str:
    return reference(base, directory, base.tokenizer(PROMPT)["input_ids"], alpha=alpha)


def expected_chat(base: FrozenBase, directory: Path | None) -> str:
    messages = [ChatMessage(**message) for message in MESSAGES]
    return reference(base, directory, chat_prompt_ids(base.tokenizer, messages))


def assert_error(reply: requests.Response, status: int, *, param: str | None = None) -> str:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    return error["message"]


def sse_payloads(reply: requests.Response) -> list[str]:
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = [line for line in reply.text.split("\n\n") if line]
    assert all(event.startswith("data: ") for event in events), events
    return [event.removeprefix("data: ") for event in events]


# ---------------------------------------------------------------------------------------------
# Listing and health


def test_models_lists_base_and_carryons(server, client):
    url, _ = server
    body = requests.get(f"{url}/v1/models", timeout=30).json()
    assert body["object"] == "list"
    assert [entry["id"] for entry in body["data"]] == ["base", "math"]
    assert all(entry["object"] == "model" for entry in body["data"])
    assert [model.id for model in client.models.list()] == ["base", "math"]


def test_health_reports_the_node(server):
    url, _ = server
    body = requests.get(f"{url}/health", timeout=30).json()
    assert body["status"] == "ok" and body["base"] == "tiny"
    assert body["node_id"] == ray.get_runtime_context().get_node_id()


# ---------------------------------------------------------------------------------------------
# Parity with the in-process merged model


def test_greedy_carryon_completion_equals_in_process_merge(server, frozen_base):
    url, registry = server
    reply = complete(url, model="math")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "text_completion" and body["model"] == "math"
    assert body["id"].startswith("cmpl-") and body["created"] > 0
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    assert choice["text"] == expected_text(frozen_base, registry / "math")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(frozen_base.tokenizer(PROMPT)["input_ids"])
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # The test only means something if the carry-on changes the output.
    assert choice["text"] != expected_text(frozen_base, None)


def test_openai_client_completion(server, client, frozen_base):
    _, registry = server
    answer = client.completions.create(model="math", prompt=PROMPT, max_tokens=8, temperature=0)
    assert answer.choices[0].text == expected_text(frozen_base, registry / "math")
    assert answer.model == "math" and answer.usage.completion_tokens >= 1


def test_openai_client_chat_uses_the_chat_template(server, client, frozen_base):
    _, registry = server
    answer = client.chat.completions.create(
        model="math", messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    message = answer.choices[0].message
    assert message.role == "assistant"
    assert message.content == expected_chat(frozen_base, registry / "math")
    assert message.content != expected_chat(frozen_base, None)
    rendered = chat_prompt_ids(frozen_base.tokenizer, [ChatMessage(**m) for m in MESSAGES])
    assert answer.usage.prompt_tokens == len(rendered)


def test_alpha_zero_equals_base(server, client, frozen_base):
    url, _ = server
    zero = complete(url, model="math", carryon_alpha=0).json()["choices"][0]["text"]
    base = complete(url, model="base").json()["choices"][0]["text"]
    assert zero == base == expected_text(frozen_base, None)
    through_client = client.completions.create(
        model="math", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"carryon_alpha": 0}
    )
    assert through_client.choices[0].text == base


def test_seeded_sampling_repeats(server):
    url, _ = server
    first = complete(url, model="math", temperature=1.0, top_p=0.9, seed=7).json()
    second = complete(url, model="math", temperature=1.0, top_p=0.9, seed=7).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


def test_multiplexed_header_selects_the_carryon(server, frozen_base):
    url, registry = server
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    headers = {"serve_multiplexed_model_id": "math"}
    reply = requests.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == expected_text(frozen_base, registry / "math")
    clash = requests.post(
        f"{url}/v1/completions", json={**body, "model": "base"}, headers=headers, timeout=60
    )
    assert "serve_multiplexed_model_id" in assert_error(clash, 400, param="model")


def test_concurrent_requests_share_base_passes_and_match_in_process(server, frozen_base):
    url, registry = server
    before = requests.get(f"{url}/health", timeout=30).json()["batching"]
    jobs = [
        (prompt, model)
        for prompt in (PROMPT, "def add(a, b):", "numbers 0 1 2 3", "x")
        for model in ("math", "base")
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(
            pool.map(lambda job: complete(url, prompt=job[0], model=job[1], max_tokens=48), jobs)
        )
    for (prompt, model), reply in zip(jobs, replies, strict=True):
        assert reply.status_code == 200, reply.text
        directory = None if model == "base" else registry / model
        ids = frozen_base.tokenizer(prompt)["input_ids"]
        expected = reference(frozen_base, directory, ids, max_tokens=48)
        assert reply.json()["choices"][0]["text"] == expected, (prompt, model)
    after = requests.get(f"{url}/health", timeout=30).json()["batching"]
    assert after["max_batch_size"] == 8
    steps, rows = after["steps"] - before["steps"], after["rows"] - before["rows"]
    assert rows > steps > 0  # some base steps carried several sequences


# ---------------------------------------------------------------------------------------------
# Streaming


def test_streamed_completion_equals_the_plain_answer(server, client):
    url, _ = server
    plain = complete(url, model="math", max_tokens=12).json()["choices"][0]
    payloads = sse_payloads(complete(url, model="math", max_tokens=12, stream=True))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == plain["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == plain["finish_reason"]
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])
    streamed = client.completions.create(
        model="math", prompt=PROMPT, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == plain["text"]


def test_streamed_chat_equals_the_plain_answer(server, client):
    plain = client.chat.completions.create(
        model="math", messages=MESSAGES, max_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="math",
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_stop_string_cuts_the_text_streamed_or_not(server):
    url, _ = server
    full = complete(url, model="math").json()["choices"][0]
    stop = full["text"][2:4]
    assert stop, "the completion is too short to pick a stop string"
    cut = complete(url, model="math", stop=[stop, "never-seen"]).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full["text"][: full["text"].find(stop)]
    payloads = sse_payloads(complete(url, model="math", stop=[stop], stream=True))
    chunks = [json.loads(payload)["choices"][0] for payload in payloads[:-1]]
    assert "".join(chunk["text"] for chunk in chunks) == cut["text"]
    assert chunks[-1]["finish_reason"] == "stop"


def test_stream_errors_come_before_the_stream(server):
    url, _ = server
    assert_error(complete(url, model="nobody", stream=True), 404, param="model")


# ---------------------------------------------------------------------------------------------
# OpenAI compatibility: logprobs, echo, token-id prompts, neutral parameters, content parts


def in_process(base: FrozenBase, directory: Path) -> MergedModel:
    carry_on, layout, artifact = load_carryon(directory, running_bases=[base.identity()])
    return MergedModel(base, carry_on, layout, alpha=artifact["alpha"])


def test_completion_logprobs_with_echo_are_the_merged_models(server, frozen_base):
    url, registry = server
    tokenizer = frozen_base.tokenizer
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    merged = in_process(frozen_base, registry / "math")
    params = SamplingParams(
        max_new_tokens=6, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,)
    )
    answer_ids = merged.generate(prompt_ids, params)  # an EOS is listed too, as vLLM does
    reply = complete(url, model="math", max_tokens=6, logprobs=2, echo=True).json()
    choice = reply["choices"][0]
    assert choice["text"] == PROMPT + tokenizer.decode(answer_ids, skip_special_tokens=True)
    logprobs = choice["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert all(len(values) == len(prompt_ids + answer_ids) for values in logprobs.values())
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    # The same numbers in process: prompt and answer scored by one prefill through the carry-on.
    scored = prompt_logprobs(merged, prompt_ids + answer_ids, top=2)
    expected = [token.logprob for token in scored]
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=1e-3)
    # Greedy: every generated token is its step's likeliest.
    for logprob, top in zip(logprobs["token_logprobs"][len(prompt_ids) :],
                            logprobs["top_logprobs"][len(prompt_ids) :], strict=True):
        assert len(top) <= 2 and max(top.values()) == logprob
    # Streamed: the echo first, then the same logprobs piece by piece.
    payloads = sse_payloads(complete(url, model="math", max_tokens=6, logprobs=2, echo=True,
                                     stream=True))
    chunks = [json.loads(payload)["choices"][0] for payload in payloads[:-1]]
    assert chunks[0]["text"] == PROMPT
    assert "".join(chunk["text"] for chunk in chunks) == choice["text"]
    joined = [value for chunk in chunks for value in chunk["logprobs"]["token_logprobs"]]
    assert joined == logprobs["token_logprobs"]


def test_echo_with_max_tokens_zero_scores_the_prompt_only(server, client, frozen_base):
    url, registry = server
    prompt_ids = frozen_base.tokenizer(PROMPT)["input_ids"]
    reply = complete(url, model="math", max_tokens=0, logprobs=1, echo=True).json()
    choice = reply["choices"][0]
    assert choice["text"] == PROMPT and reply["usage"]["completion_tokens"] == 0
    scored = prompt_logprobs(in_process(frozen_base, registry / "math"), prompt_ids, top=1)
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [token.logprob for token in scored], abs=1e-3
    )
    assert choice["logprobs"]["text_offset"][0] == 0
    answer = client.completions.create(model="math", prompt=PROMPT, max_tokens=0, echo=True,
                                       logprobs=1, temperature=0)
    assert answer.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        choice["logprobs"]["token_logprobs"][1:]
    )
    assert_error(complete(url, model="math", max_tokens=0), 400, param="max_tokens")


def test_chat_logprobs_streamed_and_not(server, client):
    plain = client.chat.completions.create(
        model="math", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=3,
    )
    content = plain.choices[0].logprobs.content
    assert len(content) == plain.usage.completion_tokens
    assert all(len(item.top_logprobs) == 3 for item in content)
    assert all(item.top_logprobs[0].logprob == item.logprob for item in content)  # greedy
    raw = b"".join(bytes(item.bytes) for item in content)
    assert raw.decode(errors="replace") == plain.choices[0].message.content
    streamed = client.chat.completions.create(
        model="math", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=3, stream=True,
    )
    pieces = [item for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for item in chunk.choices[0].logprobs.content]
    assert [item.logprob for item in pieces] == [item.logprob for item in content]
    without = client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=4)
    assert without.choices[0].logprobs is None
    url, _ = server
    reply = requests.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "math", "messages": MESSAGES, "max_tokens": 2, "top_logprobs": 2})
    assert_error(reply, 400, param="top_logprobs")


@pytest.mark.parametrize("form", ["ids", "[ids]", "[text]"])
def test_prompt_as_token_ids(server, frozen_base, form):
    url, registry = server
    ids = frozen_base.tokenizer(PROMPT)["input_ids"]
    prompt = {"ids": ids, "[ids]": [ids], "[text]": [PROMPT]}[form]
    reply = complete(url, model="math", prompt=prompt)
    assert reply.json()["choices"][0]["text"] == expected_text(frozen_base, registry / "math")


@pytest.mark.parametrize(
    "prompt", [[PROMPT, PROMPT], [[1, 2], [3]], [10**9], [-1], [], [[]], [1.5]]
)
def test_prompts_that_are_not_one_prompt_of_known_ids_are_400(server, prompt):
    url, _ = server
    message = assert_error(complete(url, model="math", prompt=prompt), 400, param="prompt")
    if len(prompt) == 2:
        assert "n=1" in message


def test_neutral_parameters_are_accepted_and_others_refused(server, client, frozen_base):
    url, registry = server
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "best_of": 1,
               "suffix": None, "top_k": -1, "user": "u", "metadata": {"run": "1"},
               "max_completion_tokens": 8}
    reply = complete(url, model="math", **neutral)
    assert reply.json()["choices"][0]["text"] == expected_text(frozen_base, registry / "math")
    answer = client.completions.create(model="math", prompt=PROMPT, max_tokens=8, temperature=0,
                                       presence_penalty=0, frequency_penalty=0, logit_bias={})
    assert answer.choices[0].text == reply.json()["choices"][0]["text"]
    for field, value in [("presence_penalty", 0.1), ("frequency_penalty", 1), ("top_k", 5),
                         ("logit_bias", {"5": 100}), ("suffix", "x"), ("best_of", 3)]:
        message = assert_error(complete(url, model="math", **{field: value}), 400, param=field)
        assert field in message
    chat = {"model": "math", "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    for field, value in [("response_format", {"type": "text"}), ("tools", []),
                         ("tool_choice", "none"), ("store", False), ("service_tier", "auto"),
                         ("parallel_tool_calls", False), ("logprobs", False)]:
        reply = requests.post(f"{url}/v1/chat/completions", json={**chat, field: value}, timeout=60)
        assert reply.status_code == 200, (field, reply.text)
    for field, value in [("response_format", {"type": "json_object"}),
                         ("tools", [{"type": "function", "function": {"name": "f"}}]),
                         ("tool_choice", "required"), ("store", True)]:
        reply = requests.post(f"{url}/v1/chat/completions", json={**chat, field: value}, timeout=60)
        assert field in assert_error(reply, 400, param=field)


def test_chat_without_max_tokens_runs_to_the_server_limit(server, client, frozen_base):
    _, registry = server
    messages = [ChatMessage(**message) for message in MESSAGES]
    ids = chat_prompt_ids(frozen_base.tokenizer, messages)
    answer = client.chat.completions.create(model="math", messages=MESSAGES, temperature=0)
    limit = 64  # serve.max_new_tokens_limit; the context leaves more
    expected = reference(frozen_base, registry / "math", ids, max_tokens=limit)
    assert answer.choices[0].message.content == expected
    assert answer.usage.completion_tokens == limit or answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens > 16 or answer.choices[0].finish_reason == "stop"


def test_chat_content_parts_are_text(server, client):
    url, _ = server
    parts = [{"role": message["role"], "content": [{"type": "text", "text": message["content"]}]}
             for message in MESSAGES]
    as_parts = client.chat.completions.create(model="math", messages=parts, max_tokens=8,
                                              temperature=0)
    plain = client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=8,
                                           temperature=0)
    assert as_parts.choices[0].message.content == plain.choices[0].message.content
    image = [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]
    reply = requests.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "math", "messages": [{"role": "user", "content": image}], "max_tokens": 2})
    assert "image_url" in assert_error(reply, 400, param="messages.0.content")


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_model_is_404(server, client):
    url, _ = server
    message = assert_error(complete(url, model="nobody"), 404, param="model")
    assert "nobody" in message and "math" not in message  # a 404 lists no models
    assert_error(complete(url, model="not-an-artifact"), 404, param="model")
    assert_error(requests.get(f"{url}/v1/nowhere", timeout=30), 404)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nobody", messages=MESSAGES, max_tokens=4)


@pytest.mark.parametrize(
    "model_id", ["../etc", "..evil", "a/b", "/etc/passwd", "a..b", ".hidden", ""]
)
def test_unsafe_model_id_is_400(server, model_id):
    url, _ = server
    assert_error(complete(url, model=model_id), 400, param="model")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", -1),
        ("max_tokens", 65),
        ("temperature", -0.5),
        ("top_p", 0),
        ("top_p", 1.5),
        ("carryon_alpha", -1),
        ("stop", [""]),
        ("n", 2),
        ("best_of", 2),
    ],
)
def test_bad_parameter_is_400(server, field, value):
    url, _ = server
    message = assert_error(complete(url, model="math", **{field: value}), 400, param=field)
    assert field in message or "stop" in message


@pytest.mark.parametrize(
    "body",
    [
        {"model": "math", "messages": []},
        {"model": "math", "messages": [{"role": "wizard", "content": "hi"}]},
        {"model": "math", "prompt": PROMPT},
    ],
)
def test_bad_chat_body_is_400(server, body):
    url, _ = server
    reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert_error(reply, 400)


def test_malformed_body_is_400(server):
    url, _ = server
    reply = requests.post(f"{url}/v1/completions", json={"prompt": PROMPT}, timeout=30)
    assert_error(reply, 400, param="model")
    reply = requests.post(f"{url}/v1/completions", data="{not json", timeout=30)
    assert "JSON" in assert_error(reply, 400)


def test_client_sees_400_as_bad_request(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="math", prompt=PROMPT, max_tokens=4, top_p=2)
    assert caught.value.status_code == 400 and "top_p" in str(caught.value)


def test_carryon_of_another_base_is_refused(server, frozen_base):
    url, registry = server
    other = {**frozen_base.identity(), "fingerprint": "0123456789abcdef"}
    export_carryon(registry / "foreign", frozen_base, seed=4, identity=other)
    message = assert_error(complete(url, model="foreign"), 400, param="model")
    assert "fingerprint" in message and "0123456789abcdef" in message
    shutil.rmtree(registry / "foreign")  # keep the listing of later tests exact


def test_overlong_prompt_is_400_naming_the_context(server):
    url, _ = server
    message = assert_error(complete(url, model="math", prompt="clips " * 400), 400, param="prompt")
    assert "context holds 256" in message
    long_chat = [{"role": "user", "content": "clips " * 400}]
    reply = requests.post(
        f"{url}/v1/chat/completions", json={"model": "base", "messages": long_chat}, timeout=30
    )
    assert "context holds 256" in assert_error(reply, 400, param="messages")


# ---------------------------------------------------------------------------------------------
# API key, autoscaling, app builder (the /secure application)


def test_api_key_is_required_when_configured(secure_url):
    body = {"model": "math", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    missing = requests.post(f"{secure_url}/v1/completions", json=body, timeout=60)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    wrong = requests.post(
        f"{secure_url}/v1/completions",
        json=body,
        headers={"Authorization": "Bearer sk-wrong"},
        timeout=60,
    )
    assert wrong.status_code == 401
    # 401 comes before body validation: a stranger learns nothing about the parameters.
    invalid = requests.post(f"{secure_url}/v1/completions", json={"top_p": 9}, timeout=60)
    assert invalid.status_code == 401
    assert requests.get(f"{secure_url}/v1/models", timeout=60).status_code == 401
    assert requests.get(f"{secure_url}/health", timeout=60).status_code == 200
    right = requests.post(
        f"{secure_url}/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert right.status_code == 200, right.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{secure_url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    keyed = openai.OpenAI(base_url=f"{secure_url}/v1", api_key=API_KEY, max_retries=0)
    assert [model.id for model in keyed.models.list()] == ["base", "math"]


def test_app_builder_applies_overrides_and_autoscaling(secure_url):
    limit = {"model": "base", "prompt": PROMPT, "max_tokens": 33}
    reply = requests.post(
        f"{secure_url}/v1/completions",
        json=limit,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert "limit of 32" in assert_error(reply, 400, param="max_tokens")
    deployment = serve.status().applications["secure"].deployments["CarryOnServer"]
    assert deployment.status == "HEALTHY"


def test_deployment_options_pick_replicas_or_autoscaling():
    fixed = deployment_options(ServeSpec(num_replicas=3), resources={"inference": 1}, num_gpus=1)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {
        "num_cpus": 1.0,
        "num_gpus": 1,
        "resources": {"inference": 1},
    }
    auto = deployment_options(
        ServeSpec(autoscaling={"min_replicas": 0, "max_replicas": 4}), resources={}, num_gpus=0
    )
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 4,
        "target_ongoing_requests": 4.0,
    }
    with pytest.raises(ValueError, match="not both"):
        ServeSpec(num_replicas=2, autoscaling={})
    with pytest.raises(ValueError, match="min_replicas"):
        ServeSpec(autoscaling={"min_replicas": 3, "max_replicas": 2})


def test_api_key_comes_from_config_or_environment(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert resolve_api_key(ServeSpec()) is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key(ServeSpec()) == "from-env"
    assert resolve_api_key(ServeSpec(api_key="from-config")) == "from-config"


def test_serve_config_file_names_the_app_builder():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    (application,) = schema.applications
    assert application.import_path == "carryon_ray.stages.serve:app_builder"
    assert Path(application.args["config"]).name == "demo.yaml"


def test_carryon_serve_without_a_registry_is_one_clear_error(capsys):
    assert carryon_main(["serve", "--set", "serve.registry=/no/such/registry"]) == 2
    assert "/no/such/registry" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A mixture of LLMs: the replica runs every base the carry-on reads


def test_mixture_carryon_is_served_with_every_base(
    server, tmp_path_factory, chat_model_dir, other_model_dir
):
    url, _ = server
    config = validate_config(
        {
            "name": "mixture",
            "bases": [
                {"name": "tiny", "path": str(chat_model_dir)},
                {"name": "other", "path": str(other_model_dir)},
            ],
            "sources": [{"base": "tiny", "layer": -1}, {"base": "other", "layer": -1}],
            "data": {"max_length": 64},
            "serve": serve_section(),
        }
    )
    primary, other = FrozenBase(config.bases[0]), FrozenBase(config.bases[1])
    carry_on, layout = mixture_carryon(primary, other)
    registry = tmp_path_factory.mktemp("mixture-registry")
    save_carryon(registry / "mix", carry_on, layout, alpha=1.0)
    serve.run(build_app(config.serve, config.bases, registry), name="mixture", route_prefix="/mixture")

    health = requests.get(f"{url}/mixture/health", timeout=30).json()
    assert health["bases"] == ["tiny", "other"]
    reply = requests.post(
        f"{url}/mixture/v1/completions",
        json={"model": "mix", "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    merged = MergedModel(primary, carry_on, layout, alpha=1.0, others={"other": other})
    params = SamplingParams(
        max_new_tokens=8, temperature=0.0, stop_token_ids=(primary.tokenizer.eos_token_id,)
    )
    ids = merged.generate(primary.tokenizer(PROMPT)["input_ids"], params)
    expected = primary.tokenizer.decode(ids, skip_special_tokens=True)
    assert reply.json()["choices"][0]["text"] == expected
    assert expected != expected_text(primary, None)
    serve.delete("mixture")


# ---------------------------------------------------------------------------------------------
# Carry-ons that arrive after start, and a replica that dies


def test_carryon_exported_after_start_is_served(server, frozen_base):
    url, registry = server
    late = export_carryon(registry / "late", frozen_base, seed=2)
    listed = [entry["id"] for entry in requests.get(f"{url}/v1/models", timeout=30).json()["data"]]
    assert listed == ["base", "late", "math"]
    first = complete(url, model="late").json()["choices"][0]["text"]
    assert first == expected_text(frozen_base, late)
    # Re-exporting under the same name replaces what the replica serves (no stale LRU entry).
    export_carryon(late, frozen_base, seed=3)
    second = complete(url, model="late").json()["choices"][0]["text"]
    assert second == expected_text(frozen_base, late)
    assert second != first


def test_lru_evicts_and_reloads(server, frozen_base):
    """Three carry-ons through an LRU of two: each answer still equals its own artifact."""
    url, registry = server
    for name, seed in (("lru-a", 11), ("lru-b", 12)):
        export_carryon(registry / name, frozen_base, seed=seed)
    for name in ("lru-a", "lru-b", "math", "lru-a"):
        text = complete(url, model=name).json()["choices"][0]["text"]
        assert text == expected_text(frozen_base, registry / name), name


def replica_actor_names(app_name: str) -> list[str]:
    return sorted(
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == "serve"
        and actor["name"].startswith(f"SERVE_REPLICA::{app_name}#CarryOnServer#")
    )


def test_replica_killed_during_traffic_recovers(server):
    """Kill the only replica while clients send requests: later requests succeed."""
    url, _ = server
    (victim,) = replica_actor_names("carryon")
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                statuses.append(complete(url, model="math", max_tokens=4).status_code)
            except requests.RequestException:
                statuses.append(-1)

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        while len(statuses) < 3:
            time.sleep(0.05)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        deadline = time.monotonic() + 90
        while replica_actor_names("carryon") in ([], [victim]) and time.monotonic() < deadline:
            time.sleep(0.5)
        recovered = False
        while not recovered and time.monotonic() < deadline:
            recovered = complete(url, model="math", max_tokens=4).status_code == 200
            time.sleep(0.2)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    assert recovered, "no request succeeded within 90 s of the kill"
    assert replica_actor_names("carryon") != [victim]
    after = [complete(url, model="math", max_tokens=4).status_code for _ in range(5)]
    assert after == [200] * 5
    assert statuses.count(200) >= 3


# ---------------------------------------------------------------------------------------------
# The engine under load: a full batch through HTTP, a bounded queue, clients that go away, and
# an engine that dies


@pytest.fixture(scope="module")
def endless_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny base that never ends a greedy answer early (its EOS embedding row is zero, so
    that logit is 0 while the largest of the others is positive) and holds 1,100 tokens."""
    return save_endless_model(tmp_path_factory.mktemp("endless"), tiny_tokenizer, hidden_size=128, layers=4)


@pytest.fixture(scope="module")
def busy_url(server, endless_dir, tmp_path_factory) -> str:
    """An application over the endless base: a batch of 8, 8 more may wait, long answers."""
    url, _ = server
    config = validate_config(
        {
            "name": "busy",
            "bases": [{"name": "endless", "path": str(endless_dir)}],
            "data": {"max_length": 64},
            "serve": serve_section(
                max_new_tokens_limit=1000,
                max_batch_size=8,
                max_queued_requests=8,
                max_ongoing_requests=64,  # the replica, not Serve's proxy, queues and refuses
            ),
        }
    )
    registry = tmp_path_factory.mktemp("busy-registry")
    serve.run(build_app(config.serve, config.bases, registry), name="busy", route_prefix="/busy")
    assert complete(f"{url}/busy", model="base").status_code == 200  # warm
    yield f"{url}/busy"
    serve.delete("busy")


def batching(url: str) -> dict:
    reply = requests.get(f"{url}/health", timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()["batching"]


def test_sixteen_concurrent_requests_keep_the_batch_full(busy_url):
    """Non-streamed requests hold no thread while they generate, so all 16 reach the engine
    and the batch of 8 stays full (with a thread each, at most cpu_count + 4 were in flight)."""
    before = batching(busy_url)
    start = threading.Barrier(16)

    def one(_: int) -> requests.Response:
        start.wait()
        return complete(busy_url, model="base", max_tokens=128)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(one, range(16)))
    for reply in replies:
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 128
    after = batching(busy_url)
    steps, rows = after["steps"] - before["steps"], after["rows"] - before["rows"]
    assert rows == 16 * 127  # the first token of each comes from its prefill
    assert rows / steps >= 0.9 * 8, (rows, steps)
    assert after["mean_batch_size"] > 0
    # While 8 requests waited for room, every step carried a full batch.
    queued_steps = after["queued_steps"] - before["queued_steps"]
    queued_rows = after["queued_rows"] - before["queued_rows"]
    assert queued_steps > 0 and queued_rows / queued_steps >= 0.9 * 8, (queued_rows, queued_steps)
    assert after["mean_queued_batch_size"] >= 0.9 * 8


def test_a_full_queue_is_429_and_clients_that_leave_stop_their_generations(busy_url):
    before = batching(busy_url)
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 1000, "temperature": 0}
    streams: list[requests.Response] = []
    try:
        for _ in range(16):  # 8 run, 8 wait
            reply = requests.post(
                f"{busy_url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=60
            )
            assert reply.status_code == 200, reply.text
            streams.append(reply)
        refused = requests.post(f"{busy_url}/v1/completions", json=body, timeout=60)
        assert "max_queued_requests" in assert_error(refused, 429)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refused.headers["Retry-After"]) >= 1
        now = batching(busy_url)
        assert now["running"] + now["prefilling"] == 8 and now["waiting"] == 8, now
    finally:
        for reply in streams:
            reply.close()  # the clients go away
    # The engine counts a waiting or prefilling request as abandoned when it next looks at it.
    deadline = time.monotonic() + 30
    now = batching(busy_url)
    while (now["running"] or now["waiting"] or now["prefilling"]
           or now["abandoned"] - before["abandoned"] < 16) and time.monotonic() < deadline:
        time.sleep(0.1)
        now = batching(busy_url)
    assert now["running"] == now["waiting"] == now["prefilling"] == 0, now
    assert now["abandoned"] - before["abandoned"] == 16, now
    # Had they run on, the first 8 alone would have taken 999 steps.
    assert now["steps"] - before["steps"] < 999


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # on purpose
def test_check_health_fails_once_the_engine_dies(config, tmp_path, monkeypatch):
    """Serve calls `check_health` periodically and replaces a replica whose check raises."""
    threads = torch.get_num_threads()
    deployment_class = CarryOnServer.func_or_class.__bases__[0]  # the class under the ingress
    replica = deployment_class(config.bases, config.serve, str(tmp_path))
    torch.set_num_threads(threads)  # outside a Ray actor the replica takes one thread
    try:
        replica.check_health()

        def die() -> None:
            raise SystemExit("engine killed")

        monkeypatch.setattr(replica.batcher, "_step", die)
        with pytest.raises(BatcherClosed, match="died"):
            list(replica.batcher.stream(replica.plain, [5, 6, 7], SamplingParams()))
        replica.batcher._thread.join(timeout=10)
        with pytest.raises(RuntimeError, match="engine killed"):
            replica.check_health()
        assert replica.batching_stats()["running"] == 0
    finally:
        replica.batcher.close()


def test_loading_a_carryon_never_stalls_running_streams(config, tmp_path, frozen_base):
    """A carry-on loads on the replica's loader thread and only the loaded model reaches the
    engine: a load that waits for the running stream to take three more steps finishes (on
    the engine thread it would wait forever), and the loaded carry-on then generates."""
    threads = torch.get_num_threads()
    deployment_class = CarryOnServer.func_or_class.__bases__[0]  # the class under the ingress
    replica = deployment_class(config.bases, config.serve, str(tmp_path))
    torch.set_num_threads(threads)  # outside a Ray actor the replica takes one thread
    export_carryon(tmp_path / "math", frozen_base, seed=1)
    load, seen = replica._load, {}

    def slow_load(directory):
        seen["thread"] = threading.current_thread()
        before, deadline = replica.batcher.steps, time.monotonic() + 60
        while replica.batcher.steps < before + 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        seen["steps"] = replica.batcher.steps - before
        return load(directory)

    replica._load = slow_load
    try:
        params = SamplingParams(max_new_tokens=200)
        running = replica.batcher.stream(replica.plain, [5, 6, 7], params)
        next(running)  # the stream runs
        loaded = asyncio.run(replica._loader()("math"))
        assert seen["steps"] >= 3  # the engine stepped the stream while the carry-on loaded
        assert seen["thread"] is not replica.batcher._thread
        running.close()
        ids, params = [5, 6, 7, 8], SamplingParams(max_new_tokens=4)
        assert list(replica.batcher.stream(loaded.merged, ids, params)) == loaded.merged.generate(
            ids, params
        )
    finally:
        replica.batcher.close()


def test_sigterm_stops_the_driver_as_ctrl_c_does():
    """`carryon serve` turns SIGTERM into KeyboardInterrupt (then Serve drains and shuts down)
    from the deploy on, instead of Ray's native stack dump and abort."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------
# An evaluation harness as the client: EleutherAI's lm_eval (`local-completions`)

CHOICE_DOCS = [
    {"question": "Natalia sold 48 clips in April and", "choices": [" half", " dog", " 72"],
     "answer": 0},
    {"question": "The quick brown fox jumps over the", "choices": [" lazy dog", " clips"],
     "answer": 0},
    {"question": "def add(a, b): return", "choices": [" a + b", " May", " fox"], "answer": 0},
    {"question": "Python lists are", "choices": [" mutable sequences", " 24 clips"],
     "answer": 0},
]
GENERATION_DOCS = [
    {"question": "Question: Natalia sold 48 clips", "answer": "72"},
    {"question": "What is 4 + 4?", "answer": "8"},
    {"question": "The quick brown fox", "answer": "jumps"},
]


def lm_eval_task(directory: Path, name: str, docs: list[dict], extra: dict) -> None:
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": "{{question}}",
        **extra,
    }
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(task))


def test_lm_eval_scores_and_generates_through_the_server(
    server, frozen_base, chat_model_dir, tmp_path, monkeypatch
):
    """lm_eval's `local-completions` model against the server: a multiple-choice task (echo +
    logprobs + max_tokens 1 on token-id prompts) whose log-likelihoods equal the in-process
    merged model's, and a generation task whose answers equal in-process greedy decoding."""
    lm_eval = pytest.importorskip("lm_eval", reason="pip install -e '.[dev]' installs lm_eval")
    from lm_eval.tasks import TaskManager

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    url, registry = server
    lm_eval_task(tmp_path, "carryon_choice", CHOICE_DOCS, {
        "output_type": "multiple_choice",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}],
    })
    lm_eval_task(tmp_path, "carryon_generate", GENERATION_DOCS, {
        "output_type": "generate_until",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    })
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{url}/v1/completions",
            "model": "math",
            "tokenizer": str(chat_model_dir),
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "num_concurrent": 1,
            "max_retries": 1,
            "max_length": 200,
        },
        tasks=["carryon_choice", "carryon_generate"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        limit=4,
        log_samples=True,
    )
    assert "acc,none" in results["results"]["carryon_choice"]
    assert "exact_match,none" in results["results"]["carryon_generate"]
    tokenizer = frozen_base.tokenizer
    merged = in_process(frozen_base, registry / "math")
    choices = results["samples"]["carryon_choice"]
    assert len(choices) == len(CHOICE_DOCS)
    for sample in choices:
        for (context, continuation), [(loglikelihood, _)] in zip(
            sample["arguments"], sample["resps"], strict=True
        ):
            context_ids = tokenizer(context)["input_ids"]
            whole = tokenizer(context + continuation)["input_ids"]
            scored = prompt_logprobs(merged, whole, top=1)[len(context_ids) - 1 :]
            assert loglikelihood == pytest.approx(sum(token.logprob for token in scored), abs=1e-3)
    generations = results["samples"]["carryon_generate"]
    assert len(generations) == len(GENERATION_DOCS)
    for sample in generations:
        [[text]] = sample["resps"]
        ids = tokenizer(sample["arguments"][0][0])["input_ids"]
        assert text == reference(frozen_base, registry / "math", ids, max_tokens=8).split("\n")[0]


def test_lm_eval_over_http_and_in_process_agree(server, frozen_base, chat_model_dir, tmp_path, monkeypatch):
    """The same lm_eval tasks through the server (`local-completions`) and in this process
    (`carryon eval`'s model class, `carryon_ray/harness.py`): the same scores, per document."""
    lm_eval = pytest.importorskip("lm_eval", reason="pip install -e '.[dev]' installs lm_eval")
    from lm_eval.tasks import TaskManager

    from carryon_ray.harness import CarryOnLM

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    url, registry = server
    lm_eval_task(tmp_path, "http_choice", CHOICE_DOCS, {
        "output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}],
    })
    lm_eval_task(tmp_path, "http_generate", GENERATION_DOCS, {
        "output_type": "generate_until", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    })
    tasks = ["http_choice", "http_generate"]
    common = {"tasks": tasks, "limit": 3, "log_samples": True,
              "task_manager": TaskManager(include_path=str(tmp_path), include_defaults=False)}
    over_http = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{url}/v1/completions", "model": "math", "tokenizer": str(chat_model_dir),
                    "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 1,
                    "max_retries": 1, "max_length": 200},
        **common,
    )
    model = CarryOnLM(in_process(frozen_base, registry / "math"))
    try:
        local = lm_eval.simple_evaluate(model=model, **common)
    finally:
        model.close()
    assert over_http["results"]["http_choice"]["acc,none"] == local["results"]["http_choice"]["acc,none"]
    assert (over_http["results"]["http_generate"]["exact_match,none"]
            == local["results"]["http_generate"]["exact_match,none"])
    for http_sample, local_sample in zip(over_http["samples"]["http_choice"], local["samples"]["http_choice"],
                                         strict=True):
        for [(http_score, _)], [(local_score, _)] in zip(http_sample["resps"], local_sample["resps"], strict=True):
            assert http_score == pytest.approx(local_score, abs=1e-3)
    assert ([sample["resps"] for sample in over_http["samples"]["http_generate"]]
            == [sample["resps"] for sample in local["samples"]["http_generate"]])
