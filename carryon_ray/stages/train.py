"""Train stage (Ray Train `TorchTrainer`, `training` role): fit the carry-on on stored shards.

Workers stream their part of the training shards with `get_dataset_shard`, dequantize on the
fly, and train against the frozen output head that the embed stage saved (no base is ever
loaded here). Checkpoints hold the carry-on weights and the optimizer state in safetensors
plus the step in JSON; a restarted worker resumes from the latest one (`FailureConfig`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file, save_file

from carryon_ray.bases import OutputHead
from carryon_ray.carry_on import CarryOn, CarryOnConfig
from carryon_ray.config import PipelineConfig
from carryon_ray.records import Layout, decode_batch
from carryon_ray.training import evaluate, lr_at, train_step

logger = logging.getLogger(__name__)


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


def save_checkpoint(directory: Path, model: CarryOn, optimizer: torch.optim.Optimizer, step: int) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "carry_on.safetensors")
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.contiguous()
        for index, slots in state["state"].items()
        for name, value in slots.items()
    }
    save_file(tensors, directory / "optimizer.safetensors")
    (directory / "state.json").write_text(json.dumps({"step": step, "param_groups": state["param_groups"]}))


def load_checkpoint(directory: Path, model: CarryOn, optimizer: torch.optim.Optimizer) -> int:
    model.load_state_dict(load_file(directory / "carry_on.safetensors"))
    meta = json.loads((directory / "state.json").read_text())
    slots: dict[int, dict] = {}
    for key, value in load_file(directory / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    return meta["step"]


def _eval_batches(layout: Layout, paths: list[str], batch_size: int):
    for path in paths:
        table = pq.read_table(path)
        for start in range(0, table.num_rows, batch_size):
            yield decode_batch(layout, table.slice(start, batch_size).to_pydict())


def train_loop(loop_config: dict) -> None:
    """Runs on every training worker."""
    torch.set_num_threads(loop_config["threads"] or os.cpu_count() or 1)
    torch.manual_seed(loop_config["seed"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    layout = Layout.from_json(loop_config["layout"])
    head = OutputHead.load(Path(loop_config["run_dir"]) / "head")
    carry_on = CarryOn(CarryOnConfig(**loop_config["carry_on"]))
    model = ray.train.torch.prepare_model(carry_on)
    device = ray.train.torch.get_device()
    head = head.to(device)
    optimizer = torch.optim.AdamW(
        carry_on.parameters(), lr=loop_config["lr"], weight_decay=loop_config["weight_decay"]
    )
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step = load_checkpoint(Path(directory), carry_on, optimizer)
        logger.info("worker %d resumed at step %d", rank, step)
    total = loop_config["total_steps"]
    metrics_path = Path(loop_config["run_dir"]) / "reports" / "metrics.jsonl"
    shard = ray.train.get_dataset_shard("train")
    started = time.time()
    tokens = 0
    while step < total:
        for columns in shard.iter_batches(batch_size=loop_config["batch_size"], batch_format="numpy"):
            batch = decode_batch(layout, columns).to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, base_lr=loop_config["lr"], warmup=loop_config["warmup"], total=total)
            loss, count = train_step(
                model, head, batch, optimizer, alpha=loop_config["alpha"], grad_clip=loop_config["grad_clip"]
            )
            tokens += count
            step += 1
            record = {"step": step, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "tokens": tokens,
                      "seconds": time.time() - started, "node": ray.get_runtime_context().get_node_id()}
            last = step >= total
            if step % loop_config["checkpoint_every"] == 0 or last:
                if loop_config["eval_paths"]:
                    scores = evaluate(carry_on, head, _eval_batches(
                        layout, loop_config["eval_paths"], loop_config["batch_size"]), loop_config["alpha"])
                    record["val_nll_base"], record["val_nll_merged"] = scores["nll_base"], scores["nll_merged"]
                with tempfile.TemporaryDirectory() as directory:
                    if rank == 0:
                        save_checkpoint(Path(directory), carry_on, optimizer, step)
                    ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None)
            elif step % loop_config["log_every"] == 0:
                ray.train.report(record)
            if rank == 0:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            if last:
                break


def total_steps(config: PipelineConfig, train_rows: int) -> int:
    if config.train.max_steps is not None:
        return config.train.max_steps
    per_epoch = math.ceil(train_rows / (config.train.batch_size * config.train.max_workers))
    return max(1, math.ceil(per_epoch * config.train.epochs))


def run_train(
    config: PipelineConfig, run_dir: Path, manifest: dict, layout: Layout, *, resources: dict[str, float]
) -> dict:
    """Fit the carry-on; returns the checkpoint directory and training figures."""
    spec = config.train
    started = time.time()
    embeddings = run_dir / "embeddings"
    train_paths = [str(embeddings / path) for path in manifest["splits"]["train"]["shards"]]
    eval_paths = [str(embeddings / path) for path in manifest["splits"]["eval"]["shards"]]
    if not train_paths:
        raise ValueError("the embeddings hold no training rows; check data.train_size and the dataset")
    (run_dir / "reports").mkdir(parents=True, exist_ok=True)
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
            "alpha": config.carry_on.alpha,
            "checkpoint_every": spec.checkpoint_every,
            "log_every": spec.log_every,
            "threads": spec.torch_threads,
            "seed": spec.seed,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=spec.use_gpu,
            resources_per_worker={"CPU": spec.num_cpus_per_worker, **resources},
        ),
        run_config=ray.train.RunConfig(
            name=f"{config.name}-train",
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
    losses = [r["loss"] for r in records]
    tail = losses[-10:]
    return {
        "checkpoint": result.checkpoint.path,
        "steps": steps,
        "loss_first": losses[0] if losses else None,
        "loss_last": sum(tail) / len(tail) if tail else None,  # mean of the last 10 steps
        "tokens": records[-1]["tokens"] if records else 0,
        "seconds": time.time() - started,
        "val": {k: records[-1][k] for k in ("val_nll_base", "val_nll_merged") if records and k in records[-1]},
    }
