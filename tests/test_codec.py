"""The bridge σ: every codec × bits pair, table-driven (shapes, dtypes, error bounds, edge cases)."""

from __future__ import annotations

import pytest
import torch

from carryon_ray.codec import CodecSpec, decode, encode, roundtrip

CASES = [
    ("absmax", 0),
    ("absmax", 8),
    ("absmax", 4),
    ("absmax", 2),
    ("block_absmax", 8),
    ("block_absmax", 4),
    ("block_absmax", 2),
    ("blockwise8", 8),
    ("blockwise8", 0),
    ("nf4", 4),
    ("nf4", 0),
]
IDS = [f"{codec}-{bits}" for codec, bits in CASES]
WIDTHS = [32, 37, 576]


def _inputs(dim: int) -> torch.Tensor:
    """Rows of several shapes and scales: gaussian, uniform, heavy-tailed, tiny, and a zero row."""
    generator = torch.Generator().manual_seed(dim)
    rows = [
        torch.randn(16, dim, generator=generator),
        torch.rand(16, dim, generator=generator) * 2 - 1,
        torch.randn(16, dim, generator=generator) ** 3 * 100,
        torch.randn(16, dim, generator=generator) * 1e-3,
        torch.zeros(1, dim),
    ]
    return torch.cat(rows)


@pytest.mark.parametrize("codec,bits", CASES, ids=IDS)
@pytest.mark.parametrize("dim", WIDTHS)
def test_encode_decode_shapes_and_dtypes(codec, bits, dim):
    spec = CodecSpec(codec, bits, dim)
    x = _inputs(dim)
    codes, scales = encode(x, spec)
    assert codes.dtype == torch.uint8 and codes.shape == (x.shape[0], spec.code_bytes)
    assert scales.dtype == torch.float32 and scales.shape == (x.shape[0], spec.num_scales)
    assert spec.bytes_per_token == spec.code_bytes + 4 * spec.num_scales
    out = decode(codes, scales, spec)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert decode(codes, scales, spec, dtype=torch.float16).dtype == torch.float16


@pytest.mark.parametrize("codec,bits", CASES, ids=IDS)
@pytest.mark.parametrize("dim", WIDTHS)
def test_roundtrip_error_is_within_the_codec_bound(codec, bits, dim):
    spec = CodecSpec(codec, bits, dim)
    x = _inputs(dim)
    out = roundtrip(x, spec)
    error = (out - x).abs().amax(dim=1)  # per token
    absmax = x.abs().amax(dim=1)
    worst = float((error / absmax.clamp_min(1e-30)).max())
    assert torch.all(error <= spec.error_bound() * absmax), worst


@pytest.mark.parametrize("codec,bits", CASES, ids=IDS)
def test_zero_vectors_survive_exactly(codec, bits):
    spec = CodecSpec(codec, bits, 37)
    x = torch.zeros(3, 37)
    out = roundtrip(x, spec)
    assert torch.isfinite(out).all()
    assert torch.equal(out, x)


@pytest.mark.parametrize("codec,bits", CASES, ids=IDS)
def test_no_rows_encode_and_decode(codec, bits):
    spec = CodecSpec(codec, bits, 37)
    codes, scales = encode(torch.zeros(0, 37), spec)
    assert codes.shape == (0, spec.code_bytes) and scales.shape == (0, spec.num_scales)
    assert decode(codes, scales, spec).shape == (0, 37)


@pytest.mark.parametrize("codec", ["absmax", "block_absmax", "blockwise8", "nf4"])
def test_bits_zero_is_exactly_float16(codec):
    spec = CodecSpec(codec, 0, 37)
    x = _inputs(37)
    assert torch.equal(roundtrip(x, spec), x.half().float())
    codes, scales = encode(x, spec)
    assert scales.numel() == 0 and codes.shape[1] == 2 * 37


@pytest.mark.parametrize("codec,bits", CASES, ids=IDS)
def test_roundtrip_keeps_leading_shape_and_decode_is_deterministic(codec, bits):
    spec = CodecSpec(codec, bits, 37)
    x = torch.randn(2, 5, 37)
    out = roundtrip(x, spec)
    assert out.shape == x.shape
    assert torch.equal(out, roundtrip(x, spec))
    # Quantizing again what was already quantized changes nothing for the integer codec.
    if codec in ("absmax", "block_absmax"):
        assert torch.equal(roundtrip(out, spec), out)


@pytest.mark.parametrize("codec,bits", [c for c in CASES if c[0].endswith("absmax") and c[1]], ids=str)
@pytest.mark.parametrize("dim", [37, 576])
def test_serving_roundtrip_equals_decoding_what_was_stored(codec, bits, dim):
    """Serving quantizes without packing codes into bytes; it must give what training reads
    back from the stored codes, value for value (zero rows and outliers included)."""
    spec = CodecSpec(codec, bits, dim)
    x = (torch.randn(40, dim, generator=torch.Generator().manual_seed(bits)) * 3).bfloat16()
    x[3] = 0
    x[5, :7] = 400
    assert torch.equal(roundtrip(x, spec), decode(*encode(x, spec), spec))


def test_four_bit_absmax_is_much_smaller_than_float16():
    dim = 576
    four = CodecSpec("absmax", 4, dim)
    half = CodecSpec("absmax", 0, dim)
    assert half.bytes_per_token == 2 * dim
    assert four.bytes_per_token * 3.5 <= half.bytes_per_token
    assert CodecSpec("absmax", 2, dim).bytes_per_token < four.bytes_per_token


def test_wrong_width_is_rejected():
    with pytest.raises(ValueError, match=r"shape \(N, 32\)"):
        encode(torch.zeros(2, 31), CodecSpec("absmax", 8, 32))


@pytest.mark.parametrize(
    "codec,bits,match",
    [
        ("nf4", 8, "use codec 'block_absmax' for 8 bits"),
        ("nf4", 2, "use codec 'block_absmax' for 2 bits"),
        ("blockwise8", 4, "use codec 'block_absmax' for 4 bits"),
        ("absmax", 3, r"choose one of \(0, 2, 4, 8\)"),
        ("absmax", 16, r"choose one of \(0, 2, 4, 8\)"),
        ("zstd", 8, "choose absmax, block_absmax, blockwise8, nf4"),
    ],
)
def test_invalid_codec_bits_combinations_name_the_fix(codec, bits, match):
    with pytest.raises(ValueError, match=match):
        CodecSpec(codec, bits, 32)


@pytest.mark.parametrize("bits", [0, 8, 4, 2])
def test_codes_stay_on_the_input_device(bits):
    """Nothing is allocated on the CPU behind the input's back. Checked on the meta device,
    which refuses to mix with CPU tensors; tests/test_gpu.py runs every codec on CUDA."""
    spec = CodecSpec("absmax", bits, 37)
    x = torch.empty(5, 37, device="meta")
    codes, scales = encode(x, spec)
    assert codes.device.type == scales.device.type == "meta"
    assert decode(codes, scales, spec).device.type == "meta"
    assert roundtrip(x.reshape(5, 1, 37), spec).device.type == "meta"


def test_block_scales_keep_the_values_an_outlier_would_zero():
    # One outlier dimension ~50x the rest (as in SmolLM2's final layer): a per-token 4-bit scale
    # rounds every other value to zero; a scale per block of 64 keeps them.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 576, generator=generator)
    x[:, 7] = 50.0
    token = roundtrip(x, CodecSpec("absmax", 4, 576))
    block = roundtrip(x, CodecSpec("block_absmax", 4, 576))
    rest = torch.ones(576, dtype=torch.bool)
    rest[:64] = False  # the outlier's own block
    assert (token[:, rest] == 0).float().mean() > 0.99
    assert (block[:, rest] == 0).float().mean() < 0.2
    assert (block - x)[:, rest].abs().mean() < 0.3 * (token - x)[:, rest].abs().mean()
    assert CodecSpec("block_absmax", 4, 576).bytes_per_token == 288 + 4 * 9
