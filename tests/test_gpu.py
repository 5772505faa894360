"""On CUDA (every test skips where torch sees no GPU): a base built on the GPU keeps the identity
of its files, the serving views at every codec x bits, generation and the continuous batcher,
the serving NLL, and a one-worker Ray Train `TorchTrainer` with `use_gpu`.

The CPU half of the fingerprint parity (float32 and bfloat16 loads) is in tests/test_bases.py.
"""

from __future__ import annotations

import pytest
import torch

from carryon_ray.bases import FrozenBase, auto_dtype, describe_base, head_from_files
from carryon_ray.batching import DecodeBatcher
from carryon_ray.codec import CodecSpec, encode, roundtrip
from carryon_ray.config import BaseSpec
from carryon_ray.merged import MergedModel, SamplingParams, serving_nll
from tests.conftest import make_model
from tests.test_codec import CASES, IDS  # every codec and bits setting
from tests.test_merged import _merged

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")
PROMPTS = ["Question: Natalia sold 48 clips", "def add(a, b):", "x"]


def _lively(tokenizer, device: torch.device | str) -> FrozenBase:
    """conftest's lively base (float32, weights large enough to vary greedy decoding) on `device`."""
    model = make_model(len(tokenizer))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return FrozenBase.from_model("lively", model.to(device), tokenizer)


def test_a_base_builds_on_cuda_with_the_identity_of_its_files(tiny_model_dir):
    spec = BaseSpec(name="tiny", path=str(tiny_model_dir))
    base = FrozenBase(spec, device="cuda")
    assert base.device.type == "cuda" and next(base.model.parameters()).device.type == "cuda"
    assert base.dtype == auto_dtype("cuda").dtype
    on_cpu = FrozenBase(spec.model_copy(update={"dtype": "float32"}), device="cpu")
    assert base.identity() == on_cpu.identity() == describe_base(spec)["identity"]
    rows = [[5, 6, 7, 8], [9, 10]]
    base.check_output_transform(rows)
    gpu_states = base.hidden_rows(rows, [-1, 0])
    cpu_states = on_cpu.hidden_rows(rows, [-1, 0])
    for index, states in cpu_states.items():
        for gpu_row, cpu_row in zip(gpu_states[index], states, strict=True):
            torch.testing.assert_close(gpu_row, cpu_row, atol=5e-2, rtol=5e-2)
    assert torch.equal(head_from_files(spec).weight, on_cpu.output_head().weight)


@pytest.mark.parametrize("codec,bits", CASES, ids=IDS)
def test_serving_views_at_every_bits_on_cuda(codec, bits, tiny_tokenizer):
    spec = CodecSpec(codec, bits, 37)
    x = torch.randn(3, 7, 37, device=CUDA)
    codes, scales = encode(x.reshape(-1, 37), spec)
    assert codes.device.type == scales.device.type == "cuda"
    out = roundtrip(x, spec)
    assert out.device.type == "cuda" and out.shape == x.shape
    absmax = x.abs().amax(dim=-1)
    assert torch.all((out - x).abs().amax(dim=-1) <= spec.error_bound() * absmax)

    base = _lively(tiny_tokenizer, CUDA)
    merged = _merged(base, perturbed=True, residual_bits=0, input_bits=bits, codec=codec)
    ids = torch.tensor([base.tokenizer(PROMPTS[0])["input_ids"]], device=CUDA)
    logits = merged.logits(ids)
    assert logits.device.type == "cuda" and torch.isfinite(logits).all()
    assert not torch.equal(logits, merged.logits(ids, alpha=0.0))  # the carry-on acts
    prompt = ids[0].tolist()
    assert len(merged.generate(prompt, SamplingParams(max_new_tokens=4))) == 4
    sampled = SamplingParams(max_new_tokens=4, temperature=0.8, seed=3)
    assert merged.generate(prompt, sampled) == merged.generate(prompt, sampled)


def test_the_batcher_on_cuda_matches_one_at_a_time_generation(tiny_tokenizer):
    base = _lively(tiny_tokenizer, CUDA)
    engine = DecodeBatcher(base, max_batch_size=8)
    try:
        tuned, plain = _merged(base, perturbed=True), MergedModel(base)
        requests = [
            (tuned, PROMPTS[0], SamplingParams(max_new_tokens=10)),
            (plain, PROMPTS[1], SamplingParams(max_new_tokens=5)),
            (tuned, PROMPTS[2], SamplingParams(max_new_tokens=8, temperature=0.8, seed=3)),
        ]
        requests = [(merged, base.tokenizer(text)["input_ids"], params) for merged, text, params in requests]
        expected = [merged.generate(ids, params) for merged, ids, params in requests]
        streams = [engine.stream(merged, ids, params) for merged, ids, params in requests]
        assert [list(stream) for stream in streams] == expected
        assert engine.mean_batch_size > 1.0
    finally:
        engine.close()


def test_serving_nll_on_cuda_matches_the_cpu(tiny_tokenizer):
    texts = ["What is 3 + 3? 6", "The quick brown fox jumps over the lazy dog."]
    examples = []
    for text in texts:
        ids = tiny_tokenizer(text)["input_ids"]
        examples.append((ids, [0] * 2 + [1] * (len(ids) - 2)))
    on_cpu = serving_nll(_merged(_lively(tiny_tokenizer, "cpu"), perturbed=True), examples)
    on_gpu = serving_nll(_merged(_lively(tiny_tokenizer, CUDA), perturbed=True), examples)
    assert on_gpu["tokens"] == on_cpu["tokens"]
    for key in ("nll_base", "nll_merged"):
        assert on_gpu[key] == pytest.approx(on_cpu[key], rel=1e-2)


@pytest.mark.ray
def test_a_one_worker_torch_trainer_trains_on_the_gpu(local_ray, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_loop_per_worker(config: dict) -> None:  # runs on the worker: imports its own
        import tempfile

        import ray.train
        import ray.train.torch
        import torch

        from carryon_ray.config import CarryOnSpec, TrainSpec
        from carryon_ray.head import OutputHead
        from carryon_ray.loop import TrainLoop, table_batches
        from carryon_ray.records import LayerRef, Layout, encode_rows, to_table
        from carryon_ray.stages.train import carry_on_config

        device = ray.train.torch.get_device()
        dim, vocab, rows = 16, 40, 12
        final = LayerRef("tiny", 2, dim)
        layout = Layout.build(codec="absmax", residual=(final, 8), sources=[(final, 4)],
                              bases=[{"name": "tiny", "fingerprint": "f00d", "tokenizer": "abcd"}])
        generator = torch.Generator().manual_seed(0)
        lengths = [4 + row % 5 for row in range(rows)]
        columns = encode_rows(
            layout, ids=[f"{row:06d}" for row in range(rows)],
            input_ids=[torch.randint(1, vocab, (n,), generator=generator).tolist() for n in lengths],
            target_masks=[[0] + [1] * (n - 1) for n in lengths],
            hidden={final.key: [torch.randn(n, dim, generator=generator) for n in lengths]},
        )
        table = to_table(layout, columns)
        head = OutputHead(torch.randn(vocab, dim, generator=generator) * 0.3).to(device)
        spec = TrainSpec(batch_size=4, learning_rate=3e-3, warmup_steps=2, checkpoint_every=3,
                         use_gpu=True)
        shape = carry_on_config(CarryOnSpec(hidden_size=16, num_layers=1, num_heads=2, max_positions=32), layout)
        loop = TrainLoop(shape, layout, head, spec, alpha=1.0, total_steps=9, device=device,
                         wrap=ray.train.torch.prepare_model)
        losses: list[float] = []
        loop.run(lambda epoch: table_batches(layout, table, spec.batch_size, seed=0, epoch=epoch),
                 on_record=lambda record, periodic: losses.append(record["loss"]) is not None)
        metrics = {"device": device.type, "weights_on": next(loop.carry_on.parameters()).device.type,
                   "steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1]}
        with tempfile.TemporaryDirectory() as directory:  # Ray Train keeps reports with a checkpoint
            loop.save(directory)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    trainer = TorchTrainer(
        train_loop_per_worker,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=True),
        run_config=RunConfig(name="gpu-trainer", storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    assert result.error is None, result.error
    metrics = result.metrics
    assert metrics is not None and result.checkpoint is not None
    assert metrics["device"] == metrics["weights_on"] == "cuda"
    assert metrics["steps"] == 9 and metrics["loss_last"] < metrics["loss_first"]
