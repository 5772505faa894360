"""Many tenants' carry-ons trained together against one shared frozen head (no Ray here).

Each tenant keeps its own `TrainLoop` (carry-on, optimizer, schedule, early stopping, state,
checkpoint), seeded as if it trained alone. A grouped step runs every tenant's carry-on on its
own batch, concatenates all tenants' merged target rows and makes ONE pass through the head
(chunks of `loss_chunk` rows, as `chunked_nll`), whose objective is

    Σ_tenants  (Σ of that tenant's row NLLs) / (its target count)

so each tenant's gradient is exactly what training it alone gives; then every tenant clips
and steps its own parameters. Rows never mix in the head pass, so a tenant whose loss is not
finite is marked failed, does not step, and leaves the others untouched.

    loop = GroupedLoop(members, layout, head)
    loop.restore(directory)                       # optional: continue a grouped checkpoint
    loop.run(lambda tenant, epoch: batches_of(tenant, epoch), on_record=..., validate=...)
    loop.save(directory)
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from carryon_ray.artifacts import read_described
from carryon_ray.bases import OutputHead
from carryon_ray.carry_on import CarryOnConfig
from carryon_ray.config import TrainSpec
from carryon_ray.loop import TrainLoop
from carryon_ray.quantized_head import QuantizedHead
from carryon_ray.records import Batch, Layout
from carryon_ray.training import (
    LOSS_CHUNK,
    autocast_context,
    chunked_nll_and_grad,
    merged_hidden,
    target_positions,
)

logger = logging.getLogger(__name__)

GROUP_FORMAT = "carryon_ray.grouped_checkpoint/1"
GROUP = "group.json"
_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class GroupMember:
    """One tenant of a group: its carry-on shape, merge strength and train settings."""

    tenant: str
    carry_on: CarryOnConfig
    alpha: float
    spec: TrainSpec
    total_steps: int


class GroupedLoop:
    """One `TrainLoop` per tenant, all stepped together through one shared frozen head.

    `loops[tenant]` is that tenant's loop; `failed[tenant]` says why a tenant stopped taking
    part (a non-finite loss, naming the step).
    """

    def __init__(
        self,
        members: Iterable[GroupMember],
        layout: Layout,
        head: OutputHead | QuantizedHead,
        *,
        device: torch.device | str = "cpu",
        loss_chunk: int = LOSS_CHUNK,
    ) -> None:
        members = list(members)
        names = [member.tenant for member in members]
        if not members:
            raise ValueError("a grouped loop needs at least one member")
        if len(set(names)) != len(names):
            raise ValueError(f"tenant ids must be unique; got {names}")
        for name in names:
            if not _TENANT_NAME.match(name):
                raise ValueError(f"tenant id {name!r} is not a safe directory name (letters, digits, '.', '_', '-')")
        if len({member.spec.autocast for member in members}) > 1:
            raise ValueError(
                "members of a grouped loop must agree on train.autocast (the head pass is shared); got "
                + ", ".join(f"{member.tenant}={member.spec.autocast}" for member in members)
            )
        if any(member.spec.optimizer_in_backward for member in members):
            raise ValueError("train.optimizer_in_backward is not supported in a grouped loop; set it to false")
        self.members = {member.tenant: member for member in members}
        self.layout, self.head, self.device, self.loss_chunk = layout, head, torch.device(device), loss_chunk
        self.loops: dict[str, TrainLoop] = {}
        for member in members:
            torch.manual_seed(member.spec.seed)  # the same initial weights as training it alone
            self.loops[member.tenant] = TrainLoop(member.carry_on, layout, head, member.spec, alpha=member.alpha,
                                                  total_steps=member.total_steps, device=self.device)
        self.autocast = self.loops[names[0]].autocast  # the head pass's, the same for all
        self.failed: dict[str, str] = {}

    @property
    def active(self) -> list[str]:
        """Tenants still training: neither done nor failed."""
        return [tenant for tenant, loop in self.loops.items() if not loop.done and tenant not in self.failed]

    def step(self, batches: dict[str, Batch]) -> dict[str, tuple[float, int]]:
        """One optimizer step for every tenant given a batch (failed tenants are skipped);
        returns tenant -> (mean target-token NLL, target tokens) for the tenants that stepped.
        A tenant whose loss is not finite lands in `failed` and does not step."""
        unknown = sorted(set(batches) - set(self.loops))
        if unknown:
            raise ValueError(f"no member for tenants {unknown}; members: {sorted(self.loops)}")
        tenants, hidden, targets, counts, stepped = [], [], [], [], {}
        for tenant, batch in batches.items():
            if tenant in self.failed:
                continue
            loop, batch = self.loops[tenant], batch.to(self.device)
            loop.schedule_lr()
            loop.model.train()
            with autocast_context(self.device, loop.autocast):
                predicting, goal = target_positions(batch)
                hidden.append(merged_hidden(loop.model, batch, loop.alpha)[predicting])  # (n_t, D)
            tenants.append(tenant)
            targets.append(goal)
            counts.append(int(goal.numel()))
            stepped[tenant] = batch
        if not tenants:
            return {}
        # Row weights 1/count_t make the shared objective Σ_t mean NLL_t.
        weights = torch.cat([torch.full((count,), 1.0 / max(count, 1), device=self.device) for count in counts])
        with autocast_context(self.device, self.autocast):
            row_nll, grad = chunked_nll_and_grad(
                self.head, torch.cat([rows.detach() for rows in hidden]), torch.cat(targets),
                chunk=self.loss_chunk, weights=weights,
            )
        results = {}
        for tenant, rows, nll, row_grad, count in zip(
            tenants, hidden, row_nll.split(counts), grad.split(counts), counts, strict=True
        ):
            loop = self.loops[tenant]
            loss = float(nll.sum() / max(count, 1))
            if not math.isfinite(loss):
                self.failed[tenant] = f"loss {loss} at step {loop.state.step + 1}"
                logger.warning("tenant %s failed: %s; the others go on", tenant, self.failed[tenant])
                continue
            loop.optimizer.zero_grad(set_to_none=True)
            if rows.requires_grad:
                rows.backward(row_grad.to(rows.dtype))
            if loop.spec.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(loop.carry_on.parameters(), loop.spec.grad_clip)
            loop.optimizer.step()
            loop.advance(stepped[tenant])
            results[tenant] = (loss, count)
        return results

    def run(
        self,
        epoch_batches: Callable[[str, int], Iterable[Batch]],
        *,
        on_record: Callable[[str, dict, bool], bool | None] | None = None,
        validate: Callable[[str], dict[str, float] | None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        """Train every tenant until its `total_steps` or early stopping (or until it fails),
        all together, or until `should_stop()` (checked once per grouped step).

        As `TrainLoop.run`, per tenant: `epoch_batches(tenant, epoch)` yields that tenant's
        batches of that epoch (on resume the trained ones are skipped); every
        `checkpoint_every` of its steps (and at its last) `validate(tenant)` scores it and
        `on_record(tenant, record, True)` is called, other steps `on_record(tenant, record,
        False)`; records carry "tenant". `on_record` returning True stops that tenant.
        """
        started = time.time()
        iterators: dict[str, Iterator[Batch]] = {}
        stopped: set[str] = set()
        while tenants := [tenant for tenant in self.active if tenant not in stopped]:
            results = self.step({tenant: self._next_batch(tenant, epoch_batches, iterators) for tenant in tenants})
            stop_all = bool(should_stop and should_stop())
            for tenant, (loss, count) in results.items():
                tenant_record = None if on_record is None else _tagged(on_record, tenant)
                tenant_validate = None if validate is None else (lambda tenant=tenant: validate(tenant))
                if self.loops[tenant].finish_step(loss, count, started=started, on_record=tenant_record,
                                                  validate=tenant_validate, should_stop=lambda stop=stop_all: stop):
                    stopped.add(tenant)
            if stop_all:
                return

    def _next_batch(
        self, tenant: str, epoch_batches: Callable[[str, int], Iterable[Batch]], iterators: dict[str, Iterator[Batch]]
    ) -> Batch:
        """The tenant's next batch, moving to its next epoch when this one is exhausted."""
        state = self.loops[tenant].state
        for _ in range(2):  # the rest of this epoch, else the whole next one
            if tenant not in iterators:
                iterators[tenant] = islice(iter(epoch_batches(tenant, state.epoch)), state.batches_into_epoch, None)
            batch = next(iterators[tenant], None)
            if batch is not None:
                return batch
            del iterators[tenant]
            state.epoch += 1
            state.batches_into_epoch = 0
        raise ValueError(f"tenant {tenant!r}: epoch {state.epoch} yields no batches")

    def save(self, directory: str | Path) -> None:
        """One `TrainLoop` checkpoint per tenant in `directory/<tenant>`, and `group.json`
        naming the tenants and the failures."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for tenant, loop in self.loops.items():
            loop.save(directory / tenant)
        meta = {"format": GROUP_FORMAT, "tenants": list(self.loops), "failed": self.failed}
        (directory / GROUP).write_text(json.dumps(meta))

    def restore(self, directory: str | Path) -> dict[str, int]:
        """Continue the tenants a grouped checkpoint holds (members it lacks start fresh);
        returns tenant -> the step it continues at, for the restored ones."""
        directory = Path(directory)
        meta = read_described(directory, GROUP, format=GROUP_FORMAT, what="grouped checkpoint")
        steps = {}
        for tenant in meta["tenants"]:
            if tenant in self.loops:
                steps[tenant] = self.loops[tenant].restore(directory / tenant)
                if tenant in meta["failed"]:
                    self.failed[tenant] = meta["failed"][tenant]
        return steps


def _tagged(on_record: Callable[[str, dict, bool], bool | None], tenant: str) -> Callable[[dict, bool], bool]:
    """A `TrainLoop` record callback that passes the tenant along and tags the record."""

    def callback(record: dict, periodic: bool) -> bool:
        return bool(on_record(tenant, {**record, "tenant": tenant}, periodic))

    return callback
