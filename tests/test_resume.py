"""A driver killed mid-train: rerunning the same command continues from the latest checkpoint
(no checkpointed step trained again, metrics continuous, the summary says where it resumed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml

from tests.ray_helpers import read_metrics, tiny_config

pytestmark = pytest.mark.ray

DRIVER = Path(__file__).resolve().parent.parent / "pipelines" / "carryon.py"


def _last_step(run_dir: Path) -> int:
    try:
        return read_metrics(run_dir)[-1]["step"]
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def test_rerun_after_a_killed_driver_continues_from_the_latest_checkpoint(
    local_ray, tmp_path, tiny_model_dir, tiny_jsonl
):
    config = tiny_config(tmp_path / "run", tiny_model_dir, tiny_jsonl,
                         train={"max_steps": 60, "checkpoint_every": 10, "log_every": 5, "batch_size": 1})
    run_dir = Path(config.run_dir)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config.model_dump()))
    command = [sys.executable, str(DRIVER), "--config", str(path)]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}

    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 300
    while _last_step(run_dir) < 25 and driver.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver, as Ctrl-C twice or a lost laptop would
    driver.wait()
    killed_at = _last_step(run_dir)
    assert 25 <= killed_at < 60, f"the driver was meant to die mid-train, at step {killed_at}"

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "reports" / "summary.json").read_text())
    resumed = summary["train"]["resumed_from"]
    # The latest checkpoint before the kill: a multiple of 10 at most the last step recorded.
    assert resumed is not None and resumed % 10 == 0 and killed_at - 10 < resumed <= killed_at
    assert summary["train"]["steps"] == 60
    records = read_metrics(run_dir)
    assert [record["step"] for record in records] == list(range(1, 61))  # each step once
    assert all(record.get("resumed_from") == resumed for record in records if record["step"] > resumed)
    assert all("resumed_from" not in record for record in records if record["step"] <= resumed)
    # The resumed run continues the same epoch order: its first batch is the one a run that
    # never stopped would have trained, so its loss continues the curve.
    losses = [record["loss"] for record in records]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
