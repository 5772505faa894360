"""The one training loop of a carry-on, and the checkpoint that describes itself (no Ray here).

The Ray Train worker (`stages/train.py`), every search trial (`stages/search.py`) and the
benchmarks' carry-on arm run this loop; they differ only in where their batches come from and
what they do with a validation record. Read top to bottom, like a recipe:

    loop = TrainLoop(carry_on_config, layout, head, spec, alpha=1.0, total_steps=500)
    loop.restore(directory)                       # optional: continue a checkpoint
    loop.run(lambda epoch: batches_of(epoch), on_record=..., validate=...)
    loop.save(directory)

Every epoch is a different seeded permutation of the training rows (`epoch_seed`), so the
length-sorted shards never become a fixed short-to-long curriculum, and the same seed gives the
same order. A checkpoint holds the carry-on's config and the layout it reads (as nanoGPT keeps
`model_args`), the step, the epoch and how far into it the loop got, the learning-rate schedule,
the optimizer and the early-stopping state: export and resume never rebuild from the current
config, and a resumed run replays the rest of its epoch in the same order.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from carryon_ray.artifacts import read_described
from carryon_ray.bases import OutputHead
from carryon_ray.carry_on import CarryOn, CarryOnConfig
from carryon_ray.config import CarryOnSpec, TrainSpec
from carryon_ray.quantized_head import QuantizedHead
from carryon_ray.records import Batch, Layout, decode_batch
from carryon_ray.storage import location
from carryon_ray.training import (
    EarlyStopping,
    autocast_context,
    build_optimizer,
    evaluate,
    lr_at,
    prepare_carry_on,
    train_step,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "carryon_ray.checkpoint/1"
WEIGHTS = "carry_on.safetensors"
BEST = "best.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"


def carry_on_config(spec: CarryOnSpec, layout: Layout) -> CarryOnConfig:
    """The carry-on `spec` describes, reading the sources `layout` stores."""
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


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch: different every epoch, the same for the same seed."""
    return seed * 1_000_003 + epoch


def table_batches(
    layout: Layout, table: pa.Table, batch_size: int, *, seed: int | None, epoch: int = 0
) -> Iterator[Batch]:
    """Decoded batches of a compressed Arrow table: a seeded permutation of its rows for
    training (`seed`), table order for evaluation (`seed=None`). Only one batch is ever
    decoded at a time."""
    if seed is None:
        order = torch.arange(table.num_rows)
    else:
        order = torch.randperm(table.num_rows, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
    for start in range(0, table.num_rows, batch_size):
        # Zero-copy one-row slices: `take` on a column of many chunks (one per Parquet row
        # group) first concatenates the whole column, a copy of the table for every batch.
        batch_rows = order[start : start + batch_size].tolist()
        rows = pa.concat_tables([table.slice(row, 1) for row in batch_rows])
        yield decode_batch(layout, rows.to_pydict())


@dataclass
class LoopState:
    """Where the loop is: restored from a checkpoint, written into the next one."""

    step: int = 0
    epoch: int = 0
    batches_into_epoch: int = 0  # batches of `epoch` already trained
    tokens: int = 0


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself (its `state.json`)."""

    carry_on: CarryOnConfig
    layout: Layout
    alpha: float
    step: int
    weights: Path  # the weights to export: the best by validation if kept, else the latest

    @classmethod
    def read(cls, directory: str | Path) -> CheckpointInfo:
        """A checkpoint directory on any store (a remote one is copied to the local cache)."""
        directory = location(directory).materialize()
        meta = read_described(directory, STATE, format=CHECKPOINT_FORMAT, what="carry-on checkpoint")
        best = directory / BEST
        return cls(
            carry_on=CarryOnConfig(**meta["carry_on"]),
            layout=Layout.from_json(json.dumps(meta["layout"])),
            alpha=meta["alpha"],
            step=meta["step"],
            weights=best if best.exists() else directory / WEIGHTS,
        )

    def load(self) -> CarryOn:
        """The trained carry-on in the shape the checkpoint describes (float32, eval mode)."""
        carry_on = CarryOn(self.carry_on)
        carry_on.load_state_dict({k: v.float() for k, v in load_file(self.weights).items()})
        return carry_on.eval()


class TrainLoop:
    """A carry-on, its optimizer, schedule and early stopping, trained one batch at a time.

    `model` is what the forward pass runs (the carry-on itself, or a DistributedDataParallel
    wrapper of it: pass `wrap=ray.train.torch.prepare_model`).
    """

    def __init__(
        self,
        carry_on_config: CarryOnConfig,
        layout: Layout,
        head: OutputHead | QuantizedHead,
        spec: TrainSpec,
        *,
        alpha: float,
        total_steps: int,
        device: torch.device | str = "cpu",
        wrap: Callable[[CarryOn], torch.nn.Module] | None = None,
    ) -> None:
        self.spec, self.layout, self.head = spec, layout, head
        self.alpha, self.total_steps, self.device = alpha, total_steps, torch.device(device)
        self.carry_on = prepare_carry_on(CarryOn(carry_on_config), spec).to(self.device)
        self.model = wrap(self.carry_on) if wrap is not None else self.carry_on
        self.optimizer = build_optimizer(self.carry_on, spec, device=self.device)
        self.stopping = EarlyStopping(spec.early_stopping_patience, spec.early_stopping_min_delta)
        self.autocast = torch.bfloat16 if spec.autocast == "bfloat16" else None
        self.state = LoopState()
        self.best: dict[str, torch.Tensor] | None = None
        self.resumed_from: int | None = None
        self.warmup = spec.warmup_steps

    @property
    def done(self) -> bool:
        return self.state.step >= self.total_steps

    def validate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Held-out NLL of the base (x̂) and of the merged model over the same tokens."""
        with autocast_context(self.device, self.autocast):
            return evaluate(self.carry_on, self.head, (b.to(self.device) for b in batches),
                            self.alpha, self.spec.loss_chunk)

    def run(
        self,
        epoch_batches: Callable[[int], Iterable[Batch]],
        *,
        on_record: Callable[[dict, bool], bool] | None = None,
        validate: Callable[[], dict[str, float] | None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        """Train until `total_steps`, early stopping, or `should_stop()` (a time budget).

        `epoch_batches(epoch)` yields that epoch's batches in its seeded order; on resume the
        batches the checkpoint already trained are skipped. Every `checkpoint_every` steps (and
        at the last) `validate()` gives held-out figures (or None on ranks that do not score),
        early stopping and the best weights are updated, and `on_record(record, True)` is
        called — the caller saves a checkpoint there; other steps call `on_record(record,
        False)`. `on_record` may return True to stop.
        """
        state = self.state
        started = time.time()
        while not self.done:
            batches = islice(epoch_batches(state.epoch), state.batches_into_epoch, None)
            for batch in batches:
                batch = batch.to(self.device)
                self.schedule_lr()
                loss, count = train_step(
                    self.model, self.head, batch, self.optimizer, alpha=self.alpha,
                    grad_clip=self.spec.grad_clip, autocast=self.autocast, chunk=self.spec.loss_chunk,
                )
                self.advance(batch)
                if self.finish_step(loss, count, started=started, on_record=on_record, validate=validate,
                                    should_stop=should_stop):
                    return
            state.epoch += 1
            state.batches_into_epoch = 0

    def schedule_lr(self) -> None:
        """Set the learning rate of the coming step (`lr_at` the current step)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.state.step, base_lr=self.spec.learning_rate, warmup=self.warmup,
                                total=self.total_steps)

    def advance(self, batch: Batch) -> None:
        """Count one trained batch in the loop state."""
        self.state.step += 1
        self.state.batches_into_epoch += 1
        self.state.tokens += int(batch.lengths.sum())

    def finish_step(
        self,
        loss: float,
        count: int,
        *,
        started: float,
        on_record: Callable[[dict, bool], bool] | None,
        validate: Callable[[], dict[str, float] | None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> bool:
        """The bookkeeping after a step (`advance`d): the record, and every `checkpoint_every`
        steps (or at the last) validation, early stopping and the best weights, as `run`
        describes. True when the loop should stop."""
        spec, state = self.spec, self.state
        record = {"step": state.step, "epoch": state.epoch, "loss": loss,
                  "lr": self.optimizer.param_groups[0]["lr"], "target_tokens": count,
                  "tokens": state.tokens, "seconds": time.time() - started}
        if self.resumed_from is not None:
            record["resumed_from"] = self.resumed_from
        stop = self.done or bool(should_stop and should_stop())
        periodic = state.step % spec.checkpoint_every == 0 or stop
        if periodic and validate is not None:
            scores = validate()
            if scores is not None:
                record["val_nll_base"], record["val_nll_merged"] = scores["nll_base"], scores["nll_merged"]
                if self.stopping.update(scores["nll_merged"]) and not stop:
                    record["early_stop"] = stop = True
                if self.stopping.improved and spec.early_stopping_patience is not None:
                    self.best = {k: v.detach().cpu().clone() for k, v in self.carry_on.state_dict().items()}
        if on_record is not None and on_record(record, periodic):
            stop = True
        return stop

    def save(self, directory: str | Path) -> None:
        """The one checkpoint format: weights and optimizer tensors in safetensors; the
        carry-on config, layout, loop state, schedule and scalars in `state.json`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.carry_on.state_dict().items()}, directory / WEIGHTS)
        if self.best is not None:
            save_file(self.best, directory / BEST)
        optimizer = self.optimizer.state_dict()
        tensors, scalars = {}, {}
        for index, slots in optimizer["state"].items():
            for name, value in slots.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{index}.{name}"] = value.contiguous()
                else:  # bitsandbytes keeps some slots (the step) as plain numbers
                    scalars[f"{index}.{name}"] = value
        save_file(tensors, directory / OPTIMIZER)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "carry_on": self.carry_on.config.to_dict(),
            "layout": json.loads(self.layout.to_json()),
            "alpha": self.alpha,
            **asdict(self.state),
            "schedule": {"base_lr": self.spec.learning_rate, "warmup": self.warmup,
                         "total": self.total_steps, "step": self.state.step},
            "param_groups": optimizer["param_groups"],
            "scalars": scalars,
            "early_stopping": {"best": self.stopping.best, "bad_evals": self.stopping.bad_evals},
        }
        (directory / STATE).write_text(json.dumps(meta))

    def restore(self, directory: str | Path) -> int:
        """Continue a checkpoint of the same shape; returns the step it continues at."""
        directory = Path(directory)
        info = CheckpointInfo.read(directory)
        if info.carry_on.to_dict() != self.carry_on.config.to_dict():
            raise ValueError(
                f"checkpoint {directory} holds a carry-on of another shape ({info.carry_on.to_dict()}) "
                f"than this run builds ({self.carry_on.config.to_dict()}); start a new run directory"
            )
        meta = json.loads((directory / STATE).read_text())
        self.carry_on.load_state_dict(load_file(directory / WEIGHTS))
        slots: dict[int, dict] = {}
        for key, value in [*load_file(directory / OPTIMIZER).items(), *meta["scalars"].items()]:
            index, name = key.split(".", 1)
            slots.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
        self.state = LoopState(**{key: meta[key] for key in asdict(LoopState())})
        schedule = meta["schedule"]  # the schedule it was trained with, not the current config's
        self.total_steps, self.warmup = schedule["total"], schedule["warmup"]
        self.stopping.best = meta["early_stopping"]["best"]
        self.stopping.bad_evals = meta["early_stopping"]["bad_evals"]
        if (directory / BEST).exists():
            self.best = load_file(directory / BEST)
        self.resumed_from = self.state.step
        return self.state.step
