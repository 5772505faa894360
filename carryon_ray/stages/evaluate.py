"""Evaluate stage (`inference` role): score the exported artifact the way it is served.

An actor loads the bases once, then the artifact through the artifact loader with its base
check (an artifact of another base is refused, naming the mismatch), and scores the held-out
shards one at a time — the driver only counts rows for the progress bar:

- the serving path: the exact final hidden state x from a base forward, carry-on inputs through
  σ̂ as the server computes them (`merged.serving_nll`);
- the training path: the stored σ̂(x) and σ̂ inputs the trainer saw (`training.evaluate`).

`skew` = training-path NLL minus serving-path NLL on the same tokens: the train/serve
difference SPEC §1 asks to measure whenever bits change.

The scores are recorded with the version (`eval.json`), which is then promoted to current only
when its serving-path NLL beats the base's and the current version's (`carryon_ray/registry.py`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import ray
import torch

from carryon_ray.artifacts import load_carryon, read_artifact_config
from carryon_ray.bases import FrozenBase
from carryon_ray.config import BaseSpec, EvaluateSpec
from carryon_ray.merged import MergedModel, serving_nll
from carryon_ray.progress import progress
from carryon_ray.records import decode_batch
from carryon_ray.registry import decide_promotion
from carryon_ray.stages.embed import EmbedResult
from carryon_ray.stages.export import ExportResult
from carryon_ray.stages.placement import gpus_per_actor, granted_threads, role_resources
from carryon_ray.storage import Location, location
from carryon_ray.training import evaluate

logger = logging.getLogger(__name__)

SUMS = ("rows", "tokens", "base", "merged", "train_base", "train_merged")


@dataclass(frozen=True)
class EvaluateResult:
    nll_base: float  # the base alone, exact x
    nll_merged: float  # the served model: exact x + α·g⊙Δ
    nll_train_path: float  # the same merged model on the stored σ̂ states training saw
    nll_base_train_path: float  # the base on σ̂(x)
    skew: float  # nll_train_path - nll_merged
    tokens: int
    rows: int
    artifact: str
    seconds: float
    version: str  # the version scored
    promoted: bool  # whether it became the current version
    reason: str  # why, naming the NLLs compared
    current: str | None  # the carry-on's current version afterwards (None: not served)

    def summary(self) -> dict:
        return {**asdict(self), "path": "serving (exact x); skew = training path - serving path"}


def artifact_bases(bases: list[BaseSpec], artifact: str) -> list[BaseSpec]:
    """The configured bases an artifact reads, primary first; a missing one is an error."""
    wanted = [identity["name"] for identity in read_artifact_config(artifact)["bases"]]
    by_name = {spec.name: spec for spec in bases}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise ValueError(
            f"carry-on {artifact} reads bases {missing}, which the config does not define "
            f"(bases: {list(by_name)}); add them to `bases`"
        )
    return [by_name[name] for name in wanted]


class Evaluator:
    """One load of the bases and the artifact; `score` sums one held-out shard."""

    def __init__(self, bases: list[BaseSpec], threads: int | None) -> None:
        torch.set_num_threads(granted_threads(threads))
        self.bases = [FrozenBase(spec) for spec in bases]
        self.merged: MergedModel | None = None

    def load(self, artifact: str) -> None:
        """The artifact through its loader and base check (a ValueError names a mismatch)."""
        carry_on, layout, config = load_carryon(artifact, running_bases=[b.identity() for b in self.bases])
        others = {base.name: base for base in self.bases[1:]}
        self.merged = MergedModel(self.bases[0], carry_on, layout, alpha=config["alpha"], others=others)

    def score(self, path: str, limit: int | None, batch_size: int) -> dict[str, float]:
        merged = self.merged
        table = location(path).read_table()
        if limit is not None:
            table = table.slice(0, limit)
        columns = table.to_pydict()
        examples = list(zip(columns["input_ids"], columns["target_mask"], strict=True))
        served = serving_nll(merged, examples, batch_size=batch_size)
        batches = (decode_batch(merged.layout, table.slice(start, batch_size).to_pydict())
                   for start in range(0, table.num_rows, batch_size))
        trained = evaluate(merged.carry_on, merged.head, (b.to(merged.base.device) for b in batches), merged.alpha)
        assert trained["tokens"] == served["tokens"], "both paths score the same target tokens"
        tokens = served["tokens"]
        return {"rows": table.num_rows, "tokens": tokens, "base": served["nll_base"] * tokens,
                "merged": served["nll_merged"] * tokens, "train_base": trained["nll_base"] * tokens,
                "train_merged": trained["nll_merged"] * tokens}


def evaluate_stage(
    spec: EvaluateSpec, run_dir: Location, exported: ExportResult, *, embedded: EmbedResult,
    bases: list[BaseSpec], allow_unpinned: bool = False,
) -> EvaluateResult:
    """Held-out NLL of the exported version through the serving and the training path; the
    version is promoted when it beats the base and the current version."""
    started = time.time()
    shards = embedded.shard_paths("eval")
    if not shards:
        raise ValueError("the embeddings hold no held-out rows to evaluate; set data.eval_size > 0")
    resources = role_resources(spec.resources, allow_unpinned=allow_unpinned, key="evaluate.resources")
    # A GPU where a node of the role has one: the actor's bases then run on it (cuda).
    actor = ray.remote(Evaluator).options(
        num_cpus=spec.num_cpus, num_gpus=gpus_per_actor(resources), resources=resources
    )
    evaluator = actor.remote(artifact_bases(bases, exported.path), spec.torch_threads)
    ray.get(evaluator.load.remote(exported.path))
    total = min(embedded.rows("eval"), spec.max_examples or embedded.rows("eval"))
    sums = dict.fromkeys(SUMS, 0.0)
    with progress("evaluate", total=total, unit="rows") as bar:
        for path in shards:
            left = total - int(sums["rows"])
            if left <= 0:
                break
            part = ray.get(evaluator.score.remote(path, left, spec.batch_size))
            sums = {key: sums[key] + part[key] for key in SUMS}
            bar.update(int(part["rows"]))
    ray.kill(evaluator)
    tokens = int(sums["tokens"])
    if tokens == 0:
        raise ValueError("evaluation saw no target tokens; check data.eval_size and data.loss_on")
    mean = {key: sums[key] / tokens for key in ("base", "merged", "train_base", "train_merged")}
    promotion = decide_promotion(exported.carryon, exported.version, nll_merged=mean["merged"],
                                 nll_base=mean["base"], tokens=tokens)
    logger.info("evaluate: %s@%s %s: %s", exported.name, exported.version,
                "promoted" if promotion.promoted else "not promoted", promotion.reason)
    return EvaluateResult(
        nll_base=mean["base"], nll_merged=mean["merged"], nll_train_path=mean["train_merged"],
        nll_base_train_path=mean["train_base"], skew=mean["train_merged"] - mean["merged"],
        tokens=tokens, rows=int(sums["rows"]), artifact=exported.path, seconds=time.time() - started,
        version=exported.version, promoted=promotion.promoted, reason=promotion.reason,
        current=promotion.current,
    )
