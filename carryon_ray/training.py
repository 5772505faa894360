"""Loss, training step and evaluation over any iterable of decoded batches (no Ray here).

Targets: token t is predicted from position t-1 when `target_mask[t]` is set. Logits are only
built at target positions and in chunks of rows; each chunk's gradient with respect to the
hidden state is computed while its logits exist and only that (N, D) gradient is kept, so the
full (B, T, V) logit tensor never exists and the backward pass recomputes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from torch.nn import functional as F

from carryon_ray.bases import OutputHead
from carryon_ray.carry_on import CarryOn, merge_hidden
from carryon_ray.config import TrainSpec
from carryon_ray.optimizers import ParameterwiseOptimizer, adamw, resolve_optimizer
from carryon_ray.quantized_head import QuantizedHead, blocked_nll
from carryon_ray.records import Batch

LOSS_CHUNK = 1024


def target_positions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (B, T) mask of predicting positions and the (N,) target ids they predict."""
    predicting = torch.zeros_like(batch.target_mask)
    predicting[:, :-1] = batch.target_mask[:, 1:]
    return predicting, batch.input_ids[:, 1:][batch.target_mask[:, 1:]]


def _row_nll(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def _nll_and_grad(
    head: OutputHead | QuantizedHead, hidden: torch.Tensor, targets: torch.Tensor, *, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """((N,) float32 NLL of every row of one chunk, d(summed NLL)/d(hidden) or None); a
    quantized head goes through its vocabulary blocks, a float head through the whole
    (chunk, V) logits. Rows never mix: a non-finite row leaves the others' values alone."""
    if isinstance(head, QuantizedHead):
        return blocked_nll(head, hidden, targets, with_grad=with_grad, per_row=True)
    if not with_grad:
        return _row_nll(head, hidden, targets), None
    piece = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        rows = _row_nll(head, piece, targets)
        (grad,) = torch.autograd.grad(rows.sum(), piece)
    return rows.detach(), grad


def chunked_nll_and_grad(
    head: OutputHead | QuantizedHead,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk: int = LOSS_CHUNK,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (N,) float32 NLL of every row of hidden (N, D) against targets (N,) and the
    (N, D) gradient of Σ weights·NLL (weights None: all 1) with respect to hidden, chunk rows
    at a time; only that gradient outlives a chunk. No autograd graph is built."""
    row_nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    grad = torch.empty_like(hidden)
    for start in range(0, hidden.shape[0], chunk):
        row_nll[start : start + chunk], grad[start : start + chunk] = _nll_and_grad(
            head, hidden[start : start + chunk], targets[start : start + chunk], with_grad=True
        )
    if weights is not None:
        grad = grad * weights.to(grad.dtype)[:, None]
    return row_nll, grad


class _ChunkedNLL(torch.autograd.Function):
    """Summed NLL whose forward pass also computes d(NLL)/d(hidden), chunk by chunk
    (`chunked_nll_and_grad`).

    Only the (N, D) gradient survives a chunk; its logits are freed at once. The head is
    frozen, so no gradient flows to it.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, head, targets: torch.Tensor, chunk: int):
        row_nll, grad = chunked_nll_and_grad(head, hidden, targets, chunk=chunk)
        ctx.save_for_backward(grad)
        return row_nll.sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def chunked_nll(
    head: OutputHead | QuantizedHead,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = LOSS_CHUNK,
) -> torch.Tensor:
    """Summed next-token NLL of hidden (N, D) against targets (N,), chunk rows at a time
    (a quantized head: each chunk one vocabulary block at a time)."""
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _ChunkedNLL.apply(hidden, head, targets, chunk)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        piece, goal = hidden[start : start + chunk], targets[start : start + chunk]
        total = total + _nll_and_grad(head, piece, goal, with_grad=False)[0].sum()
    return total


def merged_hidden(carry_on: CarryOn, batch: Batch, alpha: float) -> torch.Tensor:
    """The training path: x̂ + α · g ⊙ Δ from stored (σ̂) inputs; (B, T, D)."""
    delta, gate, _ = carry_on(batch.sources)
    return merge_hidden(batch.residual, delta, gate, alpha)


def batch_nll(
    carry_on: CarryOn | None,
    head: OutputHead,
    batch: Batch,
    alpha: float,
    chunk: int = LOSS_CHUNK,
) -> tuple[torch.Tensor, int]:
    """(summed NLL over target tokens, number of target tokens); no carry-on = the base."""
    predicting, targets = target_positions(batch)
    hidden = batch.residual if carry_on is None else merged_hidden(carry_on, batch, alpha)
    return chunked_nll(head, hidden[predicting], targets, chunk), int(targets.numel())


def lr_at(step: int, *, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast_context(device: torch.device | str, dtype: torch.dtype | None):
    """bf16 autocast on `device` when dtype is given, else nothing."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def train_step(
    carry_on: CarryOn,
    head: OutputHead,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    *,
    alpha: float,
    grad_clip: float | None,
    autocast: torch.dtype | None = None,
    chunk: int = LOSS_CHUNK,
) -> tuple[float, int]:
    """One optimizer step on the mean target-token NLL; returns (mean loss, target tokens).

    With `autocast` (torch.bfloat16) the carry-on and the head run under autocast; the
    parameters, their gradients and the loss stay float32. `grad_clip` None: no clipping.
    With bfloat16 weights (`prepare_carry_on`) the merged state x + α·g⊙Δ and the loss are
    still float32 (x is). An optimizer that steps in backward has already stepped when
    `backward()` returns; its `step()` does nothing.
    """
    carry_on.train()
    with autocast_context(batch.residual.device, autocast):
        total, count = batch_nll(carry_on, head, batch, alpha, chunk)
    loss = total / max(count, 1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(carry_on.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach()), count


def prepare_carry_on(carry_on: CarryOn, spec: TrainSpec) -> CarryOn:
    """The carry-on as `spec` trains it; called once per loop, before `build_optimizer`.

    float32 (the default) returns it untouched; `param_dtype: bfloat16` casts its parameters
    in place, one tensor at a time, so at most one float32 tensor is alive beside them.
    """
    if spec.param_dtype == "float32":
        return carry_on
    return carry_on.to(getattr(torch, spec.param_dtype))


def build_optimizer(
    carry_on: CarryOn, spec: TrainSpec, *, device: torch.device | str
) -> torch.optim.Optimizer | ParameterwiseOptimizer:
    """AdamW over the carry-on's parameters as `spec` asks (see `carryon_ray/optimizers.py`).

    `optimizer`: `adamw8bit` is bitsandbytes' 8-bit AdamW (block-wise quantized moments),
    `adamw4bit` keeps them in 4 bits (`AdamW4bit`), `auto` picks 8-bit on CUDA and plain AdamW
    elsewhere. Float32 weights stepped after backward
    (the default) get that optimizer itself; bfloat16 weights or `optimizer_in_backward` get a
    `ParameterwiseOptimizer` (inner optimizers over pieces of each parameter, the same interface).
    """
    name = resolve_optimizer(spec.optimizer, device)
    lr, weight_decay = spec.learning_rate, spec.weight_decay
    parameters = list(carry_on.parameters())
    stepwise = spec.optimizer_in_backward or any(p.dtype != torch.float32 for p in parameters)
    if not stepwise:
        return adamw(name, parameters, lr=lr, weight_decay=weight_decay)
    return ParameterwiseOptimizer(
        parameters, partial(adamw, name, lr=lr, weight_decay=weight_decay), lr=lr,
        weight_decay=weight_decay, in_backward=spec.optimizer_in_backward, seed=spec.seed,
    )


@dataclass
class EarlyStopping:
    """Stop after `patience` validations in a row that fail to beat the best by `min_delta`."""

    patience: int | None
    min_delta: float = 0.0
    best: float = math.inf
    bad_evals: int = 0

    def update(self, value: float) -> bool:
        """Record one validation score (lower is better); True when training should stop."""
        if value < self.best - self.min_delta:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return self.patience is not None and self.bad_evals >= self.patience

    @property
    def improved(self) -> bool:
        """Whether the last update set a new best."""
        return self.bad_evals == 0 and self.best < math.inf


@torch.no_grad()
def evaluate(
    carry_on: CarryOn | None,
    head: OutputHead,
    batches: Iterable[Batch],
    alpha: float,
    chunk: int = LOSS_CHUNK,
    *,
    with_base: bool = True,
) -> dict[str, float]:
    """Mean per-token NLL of the base (x̂) and of the merged model over the same tokens
    (`with_base=False`: the merged model's only, for a caller that has the base's)."""
    if carry_on is not None:
        carry_on.eval()
    base_total = merged_total = 0.0
    tokens = 0
    for batch in batches:
        if with_base or carry_on is None:
            base, count = batch_nll(None, head, batch, alpha, chunk)
            base_total += float(base)
        if carry_on is not None:
            merged, count = batch_nll(carry_on, head, batch, alpha, chunk)
            merged_total += float(merged)
        tokens += count
    if tokens == 0:
        raise ValueError("evaluation saw no target tokens; check data.eval_size and data.loss_on")
    result = {"tokens": tokens, **({"nll_base": base_total / tokens} if with_base or carry_on is None else {})}
    if carry_on is not None:
        result["nll_merged"] = merged_total / tokens
    return result
