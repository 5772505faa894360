"""Helpers shared by the tests that start Ray: a tiny pipeline config and a free port."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from carryon_ray.config import PipelineConfig, validate_config


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_config(run_dir: Path, model_dir: Path, data: Path, **sections) -> PipelineConfig:
    raw = {
        "name": "tiny",
        "run_dir": str(run_dir),
        "bases": [{"name": "tiny", "path": str(model_dir)}],
        "carry_on": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_positions": 256},
        "data": {"dataset": str(data), "train_size": 16, "eval_size": 8, "max_length": 64},
        "embed": {"batch_size": 4, "rows_per_shard": 8, "torch_threads": 1},
        "train": {
            "max_steps": 40, "batch_size": 4, "learning_rate": 0.003, "warmup_steps": 2,
            "checkpoint_every": 20, "log_every": 5, "torch_threads": 1,
        },
        "serve": {"port": free_port()},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return validate_config(raw)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "reports" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
