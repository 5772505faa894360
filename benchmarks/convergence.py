"""Convergence, the paper's Figure 3: training loss per step and per second of four ways to
customise SmolLM2-135M-Instruct, each trained for the same wall time on the same batches.

The arms (each in its own fresh process; the first three and the embedding pass are
`benchmarks/train_vs_lora.py`'s):

- carry-on:   the project's `TrainLoop` on the stored final states (8-bit residual, 4-bit
              input), h=256 x 3 layers, against the frozen head; the base is never loaded.
- LoRA:       PEFT LoRA r=8 on q_proj / v_proj, float32, the whole base forward and backward.
- last block: full fine-tuning of the base's last transformer block and its final norm,
              everything else frozen, float32 (`run_last_block`).
- scratch:    the carry-on trunk with its own tied token embedding and no base.

LoRA, last block and scratch schedule the learning rate by wall time (warm-up, then cosine to
10% at the end of the budget, peak 1e-3); the carry-on's step schedule is fitted to the budget
when its warm-up ends. Batches: 8 sequences of at most 256 tokens, each epoch a seeded
permutation, the same for every arm.

Datasets: `gsm8k` (1,000 training problems, loss on the answer tokens) and `pydoc` (continued
pre-training on the standard library's pydoc topics, 70 topics packed into 256-token chunks,
loss on every token; the last 9 topics are held out), both built by `carryon_ray.data`.

Every arm records its training loss per step: (step, seconds since training started, mean NLL
of the step's batch). The held-out NLL per target token is measured at the end. Two targets:

- gsm8k: at equal training wall time, the carry-on's held-out NLL <= LoRA's;
- pydoc: the carry-on reaches the training loss scratch ends at in <= 1/5 of scratch's steps
  (both curves smoothed by a trailing mean over 10 steps; `steps_to_reach`).

Each is also computed on the other dataset, as information.

    python benchmarks/convergence.py --dataset both --seconds 90 --json reports/convergence.json --plots reports
    python benchmarks/convergence.py --dataset both --quick --json /tmp/convergence_quick.json --plots /tmp/plots

`--quick` is a smoke run (about 2.5 minutes for both datasets on 2 cores): 48 GSM8K problems /
24 pydoc chunks, 12 / 4 held out, 4 s per arm (an arm's first step may take longer: it always
runs); its numbers show that every arm runs and records its curve, not how the arms compare.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import publish
from benchmarks.train_vs_lora import (
    BATCH,
    DATASETS,
    MAX_LENGTH,
    _in_child,
    carry_on_sections,
    run_base_arm,
    run_carryon,
    run_embed,
    run_lora,
    run_scratch,
)

ARMS = {  # key in the figures -> name in the tables and plots
    "carry_on": "carry-on",
    "lora": "LoRA r=8 (q,v)",
    "last_block": "last block + final norm (full FT)",
    "scratch": "carry-on trunk from scratch (no base)",
}
SMOOTHING = 10  # steps in the trailing mean of a training-loss curve
STEP_RATIO_BOUND = 0.2  # the carry-on reaches scratch's final loss in <= 1/5 of its steps
# Training / held-out rows per dataset (None: all of that side). A GSM8K row is a problem; a
# pydoc row is a 256-token chunk of packed topics (394 train, 49 held out).
FULL = {"gsm8k": (1000, 100), "pydoc": (None, None)}
QUICK = {"gsm8k": (48, 12), "pydoc": (24, 4)}
QUICK_SECONDS, FULL_SECONDS = 4.0, 90.0


# --- the fourth arm --------------------------------------------------------------------------


def run_last_block(work: str, seconds: float, *, curve: bool = False) -> dict:
    """Full fine-tuning of the base's last transformer block and its final norm (float32),
    everything else frozen (the tied embedding / LM head included), as `run_base_arm` trains."""

    def adapt(model):
        model.requires_grad_(False)
        trainable = [*model.model.layers[-1].parameters(), *model.model.norm.parameters()]
        for parameter in trainable:
            parameter.requires_grad_(True)
        return model, trainable

    return run_base_arm(work, seconds, adapt, curve=curve)


# --- curves ----------------------------------------------------------------------------------


def smooth(losses: list[float], window: int = SMOOTHING) -> list[float]:
    """Trailing running mean: item i is the mean of losses[max(0, i - window + 1) : i + 1]."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    smoothed, total = [], 0.0
    for index, loss in enumerate(losses):
        total += loss
        if index >= window:
            total -= losses[index - window]
        smoothed.append(total / min(index + 1, window))
    return smoothed


def final_loss(curve: list, window: int = SMOOTHING) -> float:
    """The smoothed training loss at a curve's last step; `curve` holds (step, seconds, loss)."""
    if not curve:
        raise ValueError("an empty loss curve has no final loss")
    return smooth([point[2] for point in curve], window)[-1]


def steps_to_reach(curve: list, level: float, window: int = SMOOTHING) -> int | None:
    """The first step whose smoothed training loss is <= `level`, or None if none is."""
    for point, loss in zip(curve, smooth([point[2] for point in curve], window), strict=True):
        if loss <= level:
            return int(point[0])
    return None


def reach_scratch(arms: dict[str, dict], window: int = SMOOTHING) -> dict:
    """For every arm, the first step at which its smoothed training loss reaches the one scratch
    ends at (`level`), and that step over scratch's step count (`ratio`, inf when never)."""
    scratch = arms["scratch"]
    level = final_loss(scratch["curve"], window)
    steps = {}
    for name, figures in arms.items():
        step = steps_to_reach(figures["curve"], level, window)
        steps[name] = {"step": step, "ratio": math.inf if step is None else step / scratch["steps"]}
    return {"level": level, "scratch_steps": scratch["steps"], "window": window, "arms": steps}


def convergence_targets(dataset: str, arms: dict[str, dict], reach: dict) -> list[dict]:
    """The two targets; the dataset's own one is `binding`, the other is information.

    `measured_ratio` is inf (`Infinity` in the JSON) when the carry-on never reaches
    scratch's final loss; `note` says so."""
    nll_ratio = arms["carry_on"]["nll"] / arms["lora"]["nll"]
    step = reach["arms"]["carry_on"]["step"]
    step_ratio = reach["arms"]["carry_on"]["ratio"]
    if step is None:
        note = (f"the carry-on never reached scratch's final loss {reach['level']:.4f} "
                f"in {arms['carry_on']['steps']} steps: ratio inf")
    else:
        note = f"step {step} of the carry-on / {reach['scratch_steps']} step(s) of scratch"
    return [
        {"dataset": dataset, "target": "at equal training wall time, carry-on held-out NLL <= LoRA's",
         "measured_ratio": nll_ratio, "bound": 1.0, "holds": nll_ratio <= 1.0, "binding": dataset == "gsm8k",
         "note": f"carry-on {arms['carry_on']['nll']:.4f}, LoRA {arms['lora']['nll']:.4f}"},
        {"dataset": dataset,
         "target": "carry-on reaches scratch's final train loss in <= 1/5 of scratch's steps",
         "measured_ratio": step_ratio, "bound": STEP_RATIO_BOUND, "holds": step_ratio <= STEP_RATIO_BOUND,
         "binding": dataset == "pydoc", "note": note},
    ]


# --- the run ---------------------------------------------------------------------------------


def run_convergence(
    dataset: str,
    seconds: float,
    work_dir: str,
    *,
    quick: bool = False,
    train_rows: int | None = None,
    eval_rows: int | None = None,
    overrides: list[str] | None = None,
    window: int = SMOOTHING,
) -> dict:
    """Embed `dataset` once, train the four arms for `seconds` each, and score them.

    `train_rows` / `eval_rows` default to `QUICK` or `FULL`; `overrides` are the carry-on arm's
    `carry_on.*` / `train.*` keys (as `train_vs_lora.py --set`). The stored states and every
    arm's files go to `work_dir/dataset`. Returns the figures: `arms` (per arm `curve` as
    [step, seconds, loss] lists, `steps`, `tokens_per_s`, `nll`, `parameters`, `peak_rss_gb`),
    `base` (the untrained base's held-out NLL), `embed`, `reach_scratch` (`reach_scratch`),
    `targets` (`convergence_targets`), `stage_seconds` (each child process's wall time, start-up
    and scoring included) and the settings.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset '{dataset}' is not one of {sorted(DATASETS)}")
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    overrides = list(overrides or [])
    carry_on_sections(overrides)  # a bad key fails here, before any work
    default_train, default_eval = (QUICK if quick else FULL)[dataset]
    train_rows = default_train if train_rows is None else train_rows
    eval_rows = default_eval if eval_rows is None else eval_rows
    directory = Path(work_dir) / dataset
    directory.mkdir(parents=True, exist_ok=True)

    started = time.time()
    load = {"before": os.getloadavg()[0]}  # 1-minute load averages: was the machine quiet?
    embed = _in_child(run_embed, str(directory), eval_rows, train_rows, dataset)
    stage_seconds = {"embed": time.time() - started}  # each child's wall time, start-up included
    arms = {}
    for name in ARMS:
        load[name] = os.getloadavg()[0]
        stage_started = time.time()
        if name == "carry_on":
            arms[name] = _in_child(run_carryon, str(directory), seconds, overrides, curve=True)
        else:
            function = {"lora": run_lora, "last_block": run_last_block, "scratch": run_scratch}[name]
            arms[name] = _in_child(function, str(directory), seconds, curve=True)
        arms[name]["curve"] = [list(point) for point in arms[name]["curve"]]
        stage_seconds[name] = time.time() - stage_started
    load["after"] = os.getloadavg()[0]
    reach = reach_scratch(arms, window)
    return {"dataset": dataset, "quick": quick, "seconds_per_arm": seconds, "train_rows": embed["rows"],
            "eval_rows": eval_rows, "eval_tokens": embed["eval_tokens"], "batch": BATCH,
            "max_length": MAX_LENGTH, "cpu_count": os.cpu_count(), "load_average": load,
            "wall_seconds": time.time() - started, "stage_seconds": stage_seconds, "embed": embed, "base": {"nll": embed["nll_base"]},
            "arms": arms, "reach_scratch": reach, "targets": convergence_targets(dataset, arms, reach)}


# --- plot and tables -------------------------------------------------------------------------


def plot_convergence(result: dict, path: str | Path, *, window: int = SMOOTHING):
    """One PNG, two panels: each arm's training loss (trailing mean over `window` steps; the raw
    losses faint behind) against the step (log scale where the arms' step counts differ by 5x
    and more) and against seconds of training. A dashed line marks scratch's final smoothed loss.

    Returns where the PNG is (`carryon_ray.reports._save_png`)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from carryon_ray.reports import _save_png

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    for index, (name, label) in enumerate(ARMS.items()):
        curve = result["arms"].get(name, {}).get("curve")
        if not curve:
            continue
        color = f"C{index}"
        steps, seconds, losses = ([point[i] for point in curve] for i in range(3))
        smoothed = smooth(losses, window)
        marker = "o" if len(curve) <= 30 else None  # a curve of a few steps (LoRA's) stays visible
        for axis, x in ((by_step, steps), (by_time, seconds)):
            axis.plot(x, losses, color=color, linewidth=0.6, alpha=0.25)
            axis.plot(x, smoothed, color=color, linewidth=1.5, marker=marker, markersize=3,
                      label=f"{label} ({len(curve)} steps)")
    level = result.get("reach_scratch", {}).get("level")
    for axis in (by_step, by_time):
        if level is not None:
            axis.axhline(level, color="gray", linestyle="--", linewidth=1, label="scratch's final loss")
        axis.set_ylabel(f"train loss, mean over {window} steps (nats)")
        axis.grid(alpha=0.3)
    counts = [len(figures["curve"]) for figures in result["arms"].values() if figures.get("curve")]
    if counts and max(counts) >= 20 and max(counts) >= 5 * min(counts):
        by_step.set_xscale("log")
        by_step.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 1, 10, 100
        by_step.xaxis.set_minor_formatter(NullFormatter())
    by_step.set_xlabel("step")
    by_time.set_xlabel("seconds of training")
    by_step.legend(fontsize=8)
    figure.suptitle(f"{result['dataset']}: {result['seconds_per_arm']:.0f} s per arm, same batches "
                    f"({result['batch']} x <= {result['max_length']} tokens)")
    return _save_png(figure, path)


def _reach_cell(reach: dict, name: str) -> str:
    step = reach["arms"][name]["step"]
    if step is None:
        return "never"
    return f"{step} ({reach['arms'][name]['ratio']:.2f} of scratch's)"


def markdown(result: dict) -> str:
    """One dataset's table: per arm its parameters, steps, tokens/s, held-out NLL and the step
    at which it reaches scratch's final smoothed training loss."""
    reach, load = result["reach_scratch"], result["load_average"]
    unit = "answer token" if result["dataset"] == "gsm8k" else "token"
    lines = [
        (f"**{result['dataset']}**{' (quick)' if result['quick'] else ''}: {result['seconds_per_arm']:.0f} s of "
         f"training per arm on {result['train_rows']} training sequences, same batches ({result['batch']} x <= "
         f"{result['max_length']} tokens), {result['cpu_count']} CPU cores (1-minute load "
         f"{load['before']:.1f} before, {load['after']:.1f} after); held-out NLL per {unit} on "
         f"{result['eval_tokens']:,} tokens; scratch's final train loss (mean over its last "
         f"{reach['window']} steps) {reach['level']:.4f} after {reach['scratch_steps']} step(s); "
         f"{result['wall_seconds']:.0f} s in all ("
         + ", ".join(f"{name} {value:.0f} s" for name, value in result.get("stage_seconds", {}).items())
         + ")."),
        "",
        "| arm | trainable params | steps | tokens/s | held-out NLL | steps to reach scratch's final loss |",
        "|---|---|---|---|---|---|",
        f"| base (no training) | 0 | - | - | {result['base']['nll']:.4f} | - |",
    ]
    for name, label in ARMS.items():
        figures = result["arms"][name]
        lines.append(f"| {label} | {figures['parameters']:,} | {figures['steps']} | "
                     f"{figures['tokens_per_s']:,.0f} | {figures['nll']:.4f} | {_reach_cell(reach, name)} |")
    return "\n".join(lines)


def targets_markdown(targets: list[dict]) -> str:
    lines = ["| dataset | target | measured | bound | holds | |", "|---|---|---|---|---|---|"]
    for target in targets:
        kind = "" if target["binding"] else "(information)"
        lines.append(f"| {target['dataset']} | {target['target']} | {target['measured_ratio']:.3f} | "
                     f"{target['bound']} | {'yes' if target['holds'] else 'no'} | {kind} {target['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=[*DATASETS, "both"], default="both")
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"training wall time per arm (default {FULL_SECONDS:.0f}, {QUICK_SECONDS:.0f} with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rows, a few seconds per arm")
    parser.add_argument("--work-dir", default="/tmp/carryon-convergence")
    parser.add_argument("--json", dest="json_path", help="also write the figures as JSON")
    parser.add_argument("--plots", help="write DIR/convergence_<dataset>.png")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a carry_on.* or train.* key for the carry-on arm (as train_vs_lora.py --set)")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (QUICK_SECONDS if args.quick else FULL_SECONDS)
    carry_on_sections(args.overrides)  # a bad key fails before any work
    datasets = list(DATASETS) if args.dataset == "both" else [args.dataset]

    started = time.time()
    results, tables, targets = {}, [], []
    for dataset in datasets:
        result = run_convergence(dataset, seconds, args.work_dir, quick=args.quick, overrides=args.overrides)
        if args.plots:
            result["plot"] = str(plot_convergence(result, Path(args.plots) / f"convergence_{dataset}.png"))
        results[dataset] = result
        tables.append(markdown(result))
        targets += result["targets"]
    figures = {"seconds_per_arm": seconds, "quick": args.quick, "smoothing_steps": SMOOTHING,
               "wall_seconds": time.time() - started, "datasets": results, "targets": targets}
    text = "\n\n".join([*tables, targets_markdown(targets), f"Wall time: {figures['wall_seconds']:.0f} s."])
    publish(text, figures, args.json_path)
    return figures


if __name__ == "__main__":
    main()
