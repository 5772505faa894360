"""Token sequences from raw rows: field mapping, target masks, packing, the fixed split.

Field mappings (`data.fields`):
- `prompt_answer`: `PROMPT_TEMPLATE.format(prompt) + " " + answer + eos`, loss on the answer
  tokens (`loss_on: answer`) or on all tokens;
- `messages`: a chat list rendered with the primary's chat template, loss on the assistant
  turns (their content and end-of-turn markers) or on all tokens;
- `text`: documents packed (eos-separated) into `max_length` chunks with the loss on every
  token, or one sequence per document when `pack: false`.

An over-long sequence is truncated or dropped (`data.overlong`) and counted; a malformed row
(missing or empty field, bad chat list) is counted with a reason, never silently dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from carryon_ray.config import DataSpec
from carryon_ray.readers import DataReport, read_rows, resolve_format

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "Question: {prompt}\nAnswer:"

__all__ = ["PROMPT_TEMPLATE", "DataReport", "Example", "build_examples", "check_dataset"]


@dataclass
class Example:
    id: str
    input_ids: list[int]
    target_mask: list[int]  # 1 where the token is a training target


def check_dataset(spec: DataSpec) -> None:
    """Raise now (on the driver) if `data.dataset` cannot be read."""
    resolve_format(spec)


def build_examples(spec: DataSpec, tokenizer) -> tuple[list[Example], list[Example], DataReport]:
    """Tokenize and split: the first `train_size` examples train, the next `eval_size` evaluate."""
    report = DataReport()
    rows = read_rows(spec, report)
    fields = spec.resolved_fields
    if fields == "prompt_answer":
        examples = _prompt_answer_examples(rows, spec, tokenizer, report)
    elif fields == "messages":
        examples = _chat_examples(rows, spec, tokenizer, report)
    elif spec.pack:
        examples = _packed_examples(rows, spec, tokenizer, report)
    else:
        examples = _document_examples(rows, spec, tokenizer, report)
    report.examples = len(examples)
    if report.malformed or report.truncated or report.dropped_overlong:
        logger.warning(
            "data: %d rows read, %d malformed, %d truncated, %d dropped as over-long; first "
            "problems: %s", report.rows, report.malformed, report.truncated,
            report.dropped_overlong, report.problems[:5],
        )
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


def _fit(
    ids: list[int], mask: list[int], *, spec: DataSpec, report: DataReport, keep: int = 1
) -> tuple[list[int], list[int]] | None:
    """Apply the over-long policy; `keep` tokens must survive truncation (the prompt)."""
    if len(ids) <= spec.max_length:
        return ids, mask
    if spec.overlong == "drop" or keep >= spec.max_length - 1:
        report.dropped_overlong += 1
        return None
    report.truncated += 1
    return ids[: spec.max_length], mask[: spec.max_length]


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
        on_answer = 1 if spec.loss_on == "answer" else 0
        mask = [1 - on_answer] * len(prompt_ids) + [1] * len(answer_ids)
        fitted = _fit(prompt_ids + answer_ids, mask, spec=spec, report=report, keep=len(prompt_ids))
        if fitted is not None:
            examples.append(Example(f"{index:06d}", *fitted))
    return examples


def _check_messages(messages) -> str | None:
    """Why a chat list is unusable, or None."""
    if not isinstance(messages, list) or not messages:
        return "not a non-empty list"
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            return "a turn without a 'role'"
        if not isinstance(turn.get("content"), str):
            return "a turn without string 'content'"
    if not any(turn["role"] == "assistant" and turn["content"].strip() for turn in messages):
        return "no non-empty assistant turn"
    return None


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render a chat and find the character spans of its assistant turns.

    A span runs from the end of the rendered history with the generation prompt to the end of
    the history including the turn, so it covers the reply and its end-of-turn marker.
    """
    render = tokenizer.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for index, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start = len(render(messages[:index], tokenize=False, add_generation_prompt=True)) if index else 0
        end = len(render(messages[: index + 1], tokenize=False))
        spans.append((start, end))
    return text, spans


def _chat_examples(rows, spec: DataSpec, tokenizer, report: DataReport) -> list[Example]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "data.fields=messages needs a chat template, but the primary's tokenizer has none; "
            "use fields prompt_answer or text"
        )
    examples = []
    for index, row in enumerate(rows):
        messages = row.get(spec.messages_field)
        problem = _check_messages(messages)
        if problem:
            report.note(f"row {index}: '{spec.messages_field}' is {problem}")
            continue
        text, spans = assistant_spans(messages, tokenizer)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        if spec.loss_on == "all":
            mask = [1] * len(ids)
        else:
            mask = [
                int(any(start < span_end and end > span_start for span_start, span_end in spans))
                for start, end in encoded["offset_mapping"]
            ]
        first_target = mask.index(1) if 1 in mask else len(mask)
        fitted = _fit(ids, mask, spec=spec, report=report, keep=first_target)
        if fitted is not None:
            examples.append(Example(f"{index:06d}", *fitted))
    return examples


def _documents(rows, spec: DataSpec, tokenizer, report: DataReport):
    """(row index, token ids + eos) for every usable text row."""
    eos = tokenizer.eos_token_id
    for index, row in enumerate(rows):
        text = row.get(spec.text_field)
        if not isinstance(text, str) or not text.strip():
            report.note(f"row {index}: missing or empty '{spec.text_field}'")
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        yield index, ids + ([eos] if eos is not None else [])


def _packed_examples(rows, spec: DataSpec, tokenizer, report: DataReport) -> list[Example]:
    """Concatenate documents (eos-separated) and cut into `max_length` chunks."""
    stream: list[int] = []
    for _, ids in _documents(rows, spec, tokenizer, report):
        stream += ids
    length = spec.max_length
    chunks = [stream[start : start + length] for start in range(0, len(stream), length)]
    return [
        Example(f"{number:06d}", chunk, [1] * len(chunk))
        for number, chunk in enumerate(chunks)
        if len(chunk) > 1
    ]


def _document_examples(rows, spec: DataSpec, tokenizer, report: DataReport) -> list[Example]:
    """One sequence per document (`pack: false`), over-long ones truncated or dropped."""
    examples = []
    for index, ids in _documents(rows, spec, tokenizer, report):
        fitted = _fit(ids, [1] * len(ids), spec=spec, report=report)
        if fitted is not None:
            examples.append(Example(f"{index:06d}", *fitted))
    return examples
