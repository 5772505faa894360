"""Many tenants through one embed pass, on tiny models through local Ray: every tenant gets its
own split and its own content-hashed shards; a tenant that cannot be split is reported and the
others go on; adding a tenant or changing one tenant's data computes only that tenant's shards;
rows of several tenants embedded together are stored as each row's own states."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
import torch

from carryon_ray.bases import FrozenBase
from carryon_ray.config import BaseSpec
from carryon_ray.records import decode_batch
from carryon_ray.stages.embed import embed_stage
from tests.ray_helpers import tiny_config

pytestmark = pytest.mark.ray


def _rows(tenant: str, count: int, *, shift: int = 0) -> list[dict]:
    return [{"question": f"{tenant}: what is {i + shift} + {i}?", "answer": f"{2 * i + shift} #### {2 * i + shift}"}
            for i in range(count)]


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _config(tmp_path: Path, model_dir: Path, data: Path, **tenants):
    return tiny_config(tmp_path / "run", model_dir, data, embed={"rows_per_shard": 4, "batch_size": 4},
                       tenants={"eval_fraction": 0.25, "min_eval": 1, "min_train": 2, **tenants})


def _embed(config):
    return embed_stage(config.embed, config.run_dir, model=config.model, data=config.data, tenants=config.tenants)


def _ids(run_dir: Path, shards: list[str]) -> list[str]:
    return [i for shard in shards for i in pq.read_table(Path(run_dir) / "embeddings" / shard, columns=["id"])["id"].to_pylist()]


def test_directory_tenants_split_skip_and_recompute_only_what_changed(local_ray, tmp_path, tiny_model_dir):
    data = tmp_path / "tenants"
    _write(data / "acme.jsonl", _rows("acme", 12))
    _write(data / "globex" / "part-1.jsonl", _rows("globex", 5))
    _write(data / "globex" / "part-2.jsonl", _rows("globex", 3, shift=50))
    _write(data / "tiny.jsonl", _rows("tiny", 2))  # too few for min_train 2 + min_eval 1
    config = _config(tmp_path, tiny_model_dir, data)
    embedded = _embed(config)
    manifest = embedded.manifest
    assert embedded.tenants() == ["acme", "globex"]
    assert "tiny" in manifest["skipped_tenants"] and "2 usable rows" in manifest["skipped_tenants"]["tiny"]
    # Each tenant's own split: the last quarter (at least one) held out.
    assert (embedded.tenant_rows("acme", "train"), embedded.tenant_rows("acme", "eval")) == (9, 3)
    assert (embedded.tenant_rows("globex", "train"), embedded.tenant_rows("globex", "eval")) == (6, 2)
    acme_eval = _ids(config.run_dir, manifest["tenants"]["acme"]["splits"]["eval"]["shards"])
    assert sorted(acme_eval) == [f"acme.jsonl:{i:06d}" for i in (9, 10, 11)]
    globex = manifest["tenants"]["globex"]["splits"]
    assert all(shard.startswith("tenants/globex/") for split in globex.values() for shard in split["shards"])
    assert manifest["splits"]["train"]["rows"] == 15  # the totals are the tenants' sums
    first = manifest["computed_shards"]

    # A new tenant: only its shards are computed; the others' are found by their content hash.
    _write(data / "initech.jsonl", _rows("initech", 8))
    grown = _embed(config).manifest
    initech = grown["tenants"]["initech"]["splits"]
    assert grown["computed_shards"] == len(initech["train"]["shards"]) + len(initech["eval"]["shards"])
    assert grown["tenants"]["acme"]["splits"] == manifest["tenants"]["acme"]["splits"]
    # One tenant's data changes: only that tenant's shards.
    _write(data / "acme.jsonl", _rows("acme", 12, shift=7))
    changed = _embed(config).manifest
    acme = changed["tenants"]["acme"]["splits"]
    assert changed["computed_shards"] == len(acme["train"]["shards"]) + len(acme["eval"]["shards"]) < first
    assert changed["tenants"]["globex"]["splits"] == manifest["tenants"]["globex"]["splits"]


def test_field_tenants_mixed_batches_store_each_rows_own_states(local_ray, tmp_path, tiny_model_dir):
    rows = []
    for i in range(10):  # interleaved tenants in one file
        rows += [{**row, "tenant": tenant} for tenant, row in
                 (("north", _rows("north", 10)[i]), ("south", _rows("south", 10, shift=3)[i]))]
    rows.append({**_rows("x", 1)[0], "tenant": "../escape"})  # not a valid id: malformed, counted
    rows.append({**_rows("x", 1)[0]})  # no tenant field
    data = tmp_path / "all.jsonl"
    _write(data, rows)
    config = _config(tmp_path, tiny_model_dir, data, by="field")
    embedded = _embed(config)
    assert embedded.tenants() == ["north", "south"]
    assert embedded.manifest["data_report"]["rows"] == 20
    assert embedded.summary()["tenants"] == 2
    # Shards of both tenants were embedded in one actor call (batches mixing tenants): each
    # stored row is still that row's own final hidden state (8-bit residual).
    base = FrozenBase(BaseSpec(name="tiny", path=str(tiny_model_dir)))
    for tenant in ("north", "south"):
        for path in embedded.tenant_shard_paths(tenant, "train"):
            batch = decode_batch(embedded.layout, pq.read_table(path).to_pydict())
            for row in range(batch.input_ids.shape[0]):
                length = int(batch.lengths[row])
                ids = batch.input_ids[row, :length].tolist()
                expected = base.hidden_rows([ids], [base.num_layers])[base.num_layers][0]
                stored = batch.residual[row, :length]
                assert torch.allclose(stored, expected.to(stored.dtype), atol=0.02 * float(expected.abs().max()))


def test_tenants_pipeline_trains_grouped_promotes_each_and_retrains_only_a_new_tenant(
    local_ray, tmp_path, tiny_model_dir
):
    from carryon_ray.pipeline import Pipeline
    from carryon_ray.storage import location

    data = tmp_path / "tenants"
    _write(data / "acme.jsonl", _rows("acme", 16))
    _write(data / "globex.jsonl", _rows("globex", 16, shift=40))
    _write(data / "tiny.jsonl", _rows("tiny", 1))  # reported, the others go on
    config = tiny_config(
        tmp_path / "run", tiny_model_dir, data, embed={"rows_per_shard": 4, "batch_size": 4},
        serve={"max_new_tokens_limit": 8},
        tenants={"eval_fraction": 0.25, "min_train": 2, "carry_on": {"globex": {"hidden_size": 16}}},
        train={"max_steps": 30, "checkpoint_every": 10, "fail_at_step": 15, "max_failures": 2},
        stages=["embed", "train", "export", "evaluate"],
    )
    summary = Pipeline(config).run()
    train, scores = summary["train"], summary["eval"]
    assert train["tenants"] == 2 and train["trained"] == 2 and not train["failed"]
    assert train["steps"] == {"acme": 30, "globex": 30}  # through the killed worker, resumed
    assert "tiny" in train["skipped"]
    assert (Path(config.run_dir) / "checkpoints" / "tenants" / ".fault-injected").exists()
    assert scores["of"] == 2 and Path(scores["heat_map"]).stat().st_size > 0
    for tenant in ("acme", "globex"):
        entry = scores["tenants"][tenant]
        assert entry["nll_own"] < entry["nll_base"] and entry["promoted"], entry
        assert location(Path(config.run_dir) / "carryons" / tenant).current_version() == entry["version"]
    globex = json.loads((Path(config.run_dir) / "carryons" / "globex" / ".versions" / scores["tenants"]["globex"]["version"]
                         / "config.json").read_text())
    assert globex["carry_on"]["hidden_size"] == 16  # its override
    matrix = (Path(config.run_dir) / "reports" / "tenants.md").read_text()
    assert "acme" in matrix and "globex" in matrix

    # Serving the run's registry: every promoted tenant answers by its id; a tenant promoted by
    # a later run answers too, without a redeploy.
    from ray import serve

    from carryon_ray.stages.serve import deploy_stage

    endpoint = deploy_stage(config.serve, config.run_dir, None, bases=config.bases).endpoint

    def complete(model: str) -> int:
        return requests.post(f"{endpoint}/completions", json={"model": model, "prompt": "acme: what is",
                                                              "max_tokens": 2}, timeout=120).status_code

    try:
        assert complete("acme") == 200 and complete("globex") == 200 and complete("initech") == 404
        # A new tenant: one more embed of its shards, training of it alone, the others reused.
        _write(data / "initech.jsonl", _rows("initech", 16, shift=80))
        again = Pipeline(config).run()
        assert complete("initech") == 200
    finally:
        serve.shutdown()
    assert again["train"]["trained"] == 1 and again["train"]["tenants"] == 3
    assert again["embed"]["computed_shards"] == 4  # initech's 12 training rows and 4 held out, 4 a shard
    assert again["eval"]["tenants"]["initech"]["promoted"]


def test_tenants_continue_on_another_number_of_workers(local_ray, tmp_path, tiny_model_dir):
    # (1, 3) workers of 40 `training` units each: 2 fit, one tenant each. The job dies at step 15
    # with no restart left (as when a cluster loses the job); run again on one worker: every
    # tenant continues from its step-10 checkpoint, whichever worker wrote it, and each step is
    # trained exactly once.
    from carryon_ray.stages.tenants import grouped_train_stage
    from carryon_ray.stages.train import MetricsLog
    from carryon_ray.storage import location

    data = tmp_path / "tenants"
    _write(data / "acme.jsonl", _rows("acme", 16))
    _write(data / "globex.jsonl", _rows("globex", 16, shift=40))
    config = _config(tmp_path, tiny_model_dir, data, min_train=2)
    embedded = _embed(config)
    spec = config.train.model_copy(update={"max_steps": 30, "checkpoint_every": 10, "resources": {"training": 40},
                                           "min_workers": 1, "max_workers": 3, "fail_at_step": 15})

    def train(**update):
        return grouped_train_stage(spec.model_copy(update=update), config.run_dir, embedded,
                                   carry_on=config.carry_on, tenants=config.tenants)

    import ray.train

    with pytest.raises(ray.train.TrainingFailedError):
        train(max_failures=0)
    result = train(max_workers=1, fail_at_step=None)
    assert result.world_size == 1
    assert {tenant: trained.steps for tenant, trained in result.tenants.items()} == {"acme": 30, "globex": 30}
    root = location(Path(config.run_dir) / "checkpoints" / "tenants")

    def records(tenant: str) -> list[dict]:
        (run,) = [path for path in root.children() if path.name.startswith(f"{tenant}-")]
        return MetricsLog.read(run / "metrics.jsonl")

    acme = records("acme")  # rank 0's tenant, killed at its step 15
    assert [r["step"] for r in acme] == list(range(1, 31))
    assert {r["world_size"] for r in acme if r["step"] <= 10} == {2}
    assert {(r["world_size"], r.get("resumed_from")) for r in acme if r["step"] > 10} == {(1, 10)}
    # Rank 1's tenant may have finished before the job died (then it is reused), else it continues too.
    globex = records("globex")
    assert [r["step"] for r in globex] == list(range(1, 31))
    assert result.tenants["globex"].reused or {r["world_size"] for r in globex if r["step"] > 20} == {1}
