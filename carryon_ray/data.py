"""Token sequences from raw rows: field mapping, target masks, the fixed split, packing.

Field mappings (`data.fields`):
- `prompt_answer`: `PROMPT_TEMPLATE.format(prompt) + " " + answer + eos`, loss on the answer
  tokens (`loss_on: answer`) or on all tokens;
- `messages`: a chat list rendered with the primary's chat template, loss on the assistant
  turns (their content and end-of-turn markers) or on all tokens;
- `text`: documents packed (eos-separated) into `max_length` chunks with the loss on every
  token, or one sequence per document when `pack: false`.

An over-long sequence is truncated or dropped (`data.overlong`) and counted; a malformed row
(missing or empty field, bad chat list) is counted with a reason, never silently dropped.

The split is made on usable documents (or examples) before packing, so no document gives
tokens to both sides: the first `train_size` train, the next `eval_size` are held out, and each
side is packed on its own; reading stops once both sides have their rows. A split the data
cannot honour is a `ValueError`, not a shorter run.

Each step works on one row (`unit_of`, `account`) or on the kept rows (`split_and_pack`), so
`build_examples` (in one process) and the embed stage's Ray Data stream (`stages/corpus.py`)
share them and make the same examples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from carryon_ray.config import DataSpec
from carryon_ray.readers import DataReport, RawRow, iter_raw_rows, resolve_format

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "Question: {prompt}\nAnswer:"
STATUSES = ("ok", "truncated", "malformed", "dropped")  # what became of one row

__all__ = [
    "PROMPT_TEMPLATE", "DataReport", "Example", "account", "build_examples", "check_chat_template",
    "check_dataset", "split_and_pack", "unit_of",
]


@dataclass
class Example:
    id: str
    input_ids: list[int]
    target_mask: list[int]  # 1 where the token is a training target


def check_dataset(spec: DataSpec) -> None:
    """Raise now (on the driver) if `data.dataset` cannot be read."""
    resolve_format(spec)


def check_chat_template(spec: DataSpec, tokenizer) -> None:
    """`fields: messages` renders chats with the primary's template: refuse a tokenizer without."""
    if spec.resolved_fields == "messages" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "data.fields=messages needs a chat template, but the primary's tokenizer has none; "
            "use fields prompt_answer or text"
        )


def report_unit(spec: DataSpec) -> str:
    """What `train_size` / `eval_size` count."""
    return "documents" if spec.resolved_fields == "text" else "examples"


def build_examples(spec: DataSpec, tokenizer) -> tuple[list[Example], list[Example], DataReport]:
    """Tokenize, split, then pack, in this process: (training sequences, held-out sequences,
    report). The embed stage runs the same steps as a Ray Data stream (`stages/corpus.py`).

    Rows are read in order until `train_size + eval_size` usable documents (text) or examples
    (prompt/answer, chat) are found; the first `train_size` train and the rest are held out;
    packed text is cut into chunks per side. Raises `ValueError` when the data cannot honour
    the split (see `split_sizes`) or when a side has no target token to learn from or score.
    """
    check_chat_template(spec, tokenizer)
    report = DataReport(unit=report_unit(spec))
    wanted = spec.train_size + spec.eval_size
    units: list[Example] = []
    for raw in iter_raw_rows(spec):
        if len(units) >= wanted:
            break
        status, unit, problem = unit_of(raw, spec, tokenizer)
        account(report, status, problem)
        if unit is not None:
            units.append(unit)
    train, held_out = split_and_pack(units, spec, report)
    return train, held_out, report


def unit_of(raw: RawRow, spec: DataSpec, tokenizer) -> tuple[str, Example | None, str | None]:
    """One row -> (status, unit, problem). The unit is the row's example, or for packed text
    its document (token ids + eos, loss everywhere); status is one of `STATUSES`."""
    if raw.problem is not None:
        return "malformed", None, raw.problem
    fields = spec.resolved_fields
    if fields == "prompt_answer":
        return _prompt_answer(raw, spec, tokenizer)
    if fields == "messages":
        return _chat(raw, spec, tokenizer)
    ids = _document(raw, spec, tokenizer)
    if isinstance(ids, str):
        return "malformed", None, ids
    if spec.pack:
        return "ok", Example(raw.id, ids, [1] * len(ids)), None
    return _fitted(raw.id, ids, [1] * len(ids), spec)


def account(report: DataReport, status: str, problem: str | None) -> None:
    """Count one row read in `report`."""
    report.rows += 1
    if status == "malformed":
        report.note(problem or "unreadable row")
    elif status == "dropped":
        report.dropped_overlong += 1
    elif status == "truncated":
        report.truncated += 1


def split_and_pack(
    units: list[Example], spec: DataSpec, report: DataReport
) -> tuple[list[Example], list[Example]]:
    """The usable units in input order (at most `train_size + eval_size`) -> (training
    sequences, held-out sequences); fills the split half of `report`."""
    packed = spec.resolved_fields == "text" and spec.pack
    report.unit = report_unit(spec)
    report.usable = len(units)
    if report.malformed or report.truncated or report.dropped_overlong:
        logger.warning(
            "data: %d rows read, %d malformed, %d truncated, %d dropped as over-long; first "
            "problems: %s", report.rows, report.malformed, report.truncated,
            report.dropped_overlong, report.problems[:5],
        )
    if not units:
        raise ValueError(
            f"data.dataset '{spec.dataset}' produced no usable examples ({report.rows} rows read, "
            f"{report.malformed} malformed); check the file and the field names "
            f"(prompt_field={spec.prompt_field!r}, answer_field={spec.answer_field!r}, "
            f"text_field={spec.text_field!r})"
        )
    train_count, eval_count = split_sizes(len(units), spec, report)
    train_units, eval_units = units[:train_count], units[train_count : train_count + eval_count]
    if packed:
        train = _pack([unit.input_ids for unit in train_units], "train", spec)
        held_out = _pack([unit.input_ids for unit in eval_units], "eval", spec)
    else:
        train, held_out = train_units, eval_units
    report.train_used, report.eval_used = len(train_units), len(eval_units)
    report.train_sequences, report.eval_sequences = len(train), len(held_out)
    report.examples = len(train) + len(held_out)
    _check_targets(train, held_out, spec, report)
    logger.info(
        "data split: %d %s -> %d training sequences; %d %s -> %d held-out sequences",
        report.train_used, report.unit, report.train_sequences,
        report.eval_used, report.unit, report.eval_sequences,
    )
    return train, held_out


def split_sizes(usable: int, spec: DataSpec, report: DataReport) -> tuple[int, int]:
    """(train, held-out) counts of usable documents/examples: as asked, or scaled down with
    `data.shrink_split`, each side keeping at least one when the other asks for any."""
    asked = spec.train_size + spec.eval_size
    report.train_asked, report.eval_asked = spec.train_size, spec.eval_size
    if usable >= asked:
        return spec.train_size, spec.eval_size
    lost = f"{report.rows:,} rows read: {report.malformed:,} malformed"
    if report.dropped_overlong:
        lost += f", {report.dropped_overlong:,} dropped as over-long"
    have = f"data.dataset '{spec.dataset}' has {usable:,} usable {report.unit} ({lost})"
    if not spec.shrink_split:
        raise ValueError(
            f"{have}, but data.train_size={spec.train_size} + data.eval_size={spec.eval_size} "
            f"ask for {asked:,}; lower them, or set data.shrink_split: true "
            "to scale both down proportionally"
        )
    if spec.eval_size and usable < 2:
        raise ValueError(
            f"{have}: too few for one on each side of the split even with data.shrink_split; "
            "add data, or set data.eval_size: 0 to train without a held-out side"
        )
    held = min(max(round(usable * spec.eval_size / asked), 1), usable - 1) if spec.eval_size else 0
    report.shrunk = True
    logger.warning(
        "data.shrink_split: %d usable %s for train_size=%d + eval_size=%d; the split is "
        "shrunk proportionally to %d + %d",
        usable, report.unit, spec.train_size, spec.eval_size, usable - held, held,
    )
    return usable - held, held


def _scored(examples: list[Example]) -> int:
    """Sequences with a target token after position 0 (token t is predicted from t-1)."""
    return sum(any(example.target_mask[1:]) for example in examples)


def _check_targets(
    train: list[Example], held_out: list[Example], spec: DataSpec, report: DataReport
) -> None:
    """Refuse a training side with nothing to learn, or a held-out side with nothing to score."""
    hint = "data.loss_on, data.max_length" + (
        " and the chat template" if spec.resolved_fields == "messages" else ""
    )
    if not _scored(train):
        raise ValueError(
            f"data: the training side ({report.train_used:,} {report.unit} -> {len(train):,} "
            f"sequences) has no target token to learn from; check {hint}"
        )
    if spec.eval_size and not _scored(held_out):
        raise ValueError(
            f"data: the held-out side ({report.eval_used:,} {report.unit} -> {len(held_out):,} "
            f"sequences) has no sequence with a target token to score; raise data.eval_size "
            f"(check {hint}), or set data.eval_size: 0 to train without held-out scoring"
        )


def _fitted(
    row_id: str, ids: list[int], mask: list[int], spec: DataSpec, *, keep: int = 1
) -> tuple[str, Example | None, str | None]:
    """Apply the over-long policy; `keep` tokens must survive truncation (the prompt)."""
    if len(ids) <= spec.max_length:
        return "ok", Example(row_id, ids, mask), None
    if spec.overlong == "drop" or keep >= spec.max_length - 1:
        return "dropped", None, None
    return "truncated", Example(row_id, ids[: spec.max_length], mask[: spec.max_length]), None


def _prompt_answer(raw: RawRow, spec: DataSpec, tokenizer) -> tuple[str, Example | None, str | None]:
    prompt, answer = raw.record.get(spec.prompt_field), raw.record.get(spec.answer_field)
    if not isinstance(prompt, str) or not isinstance(answer, str) or not answer.strip():
        return "malformed", None, (
            f"row {raw.id}: missing or empty '{spec.prompt_field}'/'{spec.answer_field}'"
        )
    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer(PROMPT_TEMPLATE.format(prompt=prompt))["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids + ([eos] if eos is not None else [])
    on_answer = 1 if spec.loss_on == "answer" else 0
    mask = [1 - on_answer] * len(prompt_ids) + [1] * len(answer_ids)
    return _fitted(raw.id, prompt_ids + answer_ids, mask, spec, keep=len(prompt_ids))


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


def _chat(raw: RawRow, spec: DataSpec, tokenizer) -> tuple[str, Example | None, str | None]:
    messages = raw.record.get(spec.messages_field)
    problem = _check_messages(messages)
    if problem:
        return "malformed", None, f"row {raw.id}: '{spec.messages_field}' is {problem}"
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
    return _fitted(raw.id, ids, mask, spec, keep=first_target)


def _document(raw: RawRow, spec: DataSpec, tokenizer) -> list[int] | str:
    """A text row's token ids + eos, or why the row is unusable."""
    text = raw.record.get(spec.text_field)
    if not isinstance(text, str) or not text.strip():
        return f"row {raw.id}: missing or empty '{spec.text_field}'"
    eos = tokenizer.eos_token_id
    return tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])


def _pack(documents: list[list[int]], split: str, spec: DataSpec) -> list[Example]:
    """Concatenate one side's documents (eos-separated) and cut into `max_length` chunks.

    Ids carry the side's name (`train-000000`, `eval-000000`), so they stay unique across both.
    """
    stream = [token for ids in documents for token in ids]
    length = spec.max_length
    chunks = [stream[start : start + length] for start in range(0, len(stream), length)]
    return [
        Example(f"{split}-{number:06d}", chunk, [1] * len(chunk))
        for number, chunk in enumerate(chunks)
        if len(chunk) > 1
    ]
