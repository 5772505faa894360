"""Serve overhead on one server over the real base (SmolLM2-135M-Instruct, packaged GGUF).

One Serve deployment on 127.0.0.1 with a registry of `--carryons` carry-ons (h=256, 3 layers,
4 heads: the default shape; random Δ so they change the output), then, in order:

1. base vs carry-on: sequential greedy requests, alternating `base` and one carry-on, each
   `--max-tokens` long: tokens/s and p50/p95 latency. Target: the carry-on's throughput loss
   is at most 10% of the base's (multi-LoRA servers lose up to ~50% with one adapter).
2. round-robin over every carry-on, twice: the first pass loads each one (cold), the second
   finds them in the replica's LRU (warm switch: every request names another carry-on). Extra
   latency = p50 of the pass minus p50 of the same request repeated on one loaded carry-on.
3. soak: `--clients` concurrent clients for `--soak-seconds` over base and the carry-ons.
   Target: zero errors. Throughput reported.
4. split-topology cost: the round trip of one decode step's hidden state (1 x 1 x D float32)
   to another Ray actor and back, which a base deployment separate from the carry-on front would
   pay per generated token; compared with the base's own time per token.
5. batching (in-process, server stopped): 8 concurrent carry-on generations, each in its own
   thread (a server without batching) vs through the continuous batcher (`serve.max_batch_size`).

6. the anchor (before Serve starts, same dtype as the server): the base's own `generate()` in
   this process, greedy, one stream and a left-padded batch of 8 (`--max-batch-size`), as
   many tokens as part 1's requests. Targets through HTTP: one client (part 1's base requests)
   >= 0.9x the single stream; 16 concurrent non-streamed clients >= 0.8x the batch.
7. 16 concurrent non-streamed clients on the base, `--concurrent-requests` (4) each: tokens/s,
   and the engine's mean batch over the steps it took while requests waited for room (from
   `/health`'s `queued_` counters; target >= 0.9 x max_batch_size), so the ramp-up and the
   tail of the burst, where fewer than 8 requests are left, are not counted; the mean over
   every step of the phase is shown beside it.
8. a long prompt joining: 7 streams count upward; once they run, a `--long-prompt`-token
   prompt (1,500) joins. p95 of the gaps between the streams' tokens while it is prefilled
   against the p95 over the seconds before (target <= 2x).
9. a mixture (the base + `--mixture-base`, Gemma-3-270M): per-token time around the 16th and
   the 256th generated token (median gap over 17 tokens, two streams; target: 256th <= 1.3x
   the 16th), the base's beside.
Part 3's soak sends every 10th request hostile (malformed bodies, out-of-range values, unknown
models): target 0 answers >= 500, and every normal request answered 200.

Parts 1-3 and 7-9 run with the server's continuous batching on (`--max-batch-size 8`, the
default); `--max-batch-size 1` runs them without.

    python benchmarks/serve_overhead.py [--json PATH] [--carryons 50] [--soak-seconds 60]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import publish
from carryon_ray.artifacts import save_carryon
from carryon_ray.bases import FrozenBase
from carryon_ray.batching import DecodeBatcher
from carryon_ray.carry_on import CarryOn, CarryOnConfig
from carryon_ray.config import BaseSpec, validate_config
from carryon_ray.merged import MergedModel, SamplingParams
from carryon_ray.records import LayerRef, Layout

PROMPTS = [
    (
        "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
        "clips in May. How many clips did Natalia sell altogether in April and May?\nAnswer:"
    ),
    (
        "Question: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
        "babysitting. How much did she earn?\nAnswer:"
    ),
    (
        "Question: Betty is saving money for a new wallet which costs $100. She has only half of the "
        "money she needs. How much more money does Betty need?\nAnswer:"
    ),
    (
        "Question: James writes a 3-page letter to 2 different friends twice a week. How many pages "
        "does he write a year?\nAnswer:"
    ),
]
COUNTING = "Count from one upward: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"
OVERHEAD_TARGET = 0.10
ONE_CLIENT_TARGET, MANY_CLIENTS_TARGET, MEAN_BATCH_TARGET = 0.9, 0.8, 0.9
JOIN_GAP_TARGET, MIXTURE_GROWTH_TARGET = 2.0, 1.3
# Every 10th soak request: (path, raw body) a client could send by mistake or on purpose.
HOSTILE = [
    ("/v1/completions", b'{"model": "base", "prompt": "\xff\xfe", "max_tokens": 2}'),
    ("/v1/completions", b'{"model": "base", "prompt": "x", "temperature": NaN}'),
    ("/v1/completions", b'{"model": "base", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("/v1/completions", b'{"model": "base", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"),
    ("/v1/completions", b'{"model": "base", "prompt": "x", "seed": 18446744073709551616}'),
    ("/v1/completions", b'{"model": "nobody", "prompt": "x"}'),
    ("/v1/completions", b'{"model": "base", "prompt": "\\ud800"}'),
    ("/v1/completions", b'{"model": "base", "prompt": "x", "max_tokens": 100000000}'),
    ("/v1/completions", b'{"model": "base", "prompt": 7}'),
    ("/v1/chat/completions", b'{"model": "base", "messages": []}'),
    ("/v1/completions", b"not json at all"),
    ("/v1/completions", b'{"model": "../../etc/passwd", "prompt": "x"}'),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def make_carryon(base: FrozenBase, seed: int) -> tuple[CarryOn, Layout]:
    """A carry-on of the default shape (random, nonzero Δ) with the real base's identity."""
    ref = LayerRef(base.name, base.num_layers, base.hidden_size)
    layout = Layout.build(
        codec="absmax", residual=(ref, 8), sources=[(ref, 4)], bases=[base.identity()]
    )
    torch.manual_seed(seed)
    carry_on = CarryOn(
        CarryOnConfig(
            input_dims=[base.hidden_size],
            output_dim=base.hidden_size,
            hidden_size=256,
            num_layers=3,
            num_heads=4,
            max_positions=1024,
        )
    )
    torch.nn.init.normal_(carry_on.delta.weight, std=0.05)  # a trained-looking, nonzero Δ
    return carry_on, layout


def make_registry(registry: Path, base: FrozenBase, count: int) -> list[str]:
    """`count` carry-ons of the default shape in a registry."""
    names = []
    for index in range(count):
        carry_on, layout = make_carryon(base, seed=index)
        name = f"user-{index:03d}"
        save_carryon(registry / name, carry_on, layout, alpha=1.0)
        names.append(name)
    return names


class Client:
    def __init__(self, url: str) -> None:
        self.url = url
        self.local = threading.local()

    def complete(self, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
        """(seconds, completion tokens); raises on any non-200 answer."""
        session = getattr(self.local, "session", None)
        if session is None:
            session = self.local.session = requests.Session()
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        start = time.perf_counter()
        reply = session.post(f"{self.url}/v1/completions", json=body, timeout=300)
        seconds = time.perf_counter() - start
        if reply.status_code != 200:
            raise RuntimeError(f"{reply.status_code}: {reply.text[:200]}")
        return seconds, reply.json()["usage"]["completion_tokens"]


def summarize(samples: list[tuple[float, int]]) -> dict:
    seconds = [s for s, _ in samples]
    tokens = sum(t for _, t in samples)
    return {
        "requests": len(samples),
        "tokens": tokens,
        "tokens_per_s": tokens / sum(seconds),
        "p50_s": statistics.median(seconds),
        "p95_s": percentile(seconds, 0.95),
        "mean_tokens": tokens / len(samples),
    }


def base_vs_carryon(client: Client, carryon: str, rounds: int, max_tokens: int) -> dict:
    samples: dict[str, list[tuple[float, int]]] = {"base": [], carryon: []}
    for index in range(rounds):
        prompt = PROMPTS[index % len(PROMPTS)]
        order = ("base", carryon) if index % 2 == 0 else (carryon, "base")
        for model in order:
            samples[model].append(client.complete(model, prompt, max_tokens))
    base, merged = summarize(samples["base"]), summarize(samples[carryon])
    # Each round's two requests ran back to back on the same prompt, so their ratio cancels
    # drift in what else the machine is doing; the target uses the median of these ratios.
    ratios = [
        (tokens_c / seconds_c) / (tokens_b / seconds_b)
        for (seconds_b, tokens_b), (seconds_c, tokens_c) in zip(
            samples["base"], samples[carryon], strict=True
        )
    ]
    return {
        "base": base,
        "carryon": merged,
        "overhead": 1.0 - statistics.median(ratios),
        "overhead_aggregate": 1.0 - merged["tokens_per_s"] / base["tokens_per_s"],
    }


def switching(client: Client, names: list[str], max_tokens: int) -> dict:
    prompt = PROMPTS[0]
    cold = [client.complete(name, prompt, max_tokens)[0] for name in names]
    warm = [client.complete(name, prompt, max_tokens)[0] for name in names]
    same = [client.complete(names[0], prompt, max_tokens)[0] for _ in range(len(names) // 2)]
    reference = statistics.median(same)
    return {
        "reference_p50_s": reference,
        "cold_p50_s": statistics.median(cold),
        "warm_switch_p50_s": statistics.median(warm),
        "cold_extra_p50_s": statistics.median(cold) - reference,
        "warm_switch_extra_p50_s": statistics.median(warm) - reference,
    }


def soak(client: Client, names: list[str], clients: int, seconds: float, max_tokens: int) -> dict:
    models = ["base", *names]
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    samples: list[tuple[float, int]] = []
    errors: list[str] = []

    hostile: list[int] = []  # their status codes

    def worker(offset: int) -> None:
        turn, sent = offset, 0
        session = requests.Session()
        while time.monotonic() < deadline:  # bounded: no new request after the deadline
            sent += 1
            if sent % 10 == 0:  # every 10th request is hostile
                path, body = HOSTILE[(turn + sent) % len(HOSTILE)]
                reply = session.post(f"{client.url}{path}", data=body, timeout=300,
                                     headers={"Content-Type": "application/json"})
                with lock:
                    hostile.append(reply.status_code)
                continue
            model = models[turn % len(models)]
            turn += clients
            try:
                sample = client.complete(model, PROMPTS[turn % len(PROMPTS)], max_tokens)
            except Exception as error:  # noqa: BLE001 - every failure is counted, none hidden
                with lock:
                    errors.append(str(error))
                continue
            with lock:
                samples.append(sample)

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.monotonic() - start
    summary = summarize(samples) if samples else {"requests": 0, "tokens": 0}
    summary.update(
        clients=clients,
        wall_s=wall,
        errors=len(errors),
        first_errors=errors[:3],
        hostile=len(hostile),
        hostile_server_errors=sum(status >= 500 for status in hostile),
        hostile_statuses=sorted(set(hostile)),
        throughput_tokens_per_s=summary["tokens"] / wall,
        requests_per_s=summary["requests"] / wall,
    )
    return summary


def generate_anchor(base: FrozenBase, tokens: int, batch: int, repeats: int = 3) -> dict:
    """The base's own `generate()` in this process, greedy, exactly `tokens` new tokens: one
    stream (part 1's prompts in turn) and a left-padded batch of `batch`; best of `repeats`."""
    tokenizer = base.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run(prompts: list[str]) -> float:
        rows = [tokenizer(prompt)["input_ids"] for prompt in prompts]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
        start = time.perf_counter()
        with torch.no_grad():
            out = base.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens,
                                      min_new_tokens=tokens, do_sample=False, pad_token_id=pad)
        seconds = time.perf_counter() - start
        return (out.shape[1] - width) * len(rows) / seconds

    single = max(run([PROMPTS[i % len(PROMPTS)]]) for i in range(repeats))
    batched = max(run([PROMPTS[(i + j) % len(PROMPTS)] for j in range(batch)]) for i in range(repeats))
    return {"dtype": str(base.dtype).removeprefix("torch."), "tokens": tokens, "batch": batch,
            "single_tokens_per_s": single, "batch_tokens_per_s": batched}


def health(url: str) -> dict:
    return requests.get(f"{url}/health", timeout=60).json()["batching"]


def concurrent_clients(client: Client, clients: int, requests_each: int, max_tokens: int) -> dict:
    """`clients` concurrent non-streamed greedy requests on the base, `requests_each` each:
    aggregate tokens/s and the engine's mean batch over the phase (from /health)."""
    before = health(client.url)
    start = time.perf_counter()

    def worker(offset: int) -> list[tuple[float, int]]:
        return [client.complete("base", PROMPTS[(offset + i) % len(PROMPTS)], max_tokens)
                for i in range(requests_each)]

    with ThreadPoolExecutor(clients) as pool:
        samples = [sample for part in pool.map(worker, range(clients)) for sample in part]
    wall = time.perf_counter() - start
    after = health(client.url)
    steps, rows = after["steps"] - before["steps"], after["rows"] - before["rows"]
    queued_steps = after["queued_steps"] - before["queued_steps"]
    queued_rows = after["queued_rows"] - before["queued_rows"]
    return {**summarize(samples), "clients": clients, "wall_s": wall,
            "throughput_tokens_per_s": sum(t for _, t in samples) / wall,
            "steps": steps, "rows": rows, "mean_batch_size": rows / max(steps, 1),
            "queued_steps": queued_steps, "queued_rows": queued_rows,
            "mean_queued_batch_size": queued_rows / max(queued_steps, 1),
            "max_batch_size": after["max_batch_size"]}


def stream_times(url: str, body: dict, out: list[float], started: threading.Event | None = None) -> None:
    """Append the arrival time of each streamed piece of a completion to `out`."""
    with requests.post(f"{url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=600) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"{reply.status_code}: {reply.text[:200]}")
        for line in reply.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                payload = json.loads(line[6:])
                if payload.get("choices") and payload["choices"][0].get("text"):
                    out.append(time.perf_counter())
                    if started is not None and len(out) >= 8:
                        started.set()


def long_prompt_join(client: Client, base: FrozenBase, streams: int, prompt_tokens: int) -> dict:
    """`streams` greedy streams count upward; once each has run a while, a `prompt_tokens`-token
    prompt joins (max_tokens 1). p95 of the streams' token gaps while it is in (from its send to
    its answer) against the p95 over the 3 s before it."""
    ids = base.tokenizer((" ".join(PROMPTS) + " ") * 40)["input_ids"][:prompt_tokens]
    times: list[list[float]] = [[] for _ in range(streams)]
    ready = [threading.Event() for _ in range(streams)]
    body = {"model": "base", "prompt": COUNTING, "max_tokens": 400, "temperature": 0}
    threads = [threading.Thread(target=stream_times, args=(client.url, body, times[i], ready[i]))
               for i in range(streams)]
    for thread in threads:
        thread.start()
    for event in ready:
        event.wait(timeout=300)
    time.sleep(3.0)
    joined = time.perf_counter()
    reply = requests.post(f"{client.url}/v1/completions", timeout=600,
                          json={"model": "base", "prompt": ids, "max_tokens": 1, "temperature": 0})
    answered = time.perf_counter()
    for thread in threads:
        thread.join()
    steady, during = [], []
    for arrivals in times:
        for earlier, later in itertools.pairwise(arrivals):
            if joined - 3.0 <= later < joined:
                steady.append(later - earlier)
            elif joined <= later and earlier <= answered:  # a gap overlapping the join
                during.append(later - earlier)
    if reply.status_code != 200 or not steady or not during:
        return {"error": f"join {reply.status_code}; {len(steady)} steady and {len(during)} joined gaps"}
    return {"streams": streams, "prompt_tokens": len(ids), "join_s": answered - joined,
            "steady_p95_s": percentile(steady, 0.95), "join_p95_s": percentile(during, 0.95),
            "join_max_s": max(during), "ratio": percentile(during, 0.95) / percentile(steady, 0.95)}


def per_token_growth(url: str, model: str, tokens: int = 272, at: tuple[int, int] = (16, 256),
                     streams: int = 2) -> dict:
    """Per-token time of a greedy stream around two positions: the median gap over the 17
    tokens around each, pooled over `streams` streams one after another (one slow token, a
    pause of the machine, moves a median little; a mean of a few gaps it moved by 1.5x)."""
    windows: list[list[float]] = [[] for _ in at]
    for _ in range(streams):
        arrivals: list[float] = []
        stream_times(url, {"model": model, "prompt": COUNTING, "max_tokens": tokens, "temperature": 0}, arrivals)
        if len(arrivals) < at[1] + 9:
            return {"error": f"the stream ended after {len(arrivals)} pieces"}
        gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
        for window, k in zip(windows, at, strict=True):
            window.extend(gaps[k - 9 : k + 8])
    first, second = (statistics.median(window) for window in windows)
    return {"model": model, "positions": list(at), "first_s": first, "second_s": second, "ratio": second / first}


def split_round_trip(hidden_size: int, calls: int = 300) -> dict:
    """p50/p95 of a Ray actor call carrying one token's hidden state there and back."""
    import ray

    @ray.remote(num_cpus=0)
    class Front:
        def step(self, hidden: torch.Tensor) -> torch.Tensor:
            return hidden

    front = Front.remote()
    hidden = torch.randn(1, 1, hidden_size)
    ray.get(front.step.remote(hidden))
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        ray.get(front.step.remote(hidden))
        seconds.append(time.perf_counter() - start)
    ray.kill(front)
    return {"p50_ms": 1000 * statistics.median(seconds), "p95_ms": 1000 * percentile(seconds, 0.95)}


def batching_gain(merged: MergedModel, clients: int, tokens: int, repeats: int = 2) -> dict:
    """In-process, one replica's work: `clients` concurrent greedy generations of `tokens`
    tokens each (a carry-on, the four prompts in turn), run (a) each in its own thread over its
    own base pass, as a server without batching does, and (b) through the continuous batcher.
    The two alternate `repeats` times; the best of each counts."""
    tokenizer = merged.base.tokenizer
    prompts = [tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(clients)]
    params = SamplingParams(max_new_tokens=tokens)
    batcher = DecodeBatcher(merged.base, max_batch_size=clients)

    def threads(generate) -> float:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            produced = sum(pool.map(lambda ids: len(generate(ids)), prompts))
        return produced / (time.perf_counter() - start)

    best = {"threads": 0.0, "batched": 0.0}
    try:
        for _ in range(repeats):
            best["threads"] = max(best["threads"], threads(lambda ids: merged.generate(ids, params)))
            best["batched"] = max(
                best["batched"], threads(lambda ids: list(batcher.stream(merged, ids, params)))
            )
    finally:
        batcher.close()
    return {
        "clients": clients,
        "tokens_each": tokens,
        "threads_tokens_per_s": best["threads"],
        "batched_tokens_per_s": best["batched"],
        "speedup": best["batched"] / best["threads"],
        "mean_batch_size": batcher.mean_batch_size,
    }


def make_mixture(directory: Path, base: FrozenBase, other: FrozenBase) -> None:
    """A carry-on of the default shape reading the last layer of both bases."""
    refs = [LayerRef(b.name, b.num_layers, b.hidden_size) for b in (base, other)]
    layout = Layout.build(codec="absmax", residual=(refs[0], 8), sources=[(refs[0], 4), (refs[1], 4)],
                          bases=[base.identity(), other.identity()])
    torch.manual_seed(7)
    carry_on = CarryOn(CarryOnConfig(input_dims=[base.hidden_size, other.hidden_size],
                                     output_dim=base.hidden_size, hidden_size=256, num_layers=3,
                                     num_heads=4, max_positions=1024))
    torch.nn.init.normal_(carry_on.delta.weight, std=0.05)
    save_carryon(directory, carry_on, layout, alpha=1.0)


def attempt(function, *args) -> dict:
    """A part's figures, or {"error": ...}: one failing part does not lose the others."""
    try:
        return function(*args)
    except Exception as error:  # noqa: BLE001 - reported in the table and the JSON
        return {"error": f"{type(error).__name__}: {str(error)[:200]}"}


def targets(results: dict) -> list[dict]:
    """Each target: name, measured, bound, holds (None: not measured in this run)."""
    anchor, pair, many = results["anchor"], results["base_vs_carryon"], results["concurrent"]
    soak_run, join, growth = results["soak"], results["join"], results["growth"]

    def target(name: str, measured: float | None, bound: float, at_most: bool) -> dict:
        holds = None if measured is None else (measured <= bound if at_most else measured >= bound)
        return {"name": name, "measured": measured, "target": bound, "holds": holds}

    mixture = growth.get("mixture", {})
    many_ok = "error" not in many
    return [
        target("carry-on throughput loss vs base <= 0.10", pair["overhead"], OVERHEAD_TARGET, True),
        target("1 client through HTTP / generate() single stream >= 0.9",
               pair["base"]["tokens_per_s"] / anchor["single_tokens_per_s"], ONE_CLIENT_TARGET, False),
        target(f"{soak_run['clients']} clients through HTTP / generate() batch {anchor['batch']} >= 0.8",
               many["throughput_tokens_per_s"] / anchor["batch_tokens_per_s"] if many_ok else None,
               MANY_CLIENTS_TARGET, False),
        target(f"mean batch while requests wait, {soak_run['clients']} non-streamed clients / max_batch_size >= 0.9",
               many["mean_queued_batch_size"] / many["max_batch_size"] if many_ok else None,
               MEAN_BATCH_TARGET, False),
        target("p95 token gap while a long prompt joins / steady p95 <= 2", join.get("ratio"), JOIN_GAP_TARGET, True),
        target("mixture per-token time, 256th / 16th token <= 1.3", mixture.get("ratio"), MIXTURE_GROWTH_TARGET, True),
        target("soak: normal requests failed == 0", float(soak_run["errors"]), 0, True),
        target("soak: answers >= 500 to hostile requests == 0", float(soak_run["hostile_server_errors"]), 0, True),
    ]


def table(results: dict) -> str:
    pair, switch, load, split, batch = (
        results["base_vs_carryon"],
        results["switching"],
        results["soak"],
        results["split"],
        results["batching"],
    )
    rows = [
        ("base: tokens/s (sequential)", f"{pair['base']['tokens_per_s']:.1f}"),
        (
            "base: p50 / p95 latency (s)",
            f"{pair['base']['p50_s']:.3f} / {pair['base']['p95_s']:.3f}",
        ),
        ("carry-on: tokens/s (sequential)", f"{pair['carryon']['tokens_per_s']:.1f}"),
        (
            "carry-on: p50 / p95 latency (s)",
            f"{pair['carryon']['p50_s']:.3f} / {pair['carryon']['p95_s']:.3f}",
        ),
        (
            "carry-on throughput loss vs base, median of pairs (target <= 10%)",
            f"{100 * pair['overhead']:.1f}% (aggregate {100 * pair['overhead_aggregate']:.1f}%)",
        ),
        (
            f"round-robin over {results['setup']['carryons']}: cold load, extra p50 (s)",
            f"{switch['cold_extra_p50_s']:.3f}",
        ),
        ("round-robin: warm switch, extra p50 (s)", f"{switch['warm_switch_extra_p50_s']:.3f}"),
        (
            f"soak {load['clients']} clients x {load['wall_s']:.0f} s: requests / errors",
            f"{load['requests']} / {load['errors']}",
        ),
        ("soak: throughput tokens/s", f"{load['throughput_tokens_per_s']:.1f}"),
        ("soak: p50 / p95 latency (s)", f"{load['p50_s']:.2f} / {load['p95_s']:.2f}"),
        (
            "split topology: actor round trip per token, p50 / p95 (ms)",
            (
                f"{split['p50_ms']:.2f} / {split['p95_ms']:.2f} "
                f"({100 * split['share']:.1f}% of the base's {split['base_ms_per_token']:.1f} ms/token)"
            ),
        ),
        (
            f"{batch['clients']} concurrent carry-on generations, tokens/s: "
            + "a thread each -> continuous batching (in-process)",
            (
                f"{batch['threads_tokens_per_s']:.1f} -> {batch['batched_tokens_per_s']:.1f} "
                f"(x{batch['speedup']:.2f}, mean batch {batch['mean_batch_size']:.1f})"
            ),
        ),
    ]
    anchor, many, join, growth = results["anchor"], results["concurrent"], results["join"], results["growth"]
    rows += [
        (f"anchor: generate() in-process ({anchor['dtype']}), tokens/s: 1 stream / batch {anchor['batch']}",
         f"{anchor['single_tokens_per_s']:.1f} / {anchor['batch_tokens_per_s']:.1f}"),
        (f"{load['clients']} non-streamed clients through HTTP: tokens/s", many["error"] if "error" in many else
         f"{many['throughput_tokens_per_s']:.1f} (mean batch {many['mean_queued_batch_size']:.2f} of "
         f"{many['max_batch_size']} while requests waited for room, {many['mean_batch_size']:.2f} over the phase)"),
        ("soak: hostile requests (every 10th): answers / >= 500",
         f"{load['hostile']} / {load['hostile_server_errors']} (statuses {load['hostile_statuses']})"),
    ]
    if "error" in join:
        rows.append(("long prompt joining", join["error"]))
    else:
        rows.append(((f"{join['streams']} streams while a {join['prompt_tokens']}-token prompt joins: token gap p95 "
                     "steady -> joining (s)"),
                     (f"{join['steady_p95_s']:.3f} -> {join['join_p95_s']:.3f} (max {join['join_max_s']:.3f}, "
                     f"join {join['join_s']:.2f} s)")))
    for name, figures in growth.items():
        if "error" in figures:
            rows.append((f"{name}: per-token time", figures["error"]))
        else:
            rows.append((f"{name}: per-token time at token 16 -> 256 (ms)",
                         f"{1000 * figures['first_s']:.1f} -> {1000 * figures['second_s']:.1f} (x{figures['ratio']:.2f})"))
    lines = ["| measure | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "| target | measured | holds |", "|---|---|---|"]
    for target in results["targets"]:
        measured = "-" if target["measured"] is None else f"{target['measured']:.3f}"
        holds = "not measured" if target["holds"] is None else ("yes" if target["holds"] else "no")
        lines.append(f"| {target['name']} | {measured} | {holds} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--carryons", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=16, help="requests per model in part 1")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--switch-tokens", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--soak-seconds", type=float, default=60.0)
    parser.add_argument("--soak-tokens", type=int, default=16)
    parser.add_argument("--batch-clients", type=int, default=8, help="part 5's concurrency")
    parser.add_argument(
        "--max-batch-size", type=int, default=8, help="the server's serve.max_batch_size"
    )
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--base", default="packaged:smollm2")
    parser.add_argument("--mixture-base", default="packaged:gemma3-270m", help="part 9's second base ('' skips it)")
    parser.add_argument("--concurrent-requests", type=int, default=4, help="part 7's requests per client")
    parser.add_argument("--long-prompt", type=int, default=1500, help="part 8's joining prompt, in tokens")
    parser.add_argument("--join-streams", type=int, default=7)
    args = parser.parse_args()

    import ray
    from ray import serve

    from carryon_ray.stages.serve import deploy_stage

    torch.set_num_threads(args.torch_threads)
    base = FrozenBase(BaseSpec(name="smollm2", path=args.base))
    print("part 6: the anchor, generate() in this process", flush=True)
    anchor = generate_anchor(base, args.max_tokens, args.max_batch_size)
    bases = [{"name": "smollm2", "path": args.base}]
    if args.mixture_base:
        bases.append({"name": "second", "path": args.mixture_base})
    port = free_port()
    config = validate_config(
        {
            "bases": bases,
            "serve": {
                "host": "127.0.0.1",
                "port": port,
                "max_carryons_per_replica": args.carryons + 1,
                "max_ongoing_requests": args.clients + 4,
                "torch_threads": args.torch_threads,
                "max_batch_size": args.max_batch_size,
            },
        }
    )
    with tempfile.TemporaryDirectory(prefix="carryon-serve-bench-") as scratch:
        registry = Path(scratch) / "carryons"
        started = time.perf_counter()
        names = make_registry(registry, base, args.carryons)
        if args.mixture_base:
            make_mixture(registry / "mix", base, FrozenBase(config.bases[1]))
        print(f"wrote {len(names)} carry-ons in {time.perf_counter() - started:.1f} s", flush=True)
        ray.init(
            address="local",
            resources={"inference": 100},
            include_dashboard=False,
            log_to_driver=False,
        )
        try:
            deploy_stage(config.serve.model_copy(update={"registry": str(registry)}), registry.parent,
                         bases=config.bases)
            client = Client(f"http://127.0.0.1:{port}")
            for model in ("base", names[0]):  # warm-up: first-use costs are not part 1's
                client.complete(model, PROMPTS[0], 4)
            results = {
                "setup": {
                    "base": args.base,
                    "carryons": args.carryons,
                    "carryon_parameters": CarryOn(
                        CarryOnConfig(
                            input_dims=[base.hidden_size],
                            output_dim=base.hidden_size,
                            max_positions=1024,
                        )
                    ).num_parameters(),
                    "max_tokens": args.max_tokens,
                    "torch_threads": args.torch_threads,
                    "replicas": 1,
                    "max_batch_size": args.max_batch_size,
                    "cpu_count": os.cpu_count(),
                }
            }
            print("part 1: base vs carry-on", flush=True)
            results["base_vs_carryon"] = base_vs_carryon(
                client, names[0], args.rounds, args.max_tokens
            )
            print("part 2: round-robin over carry-ons", flush=True)
            results["switching"] = switching(client, names, args.switch_tokens)
            print(f"part 3: soak, {args.clients} clients x {args.soak_seconds:.0f} s", flush=True)
            results["soak"] = soak(client, names, args.clients, args.soak_seconds, args.soak_tokens)
            print("part 4: split-topology round trip", flush=True)
            split = split_round_trip(base.hidden_size)
            per_token_ms = 1000 / results["base_vs_carryon"]["base"]["tokens_per_s"]
            split.update(base_ms_per_token=per_token_ms, share=split["p50_ms"] / per_token_ms)
            results["split"] = split
            print(f"part 7: {args.clients} concurrent non-streamed clients", flush=True)
            results["concurrent"] = attempt(concurrent_clients, client, args.clients, args.concurrent_requests,
                                            args.max_tokens)
            print(f"part 8: a {args.long_prompt}-token prompt joins {args.join_streams} streams", flush=True)
            results["join"] = attempt(long_prompt_join, client, base, args.join_streams, args.long_prompt)
            print("part 9: per-token time at the 16th and 256th token", flush=True)
            results["growth"] = {"base": attempt(per_token_growth, client.url, "base")}
            if args.mixture_base:
                results["growth"]["mixture"] = attempt(per_token_growth, client.url, "mix")
        finally:
            serve.shutdown()
            ray.shutdown()
    print("part 5: continuous batching vs a thread per request (in-process)", flush=True)
    carry_on, layout = make_carryon(base, seed=0)
    merged = MergedModel(base, carry_on, layout)
    results["batching"] = batching_gain(merged, args.batch_clients, args.max_tokens)
    results["anchor"] = anchor
    results["targets"] = targets(results)
    publish(table(results), results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
