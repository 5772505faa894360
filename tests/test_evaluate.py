"""The evaluate stage's scorer (no Ray): it loads the exported artifact through the artifact
loader, so an artifact of another base is refused; both paths score the same tokens."""

from __future__ import annotations

import math

import pytest

from carryon_ray.artifacts import save_carryon
from carryon_ray.bases import FrozenBase
from carryon_ray.config import BaseSpec
from carryon_ray.records import encode_rows, to_table
from carryon_ray.stages.evaluate import Evaluator, artifact_bases
from tests.test_artifacts import _trained


@pytest.fixture()
def spec(tiny_model_dir) -> BaseSpec:
    return BaseSpec(name="tiny", path=str(tiny_model_dir))


def test_an_artifact_of_another_base_is_refused(spec, tiny_tokenizer, tmp_path):
    from tests.conftest import make_model

    other = FrozenBase.from_model("tiny", make_model(len(tiny_tokenizer), seed=5), tiny_tokenizer)
    carry_on, layout = _trained(other)  # same name, other weights
    save_carryon(tmp_path / "foreign", carry_on, layout, alpha=1.0)
    evaluator = Evaluator([spec], threads=1)
    with pytest.raises(ValueError, match="fingerprint"):
        evaluator.load(str(tmp_path / "foreign"))
    with pytest.raises(ValueError, match=r"reads bases \['tiny'\], which the config does not define"):
        artifact_bases([BaseSpec(name="other", path=str(tmp_path))], str(tmp_path / "foreign"))


def test_serving_and_training_paths_score_the_same_tokens(spec, tmp_path):
    import pyarrow.parquet as pq
    import torch

    evaluator = Evaluator([spec], threads=1)
    base = evaluator.bases[0]
    carry_on, layout = _trained(base)
    save_carryon(tmp_path / "mine", carry_on, layout, alpha=1.0)
    evaluator.load(str(tmp_path / "mine"))
    rows = [base.tokenizer(text)["input_ids"] for text in ("What is 3 + 3? 6", "The quick brown fox")]
    states = base.hidden_rows(rows, [ref.layer for ref in layout.layers.values()])
    hidden = {key: states[ref.layer] for key, ref in layout.layers.items()}
    masks = [[0] * 2 + [1] * (len(ids) - 2) for ids in rows]
    columns = encode_rows(layout, ids=["a", "b"], input_ids=rows, target_masks=masks, hidden=hidden)
    pq.write_table(to_table(layout, columns), tmp_path / "eval.parquet")
    sums = evaluator.score(str(tmp_path / "eval.parquet"), None, batch_size=2)
    assert sums["rows"] == 2 and sums["tokens"] == sum(len(ids) - 2 for ids in rows)
    skew = (sums["train_merged"] - sums["merged"]) / sums["tokens"]
    assert math.isfinite(skew) and abs(skew) < 0.1  # σ̂ at 8 bits: the two paths barely differ
    assert sums["merged"] != sums["base"]  # the carry-on changes the answer
    assert torch.isfinite(torch.tensor(list(sums.values()))).all()
