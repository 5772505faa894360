"""The one training loop (no Ray): a seeded shuffle every epoch, self-describing checkpoints,
and a resumed loop that trains exactly as one that never stopped."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from carryon_ray.artifacts import artifact_files, is_artifact
from carryon_ray.bases import OutputHead
from carryon_ray.config import CarryOnSpec, TrainSpec
from carryon_ray.loop import CheckpointInfo, TrainLoop, table_batches
from carryon_ray.records import LayerRef, Layout, encode_rows, to_table
from carryon_ray.stages.export import export_stage
from carryon_ray.stages.train import TrainResult, carry_on_config

D, V, ROWS = 16, 40, 12
FINAL = LayerRef("tiny", 2, D)
LAYOUT = Layout.build(codec="absmax", residual=(FINAL, 8), sources=[(FINAL, 4)],
                      bases=[{"name": "tiny", "fingerprint": "f00d", "tokenizer": "abcd"}])


@pytest.fixture(scope="module")
def table() -> pa.Table:
    """ROWS rows whose first token is their row number, so an order can be read back."""
    generator = torch.Generator().manual_seed(0)
    lengths = [4 + row % 5 for row in range(ROWS)]
    input_ids = [[row] + torch.randint(1, V, (n - 1,), generator=generator).tolist() for row, n in enumerate(lengths)]
    masks = [[0] + [1] * (n - 1) for n in lengths]
    hidden = {FINAL.key: [torch.randn(n, D, generator=generator) for n in lengths]}
    columns = encode_rows(LAYOUT, ids=[f"{row:06d}" for row in range(ROWS)], input_ids=input_ids,
                          target_masks=masks, hidden=hidden)
    return to_table(LAYOUT, columns)


def _head() -> OutputHead:
    generator = torch.Generator().manual_seed(1)
    return OutputHead(torch.randn(V, D, generator=generator) * 0.3, torch.randn(V, generator=generator))


def _order(table: pa.Table, *, seed: int | None, epoch: int) -> list[int]:
    return [int(row) for batch in table_batches(LAYOUT, table, 4, seed=seed, epoch=epoch)
            for row in batch.input_ids[:, 0]]


def test_every_epoch_is_a_new_seeded_permutation(table):
    first, second = _order(table, seed=0, epoch=0), _order(table, seed=0, epoch=1)
    assert sorted(first) == sorted(second) == list(range(ROWS))  # every row once an epoch
    assert first != second  # two epochs see different orders
    assert _order(table, seed=0, epoch=1) == second  # the same seed gives the same order
    assert _order(table, seed=7, epoch=0) != first
    assert _order(table, seed=None, epoch=3) == list(range(ROWS))  # evaluation: table order


def _loop(total: int = 9, **train) -> TrainLoop:
    torch.manual_seed(0)
    spec = TrainSpec(batch_size=4, learning_rate=3e-3, warmup_steps=2, checkpoint_every=3, **train)
    shape = carry_on_config(CarryOnSpec(hidden_size=16, num_layers=1, num_heads=2, max_positions=32), LAYOUT)
    return TrainLoop(shape, LAYOUT, _head(), spec, alpha=1.0, total_steps=total)


def _run(loop: TrainLoop, table: pa.Table, *, stop_at: int | None = None) -> list[float]:
    losses = []

    def on_record(record: dict, periodic: bool) -> bool:
        losses.append(record["loss"])
        return stop_at is not None and record["step"] >= stop_at

    loop.run(lambda epoch: table_batches(LAYOUT, table, loop.spec.batch_size, seed=loop.spec.seed, epoch=epoch),
             on_record=on_record)
    return losses


def test_a_restored_loop_trains_exactly_as_one_that_never_stopped(table, tmp_path):
    # 12 rows in batches of 4: 3 steps an epoch; stop mid-epoch 2 (step 4), then resume.
    whole = _loop()
    uninterrupted = _run(whole, table)
    first = _loop()
    before = _run(first, table, stop_at=4)
    first.save(tmp_path / "checkpoint")
    resumed = _loop(total=50)  # the checkpoint's schedule (9 steps) wins over the caller's
    assert resumed.restore(tmp_path / "checkpoint") == 4
    assert (resumed.state.epoch, resumed.state.batches_into_epoch) == (1, 1)
    after = _run(resumed, table)
    assert resumed.state.step == 9 and len(before) + len(after) == 9
    assert before + after == pytest.approx(uninterrupted, abs=1e-6)
    for name, tensor in whole.carry_on.state_dict().items():
        torch.testing.assert_close(resumed.carry_on.state_dict()[name], tensor)


def test_a_checkpoint_describes_itself_and_export_builds_the_trained_shape(table, tmp_path):
    loop = _loop(total=3)
    _run(loop, table)
    loop.save(tmp_path / "checkpoint")
    meta = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert meta["carry_on"]["hidden_size"] == 16 and meta["schedule"]["total"] == 3
    info = CheckpointInfo.read(tmp_path / "checkpoint")
    assert info.layout == LAYOUT and info.step == 3
    # Export never reads the current config: a config now asking for h=64 still exports h=16.
    result = TrainResult(checkpoint=str(tmp_path / "checkpoint"), steps=3, planned_steps=3, resumed_from=None,
                         early_stopped=False, world_size=1, loss_first=None, loss_last=None, tokens=0,
                         seconds=0.0, loss_curve=None, val={}, val_best=None)
    exported = export_stage("tiny", tmp_path, result)
    config = json.loads((artifact_files(exported.path) / "config.json").read_text())
    assert is_artifact(exported.path) and not is_artifact(tmp_path / "carryons" / "tiny")  # not yet promoted
    assert config["carry_on"]["hidden_size"] == 16 and exported.trained_steps == 3
    assert exported.parameters == loop.carry_on.num_parameters()


def test_a_checkpoint_of_another_shape_is_refused(table, tmp_path):
    loop = _loop(total=3)
    _run(loop, table)
    loop.save(tmp_path / "checkpoint")
    torch.manual_seed(0)
    spec = TrainSpec(batch_size=4)
    other = TrainLoop(carry_on_config(CarryOnSpec(hidden_size=32, num_layers=1, num_heads=2, max_positions=32), LAYOUT),
                      LAYOUT, _head(), spec, alpha=1.0, total_steps=3)
    with pytest.raises(ValueError, match="another shape"):
        other.restore(tmp_path / "checkpoint")
    with pytest.raises(FileNotFoundError, match="not a carry-on checkpoint"):
        CheckpointInfo.read(tmp_path)
