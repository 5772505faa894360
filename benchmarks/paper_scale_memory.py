"""Peak memory of training a ~100M-parameter carry-on for a 30B-class base (paper scale).

The paper claims "under 1 GB" of accelerator memory to train a 100M-parameter carry-on on a
30B base. Here the base is synthetic (hidden 5120, vocab 152,064, a Qwen-30B-class head) and
the stored states are random; the carry-on is h=1024 with 7 layers (~105M parameters). Each
option runs its training steps in a fresh process (CPU: peak RSS; CUDA: peak allocated), and
its static parts (frozen head, weights, gradients, optimizer state) are reported beside the
peak, so each option's cost is visible:

- head precision (`train.head_dtype`): the frozen output head in float32 or bfloat16 (3.1 GB
  vs 1.6 GB by itself), or NF4-quantized in 64-value blocks (0.43 GB) with the
  vocabulary-blocked loss (`carryon_ray/quantized_head.py`);
- bf16 autocast for the carry-on and the head's matmuls;
- 8-bit AdamW (bitsandbytes; block-wise quantized moments);
- the chunked cross-entropy (always on: a full (tokens x 152,064) float32 logit tensor
  and its gradient would cost 2 x 156 MB per 128 tokens);
- * bf16 weights: the carry-on's parameters (and so its gradients) in bfloat16, without a
  float32 master copy. Measured to show what it would save; not a training option (updates
  below bfloat16's resolution are lost).

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
     "train": {"head_dtype": "nf4", "optimizer": "adamw8bit", "param_dtype": "bfloat16",
               "optimizer_in_backward": True, "grad_clip": None}},
]
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


def _in_child(*args) -> dict:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(run_option, args)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence (all are targets)")
    parser.add_argument("--steps", type=int, default=2, help="training steps (the first allocates the optimizer)")
    parser.add_argument("--chunk", type=int, default=256, help="target rows per logit chunk")
    parser.add_argument("--only", action="append", default=[],
                        help="run only the options whose name contains this (repeatable)")
    parser.add_argument("--json", dest="json_path", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    options = [o for o in OPTIONS if not args.only or any(part in o["name"] for part in args.only)]
    if not options:
        parser.error(f"--only {args.only} matches no option; options: {[o['name'] for o in OPTIONS]}")
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for option in options:
        figures = _in_child(option, device, args.batch, args.length, args.steps, args.chunk)
        rows.append({**option, **figures})
    what = "peak CUDA memory allocated" if device == "cuda" else "peak RSS above the process's runtime"
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
    best = min(measured, key=lambda row: row["peak_gb"])
    targets = [
        {"target": "peak memory <= 1 GB (paper: 'under 1 GB')", "option": best["name"],
         "measured_ratio": best["peak_gb"] / LIMIT_GB, "bound": 1.0, "holds": best["peak_gb"] <= LIMIT_GB},
        {"target": "peak memory without the frozen head <= 1 GB", "option": best["name"],
         "measured_ratio": best["without_head_gb"] / LIMIT_GB, "bound": 1.0,
         "holds": best["without_head_gb"] <= LIMIT_GB},
    ]
    lines += ["", "| target | best option | measured / bound | holds |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['option']} | {t['measured_ratio']:.2f} | {'yes' if t['holds'] else 'no'} |"
              for t in targets]
    figures = {"device": device, "hidden": HIDDEN, "vocab": VOCAB, "carry_on": CARRY_ON, "batch": args.batch,
               "length": args.length, "chunk": args.chunk, "options": rows, "targets": targets}
    publish("\n".join(lines), figures, args.json_path)
    return figures


if __name__ == "__main__":
    main()
