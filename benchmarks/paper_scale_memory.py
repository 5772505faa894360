"""Peak memory of training a ~100M-parameter carry-on for a 30B-class base (paper scale),
and what the memory options cost in quality.

The paper claims "under 1 GB" of accelerator memory to train a 100M-parameter carry-on on a
30B base. Here the base is synthetic (hidden 5120, vocab 152,064, a Qwen-30B-class head) and
the stored states are random; the carry-on is h=1024 with 7 layers (~105M parameters). Each
option is a `train` section (TrainSpec keys, built through `prepare_carry_on` and
`build_optimizer` as the training loop does) and runs its training steps in a fresh process
(CUDA: peak allocated; CPU: peak RSS above the runtime, i.e. after Python, torch and
bitsandbytes are imported). Its static parts (frozen head, weights, gradients, optimizer
state) are reported beside the peak, so each option's cost is visible:

- head precision (`train.head_dtype`): the frozen output head in float32 or bfloat16 (3.1 GB
  vs 1.6 GB by itself), or NF4-quantized in 64-value blocks (0.43 GB) with the
  vocabulary-blocked loss (`carryon_ray/quantized_head.py`);
- bf16 autocast for the carry-on and the head's matmuls;
- `train.optimizer`: 8-bit AdamW (bitsandbytes; block-wise quantized moments, 2 bytes per
  weight) or 4-bit AdamW (`carryon_ray/optimizers.py`, about 1 byte per weight);
- `train.param_dtype: bfloat16`: the carry-on's weights (and so its gradients) in bfloat16,
  without a float32 master copy; updates are stochastically rounded;
- `train.optimizer_in_backward`: each parameter steps as soon as its gradient exists, so the
  gradients are never all alive (it needs `train.grad_clip: null`);
- the chunked cross-entropy (always on: a full (tokens x 152,064) float32 logit tensor
  and its gradient would cost 2 x 156 MB per 128 tokens).

CPU memory is what glibc's malloc keeps mapped, and by default glibc raises its mmap threshold
(up to 32 MB) each time a large block is freed, after which freed tensors of that size stay in
its heaps: the RSS then measures the allocator's fragmentation more than the tensors alive.
Each child therefore runs with glibc's default 128 KiB threshold held fixed
(`MALLOC_MMAP_THRESHOLD_=131072`, set for the process with `--malloc-mmap-threshold`; CUDA's
"peak allocated" has no such slack), and the best option is also measured with glibc's dynamic
default. A CPU trainer gets the same figures with that environment variable.

Quality (`--quality-steps`, 0 to skip): the savings must not cost quality. The check is a
small synthetic task, not real data: on this 2-core CPU the real default (SmolLM2-135M on
GSM8K) took 18 minutes to embed 500 problems and about 10 s per training step through its
49,152-token head. A teacher draws each token from the frozen head's softmax of a state that
depends on the previous token and the one two positions further back; the "base" state holds
only the first part, so the carry-on must learn to attend back and map what it finds
(`synthetic_task`; the base's held-out NLL is about 4.49 nats, a trained carry-on reaches about
3.76, the teacher's floor is lower). A carry-on of h=128 x 2 layers trains a fixed number of
steps from the same seed on the same batches, once as the float32 reference (float32 head,
AdamW, float32 weights, the default grad_clip) and once per arm; each is scored on held-out
sequences with the exact float32 head, as serving does. The target: held-out NLL within 1% of
the reference's. Arms that differ only in optimizer noise land about 1% apart either way at
300 steps, so this bound is tight. What the synthetic head cannot show: on the real default
(SmolLM2-135M's head, GSM8K answers) the NF4 head alone moves the base's NLL by +5%
(1.563 -> 1.641 nats; blockwise8 +0.04%, bfloat16 +0.05%), more than on this task (+0.55%).

    python benchmarks/paper_scale_memory.py --json reports/paper_scale_memory.json
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import publish

HIDDEN, VOCAB = 5120, 152_064
CARRY_ON = {"hidden_size": 1024, "num_layers": 7, "num_heads": 8, "max_positions": 1024}
# Each option is a `train` section (TrainSpec keys); what it does not set is the default.
LEAST = {"head_dtype": "nf4", "optimizer": "adamw4bit", "param_dtype": "bfloat16",
         "optimizer_in_backward": True, "grad_clip": None}
OPTIONS = [
    {"name": "float32 head, AdamW", "train": {"head_dtype": "float32", "optimizer": "adamw"}},
    {"name": "bf16 head, AdamW", "train": {"head_dtype": "bfloat16", "optimizer": "adamw"}},
    {"name": "bf16 head, bf16 autocast, 8-bit AdamW",
     "train": {"head_dtype": "bfloat16", "autocast": "bfloat16", "optimizer": "adamw8bit"}},
    {"name": "nf4 head, 8-bit AdamW", "train": {"head_dtype": "nf4", "optimizer": "adamw8bit"}},
    {"name": "nf4 head, 8-bit AdamW, in backward",
     "train": {"head_dtype": "nf4", "optimizer": "adamw8bit", "optimizer_in_backward": True, "grad_clip": None}},
    {"name": "nf4 head, 8-bit AdamW, bf16 weights",
     "train": {"head_dtype": "nf4", "optimizer": "adamw8bit", "param_dtype": "bfloat16"}},
    {"name": "nf4 head, 8-bit AdamW, bf16 weights, in backward",
     "train": {**LEAST, "optimizer": "adamw8bit"}},
    {"name": "nf4 head, 4-bit AdamW, bf16 weights, in backward", "train": LEAST},
    {"name": "nf5 head, 4-bit AdamW, bf16 weights, in backward", "train": {**LEAST, "head_dtype": "nf5"}},
    {"name": "nf6 head, 4-bit AdamW, bf16 weights, in backward", "train": {**LEAST, "head_dtype": "nf6"}},
    {"name": "blockwise8 head, 4-bit AdamW, bf16 weights, in backward", "train": {**LEAST, "head_dtype": "blockwise8"}},
    {"name": "nf4 head, 4-bit AdamW, bf16 weights, in backward; glibc's dynamic mmap threshold",
     "train": LEAST, "malloc": "dynamic"},
]
MALLOC_MMAP_THRESHOLD = 131072  # glibc's default starting value, held fixed (see the doc)
# The quality check: a synthetic next-token task (see the doc).
QUALITY_TASK = {"vocab": 512, "dim": 128, "length": 64, "train_sequences": 2048, "eval_sequences": 256,
                "logit_scale": 3.0, "seed": 0}
QUALITY_CARRY_ON = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "max_positions": 64}
QUALITY_TRAIN = {"batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 20, "seed": 0}
SAVINGS = {"optimizer": "adamw4bit", "param_dtype": "bfloat16", "optimizer_in_backward": True, "grad_clip": None}
QUALITY_ARMS = [
    {"name": "float32 reference: float32 head, AdamW, float32 weights", "train": {"optimizer": "adamw"}},
    {"name": "float32 head, 4-bit AdamW, bf16 weights, in backward", "train": SAVINGS},
    {"name": "nf4 head, AdamW", "train": {"head_dtype": "nf4", "optimizer": "adamw"}},
    {"name": "nf4 head, 4-bit AdamW, bf16 weights, in backward", "train": LEAST},
    {"name": "nf5 head, AdamW", "train": {"head_dtype": "nf5", "optimizer": "adamw"}},
    {"name": "nf5 head, 4-bit AdamW, bf16 weights, in backward", "train": {**LEAST, "head_dtype": "nf5"}},
    {"name": "nf6 head, 4-bit AdamW, bf16 weights, in backward", "train": {**LEAST, "head_dtype": "nf6"}},
]
QUALITY_TOLERANCE = 0.01
LIMIT_GB = 1.0


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _current_rss_gb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _weight_blocks(dtype, device, rows: int = 8192):
    """The synthetic head, (rows, HIDDEN) at a time, seeded per block."""
    import torch

    for start in range(0, VOCAB, rows):
        generator = torch.Generator().manual_seed(start)
        block = torch.randn(min(rows, VOCAB - start), HIDDEN, generator=generator) * 0.02
        yield block.to(device, dtype)


def run_option(option: dict, device: str, batch: int, length: int, steps: int, chunk: int) -> dict:
    import bitsandbytes  # noqa: F401 - imported before the baseline: part of the runtime, as torch is
    import torch

    from carryon_ray.bases import OutputHead
    from carryon_ray.carry_on import CarryOn, CarryOnConfig
    from carryon_ray.config import TrainSpec
    from carryon_ray.quantized_head import HEAD_CODECS, QuantizedHead
    from carryon_ray.records import Batch
    from carryon_ray.training import build_optimizer, prepare_carry_on, train_step

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    cuda = device == "cuda"
    spec = TrainSpec(learning_rate=1e-4, weight_decay=0.01, loss_chunk=chunk, **option["train"])
    baseline = _current_rss_gb()
    if spec.head_dtype in HEAD_CODECS:  # quantized block by block: no float copy of W
        head = QuantizedHead.from_rows(_weight_blocks(torch.float32, device, rows=4096),
                                       codec=spec.head_dtype, vocab=VOCAB, dim=HIDDEN)
        head_tensors = [head.codes, head.scales]
    else:
        weight = torch.empty(VOCAB, HIDDEN, dtype=getattr(torch, spec.head_dtype), device=device)
        start = 0
        for block in _weight_blocks(weight.dtype, device):  # filled in blocks: no second copy
            weight[start : start + len(block)] = block
            start += len(block)
        head = OutputHead(weight)
        head_tensors = [weight]
    head_built_peak = _rss_gb() - baseline
    carry_on = prepare_carry_on(CarryOn(CarryOnConfig(input_dims=[HIDDEN], output_dim=HIDDEN, **CARRY_ON)), spec)
    carry_on = carry_on.to(device)
    try:
        optimizer = build_optimizer(carry_on, spec, device=device)
    except (ImportError, RuntimeError) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    residual = torch.randn(batch, length, HIDDEN, device=device)  # stored states are float32
    sample = Batch(
        input_ids=torch.randint(0, VOCAB, (batch, length), device=device),
        target_mask=torch.ones(batch, length, dtype=torch.bool, device=device),
        lengths=torch.full((batch,), length, device=device),
        residual=residual,
        sources=[residual.clone()],
    )
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timings = []
    try:
        for _ in range(steps):
            started = time.time()
            train_step(carry_on, head, sample, optimizer, alpha=1.0, grad_clip=spec.grad_clip,
                       autocast=torch.bfloat16 if spec.autocast == "bfloat16" else None, chunk=chunk)
            if cuda:
                torch.cuda.synchronize()
            timings.append(time.time() - started)
    except (RuntimeError, NotImplementedError) as error:
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
    params = list(carry_on.parameters())
    state = [v for slots in optimizer.state_dict()["state"].values() for v in slots.values()
             if isinstance(v, torch.Tensor)]
    result = {
        "parameters": sum(p.numel() for p in params),
        "head_gb": _bytes(head_tensors) / 2**30,
        "weights_gb": _bytes(params) / 2**30,
        "grads_gb": _bytes([p.grad for p in params if p.grad is not None]) / 2**30,
        "optimizer_gb": _bytes(state) / 2**30,
        "step_seconds": timings[-1],
        "head_build_peak_gb": head_built_peak if not cuda else None,
    }
    if cuda:
        result["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        result["baseline_gb"] = 0.0
    else:
        result["peak_gb"] = _rss_gb() - baseline  # the process's runtime (torch, Python) excluded
        result["baseline_gb"] = baseline
    result["static_gb"] = result["head_gb"] + result["weights_gb"] + result["grads_gb"] + result["optimizer_gb"]
    result["without_head_gb"] = result["peak_gb"] - result["head_gb"]
    return result


def _in_child(function, *args, mmap_threshold: int | None = None) -> dict:
    """`function(*args)` in a fresh process; glibc reads MALLOC_MMAP_THRESHOLD_ at its start."""
    saved = os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(function, args)
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        if saved is not None:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def synthetic_task(*, vocab: int, dim: int, length: int, train_sequences: int, eval_sequences: int,
                   logit_scale: float, seed: int):
    """(frozen head (vocab, dim), token ids (N, length), base hidden states (N, length, dim)).

    A teacher draws token t from softmax(W (e_{t-1} A + e_{t-3} B)): W the frozen head (rows
    N(0, logit_scale^2)), e a token embedding, A and B random rotations. The "base" state of
    position t is e_t A, the part of the next state its own token decides; what e_{t-2} adds
    is not in it, so the carry-on must attend two positions back and learn B A^-1 to help."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    embedding = torch.randn(vocab, dim, generator=generator) / dim**0.5
    head = torch.randn(vocab, dim, generator=generator) * logit_scale
    a, b = (torch.linalg.qr(torch.randn(dim, dim, generator=generator))[0] for _ in range(2))
    count = train_sequences + eval_sequences
    ids = torch.zeros(count, length, dtype=torch.long)
    ids[:, :3] = torch.randint(0, vocab, (count, 3), generator=generator)
    for t in range(3, length):
        state = embedding[ids[:, t - 1]] @ a + embedding[ids[:, t - 3]] @ b  # (N, dim)
        ids[:, t] = torch.multinomial(torch.softmax(state @ head.T, dim=-1), 1, generator=generator)[:, 0]
    return head, ids, embedding[ids] @ a


def _task_batches(ids, hidden, rows, batch_size: int, generator):
    """Batches as the trainer gets them: the residual at 8 bits, the carry-on input at 4
    (absmax codec); the first three tokens are not targets."""
    import torch

    from carryon_ray.codec import CodecSpec, roundtrip
    from carryon_ray.records import Batch

    order = rows if generator is None else rows[torch.randperm(len(rows), generator=generator)]
    dim = hidden.shape[-1]
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        mask = torch.ones(len(index), ids.shape[1], dtype=torch.bool)
        mask[:, :3] = False
        yield Batch(ids[index], mask, torch.full((len(index),), ids.shape[1]),
                    roundtrip(hidden[index], CodecSpec("absmax", 8, dim)),
                    [roundtrip(hidden[index], CodecSpec("absmax", 4, dim))])


def run_quality(arm: dict, steps: int, seed: int = 0) -> dict:
    """Train the quality check's carry-on with one arm's `train` keys; held-out NLL with the
    exact float32 head (see the module doc)."""
    import torch

    from carryon_ray.bases import OutputHead
    from carryon_ray.carry_on import CarryOn, CarryOnConfig
    from carryon_ray.config import TrainSpec
    from carryon_ray.quantized_head import HEAD_CODECS, QuantizedHead
    from carryon_ray.training import build_optimizer, evaluate, lr_at, prepare_carry_on, train_step

    torch.set_num_threads(os.cpu_count() or 1)
    spec = TrainSpec(**{**QUALITY_TRAIN, "seed": seed}, **arm["train"])  # the task itself stays fixed
    weight, ids, hidden = synthetic_task(**QUALITY_TASK)
    exact = OutputHead(weight)
    if spec.head_dtype in HEAD_CODECS:
        head = QuantizedHead.from_head(exact, spec.head_dtype)
    else:
        head = OutputHead(weight.to(getattr(torch, spec.head_dtype)))
    train_rows = torch.arange(QUALITY_TASK["train_sequences"])
    eval_rows = torch.arange(QUALITY_TASK["train_sequences"], len(ids))
    torch.manual_seed(spec.seed)
    config = CarryOnConfig(input_dims=[hidden.shape[-1]], output_dim=hidden.shape[-1], **QUALITY_CARRY_ON)
    carry_on = prepare_carry_on(CarryOn(config), spec)
    optimizer = build_optimizer(carry_on, spec, device="cpu")
    generator = torch.Generator().manual_seed(spec.seed)
    step, losses, started = 0, [], time.time()
    while step < steps:
        for batch in _task_batches(ids, hidden, train_rows, spec.batch_size, generator):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, base_lr=spec.learning_rate, warmup=spec.warmup_steps, total=steps)
            losses.append(train_step(carry_on, head, batch, optimizer, alpha=1.0, grad_clip=spec.grad_clip,
                                     chunk=spec.loss_chunk)[0])
            step += 1
            if step == steps:
                break
    seconds = time.time() - started
    scores = evaluate(carry_on, exact, _task_batches(ids, hidden, eval_rows, 64, None), alpha=1.0)
    return {"steps": steps, "seconds": seconds, "loss_first": losses[0],
            "loss_last": sum(losses[-10:]) / len(losses[-10:]), "val_nll_base": scores["nll_base"],
            "val_nll": scores["nll_merged"], "eval_tokens": scores["tokens"]}


def _mean_over_seeds(arm: dict, runs: list[dict]) -> dict:
    """One arm's figures averaged over its seeds' runs (each seed's held-out NLL kept)."""
    mean = {key: sum(run[key] for run in runs) / len(runs)
            for key in ("seconds", "loss_first", "loss_last", "val_nll_base", "val_nll")}
    return {**arm, **runs[0], **mean, "seeds": len(runs), "val_nll_seeds": [run["val_nll"] for run in runs]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence (all are targets)")
    parser.add_argument("--steps", type=int, default=2, help="training steps (the first allocates the optimizer)")
    parser.add_argument("--chunk", type=int, default=256, help="target rows per logit chunk")
    parser.add_argument("--only", action="append", default=[],
                        help="run only the options whose name contains this (repeatable)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=MALLOC_MMAP_THRESHOLD,
                        help="glibc's MALLOC_MMAP_THRESHOLD_ for each option's process (0: glibc's dynamic default)")
    parser.add_argument("--quality-steps", type=int, default=300, help="quality check training steps (0: skip it)")
    parser.add_argument("--quality-seeds", type=int, default=1,
                        help="training seeds per quality arm (initialization and batch order); the mean counts")
    parser.add_argument("--quality-arms", action="append", default=[],
                        help="run only the quality arms whose name contains this (the reference always runs)")
    parser.add_argument("--skip-memory", action="store_true", help="only the quality check")
    parser.add_argument("--json", dest="json_path", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    options = [o for o in OPTIONS if not args.only or any(part in o["name"] for part in args.only)]
    if args.skip_memory:
        options = []
    elif not options:
        parser.error(f"--only {args.only} matches no option; options: {[o['name'] for o in OPTIONS]}")
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for option in options:
        threshold = None if option.get("malloc") == "dynamic" else args.malloc_mmap_threshold
        figures = _in_child(run_option, option, device, args.batch, args.length, args.steps, args.chunk,
                            mmap_threshold=threshold)
        rows.append({**option, **figures, "malloc_mmap_threshold": threshold})
    what = "peak CUDA memory allocated" if device == "cuda" else (
        "peak RSS above the process's runtime (Python, torch, bitsandbytes), glibc's mmap threshold fixed at "
        f"{args.malloc_mmap_threshold} bytes unless the option says otherwise")
    lines = [
        (f"Carry-on h={CARRY_ON['hidden_size']} x {CARRY_ON['num_layers']} layers for a base of hidden {HIDDEN}, "
        f"vocab {VOCAB:,}; {args.batch}x{args.length} target tokens per step, logit chunks of {args.chunk} rows, "
        f"device {device}; peak = {what}."),
        "",
        ("| option | params | head (GB) | weights+grads (GB) | optimizer (GB) | tensors held (GB) | peak (GB) "
        "| peak without head (GB) | step (s) | <= 1 GB |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | - | - | - | - | - | - | - | - | n/a ({row['error'][:80]}) |")
            continue
        lines.append(
            f"| {row['name']} | {row['parameters'] / 1e6:.1f}M | {row['head_gb']:.2f} | "
            f"{row['weights_gb'] + row['grads_gb']:.2f} | {row['optimizer_gb']:.2f} | {row['static_gb']:.2f} | "
            f"{row['peak_gb']:.2f} | "
            f"{row['without_head_gb']:.2f} | {row['step_seconds']:.1f} | {'yes' if row['peak_gb'] <= LIMIT_GB else 'no'} |"
        )
    measured = [row for row in rows if "error" not in row]
    targets = []
    if measured:
        best = min(measured, key=lambda row: row["peak_gb"])
        targets += [
            {"target": "peak memory <= 1 GB (paper: 'under 1 GB')", "option": best["name"],
             "measured_ratio": best["peak_gb"] / LIMIT_GB, "bound": 1.0, "holds": best["peak_gb"] <= LIMIT_GB},
            {"target": "peak memory without the frozen head <= 1 GB", "option": best["name"],
             "measured_ratio": best["without_head_gb"] / LIMIT_GB, "bound": 1.0,
             "holds": best["without_head_gb"] <= LIMIT_GB},
        ]
    arms = [arm for index, arm in enumerate(QUALITY_ARMS)
            if index == 0 or not args.quality_arms or any(part in arm["name"] for part in args.quality_arms)]
    checks = [_mean_over_seeds(arm, [_in_child(run_quality, arm, args.quality_steps, seed)
                                     for seed in range(args.quality_seeds)])
              for arm in arms] if args.quality_steps else []
    if checks:
        reference, savings = checks[0], checks[1:]
        lines += [
            "",
            (f"Quality: synthetic next-token task (vocab {QUALITY_TASK['vocab']}, dim {QUALITY_TASK['dim']}, "
             f"{QUALITY_TASK['train_sequences']} training sequences of {QUALITY_TASK['length']} tokens), carry-on "
             f"h={QUALITY_CARRY_ON['hidden_size']} x {QUALITY_CARRY_ON['num_layers']} layers, {args.quality_steps} "
             f"steps of {QUALITY_TRAIN['batch_size']} sequences, the same batches for every arm; mean over "
             f"{args.quality_seeds} training seed(s) (initialization, batch order); held-out NLL on "
             f"{QUALITY_TASK['eval_sequences']} other sequences ({reference['eval_tokens']} tokens), exact float32 head."),
            "",
            ("| arm | train loss (first -> last 10) | held-out NLL (base) | held-out NLL | per seed | vs reference "
            "| train (s) |"),
            "|---|---|---|---|---|---|---|",
        ]
        for check in checks:
            change = check["val_nll"] / reference["val_nll"] - 1
            per_seed = ", ".join(f"{value:.4f}" for value in check["val_nll_seeds"])
            lines.append(f"| {check['name']} | {check['loss_first']:.3f} -> {check['loss_last']:.3f} | "
                         f"{check['val_nll_base']:.4f} | {check['val_nll']:.4f} | {per_seed} | {change:+.2%} | "
                         f"{check['seconds']:.0f} |")
        for check in savings:
            ratio = abs(check["val_nll"] / reference["val_nll"] - 1)
            targets.append({"target": f"held-out NLL within {QUALITY_TOLERANCE:.0%} of the float32 reference",
                            "option": check["name"], "measured_ratio": ratio / QUALITY_TOLERANCE, "bound": 1.0,
                            "holds": ratio <= QUALITY_TOLERANCE})
    lines += ["", "| target | option | measured / bound | holds |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['option']} | {t['measured_ratio']:.2f} | {'yes' if t['holds'] else 'no'} |"
              for t in targets]
    figures = {"device": device, "hidden": HIDDEN, "vocab": VOCAB, "carry_on": CARRY_ON, "batch": args.batch,
               "length": args.length, "chunk": args.chunk, "options": rows, "quality": checks, "targets": targets}
    publish("\n".join(lines), figures, args.json_path)
    return figures


if __name__ == "__main__":
    main()
