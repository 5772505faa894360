"""The bridge σ: per-token compression of hidden states (SPEC §1).

Every codec turns a float tensor of shape (N, D) into two byte-exact tensors that Arrow can
store: `codes` (N, C) uint8 and `scales` (N, S) float32. `decode` inverts `encode` up to the
codec's error, and `roundtrip` is σ̂ = decode ∘ encode.

- `absmax` (the reference, pure torch): symmetric per-token integers in [-q, q] with
  q = 2^(bits-1) - 1, packed 8/bits to a byte; one float32 scale per token.
- `block_absmax` (pure torch): the same integers with one float32 scale per block of
  `BNB_BLOCK` values. A few outlier dimensions (SmolLM2's final layer has values ~50x the
  typical one) set a whole token's absmax scale, so at 2 and 4 bits most values of that token
  round to zero; a scale per block confines an outlier to its block (0.5 bits/value more).
- `blockwise8` / `nf4`: bitsandbytes' dynamic 8-bit and NormalFloat-4 codes, in blocks of
  `BNB_BLOCK` values that never straddle two tokens; one float32 absmax per block.
- bits = 0 for any codec: float16 passthrough (codes are the float16 bytes, no scales).

Every tensor a codec returns lives on its input's device (CPU or CUDA).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

BNB_BLOCK = 64


@dataclass(frozen=True)
class CodecSpec:
    """Which codec at how many bits, for vectors of width `dim`."""

    codec: str
    bits: int
    dim: int

    def __post_init__(self) -> None:
        # Imported lazily to keep the codec free of pydantic at import time.
        from carryon_ray.config import CODECS, check_codec_bits

        if self.codec not in CODECS:
            raise ValueError(f"unknown codec '{self.codec}'; choose {', '.join(CODECS)}")
        check_codec_bits(self.codec, self.bits, key="bits")

    @property
    def padded_dim(self) -> int:
        if self.bits == 0:
            return self.dim
        multiple = 8 // self.bits if self.codec == "absmax" else BNB_BLOCK
        return math.ceil(self.dim / multiple) * multiple

    @property
    def code_bytes(self) -> int:
        """Bytes of codes per token."""
        if self.bits == 0:
            return 2 * self.dim
        return self.padded_dim * self.bits // 8

    @property
    def num_scales(self) -> int:
        if self.bits == 0:
            return 0
        return 1 if self.codec == "absmax" else self.padded_dim // BNB_BLOCK  # one per token / block

    @property
    def bytes_per_token(self) -> int:
        return self.code_bytes + 4 * self.num_scales

    def error_bound(self) -> float:
        """Bound on max |x - σ̂(x)| relative to the token's absmax |x|, checked by the tests.

        absmax: half a quantization step. float16: half an ulp (2^-11, relative). The
        bitsandbytes bounds are half the widest gap of their code book near ±1.
        """
        if self.bits == 0:
            return 2.0**-11
        if self.codec in ("absmax", "block_absmax"):  # a block's absmax <= the token's
            return 0.5 / (2 ** (self.bits - 1) - 1) * (1 + 1e-5)
        if self.codec == "blockwise8":
            return 0.02
        return 0.16  # nf4: widest gap 0.723 -> 1.0, plus its scaling error


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, P) unsigned ints < 2^bits -> (N, P * bits / 8) uint8, little end first."""
    if bits == 8:
        return values.to(torch.uint8)
    per_byte = 8 // bits
    rows, width = values.shape
    grouped = values.to(torch.uint8).reshape(rows, width // per_byte, per_byte)  # (N, P/k, k)
    packed = torch.zeros(grouped.shape[:2], dtype=torch.uint8, device=values.device)
    for slot in range(per_byte):
        packed |= grouped[:, :, slot] << (slot * bits)
    return packed


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    slots = [(packed >> (slot * bits)) & mask for slot in range(per_byte)]
    return torch.stack(slots, dim=-1).reshape(packed.shape[0], packed.shape[1] * per_byte)  # (N, P)


@functools.cache
def _bnb():
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise ImportError("codecs blockwise8/nf4 need bitsandbytes: pip install bitsandbytes") from error
    return bnb_functional


def encode(x: torch.Tensor, spec: CodecSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, D) float -> codes (N, code_bytes) uint8, scales (N, num_scales) float32."""
    if x.dim() != 2 or x.shape[1] != spec.dim:
        raise ValueError(f"expected hidden states of shape (N, {spec.dim}), got {tuple(x.shape)}")
    n = x.shape[0]
    if spec.bits == 0:
        codes = x.to(torch.float16).contiguous().view(torch.uint8)  # (N, 2D)
        return codes, torch.zeros(n, 0, dtype=torch.float32, device=x.device)
    if spec.codec in ("absmax", "block_absmax"):
        levels, scale = _absmax_levels(x, spec)
        ints = levels.to(torch.int16) + (2 ** (spec.bits - 1) - 1)  # in [0, 2q]
        return pack_bits(ints.reshape(n, spec.padded_dim), spec.bits), scale.reshape(n, spec.num_scales)
    x = _pad(x.float(), spec.padded_dim)
    bnb = _bnb()
    flat = x.reshape(-1).contiguous()
    if n == 0:
        return (
            torch.zeros(0, spec.code_bytes, dtype=torch.uint8, device=x.device),
            torch.zeros(0, spec.num_scales, device=x.device),
        )
    if spec.codec == "blockwise8":
        codes, state = bnb.quantize_blockwise(flat, blocksize=BNB_BLOCK)
    else:
        codes, state = bnb.quantize_4bit(flat, blocksize=BNB_BLOCK, quant_type="nf4")
    return codes.reshape(n, spec.code_bytes), state.absmax.float().reshape(n, spec.num_scales)


def decode(
    codes: torch.Tensor, scales: torch.Tensor, spec: CodecSpec, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """codes (N, code_bytes) uint8, scales (N, num_scales) -> (N, D) in `dtype`."""
    n = codes.shape[0]
    if spec.bits == 0:
        return codes.contiguous().view(torch.float16).to(dtype)
    if spec.codec in ("absmax", "block_absmax"):
        qmax = 2 ** (spec.bits - 1) - 1
        ints = unpack_bits(codes, spec.bits).to(torch.float32) - qmax  # (N, padded)
        values = ints.reshape(n, spec.num_scales, spec.padded_dim // spec.num_scales) * scales.reshape(n, spec.num_scales, 1)
        return values.reshape(n, spec.padded_dim)[:, : spec.dim].to(dtype)
    if n == 0:
        return torch.zeros(0, spec.dim, dtype=dtype, device=codes.device)
    bnb = _bnb()
    absmax = scales.reshape(-1).contiguous().float()
    if spec.codec == "blockwise8":
        flat = bnb.dequantize_blockwise(
            codes.reshape(-1).contiguous(), absmax=absmax, code=_dynamic_map(), blocksize=BNB_BLOCK
        )
    else:
        state = bnb.QuantState(
            absmax=absmax,
            shape=torch.Size([n * spec.padded_dim]),
            blocksize=BNB_BLOCK,
            quant_type="nf4",
            dtype=torch.float32,
        )
        flat = bnb.dequantize_4bit(codes.reshape(-1, 1).contiguous(), quant_state=state)
    return flat.reshape(n, spec.padded_dim)[:, : spec.dim].to(dtype)


@functools.cache
def _dynamic_map() -> torch.Tensor:
    return _bnb().create_dynamic_map(signed=True)


def roundtrip(x: torch.Tensor, spec: CodecSpec) -> torch.Tensor:
    """σ̂(x) for x of shape (..., D); returns float32 of the same shape."""
    flat = x.reshape(-1, x.shape[-1])  # (N, D)
    if spec.bits and spec.codec in ("absmax", "block_absmax"):
        # decode(encode(x)) without packing the levels into bytes: the same products of the
        # same integers and scales, so the same values bit for bit (once per served token).
        if flat.shape[-1] != spec.dim:
            raise ValueError(f"expected hidden states of shape (N, {spec.dim}), got {tuple(flat.shape)}")
        levels, scale = _absmax_levels(flat, spec)
        return levels.mul_(scale).reshape(flat.shape[0], spec.padded_dim)[:, : spec.dim].reshape(x.shape)
    codes, scales = encode(flat, spec)
    return decode(codes, scales, spec).reshape(x.shape)


def _absmax_levels(x: torch.Tensor, spec: CodecSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The absmax codecs' quantization of x (N, D): the signed levels in [-q, q] as floats
    (N, S, D/S) and each block's scale (N, S, 1), S = `num_scales`."""
    qmax = 2 ** (spec.bits - 1) - 1
    width = spec.padded_dim // spec.num_scales
    blocks = _pad(x.float(), spec.padded_dim).reshape(x.shape[0], spec.num_scales, width)
    scale = blocks.abs().amax(dim=2, keepdim=True) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(blocks / safe).clamp_(-qmax, qmax), scale
