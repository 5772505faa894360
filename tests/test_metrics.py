"""Serving metrics: how a replica records them (statuses, bounded model tags, tokens counted
when a stream ends, a failing metric that fails no request), and as Prometheus reads them: one
deployment on the module's local cluster, a few requests (plain, streamed, chat, a carry-on LRU
of one that evicts, a 404 and a 400), then Ray's metrics endpoint on the node, polled until
every metric shows what was done."""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.request
from collections import deque
from types import SimpleNamespace

import pytest
import ray
import requests
from fastapi.responses import JSONResponse, StreamingResponse

from carryon_ray.bases import FrozenBase
from carryon_ray.config import validate_config
from carryon_ray.openai_api import APIError
from carryon_ray.stages.serve import LoadedCarryOn, deploy_stage
from carryon_ray.stages.serve_metrics import ServeMetrics
from tests.test_serve import PROMPT, export_carryon, serve_section


class Recorder:
    """A metric that remembers (value, tags) of each record, or fails every one."""

    def __init__(self, *, fail: bool = False) -> None:
        self.calls: list[tuple[float, dict]] = []
        self.fail = fail

    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        if self.fail:
            raise RuntimeError("the metrics agent is gone")
        self.calls.append((value, dict(tags or {})))

    observe = set = inc


def recorded(*, fail: bool = False) -> ServeMetrics:
    """ServeMetrics over a fake batcher, every metric a `Recorder`."""
    batcher = SimpleNamespace(
        first_token_seconds=deque([0.5]),
        token_gap_seconds=deque([0.01, 0.02]),
        steps=3,
        rows=5,
        running=2,
        waiting=1,
        max_batch_size=8,
    )
    metrics = ServeMetrics(batcher)
    for name, value in vars(metrics).items():
        if hasattr(value, "_tag_keys"):  # a Ray metric
            setattr(metrics, name, Recorder(fail=fail))
    return metrics


def statuses(metrics: ServeMetrics) -> list[tuple[str, str, str]]:
    return [(tags["model"], tags["endpoint"], tags["status"]) for _, tags in metrics.requests.calls]


def test_requests_are_counted_by_bounded_model_and_status():
    metrics = recorded()

    async def refused():
        raise APIError(404, "model 'no-such' does not exist")

    async def busy():
        metrics.name_model("math")  # the server names a model once the registry has it
        return JSONResponse(status_code=429, content={})

    async def answered():
        metrics.name_model("base")
        metrics.follow(SimpleNamespace(completion_tokens=5))
        return {"choices": []}

    async def cancelled():
        raise asyncio.CancelledError

    async def run():
        with pytest.raises(APIError):
            await metrics.answer("completions", refused())
        assert (await metrics.answer("completions", busy())).status_code == 429
        assert await metrics.answer("chat_completions", answered()) == {"choices": []}
        with pytest.raises(asyncio.CancelledError):
            await metrics.answer("completions", cancelled())

    asyncio.run(run())
    assert statuses(metrics) == [
        ("unknown", "completions", "404"),
        ("math", "completions", "429"),
        ("base", "chat_completions", "200"),
        ("unknown", "completions", "499"),
    ]
    assert metrics.generated_tokens.calls == [(5, {"model": "base"})]


def test_a_stream_counts_its_tokens_when_it_ends():
    metrics = recorded()
    stream = SimpleNamespace(completion_tokens=0)

    async def events():
        for _ in range(3):
            stream.completion_tokens += 1
            yield "data: {}\n\n"

    async def streamed():
        metrics.name_model("math")
        metrics.follow(stream)
        return StreamingResponse(events(), media_type="text/event-stream")

    async def run():
        response = await metrics.answer("completions", streamed())
        assert metrics.generated_tokens.calls == []  # nothing generated yet
        return [chunk async for chunk in response.body_iterator]

    assert len(asyncio.run(run())) == 3
    assert statuses(metrics) == [("math", "completions", "200")]
    assert metrics.generated_tokens.calls == [(3, {"model": "math"})]


def test_a_failing_metric_fails_no_request():
    metrics = recorded(fail=True)

    async def answered():
        metrics.follow(SimpleNamespace(completion_tokens=2))
        metrics.carryon_loaded("math", 0.1, resident=True)
        metrics.carryon_used("math")
        metrics.eviction_callback("math")()
        return {"ok": True}

    assert asyncio.run(metrics.answer("completions", answered())) == {"ok": True}
    metrics._safe(metrics.flush)  # as the flushing task calls it: logged, not raised


def test_flush_drains_the_engine_timings_and_counts_steps_once():
    metrics = recorded()
    metrics.flush()
    metrics.flush()
    assert [value for value, _ in metrics.time_to_first_token.calls] == [0.5]
    assert [value for value, _ in metrics.inter_token_latency.calls] == [0.01, 0.02]
    assert [value for value, _ in metrics.decode_steps.calls] == [3]
    assert [value for value, _ in metrics.decode_rows.calls] == [5]
    assert metrics.batch_occupancy.calls[-1][0] == 0.25


def test_hits_loads_and_evictions():
    metrics = recorded()

    async def first_use():
        metrics.carryon_loaded("math", 0.2, resident=True)  # the loader, for this request
        metrics.carryon_used("math")
        return {}

    async def again():
        metrics.carryon_used("math")
        return {}

    async def run():
        await metrics.answer("completions", first_use())
        await metrics.answer("completions", again())

    asyncio.run(run())
    assert metrics.carryon_loads.calls == [(1, {"model": "math"})]
    assert metrics.carryon_load_seconds.calls == [(0.2, {"model": "math"})]
    assert metrics.carryon_hits.calls == [(1, {"model": "math"})]
    entry = LoadedCarryOn(merged=None, version="v1", on_evict=metrics.eviction_callback("math"))
    entry.__del__()  # as Serve's LRU calls it; the garbage collector calls it again
    del entry
    assert metrics.carryon_evictions.calls == [(1, {"model": "math"})]
    metrics.flush()
    assert metrics.carryons_loaded.calls[-1][0] == 0


SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@pytest.fixture(scope="module")
def fast_export(request):
    """`local_ray` started with a 1 s metrics export interval (Ray's default is 10 s)."""
    saved = os.environ.get("RAY_metrics_report_interval_ms")
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    try:
        request.getfixturevalue("local_ray")
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_metrics_report_interval_ms", None)
        else:
            os.environ["RAY_metrics_report_interval_ms"] = saved


@pytest.fixture(scope="module")
def url(fast_export, tmp_path_factory, chat_model_dir) -> str:
    """A deployment whose LRU holds one carry-on, with "math" and "code" in its registry."""
    config = validate_config(
        {
            "name": "metrics-test",
            "bases": [{"name": "tiny", "path": str(chat_model_dir)}],
            "data": {"max_length": 64},
            "serve": serve_section(max_carryons_per_replica=1),
        }
    )
    registry = tmp_path_factory.mktemp("registry")
    base = FrozenBase(config.primary)
    export_carryon(registry / "math", base, seed=1)
    export_carryon(registry / "code", base, seed=2)
    deploy_stage(
        config.serve.model_copy(update={"registry": str(registry)}),
        registry.parent,
        bases=config.bases,
    )
    return f"http://127.0.0.1:{config.serve.port}"


def scrape() -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample on this node's metrics endpoint."""
    port = ray._private.worker.global_worker.node.metrics_export_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and not line.startswith("#"):
            name, labels, value = match.groups()
            samples.append((name, dict(LABEL.findall(labels or "")), float(value)))
    return samples


def total(samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(
        value
        for sample, tags, value in samples
        if sample == name and all(tags.get(key) == want for key, want in labels.items())
    )


def completion(url: str, model: str, **body) -> requests.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **body}
    return requests.post(f"{url}/v1/completions", json=body, timeout=60)


@pytest.mark.ray
def test_metrics_count_requests_tokens_latency_batches_and_carryon_loads(url):
    # math (loaded), math (a hit), code (loaded: math evicted), math (loaded: code evicted)
    for model in ("math", "math", "code", "math"):
        assert completion(url, model).status_code == 200
    streamed = completion(url, "base", stream=True)
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    chat = requests.post(
        f"{url}/v1/chat/completions",
        json={"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert chat.status_code == 200
    assert completion(url, "no-such-carryon").status_code == 404
    assert completion(url, "../math").status_code == 400  # refused before any file access

    requests_total = "ray_carryon_requests_total"
    wanted = {  # (name, labels) -> the least value
        (requests_total, ("model", "math"), ("endpoint", "completions"), ("status", "200")): 3,
        (requests_total, ("model", "base"), ("endpoint", "completions"), ("status", "200")): 1,
        (requests_total, ("model", "base"), ("endpoint", "chat_completions"), ("status", "200")): 1,
        (requests_total, ("model", "unknown"), ("status", "404")): 1,
        (requests_total, ("status", "400")): 1,
        ("ray_carryon_generated_tokens_total", ("model", "math")): 3,
        ("ray_carryon_generated_tokens_total", ("model", "code")): 1,
        ("ray_carryon_generated_tokens_total", ("model", "base")): 2,
        ("ray_carryon_time_to_first_token_seconds_count",): 6,
        ("ray_carryon_inter_token_latency_seconds_count",): 1,
        ("ray_carryon_decode_steps_total",): 1,
        ("ray_carryon_decode_rows_total",): 1,
        ("ray_carryon_carryon_loads_total", ("model", "math")): 2,
        ("ray_carryon_carryon_loads_total", ("model", "code")): 1,
        ("ray_carryon_carryon_load_seconds_count", ("model", "math")): 2,
        ("ray_carryon_carryon_cache_hits_total", ("model", "math")): 1,
        ("ray_carryon_carryon_evictions_total", ("model", "math")): 1,
        ("ray_carryon_carryon_evictions_total", ("model", "code")): 1,
    }
    deadline = time.monotonic() + 60  # the agent exports every second here, 10 s by default
    while True:
        samples = scrape()
        missing = {
            key: total(samples, key[0], **dict(key[1:]))
            for key, least in wanted.items()
            if total(samples, key[0], **dict(key[1:])) < least
        }
        names = {name for name, _, _ in samples}
        gauges = {"ray_carryon_batch_occupancy", "ray_carryon_carryons_loaded"}
        if not missing and gauges <= names:
            break
        mine = [sample for sample in samples if sample[0].startswith("ray_carryon")]
        assert time.monotonic() < deadline, f"metrics short of what was done: {missing}, {mine}"
        time.sleep(1.0)

    # Tags stay bounded: a client's unknown model id is never a tag value.
    assert not [tags for _, tags, _ in samples if tags.get("model") == "no-such-carryon"]
    assert total(samples, requests_total, model="math", status="200") == 3
    assert total(samples, "ray_carryon_carryon_loads_total", model="math") == 2
    assert total(samples, "ray_carryon_carryon_cache_hits_total", model="math") == 1
    assert total(samples, "ray_carryon_carryons_loaded") == 1  # an LRU of one
    steps = total(samples, "ray_carryon_decode_steps_total")
    assert steps <= total(samples, "ray_carryon_decode_rows_total")
    occupancy = total(samples, "ray_carryon_batch_occupancy")
    assert 0 <= occupancy <= 1
    first = total(samples, "ray_carryon_time_to_first_token_seconds_sum")
    assert 0 < first < 60
