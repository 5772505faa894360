"""Frozen base models: loading in the dtype the device runs fast, hidden states at chosen
layers, the output head, and the check that the head reproduces the model's logits.

Finding a base's files, its identity and its head without loading it: `base_files.py`.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import NamedTuple

import torch
from torch import nn

from carryon_ray.base_files import (  # noqa: F401 - re-exported: callers import them from here
    PACKAGED,
    BaseFiles,
    cache_root,
    describe_base,
    head_from_files,
    model_fingerprint,
    resolve_base_path,
    tokenizer_hash,
)
from carryon_ray.config import BaseSpec
from carryon_ray.head import OutputHead

logger = logging.getLogger(__name__)

# Largest |head(final hidden) - logits| accepted by `check_output_transform`, relative to the
# largest logit (at least 1): the same matmul in the model's dtype, with room for kernels that
# split it differently.
OUTPUT_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}

AUTO_DTYPE_ENV = "CARRYON_AUTO_DTYPE"  # forces what `dtype: auto` picks (float32, bfloat16, ...)
BF16_MIN_SPEEDUP = 1.2  # on CPU, bfloat16 must beat float32 by this much to be picked
PROBE_SHAPE = (256, 1024, 1024)  # (rows, in, out) of the probe's matmul


class DtypeChoice(NamedTuple):
    """What `dtype: auto` resolved to on a device, and why (logged once per process)."""

    dtype: torch.dtype
    reason: str
    bf16_speedup: float | None = None  # float32 time / bfloat16 time of the CPU probe


def default_device() -> torch.device:
    """CUDA where torch sees a GPU, else the CPU. Inside a Ray task or actor torch sees only
    the GPUs Ray granted it (Ray sets CUDA_VISIBLE_DEVICES), so this is the granted device."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def cpu_bf16_speedup(repeats: int = 5) -> float:
    """float32 time / bfloat16 time of a (256 x 1024) by (1024 x 1024) linear on this CPU,
    best of `repeats` each after a warm-up (about 0.1-0.5 s; once per process).

    CPU flags alone do not tell: on machines of one kind, a bfloat16 forward ran 3.7x slower
    than float32 on one (AVX512-BF16 without AMX) and 3x faster on another (AMX-BF16).
    """
    rows, width, out = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(rows, width, generator=generator)
    weight = torch.randn(out, width, generator=generator)
    best = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            x, w = inputs.to(dtype), weight.to(dtype)
            nn.functional.linear(x, w)  # warm-up: the kernel is chosen on the first call
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                nn.functional.linear(x, w)
                times.append(time.perf_counter() - started)
            best[dtype] = min(times)
    return best[torch.float32] / best[torch.bfloat16]


@functools.cache
def _auto_dtype(device_type: str) -> DtypeChoice:
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            choice = DtypeChoice(torch.bfloat16, "CUDA with native bfloat16")
        else:
            choice = DtypeChoice(torch.float32, "this GPU has no native bfloat16")
    elif device_type == "cpu":
        speedup = cpu_bf16_speedup()
        fast = speedup >= BF16_MIN_SPEEDUP
        choice = DtypeChoice(
            torch.bfloat16 if fast else torch.float32,
            f"bfloat16 matmuls run {speedup:.2f}x float32's speed on this CPU "
            f"({'at least' if fast else 'under'} {BF16_MIN_SPEEDUP}x)",
            speedup,
        )
    else:
        choice = DtypeChoice(torch.float32, f"no probe for device type '{device_type}'")
    logger.info(
        "dtype auto on %s: %s (%s; set %s or bases[].dtype to force one)",
        device_type, str(choice.dtype).removeprefix("torch."), choice.reason, AUTO_DTYPE_ENV,
    )
    return choice


def auto_dtype(device: torch.device | str) -> DtypeChoice:
    """What `dtype: auto` means on `device`: bfloat16 on CUDA and on CPUs whose bfloat16 matmul
    is measurably faster (a short timed probe, cached per process), else float32. The
    environment variable CARRYON_AUTO_DTYPE overrides the choice."""
    forced = os.environ.get(AUTO_DTYPE_ENV, "").strip()
    if forced:
        if forced not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"{AUTO_DTYPE_ENV}={forced!r} is not a dtype; use float32, bfloat16 or float16, "
                "or unset it to let `dtype: auto` measure"
            )
        return DtypeChoice(getattr(torch, forced), f"forced by {AUTO_DTYPE_ENV}")
    return _auto_dtype(torch.device(device).type)


def pick_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype a base runs in: `name` itself, or for `auto` what `auto_dtype` decides."""
    if name == "auto":
        return auto_dtype(device).dtype
    return getattr(torch, name)


class FrozenBase:
    """One frozen causal LM: tokenizer, model, hidden states at given layers, output head."""

    def __init__(self, spec: BaseSpec, *, device: str | torch.device | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec = spec
        self.name = spec.name
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = pick_dtype(spec.dtype, self.device)
        location = resolve_base_path(spec.path)
        files = BaseFiles.open(location)  # before the model: a base without a head fails fast
        kwargs: dict = {"dtype": self.dtype}
        if spec.quantize != "none":
            if self.device.type != "cuda":
                raise ValueError(
                    f"bases[{spec.name}].quantize={spec.quantize} needs a CUDA device; "
                    "set quantize: none on CPU"
                )
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_8bit=spec.quantize == "8bit", load_in_4bit=spec.quantize == "4bit"
            )
            kwargs["device_map"] = {"": self.device.index or 0}
        self.tokenizer = AutoTokenizer.from_pretrained(location)
        self.model = AutoModelForCausalLM.from_pretrained(location, **kwargs).eval()
        if spec.quantize == "none":
            self.model.to(self.device)
        self.model.requires_grad_(False)
        text_config = self.model.config.get_text_config()
        self.num_layers: int = text_config.num_hidden_layers
        self.hidden_size: int = text_config.hidden_size
        self.max_positions: int = getattr(text_config, "max_position_embeddings", 2048)
        self.fingerprint = files.fingerprint()  # from the files: the same in every dtype
        self.tokenizer_hash = tokenizer_hash(self.tokenizer)

    @classmethod
    def from_model(cls, name: str, model: nn.Module, tokenizer=None) -> FrozenBase:
        """Wrap an already-built model (tests build tiny ones from a config)."""
        self = cls.__new__(cls)
        self.spec = BaseSpec(name=name, path="<in-memory>")
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.tokenizer = tokenizer
        text_config = model.config.get_text_config()
        self.num_layers = text_config.num_hidden_layers
        self.hidden_size = text_config.hidden_size
        self.max_positions = getattr(text_config, "max_position_embeddings", 2048)
        self.fingerprint = model_fingerprint(model)
        self.tokenizer_hash = tokenizer_hash(tokenizer) if tokenizer is not None else "none"
        return self

    def identity(self) -> dict[str, str]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "tokenizer": self.tokenizer_hash,
        }

    def layer_index(self, layer: int) -> int:
        """Normalise a layer (-1 = final, after the final norm) to 0..num_layers."""
        index = layer + self.num_layers + 1 if layer < 0 else layer
        if not 0 <= index <= self.num_layers:
            raise ValueError(
                f"layer {layer} is out of range for base '{self.name}' with {self.num_layers} "
                f"layers; use 0..{self.num_layers} or -1"
            )
        return index

    def output_head(self) -> OutputHead:
        text_config = self.model.config.get_text_config()
        linear = self.model.get_output_embeddings()
        return OutputHead(
            linear.weight.detach(),
            None if linear.bias is None else linear.bias.detach(),
            logit_scale=getattr(text_config, "logit_scale", None),
            softcap=getattr(text_config, "final_logit_softcapping", None),
        )

    @torch.no_grad()
    def check_output_transform(self, input_ids: list[list[int]]) -> None:
        """Run the model once on these rows and check that `output_head()` applied to the final
        hidden state (what `forward` returns for layer -1) gives the model's own logits.

        A carry-on is trained through `output_head()`, so a base whose logits go through a
        transform it does not model (a soft-cap or a scale its config does not declare, an
        extra norm) is refused with a ValueError.
        """
        rows = [list(row) for row in input_ids if len(row)]
        if not rows:
            raise ValueError(f"base '{self.name}': check_output_transform needs a non-empty row")
        longest = max(len(row) for row in rows)
        ids = torch.zeros(len(rows), longest, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for number, row in enumerate(rows):
            ids[number, : len(row)] = torch.tensor(row, dtype=torch.long, device=self.device)
            mask[number, : len(row)] = 1
        captured = {}

        def keep_final(module, args, output) -> None:
            captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

        hook = self.model.model.register_forward_hook(keep_final)  # the module `forward` runs
        try:
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        finally:
            hook.remove()
        valid = mask.bool()
        ours = self.output_head()(captured["hidden"])[valid].float()  # (N, V)
        theirs = logits[valid].float()
        if ours.shape != theirs.shape:
            raise ValueError(
                f"base '{self.name}': its logits have shape {tuple(theirs.shape)} per token but the "
                f"output head gives {tuple(ours.shape)}; this architecture's head is not modelled"
            )
        error = float((ours - theirs).abs().max())
        scale = float(theirs.abs().max())
        allowed = OUTPUT_CHECK_TOLERANCE.get(self.dtype, 2e-2) * max(scale, 1.0)
        if not error <= allowed:
            text_config = self.model.config.get_text_config()
            modelled = ["W x + b"]
            if getattr(text_config, "logit_scale", None) is not None:
                modelled.append(f"logit_scale={text_config.logit_scale}")
            if getattr(text_config, "final_logit_softcapping", None) is not None:
                modelled.append(f"final_logit_softcapping={text_config.final_logit_softcapping}")
            raise ValueError(
                f"base '{self.name}' ({type(self.model).__name__}): its logits differ from the "
                f"output head applied to its final hidden state by up to {error:.4g} (logits up "
                f"to {scale:.4g}, allowed {allowed:.2g} in {str(self.dtype).removeprefix('torch.')}): "
                f"the model transforms its output in a way not modelled here (modelled: "
                f"{', '.join(modelled)}), so a carry-on trained on it would not reproduce its "
                "answers; use a base whose logits are its head's linear map of the final hidden "
                "state (with the logit_scale / final_logit_softcapping its config declares)"
            )

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        layers: list[int],
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
    ) -> tuple[dict[int, torch.Tensor], object]:
        """input_ids (B, T) -> ({layer: (B, T, D) in the model's dtype}, cache).

        Layers are normalised indices. With `past_key_values` the call continues a cached
        sequence (incremental decoding); the returned cache includes the new tokens.
        `position_ids` (B, T) place each row's tokens where a left-padded batch needs them.
        """
        indices = sorted({self.layer_index(layer) for layer in layers})
        need_all = any(index != self.num_layers for index in indices)
        out = self.model.model(
            input_ids=input_ids.to(self.device),
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
            position_ids=None if position_ids is None else position_ids.to(self.device),
            past_key_values=past_key_values,
            use_cache=past_key_values is not None,
            output_hidden_states=need_all,
        )
        states = {}
        for index in indices:
            states[index] = (
                out.last_hidden_state if index == self.num_layers else out.hidden_states[index]
            )
        return states, out.past_key_values

    @torch.no_grad()
    def hidden_rows(
        self, rows: list[list[int]], layers: list[int]
    ) -> dict[int, list[torch.Tensor]]:
        """Token id rows of any lengths -> {layer index: [(T_r, D) float32 per row]}.

        One right-padded forward with an attention mask; pass rows of similar length.
        """
        lengths = [len(row) for row in rows]
        ids = torch.zeros(len(rows), max(lengths), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for number, row in enumerate(rows):
            ids[number, : lengths[number]] = torch.tensor(row, dtype=torch.long, device=self.device)
            mask[number, : lengths[number]] = 1
        states, _ = self.forward(ids, layers, attention_mask=mask)
        return {
            index: [state[number, :length].float().cpu() for number, length in enumerate(lengths)]
            for index, state in states.items()
        }

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)
