"""Embed stage (Ray Data, `inference` role): tokens -> frozen base forward -> σ -> Parquet.

1. A task on the inference role loads the primary once to describe it (identity, layers,
   width), writes its output head into RUN_DIR/head/ and tokenizes the dataset.
2. Examples are sorted by length and cut into shards; a pool of actors
   (`ActorPoolStrategy(min_size, max_size)`, one model load each) runs the base, quantizes
   inside the actor and writes each shard itself, so only compressed bytes leave it.
3. A shard's name hashes its layout and token ids: a rerun skips shards that exist, and a
   run killed part-way resumes where it stopped. A manifest lists shards, rows and bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from carryon_ray.bases import FrozenBase
from carryon_ray.config import BaseSpec, PipelineConfig
from carryon_ray.data import Example, build_examples
from carryon_ray.records import LayerRef, Layout, encode_rows, to_table
from carryon_ray.stages.placement import gpus_per_actor

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def _describe(config: PipelineConfig, run_dir: str) -> dict:
    """Runs on the inference role: load the primary, save its head, tokenize the data."""
    base = FrozenBase(config.primary, device="cpu")
    base.output_head().save(Path(run_dir) / "head")
    train, held_out, report = build_examples(config.data, base.tokenizer)
    return {
        "identity": base.identity(),
        "num_layers": base.num_layers,
        "hidden_size": base.hidden_size,
        "train": [vars(example) for example in train],
        "eval": [vars(example) for example in held_out],
        "report": vars(report),
    }


def build_layout(config: PipelineConfig, description: dict) -> Layout:
    num_layers, width = description["num_layers"], description["hidden_size"]

    def ref(layer: int) -> LayerRef:
        index = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= index <= num_layers:
            raise ValueError(
                f"source layer {layer} is out of range for base '{config.primary.name}' with "
                f"{num_layers} layers; use 0..{num_layers} or -1"
            )
        return LayerRef(config.primary.name, index, width)

    return Layout.build(
        codec=config.bridge.codec,
        residual=(ref(-1), config.bridge.residual_bits),
        sources=[(ref(s.layer), config.source_bits(s)) for s in config.sources],
        bases=[description["identity"]],
    )


class EmbedActor:
    """One model load per actor; each call embeds whole shards and writes them."""

    def __init__(self, base: dict, layout_json: str, batch_size: int, threads: int | None) -> None:
        torch.set_num_threads(threads or os.cpu_count() or 1)
        self.base = FrozenBase(BaseSpec(**base))
        self.layout = Layout.from_json(layout_json)
        if self.base.identity() != self.layout.bases[0]:
            raise ValueError(
                f"base '{self.base.name}' on this node has identity {self.base.identity()}, "
                f"but the run was planned with {self.layout.bases[0]}"
            )
        self.batch_size = batch_size
        self.layers = {key: ref.layer for key, ref in self.layout.layers.items()}

    def _embed(self, examples: list[Example]) -> dict[str, list[torch.Tensor]]:
        hidden: dict[str, list[torch.Tensor]] = {key: [] for key in self.layout.stored_bits}
        for start in range(0, len(examples), self.batch_size):
            group = examples[start : start + self.batch_size]
            lengths = [len(example.input_ids) for example in group]
            ids = torch.zeros(len(group), max(lengths), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, example in enumerate(group):
                ids[row, : lengths[row]] = torch.tensor(example.input_ids)
                mask[row, : lengths[row]] = 1
            states, _ = self.base.forward(ids, list(self.layers.values()), attention_mask=mask)
            for key in hidden:
                layer_states = states[self.layers[key]].float()  # (B, T, D)
                hidden[key] += [layer_states[row, :length] for row, length in enumerate(lengths)]
        return hidden

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"path": [], "rows": [], "tokens": [], "reused": [], "node": []}
        node = ray.get_runtime_context().get_node_id()
        for path, payload in zip(batch["path"], batch["examples"], strict=True):
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
            out["path"].append(path)
            out["rows"].append(len(examples))
            out["tokens"].append(tokens)
            out["reused"].append(reused)
            out["node"].append(node)
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
        shards.append({"path": str(path), "examples": payload})
    return shards


def run_embed(config: PipelineConfig, run_dir: Path, *, resources: dict[str, float]) -> dict:
    """Embed train and eval splits; returns the manifest (also written to embeddings/)."""
    started = time.time()
    directory = run_dir / "embeddings"
    describe = ray.remote(_describe).options(num_cpus=1, resources=resources)
    description = ray.get(describe.remote(config, str(run_dir)))
    layout = build_layout(config, description)
    splits = {
        split: [Example(**item) for item in description[split]] for split in ("train", "eval")
    }
    plan = []
    for split, examples in splits.items():
        (directory / split).mkdir(parents=True, exist_ok=True)
        plan += plan_shards(layout, split, examples, directory, config.embed.rows_per_shard)
    missing = [shard for shard in plan if not Path(shard["path"]).exists()]
    if not missing:
        logger.info("embed: all %d shards exist for these inputs; nothing to do", len(plan))
        results = [{"path": s["path"], "reused": True, "node": None} for s in plan]
    else:
        logger.info("embed: %d of %d shards to compute", len(missing), len(plan))
        spec = config.primary.model_dump()
        results = (
            ray.data.from_items(missing, override_num_blocks=len(missing))
            .map_batches(
                EmbedActor,
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(
                    min_size=config.embed.min_actors, max_size=config.embed.max_actors
                ),
                fn_constructor_kwargs={
                    "base": spec,
                    "layout_json": layout.to_json(),
                    "batch_size": config.embed.batch_size,
                    "threads": config.embed.torch_threads,
                },
                num_cpus=config.embed.num_cpus_per_actor,
                num_gpus=config.embed.num_gpus_per_actor if config.embed.num_gpus_per_actor is not None else gpus_per_actor(resources),
                resources=resources,
            )
            .take_all()
        )
    manifest = {
        "layout": json.loads(layout.to_json()),
        "splits": {},
        "data_report": description["report"],
        "seconds": time.time() - started,
        "computed_shards": sum(not row["reused"] for row in results),
        "nodes": sorted({row["node"] for row in results if row["node"]}),
    }
    for split, examples in splits.items():
        paths = [shard["path"] for shard in plan if f"/{split}/" in shard["path"]]
        manifest["splits"][split] = {
            "shards": [os.path.relpath(path, directory) for path in paths],
            "rows": len(examples),
            "tokens": sum(len(example.input_ids) for example in examples),
            "bytes": sum(Path(path).stat().st_size for path in paths),
        }
    manifest["bytes_per_token_payload"] = layout.bytes_per_token
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(run_dir: Path) -> tuple[dict, Layout]:
    path = run_dir / "embeddings" / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run the embed stage first")
    manifest = json.loads(path.read_text())
    return manifest, Layout.from_json(json.dumps(manifest["layout"]))
