"""Embed throughput: the Ray Data stage against a bare single-process forward loop, and bytes
per token on disk for each bits setting against float16.

Same data (a GSM8K subset from `build_examples`), model (`packaged:smollm2`), dtype and batch
size for both. The loop is the physical limit on one machine: the model forward on every core,
nothing else. The stage adds Ray Data, actor start-up (one model load), quantization and
Parquet writing. Also times the loop in bfloat16 on a small subset, since `dtype: auto` must
pick the faster dtype for the device.

    python benchmarks/embed_throughput.py [--examples 640] [--batch-size 8] [--json PATH]

Targets: the stage reaches at least 0.9x the loop's tokens/s; 4-bit storage is at least 3.5x
smaller than float16.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import publish
from carryon_ray.bases import FrozenBase
from carryon_ray.config import BaseSpec, DataSpec, validate_config
from carryon_ray.data import build_examples
from carryon_ray.records import LayerRef, Layout, encode_rows, to_table

STAGE_TARGET = 0.9
FOUR_BIT_TARGET = 3.5


def bare_loop(base: FrozenBase, rows: list[list[int]], batch_size: int) -> tuple[float, list]:
    """Seconds for the forward over length-sorted batches (after one warm-up batch), and the
    final hidden states per row (float32)."""
    rows = sorted(rows, key=len)
    layer = base.num_layers
    base.hidden_rows(rows[:batch_size], [layer])  # warm-up: allocator, kernels
    states = []
    started = time.perf_counter()
    for start in range(0, len(rows), batch_size):
        states += base.hidden_rows(rows[start : start + batch_size], [layer])[layer]
    return time.perf_counter() - started, list(zip(rows, states, strict=True))


def bytes_on_disk(base: FrozenBase, pairs: list, bits: int, directory: Path) -> dict:
    """Parquet bytes per token when the final hidden state is stored at `bits` (absmax)."""
    ref = LayerRef(base.name, base.num_layers, base.hidden_size)
    layout = Layout.build(codec="absmax", residual=(ref, bits), sources=[], bases=[base.identity()])
    columns = encode_rows(
        layout,
        ids=[str(i) for i in range(len(pairs))],
        input_ids=[ids for ids, _ in pairs],
        target_masks=[[1] * len(ids) for ids, _ in pairs],
        hidden={ref.key: [state for _, state in pairs]},
    )
    path = directory / f"bits{bits}.parquet"
    pq.write_table(to_table(layout, columns), path)
    tokens = sum(len(ids) for ids, _ in pairs)
    return {"bits": bits, "bytes_per_token": path.stat().st_size / tokens,
            "payload_bytes_per_token": layout.bytes_per_token}


def run_stage(args, threads: int, run_dir: Path) -> dict:
    import ray

    from carryon_ray.stages.embed import run_embed

    config = validate_config({
        "name": "bench",
        "run_dir": str(run_dir),
        "bases": [{"name": "smollm2", "path": "packaged:smollm2", "dtype": args.dtype}],
        "data": {"dataset": "gsm8k", "train_size": args.examples, "eval_size": 0, "max_length": 512},
        "embed": {"batch_size": args.batch_size, "rows_per_shard": args.rows_per_shard,
                  "torch_threads": threads, "num_cpus_per_actor": 1},
    })
    ray.init(num_cpus=threads, resources={"inference": 100}, log_to_driver=False)
    try:
        manifest = run_embed(config, run_dir, resources={"inference": 1})
    finally:
        ray.shutdown()
    return manifest


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in rows)
    lines = [f"| {'measure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    return "\n".join(lines + [f"| {key.ljust(width)} | {value} |" for key, value in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=640, help="GSM8K problems to embed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows-per-shard", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--bf16-examples", type=int, default=24, help="subset for the dtype check; 0 skips")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]

    base = FrozenBase(BaseSpec(name="smollm2", path="packaged:smollm2", dtype=args.dtype), device="cpu")
    examples, _, _ = build_examples(
        DataSpec(dataset="gsm8k", train_size=args.examples, eval_size=0, max_length=512), base.tokenizer
    )
    rows = [example.input_ids for example in examples]
    tokens = sum(len(row) for row in rows)
    loop_seconds, pairs = bare_loop(base, rows, args.batch_size)
    loop_rate = tokens / loop_seconds

    dtype_rates = {}
    if args.bf16_examples:
        subset = rows[: args.bf16_examples]
        subset_tokens = sum(len(row) for row in subset)
        for name in ("float32", "bfloat16"):
            other = base if name == args.dtype else FrozenBase(
                BaseSpec(name="smollm2", path="packaged:smollm2", dtype=name), device="cpu"
            )
            seconds, _ = bare_loop(other, subset, args.batch_size)
            dtype_rates[name] = subset_tokens / seconds

    with tempfile.TemporaryDirectory() as scratch:
        storage = [bytes_on_disk(base, pairs, bits, Path(scratch)) for bits in (0, 8, 4, 2)]
        del pairs
        manifest = run_stage(args, threads, Path(scratch) / "run")
    float16 = storage[0]["bytes_per_token"]
    for item in storage:
        item["smaller_than_float16"] = float16 / item["bytes_per_token"]
    stage_rate = tokens / manifest["stage_seconds"]
    actor_rate = tokens / manifest["actor_seconds"]
    four_bit = next(item for item in storage if item["bits"] == 4)["smaller_than_float16"]
    figures = {
        "machine": {"cpus": threads, "torch": torch.__version__, "device": "cpu",
                    "load_average_before": load_before, "load_average_after": os.getloadavg()[0]},
        "model": "packaged:smollm2", "dtype": args.dtype, "batch_size": args.batch_size,
        "examples": len(rows), "tokens": tokens,
        "loop_tokens_per_s": loop_rate,
        "stage_tokens_per_s": stage_rate,
        "stage_actor_tokens_per_s": actor_rate,
        "stage_seconds": manifest["stage_seconds"],
        "stage_total_seconds": manifest["seconds"],
        "dtype_tokens_per_s": dtype_rates,
        "storage": storage,
        "targets": {
            "stage_vs_loop": {"target": STAGE_TARGET, "measured": stage_rate / loop_rate,
                              "holds": stage_rate / loop_rate >= STAGE_TARGET},
            "four_bit_vs_float16": {"target": FOUR_BIT_TARGET, "measured": four_bit,
                                    "holds": four_bit >= FOUR_BIT_TARGET},
        },
    }
    lines = [
        ("data", f"{len(rows)} GSM8K problems, {tokens:,} tokens, batch {args.batch_size}, {args.dtype}"),
        ("machine", (f"{threads} CPUs, 1-min load average {load_before:.1f} before, "
                    f"{os.getloadavg()[0]:.1f} after (above {threads} means other work shared the cores)")),
        ("bare loop (1 process, forward only)", f"{loop_rate:,.0f} tokens/s"),
        ("Ray Data stage (pool start-up included)", f"{stage_rate:,.0f} tokens/s"),
        ("Ray Data stage (inside the actor)", f"{actor_rate:,.0f} tokens/s"),
        ("stage / loop (target >= 0.9)", (f"{stage_rate / loop_rate:.2f} "
                                         f"({'holds' if stage_rate / loop_rate >= STAGE_TARGET else 'misses'})")),
        ("stage run_embed total (+ describe task)", f"{manifest['seconds']:.1f} s"),
    ]
    for name, rate in dtype_rates.items():
        lines.append((f"bare loop {name} ({args.bf16_examples} problems)", f"{rate:,.0f} tokens/s"))
    for item in storage:
        label = "float16" if item["bits"] == 0 else f"{item['bits']}-bit absmax"
        lines.append((f"bytes/token, {label}",
                      (f"{item['bytes_per_token']:,.0f} on disk ({item['smaller_than_float16']:.2f}x "
                      f"smaller), {item['payload_bytes_per_token']:,} before Parquet compression")))
    lines.append(("4-bit vs float16 (target >= 3.5x)",
                  f"{four_bit:.2f}x ({'holds' if four_bit >= FOUR_BIT_TARGET else 'misses'})"))
    publish(table(lines), figures, args.json)


if __name__ == "__main__":
    main()
