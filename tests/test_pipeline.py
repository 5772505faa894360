"""The whole pipeline through one local Ray cluster on a tiny model, launched through the
`ray job submit` driver: embed -> train (loss goes down) -> export -> evaluate -> deploy, then
one HTTP completion from the endpoint the finished driver left behind."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import requests
import yaml

from carryon_ray.artifacts import artifact_files
from tests.ray_helpers import read_metrics, tiny_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def finished_run(local_ray, tmp_path_factory, tiny_model_dir, tiny_jsonl):
    # Under folders named `train` and `eval`: a shard's split must come from the plan, not its path.
    run_dir = tmp_path_factory.mktemp("pipeline") / "train" / "eval" / "run"
    run_dir.mkdir(parents=True)
    config = tiny_config(run_dir, tiny_model_dir, tiny_jsonl,
                         stages=["embed", "train", "export", "evaluate", "deploy"])
    path = Path(config.run_dir) / "tiny.yaml"
    path.write_text(yaml.safe_dump(config.model_dump()))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = Path(__file__).resolve().parent.parent / "pipelines" / "carryon.py"
    done = subprocess.run(
        [sys.executable, str(driver), "--config", str(path)], env=env, check=False, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "eval.nll_merged" in done.stdout  # the closing table
    assert f"serving on http://127.0.0.1:{config.serve.port}/v1" in done.stdout
    return config, json.loads((Path(config.run_dir) / "reports" / "summary.json").read_text())


def test_pipeline_writes_summary_and_loss_goes_down(finished_run):
    config, summary = finished_run
    on_disk = summary
    for key in ("tokens", "bytes_per_token", "seconds"):
        assert key in on_disk["embed"]
    for key in ("steps", "loss_first", "loss_last", "seconds"):
        assert key in on_disk["train"]
    assert {"nll_base", "nll_merged", "nll_train_path", "skew"} <= on_disk["eval"].keys()
    # The skew is the training path minus the serving path on the same tokens: small, finite.
    assert math.isfinite(on_disk["eval"]["skew"]) and abs(on_disk["eval"]["skew"]) < 0.5
    assert on_disk["eval"]["skew"] == pytest.approx(
        on_disk["eval"]["nll_train_path"] - on_disk["eval"]["nll_merged"])
    assert on_disk["eval"]["artifact"] == on_disk["carryon"]["path"]  # scored what is served
    assert on_disk["train"]["resumed_from"] is None
    assert on_disk["carryon"]["parameters"] > 0
    assert summary["train"]["steps"] == 40
    losses = [record["loss"] for record in read_metrics(config_run_dir(config))]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    artifact = artifact_files(config_run_dir(config) / "carryons" / "tiny").local_path
    assert sorted(p.name for p in artifact.iterdir()) == ["config.json", "eval.json", "model.safetensors"]
    # Scored, then promoted past the base (nothing was current before): what the server serves.
    promotion = summary["promotion"]["tiny"]
    assert promotion["promoted"] and "beats the base" in promotion["reason"], promotion
    assert artifact.name == promotion["version"] == on_disk["eval"]["version"]


def test_rerun_of_the_same_command_reuses_embeddings_and_training(finished_run):
    config, first = finished_run
    from carryon_ray.pipeline import Pipeline

    summary = Pipeline(config).run(["embed", "train", "export"])
    assert summary["embed"]["computed_shards"] == 0
    assert summary["train"]["reused"] and summary["train"]["steps"] == first["train"]["steps"]
    manifest = json.loads((Path(config.run_dir) / "embeddings" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 16 and manifest["splits"]["eval"]["rows"] == 8


def test_splits_come_from_the_plan_under_folders_named_train_and_eval(finished_run):
    config, summary = finished_run
    run_dir = Path(config.run_dir)
    assert {"train", "eval"} <= set(run_dir.parts)
    splits = json.loads((run_dir / "embeddings" / "manifest.json").read_text())["splits"]
    assert splits["train"]["rows"] == config.data.train_size == 16
    assert splits["eval"]["rows"] == config.data.eval_size == 8
    assert splits["train"]["shards"] and splits["eval"]["shards"]
    assert not set(splits["train"]["shards"]) & set(splits["eval"]["shards"])
    assert summary["embed"]["rows"] == config.data.train_size + config.data.eval_size
    assert summary["eval"]["rows"] == config.data.eval_size  # scored only the held-out rows


def test_deployed_endpoint_answers_after_the_driver_exited(finished_run):
    _, summary = finished_run
    url = f"{summary['deploy']['endpoint']}/completions"
    reply = requests.post(
        url, json={"model": "tiny", "prompt": "What is 3 + 3?", "max_tokens": 4, "temperature": 0}, timeout=60
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "tiny"
    assert body["usage"]["completion_tokens"] >= 1


def config_run_dir(config) -> Path:
    return Path(config.run_dir)
