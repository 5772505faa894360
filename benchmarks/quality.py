"""The quality study (issue 13): the paper's figures on real models, each through the search stage
on one set of stored embeddings (configs/quality.yaml: SmolLM2-135M-Instruct, GSM8K 1,000
training / 319 held-out problems, layers -1, 0, 2, 8 and 20 stored at float16).

Parts (`--parts`, default all):
- bits:    Figure 5. Bridge bits 0, 2, 4, 8 for absmax, block_absmax (one scale per 64 values),
           blockwise8 and nf4; the residual and the carry-on inputs at the same bits, so each
           arm's train/serve skew (`val_skew`) is the NLL on the σ̂ residual minus the NLL on the
           stored float16 residual (the serving path's exact x, to float16 rounding).
- size:    Figure 4. Hidden 64..512 at 3 layers, layers 1..4 at hidden 256 (and the ~1 MB
           two-layer carry-on, hidden 64).
- sources: shortcut layer depth (none, 0, 2, 8) and a mixture of layers (-1 with 20).
- alpha:   the customization-strength curve: the demo-shaped carry-on's held-out NLL at α 0..2
           (training path, stored states).
- gsm8k:   GSM8K held out, 0-shot, greedy, through the serving engine with lm_eval
           (`carryon eval`): the base alone, the demo-shaped carry-on (exported and promoted by
           the evaluate stage) at α 1 and α 0, the ~1 MB carry-on; α = 0 must give the base's
           answers exactly.
- convergence: Figure 3 (benchmarks/convergence.py): the carry-on against the same trunk without
           the base, LoRA and full fine-tuning of the last block, for GSM8K and pydoc.

Every search arm is the command printed beside it (`carryon search configs/quality.yaml --set
...`); the study runs them in one process on one Ray node. Writes docs/quality.md's tables (printed
and in the JSON), PNG plots under `--plots`, and JSON with every target's `holds`.

    python benchmarks/quality.py --json reports/quality.json --plots docs/quality
    python benchmarks/quality.py --quick --json reports/quality_quick.json --plots /tmp/quality_quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import publish, write_json

CONFIG = ROOT / "configs" / "quality.yaml"
MIXTURE_CONFIG = ROOT / "configs" / "quality_mixture.yaml"
PARTS = ("bits", "size", "sources", "mixture", "alpha", "gsm8k", "convergence")
MIXTURE_ARMS = [[-1], [-1, "gemma.18"]]  # SmolLM2 alone; + Gemma-3-270M's final layer (18 layers)
# (codec, residual bits, input bits) arms of Figure 5; bits 0 is float16 for every codec, measured
# once. The last two are the demo's bridge (8-bit residual, 4-bit inputs) with each absmax.
BITS_ARMS = [("absmax", 0, 0), ("absmax", 8, 8), ("absmax", 4, 4), ("absmax", 2, 2), ("block_absmax", 8, 8),
             ("block_absmax", 4, 4), ("block_absmax", 2, 2), ("blockwise8", 8, 8), ("nf4", 4, 4),
             ("absmax", 8, 4), ("block_absmax", 8, 4)]
SIZE_ARMS = [(64, 3), (128, 3), (256, 3), (512, 3), (256, 1), (256, 2), (256, 4), (64, 2)]
SOURCE_ARMS = [[-1], [-1, 0], [-1, 2], [-1, 8], [-1, 20]]
ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
ONE_MB = (64, 2)  # hidden, layers: ~209k parameters, 0.84 MB in float32
# --quick: a smoke run of every part (small data, short trials, few arms): minutes, not a study.
QUICK = {
    "data": ["data.train_size=160", "data.eval_size=40", "data.max_length=256"],
    "mixture_data": ["data.train_size=40", "data.eval_size=10", "data.max_length=256"],
    "search": ["search.max_steps=16", "search.eval_every=8", "search.grace_period=2", "search.eval_rows=40"],
    "bits": [("absmax", 4, 4), ("block_absmax", 4, 4), ("nf4", 4, 4), ("absmax", 8, 4), ("block_absmax", 8, 4)],
    "size": [(64, 2), (256, 3)],
    "sources": [[-1], [-1, 0]],
    "alphas": [0.0, 1.0, 2.0],
    "gsm8k_limit": 4,
}


def _set(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"


def arm_command(overrides: list[str], config: Path = CONFIG) -> str:
    return f"carryon search configs/{config.name} " + " ".join(f"--set '{item}'" for item in overrides)


class Study:
    """One Ray node, one embedding of a study config, one search per arm."""

    def __init__(self, run_dir: Path, quick: bool, config: Path = CONFIG, data: list[str] | None = None) -> None:
        self.run_dir = run_dir
        self.quick = quick
        self.path = config
        quick_data = QUICK["data"] if data is None else data
        self.base_overrides = [f"run_dir={run_dir}", *(quick_data + QUICK["search"] if quick else [])]
        self.embedded = None
        self.trials: dict[str, dict] = {}  # arms already run, by their resolved search settings

    def config(self, overrides: list[str] = ()):
        from carryon_ray.config import load_config

        return load_config(self.path, [*self.base_overrides, *overrides])

    def embed(self) -> dict:
        from carryon_ray.pipeline import Pipeline
        from carryon_ray.stages.embed import read_embeddings

        config = self.config()
        started = time.time()
        summary = Pipeline(config).run(["embed"])
        self.embedded = read_embeddings(config.run_dir, config.model)
        return {**summary["embed"], "seconds": time.time() - started}

    def search(self, overrides: list[str]) -> dict:
        """One arm: the search stage over the stored embeddings; its single trial's row. An arm
        that resolves to settings already run (the demo's shape is in the bits, size and sources
        figures) reuses that trial instead of training the same carry-on again."""
        from carryon_ray.stages.search import search_stage

        config = self.config(overrides)
        key = json.dumps([config.search.model_dump(mode="json"), config.train.model_dump(mode="json")], sort_keys=True)
        if key in self.trials:
            return {**self.trials[key], "command": arm_command(overrides, self.path), "reused": True}
        started = time.time()
        result = search_stage(config.search, config.run_dir, self.embedded, train=config.train,
                              carry_on=config.carry_on, name=config.name)
        (trial,) = result.trials
        row = {**trial, "seconds": time.time() - started, "checkpoint": result.checkpoint,
               "command": arm_command(overrides, self.path)}
        self.trials[key] = row
        return row


# --- parts ------------------------------------------------------------------------------------


def bits_arms(text: str) -> list[tuple[str, int, int]]:
    """`--bits absmax:8:4,nf4:4:4` -> [(codec, residual bits, input bits), ...]."""
    from carryon_ray.config import CODECS

    arms = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        codec, *bits = item.split(":")
        if codec not in CODECS or len(bits) != 2 or not all(bit.isdigit() for bit in bits):
            raise argparse.ArgumentTypeError(
                f"{item!r} is not codec:residual_bits:input_bits with a codec of {', '.join(CODECS)}"
            )
        arms.append((codec, int(bits[0]), int(bits[1])))
    return arms


def run_bits(study: Study, arms: list[tuple[str, int, int]] | None = None) -> list[dict]:
    arms = arms or (QUICK["bits"] if study.quick else BITS_ARMS)
    rows = []
    for codec, residual, inputs in arms:
        row = study.search([_set("search.codec", [codec]), _set("search.input_bits", [inputs]),
                            _set("search.residual_bits", [residual])])
        rows.append(row)
        print(f"bits: {codec} {residual}/{inputs}: NLL {row['val_nll_merged']:.4f}, skew {_fmt(row['val_skew'])}",
              flush=True)
    return rows


def run_size(study: Study) -> list[dict]:
    rows = []
    for hidden, layers in QUICK["size"] if study.quick else SIZE_ARMS:
        row = study.search([_set("search.hidden_size", [hidden]), _set("search.num_layers", [layers])])
        rows.append(row)
        print(f"size: h={hidden} x {layers}: NLL {row['val_nll_merged']:.4f}", flush=True)
    return rows


def run_sources(study: Study) -> list[dict]:
    rows = []
    for sources in QUICK["sources"] if study.quick else SOURCE_ARMS:
        row = study.search([_set("search.sources", [sources])])
        rows.append(row)
        print(f"sources {sources}: NLL {row['val_nll_merged']:.4f}", flush=True)
    return rows


def run_mixture(run_dir: Path, quick: bool) -> dict:
    """SmolLM2 alone against SmolLM2 + Gemma-3-270M, on one embedding through both bases."""
    study = Study(run_dir, quick, MIXTURE_CONFIG, QUICK["mixture_data"])
    embed = study.embed()
    print(f"mixture: embedded {embed.get('rows')} rows through both bases in {embed['seconds']:.0f} s", flush=True)
    rows = []
    for sources in MIXTURE_ARMS:
        row = study.search([_set("search.sources", [sources])])
        rows.append(row)
        print(f"mixture {sources}: NLL {row['val_nll_merged']:.4f}", flush=True)
    return {"embed": embed, "arms": rows}


def run_alpha(study: Study, checkpoint: str) -> list[dict]:
    """Held-out NLL of one trained carry-on at each α (training path, the stored states)."""
    import torch

    from carryon_ray.loop import CheckpointInfo, table_batches
    from carryon_ray.quantized_head import load_head
    from carryon_ray.stages.search import _read_tables
    from carryon_ray.training import evaluate

    config = study.config()
    info = CheckpointInfo.read(checkpoint)
    carry_on = info.load()
    head = load_head(Path(config.run_dir) / "head", config.train.head_dtype)
    table = _read_tables(study.embedded.shard_paths("eval"))
    torch.set_num_threads(config.train.torch_threads)
    rows = []
    for alpha in QUICK["alphas"] if study.quick else ALPHAS:
        scores = evaluate(carry_on, head, table_batches(info.layout, table, 8, seed=None), alpha)
        rows.append({"alpha": alpha, "nll": scores["nll_merged"], "nll_base": scores["nll_base"],
                     "tokens": scores["tokens"]})
        print(f"alpha {alpha}: NLL {scores['nll_merged']:.4f} (base {scores['nll_base']:.4f})", flush=True)
    return rows


def run_gsm8k(study: Study, limit: int | None, same_answers: int) -> dict:
    """lm_eval on GSM8K held out for the base alone and for the demo-shaped and ~1 MB carry-ons
    (each exported and promoted by the evaluate stage), batched as the server batches; then
    α = 0 against the base, answer by answer, one request at a time (`same_answers` problems)."""
    from carryon_ray.harness_run import HarnessRequest, run_harness
    from carryon_ray.pipeline import Pipeline

    models = {"demo-shaped (h=256 x 3)": ("quality-demo", []),
              "~1 MB (h=64 x 2)": ("quality-1mb", [_set("search.hidden_size", [ONE_MB[0]]),
                                                    _set("search.num_layers", [ONE_MB[1]])])}
    out: dict = {"limit": limit, "models": {}}
    config = study.config()
    report, _ = run_harness(config, HarnessRequest(model="base", limit=limit))
    out["base"] = _harness_row(report["models"][0])
    samples = Path(config.run_dir) / "reports" / "lm_eval_samples.jsonl"
    prompts = list(dict.fromkeys(json.loads(line)["prompt"] for line in samples.read_text().splitlines()))
    for label, (name, overrides) in models.items():
        config = study.config([*overrides, f"name={name}"])
        summary = Pipeline(config).run(["search", "export", "evaluate"])
        report, _ = run_harness(config, HarnessRequest(model=f"{name}-best", limit=limit, with_base=False))
        out["models"][label] = {"eval": summary.get("eval"), "promotion": summary.get("promotion"),
                                "carry_on": _harness_row(report["models"][0]), "command": arm_command(overrides)}
    name = models["demo-shaped (h=256 x 3)"][0]
    out["alpha0"] = alpha0_answers(study.config([f"name={name}"]), f"{name}-best", prompts[:same_answers])
    return out


def alpha0_answers(config, model: str, prompts: list[str]) -> dict:
    """Greedy answers (up to 256 tokens) of the base alone and of the carry-on at α = 0, one
    request at a time: the same tokens for every prompt?"""
    from carryon_ray.harness_run import HarnessRequest, build_models
    from carryon_ray.merged import MergedModel, SamplingParams

    rows, bases = build_models(config, HarnessRequest(model=model, with_base=False))
    merged, base = rows[0][1], MergedModel(bases[0])
    params = SamplingParams(max_new_tokens=256, stop_token_ids=(bases[0].tokenizer.eos_token_id,))
    same = 0
    for prompt in prompts:
        ids = bases[0].tokenizer(prompt)["input_ids"]
        same += merged.generate(ids, params, alpha=0.0) == base.generate(ids, params)
    return {"prompts": len(prompts), "same": same}


def _harness_row(row: dict) -> dict:
    task = row["results"].get("gsm8k_heldout", {})
    pick = {key.split(",")[1]: value for key, value in task.items() if key.startswith("exact_match,")}
    return {"flexible": pick.get("flexible-extract"), "strict": pick.get("strict-match"),
            "answers": row["answers"].get("gsm8k_heldout"), "seconds": row["seconds"]}


def run_convergence(quick: bool, seconds: float, work_dir: Path, plots: Path) -> dict:
    from benchmarks import convergence

    out = {}
    for dataset in ("gsm8k", "pydoc"):
        result = convergence.run_convergence(dataset, seconds, str(work_dir / f"convergence-{dataset}"), quick=quick)
        convergence.plot_convergence(result, plots / f"convergence_{dataset}.png")
        out[dataset] = result
    return out


# --- plots ------------------------------------------------------------------------------------


def _figure(*shape, width=10.0):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt.subplots(*shape, figsize=(width, 4.0))


def plot_bits(rows: list[dict], path: Path) -> None:
    from carryon_ray.reports import _save_png

    figure, (left, right) = _figure(1, 2)
    diagonal = [row for row in rows if row["residual_bits"] == row["input_bits"]]
    for codec in dict.fromkeys(row["codec"] for row in diagonal):
        arms = sorted((row for row in diagonal if row["codec"] == codec), key=lambda row: row["input_bits"] or 16)
        xs = [row["input_bits"] or 16 for row in arms]
        left.plot(xs, [row["val_nll_merged"] for row in arms], "o-", label=codec)
        right.plot(xs, [row["val_skew"] or 0.0 for row in arms], "o-", label=codec)
    for axes, title in ((left, "held-out NLL (training path)"), (right, "train/serve skew (nats)")):
        axes.set_xscale("log", base=2)
        axes.set_xticks([2, 4, 8, 16], ["2", "4", "8", "fp16"])
        axes.set_xlabel("bridge bits (residual and inputs)")
        axes.set_title(title)
        axes.legend()
    _save_png(figure, path)


def plot_size(rows: list[dict], path: Path) -> None:
    from carryon_ray.reports import _save_png

    figure, (left, right) = _figure(1, 2)
    for row in rows:
        label = f"h={row['hidden_size']} x {row['num_layers']}"
        left.plot(*zip(*row["curve"]), "o-", label=label)
        right.scatter(row["parameters"], row["val_nll_merged"])
        right.annotate(label, (row["parameters"], row["val_nll_merged"]), fontsize=8)
    left.set(xlabel="step", ylabel="held-out NLL", title="validation curve per size")
    left.legend(fontsize=7)
    right.set(xscale="log", xlabel="carry-on parameters", ylabel="held-out NLL", title="size vs NLL")
    _save_png(figure, path)


def plot_sources(rows: list[dict], path: Path) -> None:
    from carryon_ray.reports import _save_png

    figure, axes = _figure(1, 1, width=6.0)
    labels = [_sources_name(row["sources"]) for row in rows]
    axes.bar(labels, [row["val_nll_merged"] for row in rows])
    low = min(row["val_nll_merged"] for row in rows)
    axes.set_ylim(low - 0.05, max(row["val_nll_merged"] for row in rows) + 0.02)
    axes.set(ylabel="held-out NLL", title="shortcut depth and mixture of layers")
    _save_png(figure, path)


def plot_alpha(rows: list[dict], path: Path) -> None:
    from carryon_ray.reports import _save_png

    figure, axes = _figure(1, 1, width=6.0)
    axes.plot([row["alpha"] for row in rows], [row["nll"] for row in rows], "o-", label="carry-on")
    axes.axhline(rows[0]["nll_base"], color="grey", linestyle="--", label="base")
    axes.set(xlabel="α (customization strength)", ylabel="held-out NLL", title="α curve")
    axes.legend()
    _save_png(figure, path)


def _sources_name(sources: str) -> str:
    layers = sources.split(",")
    names = {"-1": "final"}
    return "final only" if layers == ["-1"] else " + ".join(names.get(x, x if "." in x else f"layer {x}") for x in layers)


def _sources_table(rows: list[dict], *, commands: bool = False) -> list[str]:
    """Arms that differ by their sources: held-out NLL against the base's (and each command)."""
    extra = " command |" if commands else ""
    lines = ["| sources | held-out NLL | base NLL | s |" + extra, "|---|---|---|---|" + ("---|" if commands else "")]
    lines += [f"| {_sources_name(r['sources'])} | {r['val_nll_merged']:.4f} | {r['val_nll_base']:.4f} | "
              f"{r['seconds']:.0f} |" + (f" `{r['command']}` |" if commands else "") for r in rows]
    return lines


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# --- report -----------------------------------------------------------------------------------


def targets(results: dict) -> list[dict]:
    out = []
    gsm8k = results.get("gsm8k")
    if gsm8k:
        base = gsm8k["base"]
        carried = gsm8k["models"]["demo-shaped (h=256 x 3)"]["carry_on"]
        documents = (carried["answers"] or {}).get("documents") or 0
        runaway = (carried["answers"] or {}).get("runaway", 0) / documents if documents else None
        zero = gsm8k["alpha0"]
        out += [
            {"target": "demo carry-on flexible match >= base's", "measured": carried["flexible"]["value"],
             "bound": base["flexible"]["value"], "holds": carried["flexible"]["value"] >= base["flexible"]["value"]},
            {"target": "demo carry-on strict match >= 2.5%", "measured": carried["strict"]["value"], "bound": 0.025,
             "holds": carried["strict"]["value"] >= 0.025},
            {"target": "demo carry-on runaway answers <= 2%", "measured": runaway, "bound": 0.02,
             "holds": runaway is not None and runaway <= 0.02},
            {"target": "alpha = 0 gives the base's answers exactly (prompts with the same tokens)",
             "measured": f"{zero['same']} / {zero['prompts']}", "bound": "all",
             "holds": zero["prompts"] > 0 and zero["same"] == zero["prompts"]},
        ]
    convergence = results.get("convergence")
    if convergence:
        for dataset in ("gsm8k", "pydoc"):
            for target in convergence.get(dataset, {}).get("targets", []):
                kind = "" if target["binding"] else " (information)"
                out.append({"target": f"{dataset}: {target['target']}{kind}",
                            "measured": f"{target['measured_ratio']:.3f} ({target['note']})",
                            "bound": target["bound"], "holds": target["holds"]})
    mixture = results.get("mixture")
    if mixture:
        alone, mixed = (arm["val_nll_merged"] for arm in mixture["arms"])
        out.append({"target": "mixture (SmolLM2 + Gemma-3-270M) held-out NLL < SmolLM2 alone", "measured": mixed,
                    "bound": alone, "holds": mixed < alone})
    return out


def tables(results: dict) -> str:
    lines = []
    if "embed" in results:
        embed = results["embed"]
        lines += [f"Embedding: {embed.get('rows')} rows, {embed['seconds']:.0f} s (configs/quality.yaml).", ""]
    if results.get("bits"):
        lines += ["### Figure 5: bridge bits", "",
                  "| codec | residual bits | input bits | held-out NLL | skew (nats) | s | command |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['codec']} | {r['residual_bits'] or 'fp16'} | {r['input_bits'] or 'fp16'} | "
                  f"{r['val_nll_merged']:.4f} | {_fmt(r['val_skew'])} | {r['seconds']:.0f} | `{r['command']}` |"
                  for r in results["bits"]]
        lines.append("")
    if results.get("size"):
        lines += ["### Figure 4: carry-on size", "", "| hidden | layers | parameters | held-out NLL | s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['hidden_size']} | {r['num_layers']} | {r['parameters']:,} | {r['val_nll_merged']:.4f} | "
                  f"{r['seconds']:.0f} |" for r in results["size"]]
        lines.append("")
    if results.get("sources"):
        lines += ["### Shortcut depth and mixture of layers", "", *_sources_table(results["sources"])]
        lines.append("")
    if results.get("mixture"):
        mixture = results["mixture"]
        lines += ["### Mixture of LLMs (configs/quality_mixture.yaml)", "",
                  (f"Embedded {mixture['embed'].get('rows')} problems through both bases in "
                  f"{mixture['embed']['seconds']:.0f} s."), "",
                  *_sources_table(mixture["arms"], commands=True)]
        lines.append("")
    if results.get("alpha"):
        lines += ["### α curve (demo-shaped carry-on, held-out NLL)", "", "| α | NLL |", "|---|---|"]
        lines += [f"| {r['alpha']:g} | {r['nll']:.4f} |" for r in results["alpha"]]
        lines += [f"| base | {results['alpha'][0]['nll_base']:.4f} |", ""]
    if results.get("gsm8k"):
        gsm8k = results["gsm8k"]
        lines += [f"### GSM8K held out (limit {gsm8k['limit'] or 'none'}), 0-shot, greedy, lm_eval", "",
                  "| model | flexible | strict | with `#### N` | runaway | s |", "|---|---|---|---|---|---|"]
        rows = [("base", gsm8k["base"])]
        rows += [(label, entry["carry_on"]) for label, entry in gsm8k["models"].items()]
        for label, row in rows:
            answers = row["answers"] or {}
            lines.append(f"| {label} | {_pct(row['flexible'])} | {_pct(row['strict'])} | "
                         f"{answers.get('with_hash_answer', '-')} / {answers.get('documents', '-')} | "
                         f"{answers.get('runaway', '-')} | {row['seconds']:.0f} |")
        zero = gsm8k["alpha0"]
        lines += ["", (f"α = 0 against the base, one request at a time, greedy up to 256 tokens: "
                      f"{zero['same']} of {zero['prompts']} answers token for token the same."), ""]
    lines += ["### Targets", "", "| target | measured | bound | holds |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['bound']} | {'yes' if t['holds'] else 'no'} |"
              for t in results["targets"]]
    return "\n".join(lines)


def _pct(value: dict | None) -> str:
    if not value:
        return "-"
    stderr = value.get("stderr")
    return f"{100 * value['value']:.2f}%" + ("" if stderr is None else f" ± {100 * stderr:.2f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of every part (minutes; not a study)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--run-dir", help="where the study's embeddings and trials go (default runs/quality[-quick])")
    parser.add_argument("--bits", type=bits_arms, help="only these bits arms, codec:residual_bits:input_bits, "
                        "comma-separated (e.g. absmax:8:4,block_absmax:8:4; default every Figure 5 arm)")
    parser.add_argument("--gsm8k-limit", type=int, help="held-out problems lm_eval scores (default: all 319)")
    parser.add_argument("--same-answers", type=int, default=40,
                        help="problems answered one at a time by the base and by α = 0 to compare")
    parser.add_argument("--convergence-seconds", type=float, default=120.0, help="training wall time per arm")
    parser.add_argument("--json", dest="json_path", help="write the figures as JSON")
    parser.add_argument("--plots", default="docs/quality", help="folder for the PNG plots")
    args = parser.parse_args(argv)
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    run_dir = Path(args.run_dir or ROOT / "runs" / ("quality-quick" if args.quick else "quality")).resolve()
    plots = Path(args.plots)
    plots.mkdir(parents=True, exist_ok=True)
    started = time.time()
    study = Study(run_dir, args.quick)
    results: dict = {"quick": args.quick, "parts": parts, "cpu_count": os.cpu_count(),
                     "load_before": os.getloadavg()[0]}
    if set(parts) - {"convergence", "mixture"}:
        results["embed"] = study.embed()
    if "bits" in parts:
        results["bits"] = run_bits(study, args.bits)
        plot_bits(results["bits"], plots / "bits.png")
    if "size" in parts:
        results["size"] = run_size(study)
        plot_size(results["size"], plots / "size.png")
    if "sources" in parts:
        results["sources"] = run_sources(study)
        plot_sources(results["sources"], plots / "sources.png")
    if "mixture" in parts:
        results["mixture"] = run_mixture(run_dir.with_name(run_dir.name + "-mixture"), args.quick)
    if "alpha" in parts:
        demo = next((row for row in results.get("size", []) if (row["hidden_size"], row["num_layers"]) == (256, 3)),
                    None) or study.search([])
        results["alpha"] = run_alpha(study, demo["checkpoint"])
        plot_alpha(results["alpha"], plots / "alpha.png")
    if "gsm8k" in parts:
        limit = args.gsm8k_limit or (QUICK["gsm8k_limit"] if args.quick else None)
        results["gsm8k"] = run_gsm8k(study, limit, 3 if args.quick else args.same_answers)
    if "convergence" in parts:
        seconds = 10.0 if args.quick else args.convergence_seconds
        results["convergence"] = run_convergence(args.quick, seconds, run_dir, plots)
    results["seconds"] = time.time() - started
    results["load_after"] = os.getloadavg()[0]
    if args.json_path:  # the measurements first: a table that fails to format loses nothing
        write_json(results, args.json_path)
    results["targets"] = targets(results)
    publish(tables(results) + f"\n\nstudy wall time {results['seconds'] / 60:.1f} min", results, args.json_path)
    return results


if __name__ == "__main__":
    main()
