"""Carry-on training vs PEFT LoRA on SmolLM2-135M-Instruct, GSM8K (1,000 training problems).

One run, one machine, the same batches (8 problems, padded to the longest, at most 256 tokens,
each epoch a seeded permutation as `carryon_ray.loop.table_batches` draws them) for every
method. Each method trains for the same wall time in its own fresh process, so each peak RSS is
that method's alone:

- embed:   the frozen base runs forward once over the training problems; the final hidden
           state is stored at 8 bits (the residual) and viewed at 4 bits (the carry-on input),
           as the pipeline does. Its cost is reported on its own line.
- carry-on: the project's training loop (`TrainLoop`, as the train stage and every search trial
           run it) with the demo config's `carry_on` and `train` sections (h=256, 3 layers) and
           the keys in CARRY_ON_OVERRIDES, on the stored states against the frozen head; the
           base is never loaded in this process. `--set train.KEY=VALUE` changes a key.
- LoRA:    PEFT LoRA r=8 on q_proj/v_proj, float32, the whole base forward and backward.
- scratch: the same carry-on trunk trained from scratch without the base (its own token
           embedding, tied to its output layer): the paper's Figure 3 comparison.

The LoRA and scratch arms schedule the learning rate by wall time (warm-up, then cosine to 10%
at the end of the budget); TrainLoop schedules by steps, so the carry-on's `total_steps` is set
when its warm-up ends, from the pace of the warm-up steps (see `run_carryon`).

Held-out NLL per answer token on the first `--eval-problems` of the 319 held-out problems:
the base, the carry-on through the serving path (exact x, exact head, 4-bit inputs), LoRA, and
scratch. The carry-on's RSS after each setup step is in the JSON (`carry_on.rss_gb`).

    python benchmarks/train_vs_lora.py --seconds 90 --json reports/train_vs_lora.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import publish

BATCH, MAX_LENGTH = 8, 256
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
# The carry-on arm runs the demo config's `carry_on` and `train` sections with these keys set
# (as `carryon run --set` sets them): the benchmark's batches and optimizer, and the head held
# 8-bit block-wise quantized (30 MB instead of 113 MB in float32), whose vocabulary-blocked loss
# never builds a (rows x 49,152) logit tensor; a loss chunk as large as a batch's target rows
# (8 x 256) dequantizes the head's blocks once per pass and step, not once per chunk.
CARRY_ON_OVERRIDES = [f"train.batch_size={BATCH}", "train.optimizer=adamw", "train.head_dtype=blockwise8",
                      f"train.loss_chunk={BATCH * MAX_LENGTH}"]
LORA_ANCHOR = {"tokens_per_s": 230.0, "peak_rss_gb": 5.3}  # measured before, fp32, batch 8x256
# The datasets `run_embed` can store (`data` sections, as keyword arguments of `DataSpec`, so this
# module imports nothing of the project until a method runs): GSM8K with the loss on the answer,
# and the standard library's pydoc topics packed into MAX_LENGTH chunks with the loss on every
# token (configs/pydoc_cpt.yaml's split: 70 topics train, the last 9 are held out). The split is
# fixed; `run_embed` takes the first `train_problems` / `eval_problems` rows of each side.
DATASETS = {
    "gsm8k": {"dataset": "gsm8k", "train_size": 1000, "eval_size": 319},
    "pydoc": {"dataset": "pydoc", "loss_on": "all", "train_size": 70, "eval_size": 9},
}


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _threads() -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)


def _examples(tokenizer, dataset: str = "gsm8k"):
    """(training sequences, held-out sequences) of one of `DATASETS`, built by the project's
    own data functions (`build_examples`), as the embed stage builds them."""
    from carryon_ray.config import DataSpec
    from carryon_ray.data import build_examples

    if dataset not in DATASETS:
        raise ValueError(f"dataset '{dataset}' is not one of {sorted(DATASETS)}")
    train, held_out, _ = build_examples(DataSpec(**DATASETS[dataset], max_length=MAX_LENGTH), tokenizer)
    return train, held_out


def _batches(count: int, seed: int = 0, epochs: int = 20) -> list[list[int]]:
    """The same batches for every method: those the carry-on's `table_batches` draws (each
    epoch a permutation seeded by `epoch_seed`), as row indices for the arms that read rows."""
    import torch

    from carryon_ray.loop import epoch_seed

    order = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        indices = torch.randperm(count, generator=generator).tolist()
        order += [indices[i : i + BATCH] for i in range(0, count, BATCH)]
    return order


def _pad(rows, value=0):
    import torch

    longest = max(len(r) for r in rows)
    out = torch.full((len(rows), longest), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def _lr(elapsed: float, budget: float, step: int, base_lr: float, warmup: int = 20) -> float:
    """Warm-up by steps, then cosine over the wall-time budget to 10%."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, elapsed / budget)
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train_for(seconds: float, optimizer, parameters, batches: list[list[int]], batch_loss,
               curve: list | None = None) -> tuple[int, int, float]:
    """Train until `seconds` have passed: (steps, tokens, elapsed seconds). `batch_loss(indices)`
    gives (summed NLL, target tokens, sequence tokens) of one batch; the step is AdamW on the
    mean NLL with the warm-up + cosine rate and clipping at 1. With `curve`, each step appends
    (step, seconds since training started, mean NLL of its batch) to it."""
    import torch

    tokens = steps = 0
    started = time.time()
    while time.time() - started < seconds:
        for group in optimizer.param_groups:
            group["lr"] = _lr(time.time() - started, seconds, steps, 1e-3)
        total, count, seen = batch_loss(batches[steps % len(batches)])
        loss = total / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        tokens += seen
        steps += 1
        if curve is not None:
            curve.append((steps, time.time() - started, float(loss.detach())))
    return steps, tokens, time.time() - started


def _held_out_nll(work_dir: Path, nll_of) -> float:
    """Mean NLL per target token (answer tokens, or every token after the first for text) over
    the held-out sequences; `nll_of(ids, mask)` for (B, T) ids and target mask.

    Scored BATCH sequences at a time, sorted by length and padded on the right (id 0, no
    target): under causal attention a pad only follows a sequence's tokens, so no real
    position sees one, and a (B, T) forward is several times faster than B forwards of one."""
    import torch

    examples = sorted(_eval_examples(work_dir), key=lambda example: len(example.input_ids))
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), BATCH):
            group = examples[start : start + BATCH]
            ids = _pad([example.input_ids for example in group])
            total, n = nll_of(ids, _pad([example.target_mask for example in group]).bool())
            nll, count = nll + float(total), count + n
    return nll / count


# --- embed: the base forward once, stored compressed -------------------------------------


def run_embed(work: str, eval_problems: int | None, train_problems: int | None, dataset: str = "gsm8k") -> dict:
    """The base forward once over the first `train_problems` training and `eval_problems`
    held-out sequences of `dataset` (one of `DATASETS`; None: all of that side): the training
    table (`train.parquet`), the held-out final states and examples, the head, and the base's
    held-out NLL (`embed.json`, also returned)."""
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import save_file

    from carryon_ray.bases import FrozenBase
    from carryon_ray.config import BaseSpec
    from carryon_ray.records import LayerRef, Layout, encode_rows, to_table

    _threads()
    work_dir = Path(work)
    base = FrozenBase(BaseSpec(name="smollm2", path="packaged:smollm2"), device="cpu")
    train, held_out = _examples(base.tokenizer, dataset)
    train, held_out = train[:train_problems], held_out[:eval_problems]
    base.output_head().save(work_dir / "head")
    final = LayerRef("smollm2", base.num_layers, base.hidden_size)
    layout = Layout.build(codec="absmax", residual=(final, 8), sources=[(final, 4)], bases=[base.identity()])

    def forward(examples):
        states = []
        ordered = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        for start in range(0, len(ordered), BATCH):
            group = [examples[i] for i in ordered[start : start + BATCH]]
            ids = _pad([e.input_ids for e in group])
            mask = _pad([[1] * len(e.input_ids) for e in group])
            hidden, _ = base.forward(ids, [-1], attention_mask=mask)
            final_states = hidden[base.num_layers].float()
            states += [(index, final_states[row, : len(e.input_ids)])
                       for index, row, e in zip(ordered[start : start + BATCH], range(len(group)), group, strict=True)]
        return [state for _, state in sorted(states, key=lambda pair: pair[0])]

    started = time.time()
    train_states = forward(train)
    tokens = sum(len(e.input_ids) for e in train)
    columns = encode_rows(layout, ids=[e.id for e in train], input_ids=[e.input_ids for e in train],
                          target_masks=[e.target_mask for e in train], hidden={final.key: train_states})
    # Row groups of 64 rows, as the embed stage's shards are small: a reader then decompresses
    # a few MB at a time instead of one 100 MB column chunk.
    pq.write_table(to_table(layout, columns), work_dir / "train.parquet", row_group_size=64)
    embed_seconds = time.time() - started
    eval_states = forward(held_out)
    save_file({f"x{i}": state.contiguous() for i, state in enumerate(eval_states)}, work_dir / "eval_states.safetensors")
    (work_dir / "eval.json").write_text(json.dumps([vars(e) for e in held_out]))
    head = base.output_head()
    nll, count = 0.0, 0
    for example, state in zip(held_out, eval_states, strict=True):
        positions, targets = _targets(example)
        with torch.no_grad():
            nll += float(torch.nn.functional.cross_entropy(head(state[positions]), targets, reduction="sum"))
        count += len(targets)
    result = {"rows": len(train), "tokens": tokens, "seconds": embed_seconds, "tokens_per_s": tokens / embed_seconds,
              "bytes_per_token": (work_dir / "train.parquet").stat().st_size / tokens,
              "float16_bytes_per_token": 2 * base.hidden_size, "nll_base": nll / count, "eval_tokens": count,
              "peak_rss_gb": _peak_rss_gb(), "vocab_size": _vocab_size(work_dir)}
    (work_dir / "embed.json").write_text(json.dumps(result))
    return result


def _targets(example):
    """Positions predicting a target token (t-1 for target t), and those targets."""
    import torch

    mask = example.target_mask
    positions = [t - 1 for t in range(1, len(mask)) if mask[t]]
    return torch.tensor(positions, dtype=torch.long), torch.tensor([example.input_ids[p + 1] for p in positions])


def _eval_examples(work_dir: Path):
    from carryon_ray.data import Example

    return [Example(**item) for item in json.loads((work_dir / "eval.json").read_text())]


# --- carry-on on stored states --------------------------------------------------------------


def _rss_gb() -> float:
    """This process's resident set now (ru_maxrss is the peak)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 2**20


def carry_on_sections(overrides: list[str]):
    """The carry-on arm's `carry_on` and `train` sections: the demo config with the
    benchmark's overrides, then the command line's (`section.key=value`, as `carryon run --set`)."""
    from carryon_ray.config import load_config

    for item in overrides:
        if not item.startswith(("carry_on.", "train.")):
            raise ValueError(f"--set {item}: the carry-on arm takes carry_on.* and train.* keys only")
    config = load_config(DEMO_CONFIG, [*CARRY_ON_OVERRIDES, *overrides])
    return config.carry_on, config.train


def run_carryon(work: str, seconds: float, overrides: list[str], *, curve: bool = False) -> dict:
    """The project's training loop (`TrainLoop`) on the stored states, for `seconds` of wall time;
    with `curve`, the result's "curve" lists (step, seconds since training started, train loss).

    Memory: the training table stays compressed in Arrow (one batch decoded at a time), the
    frozen head is held as `train.head_dtype` asks, and the process's RSS is recorded after
    each setup step, so the peak can be taken apart."""
    rss = {"interpreter": _rss_gb()}
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file

    from carryon_ray.bases import OutputHead
    from carryon_ray.carry_on import merge_hidden
    from carryon_ray.loop import TrainLoop, carry_on_config, table_batches
    from carryon_ray.quantized_head import load_head
    from carryon_ray.records import layout_of, serving_views
    from carryon_ray.training import chunked_nll

    rss["imports"] = _rss_gb()
    carry_on_spec, spec = carry_on_sections(overrides)
    torch.set_num_threads(spec.torch_threads or os.cpu_count() or 1)
    torch.manual_seed(spec.seed)
    work_dir = Path(work)
    # Compressed codes, ~580 bytes per token, read as one chunk per column on this thread:
    # `pq.read_table` goes through pyarrow.dataset (which imports pandas, ~50 MB) and its
    # threaded, pre-buffered read holds several row groups' buffers at once.
    table = pq.ParquetFile(work_dir / "train.parquet", pre_buffer=False).read(use_threads=False)
    pa.default_memory_pool().release_unused()  # Parquet's decompression buffers
    rss["table"] = _rss_gb()
    layout = layout_of(table.schema)
    head = load_head(work_dir / "head", spec.head_dtype)
    rss["head"] = _rss_gb()
    # TrainLoop schedules by steps (warm-up, then cosine to 10% at `total_steps`), the other
    # arms by wall time. The warm-up does not depend on `total_steps`, so it is set when the
    # warm-up ends: the steps that fit in the rest of the budget at the pace of the warm-up
    # steps after the first (which pays one-time costs). Until then only the budget ends the run.
    loop = TrainLoop(carry_on_config(carry_on_spec, layout), layout, head, spec,
                     alpha=carry_on_spec.alpha, total_steps=2**62, device="cpu")
    rss["loop"] = _rss_gb()
    planned_at = max(spec.warmup_steps, 2)
    first_step_seconds = 0.0
    losses: list[tuple[int, float, float]] = []

    def plan_schedule(record: dict, periodic: bool) -> bool:
        nonlocal first_step_seconds
        losses.append((record["step"], record["seconds"], record["loss"]))
        if record["step"] == 1:
            first_step_seconds = record["seconds"]
        if record["step"] == planned_at:
            per_step = (record["seconds"] - first_step_seconds) / (planned_at - 1)
            loop.total_steps = planned_at + max(1, round((seconds - record["seconds"]) / per_step))
        return False

    started = time.time()
    loop.run(lambda epoch: table_batches(layout, table, spec.batch_size, seed=spec.seed, epoch=epoch),
             on_record=plan_schedule, should_stop=lambda: time.time() - started >= seconds)
    elapsed = time.time() - started
    peak = _peak_rss_gb()
    rss["after_training"] = _rss_gb()
    steps, tokens, carry_on = loop.state.step, loop.state.tokens, loop.carry_on
    planned_steps = loop.total_steps if steps >= planned_at else None  # None: ended in the warm-up
    # Held-out NLL through the serving path, scored like the other arms: the exact x, the
    # exact head (the one the base NLL used), 4-bit inputs.
    exact_head = OutputHead.load(work_dir / "head")
    states = load_file(work_dir / "eval_states.safetensors")
    nll, count = 0.0, 0
    carry_on.float().eval()
    for i, example in enumerate(_eval_examples(work_dir)):
        exact = states[f"x{i}"].unsqueeze(0)  # (1, T, D): the serving path adds the exact x
        residual, sources = serving_views(layout, {layout.residual.key: exact})
        positions, targets = _targets(example)
        with torch.no_grad():
            delta, gate, _ = carry_on(sources)
            hidden = merge_hidden(residual, delta.float(), gate.float(), carry_on_spec.alpha)
            nll += float(chunked_nll(exact_head, hidden[0, positions], targets))
        count += len(targets)
    result = {"steps": steps, "planned_steps": planned_steps, "tokens": tokens, "seconds": elapsed,
              "tokens_per_s": tokens / elapsed, "peak_rss_gb": peak, "rss_gb": rss, "nll": nll / count,
              "parameters": carry_on.num_parameters(),
              "carry_on_config": carry_on_spec.model_dump(), "train_config": spec.model_dump(),
              "overrides": [*CARRY_ON_OVERRIDES, *overrides]}
    return {**result, "curve": losses} if curve else result


# --- the same trunk from scratch, without the base ------------------------------------------


def run_scratch(work: str, seconds: float, *, curve: bool = False) -> dict:
    """The carry-on trunk with its own tied token embedding and no base; with `curve`, the
    result's "curve" lists (step, seconds since training started, train loss)."""
    import pyarrow.parquet as pq
    import torch
    from torch import nn
    from torch.nn import functional as F

    from carryon_ray.carry_on import CarryOn, CarryOnConfig

    _threads()
    work_dir = Path(work)
    table = pq.read_table(work_dir / "train.parquet", columns=["input_ids", "target_mask"])
    rows = table.to_pydict()
    vocab = json.loads((work_dir / "embed.json").read_text())["vocab_size"]
    width = 256
    embedding = nn.Embedding(vocab, width)
    nn.init.normal_(embedding.weight, std=0.02)
    trunk = CarryOn(CarryOnConfig(input_dims=[width], output_dim=width, hidden_size=width, num_layers=3))
    nn.init.normal_(trunk.delta.weight, std=0.02)  # no base to start from: a normal init
    parameters = [*embedding.parameters(), *trunk.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.01)

    def nll_of(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        delta, gate, _ = trunk([embedding(ids)])
        hidden = gate * delta  # (B, T, h): no residual, no base
        predicting = torch.zeros_like(mask)
        predicting[:, :-1] = mask[:, 1:]
        targets = ids[:, 1:][mask[:, 1:]]
        logits = hidden[predicting] @ embedding.weight.T  # tied output layer
        return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())

    def batch_loss(indices: list[int]) -> tuple[torch.Tensor, int, int]:
        ids = _pad([rows["input_ids"][i] for i in indices])
        mask = _pad([rows["target_mask"][i] for i in indices]).bool()
        return (*nll_of(ids, mask), sum(len(rows["input_ids"][i]) for i in indices))

    losses: list[tuple[int, float, float]] = []
    steps, tokens, elapsed = _train_for(seconds, optimizer, parameters, _batches(table.num_rows), batch_loss, losses)
    peak = _peak_rss_gb()
    trunk.eval()
    nll = _held_out_nll(work_dir, nll_of)
    result = {"steps": steps, "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
              "peak_rss_gb": peak, "nll": nll, "parameters": sum(p.numel() for p in parameters)}
    return {**result, "curve": losses} if curve else result


# --- PEFT LoRA -------------------------------------------------------------------------------


def run_lora(work: str, seconds: float, *, curve: bool = False) -> dict:
    """PEFT LoRA r=8 on q_proj / v_proj of the float32 base (see `run_base_arm`)."""
    from peft import LoraConfig, get_peft_model

    def adapt(model):
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))
        return model, [p for p in model.parameters() if p.requires_grad]

    return run_base_arm(work, seconds, adapt, curve=curve)


def run_base_arm(work: str, seconds: float, adapt, *, curve: bool = False) -> dict:
    """Train part of the float32 base itself, the whole base forward and backward, for
    `seconds` on the benchmark's batches with the wall-time schedule (`_train_for`).

    `adapt(model)` -> (model to run, its trainable parameters): it freezes, wraps or unfreezes
    what the method trains. With `curve`, the result's "curve" lists (step, seconds since
    training started, train loss)."""
    import pyarrow.parquet as pq
    import torch
    from torch.nn import functional as F

    from carryon_ray.bases import FrozenBase
    from carryon_ray.config import BaseSpec

    _threads()
    work_dir = Path(work)
    base = FrozenBase(BaseSpec(name="smollm2", path="packaged:smollm2", dtype="float32"), device="cpu")
    model, trainable = adapt(base.model)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.01)
    table = pq.read_table(work_dir / "train.parquet", columns=["input_ids", "target_mask"])
    rows = table.to_pydict()

    def nll_of(ids: torch.Tensor, mask: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, int]:
        logits = model(input_ids=ids, attention_mask=attention).logits  # (B, T, V): the usual recipe
        predicting = torch.zeros_like(mask)
        predicting[:, :-1] = mask[:, 1:]
        targets = ids[:, 1:][mask[:, 1:]]
        return F.cross_entropy(logits[predicting].float(), targets, reduction="sum"), int(targets.numel())

    def batch_loss(indices: list[int]) -> tuple[torch.Tensor, int, int]:
        ids = _pad([rows["input_ids"][i] for i in indices])
        mask = _pad([rows["target_mask"][i] for i in indices]).bool()
        attention = _pad([[1] * len(rows["input_ids"][i]) for i in indices])
        return (*nll_of(ids, mask, attention), int(attention.sum()))

    model.train()
    losses: list[tuple[int, float, float]] = []
    steps, tokens, elapsed = _train_for(seconds, optimizer, trainable, _batches(table.num_rows), batch_loss, losses)
    peak = _peak_rss_gb()
    model.eval()
    nll = _held_out_nll(work_dir, lambda ids, mask: nll_of(ids, mask, torch.ones_like(ids)))
    result = {"steps": steps, "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
              "peak_rss_gb": peak, "nll": nll, "parameters": sum(p.numel() for p in trainable)}
    return {**result, "curve": losses} if curve else result


# --- driver ----------------------------------------------------------------------------------


def _in_child(function, *args, **kwargs) -> dict:
    """Run one method in a fresh process, so its peak RSS is its own."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(function, args, kwargs)


def _vocab_size(work_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(work_dir / "head" / "head.safetensors", "pt") as handle:
        return handle.get_slice("weight").get_shape()[0]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="training wall time per method")
    parser.add_argument("--eval-problems", type=int, default=100, help="held-out problems scored")
    parser.add_argument("--train-problems", type=int, default=1000, help="training problems embedded and drawn from")
    parser.add_argument("--work-dir", default="/tmp/carryon-train-vs-lora")
    parser.add_argument("--json", dest="json_path", help="also write the figures as JSON")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a carry_on.* or train.* key for the carry-on arm, over the demo config and "
                             f"the benchmark's own ({' '.join(CARRY_ON_OVERRIDES)}); repeatable")
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    carry_on_sections(args.overrides)  # a bad key fails here, before any work
    load = {"before": os.getloadavg()[0]}  # 1-minute load averages: was the machine quiet?
    embed = _in_child(run_embed, str(work_dir), args.eval_problems, args.train_problems)
    load["carry_on"] = os.getloadavg()[0]
    carry_on = _in_child(run_carryon, str(work_dir), args.seconds, args.overrides)
    load["lora"] = os.getloadavg()[0]
    lora = _in_child(run_lora, str(work_dir), args.seconds)
    load["scratch"] = os.getloadavg()[0]
    scratch = _in_child(run_scratch, str(work_dir), args.seconds)
    load["after"] = os.getloadavg()[0]

    methods = {"carry-on": carry_on, "LoRA r=8 (q,v)": lora, "carry-on from scratch (no base)": scratch}
    speed = carry_on["tokens_per_s"] / lora["tokens_per_s"]
    memory = carry_on["peak_rss_gb"] / lora["peak_rss_gb"]
    nll_ratio = carry_on["nll"] / embed["nll_base"]
    targets = [
        {"target": "carry-on tokens/s >= 4x LoRA", "measured_ratio": speed, "bound": 4.0, "holds": speed >= 4.0},
        {"target": "carry-on peak RSS <= 20% of LoRA", "measured_ratio": memory, "bound": 0.20, "holds": memory <= 0.20},
        {"target": "carry-on held-out NLL < base", "measured_ratio": nll_ratio, "bound": 1.0, "holds": nll_ratio < 1.0},
    ]
    lines = [
        (f"Train for {args.seconds:.0f} s each on the first {embed['rows']} GSM8K training problems, same batches "
         "(8 problems, <= 256 tokens), "
        f"{os.cpu_count()} CPU cores (1-minute load average {load['before']:.1f} before, {load['carry_on']:.1f} / "
        f"{load['lora']:.1f} / {load['scratch']:.1f} as each arm starts, {load['after']:.1f} after); held-out NLL per "
        f"answer token on {args.eval_problems} held-out problems "
        f"({embed['eval_tokens']:,} tokens)."),
        "",
        "| method | trainable params | steps | tokens/s | peak RSS (GB) | held-out NLL |",
        "|---|---|---|---|---|---|",
        f"| base (no training) | 0 | - | - | - | {embed['nll_base']:.4f} |",
    ]
    for name, figures in methods.items():
        lines.append(
            f"| {name} | {figures['parameters']:,} | {figures['steps']} | {figures['tokens_per_s']:,.0f} | "
            f"{figures['peak_rss_gb']:.2f} | {figures['nll']:.4f} |"
        )
    planned = carry_on["planned_steps"]
    lines += [
        "",
        (f"Carry-on: `TrainLoop` with configs/demo.yaml's carry_on and train sections and "
         f"{', '.join(f'`{item}`' for item in carry_on['overrides'])}; learning-rate schedule over "
         + (f"{planned} steps (set when the warm-up ended)." if planned else "its warm-up only (the budget ended first).")),
        "",
        (f"Embedding cost (once per corpus, shared by every carry-on): {embed['tokens']:,} tokens in "
        f"{embed['seconds']:.0f} s = {embed['tokens_per_s']:,.0f} tokens/s, {embed['bytes_per_token']:.0f} "
        f"bytes/token stored (float16: {embed['float16_bytes_per_token']}), peak RSS {embed['peak_rss_gb']:.2f} GB."),
        "",
        "| target | measured | bound | holds |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['measured_ratio']:.3f} | {t['bound']} | {'yes' if t['holds'] else 'no'} |"
              for t in targets]
    figures = {"seconds_per_method": args.seconds, "eval_problems": args.eval_problems,
               "train_problems": embed["rows"], "cpu_count": os.cpu_count(),
               "load_average": load,
               "embed": embed, "base": {"nll": embed["nll_base"]}, "carry_on": carry_on, "lora": lora,
               "scratch": scratch, "lora_anchor": LORA_ANCHOR, "targets": targets}
    publish("\n".join(lines), figures, args.json_path)
    return figures


if __name__ == "__main__":
    main()
