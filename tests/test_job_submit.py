"""Against one `ray start --head` cluster: `carryon run` without RAY_ADDRESS joins it, and
`ray job submit` of a pipeline whose stages end with deploy succeeds and leaves an endpoint that
answers a completion with the new carry-on after the job finished."""

from __future__ import annotations

import json
import os
import re
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


@pytest.fixture(scope="module")
def head_node():
    """A head node started as a user would (`ray start --head --block`, so ending the command
    ends the cluster), once for the module; yields its dashboard address, its GCS port and the
    environment a user's shell would have (Ray's temp directory under a short RAY_TMPDIR of
    its own, where `ray start` records the cluster as it does under /tmp/ray)."""
    if ray.is_initialized():
        ray.shutdown()
    dashboard, port = free_port(), free_port()
    short_dir = tempfile.mkdtemp(prefix="ray-")  # Ray's socket paths must stay under 108 bytes
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_TMPDIR=short_dir)
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
         "--num-cpus=4", '--resources={"inference": 100, "training": 100}', "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for(f"{address}/api/version", 120, head)
        yield address, port, env
    finally:
        head.terminate()
        head.wait(timeout=120)
        shutil.rmtree(short_dir, ignore_errors=True)


def test_carryon_run_joins_the_running_head_without_ray_address(
    head_node, tmp_path, tiny_model_dir, tiny_jsonl
):
    _, port, env = head_node
    config = tiny_config(tmp_path / "run", tiny_model_dir, tiny_jsonl, train={"max_steps": 4},
                         stages=["embed", "train"])
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config.model_dump()))
    user_env = {key: value for key, value in env.items() if key != "RAY_AUTH_MODE"}
    done = subprocess.run(
        [sys.executable, "-m", "carryon_ray.cli", "run", str(path)],
        env=user_env, capture_output=True, text=True, timeout=600, check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    joined = re.search(r"joined the Ray cluster at (\S+)", output)
    assert joined and joined.group(1).endswith(f":{port}"), output[-3000:]
    assert "started a local Ray node" not in output
    summary = json.loads((tmp_path / "run" / "reports" / "summary.json").read_text())
    assert summary["train"]["steps"] == 4


def test_deploy_stage_under_ray_job_submit_leaves_a_serving_endpoint(
    head_node, tmp_path, tiny_model_dir, tiny_jsonl
):
    address, _, env = head_node
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
    job = re.search(r"raysubmit_\w+", submit.stdout).group(0)
    query = ("import sys; from ray.job_submission import JobSubmissionClient; "
             "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]))")
    status = subprocess.run(
        [sys.executable, "-c", query, address, job],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert status.stdout.split()[-1:] == ["SUCCEEDED"], status.stdout + status.stderr[-2000:]
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
