"""The KubeRay manifests in deploy/kuberay/ agree with the code they run (no cluster needed).

Every manifest parses; the RayJob's entrypoint is a real `carryon` command on a config in
configs/ that validates; every role resource the stages ask for (the `resources` fields of the
config sections) is offered by a worker group, and the inference group has GPUs; the RayService
serves deploy/serve.yaml's applications on the job's object-storage run directory.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from carryon_ray import cli
from carryon_ray.config import (
    EmbedSpec,
    EvaluateSpec,
    PipelineConfig,
    ServeSpec,
    TrainSpec,
    load_config,
)

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "deploy" / "kuberay"
KINDS = {("ray.io/v1", "RayJob"), ("ray.io/v1", "RayService"), ("v1", "Secret")}
S3_SECRET = "carryon-s3"
# The config section whose `resources` a stage asks for (search trials use train.resources).
STAGE_SECTION = {
    "embed": "embed",
    "train": "train",
    "search": "train",
    "evaluate": "evaluate",
    "deploy": "serve",
}
GPU = "nvidia.com/gpu"


def manifest_paths() -> list[Path]:
    return sorted(KUBERAY.glob("*.yaml"))


def documents() -> list[tuple[Path, dict]]:
    return [
        (path, doc)
        for path in manifest_paths()
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


def only(kind: str) -> dict:
    found = [doc for _, doc in documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {KUBERAY}, found {len(found)}"
    return found[0]


def cluster_of(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def groups(cluster: dict) -> list[dict]:
    """Head group first, then the worker groups."""
    return [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]


def offered(group: dict) -> dict[str, float]:
    """Custom resources a group's `ray start` offers. KubeRay's documented form is a JSON string
    inside a string (`'"{\\"inference\\": 100}"'`); plain JSON is read too."""
    text = group["rayStartParams"].get("resources")
    if text is None:
        return {}
    value = json.loads(text)
    return json.loads(value) if isinstance(value, str) else value


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def gpu_limit(group: dict) -> float:
    return sum(
        float(c.get("resources", {}).get("limits", {}).get(GPU, 0)) for c in containers(group)
    )


def job_command():
    """The RayJob's entrypoint parsed by the `carryon` parser, and the config it names."""
    argv = shlex.split(only("RayJob")["spec"]["entrypoint"])
    assert argv[0] == "carryon", f"the entrypoint runs {argv[0]!r}, not the carryon command"
    args = cli._parser().parse_args(argv[1:])
    return args, load_config(ROOT / args.config, args.overrides)


def asked(config: PipelineConfig, stages: list[str]) -> dict[str, float]:
    """Each role resource the stages ask for, at the largest amount any of them asks."""
    wanted: dict[str, float] = {}
    for stage in stages:
        if stage in STAGE_SECTION:
            for name, amount in getattr(config, STAGE_SECTION[stage]).resources.items():
                wanted[name] = max(wanted.get(name, 0.0), amount)
    return wanted


def assert_offered(doc: dict, wanted: dict[str, float]) -> None:
    workers = cluster_of(doc).get("workerGroupSpecs", [])
    for name, amount in wanted.items():
        assert any(offered(group).get(name, 0) >= amount for group in workers), (
            f"{doc['metadata']['name']}: no worker group offers the '{name}' resource "
            f"({amount} asked); add it to a group's rayStartParams.resources"
        )


def test_every_manifest_parses_with_a_known_kind():
    paths = manifest_paths()
    assert paths, f"no manifests in {KUBERAY}"
    seen = set()
    for path, doc in documents():
        assert (doc.get("apiVersion"), doc.get("kind")) in KINDS, (
            f"{path.name}: {doc.get('apiVersion')}/{doc.get('kind')}"
        )
        seen.add(doc["kind"])
    assert {"RayJob", "RayService", "Secret"} <= seen


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_cluster_spec_matches_ray_image_and_storage(kind):
    doc = only(kind)
    cluster = cluster_of(doc)
    assert cluster["rayVersion"] == importlib.metadata.version("ray")
    secret = only("Secret")
    assert secret["metadata"]["name"] == S3_SECRET
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    workdir = re.search(
        r"^WORKDIR\s+(\S+)", (KUBERAY / "Dockerfile").read_text(), re.MULTILINE
    ).group(1)
    names = [group.get("groupName") for group in cluster["workerGroupSpecs"]]
    assert len(set(names)) == len(names), f"worker group names repeat: {names}"
    for group in groups(cluster):
        params = group["rayStartParams"]
        assert all(isinstance(value, str) for value in params.values()), (
            f"rayStartParams must be strings: {params}"
        )
        for container in containers(group):
            assert container["workingDir"] == workdir, (
                "relative config paths resolve in the image's WORKDIR"
            )
            sources = [
                source["secretRef"]["name"]
                for source in container.get("envFrom", [])
                if "secretRef" in source
            ]
            assert S3_SECRET in sources, f"{container['name']} does not read the S3 credentials"
    assert not offered(cluster["headGroupSpec"]), "the head carries no role: stages run on workers"


def test_rayjob_runs_a_carryon_command_on_object_storage():
    args, config = job_command()
    assert args.command in cli.COMMANDS
    assert Path(args.config).parts[0] == "configs" and (ROOT / args.config).is_file()
    assert config.run_dir.startswith("s3://"), f"run_dir {config.run_dir} is not on object storage"


def test_rayjob_offers_every_role_the_stages_ask_for():
    job = only("RayJob")
    defaults = {**EmbedSpec().resources, **TrainSpec().resources, **EvaluateSpec().resources}
    assert set(defaults) == {"inference", "training"}
    assert_offered(job, defaults)
    args, config = job_command()
    stages = cli.stage_list(args, config)
    assert {"embed", "evaluate"} <= set(stages) and {"train", "search"} & set(stages)
    assert_offered(job, asked(config, stages))
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        if config.train.use_gpu and "training" in offered(group):
            assert gpu_limit(group) >= 1, "train.use_gpu: the training group needs GPUs"


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_inference_groups_request_gpus(kind):
    inference = [g for g in cluster_of(only(kind))["workerGroupSpecs"] if "inference" in offered(g)]
    assert inference, "no inference group"
    for group in inference:
        gpus = float(group["rayStartParams"].get("num-gpus", 0))
        assert gpus >= 1, f"{group['groupName']}: rayStartParams num-gpus is {gpus}"
        assert gpu_limit(group) == gpus, f"{group['groupName']}: {GPU} limit differs from num-gpus"


def test_rayservice_serves_deploy_serve_yaml_on_the_job_run_dir():
    service = only("RayService")
    cluster_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    local_config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    _, job_config = job_command()
    run_dir = job_config.run_dir
    expected = [
        {**app, "args": {**app.get("args", {}), "run_dir": run_dir}}
        for app in local_config["applications"]
    ]
    assert cluster_config["applications"] == expected
    assert cluster_config.get("proxy_location") == local_config.get("proxy_location")
    assert cluster_config["http_options"]["host"] == "0.0.0.0", (
        "a pod must accept traffic from its Service"
    )
    for app in cluster_config["applications"]:
        module, attribute = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attribute))
        args = dict(app["args"])
        path = args.pop("config")
        assert (ROOT / path).is_file()
        config = load_config(
            ROOT / path, [f"{key}={value}" for key, value in args.items()]
        )  # as app_builder does
        assert config.run_dir.startswith("s3://")
        assert_offered(service, asked(config, ["deploy"]))
    assert_offered(service, ServeSpec().resources)


def test_dockerfile_installs_the_readme_torch_before_the_package():
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    readme_torch = re.search(r"pip install (torch==\S+)", (ROOT / "README.md").read_text()).group(1)
    assert f"ARG TORCH={readme_torch}" in dockerfile
    assert dockerfile.index('pip install --no-cache-dir "${TORCH}"') < dockerfile.index(
        "pip install --no-cache-dir -e ."
    )
    ray_version = importlib.metadata.version("ray")
    assert f"rayproject/ray:{ray_version}" in dockerfile
