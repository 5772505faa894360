"""Train stage (Ray Train `TorchTrainer`, `training` role): fit the carry-on on stored shards.

Workers stream their part of the training shards with `get_dataset_shard` (a seeded local
shuffle, different every epoch), dequantize on the fly, and run the one training loop
(`carryon_ray/loop.py`) against the frozen output head that the embed stage saved (no base is
ever loaded here). `min_workers < max_workers` makes the run elastic.

Every `checkpoint_every` steps rank 0 measures held-out NLL and writes a checkpoint in the
loop's self-describing format. The run's name is a hash of what shapes it (the embeddings, the
carry-on, the training settings), so rerunning the same command continues from the latest
checkpoint — after a worker died (`FailureConfig`) or after the driver itself was killed — and a
finished run is not trained again. `train.fail_at_step` kills rank 0 once, as a drill.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from carryon_ray.carry_on import CarryOnConfig
from carryon_ray.config import CarryOnSpec, TrainSpec
from carryon_ray.loop import CheckpointInfo, TrainLoop, carry_on_config, epoch_seed
from carryon_ray.progress import progress
from carryon_ray.quantized_head import load_head
from carryon_ray.records import Layout, decode_batch
from carryon_ray.reports import plot_loss_curve
from carryon_ray.stages.embed import EmbedResult
from carryon_ray.stages.placement import granted_threads, role_resources
from carryon_ray.storage import Location, location

logger = logging.getLogger(__name__)

FAULT_MARKER = ".fault-injected"
RESULT = "result.json"  # written beside a finished run's checkpoints
METRICS = "metrics.jsonl"
# Settings that change where or how robustly a run trains, not what it learns.
OPERATIONAL = {"fail_at_step", "max_failures", "resources", "log_every", "torch_threads",
               "num_cpus_per_worker", "use_gpu"}


@dataclass(frozen=True)
class TrainPlan:
    """What every worker needs besides `TrainSpec`: decided once on the driver."""

    run_dir: str
    layout_json: str
    carry_on: CarryOnConfig
    alpha: float
    total_steps: int
    train_rows: int
    eval_paths: list[str]


@dataclass(frozen=True)
class TrainResult:
    """A finished training run: its last checkpoint (the loop's format) and its figures."""

    checkpoint: str
    steps: int
    planned_steps: int
    resumed_from: int | None
    early_stopped: bool
    world_size: int | None
    loss_first: float | None
    loss_last: float | None  # mean of the last 10 steps
    tokens: int
    seconds: float
    loss_curve: str | None
    val: dict
    val_best: float | None
    reused: bool = False  # finished by an earlier run of the same command

    def summary(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "checkpoint"}


class MetricsLog:
    """RUN_DIR/reports/metrics.jsonl on any store: appended line by line on a local disk,
    rewritten whole (one atomic PUT) at most every `FLUSH_SECONDS` on an object store, which
    cannot append. A resumed run drops the records of steps it will train again."""

    FLUSH_SECONDS = 5.0

    def __init__(self, where: Location, *, resume_step: int | None) -> None:
        self.where = where
        self.lines: list[str] = []
        if resume_step is not None and where.is_file():
            self.lines = [line for line in where.read_text().splitlines()
                          if json.loads(line)["step"] <= resume_step]
        self._write()

    def _write(self) -> None:
        self.where.write_text("".join(line + "\n" for line in self.lines))
        self.flushed = time.monotonic()

    def append(self, record: dict) -> None:
        self.lines.append(json.dumps(record))
        if self.where.is_local:
            with open(self.where.local_path, "a") as handle:
                handle.write(self.lines[-1] + "\n")
        elif time.monotonic() - self.flushed > self.FLUSH_SECONDS:
            self._write()

    def close(self) -> None:
        if not self.where.is_local:
            self._write()

    @staticmethod
    def read(where: Location) -> list[dict]:
        return [json.loads(line) for line in where.read_text().splitlines()] if where.is_file() else []


def _broadcast(values: list[float], world_size: int, device: torch.device) -> list[float]:
    """Rank 0's validation figures on every rank, so all ranks take the same decision."""
    if world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.broadcast(tensor, src=0)
    return tensor.tolist()


def inject_fault(marker: Location, step: int, fail_at: int | None, rank: int) -> None:
    """Kill this worker process once at `fail_at` (the `marker` file makes it once per run)."""
    if fail_at is None or step != fail_at or rank != 0:
        return
    if marker.exists():
        return
    marker.write_text(str(step))
    logger.warning("train.fail_at_step=%d: killing worker process %d", step, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


def _eval_batches(layout: Layout, paths: list[str], batch_size: int):
    for path in paths:
        table = location(path).read_table()
        for start in range(0, table.num_rows, batch_size):
            yield decode_batch(layout, table.slice(start, batch_size).to_pydict())


def train_loop(config: dict) -> None:
    """Runs on every training worker: `config` is {"spec": TrainSpec, "plan": TrainPlan}."""
    spec: TrainSpec = config["spec"]
    plan: TrainPlan = config["plan"]
    torch.set_num_threads(granted_threads(spec.torch_threads))
    torch.manual_seed(spec.seed)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    run_dir = location(plan.run_dir)
    layout = Layout.from_json(plan.layout_json)
    device = ray.train.torch.get_device()
    head = load_head((run_dir / "head").materialize(), spec.head_dtype, device=device)
    loop = TrainLoop(plan.carry_on, layout, head, spec, alpha=plan.alpha, total_steps=plan.total_steps,
                     device=device, wrap=ray.train.torch.prepare_model)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            loop.restore(directory)
        logger.info("worker %d of %d resumed at step %d", rank, world_size, loop.state.step)
    metrics = None
    if rank == 0:
        metrics = MetricsLog(run_dir / "reports" / METRICS,
                             resume_step=None if checkpoint is None else loop.state.step)
    shard = ray.train.get_dataset_shard("train")
    buffer = max(spec.batch_size, min(plan.train_rows, spec.shuffle_buffer))

    def epoch_batches(epoch: int):
        for columns in shard.iter_batches(
            batch_size=spec.batch_size, batch_format="numpy",
            local_shuffle_buffer_size=buffer, local_shuffle_seed=epoch_seed(spec.seed, epoch),
        ):
            inject_fault(run_dir / "checkpoints" / FAULT_MARKER, loop.state.step, spec.fail_at_step, rank)
            yield decode_batch(layout, columns)

    def validate():
        scores = [math.nan, math.nan]
        if plan.eval_paths and rank == 0:
            result = loop.validate(_eval_batches(layout, plan.eval_paths, spec.batch_size))
            scores = [result["nll_base"], result["nll_merged"]]
        if not plan.eval_paths:
            return None
        base, merged = _broadcast(scores, world_size, device)
        return {"nll_base": base, "nll_merged": merged}

    node = ray.get_runtime_context().get_node_id()

    def on_record(record: dict, periodic: bool) -> bool:
        record.update(world_size=world_size, node=node)
        if periodic:
            with tempfile.TemporaryDirectory() as directory:
                if rank == 0:
                    loop.save(directory)
                ray.train.report(
                    record, checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
                )
        elif record["step"] % spec.log_every == 0:
            ray.train.report(record)
        if metrics is not None:
            metrics.append(record)
        return False

    loop.run(epoch_batches, on_record=on_record, validate=validate)
    if metrics is not None:
        metrics.close()


def read_shards(shards: list[Location]) -> ray.data.Dataset:
    """One split's Parquet shards as a Ray Data dataset, read from the store they are on."""
    return ray.data.read_parquet([shard.path for shard in shards], filesystem=shards[0].fs)


def total_steps(spec: TrainSpec, train_rows: int) -> int:
    if spec.max_steps is not None:
        return spec.max_steps
    per_epoch = math.ceil(train_rows / (spec.batch_size * spec.max_workers))
    return max(1, math.ceil(per_epoch * spec.epochs))


def run_key(spec: TrainSpec, carry_on: CarryOnSpec, embedded: EmbedResult) -> str:
    """A hash of everything that shapes what a run learns: the same command, the same key."""
    parts = {
        "embeddings": embedded.manifest["inputs_key"],
        "carry_on": carry_on.model_dump(),
        "train": spec.model_dump(exclude=OPERATIONAL),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _check_embeddings(run_dir: Location, embedded: EmbedResult) -> None:
    problems = []
    if not embedded.manifest["splits"]["train"]["shards"]:
        problems.append("they hold no training rows; check data.train_size and the dataset")
    if not (run_dir / "head" / "head.safetensors").is_file():
        problems.append(f"the output head {run_dir / 'head'} is missing")
    if problems:
        raise ValueError(
            f"the embeddings in {run_dir / 'embeddings'} cannot be trained on: " + "; ".join(problems)
            + ". Re-run the embed stage (stages: [embed, train, ...])"
        )


def _last_record(path: Location) -> dict | None:
    try:
        lines = path.read_text().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):  # not yet written, or caught mid-line
        return None


@contextmanager
def _follow_metrics(path: Location, total: int) -> Iterator[None]:
    """Follows RUN_DIR/reports/metrics.jsonl while `fit()` runs: one bar of steps and loss."""
    done = threading.Event()

    def follow() -> None:
        with progress("train", total=total, unit="steps") as bar:
            while True:
                last = _last_record(path)
                if last is not None and last["step"] != bar.n:
                    bar.set_postfix_str(f"loss {last['loss']:.4f}", refresh=False)
                    bar.update(last["step"] - bar.n)
                if done.is_set():
                    return
                # An object store gets the whole growing file per look: look as often as it is written.
                time.sleep(0.5 if path.is_local else MetricsLog.FLUSH_SECONDS)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def train_stage(
    spec: TrainSpec, run_dir: Location, embedded: EmbedResult, *, carry_on: CarryOnSpec,
    allow_unpinned: bool = False,
) -> TrainResult:
    """Fit the carry-on on `embedded`; rerunning the same command continues the same run.
    `allow_unpinned`: run on any node when the cluster lacks the `training` role."""
    run_dir = location(run_dir)
    _check_embeddings(run_dir, embedded)
    resources = role_resources(spec.resources, allow_unpinned=allow_unpinned, key="train.resources")
    started = time.time()
    steps = total_steps(spec, embedded.rows("train"))
    name = f"train-{run_key(spec, carry_on, embedded)}"
    storage = run_dir / "checkpoints"
    finished = storage / name / RESULT
    if finished.is_file():
        result = TrainResult(**{**json.loads(finished.read_text()), "reused": True})
        if location(result.checkpoint).is_dir():
            logger.info("train: finished earlier with these inputs (%d steps); nothing to do", result.steps)
            return result
    (run_dir / "reports").mkdir()
    storage.mkdir()
    (storage / FAULT_MARKER).remove()
    metrics_path = run_dir / "reports" / METRICS
    plan = TrainPlan(
        run_dir=run_dir.uri,
        layout_json=embedded.layout.to_json(),
        carry_on=carry_on_config(carry_on, embedded.layout),
        alpha=carry_on.alpha,
        total_steps=steps,
        train_rows=embedded.rows("train"),
        eval_paths=embedded.shard_paths("eval"),
    )
    workers = spec.min_workers if spec.min_workers == spec.max_workers else (spec.min_workers, spec.max_workers)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec, "plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=spec.use_gpu,
            resources_per_worker={"CPU": spec.num_cpus_per_worker, **resources},
        ),
        run_config=ray.train.RunConfig(
            name=name,  # the same command finds its run again and resumes it
            storage_path=storage.path,
            storage_filesystem=storage.fs,
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": read_shards([location(path) for path in embedded.shard_paths("train")])},
        # The same order of blocks every run, so a seed gives the same shuffle.
        dataset_config=ray.train.DataConfig(
            execution_options=ray.data.ExecutionOptions(preserve_order=True)
        ),
    )
    with _follow_metrics(metrics_path, steps):
        fit = trainer.fit()
    if fit.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint: {fit.error}")
    records = MetricsLog.read(metrics_path)
    curve = plot_loss_curve(records, run_dir / "reports" / "loss_curve.png", title=name)
    losses = [r["loss"] for r in records]
    tail = losses[-10:]
    validations = [r for r in records if "val_nll_merged" in r]
    last = records[-1] if records else {}
    checkpoint = storage.uri + fit.checkpoint.path[len(storage.path):]  # a URI on any store
    result = TrainResult(
        checkpoint=checkpoint,
        steps=last.get("step", CheckpointInfo.read(checkpoint).step),
        planned_steps=steps,
        resumed_from=last.get("resumed_from"),
        early_stopped=bool(last.get("early_stop")),
        world_size=last.get("world_size"),
        loss_first=losses[0] if losses else None,
        loss_last=sum(tail) / len(tail) if tail else None,
        tokens=last.get("tokens", 0),
        seconds=time.time() - started,
        loss_curve=str(curve) if curve else None,
        val={k: validations[-1][k] for k in ("val_nll_base", "val_nll_merged")} if validations else {},
        val_best=min(r["val_nll_merged"] for r in validations) if validations else None,
    )
    finished.write_text(json.dumps(asdict(result), indent=2))
    return result
