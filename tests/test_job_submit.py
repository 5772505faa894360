"""`ray job submit` against a `ray start --head` cluster: a pipeline whose stages end with deploy
leaves an endpoint that answers a completion with the new carry-on after the job finished."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import requests
import yaml

from tests.ray_helpers import free_port, tiny_config

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent


def _wait_for(url: str, seconds: float, head: subprocess.Popen) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited"
        try:
            requests.get(url, timeout=2)  # any answer (401 under token auth too) means it is up
            return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


@pytest.fixture()
def head_node():
    """A head node started as a user would (`ray start --head --block`, so ending the command
    ends the cluster); yields its dashboard address."""
    if ray.is_initialized():
        ray.shutdown()
    dashboard = free_port()
    short_dir = tempfile.mkdtemp(prefix="ray-")  # Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={free_port()}", f"--dashboard-port={dashboard}",
         "--num-cpus=4", '--resources={"inference": 100, "training": 100}', "--disable-usage-stats",
         f"--temp-dir={short_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for(f"{address}/api/version", 120, head)
        yield address, env
    finally:
        head.terminate()
        head.wait(timeout=120)
        shutil.rmtree(short_dir, ignore_errors=True)


def test_deploy_stage_under_ray_job_submit_leaves_a_serving_endpoint(
    head_node, tmp_path, tiny_model_dir, tiny_jsonl
):
    address, env = head_node
    config = tiny_config(tmp_path / "run", tiny_model_dir, tiny_jsonl, train={"max_steps": 10},
                         stages=["embed", "train", "export", "evaluate", "deploy"])
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config.model_dump()))
    submit = subprocess.run(
        ["ray", "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
         sys.executable, "pipelines/carryon.py", "--config", str(path)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert submit.returncode == 0 and "succeeded" in submit.stdout, (submit.stdout + submit.stderr)[-3000:]
    # The job has finished; its Serve application keeps answering with the new carry-on.
    reply = requests.post(
        f"http://127.0.0.1:{config.serve.port}/v1/completions",
        json={"model": "tiny", "prompt": "What is 3 + 3?", "max_tokens": 4, "temperature": 0},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "tiny"
    models = requests.get(f"http://127.0.0.1:{config.serve.port}/v1/models", timeout=30).json()
    assert "tiny" in [card["id"] for card in models["data"]]
