"""Many tenants' carry-ons: grouped training (Ray Train), export, and the tenant x carry-on matrix.

Train (`training` role): ONE `TorchTrainer` job. Worker r of W takes the tenants r, r+W, ...
(sorted), loads the frozen head once and trains all its tenants together (`grouped.py`: every
tenant's carry-on on its own rows, one head-and-loss pass over all their target rows). A tenant
is a run of its own, named by a hash of its shards (content-hashed by the embed stage), its
carry-on settings and the train settings: its checkpoints are published under
RUN_DIR/checkpoints/tenants/<tenant>-<key>/ every `checkpoint_every` of its steps, so a restarted
worker group (`FailureConfig`), another number of workers (elastic `min_workers <
max_workers`) or a rerun of the command continues every tenant where it was, and a tenant that
finished earlier (its `result.json`) is not trained again: adding a tenant trains only it. A
tenant whose loss is not finite is reported and the others go on.

Export: every trained tenant's carry-on becomes a new version of RUN_DIR/carryons/<tenant>/.

Evaluate: one task scores every tenant's held-out rows (stored embeddings, the training path)
under the base, its own carry-on and every other tenant's: the matrix, drawn as a heat map; each
tenant's version is promoted when its own held-out NLL beats the base's and its current
version's (`registry.decide_promotion`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from carryon_ray.artifacts import WEIGHTS, load_carryon, publish_carryon
from carryon_ray.bases import OutputHead
from carryon_ray.config import CarryOnSpec, EvaluateSpec, TenantsSpec, TrainSpec
from carryon_ray.grouped import GroupedLoop, GroupMember
from carryon_ray.loop import CheckpointInfo, carry_on_config, table_batches
from carryon_ray.progress import progress
from carryon_ray.quantized_head import load_head
from carryon_ray.records import Layout
from carryon_ray.registry import decide_promotion
from carryon_ray.reports import markdown_table, matrix_markdown, plot_nll_matrix
from carryon_ray.stages.embed import EmbedResult
from carryon_ray.stages.export import ExportResult
from carryon_ray.stages.placement import granted_threads, role_resources
from carryon_ray.stages.train import FAULT_MARKER, OPERATIONAL, MetricsLog, inject_fault
from carryon_ray.storage import Location, location
from carryon_ray.training import evaluate

logger = logging.getLogger(__name__)

RESULT = "result.json"
CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class TenantRun:
    """One tenant's training run: where it lives and what it trains."""

    tenant: str
    key: str
    carry_on: CarryOnSpec
    total_steps: int
    train_paths: list[str]
    eval_paths: list[str]

    @property
    def name(self) -> str:
        return f"{self.tenant}-{self.key}"


@dataclass(frozen=True)
class TenantTrained:
    """A finished (or failed) tenant run."""

    tenant: str
    checkpoint: str | None  # None: it failed before its first checkpoint
    steps: int
    planned_steps: int
    loss_first: float | None
    loss_last: float | None
    val: dict
    tokens: int
    failed: str | None = None
    reused: bool = False


@dataclass(frozen=True)
class GroupedTrainResult:
    tenants: dict[str, TenantTrained]
    seconds: float
    world_size: int | None
    trained: int  # tenants trained by this run (the rest finished earlier)
    tokens: int  # tokens the tenants trained by this run trained on
    skipped: dict[str, str] = field(default_factory=dict)  # tenant -> why it was not trained

    def summary(self) -> dict:
        failed = {t: r.failed for t, r in self.tenants.items() if r.failed}
        return {"tenants": len(self.tenants), "trained": self.trained, "failed": failed,
                "skipped": self.skipped, "seconds": self.seconds, "world_size": self.world_size,
                "tokens": self.tokens, "tokens_per_second": self.tokens / max(self.seconds, 1e-9),
                "steps": {t: r.steps for t, r in self.tenants.items()}}


def tenant_steps(spec: TrainSpec, rows: int) -> int:
    """A tenant trains on one worker: its steps are its own epochs of its own rows."""
    if spec.max_steps is not None:
        return spec.max_steps
    return max(1, math.ceil(math.ceil(rows / spec.batch_size) * spec.epochs))


WORKER_COUNT = {"min_workers", "max_workers"}


def tenant_key(spec: TrainSpec, carry_on: CarryOnSpec, embedded: EmbedResult, tenant: str) -> str:
    """A hash of what shapes one tenant's run: its shards (named by their content), its carry-on
    and the train settings. Each tenant trains on one worker, so the worker count is not among
    them: a run continues with however many workers the cluster gives it."""
    splits = embedded.manifest["tenants"][tenant]["splits"]
    parts = {"shards": {split: entry["shards"] for split, entry in splits.items()},
             "layout": embedded.manifest["layout"], "carry_on": carry_on.model_dump(),
             "train": spec.model_dump(exclude=OPERATIONAL | WORKER_COUNT)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _read_table(paths: list[str]) -> pa.Table:
    return pa.concat_tables([location(path).read_table() for path in paths])


def grouped_loop(config: dict) -> None:
    """Runs on every training worker: {"spec", "runs" (TenantRun list), "layout_json", "run_dir"}."""
    spec: TrainSpec = config["spec"]
    torch.set_num_threads(granted_threads(spec.torch_threads))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    runs: list[TenantRun] = config["runs"][rank::world_size]
    if not runs:
        return
    run_dir = location(config["run_dir"])
    root = run_dir / "checkpoints" / "tenants"
    layout = Layout.from_json(config["layout_json"])
    device = ray.train.torch.get_device()
    head = load_head((run_dir / "head").materialize(), spec.head_dtype, device=device)
    members = [GroupMember(run.tenant, carry_on_config(run.carry_on, layout), run.carry_on.alpha, spec,
                           run.total_steps) for run in runs]
    loop = GroupedLoop(members, layout, head, device=device, loss_chunk=spec.loss_chunk)
    by_tenant = {run.tenant: run for run in runs}
    for run in runs:  # continue every tenant from its latest checkpoint, whoever wrote it
        published = (root / run.name / CHECKPOINT).current()
        if published is not None:
            loop.loops[run.tenant].restore(published.materialize())
    tables = {run.tenant: _read_table(run.train_paths) for run in runs}
    evals = {run.tenant: _read_table(run.eval_paths) for run in runs if run.eval_paths}
    metrics = {run.tenant: MetricsLog(root / run.name / "metrics.jsonl",
                                      resume_step=loop.loops[run.tenant].resumed_from or None)
               for run in runs}
    node = ray.get_runtime_context().get_node_id()

    def epoch_batches(tenant: str, epoch: int):
        return table_batches(layout, tables[tenant], spec.batch_size, seed=spec.seed, epoch=epoch)

    def validate(tenant: str):
        if tenant not in evals:
            return None
        return loop.loops[tenant].validate(table_batches(layout, evals[tenant], spec.batch_size, seed=None))

    def on_record(tenant: str, record: dict, periodic: bool) -> bool:
        record.update(world_size=world_size, node=node)
        metrics[tenant].append(record)
        if periodic:
            with tempfile.TemporaryDirectory() as directory:
                loop.loops[tenant].save(directory)
                (root / by_tenant[tenant].name / CHECKPOINT).publish_directory(directory)
        inject_fault(root / FAULT_MARKER, record["step"], spec.fail_at_step, rank)
        return False

    loop.run(epoch_batches, on_record=on_record, validate=validate)
    for run in runs:
        metrics[run.tenant].close()
        records = MetricsLog.read(root / run.name / "metrics.jsonl")
        failed = loop.failed.get(run.tenant)
        if failed is not None and not (root / run.name / CHECKPOINT).exists():
            with tempfile.TemporaryDirectory() as directory:  # what it had, for the report only
                loop.loops[run.tenant].save(directory)
                (root / run.name / CHECKPOINT).publish_directory(directory)
        losses = [r["loss"] for r in records if math.isfinite(r["loss"])]
        validations = [r for r in records if "val_nll_merged" in r]
        result = TenantTrained(
            tenant=run.tenant, checkpoint=(root / run.name / CHECKPOINT).current().uri,
            steps=loop.loops[run.tenant].state.step, planned_steps=run.total_steps,
            loss_first=losses[0] if losses else None,
            loss_last=sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            val={k: validations[-1][k] for k in ("val_nll_base", "val_nll_merged")} if validations else {},
            tokens=loop.loops[run.tenant].state.tokens, failed=failed,
        )
        (root / run.name / RESULT).write_text(json.dumps(asdict(result), indent=2))


def grouped_train_stage(
    spec: TrainSpec, run_dir: Location, embedded: EmbedResult, *, carry_on: CarryOnSpec,
    tenants: TenantsSpec, allow_unpinned: bool = False,
) -> GroupedTrainResult:
    """Train every embedded tenant's carry-on in one Ray Train job (see the module doc)."""
    run_dir = location(run_dir)
    if not (run_dir / "head" / "head.safetensors").is_file():
        raise ValueError(f"the output head {run_dir / 'head'} is missing; re-run the embed stage")
    if spec.optimizer_in_backward:
        raise ValueError("train.optimizer_in_backward is not supported with tenants; set it to false")
    started = time.time()
    resources = role_resources(spec.resources, allow_unpinned=allow_unpinned, key="train.resources")
    root = run_dir / "checkpoints" / "tenants"
    runs, done = [], {}
    for tenant in embedded.tenants():
        shape = tenants.carry_on_for(tenant, carry_on)
        run = TenantRun(tenant, tenant_key(spec, shape, embedded, tenant), shape,
                        tenant_steps(spec, embedded.tenant_rows(tenant, "train")),
                        embedded.tenant_shard_paths(tenant, "train"), embedded.tenant_shard_paths(tenant, "eval"))
        finished = root / run.name / RESULT
        if finished.is_file():
            done[tenant] = TenantTrained(**{**json.loads(finished.read_text()), "reused": True})
        else:
            runs.append(run)
    world = None
    if runs:
        root.mkdir()
        (root / FAULT_MARKER).remove()
        workers = min(spec.max_workers, len(runs))
        lower = min(spec.min_workers, workers)
        logger.info("train: %d tenants on %s worker(s), one shared head each (%d finished earlier)",
                    len(runs), workers if lower == workers else f"{lower}-{workers}", len(done))
        trainer = TorchTrainer(
            grouped_loop,
            train_loop_config={"spec": spec, "runs": runs, "layout_json": embedded.layout.to_json(),
                               "run_dir": run_dir.uri},
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers if lower == workers else (lower, workers), use_gpu=spec.use_gpu,
                resources_per_worker={"CPU": spec.num_cpus_per_worker, **resources},
            ),
            run_config=ray.train.RunConfig(
                name=f"tenants-{embedded.manifest['inputs_key']}", storage_path=(run_dir / "checkpoints").path,
                storage_filesystem=run_dir.fs,
                failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            ),
        )
        total = sum(run.total_steps for run in runs)
        with progress("train", total=total, unit="tenant steps") as bar:
            fit = _fit_following(trainer, [root / run.name / "metrics.jsonl" for run in runs], bar)
        if fit.error is not None and not all((root / run.name / RESULT).is_file() for run in runs):
            raise RuntimeError(f"grouped training failed: {fit.error}")
    trained: dict[str, TenantTrained] = dict(done)
    for run in runs:
        result = json.loads((root / run.name / RESULT).read_text())
        trained[run.tenant] = TenantTrained(**result)
        world = world or _world_size(root / run.name / "metrics.jsonl")
    for tenant, result in sorted(trained.items()):
        if result.failed:
            logger.warning("train: tenant %s failed (%s); the other tenants are unaffected", tenant, result.failed)
    return GroupedTrainResult(
        tenants=dict(sorted(trained.items())), seconds=time.time() - started, world_size=world,
        trained=len(runs), tokens=sum(trained[run.tenant].tokens for run in runs),
        skipped=dict(embedded.manifest.get("skipped_tenants", {})),
    )


def _world_size(path: Location) -> int | None:
    records = MetricsLog.read(path)
    return records[-1].get("world_size") if records else None


def _fit_following(trainer: TorchTrainer, paths: list[Location], bar):
    """`trainer.fit()` while a thread moves the bar by the tenants' recorded steps."""
    import threading

    done = threading.Event()

    def follow() -> None:
        while not done.wait(1.0):
            steps = 0
            for path in paths:
                try:
                    lines = path.read_text().splitlines() if path.is_file() else []
                    steps += json.loads(lines[-1])["step"] if lines else 0
                except (OSError, ValueError):
                    continue
            if steps > bar.n:
                bar.update(steps - bar.n)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        return trainer.fit()
    finally:
        done.set()
        thread.join()


def export_tenants(run_dir: Location, trained: GroupedTrainResult) -> tuple[dict[str, ExportResult], set[str]]:
    """(every tenant's carry-on version, the tenants exported now). A tenant trained by this run
    gets a new version of RUN_DIR/carryons/<tenant>/ (not yet current); one that finished
    earlier keeps the version it has (its current one, else its newest)."""
    exported, fresh = {}, set()
    for tenant, result in trained.tenants.items():
        if result.failed or result.checkpoint is None:
            continue
        carryon = location(run_dir) / "carryons" / tenant
        kept = carryon.current_version() or (carryon.versions() or [None])[-1]
        if result.reused and kept is not None:
            path = carryon.version(kept)
            config = json.loads((path / "config.json").read_text())
            exported[tenant] = ExportResult(name=tenant, path=path.uri, version=kept, carryon=carryon.uri,
                                            parameters=config["parameters"],
                                            megabytes=(path / WEIGHTS).size() / 2**20,
                                            trained_steps=config.get("trained_steps", 0))
            continue
        info = CheckpointInfo.read(result.checkpoint)
        carry_on = info.load()
        path = publish_carryon(carryon, carry_on, info.layout, alpha=info.alpha,
                               extra={"name": tenant, "tenant": tenant, "trained_steps": info.step})
        exported[tenant] = ExportResult(name=tenant, path=path.uri, version=path.name, carryon=carryon.uri,
                                        parameters=carry_on.num_parameters(),
                                        megabytes=(path / WEIGHTS).size() / 2**20, trained_steps=info.step)
        fresh.add(tenant)
    logger.info("export: %d tenants' carry-ons published (not current until evaluated); %d kept from earlier",
                len(fresh), len(exported) - len(fresh))
    return exported, fresh


def score_matrix(
    run_dir: str, artifacts: dict[str, str], eval_paths: dict[str, list[str]], layout_json: str, *,
    batch_size: int, max_rows: int | None, threads: int | None, head_dtype: str = "float32",
) -> dict:
    """Held-out NLL of every tenant's text (rows) under the base and under every carry-on
    (columns), from the stored embeddings; runs as one Ray task."""
    torch.set_num_threads(granted_threads(threads))
    layout = Layout.from_json(layout_json)
    head = OutputHead.load((location(run_dir) / "head").materialize(), dtype=getattr(torch, head_dtype))
    loaded = {tenant: load_carryon(path) for tenant, path in artifacts.items()}
    carry_ons = {tenant: carry_on for tenant, (carry_on, _, _) in loaded.items()}
    alphas = {tenant: config["alpha"] for tenant, (_, _, config) in loaded.items()}
    base, matrix, tokens = {}, {}, {}
    for text, paths in eval_paths.items():
        table = _read_table(paths)
        if max_rows is not None:
            table = table.slice(0, max_rows)
        batches = list(table_batches(layout, table, batch_size, seed=None))
        base[text] = evaluate(None, head, batches, 1.0)["nll_base"]
        matrix[text] = {}
        for tenant, carry_on in carry_ons.items():
            scored = evaluate(carry_on, head, batches, alphas[tenant], with_base=False)
            matrix[text][tenant], tokens[text] = scored["nll_merged"], scored["tokens"]
    return {"base": base, "matrix": matrix, "tokens": tokens}


@dataclass(frozen=True)
class TenantScores:
    """Per tenant: held-out NLL under the base and its own carry-on, and the promotion."""

    tenants: dict[str, dict]
    matrix: dict[str, dict[str, float]]
    base: dict[str, float]
    own_wins: int  # rows where the tenant's own carry-on has the lowest NLL
    heat_map: str | None
    seconds: float

    def summary(self) -> dict:
        return {"tenants": self.tenants, "own_wins": self.own_wins, "of": len(self.matrix),
                "heat_map": self.heat_map, "seconds": self.seconds}


def evaluate_tenants(
    spec: EvaluateSpec, run_dir: Location, exported: dict[str, ExportResult], *, embedded: EmbedResult,
    fresh: set[str] | None = None, allow_unpinned: bool = False,
) -> TenantScores:
    """The tenant x carry-on matrix, the heat map, and the promotion of each version exported
    now (`fresh`; None: all)."""
    started = time.time()
    run_dir = location(run_dir)
    resources = role_resources(spec.resources, allow_unpinned=allow_unpinned, key="evaluate.resources")
    names = sorted(exported)
    eval_paths = {t: embedded.tenant_shard_paths(t, "eval") for t in names if embedded.tenant_shard_paths(t, "eval")}
    task = ray.remote(score_matrix).options(num_cpus=spec.num_cpus, resources=resources)
    with progress("evaluate", total=None, unit="tenants") as bar:
        scores = ray.get(task.remote(run_dir.uri, {t: exported[t].path for t in names}, eval_paths,
                                     embedded.layout.to_json(), batch_size=spec.batch_size,
                                     max_rows=spec.max_examples, threads=spec.torch_threads,
                                     head_dtype=spec.head_dtype))
        bar.update(len(names))
    tenants, wins = {}, 0
    for tenant in names:
        if tenant not in scores["matrix"]:
            tenants[tenant] = {"promoted": False, "reason": "no held-out rows to score it on"}
            continue
        row = scores["matrix"][tenant]
        own, base = row[tenant], scores["base"][tenant]
        wins += own <= min(row.values())
        tenants[tenant] = {"version": exported[tenant].version, "nll_base": base, "nll_own": own,
                           "best_other": min((v for t, v in row.items() if t != tenant), default=None)}
        if fresh is None or tenant in fresh:
            promotion = decide_promotion(exported[tenant].carryon, exported[tenant].version, nll_merged=own,
                                         nll_base=base, tokens=int(scores["tokens"][tenant]))
            tenants[tenant].update(promoted=promotion.promoted, reason=promotion.reason, current=promotion.current)
        else:
            current = location(exported[tenant].carryon).current_version()
            tenants[tenant].update(promoted=current == exported[tenant].version, current=current,
                                   reason="trained and evaluated by an earlier run; unchanged")
    scored = [t for t in names if t in scores["matrix"]]
    grid = [[scores["matrix"][text][model] for model in scored] for text in scored]
    base_column = [scores["base"][text] for text in scored]
    reports = run_dir / "reports"
    heat_map = plot_nll_matrix(scored, grid, base_column, reports / "tenant_matrix.png",
                               title="held-out NLL: each tenant's text under the base and every carry-on")
    table = markdown_table([{"tenant": t, **tenants[t]} for t in names],
                           ["tenant", "nll_base", "nll_own", "best_other", "promoted", "current"])
    (reports / "tenants.md").write_text(
        "# Tenants\n\n" + table + "\n\n## Held-out NLL matrix (rows: text, columns: carry-on)\n\n"
        + matrix_markdown(scored, grid, base_column) + "\n")
    (reports / "tenant_matrix.json").write_text(json.dumps({"tenants": scored, "matrix": grid,
                                                            "base": base_column}, indent=2))
    logger.info("evaluate: %d of %d tenants' own carry-on wins its row; %d promoted", wins, len(scored),
                sum(t["promoted"] for t in tenants.values()))
    return TenantScores(tenants=tenants, matrix=scores["matrix"], base=scores["base"], own_wins=wins,
                        heat_map=None if heat_map is None else heat_map.uri, seconds=time.time() - started)
