"""The whole pipeline through one local Ray cluster on a tiny model, launched through the
`ray job submit` driver: embed -> train (loss goes down) -> evaluate -> export -> serve ->
one HTTP completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import requests
import yaml

from tests.ray_helpers import read_metrics, tiny_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def finished_run(local_ray, tmp_path_factory, tiny_model_dir, tiny_jsonl):
    config = tiny_config(tmp_path_factory.mktemp("run"), tiny_model_dir, tiny_jsonl)
    path = Path(config.run_dir) / "tiny.yaml"
    path.write_text(yaml.safe_dump(config.model_dump()))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = Path(__file__).resolve().parent.parent / "pipelines" / "carryon.py"
    done = subprocess.run(
        [sys.executable, str(driver), "--config", str(path)], env=env, check=False, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "eval.nll_merged" in done.stdout  # the closing table
    return config, json.loads((Path(config.run_dir) / "reports" / "summary.json").read_text())


def test_pipeline_writes_summary_and_loss_goes_down(finished_run):
    config, summary = finished_run
    on_disk = summary
    for key in ("tokens", "bytes_per_token", "seconds"):
        assert key in on_disk["embed"]
    for key in ("steps", "loss_first", "loss_last", "seconds"):
        assert key in on_disk["train"]
    assert {"nll_base", "nll_merged"} <= on_disk["eval"].keys()
    assert on_disk["carryon"]["parameters"] > 0
    assert summary["train"]["steps"] == 40
    losses = [record["loss"] for record in read_metrics(config_run_dir(config))]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    artifact = config_run_dir(config) / "carryons" / "tiny"
    assert sorted(p.name for p in artifact.iterdir()) == ["config.json", "model.safetensors"]


def test_rerun_reuses_embeddings(finished_run):
    config, _ = finished_run
    from carryon_ray.stages.embed import run_embed

    manifest = run_embed(config, config_run_dir(config), resources={"inference": 1})
    assert manifest["computed_shards"] == 0
    assert manifest["splits"]["train"]["rows"] == 16 and manifest["splits"]["eval"]["rows"] == 8


def test_serve_answers_one_completion(finished_run):
    from carryon_ray.stages.serve import run_server

    config, _ = finished_run
    run_server(config, config_run_dir(config) / "carryons", blocking=False)
    url = f"http://127.0.0.1:{config.serve.port}/v1/completions"
    reply = requests.post(
        url, json={"model": "tiny", "prompt": "What is 3 + 3?", "max_tokens": 4, "temperature": 0}, timeout=60
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "tiny"
    assert body["usage"]["completion_tokens"] >= 1


def config_run_dir(config) -> Path:
    return Path(config.run_dir)
