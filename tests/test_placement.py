"""Role placement on a three-node cluster on one machine: a head, a node with the `inference`
resource and a node with `training`. Embed actors, evaluation and Serve replicas must run only
on the inference node; training workers only on the training node. A role no node offers is an
error unless `allow_unpinned`; torch threads follow the CPUs Ray granted."""

from __future__ import annotations

import logging

import pytest
import ray
import requests
from ray.cluster_utils import Cluster

from carryon_ray.pipeline import Pipeline
from carryon_ray.stages.placement import granted_threads, role_resources
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


def test_a_role_no_node_offers_is_an_error_naming_the_fix(role_cluster, caplog):
    assert role_resources({"inference": 1.0}, allow_unpinned=False) == {"inference": 1.0}
    with pytest.raises(ValueError, match="allow_unpinned: true") as error:
        role_resources({"training": 1.0, "tpu_pool": 1.0}, allow_unpinned=False, key="train.resources")
    message = str(error.value)
    assert message.startswith("train.resources asks for 'tpu_pool'")
    assert """--resources='{"tpu_pool": 100}'""" in message
    with caplog.at_level(logging.WARNING, logger="carryon_ray.stages.placement"):
        kept = role_resources({"training": 1.0, "tpu_pool": 1.0}, allow_unpinned=True)
    assert kept == {"training": 1.0}
    assert "tpu_pool" in caplog.text


def test_torch_threads_follow_the_cpus_ray_granted(role_cluster):
    """On a node with 2 CPUs, a task granted one CPU runs one thread, not one per core."""

    @ray.remote
    def threads(override):
        return granted_threads(override)

    on_training = {"resources": {"training": 1}}  # the training node has 2 CPUs
    assert ray.get(threads.options(num_cpus=1, **on_training).remote(None)) == 1
    assert ray.get(threads.options(num_cpus=2, **on_training).remote(None)) == 2
    assert ray.get(threads.options(num_cpus=0.5, **on_training).remote(None)) == 1
    assert ray.get(threads.options(num_cpus=1, **on_training).remote(3)) == 3

    @ray.remote(num_cpus=1, resources={"inference": 1})
    class Replica:
        def threads(self) -> int:
            return granted_threads(None)

    replica = Replica.remote()
    assert ray.get(replica.threads.remote()) == 1
    ray.kill(replica)
    assert granted_threads(None) == 1  # the driver: nothing granted
