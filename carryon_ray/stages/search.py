"""Carry-on search (Ray Tune, `training` role): the paper's "optimal carry-on model search".

Every trial reads the same stored embeddings and trains one carry-on shape in a plain
in-process loop: hidden size, layers, input bits, sources (layer sets of the primary) and α.
A trial's views are derived from the stored layers only: a layer must be stored, and fewer
bits than stored are obtained by re-quantizing on the training node (SPEC §1). Each trial
reports held-out NLL every `search.eval_every` steps; ASHA stops bad trials early. The best
trial's best checkpoint is exported to RUN_DIR/carryons/<name>-best, and every trial is
listed in RUN_DIR/reports/search.{md,json}.
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray import tune
from safetensors.torch import load_file, save_file

from carryon_ray.artifacts import save_carryon
from carryon_ray.carry_on import CarryOn, CarryOnConfig
from carryon_ray.config import PipelineConfig
from carryon_ray.quantized_head import load_head
from carryon_ray.records import Layout, View, decode_batch, precision
from carryon_ray.reports import markdown_table
from carryon_ray.training import build_optimizer, evaluate, lr_at, train_step

logger = logging.getLogger(__name__)

METRIC = "val_nll_merged"
TRIAL_COLUMNS = ["trial", "hidden_size", "num_layers", "input_bits", "sources", "alpha",
                 "parameters", "steps", METRIC, "val_nll_base", "status"]


def layer_key(layout: Layout, layer: int) -> str:
    """The stored key of a primary layer (-1 = final), as the embed stage named it."""
    residual = layout.layers[layout.residual.key]
    index = layer + residual.layer + 1 if layer < 0 else layer
    return f"{residual.base}.{index}"


def trial_layout(layout: Layout, sources: list[int], bits: int) -> Layout:
    """The stored layout seen through a trial's views: same columns, other carry-on inputs."""
    views = []
    for layer in sources:
        key = layer_key(layout, layer)
        if key not in layout.stored_bits:
            stored = sorted(layout.stored_bits)
            raise ValueError(
                f"search.sources: layer {layer} ({key}) is not stored (stored: {stored}); add it to "
                "`sources` and re-run the embed stage"
            )
        if precision(bits) > precision(layout.stored_bits[key]):
            raise ValueError(
                f"search.input_bits={bits} is more precise than the {layout.stored_bits[key]} bits "
                f"stored for {key}; a view can only lower the stored bits"
            )
        views.append(View(key, bits))
    return Layout(
        codec=layout.codec, layers=layout.layers, stored_bits=layout.stored_bits,
        residual=layout.residual, sources=views, bases=layout.bases, extra=layout.extra,
    )


def search_problems(config: PipelineConfig) -> list[str]:
    """Checks of the search space against the rest of the config (run before any work)."""
    from carryon_ray.config import check_codec_bits

    problems = []
    for bits in config.search.input_bits:
        try:
            check_codec_bits(config.bridge.codec, bits, key="search.input_bits")
        except ValueError as error:
            problems.append(str(error))
    for size in config.search.hidden_size:
        if size % config.carry_on.num_heads:
            problems.append(
                f"search.hidden_size value {size} must be divisible by carry_on.num_heads={config.carry_on.num_heads}"
            )
    return problems


def check_search(config: PipelineConfig, layout: Layout | None = None) -> None:
    """Refuse a search space the config or the stored embeddings cannot give, naming why."""
    problems = search_problems(config)
    if layout is not None:
        for sources, bits in itertools.product(config.search.sources, config.search.input_bits):
            try:
                trial_layout(layout, sources, bits)
            except ValueError as error:
                problems.append(str(error))
    if problems:
        raise ValueError("the search space does not fit: " + "; ".join(dict.fromkeys(problems)))


def _sources_label(sources: list[int]) -> str:
    return ",".join(str(layer) for layer in sources)


def param_space(config: PipelineConfig) -> dict:
    spec = config.search
    axes = {
        "hidden_size": spec.hidden_size,
        "num_layers": spec.num_layers,
        "input_bits": spec.input_bits,
        "sources": [_sources_label(layers) for layers in spec.sources],
        "alpha": spec.alpha,
    }
    pick = tune.grid_search if spec.mode == "grid" else tune.choice
    return {key: pick(values) for key, values in axes.items()}


def _read_tables(paths: list[str]) -> pa.Table:
    return pa.concat_tables([pq.read_table(path) for path in paths])


def _batches(layout: Layout, table: pa.Table, batch_size: int, generator: torch.Generator | None):
    """Decoded batches of a compressed table, shuffled by row when a generator is given."""
    order = torch.randperm(table.num_rows, generator=generator) if generator is not None else torch.arange(table.num_rows)
    for start in range(0, table.num_rows, batch_size):
        rows = table.take(pa.array(order[start : start + batch_size].numpy()))
        yield decode_batch(layout, rows.to_pydict())


def search_trial(trial: dict) -> None:
    """One Tune trial: train a carry-on shape on the stored shards, report held-out NLL."""
    setup = trial["setup"]
    torch.set_num_threads(setup["threads"])
    torch.manual_seed(setup["seed"])
    layout = trial_layout(
        Layout.from_json(setup["layout"]), [int(x) for x in trial["sources"].split(",")], trial["input_bits"]
    )
    head = load_head(Path(setup["run_dir"]) / "head", setup["head_dtype"])
    train_table, eval_table = _read_tables(setup["train_paths"]), _read_tables(setup["eval_paths"])
    if setup["eval_rows"]:
        eval_table = eval_table.slice(0, setup["eval_rows"])
    carry_on = CarryOn(CarryOnConfig(
        input_dims=[layout.layers[view.key].dim for view in layout.sources],
        output_dim=layout.layers[layout.residual.key].dim,
        hidden_size=trial["hidden_size"], num_layers=trial["num_layers"], num_heads=setup["num_heads"],
        mlp_ratio=setup["mlp_ratio"], max_positions=setup["max_positions"],
    ))
    optimizer = build_optimizer(carry_on.parameters(), name=setup["optimizer"], lr=setup["lr"],
                                weight_decay=setup["weight_decay"], device="cpu")
    generator = torch.Generator().manual_seed(setup["seed"])
    total, step, started = setup["max_steps"], 0, time.time()
    while step < total:
        for batch in _batches(layout, train_table, setup["batch_size"], generator):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, base_lr=setup["lr"], warmup=setup["warmup"], total=total)
            loss, _ = train_step(carry_on, head, batch, optimizer, alpha=trial["alpha"],
                                 grad_clip=setup["grad_clip"], chunk=setup["loss_chunk"])
            step += 1
            if step % setup["eval_every"] == 0 or step == total:
                scores = evaluate(carry_on, head, _batches(layout, eval_table, setup["batch_size"], None),
                                  trial["alpha"], setup["loss_chunk"])
                metrics = {"step": step, "loss": loss, METRIC: scores["nll_merged"],
                           "val_nll_base": scores["nll_base"], "parameters": carry_on.num_parameters(),
                           "seconds": time.time() - started}
                with tempfile.TemporaryDirectory() as directory:
                    save_file({k: v.contiguous() for k, v in carry_on.state_dict().items()},
                              Path(directory) / "carry_on.safetensors")
                    (Path(directory) / "carry_on.json").write_text(json.dumps(carry_on.config.to_dict()))
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
            if step >= total:
                break


def run_search(
    config: PipelineConfig, run_dir: Path, manifest: dict, layout: Layout, *, resources: dict[str, float]
) -> dict:
    """Run the Tune search on stored embeddings; export the best and write the trials table."""
    from ray.tune.schedulers import ASHAScheduler

    from carryon_ray.stages.train import check_manifest

    spec, train = config.search, config.train
    check_manifest(config, run_dir, manifest, layout)
    check_search(config, layout)
    if not manifest["splits"]["eval"]["shards"]:
        raise ValueError("the search ranks trials on held-out NLL, but the embeddings hold no eval rows; set data.eval_size")
    started = time.time()
    embeddings = run_dir / "embeddings"
    setup = {
        "layout": layout.to_json(),
        "run_dir": str(run_dir.resolve()),
        "train_paths": [str(embeddings / p) for p in manifest["splits"]["train"]["shards"]],
        "eval_paths": [str(embeddings / p) for p in manifest["splits"]["eval"]["shards"]],
        "eval_rows": spec.eval_rows,
        "max_steps": spec.max_steps,
        "eval_every": spec.eval_every,
        "batch_size": train.batch_size,
        "lr": train.learning_rate,
        "weight_decay": train.weight_decay,
        "warmup": min(train.warmup_steps, spec.max_steps // 10),
        "grad_clip": train.grad_clip,
        "optimizer": train.optimizer,
        "head_dtype": train.head_dtype,
        "loss_chunk": train.loss_chunk,
        "num_heads": config.carry_on.num_heads,
        "mlp_ratio": config.carry_on.mlp_ratio,
        "max_positions": config.carry_on.max_positions,
        "threads": max(1, int(spec.cpus_per_trial)),
        "seed": train.seed,
    }
    rungs = -(-spec.max_steps // spec.eval_every)  # validations per full trial
    tuner = tune.Tuner(
        tune.with_resources(search_trial, {"CPU": spec.cpus_per_trial, **resources}),
        param_space={"setup": setup, **param_space(config)},
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="min", num_samples=spec.num_samples,
            scheduler=ASHAScheduler(max_t=rungs, grace_period=min(spec.grace_period, rungs),
                                    reduction_factor=spec.reduction_factor),
            max_concurrent_trials=spec.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=f"{config.name}-search-{int(time.time())}",
            storage_path=str((run_dir / "checkpoints").resolve()),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=METRIC, checkpoint_score_order="min"
            ),
            verbose=0,
        ),
    )
    results = tuner.fit()
    trials = []
    for number, result in enumerate(results):
        history = result.metrics_dataframe
        params = {key: result.config[key] for key in ("hidden_size", "num_layers", "input_bits", "sources", "alpha")}
        best_row = None if history is None or METRIC not in history else history.loc[history[METRIC].idxmin()]
        trials.append({
            "trial": number,
            **params,
            "parameters": None if best_row is None else int(best_row["parameters"]),
            "steps": None if history is None or history.empty else int(history["step"].max()),
            METRIC: None if best_row is None else float(best_row[METRIC]),
            "val_nll_base": None if best_row is None else float(best_row["val_nll_base"]),
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
    name = f"{config.name}-best"
    with checkpoint.as_directory() as directory:
        carry_on = CarryOn(CarryOnConfig(**json.loads((Path(directory) / "carry_on.json").read_text())))
        carry_on.load_state_dict(load_file(Path(directory) / "carry_on.safetensors"))
    best_layout = trial_layout(layout, [int(x) for x in best["sources"].split(",")], best["input_bits"])
    path = save_carryon(
        run_dir / "carryons" / name, carry_on, best_layout, alpha=best["alpha"],
        extra={"name": name, "search": {key: best[key] for key in TRIAL_COLUMNS if key != "status"}},
    )
    table = [{k: v for k, v in t.items() if k != "_result"} for t in trials]
    report = {"best": {k: v for k, v in best.items() if k != "_result"}, "trials": table,
              "carryon": str(path), "seconds": time.time() - started, "metric": METRIC,
              "max_steps": spec.max_steps, "eval_every": spec.eval_every}
    reports = run_dir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "search.json").write_text(json.dumps(report, indent=2))
    (reports / "search.md").write_text(
        f"# Carry-on search: {config.name}\n\nbest: trial {best['trial']} -> {path}\n\n"
        + markdown_table(table, TRIAL_COLUMNS) + "\n"
    )
    logger.info("search: %d trials in %.0f s; best trial %d (%s=%.4f) exported to %s",
                len(trials), report["seconds"], best["trial"], METRIC, best[METRIC], path)
    return report


def search_table(report: dict) -> str:
    return markdown_table(report["trials"], TRIAL_COLUMNS) + f"\n\nbest: trial {report['best']['trial']} -> {report['carryon']}"

