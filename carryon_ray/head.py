"""The frozen output head of a base: logits = softcap(scale · (W x + b)), saved beside the
embeddings for the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class OutputHead(nn.Module):
    """The primary's frozen output function: logits = softcap(scale · (W x + b)).

    Holds exactly what the base applies after its final hidden state, so head(x) equals the
    base's logits bit for bit.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        logit_scale: float | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (V, D)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.logit_scale = logit_scale
        self.softcap = softcap

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., D) -> logits (..., V) in the head's dtype."""
        logits = nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.data.contiguous()}
        if self.bias is not None:
            tensors["bias"] = self.bias.data.contiguous()
        save_file(tensors, directory / "head.safetensors")
        meta = {"logit_scale": self.logit_scale, "softcap": self.softcap}
        (directory / "head.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path, dtype: torch.dtype | None = None) -> OutputHead:
        if not (directory / "head.safetensors").exists():
            raise FileNotFoundError(f"no output head in {directory}; run the embed stage first")
        tensors = load_file(directory / "head.safetensors")
        meta = json.loads((directory / "head.json").read_text())
        weight, bias = tensors["weight"], tensors.get("bias")
        if dtype is not None:
            weight = weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return cls(weight, bias, logit_scale=meta["logit_scale"], softcap=meta["softcap"])
