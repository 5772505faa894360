"""Embed stage (Ray Data, `inference` role): tokens -> frozen base forward -> σ -> Parquet.

1. A task on the inference role loads the bases the sources use to describe them (identity,
   layers, width), writes the primary's output head into RUN_DIR/head/ and tokenizes the data.
2. Examples are sorted by length and cut into shards; a pool of actors
   (`ActorPoolStrategy(min_size, max_size)`, one load of each base per actor) runs the primary
   and any second base (aligned causally to the primary's positions, `alignment.py`),
   quantizes inside the actor and writes each shard itself, so only compressed bytes leave it.
3. A shard's name hashes its layout and token ids, and it is written to a temporary name and
   renamed: a shard exists whole or not at all. A run killed part-way (or an actor that dies;
   Ray Data restarts it and retries its shard) resumes where it stopped, and every input row
   lands in exactly one shard. A manifest lists shards, rows and bytes, and records a key of
   the inputs and config: a rerun with the same key finds every shard and does nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from carryon_ray.alignment import aligned_states
from carryon_ray.bases import FrozenBase, resolve_base_path
from carryon_ray.config import BaseSpec, DataSpec, EmbedSpec, ModelSpec
from carryon_ray.data import Example, build_examples
from carryon_ray.progress import progress
from carryon_ray.readers import resolve_format
from carryon_ray.records import LayerRef, Layout, encode_rows, to_table
from carryon_ray.stages.placement import gpus_per_actor, role_resources

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# Fault injection for the resume tests: "K:MARKER" makes an actor exit after writing K shards,
# once (the marker file records that it happened). Read on the driver, passed to the actors.
CRASH_ENV = "CARRYON_EMBED_CRASH_AFTER"


@dataclass(frozen=True)
class EmbedResult:
    """What the embed stage leaves in RUN_DIR/embeddings: its manifest and the layout."""

    run_dir: str
    manifest: dict
    layout: Layout

    def shard_paths(self, split: str) -> list[str]:
        """Absolute paths of one split's shards, as the manifest records them."""
        directory = Path(self.run_dir) / "embeddings"
        return [str(directory / shard) for shard in self.manifest["splits"][split]["shards"]]

    def rows(self, split: str) -> int:
        return self.manifest["splits"][split]["rows"]

    def summary(self) -> dict:
        """The figures the pipeline summary shows."""
        splits = self.manifest["splits"].values()
        tokens = sum(split["tokens"] for split in splits)
        return {
            "tokens": tokens,
            "rows": sum(split["rows"] for split in splits),
            "bytes_per_token": sum(split["bytes"] for split in splits) / max(1, tokens),
            "payload_bytes_per_token": self.manifest["bytes_per_token_payload"],
            "float16_bytes_per_token": 2 * sum(ref.dim for ref in self.layout.layers.values()),
            "seconds": self.manifest["seconds"],
            "computed_shards": self.manifest["computed_shards"],
            "data": self.manifest["data_report"],
        }


def _describe(bases: list[BaseSpec], data: DataSpec, run_dir: str) -> dict:
    """Runs on the inference role: load the bases, save the primary's head, tokenize the data."""
    bases = [FrozenBase(spec, device="cpu") for spec in bases]
    primary = bases[0]
    primary.output_head().save(Path(run_dir) / "head")
    train, held_out, report = build_examples(data, primary.tokenizer)
    return {
        "bases": {
            base.name: {
                "identity": base.identity(),
                "num_layers": base.num_layers,
                "hidden_size": base.hidden_size,
            }
            for base in bases
        },
        "train": [vars(example) for example in train],
        "eval": [vars(example) for example in held_out],
        "report": vars(report),
    }


def build_layout(model: ModelSpec, description: dict) -> Layout:
    bases = description["bases"]

    def ref(base: str, layer: int) -> LayerRef:
        num_layers, width = bases[base]["num_layers"], bases[base]["hidden_size"]
        index = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= index <= num_layers:
            raise ValueError(
                f"source layer {layer} is out of range for base '{base}' with "
                f"{num_layers} layers; use 0..{num_layers} or -1"
            )
        return LayerRef(base, index, width)

    return Layout.build(
        codec=model.bridge.codec,
        residual=(ref(model.primary.name, -1), model.bridge.residual_bits),
        sources=[(ref(s.base, s.layer), model.source_bits(s)) for s in model.sources],
        bases=[bases[spec.name]["identity"] for spec in model.used_bases()],
    )


def layout_bases(layout: Layout, specs: list[dict]) -> dict[str, BaseSpec]:
    """Base specs by name, for the bases a layout reads (primary first)."""
    by_name = {spec["name"]: BaseSpec(**spec) for spec in specs}
    return {identity["name"]: by_name[identity["name"]] for identity in layout.bases}


class EmbedActor:
    """One load of each base per actor; each call embeds whole shards and writes them."""

    def __init__(
        self,
        bases: list[dict],
        layout_json: str,
        batch_size: int,
        threads: int | None,
        crash_after: str | None = None,
    ) -> None:
        torch.set_num_threads(threads or os.cpu_count() or 1)
        self.layout = Layout.from_json(layout_json)
        self.bases: dict[str, FrozenBase] = {}
        for (name, spec), planned in zip(
            layout_bases(self.layout, bases).items(), self.layout.bases, strict=True
        ):
            base = FrozenBase(spec)
            if base.identity() != planned:
                raise ValueError(
                    f"base '{name}' on this node has identity {base.identity()}, "
                    f"but the run was planned with {planned}"
                )
            self.bases[name] = base
        self.primary = self.bases[self.layout.bases[0]["name"]]
        self.batch_size = batch_size
        self.crash_after = crash_after
        self.written = 0

    def _embed(self, examples: list[Example]) -> dict[str, list[torch.Tensor]]:
        """{layout key: [(T_r, D) float32 per example]}; second bases aligned to the primary."""
        hidden: dict[str, list[torch.Tensor]] = {key: [] for key in self.layout.stored_bits}
        for start in range(0, len(examples), self.batch_size):
            rows = [example.input_ids for example in examples[start : start + self.batch_size]]
            for name, base in self.bases.items():
                keys = [key for key, ref in self.layout.layers.items() if ref.base == name]
                layers = [self.layout.layers[key].layer for key in keys]
                if base is self.primary:
                    states = base.hidden_rows(rows, layers)
                else:
                    states = aligned_states(self.primary, base, layers, rows)
                for key in keys:
                    hidden[key] += states[self.layout.layers[key].layer]
        return hidden

    def _maybe_crash(self) -> None:
        """Test hook: die (as a killed node would) after writing K shards, once."""
        if not self.crash_after:
            return
        count, marker = self.crash_after.split(":", 1)
        if self.written >= int(count) and not Path(marker).exists():
            Path(marker).write_text(f"{os.getpid()}\n")
            os._exit(1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {
            "path": [], "rows": [], "tokens": [], "reused": [], "node": [], "seconds": [],
        }
        node = ray.get_runtime_context().get_node_id()
        for path, payload in zip(batch["path"], batch["examples"], strict=True):
            started = time.perf_counter()
            examples = [Example(**item) for item in json.loads(payload)]
            tokens = sum(len(example.input_ids) for example in examples)
            reused = Path(path).exists()
            if not reused:
                hidden = self._embed(examples)
                columns = encode_rows(
                    self.layout,
                    ids=[example.id for example in examples],
                    input_ids=[example.input_ids for example in examples],
                    target_masks=[example.target_mask for example in examples],
                    hidden=hidden,
                )
                partial = f"{path}.partial-{os.getpid()}"
                pq.write_table(to_table(self.layout, columns), partial)
                os.replace(partial, path)  # a shard exists whole or not at all
                self.written += 1
                self._maybe_crash()
            out["path"].append(path)
            out["rows"].append(len(examples))
            out["tokens"].append(tokens)
            out["reused"].append(reused)
            out["node"].append(node)
            out["seconds"].append(time.perf_counter() - started)
        return out


def plan_shards(
    layout: Layout, split: str, examples: list[Example], directory: Path, rows_per_shard: int
) -> list[dict]:
    """Sort by length (small padding), cut into shards named by a hash of their content."""
    ordered = sorted(examples, key=lambda example: len(example.input_ids))
    shards = []
    for number, start in enumerate(range(0, len(ordered), rows_per_shard)):
        group = ordered[start : start + rows_per_shard]
        payload = json.dumps([vars(example) for example in group])
        digest = hashlib.sha256((layout.to_json() + payload).encode()).hexdigest()[:12]
        path = directory / split / f"shard-{number:05d}-{digest}.parquet"
        shards.append({"path": str(path), "split": split, "examples": payload, "rows": len(group)})
    return shards


def _file_stats(path: Path) -> list:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]


def inputs_key(model: ModelSpec, data: DataSpec, spec: EmbedSpec) -> str:
    """A hash of everything the shards depend on: the data files, the bases' files and the
    config sections that shape tokens and states. Cheap to compute on the driver."""
    _, data_path = resolve_format(data)
    parts: dict = {
        "data": data.model_dump(),
        "data_files": _file_stats(data_path) if data_path is not None else "pydoc",
        "sources": [source.model_dump() for source in model.sources],
        "bridge": model.bridge.model_dump(),
        "rows_per_shard": spec.rows_per_shard,
        "bases": [],
    }
    for base in model.used_bases():
        location = resolve_base_path(base.path, convert=False)
        local = Path(location).expanduser()
        stats = _file_stats(local) if local.is_dir() else location
        parts["bases"].append({**base.model_dump(), "files": stats})
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _unchanged(run_dir: Path, key: str) -> dict | None:
    """The previous manifest, if it was made from the same inputs and all its files exist."""
    path = run_dir / "embeddings" / MANIFEST
    if not path.exists() or not (run_dir / "head" / "head.safetensors").exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("inputs_key") != key:
        return None
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    if not all((run_dir / "embeddings" / shard).exists() for shard in shards):
        return None
    return manifest


def _remove_partials(directory: Path) -> None:
    """Half-written shards of a killed run (their names carry the writer's pid)."""
    for partial in directory.glob("*/*.partial-*"):
        partial.unlink(missing_ok=True)


def embed_stage(
    spec: EmbedSpec, run_dir: Path, *, model: ModelSpec, data: DataSpec
) -> EmbedResult:
    """Embed the train and eval splits; the manifest is also written to RUN_DIR/embeddings/."""
    started = time.time()
    directory = run_dir / "embeddings"
    resources = role_resources(spec.resources)
    key = inputs_key(model, data, spec)
    previous = _unchanged(run_dir, key)
    if previous is not None:
        logger.info(
            "embed: inputs and config unchanged since the last run; all %d shards exist, "
            "nothing to do", sum(len(split["shards"]) for split in previous["splits"].values()),
        )
        manifest = {**previous, "computed_shards": 0, "unchanged": True,
                    "seconds": time.time() - started, "stage_seconds": 0.0, "actor_seconds": 0.0}
        return EmbedResult(str(run_dir), manifest, _layout_of(manifest))
    describe = ray.remote(_describe).options(num_cpus=1, resources=resources)
    description = ray.get(describe.remote(model.used_bases(), data, str(run_dir)))
    layout = build_layout(model, description)
    splits = {
        split: [Example(**item) for item in description[split]] for split in ("train", "eval")
    }
    plan = []
    for split, examples in splits.items():
        (directory / split).mkdir(parents=True, exist_ok=True)
        plan += plan_shards(layout, split, examples, directory, spec.rows_per_shard)
    _remove_partials(directory)
    missing = [shard for shard in plan if not Path(shard["path"]).exists()]
    stage_started = time.time()
    results = []
    with progress("embed", total=sum(shard["rows"] for shard in plan), unit="rows") as bar:
        bar.update(sum(shard["rows"] for shard in plan if shard not in missing))
        if missing:
            logger.info("embed: %d of %d shards to compute", len(missing), len(plan))
            num_gpus = spec.num_gpus_per_actor
            shards = ray.data.from_items(missing, override_num_blocks=len(missing)).map_batches(
                EmbedActor,
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(min_size=spec.min_actors, max_size=spec.max_actors),
                fn_constructor_kwargs={
                    "bases": [base.model_dump() for base in model.used_bases()],
                    "layout_json": layout.to_json(),
                    "batch_size": spec.batch_size,
                    "threads": spec.torch_threads,
                    "crash_after": os.environ.get(CRASH_ENV),
                },
                num_cpus=spec.num_cpus_per_actor,
                num_gpus=num_gpus if num_gpus is not None else gpus_per_actor(resources),
                resources=resources,
            )
            for row in shards.iter_rows():
                results.append(row)
                bar.update(int(row["rows"]))
    stage_seconds = time.time() - stage_started
    manifest = {
        "layout": json.loads(layout.to_json()),
        "inputs_key": key,
        "splits": {},
        "data_report": description["report"],
        "seconds": time.time() - started,
        "stage_seconds": stage_seconds,  # the Ray Data actor pool, start-up included
        "actor_seconds": sum(row["seconds"] for row in results if not row["reused"]),
        "computed_shards": sum(not row["reused"] for row in results),
        "unchanged": False,
        "nodes": sorted({row["node"] for row in results if row["node"]}),
    }
    for split, examples in splits.items():
        paths = [shard["path"] for shard in plan if shard["split"] == split]  # the plan says which
        manifest["splits"][split] = {
            "shards": [os.path.relpath(path, directory) for path in paths],
            "rows": len(examples),
            "tokens": sum(len(example.input_ids) for example in examples),
            "bytes": sum(Path(path).stat().st_size for path in paths),
        }
    manifest["bytes_per_token_payload"] = layout.bytes_per_token
    partial = directory / f"{MANIFEST}.partial-{os.getpid()}"
    partial.write_text(json.dumps(manifest, indent=2))
    os.replace(partial, directory / MANIFEST)
    logger.info(
        "embed: %d shards computed, %d reused; %d train + %d eval rows",
        manifest["computed_shards"], len(plan) - manifest["computed_shards"],
        manifest["splits"]["train"]["rows"], manifest["splits"]["eval"]["rows"],
    )
    return EmbedResult(str(run_dir), manifest, layout)


def _layout_of(manifest: dict) -> Layout:
    return Layout.from_json(json.dumps(manifest["layout"]))


def read_embeddings(run_dir: Path, model: ModelSpec) -> EmbedResult:
    """The embed stage's result as a finished run left it (for stage lists without embed);
    embeddings that do not fit `model` are refused, naming every mismatch."""
    path = run_dir / "embeddings" / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; run the embed stage first (stages: [embed, ...])"
        )
    manifest = json.loads(path.read_text())
    layout = _layout_of(manifest)
    problems = layout_problems(model, layout)
    if problems:
        raise ValueError(
            f"the embeddings in {run_dir / 'embeddings'} do not fit this config: " + "; ".join(problems)
            + ". Re-run the embed stage with this config (stages: [embed, ...]) or restore the "
            "config they were made with"
        )
    return EmbedResult(str(run_dir), manifest, layout)


def layout_problems(model: ModelSpec, layout: Layout) -> list[str]:
    """What differs between the views this config asks for and those a layout stores."""
    primary = layout.bases[0]["name"] if layout.bases else None
    if primary != model.primary.name:
        return [f"they were embedded with base '{primary}', the config's primary is '{model.primary.name}'"]
    problems = []
    if model.bridge.codec != layout.codec:
        problems.append(f"bridge.codec is '{model.bridge.codec}', the embeddings use '{layout.codec}'")
    if model.bridge.residual_bits != layout.residual.bits:
        problems.append(
            f"bridge.residual_bits={model.bridge.residual_bits}, the embeddings store the residual at "
            f"{layout.residual.bits} bits"
        )
    if len(model.sources) != len(layout.sources):
        problems.append(f"the config has {len(model.sources)} sources, the embeddings {len(layout.sources)}")
        return problems
    final = layout.layers[layout.residual.key].layer  # the primary's number of layers
    for i, (source, view) in enumerate(zip(model.sources, layout.sources, strict=True)):
        ref, bits = layout.layers[view.key], model.source_bits(source)
        if source.base == primary:
            index = source.layer + final + 1 if source.layer < 0 else source.layer
            if not 0 <= index <= final:
                problems.append(
                    f"sources[{i}].layer={source.layer} is out of range for base '{primary}' with "
                    f"{final} layers; use 0..{final} or -1"
                )
                continue
        else:  # another base: a negative layer cannot be checked without loading it
            index = ref.layer if source.layer < 0 else source.layer
        if (source.base, index, bits) != (ref.base, ref.layer, view.bits):
            problems.append(
                f"sources[{i}] asks for {source.base} layer {source.layer} at {bits} bits, the "
                f"embeddings hold {view.key} at {view.bits} bits"
            )
    return problems

