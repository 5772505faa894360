"""The block-wise quantized frozen head and its vocabulary-blocked loss."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from carryon_ray.bases import OutputHead
from carryon_ray.quantized_head import HEAD_CODECS, QuantizedHead, load_head, normal_float_levels
from carryon_ray.training import chunked_nll, train_step
from tests.test_training import _batch, _carry_on

D, V = 16, 40


def _head(**kwargs) -> OutputHead:
    generator = torch.Generator().manual_seed(0)
    return OutputHead(
        torch.randn(V, D, generator=generator) * 0.3, torch.randn(V, generator=generator), **kwargs
    )


def _quantized(head: OutputHead, codec: str = "nf4", rows_per_block: int = 7) -> QuantizedHead:
    quantized = QuantizedHead.from_head(head, codec)
    quantized.rows_per_block = rows_per_block  # several blocks, the last one short
    return quantized


def _dequantized(quantized: QuantizedHead, head: OutputHead) -> OutputHead:
    """The float head that the quantized one stands for exactly."""
    weight = torch.cat([rows for _, rows, _ in quantized.blocks()])
    return OutputHead(weight, head.bias.data, logit_scale=head.logit_scale, softcap=head.softcap)


@pytest.mark.parametrize("codec", HEAD_CODECS)
@pytest.mark.parametrize("head_kwargs", [{}, {"logit_scale": 0.5, "softcap": 3.0}])
def test_blocked_nll_and_gradient_equal_plain_cross_entropy_on_the_dequantized_head(
    codec, head_kwargs
):
    head = _head(**head_kwargs)
    quantized = _quantized(head, codec)
    reference = _dequantized(quantized, head)
    hidden = torch.randn(11, D, requires_grad=True)
    targets = torch.randint(0, V, (11,))
    loss = chunked_nll(quantized, hidden, targets)
    (grad,) = torch.autograd.grad(loss, hidden)
    plain = F.cross_entropy(reference(hidden), targets, reduction="sum")
    (plain_grad,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(chunked_nll(quantized, hidden, targets), plain, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(quantized(hidden), reference(hidden), rtol=1e-5, atol=1e-5)


def test_quantized_logits_stay_close_to_the_float_head():
    head = _head()
    hidden = torch.randn(64, D)
    exact = head(hidden)
    for codec, bound in (("blockwise8", 0.02), ("nf6", 0.08), ("nf5", 0.1), ("nf4", 0.15)):
        error = (QuantizedHead.from_head(head, codec)(hidden) - exact).abs().max()
        assert error < bound * exact.abs().max(), (codec, float(error))


def test_normal_float_at_4_bits_is_bitsandbytes_nf4_and_more_bits_cut_the_error():
    import bitsandbytes.functional as bnb

    table, nf4 = bnb.create_normal_map(), normal_float_levels(4)  # the table pads with zeros
    assert len(nf4) == 16 and 0 in nf4
    torch.testing.assert_close(nf4[nf4 != 0], table[table != 0].sort().values, atol=1e-6, rtol=0)
    for bits in (5, 6):
        levels = normal_float_levels(bits)
        assert len(levels) == 2**bits and levels[0] == -1 and levels[-1] == 1 and 0 in levels
        assert bool((levels.diff() > 0).all())
    weight = torch.randn(300, 1000, generator=torch.Generator().manual_seed(1)) * 0.02
    errors = {}
    for codec in ("nf4", "nf5", "nf6", "blockwise8"):
        quantized = QuantizedHead.from_head(OutputHead(weight), codec)
        rows = torch.cat([block for _, block, _ in quantized.blocks()])
        errors[codec] = float((rows - weight).pow(2).mean().sqrt() / weight.std())
    assert errors["nf4"] > 1.6 * errors["nf5"] > 1.6 * 1.6 * errors["nf6"] > errors["blockwise8"], errors
    assert errors["nf5"] < 0.06, errors


@pytest.mark.parametrize(("codec", "bits"), [("nf5", 5), ("nf6", 6)])
def test_normal_float_codes_take_their_bits_per_weight(codec, bits):
    quantized = QuantizedHead.from_head(_head(), codec)
    assert quantized.codes.dtype == torch.uint8 and quantized.codes.shape == (V, 64 * bits // 8)
    assert quantized.scales.shape == (V, 1)
    zero = QuantizedHead.from_head(OutputHead(torch.zeros(V, D)), codec)  # an all-zero block decodes to 0
    assert all(not rows.any() for _, rows, _ in zero.blocks())


def test_load_head_quantizes_from_the_file_or_keeps_a_float_dtype(tmp_path):
    head = _head(logit_scale=0.5)
    head.save(tmp_path)
    loaded = load_head(tmp_path, "nf4")
    expected = QuantizedHead.from_head(head, "nf4")
    assert isinstance(loaded, QuantizedHead) and loaded.logit_scale == 0.5
    assert torch.equal(loaded.codes, expected.codes) and torch.equal(loaded.scales, expected.scales)
    assert loaded.codes.numel() == V * 64 // 2  # 4 bits per weight (D padded to a 64-block)
    five = load_head(tmp_path, "nf5")
    assert torch.equal(five.codes, QuantizedHead.from_head(head, "nf5").codes)
    half = load_head(tmp_path, "bfloat16")
    assert isinstance(half, OutputHead) and half.weight.dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="run the embed stage first"):
        load_head(tmp_path / "missing", "nf4")


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_token_chunks_do_not_change_the_loss_or_gradient(chunk):
    quantized = _quantized(_head(softcap=3.0))
    hidden = torch.randn(11, D, requires_grad=True)
    targets = torch.randint(0, V, (11,))
    loss = chunked_nll(quantized, hidden, targets, chunk=chunk)
    (grad,) = torch.autograd.grad(loss, hidden)
    whole = chunked_nll(quantized, hidden, targets, chunk=11)
    (whole_grad,) = torch.autograd.grad(whole, hidden)
    torch.testing.assert_close(loss, whole)
    torch.testing.assert_close(grad, whole_grad)


def test_target_ids_outside_the_vocabulary_are_refused():
    quantized = _quantized(_head())
    with pytest.raises(ValueError, match="another vocabulary"):
        chunked_nll(quantized, torch.randn(2, D), torch.tensor([1, V]))


def test_unknown_head_codec_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        QuantizedHead.from_head(_head(), "absmax")


def test_train_steps_through_a_quantized_head_lower_the_loss():
    head = QuantizedHead.from_head(_head(), "nf4")
    carry_on = _carry_on()
    optimizer = torch.optim.AdamW(carry_on.parameters(), lr=3e-2)
    batch = _batch((9, 7))
    losses = [train_step(carry_on, head, batch, optimizer, alpha=1.0, grad_clip=1.0)[0] for _ in range(15)]
    assert losses[-1] < 0.8 * losses[0]
