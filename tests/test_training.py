"""Loss, training step, evaluation and schedule (no Ray): plain tensors in, numbers out."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from carryon_ray.bases import OutputHead
from carryon_ray.carry_on import CarryOn, CarryOnConfig
from carryon_ray.config import TrainSpec
from carryon_ray.records import Batch
from carryon_ray.training import (
    EarlyStopping,
    batch_nll,
    build_optimizer,
    chunked_nll,
    evaluate,
    lr_at,
    target_positions,
    train_step,
)

D, V = 16, 40


def _head(**kwargs) -> OutputHead:
    generator = torch.Generator().manual_seed(0)
    return OutputHead(
        torch.randn(V, D, generator=generator) * 0.3, torch.randn(V, generator=generator), **kwargs
    )


def _batch(lengths=(7, 5), seed: int = 0) -> Batch:
    """Right-padded rows; the first two tokens of each row are prompt, the rest targets."""
    generator = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.zeros(len(lengths), longest, dtype=torch.long)
    mask = torch.zeros(len(lengths), longest, dtype=torch.bool)
    residual = torch.zeros(len(lengths), longest, D)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, V, (n,), generator=generator)
        mask[row, 2:n] = True
        residual[row, :n] = torch.randn(n, D, generator=generator)
    return Batch(ids, mask, torch.tensor(lengths), residual, [residual.clone()])


def _carry_on() -> CarryOn:
    torch.manual_seed(0)
    return CarryOn(
        CarryOnConfig(input_dims=[D], output_dim=D, hidden_size=16, num_layers=1, max_positions=32)
    )


def test_target_positions_shift_by_one_and_skip_padding():
    batch = _batch((7, 5))
    predicting, targets = target_positions(batch)
    # Row 0 predicts tokens 2..6 from positions 1..5; row 1 tokens 2..4 from positions 1..3.
    assert predicting[0].tolist() == [False, True, True, True, True, True, False]
    assert predicting[1].tolist() == [False, True, True, True, False, False, False]
    assert targets.tolist() == batch.input_ids[0, 2:7].tolist() + batch.input_ids[1, 2:5].tolist()


@pytest.mark.parametrize(
    "head_kwargs", [{}, {"logit_scale": 0.5, "softcap": 3.0}], ids=["plain", "softcap"]
)
def test_chunked_nll_equals_plain_cross_entropy(head_kwargs):
    head = _head(**head_kwargs)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, D, generator=generator)
    targets = torch.randint(0, V, (10,), generator=generator)
    plain = F.cross_entropy(head(hidden), targets, reduction="sum")
    whole = chunked_nll(head, hidden, targets)
    torch.testing.assert_close(whole, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        chunked_nll(head, hidden, targets, chunk=3), plain, rtol=1e-6, atol=1e-5
    )
    assert chunked_nll(head, hidden[:0], targets[:0]).item() == 0.0


def test_gradients_through_the_checkpointed_chunks_equal_plain_ones():
    head = _head(softcap=3.0)
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(10, D, generator=generator)
    targets = torch.randint(0, V, (10,), generator=generator)
    plain_input = hidden.clone().requires_grad_(True)
    F.cross_entropy(head(plain_input), targets, reduction="sum").backward()
    chunked_input = hidden.clone().requires_grad_(True)
    chunked_nll(head, chunked_input, targets, chunk=3).backward()
    torch.testing.assert_close(chunked_input.grad, plain_input.grad, rtol=1e-5, atol=1e-6)
    assert head.weight.grad is None  # the head stays frozen


def test_batch_nll_without_carry_on_is_the_residual_loss():
    head = _head()
    batch = _batch()
    predicting, targets = target_positions(batch)
    total, count = batch_nll(None, head, batch, alpha=1.0)
    assert count == 8
    torch.testing.assert_close(
        total, F.cross_entropy(head(batch.residual[predicting]), targets, reduction="sum")
    )


def test_train_steps_lower_the_loss_on_a_fixed_batch():
    head, batch, carry_on = _head(), _batch(), _carry_on()
    optimizer = torch.optim.AdamW(carry_on.parameters(), lr=1e-2)
    losses = [
        train_step(carry_on, head, batch, optimizer, alpha=1.0, grad_clip=1.0)[0] for _ in range(15)
    ]
    start, _ = batch_nll(None, head, batch, alpha=1.0)
    assert losses[0] == pytest.approx(float(start) / 8, rel=1e-6)  # untrained: exactly the base
    assert losses[-1] < 0.8 * losses[0], losses
    assert train_step(carry_on, head, batch, optimizer, alpha=1.0, grad_clip=1.0)[1] == 8


def test_evaluate_scores_base_and_merged_on_the_same_tokens():
    head, carry_on = _head(), _carry_on()
    batches = [_batch((7, 5), seed=0), _batch((6,), seed=1)]
    untrained = evaluate(carry_on, head, batches, alpha=1.0)
    assert untrained["tokens"] == 8 + 4
    assert untrained["nll_merged"] == untrained["nll_base"]  # zero Δ: the base exactly
    with torch.no_grad():
        carry_on.delta.weight.normal_(std=0.5)
    trained = evaluate(carry_on, head, batches, alpha=1.0)
    assert trained["tokens"] == untrained["tokens"] and trained["nll_base"] == untrained["nll_base"]
    assert trained["nll_merged"] != trained["nll_base"]
    assert evaluate(carry_on, head, batches, alpha=0.0)["nll_merged"] == trained["nll_base"]
    assert set(evaluate(None, head, batches, alpha=1.0)) == {"nll_base", "tokens"}
    empty = _batch((5,))
    empty.target_mask[:] = False
    with pytest.raises(ValueError, match="no target tokens"):
        evaluate(carry_on, head, [empty], alpha=1.0)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_ten_percent():
    kwargs = {"base_lr": 1.0, "warmup": 4, "total": 24}
    assert [lr_at(step, **kwargs) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kwargs) == pytest.approx(1.0)
    assert lr_at(14, **kwargs) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lr_at(24, **kwargs) == pytest.approx(0.1)
    assert lr_at(1000, **kwargs) == pytest.approx(0.1)
    decay = [lr_at(step, **kwargs) for step in range(4, 25)]
    assert all(a > b for a, b in itertools.pairwise(decay))
    assert lr_at(0, base_lr=3e-4, warmup=0, total=10) == pytest.approx(3e-4)
    assert not math.isnan(lr_at(5, base_lr=1.0, warmup=5, total=5))


def test_train_step_under_bf16_autocast_keeps_float32_parameters_and_learns():
    head, batch, carry_on = _head(), _batch(), _carry_on()
    optimizer = torch.optim.AdamW(carry_on.parameters(), lr=1e-2)
    losses = [
        train_step(carry_on, head, batch, optimizer, alpha=1.0, grad_clip=1.0,
                   autocast=torch.bfloat16, chunk=3)[0]
        for _ in range(15)
    ]
    assert all(p.dtype == torch.float32 for p in carry_on.parameters())
    assert losses[-1] < 0.8 * losses[0], losses


def test_chunked_nll_with_a_bfloat16_head_is_close_to_float32():
    head = _head()
    low = OutputHead(head.weight.data.bfloat16(), head.bias.data.bfloat16())
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(10, D, generator=generator, requires_grad=True)
    targets = torch.randint(0, V, (10,), generator=generator)
    exact = chunked_nll(head, hidden, targets, chunk=4)
    approx = chunked_nll(low, hidden, targets, chunk=4)
    torch.testing.assert_close(approx, exact, rtol=2e-2, atol=2e-2)
    approx.backward()
    assert hidden.grad.dtype == torch.float32 and torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "adamw4bit", "auto"])
def test_build_optimizer(name):
    carry_on = _carry_on()
    optimizer = build_optimizer(carry_on, TrainSpec(optimizer=name, learning_rate=1e-3), device="cpu")
    expected = {"adamw8bit": "AdamW8bit", "adamw4bit": "AdamW4bit"}.get(name, "AdamW")  # auto: AdamW off CUDA
    assert type(optimizer).__name__ == expected
    assert optimizer.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="unknown"):
        build_optimizer(carry_on, TrainSpec.model_construct(optimizer="sgd"), device="cpu")


def test_early_stopping_counts_validations_without_improvement():
    stopping = EarlyStopping(patience=2, min_delta=0.1)
    assert [stopping.update(v) for v in (3.0, 2.5, 2.45, 2.6)] == [False, False, False, True]
    assert stopping.best == 2.5 and stopping.bad_evals == 2
    assert stopping.update(1.0) is False and stopping.improved
    never = EarlyStopping(patience=None)
    assert not any(never.update(5.0) for _ in range(10))
