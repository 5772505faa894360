"""The merged model: α = 0 / untrained is the base bit for bit, generation, and train/serve parity."""

from __future__ import annotations

import pytest
import torch

from carryon_ray.bases import FrozenBase
from carryon_ray.carry_on import CarryOn, CarryOnConfig, merge_hidden
from carryon_ray.codec import CodecSpec, roundtrip
from carryon_ray.merged import MergedModel, SamplingParams, serving_nll
from carryon_ray.records import (
    Batch,
    LayerRef,
    Layout,
    decode_batch,
    encode_rows,
    serving_views,
    to_table,
)
from carryon_ray.training import evaluate, merged_hidden

PROMPT = "Question: Natalia sold 48 clips"
TEXT = "Answer: She sold 48 / 2 = 24 clips in May, so 48 + 24 = 72 clips."


def _layout(
    base: FrozenBase, residual_bits: int = 8, input_bits: int = 4, codec: str = "absmax"
) -> Layout:
    """Final layer as residual and carry-on input, plus the token embeddings as a shortcut."""
    final = LayerRef(base.name, base.num_layers, base.hidden_size)
    shortcut = LayerRef(base.name, 0, base.hidden_size)
    return Layout.build(
        codec=codec,
        residual=(final, residual_bits),
        sources=[(final, input_bits), (shortcut, input_bits)],
        bases=[base.identity()],
    )


def _carry_on(base: FrozenBase, *, perturbed: bool, max_positions: int = 128) -> CarryOn:
    torch.manual_seed(0)
    config = CarryOnConfig(
        input_dims=[base.hidden_size] * 2,
        output_dim=base.hidden_size,
        hidden_size=16,
        num_layers=2,
        num_heads=4,
        max_positions=max_positions,
    )
    carry_on = CarryOn(config)
    if perturbed:  # stands in for a trained carry-on
        with torch.no_grad():
            carry_on.delta.weight.normal_(std=0.1)
    return carry_on


def _merged(base: FrozenBase, *, perturbed: bool, **layout_kwargs) -> MergedModel:
    layout = _layout(base, **layout_kwargs)
    return MergedModel(base, _carry_on(base, perturbed=perturbed), layout)


def _ids(base: FrozenBase, text: str = PROMPT) -> torch.Tensor:
    return torch.tensor([base.tokenizer(text)["input_ids"]])


def test_alpha_zero_and_untrained_carry_on_give_the_base_logits_exactly(tiny_base):
    ids = _ids(tiny_base)
    expected = tiny_base.model(input_ids=ids).logits
    assert torch.equal(MergedModel(tiny_base).logits(ids), expected)
    untrained = _merged(tiny_base, perturbed=False)
    assert torch.equal(untrained.logits(ids, alpha=0.0), expected)
    assert torch.equal(untrained.logits(ids, alpha=1.0), expected)
    assert torch.equal(untrained.logits(ids, alpha=3.0), expected)


def test_a_trained_carry_on_changes_logits_only_when_alpha_is_positive(tiny_base):
    ids = _ids(tiny_base)
    expected = tiny_base.model(input_ids=ids).logits
    merged = _merged(tiny_base, perturbed=True)
    assert torch.equal(merged.logits(ids, alpha=0.0), expected)
    half, full = merged.logits(ids, alpha=0.5), merged.logits(ids)
    assert not torch.allclose(full, expected, atol=1e-3)
    # α scales the correction linearly in hidden space.
    z0, z_half, z1 = (merged.hidden(ids, alpha=a) for a in (0.0, 0.5, 1.0))
    torch.testing.assert_close(z_half - z0, (z1 - z0) / 2, rtol=0, atol=1e-5)
    assert not torch.allclose(half, full, atol=1e-3)
    # The merged model's default α is its own; an explicit α overrides it per call.
    zero_default = MergedModel(tiny_base, merged.carry_on, merged.layout, alpha=0.0)
    assert torch.equal(zero_default.logits(ids), expected)
    assert torch.equal(zero_default.logits(ids, alpha=1.0), full)


@pytest.mark.parametrize("with_carry_on", [False, True], ids=["base", "untrained"])
def test_greedy_generation_equals_hf_generate(lively_base, with_carry_on):
    ids = _ids(lively_base)
    merged = _merged(lively_base, perturbed=False) if with_carry_on else MergedModel(lively_base)
    steps = 16
    ours = merged.generate(ids[0].tolist(), SamplingParams(max_new_tokens=steps))
    hf = lively_base.model.generate(
        ids, do_sample=False, max_new_tokens=steps, eos_token_id=None, pad_token_id=0
    )[0, ids.shape[1] :].tolist()
    assert len(hf) == steps  # eos disabled on both sides
    assert ours == hf
    assert len(set(ours)) > 3  # a sequence that could disagree
    if with_carry_on:  # α = 0 on a carry-on gives the same tokens too
        assert (
            merged.generate(ids[0].tolist(), SamplingParams(max_new_tokens=steps), alpha=0.0) == hf
        )


def test_trained_carry_on_changes_generation_and_stop_tokens_end_it(lively_base):
    ids = _ids(lively_base)[0].tolist()
    merged = _merged(lively_base, perturbed=True)
    base_tokens = merged.generate(ids, SamplingParams(max_new_tokens=12), alpha=0.0)
    tokens = merged.generate(ids, SamplingParams(max_new_tokens=12), alpha=1.0)
    assert tokens != base_tokens
    stop = tokens[4]
    stopped = merged.generate(
        ids, SamplingParams(max_new_tokens=12, stop_token_ids=(stop,)), alpha=1.0
    )
    assert stopped == tokens[: tokens.index(stop) + 1]


def test_incremental_generation_matches_full_merged_logits(lively_base):
    """Each greedy token is the argmax of a full (uncached) pass over prompt + tokens so far."""
    ids = _ids(lively_base)[0].tolist()
    merged = _merged(lively_base, perturbed=True)
    tokens = merged.generate(ids, SamplingParams(max_new_tokens=8))
    full = merged.logits(torch.tensor([ids + tokens]))[0]  # (T, V)
    assert full[len(ids) - 1 : -1].argmax(dim=-1).tolist() == tokens


def test_sampling_with_a_seed_is_reproducible(lively_base):
    ids = _ids(lively_base)[0].tolist()
    merged = _merged(lively_base, perturbed=True)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    first = merged.generate(ids, params)
    assert merged.generate(ids, params) == first
    other = merged.generate(
        ids, SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=8)
    )
    assert other != first


def test_context_limits(tiny_base):
    layout = _layout(tiny_base)
    merged = MergedModel(tiny_base, _carry_on(tiny_base, perturbed=False, max_positions=16), layout)
    assert merged.context_length == 16
    with pytest.raises(ValueError, match="context holds 16"):
        merged.generate(list(range(1, 18)), SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="context"):
        merged.logits(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        merged.generate([], SamplingParams())
    # Generation stops at the context's end.
    assert len(merged.generate(list(range(1, 13)), SamplingParams(max_new_tokens=10))) == 4


def test_invalid_sampling_params_and_half_configured_models(tiny_base):
    for bad in ({"max_new_tokens": -1}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="needs its layout"):
        MergedModel(tiny_base, _carry_on(tiny_base, perturbed=False))


# --- train/serve parity ---------------------------------------------------------------------


def _training_batch(base: FrozenBase, layout: Layout, ids: torch.Tensor) -> Batch:
    """What the embed stage stores and the train stage decodes, for one sequence."""
    states, _ = base.forward(ids, [ref.layer for ref in layout.layers.values()])
    hidden = {key: [states[ref.layer][0]] for key, ref in layout.layers.items()}
    row = ids[0].tolist()
    columns = encode_rows(
        layout, ids=["0"], input_ids=[row], target_masks=[[1] * len(row)], hidden=hidden
    )
    return decode_batch(layout, to_table(layout, columns).to_pydict())


def _head_bound(base: FrozenBase, hidden_error: torch.Tensor) -> torch.Tensor:
    """|head(a) - head(b)| <= max_v ||W_v||_1 * max_d |a - b|, per token."""
    row_norm = base.output_head().weight.abs().sum(dim=1).max()
    return row_norm * hidden_error + 1e-5


@pytest.mark.parametrize("bits", [0, 8], ids=["float16", "8bit"])
def test_training_and_serving_logits_differ_only_by_the_residual_codec(tiny_base, bits):
    """Inputs stored at the bits they are read at: the only skew is x̂ vs x, within the codec."""
    merged = _merged(tiny_base, perturbed=True, residual_bits=bits, input_bits=bits)
    ids = _ids(tiny_base, TEXT)
    batch = _training_batch(tiny_base, merged.layout, ids)
    exact = merged.hidden(ids, alpha=0.0)  # x
    # The stored carry-on inputs are exactly what the server computes.
    states, _ = tiny_base.forward(ids, [ref.layer for ref in merged.layout.layers.values()])
    exact_states = {key: states[ref.layer] for key, ref in merged.layout.layers.items()}
    _, serve_sources = serving_views(merged.layout, exact_states)
    for stored, served in zip(batch.sources, serve_sources, strict=True):
        assert torch.equal(stored, served)
    with torch.no_grad():
        train_hidden = merged_hidden(merged.carry_on, batch, 1.0)
    serve_hidden = merged.hidden(ids, alpha=1.0)
    spec = merged.layout.view_spec(merged.layout.residual)
    hidden_bound = spec.error_bound() * exact.abs().amax(dim=-1)  # (1, T)
    assert torch.all(
        (train_hidden - serve_hidden).abs().amax(dim=-1) <= hidden_bound * (1 + 1e-4) + 1e-6
    )
    train_logits = merged.head(train_hidden)
    serve_logits = merged.logits(ids, alpha=1.0)
    assert torch.all(
        (train_logits - serve_logits).abs().amax(dim=-1) <= _head_bound(tiny_base, hidden_bound)
    )
    assert not torch.equal(train_logits, serve_logits)  # x̂ != x: the bound is what is checked


def test_re_quantized_inputs_stay_close_to_serving_inputs(lively_base):
    """The default bridge: residual at 8 bits, inputs at 4 bits derived from the 8-bit copy."""
    base = lively_base
    merged = _merged(base, perturbed=True, residual_bits=8, input_bits=4)
    ids = _ids(base, TEXT)
    batch = _training_batch(base, merged.layout, ids)
    states, _ = base.forward(ids, [base.num_layers])
    x = states[base.num_layers]
    four, eight = CodecSpec("absmax", 4, x.shape[-1]), CodecSpec("absmax", 8, x.shape[-1])
    served = roundtrip(x, four)
    bound = (2 * four.error_bound() + eight.error_bound()) * x.abs().amax(dim=-1) * (1 + 1e-4)
    assert torch.all((batch.sources[0] - served).abs().amax(dim=-1) <= bound)
    # The logit skew between the paths is small next to what the carry-on changes.
    with torch.no_grad():
        train_logits = merged.head(merged_hidden(merged.carry_on, batch, 1.0))
    serve_logits = merged.logits(ids, alpha=1.0)
    skew = float((train_logits - serve_logits).abs().max())
    effect = float((serve_logits - merged.logits(ids, alpha=0.0)).abs().max())
    assert 0 < skew < 0.25 * effect, (skew, effect)
    # Held-out NLL through both paths over the same tokens; log-softmax moves at most 2x the logits.
    row = ids[0].tolist()
    train = evaluate(merged.carry_on, merged.head, [batch], alpha=1.0)
    serve = serving_nll(merged, [(row, [1] * len(row))], alpha=1.0)
    assert train["tokens"] == serve["tokens"] == len(row) - 1
    assert abs(train["nll_merged"] - serve["nll_merged"]) <= 2 * skew


@pytest.mark.parametrize("bits", [(8, 4), (0, 2), (8, 8)], ids=["8-4", "16-2", "8-8"])
def test_training_path_on_serving_views_is_exactly_the_serving_path(tiny_base, bits):
    residual_bits, input_bits = bits
    merged = _merged(tiny_base, perturbed=True, residual_bits=residual_bits, input_bits=input_bits)
    ids = _ids(tiny_base, TEXT)
    layers = {key: ref.layer for key, ref in merged.layout.layers.items()}
    states, _ = tiny_base.forward(ids, list(layers.values()))
    residual, sources = serving_views(
        merged.layout, {key: states[index] for key, index in layers.items()}
    )
    batch = Batch(
        input_ids=ids,
        target_mask=torch.ones_like(ids, dtype=torch.bool),
        lengths=torch.tensor([ids.shape[1]]),
        residual=residual,
        sources=sources,
    )
    with torch.no_grad():
        train_hidden = merged_hidden(merged.carry_on, batch, 1.0)
        delta, gate, _ = merged.carry_on(sources)
    assert torch.equal(train_hidden, merge_hidden(residual, delta, gate, 1.0))
    assert torch.equal(train_hidden, merged.hidden(ids, alpha=1.0))
    assert torch.equal(merged.head(train_hidden), merged.logits(ids, alpha=1.0))
