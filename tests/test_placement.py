"""Role placement on a three-node cluster on one machine: a head, a node with the `inference`
resource and a node with `training`. Embed actors, evaluation and Serve replicas must run only
on the inference node; training workers only on the training node."""

from __future__ import annotations

import pytest
import ray
import requests
from ray.cluster_utils import Cluster

from carryon_ray.pipeline import Pipeline
from tests.ray_helpers import read_metrics, tiny_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def role_cluster():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    inference = cluster.add_node(num_cpus=2, resources={"inference": 10})
    training = cluster.add_node(num_cpus=2, resources={"training": 10})
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield inference.node_id, training.node_id
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def test_stages_run_on_their_roles(role_cluster, tmp_path, tiny_model_dir, tiny_jsonl):
    inference_node, training_node = role_cluster
    config = tiny_config(
        tmp_path / "run", tiny_model_dir, tiny_jsonl, train={"max_steps": 4},
        sources=[{"base": "tiny", "layer": -1}, {"base": "tiny", "layer": 0}],
        stages=["embed", "train", "export", "evaluate", "deploy"],
    )
    Pipeline(config).run()

    import json

    manifest = json.loads((tmp_path / "run" / "embeddings" / "manifest.json").read_text())
    assert manifest["nodes"] == [inference_node]
    assert {record["node"] for record in read_metrics(tmp_path / "run")} == {training_node}

    health = requests.get(f"http://127.0.0.1:{config.serve.port}/health", timeout=60).json()
    assert health["node_id"] == inference_node
