"""A frozen output head kept block-wise quantized on the trainer, and its vocabulary-blocked NLL.

At paper scale the head dominates a trainer's memory: a vocabulary of 152,064 by hidden 5120
is 3.1 GB in float32 and 1.6 GB in bfloat16, while the carry-on it trains through is ~0.4 GB.
`QuantizedHead` stores W with the bridge's bitsandbytes codecs (`nf4`: 4-bit NormalFloat,
`blockwise8`: dynamic 8-bit; one float32 absmax per 64 values of a row), about 0.56 or 1.06
bytes per weight, and dequantizes `rows_per_block` vocabulary rows at a time.

`blocked_nll` never holds more than one block of weights and one (tokens x block) slice of
logits: a first pass over the blocks accumulates each token's log-sum-exp and target logit, a
second recomputes each block's logits to form d(NLL)/d(hidden). It costs one extra head
matmul and two dequantizations per step against the float head's path; the head is frozen,
so no gradient reaches it. Serving keeps the exact head (the merge adds the exact x).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from carryon_ray.codec import CodecSpec, decode, encode
from carryon_ray.head import OutputHead

HEAD_CODECS = ("nf4", "blockwise8")
ROWS_PER_BLOCK = 4096


class QuantizedHead(nn.Module):
    """The frozen head with W stored block-wise quantized; see the module doc."""

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        spec: CodecSpec,
        bias: torch.Tensor | None = None,
        *,
        logit_scale: float | None = None,
        softcap: float | None = None,
        rows_per_block: int = ROWS_PER_BLOCK,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("codes", codes)  # (V, code_bytes) uint8
        self.register_buffer("scales", scales)  # (V, num_scales) float32
        self.register_buffer("bias", bias)
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.rows_per_block = rows_per_block

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
        if codec not in HEAD_CODECS:
            raise ValueError(f"head codec '{codec}' is unknown; choose one of {HEAD_CODECS}")
        spec = CodecSpec(codec, 4 if codec == "nf4" else 8, dim)
        codes = scales = None
        start = 0
        for block in rows:
            block_codes, block_scales = encode(block, spec)
            if codes is None:
                codes = block_codes.new_empty(vocab, spec.code_bytes)
                scales = block_scales.new_empty(vocab, spec.num_scales)
            end = start + len(block)
            if end > vocab:
                raise ValueError(f"the head has more than vocab={vocab} rows")
            codes[start:end], scales[start:end] = block_codes, block_scales
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
            yield start, decode(self.codes[start:end], self.scales[start:end], self.spec), bias

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
    head: QuantizedHead, hidden: torch.Tensor, targets: torch.Tensor, *, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(summed NLL of hidden (N, D) against targets (N,), d(NLL)/d(hidden) or None).

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
    total = (lse - target_logit).sum()
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
