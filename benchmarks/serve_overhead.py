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

Parts 1-3 run with the server's continuous batching on (`--max-batch-size 8`, the default);
`--max-batch-size 1` runs them without.

    python benchmarks/serve_overhead.py [--json PATH] [--carryons 50] [--soak-seconds 60]
"""

from __future__ import annotations

import argparse
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
OVERHEAD_TARGET = 0.10


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

    def worker(offset: int) -> None:
        turn = offset
        while time.monotonic() < deadline:  # bounded: no new request after the deadline
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
        throughput_tokens_per_s=summary["tokens"] / wall,
        requests_per_s=summary["requests"] / wall,
    )
    return summary


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
    lines = ["| measure | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "| target | measured | holds |", "|---|---|---|"]
    for target in results["targets"]:
        lines.append(f"| {target['name']} | {target['measured']:.3f} | {target['holds']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--carryons", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=16, help="requests per model in part 1")
    parser.add_argument("--max-tokens", type=int, default=32)
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
    args = parser.parse_args()

    import ray
    from ray import serve

    from carryon_ray.stages.serve import deploy_stage

    torch.set_num_threads(args.torch_threads)
    base = FrozenBase(BaseSpec(name="smollm2", path=args.base))
    port = free_port()
    config = validate_config(
        {
            "bases": [{"name": "smollm2", "path": args.base}],
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
        finally:
            serve.shutdown()
            ray.shutdown()
    print("part 5: continuous batching vs a thread per request (in-process)", flush=True)
    carry_on, layout = make_carryon(base, seed=0)
    merged = MergedModel(base, carry_on, layout)
    results["batching"] = batching_gain(merged, args.batch_clients, args.max_tokens)
    overhead = results["base_vs_carryon"]["overhead"]
    results["targets"] = [
        {
            "name": "carry-on throughput loss vs base <= 0.10",
            "measured": overhead,
            "target": OVERHEAD_TARGET,
            "holds": overhead <= OVERHEAD_TARGET,
        },
        {
            "name": "soak errors == 0",
            "measured": float(results["soak"]["errors"]),
            "target": 0,
            "holds": results["soak"]["errors"] == 0,
        },
    ]
    publish(table(results), results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
