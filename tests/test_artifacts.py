"""Carry-on artifacts: config.json + model.safetensors, identical after a round trip, base-checked."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from carryon_ray.artifacts import load_carryon, read_artifact_config, save_carryon
from carryon_ray.bases import FrozenBase
from carryon_ray.carry_on import CarryOn, CarryOnConfig
from carryon_ray.merged import MergedModel
from carryon_ray.records import LayerRef, Layout
from tests.conftest import make_model


def _trained(base: FrozenBase) -> tuple[CarryOn, Layout]:
    final = LayerRef(base.name, base.num_layers, base.hidden_size)
    layout = Layout.build(
        codec="absmax",
        residual=(final, 8),
        sources=[(final, 4), (LayerRef(base.name, 1, base.hidden_size), 2)],
        bases=[base.identity()],
    )
    torch.manual_seed(0)
    carry_on = CarryOn(
        CarryOnConfig(
            input_dims=[base.hidden_size] * 2,
            output_dim=base.hidden_size,
            hidden_size=16,
            num_layers=2,
        )
    )
    with torch.no_grad():  # stands in for training: every weight differs from its init
        for parameter in carry_on.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return carry_on, layout


def test_round_trip_gives_identical_logits(tiny_base, tmp_path):
    carry_on, layout = _trained(tiny_base)
    directory = save_carryon(
        tmp_path / "math", carry_on, layout, alpha=0.7, extra={"metrics": {"nll": 1.5}}
    )
    loaded, loaded_layout, config = load_carryon(directory, running_bases=[tiny_base.identity()])
    assert loaded_layout == layout
    assert config["alpha"] == 0.7 and config["metrics"] == {"nll": 1.5}
    assert config["parameters"] == carry_on.num_parameters()
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for name, tensor in carry_on.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.tensor([[5, 9, 17, 33, 2, 8, 120]])
    before = MergedModel(tiny_base, carry_on, layout).logits(ids)
    after = MergedModel(tiny_base, loaded, loaded_layout, alpha=config["alpha"]).logits(
        ids, alpha=1.0
    )
    assert torch.equal(before, after)
    # ...and the carry-on does something, so the equality above could fail.
    assert not torch.equal(before, tiny_base.model(input_ids=ids).logits)


def test_directory_holds_only_json_and_safetensors(tiny_base, tmp_path):
    carry_on, layout = _trained(tiny_base)
    directory = save_carryon(tmp_path / "a", carry_on, layout, alpha=1.0).local_path
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no partial or backup left behind
    config = json.loads((directory / "config.json").read_text())
    assert config["bases"] == [tiny_base.identity()]
    assert config["carry_on"]["input_dims"] == [tiny_base.hidden_size] * 2
    # safetensors, not pickle: the file starts with its little-endian JSON header length.
    header = (directory / "model.safetensors").read_bytes()[:9]
    assert header[8:9] == b"{" and not header.startswith(b"\x80")


def test_saving_again_replaces_the_artifact(tiny_base, tmp_path):
    carry_on, layout = _trained(tiny_base)
    save_carryon(tmp_path / "a", carry_on, layout, alpha=1.0)
    with torch.no_grad():
        carry_on.delta.weight.mul_(2)
    save_carryon(tmp_path / "a", carry_on, layout, alpha=0.5)
    loaded, _, config = load_carryon(tmp_path / "a")
    assert config["alpha"] == 0.5
    assert torch.equal(loaded.delta.weight, carry_on.delta.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_carry_on_trained_in_bfloat16_is_saved_as_float32(tiny_base, tmp_path):
    carry_on, layout = _trained(tiny_base)
    carry_on.to(torch.bfloat16)  # train.param_dtype: bfloat16
    directory = save_carryon(tmp_path / "a", carry_on, layout, alpha=1.0)
    stored = load_file(directory / "model.safetensors")
    assert {tensor.dtype for tensor in stored.values()} == {torch.float32}
    loaded, _, _ = load_carryon(directory)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, carry_on.state_dict()[name].float()), name


def test_loading_against_another_base_names_it(tiny_base, tiny_tokenizer, tmp_path):
    carry_on, layout = _trained(tiny_base)
    directory = save_carryon(tmp_path / "a", carry_on, layout, alpha=1.0)
    other = FrozenBase.from_model("tiny", make_model(len(tiny_tokenizer), seed=1), tiny_tokenizer)
    assert other.fingerprint != tiny_base.fingerprint
    with pytest.raises(ValueError, match="base 'tiny' with fingerprint") as caught:
        load_carryon(directory, running_bases=[other.identity()])
    assert tiny_base.fingerprint in str(caught.value) and other.fingerprint in str(caught.value)
    with pytest.raises(ValueError, match="tokenizer"):
        load_carryon(directory, running_bases=[{**tiny_base.identity(), "tokenizer": "other"}])
    # A server may run more bases than a carry-on reads (a mixture of LLMs beside it); the
    # primary must be the same, and every base the carry-on reads must be running.
    extra = FrozenBase.from_model("extra", make_model(len(tiny_tokenizer), seed=2), tiny_tokenizer)
    load_carryon(directory, running_bases=[tiny_base.identity(), extra.identity()])
    with pytest.raises(ValueError, match="primary"):
        load_carryon(directory, running_bases=[extra.identity(), tiny_base.identity()])
    with pytest.raises(ValueError, match="primary"):
        load_carryon(directory, running_bases=[])


def test_missing_or_foreign_directories_are_refused(tiny_base, tmp_path):
    with pytest.raises(FileNotFoundError, match="no carry-on artifact at .*nowhere; export one first"):
        load_carryon(tmp_path / "nowhere")
    carry_on, layout = _trained(tiny_base)
    directory = save_carryon(tmp_path / "a", carry_on, layout, alpha=1.0).local_path
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_carryon(directory)
    (directory / "config.json").write_text(json.dumps({"format": "something-else/9"}))
    with pytest.raises(ValueError, match="artifact format"):
        read_artifact_config(directory)
