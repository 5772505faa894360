"""Many tenants through one pipeline, measured in one run on the real base (SmolLM2-135M-Instruct,
packaged GGUF, dtype auto). Every tenant is `--rows-per-tenant` GSM8K problems of its own (the
packaged test split, questions of at most `QUESTION_CHARS` characters so no row is dropped as
over-long at `--max-length`), one `.jsonl` file per tenant in a temporary directory
(`tenants.by: directory`); all tenants are the same size and train the same `--steps` steps of
`--batch-size` rows.

1. training, for K in `--ks` (1, 8, 32, 64) tenants, on the embeddings of ONE tenant embed pass:
   a. in-process (no Ray), in a fresh spawned process per arm: tokens/s of one `GroupedLoop`
      over K tenants vs `TrainLoop`s of one carry-on alone (the first `--alone-tenants`
      tenants, one after another), same batches (`table_batches`), same steps; peak RSS of
      that process (`ru_maxrss`) beside its RSS once the head and the tables are loaded.
      Target: grouped at the largest K >= 0.8x alone.
   b. Ray Train: wall time of `grouped_train_stage` for the K tenants (one job) vs the
      single-tenant `train_stage` run once per tenant on that tenant's shards (K jobs, one after
      another). The sequential runs are measured for the first two K; the others are
      EXTRAPOLATED from the mean per-tenant wall time at the second K (`"extrapolated": true`).
      The Ray Train worker's peak RSS is sampled every `RSS_PERIOD_S` (psutil, every process
      named RayTrainWorker under this driver's own Ray node). Target: sequential / grouped wall
      time at the largest K >= 5.
   Every arm runs in a run directory of its own (the embeddings and the head linked in), so no
   finished tenant or run is reused.
2. embedding: `--embed-tenants` tenants by the tenant embed pass vs the same rows as ONE dataset
   (concatenated, `data.train_size + data.eval_size` = the same rows and the same held-out
   count), each in a fresh run directory, same embed settings: tokens / stage seconds. Target
   >= 0.95.
3. serving: one replica (`serve.max_carryons_per_replica` = K + 1, so every carry-on stays
   loaded) with the largest K's trained carry-ons (exported with `export_tenants`, each version
   promoted): sequential greedy requests of `--max-tokens`, each naming the next carry-on
   round-robin, paired with one on the base alone (order alternating). Every carry-on is loaded
   by a warm-up request first. Target: carry-ons' tokens/s >= 0.9x the base's.

    python benchmarks/tenants.py [--json PATH] [--quick]

`--quick` (K = 1, 2, 4, tiny sizes) only checks that the script works; its numbers mean little.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import publish
from benchmarks.serve_overhead import PROMPTS, Client, free_port, percentile, summarize
from carryon_ray.config import DataSpec, validate_config
from carryon_ray.readers import resolve_format

GROUPED_TARGET, SEQUENTIAL_TARGET, EMBED_TARGET, SERVE_TARGET = 0.8, 5.0, 0.95, 0.9
QUESTION_CHARS = 300  # about 75 tokens: the prompt never fills max_length 128, so no row is dropped
RSS_PERIOD_S = 0.2


# --- data and config -------------------------------------------------------------------------


def gsm8k_rows(count: int) -> list[dict]:
    """The first `count` packaged GSM8K test rows whose question is short."""
    _, path = resolve_format(DataSpec(dataset="gsm8k"))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    short = [row for row in rows if len(row["question"]) <= QUESTION_CHARS]
    if len(short) < count:
        raise ValueError(f"{count} rows asked for, the packaged GSM8K has {len(short)} with short questions; "
                         "lower --rows-per-tenant or the number of tenants")
    return [{"question": row["question"], "answer": row["answer"]} for row in short[:count]]


def tenant_name(index: int) -> str:
    return f"t{index:03d}"


def write_tenants(directory: Path, rows: list[dict], tenants: int, per_tenant: int) -> Path:
    """Tenant i gets rows [i x per_tenant, (i+1) x per_tenant): `directory/t00i.jsonl`."""
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(tenants):
        part = rows[index * per_tenant : (index + 1) * per_tenant]
        (directory / f"{tenant_name(index)}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return directory


def make_config(args, run_dir: Path, dataset: Path, *, tenants: bool, train_size: int = 1, eval_size: int = 0):
    raw = {
        "name": "tenants-bench",
        "run_dir": str(run_dir),
        "bases": [{"name": "smollm2", "path": args.base, "dtype": "auto"}],
        "sources": [{"base": "smollm2", "layer": -1}],
        "bridge": {"codec": "absmax", "residual_bits": 8, "input_bits": 4},
        "carry_on": {"hidden_size": 256, "num_layers": 3, "num_heads": 4, "max_positions": 1024, "alpha": 1.0},
        "data": {"dataset": str(dataset), "loss_on": "answer", "max_length": args.max_length,
                 "train_size": train_size, "eval_size": eval_size},
        "embed": {"batch_size": 8, "min_actors": 1, "max_actors": 1, "rows_per_shard": 64,
                  "torch_threads": args.torch_threads},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": 1e-3,
                  "warmup_steps": 1, "checkpoint_every": 1000, "torch_threads": args.torch_threads},
        "serve": {"host": "127.0.0.1", "port": free_port(), "torch_threads": args.torch_threads,
                  "max_carryons_per_replica": max(args.ks) + 1},
    }
    if tenants:  # every tenant: its last row held out, the rest train
        raw["tenants"] = {"by": "directory", "eval_fraction": 1 / (2 * args.rows_per_tenant),
                          "min_eval": 1, "min_train": 1}
    return validate_config(raw)


def arm_dir(root: Path, name: str, embedded_dir: Path) -> Path:
    """A fresh run directory holding (links to) the stored embeddings and head, nothing else."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    for part in ("embeddings", "head"):
        (run_dir / part).symlink_to(embedded_dir / part, target_is_directory=True)
    return run_dir


def view(embedded, run_dir: Path, *, tenants: list[str] | None = None, single: str | None = None):
    """The embed result seen from `run_dir`: only `tenants`, or one tenant as a single-tenant
    embedding (its splits; an inputs key of its own, so its train run is its own)."""
    from carryon_ray.stages.embed import EmbedResult

    manifest = dict(embedded.manifest)
    if tenants is not None:
        manifest["tenants"] = {t: manifest["tenants"][t] for t in tenants}
        manifest["skipped_tenants"] = {}
    if single is not None:
        manifest["splits"] = manifest["tenants"][single]["splits"]
        manifest["inputs_key"] = f"{manifest['inputs_key']}-{single}"
        del manifest["tenants"]
    return EmbedResult(str(run_dir), manifest, embedded.layout)


# --- peak memory -----------------------------------------------------------------------------


class WorkerRss:
    """Samples, every RSS_PERIOD_S, the resident memory of every process named RayTrainWorker
    that descends from this driver (its local Ray node's; another cluster's are not counted);
    `peak_mb` is the largest seen (None: none was seen)."""

    def __init__(self) -> None:
        self.peak_mb: float | None = None
        self.done = threading.Event()

    def _sample(self) -> None:
        import psutil

        while not self.done.wait(RSS_PERIOD_S):
            # This driver's own local Ray node only: its workers descend from this process.
            for process in psutil.Process(os.getpid()).children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(process.cmdline()):
                        rss = process.memory_info().rss / 2**20
                        self.peak_mb = max(self.peak_mb or 0.0, rss)
                except (psutil.Error, OSError):
                    continue

    def __enter__(self) -> Self:
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


# --- part 1a: in-process training (runs in a spawned process) ---------------------------------


def inprocess_arm(job: dict) -> dict:
    """In a fresh process: tokens/s of one GroupedLoop over `job["tenants"]` ("grouped") or of
    one TrainLoop per tenant, one after another ("alone"); peak RSS of this process."""
    import pyarrow as pa
    import torch

    from carryon_ray.config import CarryOnSpec, TrainSpec
    from carryon_ray.grouped import GroupedLoop, GroupMember
    from carryon_ray.loop import TrainLoop, carry_on_config, table_batches
    from carryon_ray.quantized_head import load_head
    from carryon_ray.records import Layout
    from carryon_ray.storage import location

    torch.set_num_threads(job["threads"])
    spec, carry_on = TrainSpec(**job["spec"]), CarryOnSpec(**job["carry_on"])
    layout = Layout.from_json(job["layout_json"])
    head = load_head(Path(job["head"]), spec.head_dtype)
    tables = {t: pa.concat_tables([location(p).read_table() for p in paths]) for t, paths in job["paths"].items()}
    config = carry_on_config(carry_on, layout)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def batches(tenant: str, epoch: int):
        return table_batches(layout, tables[tenant], spec.batch_size, seed=spec.seed, epoch=epoch)

    first = next(iter(tables))  # warm-up: one untimed step, so first-use costs fall on neither arm
    warm = TrainLoop(config, layout, head, spec, alpha=carry_on.alpha, total_steps=1)
    warm.run(lambda epoch: batches(first, epoch))
    del warm
    tokens, seconds = 0, 0.0
    if job["mode"] == "grouped":
        members = [GroupMember(t, config, carry_on.alpha, spec, spec.max_steps) for t in tables]
        loop = GroupedLoop(members, layout, head, loss_chunk=spec.loss_chunk)
        start = time.perf_counter()
        loop.run(batches)
        seconds = time.perf_counter() - start
        tokens = sum(member.state.tokens for member in loop.loops.values())
        steps = sum(member.state.step for member in loop.loops.values())
        assert not loop.failed, loop.failed
    else:
        steps = 0
        for tenant in tables:
            torch.manual_seed(spec.seed)
            loop = TrainLoop(config, layout, head, spec, alpha=carry_on.alpha, total_steps=spec.max_steps)
            start = time.perf_counter()
            loop.run(lambda epoch, tenant=tenant: batches(tenant, epoch))
            seconds += time.perf_counter() - start
            tokens += loop.state.tokens
            steps += loop.state.step
    return {"mode": job["mode"], "tenants": len(tables), "tenant_steps": steps, "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "rss_loaded_mb": rss_loaded,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_inprocess(job: dict) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(inprocess_arm, job).result()


# --- the parts -------------------------------------------------------------------------------


def embed_part(args, root: Path, rows: list[dict]) -> dict:
    """Part 2: `--embed-tenants` tenants by the tenant pass vs the same rows as one dataset."""
    from carryon_ray.stages.embed import embed_stage

    count, per = args.embed_tenants, args.rows_per_tenant
    tenant_dir = write_tenants(root / "embed-data" / "tenants", rows, count, per)
    single = root / "embed-data" / "one.jsonl"
    # The same rows in the same order, and the same held-out count (the tenants' last rows).
    single.write_text("".join((tenant_dir / f"{tenant_name(i)}.jsonl").read_text() for i in range(count)))
    # Each arm twice, in the order A B B A, each in a fresh run directory: the first embed pass of
    # a process pays start-up the later ones do not (warm workers, caches), which alone moved the
    # ratio by ~8% when each arm ran once.
    runs: dict[str, list[dict]] = {"tenants": [], "single": []}
    eval_rows = None
    for number, name in enumerate(("tenants", "single", "single", "tenants")):
        if name == "tenants":
            config = make_config(args, root / f"embed-tenants-{number}", tenant_dir, tenants=True)
            embedded = embed_stage(config.embed, config.run_dir, model=config.model, data=config.data,
                                   tenants=config.tenants)
            eval_rows = embedded.rows("eval")
        else:
            config = make_config(args, root / f"embed-single-{number}", single, tenants=False,
                                 train_size=count * per - eval_rows, eval_size=eval_rows)
            embedded = embed_stage(config.embed, config.run_dir, model=config.model, data=config.data)
        manifest = embedded.manifest
        tokens = sum(split["tokens"] for split in manifest["splits"].values())
        runs[name].append({"rows": sum(split["rows"] for split in manifest["splits"].values()), "tokens": tokens,
                           "shards": manifest["computed_shards"], "stage_seconds": manifest["stage_seconds"],
                           "seconds": manifest["seconds"], "tokens_per_s": tokens / manifest["stage_seconds"],
                           "dtypes": manifest.get("dtypes", [])})
        print(f"  embed {name}: {runs[name][-1]['rows']} rows, {tokens} tokens, "
              f"{manifest['stage_seconds']:.1f} s", flush=True)
    results = {}
    for name, done in runs.items():
        results[name] = {**done[0], "stage_seconds": statistics.mean(run["stage_seconds"] for run in done),
                         "tokens_per_s": statistics.mean(run["tokens_per_s"] for run in done),
                         "runs": done}
    results["tenants"]["tenants"] = count
    results["ratio"] = results["tenants"]["tokens_per_s"] / results["single"]["tokens_per_s"]
    return results


def training_part(args, root: Path, rows: list[dict]) -> tuple[dict, Path]:
    """Part 1: one embed pass over max(K) tenants, then every arm. Returns the figures and the
    run directory of the largest K's grouped run (its carry-ons are served by part 3)."""
    from carryon_ray.stages.embed import embed_stage
    from carryon_ray.stages.tenants import grouped_train_stage
    from carryon_ray.stages.train import train_stage

    largest = max(args.ks)
    data = write_tenants(root / "train-data", rows, largest, args.rows_per_tenant)
    config = make_config(args, root / "embedded", data, tenants=True)
    embedded = embed_stage(config.embed, config.run_dir, model=config.model, data=config.data,
                           tenants=config.tenants)
    names = embedded.tenants()
    assert len(names) == largest, f"{len(names)} tenants embedded of {largest}: {embedded.manifest['skipped_tenants']}"
    train_rows = {embedded.tenant_rows(t, "train") for t in names}
    results: dict = {"embed": {"tenants": largest, "tokens": embedded.summary()["tokens"],
                               "train_rows_per_tenant": sorted(train_rows),
                               "stage_seconds": embedded.manifest["stage_seconds"]},
                     "alone": None, "grouped": {}, "ray_grouped": {}, "sequential": {}}
    print(f"  embedded {largest} tenants ({results['embed']['tokens']} tokens) in "
          f"{embedded.manifest['stage_seconds']:.1f} s", flush=True)

    def job(mode: str, tenants: list[str]) -> dict:
        return {"mode": mode, "threads": args.torch_threads, "spec": config.train.model_dump(),
                "carry_on": config.carry_on.model_dump(), "layout_json": embedded.layout.to_json(),
                "head": str(Path(config.run_dir) / "head"),
                "paths": {t: embedded.tenant_shard_paths(t, "train") for t in tenants}}

    alone = names[: args.alone_tenants]
    print(f"  in-process: {len(alone)} carry-ons alone, one after another", flush=True)
    results["alone"] = run_inprocess(job("alone", alone))
    for k in args.ks:
        print(f"  in-process: GroupedLoop over {k} tenants", flush=True)
        results["grouped"][k] = run_inprocess(job("grouped", names[:k]))
    serve_dir = None
    for k in args.ks:
        print(f"  Ray Train: grouped_train_stage, {k} tenants", flush=True)
        run_dir = arm_dir(root, f"grouped-{k}", Path(config.run_dir))
        with WorkerRss() as rss:
            start = time.perf_counter()
            trained = grouped_train_stage(config.train, run_dir, view(embedded, run_dir, tenants=names[:k]),
                                          carry_on=config.carry_on, tenants=config.tenants)
            wall = time.perf_counter() - start
        assert trained.trained == k and not any(r.failed for r in trained.tenants.values()), trained.summary()
        results["ray_grouped"][k] = {"wall_s": wall, "tokens": trained.tokens, "tokens_per_s": trained.tokens / wall,
                                     "worker_peak_rss_mb": rss.peak_mb, "trained": trained.trained}
        if k == largest:
            serve_dir = run_dir
            results["trained_largest"] = trained
    measured = args.ks[:2]
    for k in measured:
        run_dir = arm_dir(root, f"sequential-{k}", Path(config.run_dir))
        walls, peak = [], None
        for tenant in names[:k]:
            print(f"  Ray Train: train_stage for {tenant} alone ({len(walls) + 1} of {k})", flush=True)
            with WorkerRss() as rss:
                start = time.perf_counter()
                result = train_stage(config.train, run_dir, view(embedded, run_dir, single=tenant),
                                     carry_on=config.carry_on)
                walls.append(time.perf_counter() - start)
            assert not result.reused, result.summary()
            peak = max(filter(None, [peak, rss.peak_mb]), default=None)
        results["sequential"][k] = {"wall_s": sum(walls), "per_tenant_s": statistics.mean(walls),
                                    "per_tenant_min_s": min(walls), "per_tenant_max_s": max(walls),
                                    "worker_peak_rss_mb": peak, "extrapolated": False}
    per_tenant = results["sequential"][measured[-1]]["per_tenant_s"]
    for k in args.ks[2:]:
        results["sequential"][k] = {"wall_s": k * per_tenant, "per_tenant_s": per_tenant,
                                    "extrapolated": True, "from_k": measured[-1]}
    return results, serve_dir


def serve_part(args, root: Path, run_dir: Path, trained) -> dict:
    """Part 3: the largest K's carry-ons, exported and promoted, on one replica, round-robin,
    each request paired with one on the base alone."""
    from carryon_ray.stages.serve import deploy_stage
    from carryon_ray.stages.tenants import export_tenants
    from carryon_ray.storage import location

    exported, _ = export_tenants(run_dir, trained)
    for result in exported.values():
        location(result.carryon).promote(result.version)
    names = sorted(exported)
    config = make_config(args, run_dir, root / "train-data", tenants=True)
    deployed = deploy_stage(config.serve, run_dir, None, bases=config.bases)
    client = Client(deployed.endpoint.removesuffix("/v1"))
    client.complete("base", PROMPTS[0], 2)
    start = time.perf_counter()
    for name in names:  # every carry-on loaded once: the pass below finds them all in the LRU
        client.complete(name, PROMPTS[0], 1)
    load_s = time.perf_counter() - start
    samples: dict[str, list[tuple[float, int]]] = {"base": [], "carryons": []}
    requests = max(len(names), args.serve_requests)
    for index, name in zip(range(requests), itertools.cycle(names), strict=False):
        prompt = PROMPTS[index % len(PROMPTS)]
        order = ("base", name) if index % 2 == 0 else (name, "base")
        for model in order:
            samples["base" if model == "base" else "carryons"].append(client.complete(model, prompt, args.max_tokens))
    base, carryons = summarize(samples["base"]), summarize(samples["carryons"])
    ratios = [(tc / sc) / (tb / sb) for (sb, tb), (sc, tc) in zip(samples["base"], samples["carryons"], strict=True)]
    return {"carryons": len(names), "max_carryons_per_replica": config.serve.max_carryons_per_replica,
            "replicas": 1, "requests_each": requests, "max_tokens": args.max_tokens, "load_all_s": load_s,
            "base": base, "round_robin": carryons,
            "ratio": carryons["tokens_per_s"] / base["tokens_per_s"],
            "ratio_median_of_pairs": statistics.median(ratios),
            "ratio_p05_of_pairs": percentile(ratios, 0.05)}


# --- report ----------------------------------------------------------------------------------


def targets(results: dict, largest: int) -> list[dict]:
    train, embed, serve = results["training"], results["embedding"], results["serving"]

    def target(name: str, measured: float | None, bound: float, note: str = "") -> dict:
        return {"name": name, "measured": measured, "target": bound,
                "holds": None if measured is None else measured >= bound, "note": note}

    sequential = train["sequential"][largest]
    return [
        target(f"in-process grouped tokens/s at K={largest} / one carry-on alone >= 0.8",
               train["grouped"][largest]["tokens_per_s"] / train["alone"]["tokens_per_s"], GROUPED_TARGET),
        target(f"Ray Train wall time at K={largest}: sequential / grouped >= 5",
               sequential["wall_s"] / train["ray_grouped"][largest]["wall_s"], SEQUENTIAL_TARGET,
               f"sequential extrapolated from K={sequential['from_k']}" if sequential["extrapolated"] else ""),
        target(f"embed tokens/s: {embed['tenants']['tenants']} tenants / one dataset of the same rows >= 0.95",
               embed["ratio"], EMBED_TARGET),
        target(f"serve tokens/s: {serve['carryons']} carry-ons round-robin / base alone >= 0.9",
               serve["ratio"], SERVE_TARGET),
    ]


def mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(results: dict) -> str:
    setup, train, embed, serve = results["setup"], results["training"], results["embedding"], results["serving"]
    lines = ["## sizes", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in setup.items()]
    alone = train["alone"]
    lines += ["", "## 1. training", "",
              (f"In-process (a fresh spawned process per arm, no Ray): one carry-on alone = "
              f"{alone['tenants']} TrainLoops one after another: {alone['tokens_per_s']:.0f} tokens/s, "
              f"peak RSS {alone['peak_rss_mb']:.0f} MB (loaded: {alone['rss_loaded_mb']:.0f} MB). "
              "Peak RSS: `ru_maxrss` of that process; loaded: the same once the head and tables are in. "
              f"Ray Train worker RSS: the largest sampled every {RSS_PERIOD_S} s over every RayTrainWorker "
              "process of this run's Ray node (psutil)."), "",
              ("| K | in-process grouped tokens/s | / alone | peak RSS MB (loaded) | Ray grouped wall s "
              "| Ray grouped worker peak RSS MB | sequential wall s | sequential / grouped |"),
              "|---|---|---|---|---|---|---|---|"]
    for k in setup["ks"]:
        grouped, ray_grouped, sequential = train["grouped"][k], train["ray_grouped"][k], train["sequential"][k]
        seq = f"{sequential['wall_s']:.1f}" + (
            f" (EXTRAPOLATED: {k} x {sequential['per_tenant_s']:.1f} s, the mean at K={sequential['from_k']})"
            if sequential["extrapolated"] else f" (measured, {sequential['per_tenant_s']:.1f} s per tenant)")
        lines.append(
            f"| {k} | {grouped['tokens_per_s']:.0f} | {grouped['tokens_per_s'] / alone['tokens_per_s']:.2f} "
            f"| {grouped['peak_rss_mb']:.0f} ({grouped['rss_loaded_mb']:.0f}) | {ray_grouped['wall_s']:.1f} "
            f"| {mb(ray_grouped['worker_peak_rss_mb'])} | {seq} | {sequential['wall_s'] / ray_grouped['wall_s']:.1f} |")
    seq_peak = [train["sequential"][k].get("worker_peak_rss_mb") for k in setup["ks"][:2]]
    lines += ["", (f"Sequential single-tenant worker peak RSS MB (measured K): {', '.join(map(mb, seq_peak))}. "
              f"Part 1's embed pass: {train['embed']['tenants']} tenants, {train['embed']['tokens']} tokens, "
              f"{train['embed']['stage_seconds']:.1f} s.")]
    lines += ["", "## 2. embedding", "", "| arm | rows | tokens | shards | stage s | tokens/s |", "|---|---|---|---|---|---|"]
    for name, label in (("tenants", f"{embed['tenants']['tenants']} tenants, tenant pass"),
                        ("single", "one dataset, same rows")):
        arm = embed[name]
        lines.append(f"| {label} | {arm['rows']} | {arm['tokens']} | {arm['shards']} | {arm['stage_seconds']:.1f} "
                     f"| {arm['tokens_per_s']:.0f} |")
    lines += ["", f"ratio: {embed['ratio']:.3f}", "", "## 3. serving", "",
              (f"One replica, max_carryons_per_replica {serve['max_carryons_per_replica']} (all "
              f"{serve['carryons']} stay loaded; loading them all took {serve['load_all_s']:.1f} s), "
              f"{serve['requests_each']} sequential greedy requests of {serve['max_tokens']} tokens each side."), "",
              "| model | requests | tokens | tokens/s | p50 s | p95 s |", "|---|---|---|---|---|---|"]
    for name, label in (("base", "base alone"), ("round_robin", f"{serve['carryons']} carry-ons round-robin")):
        arm = serve[name]
        lines.append(f"| {label} | {arm['requests']} | {arm['tokens']} | {arm['tokens_per_s']:.1f} "
                     f"| {arm['p50_s']:.3f} | {arm['p95_s']:.3f} |")
    lines += ["", f"ratio {serve['ratio']:.3f} (median of request pairs {serve['ratio_median_of_pairs']:.3f})",
              "", "## targets", "", "| target | measured | bound | holds |", "|---|---|---|---|"]
    for target in results["targets"]:
        measured = "-" if target["measured"] is None else f"{target['measured']:.3f}"
        holds = "not measured" if target["holds"] is None else ("yes" if target["holds"] else "no")
        note = f" ({target['note']})" if target["note"] else ""
        lines.append(f"| {target['name']}{note} | {measured} | {target['target']} | {holds} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, K = 1, 2, 4: checks the script works")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="tenant counts (default 1 8 32 64)")
    parser.add_argument("--rows-per-tenant", type=int, default=None, help="train rows + 1 held out (default 9)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="train.max_steps of every tenant")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--alone-tenants", type=int, default=None, help="carry-ons trained alone (default 8)")
    parser.add_argument("--embed-tenants", type=int, default=None, help="part 2's tenants (default 32)")
    parser.add_argument("--max-tokens", type=int, default=None, help="part 3's tokens a request (default 16)")
    parser.add_argument("--serve-requests", type=int, default=None, help="part 3's requests each side (default K)")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--base", default="packaged:smollm2")
    args = parser.parse_args()
    quick = {"ks": [1, 2, 4], "rows_per_tenant": 5, "steps": 2, "alone_tenants": 2, "embed_tenants": 4,
             "max_tokens": 4, "serve_requests": 4}
    full = {"ks": [1, 8, 32, 64], "rows_per_tenant": 9, "alone_tenants": 8, "embed_tenants": 32,
            "max_tokens": 16, "serve_requests": 64}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None or (args.quick and key == "steps"):
            setattr(args, key, value)
    args.ks = sorted(set(args.ks))
    if len(args.ks) < 2:
        parser.error("--ks needs at least two tenant counts (the sequential runs are measured at the first two)")
    if args.batch_size * args.steps > args.rows_per_tenant - 1:
        parser.error(f"--batch-size x --steps = {args.batch_size * args.steps} rows a tenant trains on, more than "
                     f"its {args.rows_per_tenant - 1} training rows: one epoch is the most a tenant trains here")

    import ray
    from ray import serve

    from carryon_ray.pipeline import quiet_ray_data

    started = time.perf_counter()
    rows = gsm8k_rows(max(max(args.ks), args.embed_tenants) * args.rows_per_tenant)
    setup = {"base": args.base, "dtype": "auto", "quick": args.quick, "ks": args.ks,
             "rows_per_tenant": f"{args.rows_per_tenant} ({args.rows_per_tenant - 1} train + 1 held out)",
             "batch_size": args.batch_size, "steps_per_tenant": args.steps, "max_length": args.max_length,
             "question_chars_at_most": QUESTION_CHARS, "carry_on": "h=256 x 3 layers, 4 heads",
             "alone_tenants": args.alone_tenants, "sequential_measured_at": args.ks[:2],
             "embed_tenants": args.embed_tenants, "embed": "batch 8, 64 rows a shard, 1 actor",
             "serve_max_tokens": args.max_tokens, "torch_threads": args.torch_threads,
             "cpu_count": os.cpu_count()}
    print("sizes: " + json.dumps(setup), flush=True)
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    ray.init(address="local", resources={"inference": 1000, "training": 1000}, include_dashboard=False,
             log_to_driver=False)
    quiet_ray_data()
    results: dict = {"setup": setup}
    try:
        with tempfile.TemporaryDirectory(prefix="carryon-tenants-bench-") as scratch:
            root = Path(scratch)
            print(f"part 2: embedding, {args.embed_tenants} tenants vs one dataset", flush=True)
            results["embedding"] = embed_part(args, root, rows)
            print(f"part 1: training, K = {args.ks}", flush=True)
            training, serve_dir = training_part(args, root, rows)
            trained = training.pop("trained_largest")
            results["training"] = training
            print(f"part 3: serving {max(args.ks)} carry-ons round-robin vs the base", flush=True)
            try:
                results["serving"] = serve_part(args, root, serve_dir, trained)
            finally:
                serve.shutdown()
    finally:
        ray.shutdown()
    results["seconds"] = time.perf_counter() - started
    results["targets"] = targets(results, max(args.ks))
    publish(table(results) + f"\n\ntotal {results['seconds']:.0f} s", results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
