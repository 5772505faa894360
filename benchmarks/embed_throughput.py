"""Embed throughput: the Ray Data stage against a bare single-process forward loop, bytes per
token on disk for each bits setting against float16, and the driver's memory as the corpus grows.

Same data (a GSM8K subset from `build_examples`), model (`packaged:smollm2`), dtype (what
`dtype: auto` picks here, unless `--dtype` names one) and batch size for both. The loop is the
physical limit on one machine: the model forward on every core, nothing else. The stage adds
the whole streaming graph: reading and tokenizing in Ray Data tasks, actor start-up (one model
load, while the first blocks are read), quantization and Parquet writing. Also times the loop
in float32 and bfloat16 on a small subset, since `dtype: auto` must pick the faster one.

`--scale` adds the scale check: the stage over synthetic JSONL files of 20k and 200k rows with
`train_size: 1000`, each in a fresh driver process; the driver's peak RSS must not grow with
the corpus (the corpus is read by Ray Data tasks, never by the driver).

    python benchmarks/embed_throughput.py [--examples 640] [--batch-size 8] [--scale] [--s3] [--json PATH]

`--s3` runs the same stage once more, writing its shards to an S3-compatible server (moto's
standalone server on 127.0.0.1, started here) in the same run.

Targets: the stage reaches at least 0.95x the loop's tokens/s; 4-bit storage is at least 3.5x
smaller than float16; the driver's peak RSS at 200k rows is at most 1.1x that at 20k.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import publish
from carryon_ray.bases import FrozenBase, auto_dtype
from carryon_ray.config import BaseSpec, DataSpec, validate_config
from carryon_ray.data import build_examples
from carryon_ray.records import LayerRef, Layout, encode_rows, to_table

STAGE_TARGET = 0.95
FOUR_BIT_TARGET = 3.5
RSS_GROWTH_TARGET = 1.1  # peak driver RSS at the larger corpus / at the smaller
MODEL = "packaged:smollm2"


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


def stage_config(run_dir: Path | str, *, dtype: str, dataset: str, train_size: int, batch_size: int,
                 rows_per_shard: int, threads: int):
    return validate_config({
        "name": "bench",
        "run_dir": str(run_dir),
        "bases": [{"name": "smollm2", "path": MODEL, "dtype": dtype}],
        "data": {"dataset": dataset, "train_size": train_size, "eval_size": 0, "max_length": 512},
        "embed": {"batch_size": batch_size, "rows_per_shard": rows_per_shard,
                  "torch_threads": threads, "num_cpus_per_actor": 1},
    })


def run_stage(config, threads: int) -> dict:
    """The embed stage on a fresh local Ray node; its manifest."""
    import ray

    from carryon_ray.stages.embed import embed_stage

    ray.init(address="local", num_cpus=threads, resources={"inference": 100}, log_to_driver=False,
             include_dashboard=False)
    try:
        return embed_stage(config.embed, config.run_dir, model=config.model, data=config.data).manifest
    finally:
        ray.shutdown()


def s3_server():
    """moto's standalone S3 server on 127.0.0.1 in its own process, the environment pointed at
    it, and a bucket; returns (process, run_dir URI)."""
    import socket
    import urllib.request

    import pyarrow.fs as pafs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    os.environ.update({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    pafs.S3FileSystem(endpoint_override=url, scheme="http", region="us-east-1",
                      allow_bucket_creation=True).create_dir("bench")
    return server, "s3://bench/run"


def synthetic_jsonl(path: Path, rows: int) -> None:
    """GSM8K-like prompt/answer rows, streamed to disk."""
    with path.open("w") as handle:
        for i in range(rows):
            handle.write(json.dumps({"question": f"What is {i} + {i % 97}? Show the steps.",
                                     "answer": f"{i} + {i % 97} = {i + i % 97}. #### {i + i % 97}"}) + "\n")


def scale_child(args) -> None:
    """One scale-check run in this (fresh) driver process; prints its figures as JSON."""
    threads = os.cpu_count() or 1
    config = stage_config(Path(args.scale_child[1]), dtype=args.dtype, dataset=args.scale_child[0],
                          train_size=args.scale_train_size, batch_size=args.batch_size,
                          rows_per_shard=args.rows_per_shard, threads=threads)
    manifest = run_stage(config, threads)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_mb": peak_kb / 1024, "rows_embedded": manifest["splits"]["train"]["rows"],
                      "rows_read": manifest["data_report"]["rows"], "seconds": manifest["seconds"]}))


def scale_check(args, scratch: Path) -> dict:
    """The stage over each corpus size in a fresh driver; peak driver RSS of each."""
    runs = {}
    for rows in args.scale_rows:
        data = scratch / f"synthetic-{rows}.jsonl"
        synthetic_jsonl(data, rows)
        command = [sys.executable, __file__, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
                   "--rows-per-shard", str(args.rows_per_shard), "--scale-train-size", str(args.scale_train_size),
                   "--scale-child", str(data), str(scratch / f"run-{rows}")]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the scale run over {rows} rows failed:\n{done.stderr[-3000:]}")
        runs[rows] = json.loads(done.stdout.strip().splitlines()[-1])
        runs[rows]["file_mb"] = data.stat().st_size / 2**20
        data.unlink()
    small, large = min(runs), max(runs)
    growth = runs[large]["peak_rss_mb"] / runs[small]["peak_rss_mb"]
    return {"train_size": args.scale_train_size, "runs": runs,
            "driver_rss_growth": {"target": RSS_GROWTH_TARGET, "measured": growth,
                                  "holds": growth <= RSS_GROWTH_TARGET,
                                  "rows": [small, large]}}


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in rows)
    lines = [f"| {'measure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    return "\n".join(lines + [f"| {key.ljust(width)} | {value} |" for key, value in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=640, help="GSM8K problems to embed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows-per-shard", type=int, default=64)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: what `dtype: auto` picks on this machine, for loop and stage alike")
    parser.add_argument("--bf16-examples", type=int, default=24, help="subset for the dtype check; 0 skips")
    parser.add_argument("--scale", action="store_true", help="also run the driver-RSS scale check")
    parser.add_argument("--s3", action="store_true",
                        help="also run the stage writing to a local S3-compatible server (moto)")
    parser.add_argument("--scale-rows", type=lambda text: [int(n) for n in text.split(",")],
                        default=[20_000, 200_000], help="corpus sizes of the scale check (comma-separated)")
    parser.add_argument("--scale-train-size", type=int, default=1000)
    parser.add_argument("--scale-child", nargs=2, metavar=("DATA", "RUN_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.dtype == "auto":  # resolved once here, so the loop and the stage's actors agree
        args.dtype = str(auto_dtype("cpu").dtype).removeprefix("torch.")
    if args.scale_child:
        scale_child(args)
        return
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]

    base = FrozenBase(BaseSpec(name="smollm2", path=MODEL, dtype=args.dtype), device="cpu")
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
                BaseSpec(name="smollm2", path=MODEL, dtype=name), device="cpu"
            )
            seconds, _ = bare_loop(other, subset, args.batch_size)
            dtype_rates[name] = subset_tokens / seconds

    with tempfile.TemporaryDirectory() as scratch:
        storage = [bytes_on_disk(base, pairs, bits, Path(scratch)) for bits in (0, 8, 4, 2)]
        del pairs, base
        config = stage_config(Path(scratch) / "run", dtype=args.dtype, dataset="gsm8k", train_size=args.examples,
                              batch_size=args.batch_size, rows_per_shard=args.rows_per_shard, threads=threads)
        manifest = run_stage(config, threads)
        s3_manifest = None
        if args.s3:
            server, uri = s3_server()
            try:
                s3_manifest = run_stage(stage_config(
                    uri, dtype=args.dtype, dataset="gsm8k", train_size=args.examples, batch_size=args.batch_size,
                    rows_per_shard=args.rows_per_shard, threads=threads), threads)
            finally:
                server.terminate()
        scale = scale_check(args, Path(scratch)) if args.scale else None
    float16 = storage[0]["bytes_per_token"]
    for item in storage:
        item["smaller_than_float16"] = float16 / item["bytes_per_token"]
    stage_tokens = manifest["splits"]["train"]["tokens"]
    assert stage_tokens == tokens, "the stage and the loop must embed the same tokens"
    stage_rate = tokens / manifest["stage_seconds"]
    actor_rate = tokens / manifest["actor_seconds"]
    ratio = stage_rate / loop_rate
    four_bit = next(item for item in storage if item["bits"] == 4)["smaller_than_float16"]
    figures = {
        "machine": {"cpus": threads, "torch": torch.__version__, "device": "cpu",
                    "load_average_before": load_before, "load_average_after": os.getloadavg()[0]},
        "model": MODEL, "dtype": args.dtype, "batch_size": args.batch_size,
        "examples": len(rows), "tokens": tokens,
        "loop_tokens_per_s": loop_rate,
        "stage_tokens_per_s": stage_rate,
        "stage_actor_tokens_per_s": actor_rate,
        "stage_seconds": manifest["stage_seconds"],
        "stage_first_shard_seconds": manifest["first_shard_seconds"],
        "stage_total_seconds": manifest["seconds"],
        "dtype_tokens_per_s": dtype_rates,
        "storage": storage,
        "targets": {
            "stage_vs_loop": {"target": STAGE_TARGET, "measured": ratio, "holds": ratio >= STAGE_TARGET},
            "four_bit_vs_float16": {"target": FOUR_BIT_TARGET, "measured": four_bit,
                                    "holds": four_bit >= FOUR_BIT_TARGET},
        },
    }
    if s3_manifest is not None:
        s3_ratio = tokens / s3_manifest["stage_seconds"] / loop_rate
        figures["stage_s3_tokens_per_s"] = tokens / s3_manifest["stage_seconds"]
        figures["targets"]["stage_s3_vs_loop"] = {"target": STAGE_TARGET, "measured": s3_ratio,
                                                  "holds": s3_ratio >= STAGE_TARGET}
    lines = [
        ("data", f"{len(rows)} GSM8K problems, {tokens:,} tokens, batch {args.batch_size}, {args.dtype}"),
        ("machine", (f"{threads} CPUs, 1-min load average {load_before:.1f} before, "
                    f"{os.getloadavg()[0]:.1f} after (above {threads} means other work shared the cores)")),
        ("bare loop (1 process, forward only)", f"{loop_rate:,.0f} tokens/s"),
        ("Ray Data stage (read to last shard, start-up included)", f"{stage_rate:,.0f} tokens/s"),
        ("Ray Data stage (inside the actor)", f"{actor_rate:,.0f} tokens/s"),
        ("stage start to its first shard written", f"{manifest['first_shard_seconds']:.1f} s"),
        (f"stage / loop (target >= {STAGE_TARGET})",
         f"{ratio:.3f} ({'holds' if ratio >= STAGE_TARGET else 'misses'})"),
        ("embed_stage total (+ inputs key, describe task)", f"{manifest['seconds']:.1f} s"),
    ]
    if s3_manifest is not None:
        s3_ratio = figures["targets"]["stage_s3_vs_loop"]["measured"]
        lines += [("Ray Data stage writing to S3 (moto on 127.0.0.1)",
                   f"{figures['stage_s3_tokens_per_s']:,.0f} tokens/s"),
                  (f"stage on S3 / loop (target >= {STAGE_TARGET})",
                   f"{s3_ratio:.3f} ({'holds' if s3_ratio >= STAGE_TARGET else 'misses'})")]
    for name, rate in dtype_rates.items():
        lines.append((f"bare loop {name} ({args.bf16_examples} problems)", f"{rate:,.0f} tokens/s"))
    for item in storage:
        label = "float16" if item["bits"] == 0 else f"{item['bits']}-bit absmax"
        lines.append((f"bytes/token, {label}",
                      (f"{item['bytes_per_token']:,.0f} on disk ({item['smaller_than_float16']:.2f}x "
                      f"smaller), {item['payload_bytes_per_token']:,} before Parquet compression")))
    lines.append((f"4-bit vs float16 (target >= {FOUR_BIT_TARGET}x)",
                  f"{four_bit:.2f}x ({'holds' if four_bit >= FOUR_BIT_TARGET else 'misses'})"))
    if scale is not None:
        figures["scale"] = scale
        figures["targets"]["driver_rss_growth"] = scale["driver_rss_growth"]
        for rows_count, run in scale["runs"].items():
            lines.append((f"driver peak RSS, {rows_count:,}-row JSONL ({run['file_mb']:.0f} MB)",
                          (f"{run['peak_rss_mb']:,.0f} MB ({run['rows_read']:,} rows read, "
                           f"{run['rows_embedded']:,} embedded, {run['seconds']:.0f} s)")))
        growth = scale["driver_rss_growth"]
        lines.append((f"driver RSS growth (target <= {RSS_GROWTH_TARGET}x)",
                      f"{growth['measured']:.3f}x ({'holds' if growth['holds'] else 'misses'})"))
    publish(table(lines), figures, args.json)


if __name__ == "__main__":
    main()
