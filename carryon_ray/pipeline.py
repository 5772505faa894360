"""The one pipeline definition: embed -> train (or search) -> export -> evaluate -> deploy.

Each stage is a function of its own config section, the run directory and the typed result of
the stage before it, and returns its own typed result; `Pipeline(config).run(stages)` runs the
list in order, like a recipe. The `carryon` commands are this pipeline with different lists:
`run` (embed, train, export, evaluate; `--serve` adds deploy), `search` (search instead of
train), `serve` (deploy). A list that starts later reuses what the run directory holds.

The pipeline joins RAY_ADDRESS (or the cluster `ray start --head` left on this machine) or
starts a local node that carries every role, writes RUN_DIR/config.resolved.json, and ends
with RUN_DIR/reports/summary.json.
"""

from __future__ import annotations

import json
import logging
import os
import time

import ray
from pydantic import SecretStr

from carryon_ray.bases import resolve_base_path
from carryon_ray.config import STAGES, PipelineConfig, validate_config
from carryon_ray.data import check_dataset
from carryon_ray.readers import resolve_format
from carryon_ray.storage import Location, location

logger = logging.getLogger(__name__)

ROLES = ("inference", "training")
LOCAL_ROLE_UNITS = 1000  # a local node carries every role with room for many actors


def ensure_ray(*, verbose: bool = False) -> None:
    """Join RAY_ADDRESS or the cluster `ray start --head` left running on this machine, else
    start a local node carrying every role.

    Ray's own per-task logs and progress bars reach the terminal only when `verbose`."""
    if ray.is_initialized():
        return
    if not verbose:
        # The driver's core worker logs an "E" line for every Ray Data actor pool (its
        # constructor arguments live in the object store): not an error, so not shown.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        quiet_ray_data()
    options = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    address = running_cluster()
    if address is None:
        ray.init(address="local", resources=dict.fromkeys(ROLES, LOCAL_ROLE_UNITS), **options)
        logger.info("started a local Ray node with the roles %s", ", ".join(ROLES))
    else:
        # "auto": RAY_ADDRESS, else the recorded cluster, with its token when it uses one.
        ray.init(address="auto", **options)  # its nodes carry the roles they were started with
        logger.info("joined the Ray cluster at %s", address)


def running_cluster() -> str | None:
    """The cluster to join: RAY_ADDRESS, else the one `ray start` recorded on this machine
    (`ray/ray_current_cluster` under RAY_TMPDIR, TMPDIR or /tmp) while its GCS process still
    runs; None (also for RAY_ADDRESS=local) when the caller should start a local node."""
    address = os.environ.get("RAY_ADDRESS", "")
    if address:
        return None if address == "local" else address
    from ray._private.services import find_gcs_addresses
    from ray._private.utils import read_ray_address

    recorded = read_ray_address()
    if recorded and recorded in find_gcs_addresses():
        return recorded
    if recorded:
        logger.info("the cluster `ray start` recorded at %s is not running; starting a local node",
                    recorded)
    return None


def quiet_ray_data() -> None:
    """Ray Data's per-dataset lines and bars off the terminal (its log files keep them)."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def preflight(config: PipelineConfig) -> None:
    """Check on the driver, before any cluster work, that bases, data and registry exist."""
    for base in config.bases:
        resolve_base_path(base.path, convert=False)
    if "embed" in config.stages:
        check_dataset(config.data)
    if "deploy" in config.stages and "export" not in config.stages:
        from carryon_ray.stages.serve import registry_path

        registry = registry_path(config.serve, config.run_dir)
        if not registry.is_dir():
            raise FileNotFoundError(
                f"carry-on registry {registry} does not exist; run `carryon run` first or set serve.registry"
            )


class Pipeline:
    def __init__(self, config: PipelineConfig, *, verbose: bool = False) -> None:
        self.config = config
        self.run_dir = location(config.run_dir)  # a local path or any pyarrow.fs URI
        self.verbose = verbose

    def run(self, stages: list[str] | None = None) -> dict:
        """Run `stages` (default: the config's `stages`) in pipeline order; returns the summary."""
        from carryon_ray.stages.embed import embed_stage, read_embeddings
        from carryon_ray.stages.evaluate import evaluate_stage
        from carryon_ray.stages.export import export_stage
        from carryon_ray.stages.search import search_stage
        from carryon_ray.stages.serve import deploy_stage
        from carryon_ray.stages.train import train_stage

        raw = {**self.config.model_dump(), **({"stages": list(stages)} if stages else {})}
        config = validate_config(raw, origin=f"{self.config.name} with stages {raw['stages']}")
        run_dir, stages = self.run_dir, config.stages
        preflight(config)
        # What a list that starts later reuses, checked before any cluster work.
        embedded = trained = exported = None
        if "embed" not in stages and {"train", "search", "evaluate"} & set(stages):
            embedded = read_embeddings(run_dir, config.model)
        if config.tenants is not None:
            return self._run_tenants(config, embedded)
        if "export" not in stages and {"evaluate", "deploy"} & set(stages):
            exported = read_export(run_dir, config.name)
            if exported is None and "evaluate" in stages:
                raise FileNotFoundError(
                    f"stages: evaluate scores the exported carry-on {run_dir / 'carryons' / config.name}, "
                    "which does not exist; run the stages up to export first (carryon run)"
                )
        started = time.time()
        self._start(config)
        if "embed" in stages:
            _, data_path = resolve_format(config.data)
            if data_path is not None:
                check_visible(data_path, "data.dataset")
        summary: dict = {"name": config.name, "run_dir": run_dir.uri, "stages": stages}
        step = (f"[{number}/{len(stages)}] {stage}" for number, stage in enumerate(stages, 1))
        unpinned = config.allow_unpinned  # a role the cluster lacks: an error unless this is set

        if "embed" in stages:
            logger.info("%s: %s on base '%s'", next(step), config.data.dataset, config.primary.name)
            embedded = embed_stage(config.embed, run_dir, model=config.model, data=config.data,
                                   allow_unpinned=unpinned)
            summary["embed"] = embedded.summary()
        if "train" in stages:
            logger.info("%s: %d rows", next(step), embedded.rows("train"))
            trained = train_stage(config.train, run_dir, embedded, carry_on=config.carry_on,
                                  allow_unpinned=unpinned)
            summary["train"] = trained.summary()
        if "search" in stages:
            logger.info("%s: Ray Tune over carry-on shapes", next(step))
            trained = search_stage(config.search, run_dir, embedded, train=config.train,
                                   carry_on=config.carry_on, name=config.name, allow_unpinned=unpinned)
            summary["search"] = trained.summary()
        if "export" in stages:
            logger.info("%s", next(step))
            exported = export_stage(config.name, run_dir, trained)
            summary["carryon"] = exported.summary()
            summary["promotion"] = {exported.name: {
                "version": exported.version, "promoted": False,
                "current": location(exported.carryon).current_version(),
                "reason": "not evaluated, so not promoted: run the evaluate stage (carryon run --stages "
                          f"evaluate), or promote it by hand (carryon rollback {exported.name} --to "
                          f"{exported.version})"}}
        if "evaluate" in stages:
            logger.info("%s: held-out NLL of %s, serving and training path", next(step), exported.path)
            scores = evaluate_stage(config.evaluate, run_dir, exported, embedded=embedded, bases=config.bases,
                                    allow_unpinned=unpinned)
            summary["eval"] = scores.summary()
            summary["promotion"] = {exported.name: {"version": scores.version, "promoted": scores.promoted,
                                                    "reason": scores.reason, "current": scores.current}}
        if "deploy" in stages:
            logger.info("%s", next(step))
            deployed = deploy_stage(config.serve, run_dir, exported, bases=config.bases,
                                    allow_unpinned=unpinned)
            summary["deploy"] = deployed.summary()
        summary["seconds"] = time.time() - started
        (run_dir / "reports" / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _start(self, config: PipelineConfig) -> None:
        """Before the first stage: the reports folder, the resolved config (secrets masked), Ray."""
        (self.run_dir / "reports").mkdir()
        (self.run_dir / "config.resolved.json").write_text(redacted(config).model_dump_json(indent=2))
        ensure_ray(verbose=self.verbose)
        check_visible(self.run_dir, "run_dir", writable=True)

    def _run_tenants(self, config: PipelineConfig, embedded) -> dict:
        """The same stages for many tenants: one embed pass, one grouped training job, a new
        version of every tenant's carry-on, the tenant x carry-on matrix with each tenant's
        promotion, and the deployment that serves every promoted one by its tenant id."""
        from carryon_ray.stages.embed import embed_stage
        from carryon_ray.stages.serve import deploy_stage
        from carryon_ray.stages.tenants import evaluate_tenants, export_tenants, grouped_train_stage

        run_dir, stages, unpinned = self.run_dir, config.stages, config.allow_unpinned
        if "train" not in stages and {"export", "evaluate"} & set(stages):
            raise ValueError(
                f"stages {stages}: with tenants, export and evaluate follow the train stage in the same "
                "run (a rerun finds every finished tenant and does not train it again); add train"
            )
        started = time.time()
        self._start(config)
        summary: dict = {"name": config.name, "run_dir": run_dir.uri, "stages": stages}
        step = (f"[{number}/{len(stages)}] {stage}" for number, stage in enumerate(stages, 1))
        if "embed" in stages:
            logger.info("%s: every tenant of %s on base '%s', one pass", next(step), config.data.dataset,
                        config.primary.name)
            embedded = embed_stage(config.embed, run_dir, model=config.model, data=config.data,
                                   tenants=config.tenants, allow_unpinned=unpinned)
            summary["embed"] = embedded.summary()
        if "train" in stages:
            logger.info("%s: %d tenants, grouped", next(step), len(embedded.tenants()))
            trained = grouped_train_stage(config.train, run_dir, embedded, carry_on=config.carry_on,
                                          tenants=config.tenants, allow_unpinned=unpinned)
            summary["train"] = trained.summary()
        if "export" in stages:
            logger.info("%s", next(step))
            exported, fresh = export_tenants(run_dir, trained)
            summary["carryons"] = {tenant: result.summary() for tenant, result in exported.items()}
        if "evaluate" in stages:
            logger.info("%s: the tenant x carry-on matrix of held-out NLL", next(step))
            scores = evaluate_tenants(config.evaluate, run_dir, exported, embedded=embedded, fresh=fresh,
                                      allow_unpinned=unpinned)
            summary["eval"] = scores.summary()
            summary["promotion"] = {tenant: {key: entry.get(key) for key in ("version", "promoted", "reason", "current")}
                                    for tenant, entry in scores.tenants.items()}
        if "deploy" in stages:
            logger.info("%s", next(step))
            summary["deploy"] = deploy_stage(config.serve, run_dir, None, bases=config.bases,
                                             allow_unpinned=unpinned).summary()
        summary["seconds"] = time.time() - started
        (run_dir / "reports" / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def check_visible(where: Location, key: str, *, writable: bool = False) -> None:
    """A path on this machine's disk must be visible from every node of a multi-node cluster
    (a shared file system); otherwise the stages would fail on the other nodes, later and less
    clearly. Object-store URIs are visible everywhere by construction."""
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if not where.is_local or len(nodes) < 2:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return os.path.exists(path)

    # A directory this run writes gets a marker of its own (a same-named folder on each node
    # would not do); an input is looked for as it is.
    probe = where / f".carryon-visible-{os.getpid()}" if writable else where
    if probe is not where:
        probe.write_text("")
    try:
        answers = ray.get([
            sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote(probe.path) for node in nodes
        ], timeout=120)
    finally:
        if probe is not where:
            probe.remove()
    blind = [node["NodeManagerAddress"] for node, seen in zip(nodes, answers, strict=True) if not seen]
    if blind:
        raise ValueError(
            f"{key} {where} is on this machine's disk, but the cluster's nodes at {sorted(set(blind))} cannot "
            "see it; give an object-storage URI (e.g. s3://bucket/prefix) or a path on a file system every "
            "node mounts"
        )


def read_export(run_dir: Location, name: str):
    """The export a finished run left (its newest version, promoted or not), for stage lists
    that start at evaluate or deploy; None when there is none (deploy still serves the base
    and whatever the registry holds)."""
    from carryon_ray.artifacts import WEIGHTS, is_artifact, read_artifact_config
    from carryon_ray.stages.export import ExportResult

    carryon = location(run_dir) / "carryons" / name
    versions = carryon.versions()
    if not versions or not is_artifact(carryon.version(versions[-1])):
        return None
    path = carryon.version(versions[-1])
    config = read_artifact_config(path)
    return ExportResult(name=name, path=path.uri, version=path.name, carryon=carryon.uri,
                        parameters=config["parameters"], megabytes=(path / WEIGHTS).size() / 2**20,
                        trained_steps=config.get("trained_steps", 0))


def redacted(config: PipelineConfig) -> PipelineConfig:
    """The config with secrets masked, for files and logs. Secrets are pydantic `SecretStr`s
    (`serve.api_key`), which print and dump as asterisks anyway; masked here once more so no
    serialization mode can reveal them."""
    if config.serve.api_key is None:
        return config
    masked = SecretStr("***")
    return config.model_copy(update={"serve": config.serve.model_copy(update={"api_key": masked})})


def summary_table(summary: dict) -> str:
    """A short markdown table of the figures a user looks at first."""
    rows = []
    if "embed" in summary:
        embed = summary["embed"]
        rows += [("embed.tokens", f"{embed['tokens']:,}"),
                 ("embed.bytes_per_token", f"{embed['bytes_per_token']:.1f} (float16: {embed['float16_bytes_per_token']})"),
                 ("embed.dtype", ", ".join(embed.get("dtypes") or ["-"])),
                 ("embed.seconds", f"{embed['seconds']:.1f}")]
    if "train" in summary and "tenants" in summary["train"]:  # many tenants
        train = summary["train"]
        rows += [("train.tenants", f"{train['tenants']} ({train['trained']} trained now, {len(train['failed'])} failed)"),
                 ("train.tokens_per_second", f"{train['tokens_per_second']:.0f}"),
                 ("train.seconds", f"{train['seconds']:.1f}")]
    elif "train" in summary:
        train = summary["train"]
        rows += [("train.steps", f"{train['steps']} of {train['planned_steps']}"),
                 ("train.resumed_from", str(train["resumed_from"])),
                 ("train.loss_first", _number(train["loss_first"])),
                 ("train.loss_last", _number(train["loss_last"])),
                 ("train.seconds", f"{train['seconds']:.1f}")]
    if "search" in summary:
        best = summary["search"]["best"]
        rows += [("search.trials", str(summary["search"]["trials"])),
                 ("search.best", f"h={best['hidden_size']} x {best['num_layers']}, bits {best['input_bits']}")]
    if "eval" in summary and "own_wins" in summary["eval"]:  # many tenants
        scores = summary["eval"]
        promoted = sum(entry["promoted"] for entry in scores["tenants"].values())
        rows += [("eval.own_carry_on_wins_row", f"{scores['own_wins']} of {scores['of']}"),
                 ("eval.promoted", f"{promoted} of {len(scores['tenants'])}"),
                 ("eval.heat_map", str(scores["heat_map"]))]
    elif "eval" in summary:
        scores = summary["eval"]
        rows += [("eval.nll_base", _number(scores["nll_base"])),
                 ("eval.nll_merged", _number(scores["nll_merged"])),
                 ("eval.skew", f"{scores['skew']:+.4f}")]
    if "carryon" in summary:
        rows += [("carryon.path", summary["carryon"]["path"]),
                 ("carryon.parameters", f"{summary['carryon']['parameters']:,}")]
    for name, promotion in ({} if "own_wins" in summary.get("eval", {}) else summary.get("promotion", {})).items():
        rows += [(f"promoted.{name}", f"{'yes' if promotion['promoted'] else 'no'}: {promotion['reason']}")]
    if "deploy" in summary:
        rows += [("deploy.endpoint", summary["deploy"]["endpoint"])]
    rows.append(("total seconds", f"{summary['seconds']:.1f}"))
    width = max(len(key) for key, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {key.ljust(width)} | {value} |" for key, value in rows]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


__all__ = ["STAGES", "Pipeline", "ensure_ray", "preflight", "running_cluster", "summary_table"]
