"""The GSM8K problems the pipeline holds out, for the task YAMLs here (`custom_dataset`).

The pipeline's split is fixed (`carryon_ray/data.py`): the packaged file's rows are read in
order, the first `data.train_size` usable ones train and the next `data.eval_size` are held
out. `carryon eval` finds those rows with the pipeline's own `build_examples` and passes their
numbers as task metadata (`rows`). Without it (lm_eval run by hand) the task holds out rows
train_size .. train_size + eval_size - 1 (defaults: SPEC §3's 1,000 / 319), which is the same
set for the demo config: every GSM8K row is well formed, and an over-long one is truncated, not
dropped, under the default `data.overlong: truncate`.
"""

from __future__ import annotations

import json

TRAIN_SIZE = 1000
EVAL_SIZE = 319


def heldout_rows(
    train_size: int = TRAIN_SIZE, eval_size: int = EVAL_SIZE, rows: list[int] | None = None
) -> list[dict]:
    """[{question, answer}] of the held-out problems (`rows`, else the range), in file order."""
    from carryon_ray.config import DataSpec
    from carryon_ray.readers import resolve_format

    _, path = resolve_format(DataSpec(dataset="gsm8k"))
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if train_size + eval_size > len(lines):
        raise ValueError(
            f"GSM8K holds {len(lines)} problems, fewer than train_size {train_size} + eval_size {eval_size}"
        )
    numbers = list(range(train_size, train_size + eval_size)) if rows is None else [int(r) for r in rows]
    if any(not 0 <= number < len(lines) for number in numbers):
        raise ValueError(f"held-out rows outside the {len(lines)} GSM8K problems")
    records = [json.loads(lines[number]) for number in numbers]
    return [{"question": record["question"], "answer": record["answer"]} for record in records]


def heldout(
    train_size: int = TRAIN_SIZE, eval_size: int = EVAL_SIZE, rows: list[int] | None = None, **metadata
) -> dict:
    """lm_eval's `custom_dataset`: {"test": Dataset} of the held-out problems. lm_eval passes
    the task's metadata as keywords (its `version` among them, ignored here)."""
    import datasets

    return {"test": datasets.Dataset.from_list(heldout_rows(int(train_size), int(eval_size), rows))}
