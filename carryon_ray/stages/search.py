"""Carry-on search (Ray Tune, `training` role): the paper's "optimal carry-on model search".

Every trial reads the same stored embeddings and trains one carry-on shape in a plain
in-process loop: hidden size, layers, input bits, sources (layer sets of the primary) and α.
A trial's views are derived from the stored layers only: a layer must be stored, and fewer
bits than stored are obtained by re-quantizing on the training node (SPEC §1). Each trial
reports held-out NLL every `search.eval_every` steps; ASHA stops bad trials early. Trials run
the one training loop (`carryon_ray/loop.py`) and write its checkpoints; the best trial's best
checkpoint goes on to the export stage (as `<name>-best`), and every trial is listed in
RUN_DIR/reports/search.{md,json}.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import torch
from ray import tune

from carryon_ray.bases import default_device
from carryon_ray.config import CarryOnSpec, SearchSpec, TrainSpec
from carryon_ray.loop import TrainLoop, table_batches
from carryon_ray.progress import progress
from carryon_ray.quantized_head import load_head
from carryon_ray.records import Layout, View, precision
from carryon_ray.reports import markdown_table
from carryon_ray.stages.embed import EmbedResult
from carryon_ray.stages.placement import gpus_per_actor, granted_threads, role_resources
from carryon_ray.stages.train import carry_on_config
from carryon_ray.storage import Location, location

logger = logging.getLogger(__name__)

METRIC = "val_nll_merged"
AXES = ("hidden_size", "num_layers", "input_bits", "sources", "alpha", "codec", "residual_bits")
TRIAL_COLUMNS = ["trial", *AXES, "parameters", "steps", METRIC, "val_nll_base", "val_skew", "status"]


def layer_key(layout: Layout, layer: int | str) -> str:
    """The stored key of a primary layer (-1 = final), as the embed stage named it; a string is
    already a key (a layer of any base)."""
    if isinstance(layer, str):
        return layer
    residual = layout.layers[layout.residual.key]
    index = layer + residual.layer + 1 if layer < 0 else layer
    return f"{residual.base}.{index}"


def trial_layout(
    layout: Layout, sources: list[int | str], bits: int, *, codec: str | None = None, residual_bits: int | None = None
) -> Layout:
    """The stored layout seen through a trial's views: same columns, other carry-on inputs (and,
    when given, another codec for every view and another residual precision)."""
    codec = codec or layout.codec
    residual = layout.residual if residual_bits is None else View(layout.residual.key, residual_bits)
    views = []
    for layer in sources:
        key = layer_key(layout, layer)
        if key not in layout.stored_bits:
            stored = sorted(layout.stored_bits)
            raise ValueError(
                f"search.sources: layer {layer} ({key}) is not stored (stored: {stored}); add it to "
                "`sources` and re-run the embed stage"
            )
        views.append(View(key, bits))
    for view, what in [*((view, "search.input_bits") for view in views), (residual, "search.residual_bits")]:
        stored = layout.stored_bits[view.key]
        if precision(view.bits) > precision(stored):
            raise ValueError(
                f"{what}={view.bits} is more precise than the {stored} bits stored for {view.key}; "
                "a view can only lower the stored bits"
            )
    coded = sorted(key for key, stored in layout.stored_bits.items() if stored != 0)
    if codec != layout.codec and coded:  # the stored codes are read with the layout's codec
        raise ValueError(
            f"search.codec={codec}: {', '.join(coded)} stored with {layout.codec}; to view the states through "
            "another codec, store every layer at 0 bits (float16: bridge.residual_bits and input_bits 0) "
            "and re-run the embed stage"
        )
    return Layout(
        codec=codec, layers=layout.layers, stored_bits=layout.stored_bits,
        residual=residual, sources=views, bases=layout.bases, extra=layout.extra,
    )


def check_search(spec: SearchSpec, layout: Layout) -> None:
    """Refuse a search space the stored embeddings cannot give, naming why (the config's own
    cross-checks ran when it was loaded)."""
    problems = []
    for sources, bits, codec, residual_bits in itertools.product(
        spec.sources, spec.input_bits, spec.codec or [None], spec.residual_bits or [None]
    ):
        try:
            trial_layout(layout, sources, bits, codec=codec, residual_bits=residual_bits)
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise ValueError("the search space does not fit: " + "; ".join(dict.fromkeys(problems)))


def _sources_label(sources: list[int | str]) -> str:
    return ",".join(str(layer) for layer in sources)


def _sources_of(label: str) -> list[int | str]:
    return [int(item) if item.lstrip("-").isdigit() else item for item in label.split(",")]


def param_space(spec: SearchSpec) -> dict:
    axes = {
        "hidden_size": spec.hidden_size,
        "num_layers": spec.num_layers,
        "input_bits": spec.input_bits,
        "sources": [_sources_label(layers) for layers in spec.sources],
        "alpha": spec.alpha,
        **({"codec": spec.codec} if spec.codec else {}),
        **({"residual_bits": spec.residual_bits} if spec.residual_bits else {}),
    }
    pick = tune.grid_search if spec.mode == "grid" else tune.choice
    return {key: pick(values) for key, values in axes.items()}


def _read_tables(paths: list[str]) -> pa.Table:
    return pa.concat_tables([location(path).read_table() for path in paths])


@dataclass(frozen=True)
class SearchPlan:
    """What every trial shares: decided once on the driver."""

    run_dir: str
    layout_json: str
    train_paths: list[str]
    eval_paths: list[str]


@dataclass(frozen=True)
class SearchResult:
    """The search's best trial (its best checkpoint, in the loop's format) and every trial."""

    checkpoint: str
    name: str  # the artifact name export gives the best carry-on
    best: dict
    trials: list[dict]
    seconds: float

    def summary(self) -> dict:
        return {"best": self.best, "trials": len(self.trials), "seconds": self.seconds}


def trial_spec(train: TrainSpec, search: SearchSpec) -> TrainSpec:
    """A trial trains like the train stage, for `search.max_steps`, validating every
    `search.eval_every` (ASHA's rungs); warm-up at most a tenth of the trial."""
    return train.model_copy(update={
        "max_steps": search.max_steps, "checkpoint_every": search.eval_every,
        "warmup_steps": min(train.warmup_steps, search.max_steps // 10),
        "early_stopping_patience": None,
    })


def search_trial(trial: dict) -> None:
    """One Tune trial: train a carry-on shape on the stored shards, report held-out NLL."""
    spec: TrainSpec = trial["spec"]
    search: SearchSpec = trial["search"]
    plan: SearchPlan = trial["plan"]
    torch.set_num_threads(granted_threads(spec.torch_threads))  # else search.cpus_per_trial
    torch.manual_seed(spec.seed)
    stored = Layout.from_json(plan.layout_json)
    layout = trial_layout(stored, _sources_of(trial["sources"]), trial["input_bits"],
                          codec=trial.get("codec"), residual_bits=trial.get("residual_bits"))
    # The same views with the residual as stored: the serving path's exact x when it is stored at
    # 0 bits (float16), so a coarser trial residual reports its train/serve skew.
    exact = dataclasses.replace(layout, residual=stored.residual)
    device = default_device()  # the GPU Ray granted the trial, else the CPU
    head = load_head((location(plan.run_dir) / "head").materialize(), spec.head_dtype, device=device)
    train_table, eval_table = _read_tables(plan.train_paths), _read_tables(plan.eval_paths)
    if search.eval_rows:
        eval_table = eval_table.slice(0, search.eval_rows)
    shape = trial["carry_on"].model_copy(update={"hidden_size": trial["hidden_size"], "num_layers": trial["num_layers"]})
    loop = TrainLoop(carry_on_config(shape, layout), layout, head, spec, alpha=trial["alpha"],
                     total_steps=spec.max_steps, device=device)

    def on_record(record: dict, periodic: bool) -> bool:
        if periodic:
            metrics = {**record, METRIC: record["val_nll_merged"], "parameters": loop.carry_on.num_parameters()}
            if exact.residual != layout.residual:
                served = loop.validate(table_batches(exact, eval_table, spec.batch_size, seed=None))
                metrics["val_skew"] = record["val_nll_merged"] - served["nll_merged"]
            with tempfile.TemporaryDirectory() as directory:
                loop.save(directory)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
        return False

    loop.run(
        lambda epoch: table_batches(layout, train_table, spec.batch_size, seed=spec.seed, epoch=epoch),
        on_record=on_record,
        validate=lambda: loop.validate(table_batches(layout, eval_table, spec.batch_size, seed=None)),
    )


class _TrialProgress(tune.Callback):
    """One bar of finished trials on the driver."""

    def __init__(self, bar) -> None:
        self.bar = bar

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.bar.update(1)

    on_trial_error = on_trial_complete


def search_stage(
    spec: SearchSpec, run_dir: Location, embedded: EmbedResult, *, train: TrainSpec, carry_on: CarryOnSpec,
    name: str, allow_unpinned: bool = False,
) -> SearchResult:
    """Run the Tune search on stored embeddings; the best trial's best checkpoint is the result
    (export names it `<name>-best`); every trial goes into RUN_DIR/reports/search.{md,json}."""
    run_dir = location(run_dir)
    from ray.tune.schedulers import ASHAScheduler

    layout = embedded.layout
    check_search(spec, layout)
    if not embedded.manifest["splits"]["train"]["shards"]:
        raise ValueError("the embeddings hold no training rows; check data.train_size and the dataset")
    if not embedded.manifest["splits"]["eval"]["shards"]:
        raise ValueError("the search ranks trials on held-out NLL, but the embeddings hold no eval rows; set data.eval_size")
    resources = role_resources(train.resources, allow_unpinned=allow_unpinned, key="train.resources")
    started = time.time()
    plan = SearchPlan(run_dir=run_dir.uri, layout_json=layout.to_json(),
                      train_paths=embedded.shard_paths("train"), eval_paths=embedded.shard_paths("eval"))
    rungs = -(-spec.max_steps // spec.eval_every)  # validations per full trial
    grid = math.prod(len(getattr(spec, key) or [None]) for key in AXES)
    count = spec.num_samples * (grid if spec.mode == "grid" else 1)
    with progress("search", total=count, unit="trials") as bar:
        tuner = tune.Tuner(
            tune.with_resources(search_trial, {
                "CPU": spec.cpus_per_trial, "GPU": gpus_per_actor(resources) if train.use_gpu else 0, **resources,
            }),
            param_space={"spec": trial_spec(train, spec), "search": spec, "plan": plan,
                         "carry_on": carry_on, **param_space(spec)},
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="min", num_samples=spec.num_samples,
                scheduler=ASHAScheduler(max_t=rungs, grace_period=min(spec.grace_period, rungs),
                                        reduction_factor=spec.reduction_factor),
                max_concurrent_trials=spec.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(
                name=f"search-{int(time.time())}",
                storage_path=(run_dir / "checkpoints").path,
                storage_filesystem=run_dir.fs,
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute=METRIC, checkpoint_score_order="min"
                ),
                callbacks=[_TrialProgress(bar)],
                verbose=0,
            ),
        )
        results = tuner.fit()
    trials = []
    for number, result in enumerate(results):
        history = result.metrics_dataframe
        params = {key: result.config.get(key) for key in AXES}
        best_row = None if history is None or METRIC not in history else history.loc[history[METRIC].idxmin()]
        trials.append({
            "trial": number,
            **params,
            "parameters": None if best_row is None else int(best_row["parameters"]),
            "steps": None if history is None or history.empty else int(history["step"].max()),
            METRIC: None if best_row is None else float(best_row[METRIC]),
            "val_nll_base": None if best_row is None else float(best_row["val_nll_base"]),
            "val_skew": None if best_row is None or "val_skew" not in best_row else float(best_row["val_skew"]),
            "curve": [] if history is None or METRIC not in history else
                     [[int(step), float(value)] for step, value in zip(history["step"], history[METRIC])],
            "status": "error" if result.error else ("stopped early" if history is not None and not history.empty
                                                     and int(history["step"].max()) < spec.max_steps else "completed"),
            "_result": result,
        })
    scored = [t for t in trials if t[METRIC] is not None]
    if not scored:
        errors = [str(t["_result"].error) for t in trials if t["_result"].error]
        raise RuntimeError(f"no search trial reported a validation score: {errors[:1]}")
    best = min(scored, key=lambda t: t[METRIC])
    checkpoint = min(best["_result"].best_checkpoints, key=lambda pair: pair[1][METRIC])[0]
    table = [{k: v for k, v in t.items() if k != "_result"} for t in trials]
    storage = run_dir / "checkpoints"  # the checkpoint as a URI on any store
    result = SearchResult(checkpoint=storage.uri + checkpoint.path[len(storage.path):], name=f"{name}-best",
                          best={k: v for k, v in best.items() if k != "_result"}, trials=table,
                          seconds=time.time() - started)
    reports = run_dir / "reports"
    (reports / "search.json").write_text(json.dumps(
        {**asdict(result), "metric": METRIC, "max_steps": spec.max_steps, "eval_every": spec.eval_every},
        indent=2))
    (reports / "search.md").write_text(
        f"# Carry-on search: {name}\n\nbest: trial {best['trial']} -> {result.name}\n\n"
        + markdown_table(table, TRIAL_COLUMNS) + "\n"
    )
    logger.info("search: %d trials in %.0f s; best trial %d (%s=%.4f)",
                len(trials), result.seconds, best["trial"], METRIC, best[METRIC])
    return result


def search_table(result: SearchResult) -> str:
    return markdown_table(result.trials, TRIAL_COLUMNS) + f"\n\nbest: trial {result.best['trial']} -> {result.name}"

