"""The one pipeline definition: embed -> train -> evaluate -> export (and serve on request).

`Pipeline(config).run()` starts a local Ray node that carries every role (or joins the cluster
in RAY_ADDRESS), runs each stage pinned to its role's custom resource, and writes
RUN_DIR/reports/summary.json.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import ray

from carryon_ray.artifacts import save_carryon
from carryon_ray.bases import FrozenBase, resolve_base_path
from carryon_ray.carry_on import CarryOn
from carryon_ray.config import PipelineConfig
from carryon_ray.data import check_dataset
from carryon_ray.merged import MergedModel, serving_nll
from carryon_ray.records import Layout
from carryon_ray.stages.embed import read_manifest, run_embed, used_bases
from carryon_ray.stages.placement import role_resources
from carryon_ray.stages.train import carry_on_config, run_train

logger = logging.getLogger(__name__)

ROLES = ("inference", "training")
LOCAL_ROLE_UNITS = 1000  # a local node carries every role with room for many actors


def ensure_ray() -> None:
    """Join RAY_ADDRESS or a running local cluster, else start a node carrying every role."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(
            resources={role: LOCAL_ROLE_UNITS for role in ROLES},
            log_to_driver=True,
        )


def _evaluate(config: PipelineConfig, run_dir: str, weights: str, layout_json: str) -> dict:
    """Runs on the inference role: held-out NLL through the serving path (exact x)."""
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(config.embed.torch_threads or os.cpu_count() or 1)  # Ray sets 1 per CPU
    base = FrozenBase(config.primary, device="cpu")
    layout = Layout.from_json(layout_json)
    carry_on = CarryOn(carry_on_config(config, layout))
    carry_on.load_state_dict(load_file(weights))
    others = {spec.name: FrozenBase(spec, device="cpu") for spec in used_bases(config)[1:]}
    merged = MergedModel(base, carry_on, layout, alpha=config.carry_on.alpha, others=others)
    manifest, _ = read_manifest(Path(run_dir))
    examples = _held_out_examples(Path(run_dir), manifest, config.evaluate.max_examples)
    return serving_nll(merged, examples, batch_size=config.evaluate.batch_size)


def _held_out_examples(run_dir: Path, manifest: dict, limit: int | None) -> list[tuple[list[int], list[int]]]:
    import pyarrow.parquet as pq

    examples = []
    for shard in manifest["splits"]["eval"]["shards"]:
        table = pq.read_table(run_dir / "embeddings" / shard, columns=["input_ids", "target_mask"])
        examples += list(zip(table["input_ids"].to_pylist(), table["target_mask"].to_pylist(), strict=True))
    return examples[:limit] if limit else examples


def preflight(config: PipelineConfig) -> None:
    """Check on the driver, before any cluster work, that bases and data can be found."""
    for base in config.bases:
        resolve_base_path(base.path, convert=False)
    check_dataset(config.data)


class Pipeline:
    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.run_dir = Path(config.run_dir).expanduser().resolve()

    def run(self) -> dict:
        """embed -> train -> evaluate -> export; returns and writes the summary."""
        config, run_dir = self.config, self.run_dir
        preflight(config)
        started = time.time()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "reports").mkdir(exist_ok=True)
        (run_dir / "config.resolved.json").write_text(config.model_dump_json(indent=2))
        logger.info("resolved config:\n%s", config.model_dump_json(indent=2))
        ensure_ray()
        inference = role_resources(config.embed.resources)
        training = role_resources(config.train.resources)

        logger.info("[1/4] embed: %s on base '%s'", config.data.dataset, config.primary.name)
        manifest = run_embed(config, run_dir, resources=inference)
        _, layout = read_manifest(run_dir)
        train_split = manifest["splits"]["train"]
        embed = {
            "tokens": train_split["tokens"] + manifest["splits"]["eval"]["tokens"],
            "rows": train_split["rows"] + manifest["splits"]["eval"]["rows"],
            "bytes_per_token": (train_split["bytes"] + manifest["splits"]["eval"]["bytes"])
            / max(1, train_split["tokens"] + manifest["splits"]["eval"]["tokens"]),
            "payload_bytes_per_token": manifest["bytes_per_token_payload"],
            "float16_bytes_per_token": 2 * sum(ref.dim for ref in layout.layers.values()),
            "seconds": manifest["seconds"],
            "computed_shards": manifest["computed_shards"],
            "data": manifest["data_report"],
        }

        logger.info("[2/4] train: %d rows", train_split["rows"])
        train = run_train(config, run_dir, manifest, layout, resources=training)

        logger.info("[3/4] evaluate: held-out NLL through the serving path")
        evaluate_task = ray.remote(_evaluate).options(num_cpus=1, resources=inference)
        scores = ray.get(
            evaluate_task.remote(config, str(run_dir), train["weights"], layout.to_json())
        )

        logger.info("[4/4] export")
        carry_on = self.export(train["weights"], layout)
        summary = {
            "name": config.name,
            "run_dir": str(run_dir),
            "embed": embed,
            "train": {key: value for key, value in train.items() if key not in ("checkpoint", "weights")},
            "eval": {
                "nll_base": scores["nll_base"],
                "nll_merged": scores["nll_merged"],
                "tokens": scores["tokens"],
                "path": "serving (exact x)",
            },
            "carryon": carry_on,
            "seconds": time.time() - started,
        }
        (run_dir / "reports" / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def export(self, weights: str, layout: Layout) -> dict:
        """Write RUN_DIR/carryons/<name> from a checkpoint's weights file."""
        from safetensors.torch import load_file

        carry_on = CarryOn(carry_on_config(self.config, layout))
        carry_on.load_state_dict(load_file(weights))
        path = save_carryon(
            self.run_dir / "carryons" / self.config.name,
            carry_on,
            layout,
            alpha=self.config.carry_on.alpha,
            extra={"name": self.config.name},
        )
        return {"path": str(path), "parameters": carry_on.num_parameters(),
                "megabytes": (path / "model.safetensors").stat().st_size / 2**20}


def summary_table(summary: dict) -> str:
    """A short markdown table of the figures a user looks at first."""
    rows = [
        ("embed.tokens", f"{summary['embed']['tokens']:,}"),
        ("embed.bytes_per_token", (f"{summary['embed']['bytes_per_token']:.1f} "
                                   f"(float16: {summary['embed']['float16_bytes_per_token']})")),
        ("embed.seconds", f"{summary['embed']['seconds']:.1f}"),
        ("train.steps", str(summary["train"]["steps"])),
        ("train.loss_first", f"{summary['train']['loss_first']:.4f}"),
        ("train.loss_last", f"{summary['train']['loss_last']:.4f}"),
        ("train.seconds", f"{summary['train']['seconds']:.1f}"),
        ("eval.nll_base", f"{summary['eval']['nll_base']:.4f}"),
        ("eval.nll_merged", f"{summary['eval']['nll_merged']:.4f}"),
        ("carryon.path", summary["carryon"]["path"]),
        ("carryon.parameters", f"{summary['carryon']['parameters']:,}"),
        ("total seconds", f"{summary['seconds']:.1f}"),
    ]
    width = max(len(key) for key, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {key.ljust(width)} | {value} |" for key, value in rows]
    return "\n".join(lines)
