"""The pipeline definition: every shipped YAML validates; errors name their keys, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from carryon_ray.config import (
    CONFIG_DIR,
    PipelineConfig,
    apply_overrides,
    load_config,
    validate_config,
)

CONFIGS = sorted(CONFIG_DIR.glob("**/*.yaml"))
MINIMAL = {"bases": [{"name": "tiny", "path": "/models/tiny"}]}


def _error(raw: dict) -> str:
    with pytest.raises(ValueError) as caught:
        validate_config(raw, origin="test.yaml")
    return str(caught.value)


@pytest.mark.parametrize("path", CONFIGS or [None], ids=[p.name for p in CONFIGS] or ["none"])
def test_every_shipped_config_validates(path):
    if path is None:
        pytest.skip("no configs/**/*.yaml yet")
    config = load_config(path)
    assert isinstance(config, PipelineConfig)
    assert config.sources and config.sources[0].base == config.primary.name
    assert config.carry_on.max_positions >= config.data.max_length
    # Nothing a loader would ignore: the YAML's sections are all schema sections.
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(PipelineConfig.model_fields)


def test_defaults_fill_a_minimal_config():
    config = validate_config(MINIMAL)
    assert config.sources[0].base == "tiny" and config.sources[0].layer == -1
    assert (config.bridge.codec, config.bridge.residual_bits, config.bridge.input_bits) == (
        "block_absmax",
        8,
        4,
    )
    assert config.source_bits(config.sources[0]) == 4
    assert load_config().name  # no path: the packaged demo config


def test_unknown_key_is_named():
    message = _error({**MINIMAL, "train": {"epochz": 3}})
    assert "train.epochz" in message and "unknown key" in message
    assert "test.yaml" in message


def test_wrong_type_is_named():
    message = _error({**MINIMAL, "train": {"batch_size": "eight"}})
    assert "train.batch_size" in message and "integer" in message


def test_several_problems_are_reported_at_once():
    message = _error(
        {**MINIMAL, "train": {"epochz": 3}, "embed": {"batch_size": 0}, "serve": {"port": 70000}}
    )
    assert "3 problem(s)" in message
    for key in ("train.epochz", "embed.batch_size", "serve.port"):
        assert key in message


@pytest.mark.parametrize(
    "bridge,key",
    [
        ({"codec": "nf4", "residual_bits": 4, "input_bits": 8}, "bridge.input_bits=8"),
        ({"codec": "blockwise8", "residual_bits": 4}, "bridge.residual_bits=4"),
        ({"codec": "absmax", "input_bits": 3}, "bridge.input_bits=3"),
    ],
)
def test_bits_that_do_not_fit_the_codec_are_refused(bridge, key):
    message = _error({**MINIMAL, "bridge": bridge})
    assert key in message
    assert "choose one of" in message or "use codec 'block_absmax'" in message


def test_source_bits_are_checked_against_the_codec():
    raw = {
        **MINIMAL,
        "bridge": {"codec": "nf4", "residual_bits": 0},
        "sources": [{"base": "tiny", "bits": 8}],
    }
    assert "sources[0].bits=8" in _error(raw)
    assert "not a configured base" in _error({**MINIMAL, "sources": [{"base": "other"}]})


@pytest.mark.parametrize(
    "section,low,high",
    [("train", "min_workers", "max_workers"), ("embed", "min_actors", "max_actors")],
)
def test_min_above_max_is_refused(section, low, high):
    message = _error({**MINIMAL, section: {low: 3, high: 2}})
    assert f"{section}.{low}=3 exceeds {section}.{high}=2" in message


def test_cross_section_checks():
    assert "max_positions=64 is shorter than data.max_length=512" in _error(
        {**MINIMAL, "carry_on": {"max_positions": 64}}
    )
    assert "divisible" in _error({**MINIMAL, "carry_on": {"hidden_size": 30, "num_heads": 4}})
    assert "unique" in _error({"bases": [MINIMAL["bases"][0]] * 2})


def test_overrides_beat_the_yaml(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "train": {"epochs": 2, "batch_size": 8}}))
    config = load_config(
        path,
        [
            "train.epochs=0.5",
            "bridge.input_bits=2",
            "bases.0.dtype=float16",
            "train.max_steps=null",
            "embed.resources={inference: 2}",
            "name=my-run",
        ],
    )
    assert config.train.epochs == 0.5 and config.train.batch_size == 8
    assert config.bridge.input_bits == 2
    assert config.primary.dtype == "float16"
    assert config.train.max_steps is None
    assert config.embed.resources == {"inference": 2}
    assert config.name == "my-run"
    with pytest.raises(ValueError, match="train.epochz"):
        load_config(path, ["train.epochz=1"])


def test_apply_overrides_parses_yaml_scalars_and_rejects_malformed_items():
    raw = apply_overrides({}, ["a.b=3", "a.c=true", "a.d=", "a.e=x=y"])
    assert raw == {"a": {"b": 3, "c": True, "d": "", "e": "x=y"}}
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides({}, ["train.epochs"])
    # An empty YAML section (None) takes overrides like an absent one.
    assert apply_overrides({"train": None}, ["train.epochs=2"]) == {"train": {"epochs": 2}}


@pytest.mark.parametrize(
    "override,match",
    [
        ("name.x=1", "'name.x' is not a settable key"),
        ("bases.5.dtype=float16", "'bases.5.dtype' is not a settable key"),
        ("bases.first.dtype=float16", "'bases.first.dtype' is not a settable key"),
        ("train.epochs=[1,", "not valid YAML"),
    ],
)
def test_overrides_that_cannot_apply_are_value_errors(override, match):
    """The CLI turns ValueErrors into one line; a TypeError or IndexError would be a traceback."""
    raw = {"name": "a", **MINIMAL}
    with pytest.raises(ValueError, match=match):
        apply_overrides(raw, [override])


def test_missing_or_malformed_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(path)
