"""Embed stage (Ray Data, `inference` role): tokens -> frozen base forward -> σ -> Parquet.

1. A small task on the inference role describes each base from its weight files (identity,
   layers, width; `bases.describe_base`) and writes the primary's output head into
   RUN_DIR/head/ (`bases.head_from_files`); no base is loaded for that.
2. One streaming Ray Data graph (`stages/corpus.py`) reads the data (any pyarrow.fs URI),
   tokenizes it in CPU tasks, keeps the first `train_size + eval_size` usable rows (a huge
   file is read only as far as that), splits, packs and plans length-sorted shards, and feeds
   them to a pool of actors (`ActorPoolStrategy(min_size, max_size)`). Each actor loads each
   base once (while the first blocks are still being read), checks on its first shard that
   the saved head applied to the final hidden state gives the model's own logits, runs the
   primary and any second base (aligned causally to the primary's positions,
   `alignment.py`), quantizes, and writes each shard itself: only compressed bytes leave
   it, and the corpus never passes through the driver.
3. A shard's name hashes its layout and token ids; its schema metadata holds the layout, and
   readers check it against the manifest (`records.check_shard`). A shard is published whole
   or not at all (a temporary name and a rename on a disk, one upload on an object store), so
   a run killed part-way (or an actor that dies; Ray Data restarts it and retries its shard)
   resumes where it stopped, and every input row lands in exactly one shard. A manifest lists
   shards, rows and bytes, and records a key of the inputs and config: a rerun with the same
   key finds every shard and does nothing.

Every read and write goes through `carryon_ray.storage`, so RUN_DIR may be `s3://bucket/run`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch

from carryon_ray.alignment import aligned_states
from carryon_ray.bases import FrozenBase, describe_base, head_from_files, resolve_base_path
from carryon_ray.config import BaseSpec, DataSpec, EmbedSpec, ModelSpec, TenantsSpec
from carryon_ray.data import Example, check_chat_template, split_and_pack, split_sizes
from carryon_ray.progress import progress
from carryon_ray.readers import resolve_format
from carryon_ray.records import LayerRef, Layout, check_shard, encode_rows, to_table
from carryon_ray.stages.corpus import full_report, load_tokenizer, ordered, shard_plan, tenant_plan
from carryon_ray.stages.placement import gpus_per_actor, granted_threads, role_resources
from carryon_ray.storage import Location, location

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
HEAD_FILES = ("head.json", "head.safetensors")  # published in this order: the weights last
# Fault injection for the resume tests: "K:MARKER" makes an actor exit after writing K shards,
# once (the marker file records that it happened). Read on the driver, passed to the actors.
CRASH_ENV = "CARRYON_EMBED_CRASH_AFTER"
CHECK_TOKENS = 32  # tokens of the first rows the output-transform check runs on
TENANT_SHARDS_PER_CALL = 8  # with tenants: planned shards an embed actor takes per call


@dataclass(frozen=True)
class EmbedResult:
    """What the embed stage leaves in RUN_DIR/embeddings: its manifest and the layout."""

    run_dir: str  # a local path or a pyarrow.fs URI
    manifest: dict
    layout: Layout

    @property
    def directory(self) -> Location:
        return location(self.run_dir) / "embeddings"

    def shard_locations(self, split: str) -> list[Location]:
        """One split's shards, as the manifest records them."""
        return [self.directory / shard for shard in self.manifest["splits"][split]["shards"]]

    def shard_paths(self, split: str) -> list[str]:
        """One split's shards as absolute paths or URIs (`location(path)` opens one)."""
        return [str(shard) for shard in self.shard_locations(split)]

    def rows(self, split: str) -> int:
        return self.manifest["splits"][split]["rows"]

    def tenants(self) -> list[str]:
        """The tenants embedded (those the embed stage skipped are in `skipped_tenants`)."""
        return sorted(t for t, entry in self.manifest.get("tenants", {}).items() if not entry.get("error"))

    def tenant_shard_paths(self, tenant: str, split: str) -> list[str]:
        return [str(self.directory / shard) for shard in self.manifest["tenants"][tenant]["splits"][split]["shards"]]

    def tenant_rows(self, tenant: str, split: str) -> int:
        return self.manifest["tenants"][tenant]["splits"][split]["rows"]

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
            "dtypes": self.manifest.get("dtypes", []),
            "data": self.manifest["data_report"],
            **({"tenants": len(self.tenants()), "skipped_tenants": self.manifest.get("skipped_tenants", {})}
               if "tenants" in self.manifest else {}),
        }


def _describe(bases: list[BaseSpec], run_dir: Location, fields: str) -> dict:
    """Runs on the inference role: describe the bases from their files, publish the
    primary's head, and say whether the primary's tokenizer has a chat template."""
    described = {spec.name: describe_base(spec) for spec in bases}
    head = head_from_files(bases[0])
    with tempfile.TemporaryDirectory() as scratch:
        head.save(Path(scratch))
        for name in HEAD_FILES:
            (run_dir / "head" / name).publish_file(Path(scratch) / name)
    tokenizer = load_tokenizer(bases[0].path) if fields == "messages" else None
    return {
        "bases": described,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
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
    """One load of each base per actor; each call embeds one planned shard and publishes it."""

    def __init__(
        self,
        bases: list[dict],
        layout_json: str,
        directory: str,
        batch_size: int,
        threads: int | None,
        crash_after: str | None = None,
    ) -> None:
        torch.set_num_threads(granted_threads(threads))
        self.layout = Layout.from_json(layout_json)
        self.directory = location(directory)
        self.bases: dict[str, FrozenBase] = {}
        # A base this actor must refuse: reported in its result rows (an exception raised here
        # would reach the driver as Ray's wrapper, without the message as a ValueError).
        self.problem: str | None = None
        for (name, spec), planned in zip(
            layout_bases(self.layout, bases).items(), self.layout.bases, strict=True
        ):
            base = FrozenBase(spec)
            if base.identity() != planned and self.problem is None:
                self.problem = (
                    f"base '{name}' on this node has identity {base.identity()}, "
                    f"but the run was planned with {planned}; give every node the same base files"
                )
            self.bases[name] = base
        self.primary = self.bases[self.layout.bases[0]["name"]]
        self.batch_size = batch_size
        self.crash_after = crash_after
        self.checked = False
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

    def _check_head(self, examples: list[Example]) -> None:
        """Once per actor: the saved head applied to the final hidden state must give the
        model's own logits, or the carry-on would be trained against the wrong function."""
        if not self.checked:
            try:
                self.primary.check_output_transform([e.input_ids[:CHECK_TOKENS] for e in examples[:2]])
            except ValueError as error:
                self.problem = str(error)
            self.checked = True

    def _maybe_crash(self) -> None:
        """Test hook: die (as a killed node would) after writing K shards, once."""
        if not self.crash_after:
            return
        count, marker = self.crash_after.split(":", 1)
        if self.written >= int(count) and not Path(marker).exists():
            Path(marker).write_text(f"{os.getpid()}\n")
            os._exit(1)

    def _write(self, todo: list[tuple[Location, list[Example]]]) -> None:
        """Embed the examples of several planned shards together (a tenant's shards are
        small: batches mix tenants, so the base runs at full batch size), longest-similar
        rows side by side; then publish each shard."""
        examples = [example for _, shard in todo for example in shard]
        order = sorted(range(len(examples)), key=lambda index: len(examples[index].input_ids))
        hidden = self._embed([examples[index] for index in order])
        where = {index: place for place, index in enumerate(order)}
        start = 0
        for target, shard in todo:
            places = [where[index] for index in range(start, start + len(shard))]
            start += len(shard)
            columns = encode_rows(
                self.layout,
                ids=[example.id for example in shard],
                input_ids=[example.input_ids for example in shard],
                target_masks=[example.target_mask for example in shard],
                hidden={key: [states[place] for place in places] for key, states in hidden.items()},
            )
            sink = pa.BufferOutputStream()
            pq.write_table(to_table(self.layout, columns), sink)
            target.write_bytes(sink.getvalue())  # whole or not at all, on a disk or an object store
            self.written += 1
            self._maybe_crash()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {key: [] for key in (
            "shard", "split", "rows", "tokens", "bytes", "reused", "node", "seconds",
            "plan_rows", "report", "error", "shortfall", "dtype", "tenant",
        )}
        node = ray.get_runtime_context().get_node_id()
        started = time.perf_counter()
        names = [str(shard) for shard in batch["shard"]]  # an empty name carries an error from the plan
        reused = [bool(name) and (self.directory / name).exists() for name in names]
        todo = [(number, self.directory / name) for number, name in enumerate(names) if name and not reused[number]]
        if todo:
            examples = {number: [Example(**item) for item in json.loads(str(batch["examples"][number]))]
                        for number, _ in todo}
            self._check_head(examples[todo[0][0]])
            if self.problem is None:
                self._write([(target, examples[number]) for number, target in todo])
        seconds = time.perf_counter() - started
        tokens = sum(int(batch["tokens"][number]) for number, _ in todo) or 1
        for number, shard in enumerate(names):
            target = self.directory / shard if shard else None
            for key in ("split", "rows", "tokens", "plan_rows", "report", "error", "shortfall", "tenant"):
                value = batch[key][number]
                out[key].append(value.item() if hasattr(value, "item") else str(value))
            if shard and self.problem is not None:
                out["error"][-1] = self.problem
            out["shard"].append(shard)
            out["bytes"].append(target.size() if target is not None and target.exists() else 0)
            out["reused"].append(reused[number])
            out["node"].append(node)
            # The call's time, shared among the shards it computed by their tokens.
            share = 0.0 if reused[number] or not shard else int(batch["tokens"][number]) / tokens
            out["seconds"].append(seconds * share)
            out["dtype"].append("" if reused[number] else str(self.primary.dtype).removeprefix("torch."))
        return out


def _file_stats(where: Location) -> list:
    """(path, size, mtime) of a file or of every file under a directory."""
    if where.is_dir():
        infos = where.fs.get_file_info(pafs.FileSelector(where.path, recursive=True))
    else:
        infos = [where.fs.get_file_info(where.path)]
    return sorted((info.path, info.size, info.mtime_ns) for info in infos if info.type == pafs.FileType.File)


def inputs_key(model: ModelSpec, data: DataSpec, spec: EmbedSpec, tenants: TenantsSpec | None = None) -> str:
    """A hash of everything the shards depend on: the data files, the bases' files and the
    config sections that shape tokens and states. Cheap to compute on the driver."""
    _, data_location = resolve_format(data)
    parts: dict = {
        "data": data.model_dump(),
        "data_files": _file_stats(data_location) if data_location is not None else data.dataset,
        "tenants": tenants.model_dump() if tenants is not None else None,
        "sources": [source.model_dump() for source in model.sources],
        "bridge": model.bridge.model_dump(),
        "rows_per_shard": spec.rows_per_shard,
        "bases": [],
    }
    for base in model.used_bases():
        where = resolve_base_path(base.path, convert=False)
        local = Path(where).expanduser()
        stats = _file_stats(location(local)) if local.is_dir() else where
        parts["bases"].append({**base.model_dump(), "files": stats})
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _unchanged(run_dir: Location, key: str) -> dict | None:
    """The previous manifest, if it was made from the same inputs and all its files exist."""
    path = run_dir / "embeddings" / MANIFEST
    if not path.is_file() or not (run_dir / "head" / HEAD_FILES[-1]).is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("inputs_key") != key:
        return None
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    if not all((run_dir / "embeddings" / shard).is_file() for shard in shards):
        return None
    return manifest


def _remove_partials(directory: Location) -> None:
    """Half-written shards of a killed run (a disk only: an object store has no partials)."""
    if directory.is_local:
        for partial in directory.files():
            if ".partial-" in partial.name:
                partial.remove()


def _plan_failed(rows: list[dict], data: DataSpec, base_path: str, resources: dict[str, float]) -> None:
    """Raise the plan's error: a split the data cannot honour is re-counted over every row, so
    the message gives the same figures `build_examples` gives."""
    failed = next((row for row in rows if row["error"]), None)
    if rows and failed is None:
        return
    if failed is None or failed["shortfall"]:
        report = full_report(data, base_path=base_path, resources=resources)
        if report.usable == 0:
            split_and_pack([], data, report)  # raises: no usable examples
        split_sizes(report.usable, data, report)  # raises: the split cannot be honoured
    raise ValueError(failed["error"] if failed else f"data.dataset '{data.dataset}' produced no shards")


def _rows(shards, bar, stage_started: float):
    """(result row, seconds since the graph started) per shard, moving the progress bar."""
    for row in shards.iter_rows():
        row = {key: value.item() if hasattr(value, "item") else value for key, value in row.items()}
        if bar.total is None and row["plan_rows"]:
            bar.total = int(row["plan_rows"])
        bar.update(int(row["rows"]))
        yield row, time.time() - stage_started


def _check_room(spec: EmbedSpec, resources: dict[str, float]) -> None:
    """The actor pool starts with the graph, so its first `min_actors` must leave a CPU on the
    role's nodes for the tasks that read, tokenize and plan; otherwise they would wait forever."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    cpus = sum(node.get("CPU", 0) for node in nodes if all(node.get(k, 0) > 0 for k in resources))
    taken = spec.min_actors * spec.num_cpus_per_actor
    if cpus and taken > cpus - 1:
        raise ValueError(
            f"embed.min_actors={spec.min_actors} x embed.num_cpus_per_actor={spec.num_cpus_per_actor} "
            f"takes {taken:g} of the {cpus:g} CPUs on the nodes that run embed, leaving less than one "
            "for the tasks that read and tokenize the data; lower embed.min_actors or "
            "embed.num_cpus_per_actor, or add CPUs to those nodes"
        )


def embed_stage(
    spec: EmbedSpec, run_dir: Location | str | Path, *, model: ModelSpec, data: DataSpec,
    tenants: TenantsSpec | None = None, allow_unpinned: bool = False,
) -> EmbedResult:
    """Embed the train and eval splits (with `tenants`: every tenant's, in one pass); the
    manifest is also written to RUN_DIR/embeddings/."""
    started = time.time()
    run_dir = location(run_dir)
    directory = run_dir / "embeddings"
    key = inputs_key(model, data, spec, tenants)
    previous = _unchanged(run_dir, key)
    if previous is not None:
        logger.info(
            "embed: inputs and config unchanged since the last run; all %d shards exist, "
            "nothing to do", sum(len(split["shards"]) for split in previous["splits"].values()),
        )
        manifest = {**previous, "computed_shards": 0, "unchanged": True,
                    "seconds": time.time() - started, "stage_seconds": 0.0, "actor_seconds": 0.0}
        return EmbedResult(run_dir.uri, manifest, _layout_of(manifest))
    resources = role_resources(spec.resources, allow_unpinned=allow_unpinned, key="embed.resources")
    _check_room(spec, resources)
    describe = ray.remote(_describe).options(num_cpus=1, resources=resources)
    description = ray.get(describe.remote(model.used_bases(), run_dir, data.resolved_fields))
    if data.resolved_fields == "messages" and not description["chat_template"]:
        check_chat_template(data, None)  # raises, naming the fix
    layout = build_layout(model, description)
    _remove_partials(directory)
    stage_started = time.time()
    results: list[dict] = []
    first_shard = 0.0  # seconds from the graph's start to its first finished shard: the fixed start-up
    num_gpus = spec.num_gpus_per_actor
    with ordered(), progress("embed", total=None, unit="rows") as bar:
        if tenants is None:
            plan = shard_plan(data, base_path=model.primary.path, layout_json=layout.to_json(),
                              rows_per_shard=spec.rows_per_shard, resources=resources)
        else:
            plan = tenant_plan(data, tenants, base_path=model.primary.path, layout_json=layout.to_json(),
                               rows_per_shard=spec.rows_per_shard, resources=resources)
        shards = plan.map_batches(
            EmbedActor,
            # A tenant's shards are small: several per call, embedded together at full batch size.
            batch_size=1 if tenants is None else TENANT_SHARDS_PER_CALL,
            compute=ray.data.ActorPoolStrategy(min_size=spec.min_actors, max_size=spec.max_actors),
            fn_constructor_kwargs={
                "bases": [base.model_dump() for base in model.used_bases()],
                "layout_json": layout.to_json(),
                "directory": directory.uri,
                "batch_size": spec.batch_size,
                "threads": spec.torch_threads,
                "crash_after": os.environ.get(CRASH_ENV),
            },
            num_cpus=spec.num_cpus_per_actor,
            num_gpus=num_gpus if num_gpus is not None else gpus_per_actor(resources),
            **({"resources": resources} if resources else {}),
        )
        for row, first in _rows(shards, bar, stage_started):
            first_shard = first_shard or first
            results.append(row)
    stage_seconds = time.time() - stage_started
    if tenants is not None:
        results, report, per_tenant = _tenant_results(results)
    else:
        _plan_failed(results, data, model.primary.path, resources)
        report = json.loads(results[0]["report"])
    if report["shrunk"]:  # the plan read everything: count the rows after its last usable one too
        full = full_report(data, base_path=model.primary.path, resources=resources)
        report.update(rows=full.rows, malformed=full.malformed, dropped_overlong=full.dropped_overlong,
                      problems=full.problems)
    computed = [row for row in results if not row["reused"]]
    manifest = {
        "layout": json.loads(layout.to_json()),
        "inputs_key": key,
        "splits": {},
        "data_report": report,
        "seconds": time.time() - started,
        "stage_seconds": stage_seconds,  # the one Ray Data graph: read to last shard, start-up included
        "first_shard_seconds": first_shard,
        "actor_seconds": sum(row["seconds"] for row in computed),
        "computed_shards": len(computed),
        "unchanged": False,
        "nodes": sorted({row["node"] for row in results if row["node"]}),
        # The precision the base ran in (dtype auto decides per actor, by its hardware).
        "dtypes": sorted({row["dtype"] for row in computed if row["dtype"]}),
    }
    for split in ("train", "eval"):
        rows = sorted((row for row in results if row["split"] == split), key=lambda row: row["shard"])
        manifest["splits"][split] = {
            "shards": [row["shard"] for row in rows],
            "rows": sum(row["rows"] for row in rows),
            "tokens": sum(row["tokens"] for row in rows),
            "bytes": sum(row["bytes"] for row in rows),
        }
    if tenants is not None:
        manifest["tenants"] = per_tenant
        manifest["skipped_tenants"] = {tenant: entry["error"] for tenant, entry in per_tenant.items()
                                       if entry.get("error")}
    manifest["bytes_per_token_payload"] = layout.bytes_per_token
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    logger.info(
        "embed: %d shards computed, %d reused; %d train + %d eval rows",
        manifest["computed_shards"], len(results) - manifest["computed_shards"],
        manifest["splits"]["train"]["rows"], manifest["splits"]["eval"]["rows"],
    )
    return EmbedResult(run_dir.uri, manifest, layout)


def _tenant_results(results: list[dict]) -> tuple[list[dict], dict, dict]:
    """(the shards' rows, the data report summed over tenants, per tenant: its splits, its data
    report and the error that skipped it). Raises only when no tenant has shards."""
    per_tenant: dict[str, dict] = {}
    shards = [row for row in results if row["shard"]]
    for row in results:
        entry = per_tenant.setdefault(row["tenant"], {"report": json.loads(row["report"]), "splits": {}})
        if row["error"]:
            entry["error"] = row["error"]
    unassigned = per_tenant.pop("", None)
    for tenant, entry in per_tenant.items():
        for split in ("train", "eval"):
            rows = sorted((r for r in shards if r["tenant"] == tenant and r["split"] == split),
                          key=lambda r: r["shard"])
            entry["splits"][split] = {"shards": [r["shard"] for r in rows], "rows": sum(r["rows"] for r in rows),
                                      "tokens": sum(r["tokens"] for r in rows), "bytes": sum(r["bytes"] for r in rows)}
        if entry.get("error") or not entry["splits"]["train"]["shards"]:
            entry.setdefault("error", f"tenant '{tenant}' has no training rows")
            logger.warning("embed: skipped %s", entry["error"])
    if unassigned is not None:
        logger.warning("embed: %s", unassigned["error"])
    trained = [tenant for tenant, entry in per_tenant.items() if not entry.get("error")]
    if not trained:
        problems = "; ".join(entry["error"] for entry in per_tenant.values()) or (
            unassigned["error"] if unassigned else "the data holds no rows")
        raise ValueError(f"no tenant could be embedded: {problems}")
    trained_set = set(trained)
    kept = [row for row in shards if row["tenant"] in trained_set]
    report: dict = {}
    for entry in per_tenant.values():
        for name, value in entry["report"].items():
            if isinstance(value, bool) or not isinstance(value, (int, list)):
                report.setdefault(name, value)
            else:
                report[name] = report.get(name, 0 if isinstance(value, int) else []) + value
    report["problems"] = report.get("problems", [])[:20]
    report["shrunk"] = False
    return kept, report, per_tenant


def _layout_of(manifest: dict) -> Layout:
    return Layout.from_json(json.dumps(manifest["layout"]))


def read_embeddings(run_dir: Location | str | Path, model: ModelSpec) -> EmbedResult:
    """The embed stage's result as a finished run left it (for stage lists without embed);
    embeddings that do not fit `model`, and shards whose metadata differs from the manifest,
    are refused, naming every mismatch."""
    run_dir = location(run_dir)
    path = run_dir / "embeddings" / MANIFEST
    if not path.is_file():
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
    result = EmbedResult(run_dir.uri, manifest, layout)
    for split in manifest["splits"]:
        for shard in result.shard_locations(split):
            check_shard(shard, layout)
    return result


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

