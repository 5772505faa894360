"""Every input format, field mappings (prompt/answer, text, chat messages), and malformed rows
counted with a reason, never silently dropped, never fatal."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from carryon_ray.config import DataSpec
from carryon_ray.data import build_examples
from carryon_ray.readers import DataReport, read_rows

QA = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}. #### {2 * i}"} for i in range(6)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)


def _spec(path, **kwargs) -> DataSpec:
    """Every usable row on the training side, however many there are."""
    return DataSpec(dataset=str(path), train_size=100, eval_size=0, shrink_split=True, **kwargs)


def _ids(examples) -> list[list[int]]:
    return [example.input_ids for example in examples]


def test_jsonl_parquet_and_saved_hf_give_the_same_examples(tmp_path, tiny_tokenizer):
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(row) for row in QA))
    pq.write_table(pa.Table.from_pylist(QA), tmp_path / "qa.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(QA).save_to_disk(str(tmp_path / "qa_hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(QA)}).save_to_disk(str(tmp_path / "qa_dict"))
    results = [
        build_examples(_spec(tmp_path / name), tiny_tokenizer)[0]
        for name in ("qa.jsonl", "qa.parquet", "qa_hf", "qa_dict")
    ]
    assert len(results[0]) == 6
    assert all(_ids(result) == _ids(results[0]) for result in results)
    assert all(sum(e.target_mask) < len(e.input_ids) for e in results[0])  # answer-only loss


def test_saved_hf_is_read_without_datasets_too(tmp_path, tiny_tokenizer, monkeypatch):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(QA).save_to_disk(str(tmp_path / "qa_hf"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a)
    )
    report = DataReport()
    assert read_rows(_spec(tmp_path / "qa_hf"), report) == QA


def test_plain_text_per_file_and_per_line(tmp_path, tiny_tokenizer):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("first line of a\nsecond line of a\n")
    (folder / "b.txt").write_text("only line of b")
    per_file = read_rows(_spec(folder, loss_on="all"), DataReport())
    per_line = read_rows(_spec(folder, loss_on="all", text_unit="line"), DataReport())
    assert [row["text"] for row in per_file] == ["first line of a\nsecond line of a\n", "only line of b"]
    assert [row["text"] for row in per_line] == ["first line of a", "second line of a", "only line of b"]
    one_each, _, _ = build_examples(_spec(folder, loss_on="all", pack=False, text_unit="line"), tiny_tokenizer)
    assert len(one_each) == 3 and all(all(e.target_mask) for e in one_each)


def test_packing_fills_chunks(tmp_path, tiny_tokenizer):
    path = tmp_path / "book.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    packed, _, report = build_examples(_spec(path, loss_on="all", max_length=32, text_unit="line"), tiny_tokenizer)
    assert all(len(e.input_ids) == 32 for e in packed[:-1]) and report.rows == 40


def test_overlong_documents_are_truncated_or_dropped_and_counted(tmp_path, tiny_tokenizer):
    path = tmp_path / "docs.txt"
    path.write_text("short one\n" + "a long line " * 50 + "\n")
    spec = _spec(path, loss_on="all", pack=False, text_unit="line", max_length=16)
    cut, _, report = build_examples(spec, tiny_tokenizer)
    assert len(cut) == 2 and report.truncated == 1 and max(len(e.input_ids) for e in cut) == 16
    kept, _, report = build_examples(spec.model_copy(update={"overlong": "drop"}), tiny_tokenizer)
    assert len(kept) == 1 and report.dropped_overlong == 1


def test_chat_messages_use_the_template_and_mask_assistant_turns(tmp_path, tiny_tokenizer):
    tokenizer = tiny_tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE
    chats = [
        {"messages": [
            {"role": "user", "content": f"What is {i} + {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ]}
        for i in range(3)
    ] + [{"messages": [{"role": "user", "content": "no reply"}]}, {"messages": "not a list"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in chats))
    try:
        examples, _, report = build_examples(_spec(path, fields="messages"), tokenizer)
    finally:
        tokenizer.chat_template = None
    assert len(examples) == 3 and report.malformed == 2
    example = examples[0]
    targets = [tok for tok, on in zip(example.input_ids, example.target_mask, strict=True) if on]
    text = tiny_tokenizer.decode(targets)
    assert "It is 0." in text and "What is" not in text and "<|endoftext|>" in text


def test_messages_without_a_chat_template_is_a_clear_error(tmp_path, tiny_tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}))
    with pytest.raises(ValueError, match="chat template"):
        build_examples(_spec(path, fields="messages"), tiny_tokenizer)


def test_malformed_rows_in_every_format_are_counted(tmp_path, tiny_tokenizer):
    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"good line one\n\xff\xfe bad bytes\n   \ngood line two\n")
    _, _, report = build_examples(_spec(lines, loss_on="all", pack=False, text_unit="line"), tiny_tokenizer)
    assert report.malformed == 1 and "lines.txt:2" in report.problems[0]
    table = pa.table({
        "question": pa.array([b"ok", b"\xff bad", b"fine"], pa.binary()),
        "answer": ["1", "2", ""],
    })
    pq.write_table(table, tmp_path / "rows.parquet")
    examples, _, report = build_examples(_spec(tmp_path / "rows.parquet"), tiny_tokenizer)
    assert len(examples) == 1 and report.malformed == 2 and report.rows == 3
    assert any("not UTF-8" in p for p in report.problems) and any("empty" in p for p in report.problems)
    bad_file = tmp_path / "bad.txt"
    bad_file.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="1 malformed"):
        build_examples(_spec(bad_file, loss_on="all"), tiny_tokenizer)


def test_text_fields_need_loss_on_all():
    with pytest.raises(ValueError, match="loss_on=all"):
        DataSpec(fields="text", loss_on="answer")


def test_unknown_suffix_and_mixed_directory_are_errors(tmp_path, tiny_tokenizer):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported file type"):
        build_examples(_spec(tmp_path / "x.csv"), tiny_tokenizer)
    (tmp_path / "a.txt").write_text("t")
    (tmp_path / "b.jsonl").write_text("{}")
    with pytest.raises(ValueError, match="one kind of file"):
        build_examples(_spec(tmp_path), tiny_tokenizer)


PYDOC_PACKAGES_HASH = """
import hashlib, json
from carryon_ray.config import DataSpec
from carryon_ray.readers import pydoc_package_rows
rows = [(r.position, r.id, r.record) for r in pydoc_package_rows(DataSpec(dataset="pydoc-packages"))]
print(hashlib.sha256(json.dumps(rows).encode()).hexdigest())
"""


def test_pydoc_packages_is_a_deterministic_multi_tenant_dataset():
    import hashlib
    import subprocess
    import sys
    from pathlib import Path

    from carryon_ray.readers import (
        PYDOC_DOCUMENT_CHARS,
        TENANT_FIELD,
        iter_raw_rows,
        resolve_format,
    )

    spec = DataSpec(dataset="pydoc-packages")
    assert resolve_format(spec) == ("pydoc-packages", None)
    rows = list(iter_raw_rows(spec))
    tenants = {row.record[TENANT_FIELD] for row in rows}
    assert len(tenants) >= 16
    assert all(row.record["text"].strip() and len(row.record["text"]) <= PYDOC_DOCUMENT_CHARS for row in rows)
    assert len({row.id for row in rows}) == len(rows)
    assert [row.position for row in rows] == sorted({row.position for row in rows})
    assert not any(" at 0x" in row.record["text"] or "\nFILE\n" in row.record["text"] for row in rows)
    assert [(r.id, r.record) for r in iter_raw_rows(spec)] == [(r.id, r.record) for r in rows]
    digest = hashlib.sha256(json.dumps([(r.position, r.id, r.record) for r in rows]).encode()).hexdigest()
    fresh = subprocess.run(
        [sys.executable, "-c", PYDOC_PACKAGES_HASH], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert fresh.stdout.strip() == digest
    assert fresh.stderr == ""  # no import-time warnings or prints leak out
