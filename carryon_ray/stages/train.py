"""Train stage (Ray Train `TorchTrainer`, `training` role): fit the carry-on on stored shards.

Workers stream their part of the training shards with `get_dataset_shard`, dequantize on the
fly, and train against the frozen output head that the embed stage saved (no base is ever
loaded here), in `train.head_dtype`, optionally under bf16 autocast. `min_workers <
max_workers` makes the run elastic (`ScalingConfig(num_workers=(min, max))`).

Every `checkpoint_every` steps rank 0 measures held-out NLL (merged and base) and writes a
checkpoint: the carry-on weights and the optimizer state in safetensors, the step, the
schedule and the early-stopping state in JSON, and the best weights so far. A worker that
dies restarts from the latest checkpoint (`FailureConfig`) at its step; `train.fail_at_step`
kills rank 0 once, as a drill. The driver checks the embeddings manifest against the config
before any work, and draws `reports/loss_curve.png` from `reports/metrics.jsonl` at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file, save_file

from carryon_ray.carry_on import CarryOn, CarryOnConfig
from carryon_ray.config import PipelineConfig
from carryon_ray.quantized_head import load_head
from carryon_ray.records import Layout, decode_batch
from carryon_ray.reports import plot_loss_curve
from carryon_ray.training import (
    EarlyStopping,
    autocast_context,
    build_optimizer,
    evaluate,
    lr_at,
    train_step,
)

logger = logging.getLogger(__name__)

FAULT_MARKER = ".fault-injected"


def carry_on_config(config: PipelineConfig, layout: Layout) -> CarryOnConfig:
    spec = config.carry_on
    return CarryOnConfig(
        input_dims=[layout.layers[view.key].dim for view in layout.sources],
        output_dim=layout.layers[layout.residual.key].dim,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        max_positions=spec.max_positions,
        dropout=spec.dropout,
    )


def save_checkpoint(
    directory: Path,
    model: CarryOn,
    optimizer: torch.optim.Optimizer,
    step: int,
    *,
    stopping: EarlyStopping | None = None,
    best: dict[str, torch.Tensor] | None = None,
) -> None:
    """Weights and optimizer tensors in safetensors; step, param groups, scalars in JSON."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "carry_on.safetensors")
    if best is not None:
        save_file(best, directory / "best.safetensors")
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.contiguous()
            else:  # bitsandbytes keeps some slots (the step) as plain numbers
                scalars[f"{index}.{name}"] = value
    save_file(tensors, directory / "optimizer.safetensors")
    meta = {
        "step": step,
        "param_groups": state["param_groups"],
        "scalars": scalars,
        "early_stopping": None if stopping is None else {"best": stopping.best, "bad_evals": stopping.bad_evals},
    }
    (directory / "state.json").write_text(json.dumps(meta))


def load_checkpoint(
    directory: Path, model: CarryOn, optimizer: torch.optim.Optimizer, stopping: EarlyStopping | None = None
) -> int:
    """Restore weights, optimizer and early-stopping state; returns the step to continue at."""
    model.load_state_dict(load_file(directory / "carry_on.safetensors"))
    meta = json.loads((directory / "state.json").read_text())
    slots: dict[int, dict] = {}
    for key, value in [*load_file(directory / "optimizer.safetensors").items(), *meta.get("scalars", {}).items()]:
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    if stopping is not None and meta.get("early_stopping"):
        stopping.best = meta["early_stopping"]["best"]
        stopping.bad_evals = meta["early_stopping"]["bad_evals"]
    return meta["step"]


def checkpoint_weights(checkpoint_dir: str | Path) -> Path:
    """The weights to export from a final checkpoint: the best by validation if kept."""
    best = Path(checkpoint_dir) / "best.safetensors"
    return best if best.exists() else Path(checkpoint_dir) / "carry_on.safetensors"


def _eval_batches(layout: Layout, paths: list[str], batch_size: int):
    for path in paths:
        table = pq.read_table(path)
        for start in range(0, table.num_rows, batch_size):
            yield decode_batch(layout, table.slice(start, batch_size).to_pydict())


def _trim_metrics(path: Path, step: int) -> None:
    """After a restart, drop the records of steps that will be trained again."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _broadcast(values: list[float], world_size: int, device: torch.device) -> list[float]:
    """Rank 0's validation figures on every rank, so all ranks take the same decision."""
    if world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.broadcast(tensor, src=0)
    return tensor.tolist()


def _inject_fault(run_dir: Path, step: int, fail_at: int | None, rank: int) -> None:
    """Kill this worker process once at `fail_at` (a marker file makes it once per run)."""
    if fail_at is None or step != fail_at or rank != 0:
        return
    marker = run_dir / "checkpoints" / FAULT_MARKER
    if marker.exists():
        return
    marker.write_text(str(step))
    logger.warning("train.fail_at_step=%d: killing worker process %d", step, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


def train_loop(loop_config: dict) -> None:
    """Runs on every training worker."""
    torch.set_num_threads(loop_config["threads"] or os.cpu_count() or 1)
    torch.manual_seed(loop_config["seed"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    run_dir = Path(loop_config["run_dir"])
    layout = Layout.from_json(loop_config["layout"])
    device = ray.train.torch.get_device()
    head = load_head(run_dir / "head", loop_config["head_dtype"], device=device)
    carry_on = CarryOn(CarryOnConfig(**loop_config["carry_on"]))
    model = ray.train.torch.prepare_model(carry_on)
    autocast = torch.bfloat16 if loop_config["autocast"] == "bfloat16" else None
    optimizer = build_optimizer(
        carry_on.parameters(), name=loop_config["optimizer"], lr=loop_config["lr"],
        weight_decay=loop_config["weight_decay"], device=device,
    )
    stopping = EarlyStopping(loop_config["patience"], loop_config["min_delta"])
    metrics_path = run_dir / "reports" / "metrics.jsonl"
    step, resumed_from, best = 0, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step = resumed_from = load_checkpoint(Path(directory), carry_on, optimizer, stopping)
            if (Path(directory) / "best.safetensors").exists():
                best = load_file(Path(directory) / "best.safetensors")
        logger.info("worker %d of %d resumed at step %d", rank, world_size, step)
        if rank == 0:
            _trim_metrics(metrics_path, step)
    total = loop_config["total_steps"]
    shard = ray.train.get_dataset_shard("train")
    started = time.time()
    tokens = 0
    stop = step >= total
    while not stop:
        for columns in shard.iter_batches(batch_size=loop_config["batch_size"], batch_format="numpy"):
            _inject_fault(run_dir, step, loop_config["fail_at_step"], rank)
            batch = decode_batch(layout, columns).to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, base_lr=loop_config["lr"], warmup=loop_config["warmup"], total=total)
            loss, count = train_step(
                model, head, batch, optimizer, alpha=loop_config["alpha"], grad_clip=loop_config["grad_clip"],
                autocast=autocast, chunk=loop_config["loss_chunk"],
            )
            tokens += int(batch.lengths.sum())
            step += 1
            record = {"step": step, "loss": loss, "lr": optimizer.param_groups[0]["lr"],
                      "target_tokens": count, "tokens": tokens, "seconds": time.time() - started,
                      "world_size": world_size, "node": ray.get_runtime_context().get_node_id()}
            if resumed_from is not None:
                record["resumed_from"] = resumed_from
            stop = step >= total
            if step % loop_config["checkpoint_every"] == 0 or stop:
                if loop_config["eval_paths"]:
                    scores = [math.nan, math.nan]
                    if rank == 0:
                        with autocast_context(device, autocast):
                            result = evaluate(carry_on, head, _eval_batches(
                                layout, loop_config["eval_paths"], loop_config["batch_size"]),
                                loop_config["alpha"], loop_config["loss_chunk"])
                        scores = [result["nll_base"], result["nll_merged"]]
                    record["val_nll_base"], record["val_nll_merged"] = _broadcast(scores, world_size, device)
                    if stopping.update(record["val_nll_merged"]) and not stop:
                        record["early_stop"] = True
                        stop = True
                    if stopping.improved and rank == 0:
                        best = {k: v.detach().cpu().clone() for k, v in carry_on.state_dict().items()}
                with tempfile.TemporaryDirectory() as directory:
                    if rank == 0:
                        save_checkpoint(Path(directory), carry_on, optimizer, step, stopping=stopping,
                                        best=best if loop_config["patience"] is not None else None)
                    ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None)
            elif step % loop_config["log_every"] == 0:
                ray.train.report(record)
            if rank == 0:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            if stop:
                break


def total_steps(config: PipelineConfig, train_rows: int) -> int:
    if config.train.max_steps is not None:
        return config.train.max_steps
    per_epoch = math.ceil(train_rows / (config.train.batch_size * config.train.max_workers))
    return max(1, math.ceil(per_epoch * config.train.epochs))


def layout_problems(config: PipelineConfig, layout: Layout) -> list[str]:
    """What differs between the views this config asks for and those a layout stores."""
    primary = layout.bases[0]["name"] if layout.bases else None
    if primary != config.primary.name:
        return [f"they were embedded with base '{primary}', the config's primary is '{config.primary.name}'"]
    problems = []
    if config.bridge.codec != layout.codec:
        problems.append(f"bridge.codec is '{config.bridge.codec}', the embeddings use '{layout.codec}'")
    if config.bridge.residual_bits != layout.residual.bits:
        problems.append(
            f"bridge.residual_bits={config.bridge.residual_bits}, the embeddings store the residual at "
            f"{layout.residual.bits} bits"
        )
    if len(config.sources) != len(layout.sources):
        problems.append(f"the config has {len(config.sources)} sources, the embeddings {len(layout.sources)}")
        return problems
    final = layout.layers[layout.residual.key].layer  # the primary's number of layers
    for i, (source, view) in enumerate(zip(config.sources, layout.sources, strict=True)):
        ref, bits = layout.layers[view.key], config.source_bits(source)
        if source.base == primary:
            index = source.layer + final + 1 if source.layer < 0 else source.layer
            if not 0 <= index <= final:
                problems.append(
                    f"sources[{i}].layer={source.layer} is out of range for base '{primary}' with "
                    f"{final} layers; use 0..{final} or -1"
                )
                continue
        else:  # another base: a negative layer cannot be checked without loading it
            index = ref.layer if source.layer < 0 else source.layer
        if (source.base, index, bits) != (ref.base, ref.layer, view.bits):
            problems.append(
                f"sources[{i}] asks for {source.base} layer {source.layer} at {bits} bits, the "
                f"embeddings hold {view.key} at {view.bits} bits"
            )
    return problems


def check_manifest(config: PipelineConfig, run_dir: Path, manifest: dict, layout: Layout) -> None:
    """Refuse, before any work, embeddings that do not fit this config, naming every mismatch."""
    problems = layout_problems(config, layout)
    if not manifest["splits"]["train"]["shards"]:
        problems.append("they hold no training rows; check data.train_size and the dataset")
    if not (run_dir / "head" / "head.safetensors").exists():
        problems.append(f"the output head {run_dir / 'head'} is missing")
    if problems:
        raise ValueError(
            f"the embeddings in {run_dir / 'embeddings'} do not fit this config: " + "; ".join(problems)
            + ". Re-run the embed stage with this config (carryon run) or restore the config they were made with"
        )


def run_train(
    config: PipelineConfig, run_dir: Path, manifest: dict, layout: Layout, *, resources: dict[str, float]
) -> dict:
    """Fit the carry-on; returns the checkpoint directory, the weights to export and figures."""
    spec = config.train
    check_manifest(config, run_dir, manifest, layout)
    started = time.time()
    embeddings = run_dir / "embeddings"
    train_paths = [str(embeddings / path) for path in manifest["splits"]["train"]["shards"]]
    eval_paths = [str(embeddings / path) for path in manifest["splits"]["eval"]["shards"]]
    (run_dir / "reports").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / FAULT_MARKER).unlink(missing_ok=True)
    metrics_path = run_dir / "reports" / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    steps = total_steps(config, manifest["splits"]["train"]["rows"])
    workers = spec.min_workers if spec.min_workers == spec.max_workers else (spec.min_workers, spec.max_workers)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "layout": layout.to_json(),
            "carry_on": carry_on_config(config, layout).to_dict(),
            "run_dir": str(run_dir.resolve()),
            "eval_paths": eval_paths,
            "total_steps": steps,
            "batch_size": spec.batch_size,
            "lr": spec.learning_rate,
            "weight_decay": spec.weight_decay,
            "warmup": spec.warmup_steps,
            "grad_clip": spec.grad_clip,
            "optimizer": spec.optimizer,
            "head_dtype": spec.head_dtype,
            "autocast": spec.autocast,
            "loss_chunk": spec.loss_chunk,
            "alpha": config.carry_on.alpha,
            "checkpoint_every": spec.checkpoint_every,
            "log_every": spec.log_every,
            "patience": spec.early_stopping_patience,
            "min_delta": spec.early_stopping_min_delta,
            "fail_at_step": spec.fail_at_step,
            "threads": spec.torch_threads,
            "seed": spec.seed,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=spec.use_gpu,
            resources_per_worker={"CPU": spec.num_cpus_per_worker, **resources},
        ),
        run_config=ray.train.RunConfig(
            name=f"{config.name}-train-{int(time.time())}",
            storage_path=str((run_dir / "checkpoints").resolve()),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": ray.data.read_parquet(train_paths)},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint: {result.error}")
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    curve = plot_loss_curve(records, run_dir / "reports" / "loss_curve.png", title=config.name)
    losses = [r["loss"] for r in records]
    tail = losses[-10:]
    validations = [r for r in records if "val_nll_merged" in r]
    return {
        "checkpoint": result.checkpoint.path,
        "weights": str(checkpoint_weights(result.checkpoint.path)),
        "steps": records[-1]["step"] if records else 0,
        "planned_steps": steps,
        "early_stopped": bool(records and records[-1].get("early_stop")),
        "resumed_from": records[-1].get("resumed_from") if records else None,
        "world_size": records[-1]["world_size"] if records else None,
        "loss_first": losses[0] if losses else None,
        "loss_last": sum(tail) / len(tail) if tail else None,  # mean of the last 10 steps
        "tokens": records[-1]["tokens"] if records else 0,
        "seconds": time.time() - started,
        "loss_curve": str(curve) if curve else None,
        "val": {k: validations[-1][k] for k in ("val_nll_base", "val_nll_merged")} if validations else {},
        "val_best": min(r["val_nll_merged"] for r in validations) if validations else None,
    }
