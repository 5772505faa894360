"""The memory options of training (`train.param_dtype`, `train.optimizer_in_backward`,
`train.optimizer: adamw4bit / adamw8bit`): each trains, in-backward equals the plain step, and
every optimizer's state goes through the checkpoint's tensors-and-numbers shape and back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from carryon_ray.bases import OutputHead
from carryon_ray.carry_on import CarryOn, CarryOnConfig
from carryon_ray.config import TrainSpec
from carryon_ray.optimizers import (
    AdamW4bit,
    ParameterwiseOptimizer,
    adamw,
    dequantize_4bit,
    quantize_4bit,
    stochastic_round_,
)
from carryon_ray.quantized_head import QuantizedHead
from carryon_ray.records import Batch
from carryon_ray.training import batch_nll, build_optimizer, prepare_carry_on, train_step

D, V = 64, 50  # wide enough that the 8-bit and 4-bit moments are quantized (>= 4096 values)

OPTIONS = {
    "bf16 weights": {"param_dtype": "bfloat16"},
    "in backward": {"optimizer_in_backward": True, "grad_clip": None},
    "8-bit": {"optimizer": "adamw8bit"},
    "4-bit": {"optimizer": "adamw4bit"},
    "all, 8-bit": {
        "optimizer": "adamw8bit",
        "param_dtype": "bfloat16",
        "optimizer_in_backward": True,
        "grad_clip": None,
    },
    "all, 4-bit": {
        "optimizer": "adamw4bit",
        "param_dtype": "bfloat16",
        "optimizer_in_backward": True,
        "grad_clip": None,
    },
}


def _head() -> OutputHead:
    generator = torch.Generator().manual_seed(0)
    return OutputHead(
        torch.randn(V, D, generator=generator) * 0.3, torch.randn(V, generator=generator)
    )


def _batch(seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 9), generator=generator)
    mask = torch.ones(2, 9, dtype=torch.bool)
    residual = torch.randn(2, 9, D, generator=generator)
    return Batch(ids, mask, torch.tensor([9, 9]), residual, [residual.clone()])


def _trained(spec: TrainSpec, head=None, steps: int = 15) -> tuple[CarryOn, object, list[float]]:
    torch.manual_seed(0)
    carry_on = prepare_carry_on(
        CarryOn(
            CarryOnConfig(
                input_dims=[D], output_dim=D, hidden_size=64, num_layers=1, max_positions=16
            )
        ),
        spec,
    )
    optimizer = build_optimizer(carry_on, spec, device="cpu")
    batch, head = _batch(), head or _head()
    losses = [
        train_step(carry_on, head, batch, optimizer, alpha=1.0, grad_clip=spec.grad_clip)[0]
        for _ in range(steps)
    ]
    return carry_on, optimizer, losses


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_memory_option_trains(option):
    spec = TrainSpec(learning_rate=1e-2, **OPTIONS[option])
    carry_on, _, losses = _trained(spec)
    assert losses[-1] < 0.7 * losses[0], losses
    dtype = torch.bfloat16 if spec.param_dtype == "bfloat16" else torch.float32
    assert {p.dtype for p in carry_on.parameters()} == {dtype}
    assert all(p.grad is None for p in carry_on.parameters()) or not spec.optimizer_in_backward


def test_every_memory_option_at_once_trains_through_an_nf4_head():
    spec = TrainSpec(learning_rate=1e-2, head_dtype="nf4", **OPTIONS["all, 4-bit"])
    _, _, losses = _trained(spec, head=QuantizedHead.from_head(_head(), "nf4"))
    assert losses[-1] < 0.7 * losses[0], losses


def test_bfloat16_weights_keep_the_merged_state_and_the_loss_float32():
    spec = TrainSpec(param_dtype="bfloat16")
    torch.manual_seed(0)
    carry_on = prepare_carry_on(
        CarryOn(CarryOnConfig(input_dims=[D], output_dim=D, hidden_size=64)), spec
    )
    head, batch = _head(), _batch()
    total, _ = batch_nll(carry_on, head, batch, alpha=1.0)
    base, _ = batch_nll(None, head, batch, alpha=1.0)
    assert total.dtype == torch.float32
    assert torch.equal(total, base)  # W_Δ = 0: the untrained merged model is the base, exactly
    same = CarryOn(carry_on.config)
    assert prepare_carry_on(same, TrainSpec()) is same  # the float32 default is untouched


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_optimizer_in_backward_gives_the_plain_steps_update(name):
    plain_spec = TrainSpec(learning_rate=1e-2, optimizer=name, grad_clip=None)
    fused_spec = TrainSpec(
        learning_rate=1e-2, optimizer=name, grad_clip=None, optimizer_in_backward=True
    )
    plain, plain_optimizer, plain_losses = _trained(plain_spec, steps=6)
    fused, fused_optimizer, fused_losses = _trained(fused_spec, steps=6)
    assert isinstance(plain_optimizer, torch.optim.Optimizer)
    assert isinstance(fused_optimizer, ParameterwiseOptimizer)
    assert fused_losses == pytest.approx(plain_losses, rel=1e-5)
    for a, b in zip(plain.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_pieces_of_a_parameter_step_as_the_whole_parameter():
    torch.manual_seed(0)
    whole = torch.nn.Parameter(torch.randn(48, 256))
    pieced = torch.nn.Parameter(whole.detach().clone())
    for name in (
        "adamw",
        "adamw8bit",
        "adamw4bit",
    ):  # pieces of 4096: the 8- and 4-bit moments still apply
        single = adamw(name, [whole], lr=1e-2, weight_decay=0.01)
        pieces = ParameterwiseOptimizer(
            [pieced],
            lambda params, name=name: adamw(name, params, lr=1e-2, weight_decay=0.01),
            lr=1e-2,
            weight_decay=0.01,
            in_backward=False,
            piece=4096,
        )
        assert len(pieces.state_dict()["param_groups"][0]["params"]) == 3
        for _ in range(4):
            grad = torch.randn(48, 256)
            whole.grad, pieced.grad = grad.clone(), grad.clone()
            single.step()
            pieces.step()
        torch.testing.assert_close(pieced, whole, rtol=1e-6, atol=1e-6)


def _checkpoint_round_trip(state: dict, directory) -> dict:
    """The checkpoint's shape: tensors in safetensors, numbers and param groups in JSON."""
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            assert isinstance(value, torch.Tensor | int | float), (name, type(value))
            (tensors if isinstance(value, torch.Tensor) else scalars)[f"{index}.{name}"] = value
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "optimizer.safetensors")
    (directory / "state.json").write_text(
        json.dumps({"param_groups": state["param_groups"], "scalars": scalars})
    )
    meta = json.loads((directory / "state.json").read_text())
    slots: dict[int, dict] = {}
    for key, value in [
        *load_file(directory / "optimizer.safetensors").items(),
        *meta["scalars"].items(),
    ]:
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    return {"state": slots, "param_groups": meta["param_groups"]}


@pytest.mark.parametrize("option", ["plain", *OPTIONS])
def test_optimizer_state_round_trips_through_the_checkpoint(option, tmp_path):
    spec = TrainSpec(learning_rate=1e-2, **OPTIONS.get(option, {}))
    carry_on, optimizer, _ = _trained(spec, steps=3)
    saved = optimizer.state_dict()
    restored = _checkpoint_round_trip(saved, tmp_path)
    _, fresh, _ = _trained(spec, steps=0)
    fresh.load_state_dict(restored)
    again = fresh.state_dict()
    assert again["param_groups"] == json.loads(json.dumps(saved["param_groups"]))
    assert again["state"].keys() == saved["state"].keys()
    for index, slots in saved["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(again["state"][index][name], value), (index, name)
            else:
                assert again["state"][index][name] == value, (index, name)
    # A resumed run steps exactly as one that never stopped (bfloat16 rounding noise included).
    resumed = prepare_carry_on(CarryOn(carry_on.config), spec)
    resumed.load_state_dict(carry_on.state_dict())
    resumed_optimizer = build_optimizer(resumed, spec, device="cpu")
    resumed_optimizer.load_state_dict(restored)
    for model, opt in ((carry_on, optimizer), (resumed, resumed_optimizer)):
        for group in opt.param_groups:
            group["lr"] = 3e-3  # the loop sets the rate before every step
        train_step(model, _head(), _batch(1), opt, alpha=1.0, grad_clip=spec.grad_clip)
    for a, b in zip(carry_on.parameters(), resumed.parameters(), strict=True):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_stochastic_rounding_is_unbiased_and_keeps_tiny_updates():
    source = torch.full((200_000,), 1.0 + 2**-9)  # a quarter of the way from 1 to the next bf16
    target = torch.empty(source.shape, dtype=torch.bfloat16)
    stochastic_round_(target, source, torch.Generator().manual_seed(0))
    assert set(target.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert target.float().mean().item() == pytest.approx(1.0 + 2**-9, abs=5e-5)
    negative = torch.empty_like(target)
    stochastic_round_(negative, -source, torch.Generator().manual_seed(0))
    assert negative.float().mean().item() == pytest.approx(-(1.0 + 2**-9), abs=5e-5)
    # 100 updates of 1e-4 each: rounding to nearest loses every one, stochastic keeps them.
    nearest, stochastic = (
        torch.ones(10_000, dtype=torch.bfloat16),
        torch.ones(10_000, dtype=torch.bfloat16),
    )
    generator = torch.Generator().manual_seed(1)
    for _ in range(100):
        nearest.copy_(nearest.float() + 1e-4)
        stochastic_round_(stochastic, stochastic.float() + 1e-4, generator)
    assert nearest.float().mean().item() == 1.0
    assert stochastic.float().mean().item() == pytest.approx(1.01, abs=1e-3)


def test_four_bit_moments_round_trip_and_start_at_zero():
    signed, unsigned = torch.linspace(-1, 1, 16), torch.linspace(0, 1, 17)[1:]
    values = torch.randn(1024)
    codes, scales = quantize_4bit(values, signed)
    assert codes.dtype == torch.uint8 and codes.shape == (512,) and scales.shape == (8,)
    restored = dequantize_4bit(codes, scales, signed)
    assert (restored - values).abs().max() <= scales.max() / 15 + 1e-6  # half a step of 2/15
    positive = values.square()
    assert (dequantize_4bit(*quantize_4bit(positive, unsigned), unsigned) > 0).all()  # no zero code
    parameter = torch.nn.Parameter(torch.zeros(4096))
    optimizer = AdamW4bit([parameter], lr=0.1, weight_decay=0.0)
    parameter.grad = torch.ones(4096)
    optimizer.step()
    state = optimizer.state[parameter]
    assert state["exp_avg"].shape == (2048,) and state["exp_avg"].dtype == torch.uint8
    torch.testing.assert_close(parameter.detach(), torch.full((4096,), -0.1), rtol=1e-3, atol=1e-3)


def test_the_config_refuses_grad_clip_or_several_workers_with_optimizer_in_backward():
    with pytest.raises(ValueError, match="train.grad_clip: null"):
        TrainSpec(optimizer_in_backward=True)
    with pytest.raises(ValueError, match="max_workers: 1"):
        TrainSpec(optimizer_in_backward=True, grad_clip=None, max_workers=2)
    assert TrainSpec(optimizer_in_backward=True, grad_clip=None).grad_clip is None
    default = TrainSpec()
    assert (default.param_dtype, default.optimizer_in_backward, default.grad_clip) == (
        "float32",
        False,
        1.0,
    )
