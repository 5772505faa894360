"""The whole pipeline with its run directory on a real S3-compatible server (moto's standalone
server on 127.0.0.1, read through pyarrow's S3FileSystem), on a three-node Ray cluster whose
nodes carry the roles: a head, an `inference` node and a `training` node. Then serving from
that registry answers a completion, and no local folder named after the run appears."""

from __future__ import annotations

import json

import pytest
import ray
import requests
from ray import serve
from ray.cluster_utils import Cluster

from carryon_ray.artifacts import is_artifact
from carryon_ray.pipeline import Pipeline
from carryon_ray.storage import POINTER, location
from tests.ray_helpers import tiny_config

pytestmark = pytest.mark.ray


@pytest.fixture()
def three_nodes(s3_server):
    """Head (no role), an inference node and a training node; started after the S3
    environment is set, so every node's workers inherit it."""
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"inference": 100})
    cluster.add_node(num_cpus=2, resources={"training": 100})
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def test_pipeline_and_serving_on_object_storage(three_nodes, s3_bucket, tiny_model_dir, tiny_jsonl,
                                               tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run_dir mistaken for a local path would land here
    run_dir = f"{s3_bucket}/runs/tiny-s3"
    config = tiny_config(run_dir, tiny_model_dir, tiny_jsonl,
                         stages=["embed", "train", "export", "evaluate", "deploy"],
                         train={"max_steps": 10, "checkpoint_every": 5})
    summary = Pipeline(config).run()
    assert summary["run_dir"] == run_dir

    run = location(run_dir)
    manifest = json.loads((run / "embeddings" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 16 and manifest["splits"]["eval"]["rows"] == 8
    assert len(set(manifest["nodes"])) == 1  # the inference node embedded every shard
    assert (run / "head" / "head.safetensors").is_file()
    assert summary["train"]["steps"] == 10
    assert (run / "reports" / "metrics.jsonl").is_file() and (run / "reports" / "summary.json").is_file()
    # The artifact is published with a versioned prefix and its pointer (no rename on S3).
    artifact = run / "carryons" / "tiny"
    assert is_artifact(artifact) and (artifact / POINTER).is_file()
    assert summary["carryon"]["carryon"] == artifact.uri
    assert summary["carryon"]["path"] == artifact.version(summary["carryon"]["version"]).uri
    assert summary["eval"]["artifact"] == summary["carryon"]["path"]  # scored the new version
    assert summary["promotion"]["tiny"]["promoted"], summary["promotion"]  # then made current
    assert artifact.current_version() == summary["carryon"]["version"]
    assert (artifact.current() / "eval.json").is_file()
    assert summary["deploy"]["registry"] == (run / "carryons").uri

    reply = requests.post(
        f"{summary['deploy']['endpoint']}/completions",
        json={"model": "tiny", "prompt": "What is 3 + 3?", "max_tokens": 4, "temperature": 0},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    listed = requests.get(f"{summary['deploy']['endpoint']}/models", timeout=60).json()
    assert "tiny" in [model["id"] for model in listed["data"]]

    # Nothing landed on the local disk under the run's name (`s3:/bucket/...` or `tiny-s3`).
    stray = [path for path in tmp_path.rglob("*") if "tiny-s3" in path.name or path.name.startswith("s3")]
    assert stray == []


def test_a_local_path_no_other_node_sees_is_refused(monkeypatch, tmp_path):
    """`check_visible` asks every node; a node that cannot see the path is named."""
    from carryon_ray import pipeline

    monkeypatch.setattr(pipeline.ray, "nodes", lambda: [
        {"Alive": True, "NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.1"},
        {"Alive": True, "NodeID": "b" * 56, "NodeManagerAddress": "10.0.0.2"},
    ])
    monkeypatch.setattr(pipeline.ray, "get", lambda refs, timeout=None: [True, False])

    class Remote:
        def options(self, **_):
            return self

        def remote(self, path):
            return path

    monkeypatch.setattr(pipeline.ray, "remote", lambda **_: lambda function: Remote())
    with pytest.raises(ValueError, match=r"run_dir .* nodes at \['10.0.0.2'\] cannot see it; give an object-storage URI"):
        pipeline.check_visible(location(tmp_path), "run_dir", writable=True)
    assert list(tmp_path.iterdir()) == []  # the marker is gone
    pipeline.check_visible(location("s3://bucket/run"), "run_dir", writable=True)  # URIs: nothing to check
