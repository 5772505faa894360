"""`carryon eval`: lm_eval's `simple_evaluate` over the base, a carry-on and the carry-on at
other α, in this process (`harness.CarryOnLM`), on the packaged task YAMLs
(`carryon_ray/eval_tasks/`) or a folder of the user's own.

The carry-on is the registry's (`serve.registry`, else RUN_DIR/carryons) current version of
`--model` (default: the config's `name`), else its newest; `--model base` scores the base
alone. Each row of the result is one (model, α): the base is α = 0 of the same merged model.
Tasks named `*_chat` are rendered with the base's chat template (lm_eval's
`apply_chat_template`). Writes RUN_DIR/reports/lm_eval.json (every metric with its standard
error; for generation tasks, how many answers hold `#### N` and how many run away past
RUNAWAY_CHARS) and RUN_DIR/reports/lm_eval_samples.jsonl (each answer, to compare models
answer by answer), and returns the markdown table it prints.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from carryon_ray.config import PipelineConfig
from carryon_ray.eval_tasks import TASKS_DIR
from carryon_ray.storage import location

logger = logging.getLogger(__name__)

DEFAULT_TASKS = ("gsm8k_heldout",)
CHAT_SUFFIX = "_chat"
PACKAGED_GSM8K = "gsm8k_heldout"  # the tasks reading the pipeline's held-out rows
RUNAWAY_CHARS = 600  # an answer longer than this looped to the token limit (issue 13)


@dataclass
class HarnessRequest:
    model: str | None = None  # a carry-on name, "base", or None: the config's `name`
    alphas: list[float] = field(default_factory=list)  # extra α for the carry-on
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    limit: int | None = None
    task_dir: str | None = None  # more task YAMLs (lm_eval's include_path)
    batch_size: int = 8
    with_base: bool = True  # also score the base (α = 0 of the same merged model)


def task_manager(request: HarnessRequest, held_out: list[int] | None = None):
    """lm_eval's TaskManager over the packaged YAMLs (+ `task_dir`), with the held-out row
    numbers as task metadata; unknown task names are a ValueError naming the choices."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)]
    if request.task_dir is not None:
        if not Path(request.task_dir).is_dir():
            raise FileNotFoundError(f"--task-dir {request.task_dir} is not a directory")
        paths.append(str(request.task_dir))
    metadata = {} if held_out is None else {"rows": held_out}
    manager = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    unknown = [task for task in request.tasks if task not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(manager.all_tasks)} "
                         "(or add a folder of lm_eval YAMLs with --task-dir)")
    return manager


def held_out_rows(config: PipelineConfig, tokenizer) -> list[int] | None:
    """The row numbers of the packaged GSM8K file that the pipeline's split holds out, found by
    the pipeline's own `build_examples` with the primary's tokenizer (so `overlong: drop`,
    malformed rows and `shrink_split` move them as they move the split); None when the
    config's data is not the packaged GSM8K (the tasks then use SPEC §3's 1,000 / 319)."""
    from carryon_ray.data import build_examples

    if config.data.dataset != "gsm8k":
        return None
    _, held_out, _ = build_examples(config.data, tokenizer)
    return [int(example.id) for example in held_out]


def registry_of(config: PipelineConfig):
    from carryon_ray.stages.serve import registry_path

    return registry_path(config.serve, config.run_dir)


def carryon_path(config: PipelineConfig, name: str):
    """The version of carry-on `name` to score: the current one (a flat artifact of the
    earlier layout is its own current), else the newest published."""
    from carryon_ray.artifacts import is_artifact
    from carryon_ray.openai_api import MODEL_ID

    if not MODEL_ID.fullmatch(name) or ".." in name:
        raise ValueError(f"--model {name!r} is not a carry-on name (letters, digits, '_', '.', '-') or `base`")
    carryon = registry_of(config) / name
    versions = carryon.versions() if carryon.is_dir() else []
    path = carryon.current() if carryon.is_dir() else None
    if path is None and versions:
        path = carryon.version(versions[-1])
    if path is None:
        raise FileNotFoundError(
            f"carry-on '{name}' has no exported version under {carryon}; run `carryon run` first, "
            "pick another with --model NAME, or score the base alone with --model base"
        )
    if not is_artifact(path):
        raise FileNotFoundError(f"{path} is not a carry-on artifact (config.json + model.safetensors)")
    return path


def build_models(config: PipelineConfig, request: HarnessRequest):
    """[(label, MergedModel, α)] in table order, and the loaded bases."""
    from carryon_ray.artifacts import load_carryon
    from carryon_ray.bases import FrozenBase
    from carryon_ray.merged import MergedModel
    from carryon_ray.stages.evaluate import artifact_bases

    if any(alpha < 0 for alpha in request.alphas):
        raise ValueError(f"--alpha must be >= 0, got {request.alphas}")
    if request.model == "base":
        if request.alphas:
            raise ValueError("--alpha scales a carry-on; --model base has none")
        base = FrozenBase(config.primary)
        return [("base", MergedModel(base), 0.0)], [base]
    name = request.model or config.name
    path = carryon_path(config, name)
    bases = [FrozenBase(spec) for spec in artifact_bases(config.bases, path.uri)]
    carry_on, layout, artifact = load_carryon(path, running_bases=[base.identity() for base in bases])
    merged = MergedModel(bases[0], carry_on, layout, alpha=artifact["alpha"],
                         others={base.name: base for base in bases[1:]})
    label = name if path == registry_of(config) / name else f"{name}@{path.name}"
    rows = [("base", merged, 0.0)] if request.with_base else []
    rows.append((label, merged, float(artifact["alpha"])))
    rows += [(label, merged, float(alpha)) for alpha in request.alphas if alpha != artifact["alpha"]]
    return rows, bases


def run_harness(config: PipelineConfig, request: HarnessRequest) -> tuple[dict, str]:
    """Evaluate every (model, α) on every task; returns (the report, its markdown table)."""
    import lm_eval

    from carryon_ray.batching import DecodeBatcher
    from carryon_ray.harness import CarryOnLM

    if request.limit is not None and request.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {request.limit}")
    task_manager(request)  # unknown tasks are refused before any model loads
    plain = [task for task in request.tasks if not task.endswith(CHAT_SUFFIX)]
    chat = [task for task in request.tasks if task.endswith(CHAT_SUFFIX)]
    rows, bases = build_models(config, request)
    packaged = any(task.startswith(PACKAGED_GSM8K) for task in request.tasks)
    held_out = held_out_rows(config, bases[0].tokenizer) if packaged else None
    manager = task_manager(request, held_out)
    batcher = DecodeBatcher(bases[0], max_batch_size=request.batch_size)
    report: dict = {"name": config.name, "tasks": request.tasks, "limit": request.limit,
                    "gsm8k_held_out_rows": held_out, "models": []}
    samples: list[dict] = []
    try:
        for label, merged, alpha in rows:
            model = CarryOnLM(merged, alpha=alpha, batcher=batcher, batch_size=request.batch_size,
                              label=label)
            started = time.time()
            results: dict = {}
            answers: dict = {}
            for tasks, templated in ((plain, False), (chat, True)):
                if not tasks:
                    continue
                logger.info("lm_eval: %s at alpha %g on %s", label, alpha, ", ".join(tasks))
                output = lm_eval.simple_evaluate(
                    model=model, tasks=tasks, task_manager=manager, limit=request.limit,
                    apply_chat_template=templated, log_samples=True, bootstrap_iters=1000,
                )
                results.update(output["results"])
                for task, logged in output.get("samples", {}).items():
                    rows_of = answer_rows(logged, model=label, alpha=alpha, task=task)
                    samples += rows_of
                    if rows_of and all(row["answer"] is not None for row in rows_of):  # generated
                        answers[task] = answer_counts(rows_of)
            report["models"].append({"model": label, "alpha": alpha, "seconds": time.time() - started,
                                     "results": metrics(results), "answers": answers})
    finally:
        batcher.close()
    reports = location(config.run_dir) / "reports"
    reports.mkdir()
    (reports / "lm_eval.json").write_text(json.dumps(report, indent=2))
    (reports / "lm_eval_samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in samples))
    report["path"] = (reports / "lm_eval.json").uri
    return report, table(report)


def answer_rows(logged: list[dict], *, model: str, alpha: float, task: str) -> list[dict]:
    """lm_eval's logged samples -> one row per document: the raw answer (generation tasks; the
    scores for log-likelihood ones) and what each filter took from it."""
    rows = []
    for sample in logged:
        raw = sample["resps"][0][0] if sample.get("resps") and sample["resps"][0] else None
        arguments = sample.get("arguments") or [[None]]
        prompt = arguments[0][0] if isinstance(arguments[0][0], str) else None
        rows.append({"model": model, "alpha": alpha, "task": task, "doc_id": sample.get("doc_id"),
                     "prompt": prompt, "answer": raw if isinstance(raw, str) else None,
                     "filtered": sample.get("filtered_resps"), "filter": sample.get("filter"),
                     "target": sample.get("target")})
    return rows  # lm_eval logs a document once per filter: so do these rows


def answer_counts(rows: list[dict]) -> dict:
    """Documents, answers holding `#### N`, answers past RUNAWAY_CHARS (one filter's rows)."""
    first = {}
    for row in rows:
        first.setdefault(row["doc_id"], row["answer"])
    answers = list(first.values())
    return {"documents": len(answers), "with_hash_answer": sum("####" in answer for answer in answers),
            "runaway": sum(len(answer) > RUNAWAY_CHARS for answer in answers)}


def metrics(results: dict) -> dict:
    """lm_eval's {task: {"metric,filter": value, "metric_stderr,filter": se}} ->
    {task: {"metric,filter": {"value": v, "stderr": se}}}."""
    out: dict = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filtered = key.split(",", 1)
            stderr = values.get(f"{metric}_stderr,{filtered}")
            out.setdefault(task, {})[key] = {
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            }
    return out


def table(report: dict) -> str:
    lines = ["| model | alpha | task | metric | value | stderr |",
             "|-------|-------|------|--------|-------|--------|"]
    for row in report["models"]:
        for task, values in row["results"].items():
            for key, value in values.items():
                stderr = "-" if value["stderr"] is None else f"{value['stderr']:.4f}"
                lines.append(f"| {row['model']} | {row['alpha']:g} | {task} | {key} | "
                             f"{value['value']:.4f} | {stderr} |")
    counted = [(row, task, counts) for row in report["models"] for task, counts in row["answers"].items()]
    if counted:
        lines += ["", f"| model | alpha | task | answers | with `#### N` | runaway (> {RUNAWAY_CHARS} chars) |",
                  "|-------|-------|------|---------|---------------|---------|"]
        lines += [f"| {row['model']} | {row['alpha']:g} | {task} | {counts['documents']} | "
                  f"{counts['with_hash_answer']} | {counts['runaway']} |" for row, task, counts in counted]
    return "\n".join(lines)
