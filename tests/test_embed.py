"""The embed stage through local Ray on tiny models: a killed actor loses and duplicates no row
and a rerun computes nothing; shards whose metadata differs from the manifest are refused; the
streaming graph makes exactly the examples and report `build_examples` makes and refuses a split
the data cannot honour with the same figures; the run directory and the data may be on an S3
server; a mixture of layers and of LLMs (a second base with another tokenizer) embeds, trains
and serves, and the served states are the stored ones."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch

from carryon_ray.alignment import aligned_states
from carryon_ray.artifacts import load_carryon
from carryon_ray.bases import FrozenBase
from carryon_ray.config import BaseSpec, validate_config
from carryon_ray.data import build_examples
from carryon_ray.merged import MergedModel, SamplingParams
from carryon_ray.pipeline import Pipeline
from carryon_ray.records import METADATA_KEY, Layout, decode_batch
from carryon_ray.stages.embed import CRASH_ENV, embed_stage, read_embeddings
from carryon_ray.storage import location
from tests.ray_helpers import tiny_config

pytestmark = pytest.mark.ray


def _shard_ids(run_dir: Path, manifest: dict, split: str) -> list[str]:
    ids = []
    for shard in manifest["splits"][split]["shards"]:
        ids += pq.read_table(run_dir / "embeddings" / shard, columns=["id"])["id"].to_pylist()
    return ids


def _embed(config):
    return embed_stage(config.embed, config.run_dir, model=config.model, data=config.data)


def test_killed_actor_resumes_with_exact_rows_and_rerun_does_nothing(
    local_ray, tmp_path, tiny_model_dir, tiny_jsonl, monkeypatch, caplog
):
    config = tiny_config(
        tmp_path / "run", tiny_model_dir, tiny_jsonl,
        embed={"rows_per_shard": 2, "batch_size": 2},
    )
    run_dir = Path(config.run_dir)
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ENV, f"3:{marker}")
    manifest = _embed(config).manifest
    assert marker.exists(), "the actor was meant to die after its third shard"
    train_ids, eval_ids = _shard_ids(run_dir, manifest, "train"), _shard_ids(run_dir, manifest, "eval")
    assert sorted(train_ids) == [f"{i:06d}" for i in range(16)]  # none lost, none duplicated
    assert sorted(eval_ids) == [f"{i:06d}" for i in range(16, 24)]
    assert len(list((run_dir / "embeddings").glob("*/*.parquet"))) == 12
    monkeypatch.delenv(CRASH_ENV)
    with caplog.at_level(logging.INFO, logger="carryon_ray.stages.embed"):
        again = _embed(config).manifest
    assert again["computed_shards"] == 0 and again["unchanged"]
    assert "nothing to do" in caplog.text
    # A killed run (some shards gone) recomputes only what is missing.
    for shard in manifest["splits"]["train"]["shards"][:2]:
        (run_dir / "embeddings" / shard).unlink()
    resumed = _embed(config).manifest
    assert resumed["computed_shards"] == 2
    assert sorted(_shard_ids(run_dir, resumed, "train")) == sorted(train_ids)

    # A shard whose metadata is not the manifest's layout is refused by name, with the fix.
    shard = run_dir / "embeddings" / resumed["splits"]["eval"]["shards"][0]
    table = pq.read_table(shard)
    layout = Layout.from_json(table.schema.metadata[METADATA_KEY])
    other = dataclasses.replace(layout, codec="nf4" if layout.codec != "nf4" else "absmax")
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: other.to_json()}), shard)
    with pytest.raises(ValueError, match=rf"shard {shard} .*codec differ.*re-run the embed stage"):
        read_embeddings(run_dir, config.model)


def _documents(path: Path, count: int) -> None:
    """Text documents with a few unusable rows among them (empty texts, wrong fields, a line
    that is not JSON), two of them where the reader's first block ends."""
    rows = [json.dumps({"text": f"Note {i}: the quick brown fox jumps over the lazy dog."}) for i in range(count)]
    for index in (5, 1022):
        rows[index], rows[index + 1] = json.dumps({"text": "  "}), json.dumps({"txt": "wrong field"})
    rows.insert(30, "{not json")
    path.write_text("\n".join(rows) + "\n")


def _with_data(config, **data):
    raw = config.model_dump()
    return validate_config({**raw, "data": {**raw["data"], **data}})


def test_the_stream_makes_what_build_examples_makes(
    local_ray, tmp_path, tiny_model_dir, tiny_tokenizer, tiny_jsonl
):
    _documents(tmp_path / "docs.jsonl", 2600)  # read in blocks of 1024 rows
    config = _with_data(tiny_config(tmp_path / "run", tiny_model_dir, tmp_path / "docs.jsonl",
                                    embed={"rows_per_shard": 256, "batch_size": 16}),
                        loss_on="all", train_size=2000, eval_size=500, max_length=48)
    result = _embed(config)
    train, held_out, report = build_examples(config.data, tiny_tokenizer)
    for split, expected in (("train", train), ("eval", held_out)):
        stored = []
        for shard in result.shard_paths(split):
            columns = pq.read_table(shard, columns=["id", "input_ids", "target_mask"]).to_pydict()
            stored += zip(columns["id"], columns["input_ids"], columns["target_mask"], strict=True)
        assert sorted(stored) == sorted((e.id, e.input_ids, e.target_mask) for e in expected)
    # The same report: reading stopped after the 2,500th usable document (row 2,505 of 2,601).
    assert result.manifest["data_report"] == dataclasses.asdict(report)
    assert (report.rows, report.malformed, report.train_used, report.eval_used) == (2505, 5, 2000, 500)
    assert result.rows("train") == len(train) and result.rows("eval") == len(held_out)

    # A split the data cannot honour: the same message as in one process, over every row.
    short = _with_data(tiny_config(tmp_path / "short", tiny_model_dir, tiny_jsonl), train_size=20, eval_size=10)
    with pytest.raises(ValueError, match=r"has 24 usable examples \(24 rows read: 0 malformed\).*ask for 30"):
        _embed(short)

    # An actor pool that would take every CPU leaves the reading tasks none: refused up front.
    crowded = tiny_config(tmp_path / "crowded", tiny_model_dir, tiny_jsonl, embed={"min_actors": 4, "max_actors": 4})
    with pytest.raises(ValueError, match=r"embed.min_actors=4 .* leaving less than one"):
        _embed(crowded)


def test_a_base_whose_output_transform_is_not_modelled_is_refused(local_ray, tmp_path, tiny_model_dir, tiny_jsonl):
    """A config that says logits are scaled, on a model that does not scale them: the saved
    head would disagree with the model's logits, and the actor's first-shard check says so."""
    model_dir = tmp_path / "scaled"
    shutil.copytree(tiny_model_dir, model_dir)
    config_json = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config_json, "logit_scale": 2.0}))
    config = tiny_config(tmp_path / "run", model_dir, tiny_jsonl)
    with pytest.raises(ValueError) as caught:
        _embed(config)
    assert "RayTaskError" not in type(caught.value).__name__ and "Traceback" not in str(caught.value)
    assert not list((tmp_path / "run" / "embeddings").glob("*/*.parquet"))


@pytest.fixture()
def ray_with_s3(s3_server):
    """Local Ray restarted after the S3 environment is set, so its workers inherit it (left
    running for the module's own fixture to stop)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, resources={"inference": 100, "training": 100},
             include_dashboard=False)


def test_run_directory_and_data_on_object_storage(
    ray_with_s3, s3_bucket, tmp_path, tiny_model_dir, tiny_jsonl, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a URI mistaken for a local path would land here
    data = location(f"{s3_bucket}/data/qa.jsonl")
    data.write_bytes(tiny_jsonl.read_bytes())
    run_dir = f"{s3_bucket}/runs/embed-s3"
    config = tiny_config(run_dir, tiny_model_dir, data.uri)
    result = _embed(config)
    assert result.rows("train") == 16 and result.rows("eval") == 8
    assert all(path.startswith(f"{run_dir}/embeddings/train/") for path in result.shard_paths("train"))
    assert (location(run_dir) / "head" / "head.safetensors").is_file()
    stored = read_embeddings(run_dir, config.model)
    assert stored.manifest["splits"] == result.manifest["splits"]
    assert _embed(config).manifest["unchanged"]
    assert list(tmp_path.rglob("*")) == []


def test_mixture_of_layers_and_llms_trains_and_serves(
    local_ray, tmp_path, tiny_model_dir, other_model_dir, tiny_jsonl
):
    config = tiny_config(
        tmp_path / "run", tiny_model_dir, tiny_jsonl,
        bases=[{"name": "tiny", "path": str(tiny_model_dir)}, {"name": "other", "path": str(other_model_dir)}],
        sources=[
            {"base": "tiny", "layer": -1},
            {"base": "tiny", "layer": 0},  # the shallow shortcut
            {"base": "other", "layer": -1, "bits": 0},
            {"base": "other", "layer": 1},
        ],
        train={"max_steps": 12, "checkpoint_every": 6, "log_every": 2},
    )
    summary = Pipeline(config).run()
    run_dir = Path(config.run_dir)
    assert summary["train"]["loss_last"] < summary["train"]["loss_first"]
    embedded = read_embeddings(run_dir, config.model)
    manifest, layout = embedded.manifest, embedded.layout
    assert [b["name"] for b in layout.bases] == ["tiny", "other"]
    assert layout.layers["other.2"].dim == 48

    # The stored second-base states (float16) equal what the server computes for the same ids.
    primary = FrozenBase(BaseSpec(name="tiny", path=str(tiny_model_dir)), device="cpu")
    other = FrozenBase(BaseSpec(name="other", path=str(other_model_dir)), device="cpu")
    table = pq.read_table(run_dir / "embeddings" / manifest["splits"]["eval"]["shards"][0])
    rows = table.slice(0, 3).to_pydict()
    stored = decode_batch(layout, rows)  # sources: tiny.2, tiny.0, other.2 (float16), other.1
    assert [view.key for view in layout.sources][2] == "other.2"
    served = aligned_states(primary, other, [2], rows["input_ids"])[2]
    for number, row_states in enumerate(served):
        torch.testing.assert_close(
            stored.sources[2][number, : row_states.shape[0]], row_states, atol=2e-3, rtol=2e-3
        )

    carry_on, artifact_layout, _artifact = load_carryon(  # the exported version, promoted or not
        summary["carryon"]["path"], running_bases=[primary.identity(), other.identity()]
    )
    merged = MergedModel(primary, carry_on, artifact_layout, alpha=1.0, others={"other": other})
    prompt = primary.tokenizer("What is 3 + 3?")["input_ids"]
    tokens = merged.generate(prompt, SamplingParams(max_new_tokens=6))
    assert len(tokens) >= 1
    # Incremental generation (the second base served from its own cache) matches a full pass.
    sequence = prompt + tokens[:-1]
    full = merged.logits(torch.tensor([sequence]))[0, len(prompt) - 1 :].argmax(-1).tolist()
    assert full == tokens
    with pytest.raises(ValueError, match="not loaded"):
        MergedModel(primary, carry_on, artifact_layout)
