"""Carry-on artifacts: config.json + model.safetensors, identical after a round trip, base-checked."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from carryon_ray import artifacts
from carryon_ray.artifacts import (
    ArtifactError,
    artifact_files,
    artifact_version,
    load_carryon,
    read_artifact_config,
    save_carryon,
)
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
    directory = artifact_files(save_carryon(tmp_path / "a", carry_on, layout, alpha=1.0)).local_path
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
    stored = load_file(artifact_files(directory) / "model.safetensors")
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
    directory = artifact_files(save_carryon(tmp_path / "a", carry_on, layout, alpha=1.0)).local_path
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_carryon(directory)
    (directory / "config.json").write_text(json.dumps({"format": "something-else/9"}))
    with pytest.raises(ValueError, match="artifact format"):
        read_artifact_config(directory)


# ---------------------------------------------------------------------------------------------
# Validation before anything is allocated


@pytest.fixture()
def saved(tiny_base, tmp_path):
    """A valid artifact directory, holding its files directly (as an artifact copied by hand
    is read), and its config.json as a dict."""
    carry_on, layout = _trained(tiny_base)
    published = save_carryon(tmp_path / "published", carry_on, layout, alpha=1.0)
    directory = Path(shutil.copytree(artifact_files(published).local_path, tmp_path / "a"))
    return directory, json.loads((directory / "config.json").read_text())


def _rewrite(directory, config: dict) -> None:
    (directory / "config.json").write_text(json.dumps(config))


def test_truncated_weights_are_refused(saved):
    directory, _ = saved
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    for cut in (len(data) - 16, 40, 4):
        weights.write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match="carry-on a: model.safetensors is not a readable"):
            load_carryon(directory)


def test_weights_of_the_wrong_shapes_or_names_are_refused(saved):
    directory, _ = saved
    state = load_file(directory / "model.safetensors")
    wrong = {**state, "delta.weight": torch.zeros(3, 5)}
    save_file(wrong, directory / "model.safetensors")
    with pytest.raises(ArtifactError, match=r"wrong shapes: delta.weight \[3, 5\]"):
        load_carryon(directory)
    missing = {name: tensor for name, tensor in state.items() if name != "gate.bias"}
    save_file(missing, directory / "model.safetensors")
    with pytest.raises(ArtifactError, match=r"missing tensors \['gate.bias'\]"):
        load_carryon(directory)
    save_file({**state, "stowaway": torch.zeros(1)}, directory / "model.safetensors")
    with pytest.raises(ArtifactError, match="unexpected tensors"):
        load_carryon(directory)
    save_file({**state, "gate.bias": state["gate.bias"].long()}, directory / "model.safetensors")
    with pytest.raises(ArtifactError, match="dtypes"):
        load_carryon(directory)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop("alpha"), "alpha: Field required"),
        (lambda c: c.pop("carry_on"), "carry_on: Field required"),
        (lambda c: c["carry_on"].pop("output_dim"), "carry_on.output_dim: Field required"),
        (lambda c: c["carry_on"].update(surprise=1), "carry_on.surprise: Extra inputs"),
        (lambda c: c["layout"].update(surprise=1), "layout.surprise: Extra inputs"),
        (lambda c: c["carry_on"].update(num_layers="2"), "carry_on.num_layers: Input should be"),
        (lambda c: c["carry_on"].update(hidden_size=True), "carry_on.hidden_size"),
        (lambda c: c.update(alpha=float("inf")), "alpha"),
        (lambda c: c.update(alpha=-1), "alpha"),
        (lambda c: c["carry_on"].update(num_heads=3), "not a multiple of num_heads"),
        (lambda c: c["carry_on"].update(input_dims=[32]), "differ from input_dims"),
        (lambda c: c["layout"].update(codec="zip"), "layout.codec"),
        (lambda c: c["layout"]["residual"].update(key="nowhere.9"), "name layers it lacks"),
        (lambda c: c["layout"].update(bases=[]), "layout.bases"),
        (lambda c: c["carry_on"].update(max_positions=10**12), "carry_on.max_positions"),
    ],
)
def test_config_off_its_schema_is_refused_naming_the_key(saved, change, message):
    directory, config = saved
    change(config)
    _rewrite(directory, config)
    with pytest.raises(ArtifactError, match="carry-on a") as caught:
        load_carryon(directory)
    assert message in str(caught.value)


def test_config_that_is_not_json_is_refused(saved):
    directory, _ = saved
    (directory / "config.json").write_bytes(b"\xff{not json")
    with pytest.raises(ArtifactError, match="config.json is not valid JSON"):
        load_carryon(directory)


def test_absurd_sizes_fail_before_any_allocation(saved, monkeypatch):
    directory, config = saved

    def no_module(*args, **kwargs):
        raise AssertionError("a carry-on was built for an invalid artifact")

    monkeypatch.setattr(artifacts, "CarryOn", no_module)
    for key, value in (("hidden_size", 10**9), ("num_layers", 10**6), ("output_dim", 2**40)):
        _rewrite(directory, {**config, "carry_on": {**config["carry_on"], key: value}})
        started = time.perf_counter()
        with pytest.raises(ArtifactError, match=f"carry_on.{key}"):
            load_carryon(directory)
        assert time.perf_counter() - started < 1.0
    # Within every bound, but too many parameters together: counted on the meta device (no
    # memory), refused before the real module is built.
    monkeypatch.undo()
    wide = {**config["carry_on"], "hidden_size": 65536, "num_layers": 8, "num_heads": 1}
    _rewrite(directory, {**config, "carry_on": wide})
    with pytest.raises(ArtifactError, match="parameters, over"):
        load_carryon(directory)


def test_layers_are_checked_against_the_running_bases(saved, tiny_base):
    directory, _ = saved
    shapes = {"tiny": (tiny_base.num_layers, tiny_base.hidden_size)}
    load_carryon(directory, running_bases=[tiny_base.identity()], running_shapes=shapes)
    with pytest.raises(ArtifactError, match="not a layer of the running base 'tiny'"):
        load_carryon(directory, running_shapes={"tiny": (1, tiny_base.hidden_size)})
    with pytest.raises(ArtifactError, match="width"):
        load_carryon(directory, running_shapes={"tiny": (tiny_base.num_layers, 48)})


def test_version_changes_with_either_file(saved):
    directory, _ = saved
    before = artifact_version(directory)
    weights = directory / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert artifact_version(directory) != before
