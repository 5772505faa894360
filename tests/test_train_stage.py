"""The train and search stages on one local Ray cluster and a tiny model: elastic workers,
early stopping, kill-and-resume from a checkpoint, a two-trial Ray Tune search that exports the
best, and configs that must fail before any work. (One module, so one cluster and one embed.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from carryon_ray.artifacts import load_carryon
from carryon_ray.cli import main
from carryon_ray.config import validate_config
from carryon_ray.loop import CheckpointInfo
from carryon_ray.stages.embed import embed_stage, read_embeddings
from carryon_ray.stages.export import export_stage
from carryon_ray.stages.search import search_stage, trial_layout
from carryon_ray.stages.train import FAULT_MARKER, train_stage
from tests.ray_helpers import read_metrics, tiny_config

pytestmark = pytest.mark.ray

SEARCH = {"hidden_size": [16, 32], "num_layers": [1], "input_bits": [2], "sources": [[-1]],
          "alpha": [1.0], "max_steps": 6, "eval_every": 3, "eval_rows": 4}


@pytest.fixture(scope="module")
def embedded(local_ray, tmp_path_factory, tiny_model_dir, tiny_jsonl):
    """A run directory with the head and the embeddings of the tiny model (embedded once)."""
    run_dir = tmp_path_factory.mktemp("train-run")
    config = tiny_config(run_dir, tiny_model_dir, tiny_jsonl)
    embed_stage(config.embed, run_dir, model=config.model, data=config.data)
    return run_dir, tiny_model_dir, tiny_jsonl


def _train(config):
    run_dir = Path(config.run_dir)
    return train_stage(config.train, run_dir, read_embeddings(run_dir, config.model), carry_on=config.carry_on)


def _config(embedded, **train):
    """Batches of one row: an epoch of the 16 training rows is 16 steps on one worker."""
    run_dir, model_dir, data = embedded
    return tiny_config(run_dir, model_dir, data, train={"batch_size": 1, **train})


def test_elastic_run_takes_the_workers_that_fit_and_stops_early(embedded):
    # (1, 3) workers, each asking 40 of the cluster's 100 `training` units: 2 fit. The head is
    # NF4-quantized on the workers (the vocabulary-blocked loss).
    config = _config(embedded, min_workers=1, max_workers=3, max_steps=40, checkpoint_every=4,
                     early_stopping_patience=1, early_stopping_min_delta=10.0, head_dtype="nf4",
                     resources={"training": 40})
    result = _train(config)
    records = read_metrics(Path(config.run_dir))
    assert {record["world_size"] for record in records} == {2}
    # The second validation cannot beat the first by 10 nats: patience 1 stops at step 8.
    assert result.early_stopped and result.steps == 8 < result.planned_steps
    assert [r["step"] for r in records if "val_nll_merged" in r] == [4, 8]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert CheckpointInfo.read(result.checkpoint).weights.name == "best.safetensors"
    exported = export_stage("tiny", Path(config.run_dir), result)
    carry_on, _, _ = load_carryon(exported.path)
    assert carry_on.num_parameters() == exported.parameters


def test_killed_worker_resumes_from_the_last_checkpoint_at_its_step(embedded):
    config = _config(embedded, max_steps=12, checkpoint_every=4, fail_at_step=6, max_failures=1)
    run_dir = Path(config.run_dir)
    layout = read_embeddings(run_dir, config.model).layout
    result = _train(config)
    assert (run_dir / "checkpoints" / FAULT_MARKER).read_text() == "6"  # the worker was killed
    records = read_metrics(run_dir)
    assert [record["step"] for record in records] == list(range(1, 13))  # each step exactly once
    assert all(record.get("resumed_from") == 4 for record in records if record["step"] > 4)
    assert all("resumed_from" not in record for record in records if record["step"] <= 4)
    assert result.steps == 12 and result.resumed_from == 4
    # No early stopping: the last step's weights; 16 rows in batches of 1 is 16 steps an epoch.
    info = CheckpointInfo.read(result.checkpoint)
    assert info.weights.name == "carry_on.safetensors" and info.step == 12
    exported = export_stage("tiny", run_dir, result)
    carry_on, loaded_layout, artifact = load_carryon(exported.path)
    assert loaded_layout.sources == layout.sources and artifact["parameters"] == carry_on.num_parameters()
    png = run_dir / "reports" / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("train", "key"),
    [({"max_steps": 0}, "train.max_steps"), ({"learning_rate": -1e-3}, "train.learning_rate"),
     ({"fail_at_step": 5, "max_steps": 5}, "train.fail_at_step")],
)
def test_bad_training_values_are_rejected_by_the_schema(embedded, train, key):
    run_dir, model_dir, data = embedded
    with pytest.raises(ValueError, match=key):
        tiny_config(run_dir, model_dir, data, train=train)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"bridge": {"input_bits": 2}}, r"sources\[0\] asks for tiny layer -1 at 2 bits"),
        ({"bridge": {"residual_bits": 4}}, "bridge.residual_bits=4"),
        ({"sources": [{"base": "tiny", "layer": 1}]}, r"sources\[0\] asks for tiny layer 1"),
        ({"bridge": {"codec": "nf4", "residual_bits": 0, "input_bits": 4}}, "bridge.codec is 'nf4'"),
        ({"sources": [{"base": "tiny", "layer": 7}]}, "out of range"),
    ],
)
def test_embeddings_that_do_not_fit_the_config_fail_before_any_work(embedded, sections, message):
    run_dir, model_dir, data = embedded
    config = tiny_config(run_dir, model_dir, data, **sections)
    before = sorted(p.name for p in (run_dir / "checkpoints").glob("*")) if (run_dir / "checkpoints").exists() else []
    with pytest.raises(ValueError, match=message):
        _train(config)
    after = sorted(p.name for p in (run_dir / "checkpoints").glob("*")) if (run_dir / "checkpoints").exists() else []
    assert after == before  # no trainer was started


def test_a_manifest_from_another_base_is_refused(embedded):
    run_dir, model_dir, data = embedded
    raw = tiny_config(run_dir, model_dir, data).model_dump()
    raw["bases"][0]["name"] = "other"
    raw["sources"] = [{"base": "other", "layer": -1}]
    config = validate_config(raw)
    with pytest.raises(ValueError, match="embedded with base 'tiny'"):
        _train(config)


# --- search (Ray Tune) on the same stored embeddings ------------------------------------------


def test_search_runs_two_trials_and_exports_the_best(embedded):
    run_dir, model_dir, data = embedded
    config = tiny_config(run_dir, model_dir, data, search=SEARCH)
    embedded = read_embeddings(run_dir, config.model)
    report = search_stage(config.search, run_dir, embedded, train=config.train, carry_on=config.carry_on,
                          name=config.name)
    trials = report.trials
    assert sorted(t["hidden_size"] for t in trials) == [16, 32]
    scores = [t["val_nll_merged"] for t in trials if t["val_nll_merged"] is not None]
    assert report.best["val_nll_merged"] == min(scores)
    exported = export_stage(config.name, run_dir, report)  # the trial's shape, from its checkpoint
    assert exported.name == "tiny-best"
    carry_on, best_layout, artifact = load_carryon(exported.path)  # the new version (not promoted: no evaluate)
    assert carry_on.config.hidden_size == report.best["hidden_size"]
    assert [view.bits for view in best_layout.sources] == [2]  # re-quantized from the stored 8 bits
    assert best_layout.stored_bits == embedded.layout.stored_bits
    assert artifact["search"]["val_nll_merged"] == report.best["val_nll_merged"]
    assert json.loads((run_dir / "reports" / "search.json").read_text())["best"]["trial"] == report.best["trial"]
    assert "| trial | hidden_size |" in (run_dir / "reports" / "search.md").read_text()


def test_search_views_the_stored_layers_cannot_give_are_refused(embedded):
    run_dir, model_dir, data = embedded
    layout = read_embeddings(run_dir, tiny_config(run_dir, model_dir, data).model).layout
    # The final layer is stored once at the residual's 8 bits; the carry-on input views it at 4.
    assert layout.stored_bits == {"tiny.2": 8} and [v.bits for v in layout.sources] == [4]
    assert [v.bits for v in trial_layout(layout, [-1], 8).sources] == [8]
    with pytest.raises(ValueError, match="more precise than the 8 bits"):
        trial_layout(layout, [-1], 0)
    with pytest.raises(ValueError, match="is not stored"):
        trial_layout(layout, [-1, 1], 4)
    # A stored layer of any base by its key (a mixture of LLMs names the other base's layers so).
    assert [v.key for v in trial_layout(layout, ["tiny.2"], 4).sources] == ["tiny.2"]
    with pytest.raises(ValueError, match=r"layer gemma.18 \(gemma.18\) is not stored"):
        trial_layout(layout, [-1, "gemma.18"], 4)
    config = tiny_config(run_dir, model_dir, data, search={**SEARCH, "sources": [[-1], [1]]})
    with pytest.raises(ValueError, match="is not stored"):
        search_stage(config.search, run_dir, read_embeddings(run_dir, config.model), train=config.train,
                     carry_on=config.carry_on, name=config.name)


def test_search_views_float16_states_through_other_codecs_and_reports_the_skew(embedded, tmp_path):
    # Stored at 0 bits (float16), the states can be viewed through any codec at any bits; a
    # residual coarser than stored reports the skew against the stored (serving-path) residual.
    _, model_dir, data = embedded
    run_dir = tmp_path / "float16-run"
    search = {**SEARCH, "hidden_size": [16], "input_bits": [4], "codec": ["block_absmax", "nf4"], "residual_bits": [4]}
    config = tiny_config(run_dir, model_dir, data, bridge={"residual_bits": 0, "input_bits": 0}, search=search,
                         stages=["embed", "search", "export"])
    embedded = embed_stage(config.embed, run_dir, model=config.model, data=config.data)
    assert embedded.layout.stored_bits == {"tiny.2": 0}
    report = search_stage(config.search, run_dir, embedded, train=config.train, carry_on=config.carry_on,
                          name=config.name)
    assert sorted(t["codec"] for t in report.trials) == ["block_absmax", "nf4"]
    assert all(t["residual_bits"] == 4 and math.isfinite(t["val_skew"]) and t["curve"] for t in report.trials)
    exported = export_stage(config.name, run_dir, report)
    _, layout, _ = load_carryon(exported.path)
    assert layout.codec == report.best["codec"] and layout.residual.bits == 4 and layout.sources[0].bits == 4


def test_search_refuses_another_codec_over_coded_states(embedded):
    run_dir, model_dir, data = embedded
    layout = read_embeddings(run_dir, tiny_config(run_dir, model_dir, data).model).layout
    with pytest.raises(ValueError, match="store every layer at 0 bits"):
        trial_layout(layout, [-1], 4, codec="nf4")
    with pytest.raises(ValueError, match="residual_bits=0 is more precise than the 8 bits"):
        trial_layout(layout, [-1], 4, residual_bits=0)
    assert trial_layout(layout, [-1], 4, residual_bits=2).residual.bits == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [("search.hidden_size=[30]", "search.hidden_size value 30"), ("search.input_bits=[3]", "search.input_bits")],
)
def test_search_cli_rejects_a_bad_search_space_before_any_work(tmp_path, capsys, override, message):
    assert main(["search", "--set", f"run_dir={tmp_path / 'run'}", "--set", override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
