"""Loss, training step and evaluation over any iterable of decoded batches (no Ray here).

Targets: token t is predicted from position t-1 when `target_mask[t]` is set. Logits are only
built at target positions and in chunks, each recomputed in the backward pass, so the full
(B, T, V) logit tensor never exists.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from carryon_ray.bases import OutputHead
from carryon_ray.carry_on import CarryOn, merge_hidden
from carryon_ray.records import Batch

LOSS_CHUNK = 1024


def target_positions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (B, T) mask of predicting positions and the (N,) target ids they predict."""
    predicting = torch.zeros_like(batch.target_mask)
    predicting[:, :-1] = batch.target_mask[:, 1:]
    return predicting, batch.input_ids[:, 1:][batch.target_mask[:, 1:]]


def _chunk_nll(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_nll(
    head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = LOSS_CHUNK
) -> torch.Tensor:
    """Summed next-token NLL of hidden (N, D) against targets (N,), chunk rows at a time."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        piece, goal = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and piece.requires_grad:
            total = total + checkpoint(_chunk_nll, head, piece, goal, use_reentrant=False)
        else:
            total = total + _chunk_nll(head, piece, goal)
    return total


def merged_hidden(carry_on: CarryOn, batch: Batch, alpha: float) -> torch.Tensor:
    """The training path: x̂ + α · g ⊙ Δ from stored (σ̂) inputs; (B, T, D)."""
    delta, gate, _ = carry_on(batch.sources)
    return merge_hidden(batch.residual, delta, gate, alpha)


def batch_nll(
    carry_on: CarryOn | None, head: OutputHead, batch: Batch, alpha: float
) -> tuple[torch.Tensor, int]:
    """(summed NLL over target tokens, number of target tokens); no carry-on = the base."""
    predicting, targets = target_positions(batch)
    hidden = batch.residual if carry_on is None else merged_hidden(carry_on, batch, alpha)
    return chunked_nll(head, hidden[predicting], targets), int(targets.numel())


def lr_at(step: int, *, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_step(
    carry_on: CarryOn,
    head: OutputHead,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    *,
    alpha: float,
    grad_clip: float,
) -> tuple[float, int]:
    """One optimizer step on the mean target-token NLL; returns (mean loss, target tokens)."""
    carry_on.train()
    total, count = batch_nll(carry_on, head, batch, alpha)
    loss = total / max(count, 1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(carry_on.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach()), count


@torch.no_grad()
def evaluate(
    carry_on: CarryOn | None, head: OutputHead, batches: Iterable[Batch], alpha: float
) -> dict[str, float]:
    """Mean per-token NLL of the base (x̂) and of the merged model over the same tokens."""
    if carry_on is not None:
        carry_on.eval()
    base_total = merged_total = 0.0
    tokens = 0
    for batch in batches:
        base, count = batch_nll(None, head, batch, alpha)
        base_total += float(base)
        if carry_on is not None:
            merged_total += float(batch_nll(carry_on, head, batch, alpha)[0])
        tokens += count
    if tokens == 0:
        raise ValueError("evaluation saw no target tokens; check data.eval_size and data.loss_on")
    result = {"nll_base": base_total / tokens, "tokens": tokens}
    if carry_on is not None:
        result["nll_merged"] = merged_total / tokens
    return result
