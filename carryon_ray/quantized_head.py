"""A frozen output head kept block-wise quantized on the trainer, and its vocabulary-blocked NLL.

At paper scale the head dominates a trainer's memory: a vocabulary of 152,064 by hidden 5120
is 3.1 GB in float32 and 1.6 GB in bfloat16, while the carry-on it trains through is ~0.4 GB.
`QuantizedHead` stores W in 64-value blocks of a row, one float32 absmax per block: with the
bridge's bitsandbytes codecs (`nf4`: 4-bit NormalFloat, `blockwise8`: dynamic 8-bit), about
0.56 or 1.06 bytes per weight, or as 5- or 6-bit NormalFloat (`nf5`, `nf6`: QLoRA's
construction with 2^bits quantiles of a normal distribution, `normal_float_levels`), about
0.69 or 0.81 bytes per weight. bitsandbytes stops at 4 bits below its 8-bit codes, and NF4's
error on the head moves the loss by about 1.5% where 5 bits move it a few tenths of that, so
the 5- and 6-bit codes are packed here: the low 4 bits two to a byte, the rest 8 / (bits - 4)
to a byte (`pack_bits`). W is dequantized `rows_per_block` vocabulary rows at a time.

`blocked_nll` never holds more than one block of weights and one (tokens x block) slice of
logits: a first pass over the blocks accumulates each token's log-sum-exp and target logit, a
second recomputes each block's logits to form d(NLL)/d(hidden). It costs one extra head
matmul and two dequantizations per step against the float head's path; the head is frozen,
so no gradient reaches it. Serving keeps the exact head (the merge adds the exact x).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from carryon_ray.codec import BNB_BLOCK, CodecSpec, decode, encode, pack_bits, unpack_bits
from carryon_ray.head import OutputHead

NORMAL_FLOAT_BITS = {"nf5": 5, "nf6": 6}
HEAD_CODECS = ("nf4", *NORMAL_FLOAT_BITS, "blockwise8")
ROWS_PER_BLOCK = 4096  # rows read from the head's file at a time
BLOCK_VALUES = 2**21  # weights dequantized at a time (8 MB in float32): rows_per_block = this / dim
ENCODE_ROWS = 512  # rows quantized at once while a head is built: bounds the transient copies


@functools.cache
def normal_float_levels(bits: int) -> torch.Tensor:
    """QLoRA's NormalFloat code book at `bits`: 2^(bits-1) positive and 2^(bits-1) - 1 negative
    quantiles of N(0, 1), and zero, scaled to [-1, 1] (sorted). At 4 bits it is bitsandbytes'
    NF4 table (`create_normal_map`), which the tests check."""
    offset = 0.5 * ((1 - 1 / (2 * (2**bits - 1))) + (1 - 1 / (2 * 2**bits)))
    half = 2 ** (bits - 1)
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (levels / levels.abs().max()).float()


@dataclass(frozen=True)
class NormalFloatSpec:
    """NormalFloat at 5 or 6 bits for rows of width `dim`, in blocks of BNB_BLOCK values."""

    bits: int
    dim: int

    @property
    def padded_dim(self) -> int:
        return math.ceil(self.dim / BNB_BLOCK) * BNB_BLOCK

    @property
    def code_bytes(self) -> int:
        return self.padded_dim * self.bits // 8

    @property
    def num_scales(self) -> int:
        return self.padded_dim // BNB_BLOCK

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows (N, dim) -> codes (N, code_bytes) uint8, scales (N, num_scales) float32."""
        x = nn.functional.pad(rows.float(), (0, self.padded_dim - self.dim))
        blocks = x.reshape(len(x), self.num_scales, BNB_BLOCK)
        scales = blocks.abs().amax(dim=2)  # (N, S)
        scaled = blocks / torch.where(scales > 0, scales, 1.0)[..., None]
        levels = normal_float_levels(self.bits).to(x.device)
        index = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2, out_int32=True)
        index = index.reshape(len(x), self.padded_dim).to(torch.uint8)  # nearest level
        low = pack_bits(index & 0xF, 4)
        high = pack_bits(index >> 4, self.bits - 4)
        return torch.cat([low, high], dim=1), scales

    def decode(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """codes (N, code_bytes), scales (N, num_scales) -> (N, dim) float32."""
        split = self.padded_dim // 2
        index = unpack_bits(codes[:, :split], 4) | (unpack_bits(codes[:, split:], self.bits - 4) << 4)
        values = normal_float_levels(self.bits).to(codes.device)[index.to(torch.int32)]
        values = values.reshape(len(codes), self.num_scales, BNB_BLOCK).mul_(scales[..., None])
        return values.reshape(len(codes), self.padded_dim)[:, : self.dim]


def head_codec(codec: str, dim: int) -> CodecSpec | NormalFloatSpec:
    if codec not in HEAD_CODECS:
        raise ValueError(f"head codec '{codec}' is unknown; choose one of {HEAD_CODECS}")
    if codec in NORMAL_FLOAT_BITS:
        return NormalFloatSpec(NORMAL_FLOAT_BITS[codec], dim)
    return CodecSpec(codec, 4 if codec == "nf4" else 8, dim)


def _encode(rows: torch.Tensor, spec: CodecSpec | NormalFloatSpec) -> tuple[torch.Tensor, torch.Tensor]:
    return spec.encode(rows) if isinstance(spec, NormalFloatSpec) else encode(rows, spec)


def _decode(codes: torch.Tensor, scales: torch.Tensor, spec: CodecSpec | NormalFloatSpec) -> torch.Tensor:
    return spec.decode(codes, scales) if isinstance(spec, NormalFloatSpec) else decode(codes, scales, spec)


class QuantizedHead(nn.Module):
    """The frozen head with W stored block-wise quantized; see the module doc."""

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        spec: CodecSpec | NormalFloatSpec,
        bias: torch.Tensor | None = None,
        *,
        logit_scale: float | None = None,
        softcap: float | None = None,
        rows_per_block: int | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("codes", codes)  # (V, code_bytes) uint8
        self.register_buffer("scales", scales)  # (V, num_scales) float32
        self.register_buffer("bias", bias)
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.rows_per_block = rows_per_block or max(1, BLOCK_VALUES // spec.dim)

    @classmethod
    def from_rows(
        cls,
        rows: Iterator[torch.Tensor],
        *,
        codec: str,
        vocab: int,
        dim: int,
        bias: torch.Tensor | None = None,
        logit_scale: float | None = None,
        softcap: float | None = None,
    ) -> QuantizedHead:
        """Quantize W (vocab, dim) from successive row blocks into preallocated codes and
        scales, so neither a full-precision copy of W nor a second copy of the codes exists."""
        spec = head_codec(codec, dim)
        codes = scales = None
        start = 0
        for block in rows:
            for piece in block.split(ENCODE_ROWS):
                piece_codes, piece_scales = _encode(piece, spec)
                if codes is None:
                    codes = piece_codes.new_empty(vocab, spec.code_bytes)
                    scales = piece_scales.new_empty(vocab, spec.num_scales)
                end = start + len(piece)
                if end > vocab:
                    raise ValueError(f"the head has more than vocab={vocab} rows")
                codes[start:end], scales[start:end] = piece_codes, piece_scales
                start = end
        if start != vocab:
            raise ValueError(f"the head has {start} rows, expected vocab={vocab}")
        return cls(
            codes,
            scales,
            spec,
            None if bias is None else bias.float(),
            logit_scale=logit_scale,
            softcap=softcap,
        )

    @classmethod
    def from_head(cls, head: OutputHead, codec: str) -> QuantizedHead:
        weight = head.weight.data
        return cls.from_rows(
            (weight[start : start + ROWS_PER_BLOCK] for start in range(0, len(weight), ROWS_PER_BLOCK)),
            codec=codec,
            vocab=weight.shape[0],
            dim=weight.shape[1],
            bias=None if head.bias is None else head.bias.data,
            logit_scale=head.logit_scale,
            softcap=head.softcap,
        )

    @property
    def vocab_size(self) -> int:
        return self.codes.shape[0]

    def blocks(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """(first row, W rows float32, bias rows) per vocabulary block, dequantized on demand.

        Neither this generator nor its callers keep a block while the next one is decoded, so
        only one block's float32 rows exist at a time."""
        for start in range(0, self.vocab_size, self.rows_per_block):
            end = min(start + self.rows_per_block, self.vocab_size)
            bias = None if self.bias is None else self.bias[start:end]
            yield start, _decode(self.codes[start:end], self.scales[start:end], self.spec), bias

    def _post(self, logits: torch.Tensor) -> torch.Tensor:
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def block_logits(self, hidden: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        return self._post(nn.functional.linear(hidden.float(), weight, bias))

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., D) -> logits (..., V) float32 (for inspection; training uses
        `blocked_nll`, which never builds the whole row of logits)."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = torch.cat([self.block_logits(flat, w, b) for _, w, b in self.blocks()], dim=1)
        return logits.reshape(*hidden.shape[:-1], self.vocab_size)


def blocked_nll(
    head: QuantizedHead, hidden: torch.Tensor, targets: torch.Tensor, *, with_grad: bool, per_row: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(summed NLL of hidden (N, D) against targets (N,), d(NLL)/d(hidden) or None);
    `per_row`: the (N,) float32 NLL of every row instead of their sum.

    Memory: (N, rows_per_block) float32 slices; callers pass N in chunks (`chunked_nll`)."""
    if targets.numel() and not 0 <= int(targets.min()) <= int(targets.max()) < head.vocab_size:
        raise ValueError(
            f"target ids must be in [0, {head.vocab_size}); got {int(targets.min())}.."
            f"{int(targets.max())}: the data was tokenized for another vocabulary"
        )
    hidden = hidden.detach()
    count = hidden.shape[0]
    lse = torch.full((count,), -torch.inf, device=hidden.device)
    target_logit = torch.zeros(count, device=hidden.device)
    rows = torch.arange(count, device=hidden.device)
    for start, weight, bias in head.blocks():
        logits = head.block_logits(hidden, weight, bias)
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        inside = (targets >= start) & (targets < start + weight.shape[0])
        target_logit[inside] = logits[rows[inside], targets[inside] - start]
        del weight, logits  # before the next block is decoded
    total = lse - target_logit if per_row else (lse - target_logit).sum()
    if not with_grad:
        return total, None
    grad = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for start, weight, bias in head.blocks():
        piece = hidden.detach().float().requires_grad_(True)
        with torch.enable_grad():
            logits = head.block_logits(piece, weight, bias)
        upstream = torch.exp(logits.detach() - lse[:, None])  # softmax over the whole vocabulary
        inside = (targets >= start) & (targets < start + weight.shape[0])
        upstream[rows[inside], targets[inside] - start] -= 1.0
        (block_grad,) = torch.autograd.grad(logits, piece, grad_outputs=upstream)
        grad += block_grad
        del weight, logits, upstream  # before the next block is decoded
    return total, grad.to(hidden.dtype)


def load_head(directory: Path, precision: str, *, device: torch.device | str = "cpu"):
    """The head saved by the embed stage in `precision`: a float dtype name (an `OutputHead`)
    or a codec in HEAD_CODECS (a `QuantizedHead`, quantized block by block from the file)."""
    if precision not in HEAD_CODECS:
        return OutputHead.load(directory, dtype=getattr(torch, precision)).to(device)
    path = directory / "head.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no output head in {directory}; run the embed stage first")
    meta = json.loads((directory / "head.json").read_text())
    with safe_open(str(path), framework="pt") as handle:
        rows = handle.get_slice("weight")
        vocab, dim = rows.get_shape()
        bias = handle.get_tensor("bias") if "bias" in handle.keys() else None  # noqa: SIM118 - safe_open has no __contains__
        head = QuantizedHead.from_rows(
            (
                rows[start : start + ROWS_PER_BLOCK].to(device)
                for start in range(0, vocab, ROWS_PER_BLOCK)
            ),
            codec=precision,
            vocab=vocab,
            dim=dim,
            bias=bias,
            logit_scale=meta["logit_scale"],
            softcap=meta["softcap"],
        )
    return head.to(device)
