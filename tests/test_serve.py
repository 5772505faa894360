"""The Serve edge over one local Ray cluster: OpenAI-shaped HTTP answers that equal the
in-process merged model, model ids checked before any file access, 4xx with a reason, and a
registry scanned at request time."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import ray
import requests
import torch
from ray import serve

from carryon_ray.artifacts import load_carryon, save_carryon
from carryon_ray.bases import FrozenBase
from carryon_ray.carry_on import CarryOn, CarryOnConfig
from carryon_ray.config import PipelineConfig, validate_config
from carryon_ray.merged import MergedModel, SamplingParams
from carryon_ray.records import LayerRef, Layout
from carryon_ray.stages.serve import run_server

pytestmark = pytest.mark.ray

PROMPT = "Question: Natalia sold 48 clips"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


@pytest.fixture(scope="module")
def config(tiny_model_dir) -> PipelineConfig:
    return validate_config(
        {
            "name": "serve-test",
            "bases": [{"name": "tiny", "path": str(tiny_model_dir)}],
            "data": {"max_length": 64},
            "serve": {
                "port": free_port(),
                "max_new_tokens_limit": 64,
                "max_carryons_per_replica": 2,
            },
        }
    )


@pytest.fixture(scope="module")
def frozen_base(config) -> FrozenBase:
    return FrozenBase(config.primary)


@pytest.fixture(scope="module")
def server(tmp_path_factory, config, frozen_base) -> tuple[str, Path]:
    """(base URL, registry) of one deployment on one module-scoped local cluster."""
    registry = tmp_path_factory.mktemp("registry")
    export_carryon(registry / "math", frozen_base, seed=1)
    (registry / "not-an-artifact").mkdir()
    if ray.is_initialized():  # another module's cluster: this one needs its own resources
        ray.shutdown()
    ray.init(num_cpus=4, resources={"inference": 100, "training": 100}, include_dashboard=False)
    try:
        run_server(config, registry, blocking=False)
        yield f"http://127.0.0.1:{config.serve.port}", registry
    finally:
        serve.shutdown()
        ray.shutdown()


def complete(url: str, **body) -> requests.Response:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, **body}
    return requests.post(f"{url}/v1/completions", json=body, timeout=60)


def expected_text(base: FrozenBase, directory: Path | None, *, alpha: float | None = None) -> str:
    """Greedy text from the in-process merged model, the reference for the server."""
    if directory is None:
        merged = MergedModel(base)
    else:
        carry_on, layout, artifact = load_carryon(directory, running_bases=[base.identity()])
        merged = MergedModel(base, carry_on, layout, alpha=artifact["alpha"])
    params = SamplingParams(
        max_new_tokens=8, temperature=0.0, stop_token_ids=(base.tokenizer.eos_token_id,)
    )
    ids = merged.generate(base.tokenizer(PROMPT)["input_ids"], params, alpha=alpha)
    return base.tokenizer.decode(ids, skip_special_tokens=True)


def assert_error(reply: requests.Response, status: int, *, param: str | None = None) -> str:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    return error["message"]


def test_models_lists_base_and_carryons(server):
    url, _ = server
    body = requests.get(f"{url}/v1/models", timeout=30).json()
    assert body["object"] == "list"
    assert [entry["id"] for entry in body["data"]] == ["base", "math"]
    assert all(entry["object"] == "model" for entry in body["data"])


def test_health_reports_the_node(server):
    url, _ = server
    body = requests.get(f"{url}/health", timeout=30).json()
    assert body["status"] == "ok" and body["base"] == "tiny"
    assert body["node_id"] == ray.get_runtime_context().get_node_id()


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


def test_alpha_zero_equals_base(server, frozen_base):
    url, _ = server
    zero = complete(url, model="math", carryon_alpha=0).json()["choices"][0]["text"]
    base = complete(url, model="base").json()["choices"][0]["text"]
    assert zero == base == expected_text(frozen_base, None)


def test_stop_string_cuts_the_text(server):
    url, _ = server
    full = complete(url, model="math").json()["choices"][0]
    stop = full["text"][2:4]
    assert stop, "the completion is too short to pick a stop string"
    cut = complete(url, model="math", stop=[stop, "never-seen"]).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full["text"][: full["text"].find(stop)]


def test_unknown_model_is_404(server):
    url, _ = server
    message = assert_error(complete(url, model="nobody"), 404, param="model")
    assert "nobody" in message and "math" in message
    assert_error(complete(url, model="not-an-artifact"), 404, param="model")
    assert_error(requests.get(f"{url}/v1/nowhere", timeout=30), 404)


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
        ("best_of", 2),
    ],
)
def test_bad_parameter_is_400(server, field, value):
    url, _ = server
    message = assert_error(complete(url, model="math", **{field: value}), 400, param=field)
    assert field in message or "stop" in message


def test_malformed_body_is_400(server):
    url, _ = server
    reply = requests.post(f"{url}/v1/completions", json={"prompt": PROMPT}, timeout=30)
    assert_error(reply, 400, param="model")


def test_carryon_of_another_base_is_refused(server, frozen_base):
    url, registry = server
    other = {**frozen_base.identity(), "fingerprint": "0123456789abcdef"}
    export_carryon(registry / "foreign", frozen_base, seed=4, identity=other)
    message = assert_error(complete(url, model="foreign"), 400, param="model")
    assert "fingerprint" in message and "0123456789abcdef" in message
    (registry / "foreign" / "config.json").unlink()  # keep the listing of later tests exact


def test_overlong_prompt_is_400_naming_the_context(server):
    url, _ = server
    message = assert_error(complete(url, model="math", prompt="clips " * 400), 400, param="prompt")
    assert "context holds 256" in message


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
