"""The carry-on f_θ: zero-initialised Δ, causality, and cached decoding equal to a full pass."""

from __future__ import annotations

import pytest
import torch

from carryon_ray.carry_on import CarryOn, CarryOnConfig, merge_hidden

DIMS = [24, 16]  # two sources of different widths
OUT = 32
STEPS = 9


def _carry_on(*, perturbed: bool = True, max_positions: int = 64) -> CarryOn:
    torch.manual_seed(0)
    config = CarryOnConfig(
        input_dims=DIMS,
        output_dim=OUT,
        hidden_size=16,
        num_layers=2,
        num_heads=4,
        max_positions=max_positions,
    )
    model = CarryOn(config).eval()
    if perturbed:  # a trained-looking Δ, so that Δ carries information the tests can see
        with torch.no_grad():
            model.delta.weight.normal_(std=0.5)
            model.gate.bias.normal_()
    return model


def _sources(batch: int = 2, steps: int = STEPS, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, steps, dim, generator=generator) for dim in DIMS]


def test_untrained_delta_is_zero_so_the_merge_is_the_residual():
    model = _carry_on(perturbed=False)
    assert torch.count_nonzero(model.delta.weight) == 0
    delta, gate, _ = model(_sources())
    assert delta.shape == gate.shape == (2, STEPS, OUT)
    assert torch.count_nonzero(delta) == 0
    assert torch.all((gate > 0) & (gate < 1))
    residual = torch.randn(2, STEPS, OUT)
    assert torch.equal(merge_hidden(residual, delta, gate, 1.0), residual)
    assert merge_hidden(residual, delta, gate, 0.0) is residual


@pytest.mark.parametrize("t", [0, 3, STEPS - 2])
def test_changing_a_later_token_leaves_earlier_outputs_unchanged(t):
    model = _carry_on()
    sources = _sources()
    changed = [s.clone() for s in sources]
    for s in changed:
        s[:, t + 1 :] = torch.randn_like(s[:, t + 1 :]) * 10
    with torch.no_grad():
        delta, gate, _ = model(sources)
        delta2, gate2, _ = model(changed)
    assert torch.equal(delta[:, : t + 1], delta2[:, : t + 1])
    assert torch.equal(gate[:, : t + 1], gate2[:, : t + 1])
    # ...and the change is visible from position t+1 on, so the check could fail.
    assert not torch.equal(delta[:, t + 1], delta2[:, t + 1])


def test_incremental_decoding_matches_the_full_pass():
    model = _carry_on()
    sources = _sources()
    with torch.no_grad():
        delta, gate, _ = model(sources)
        # A prompt of 4 positions at once, then one position at a time.
        pieces_delta, pieces_gate = [], []
        d, g, cache = model([s[:, :4] for s in sources])
        pieces_delta.append(d)
        pieces_gate.append(g)
        for position in range(4, STEPS):
            d, g, cache = model(
                [s[:, position : position + 1] for s in sources], start=position, cache=cache
            )
            pieces_delta.append(d)
            pieces_gate.append(g)
    assert all(k.shape[2] == STEPS for k, _ in cache)
    torch.testing.assert_close(torch.cat(pieces_delta, dim=1), delta, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(pieces_gate, dim=1), gate, rtol=0, atol=1e-5)


def test_one_token_at_a_time_from_the_start_matches_the_full_pass():
    model = _carry_on()
    sources = _sources(batch=1)
    with torch.no_grad():
        delta, _, _ = model(sources)
        cache = None
        steps = []
        for position in range(STEPS):
            d, _, cache = model(
                [s[:, position : position + 1] for s in sources], start=position, cache=cache
            )
            steps.append(d)
    torch.testing.assert_close(torch.cat(steps, dim=1), delta, rtol=0, atol=1e-5)


def test_position_matters():
    """The same inputs at another start position give other outputs (the positional term)."""
    model = _carry_on()
    sources = _sources(steps=2)
    with torch.no_grad():
        at_zero, _, _ = model(sources)
        at_five, _, _ = model(sources, start=5)
    assert not torch.allclose(at_zero, at_five)


def test_max_positions_overflow_is_a_clear_error():
    model = _carry_on(max_positions=8)
    with pytest.raises(ValueError, match="max_positions=8"):
        model(_sources(steps=9))
    with pytest.raises(ValueError, match="exceeds"):
        model(_sources(steps=1), start=8)
    model(_sources(steps=1), start=7)  # the last position still fits


def test_wrong_number_of_sources_is_refused():
    model = _carry_on()
    with pytest.raises(ValueError, match="expected 2 sources, got 1"):
        model(_sources()[:1])


def test_gradients_reach_every_parameter_once_delta_is_nonzero():
    model = _carry_on().train()
    delta, gate, _ = model(_sources())
    (delta * gate).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []
