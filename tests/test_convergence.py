"""The pure parts of benchmarks/convergence.py: smoothing, steps to reach a loss, the targets
and the plot (no model is loaded)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.convergence import (
    convergence_targets,
    final_loss,
    markdown,
    plot_convergence,
    reach_scratch,
    smooth,
    steps_to_reach,
)
from benchmarks.quality import tables, targets


def curve_of(losses: list[float], seconds_per_step: float = 1.0) -> list[list[float]]:
    return [[step, step * seconds_per_step, loss] for step, loss in enumerate(losses, start=1)]


def test_smooth_is_a_trailing_mean_over_the_window():
    assert smooth([4.0, 2.0, 6.0, 0.0], window=2) == [4.0, 3.0, 4.0, 3.0]
    assert smooth([3.0, 1.0], window=10) == [3.0, 2.0]  # fewer steps than the window: all so far
    assert smooth([], window=10) == []
    assert smooth([1.0, 5.0], window=1) == [1.0, 5.0]
    with pytest.raises(ValueError, match="window"):
        smooth([1.0], window=0)


def test_steps_to_reach_is_the_first_smoothed_step_at_or_below_the_level():
    curve = curve_of([5.0, 3.0, 1.0, 1.0])
    assert steps_to_reach(curve, 3.0, window=2) == 3  # smoothed 5, 4, 2, 1
    assert steps_to_reach(curve, 4.0, window=2) == 2  # equal counts as reached
    assert steps_to_reach(curve, 0.5, window=2) is None
    assert steps_to_reach([], 1.0) is None
    assert final_loss(curve, window=2) == 1.0
    with pytest.raises(ValueError, match="empty"):
        final_loss([])


def arms_of(carry_on: list[float], scratch: list[float], *, nll: tuple[float, float]) -> dict:
    arms = {
        "carry_on": {"curve": curve_of(carry_on), "steps": len(carry_on), "nll": nll[0]},
        "lora": {"curve": curve_of([4.0, 3.5]), "steps": 2, "nll": nll[1]},
        "last_block": {"curve": curve_of([9.0, 9.0]), "steps": 2, "nll": 3.0},
        "scratch": {"curve": curve_of(scratch), "steps": len(scratch), "nll": 6.0},
    }
    for figures in arms.values():
        figures.update(parameters=1000, tokens_per_s=100.0)
    return arms


def test_the_carry_on_reaching_scratch_early_holds_the_pydoc_target():
    arms = arms_of([4.0, 2.0] + [1.0] * 38, [8.0] * 10 + [4.0] * 30, nll=(1.0, 2.0))
    reach = reach_scratch(arms, window=10)
    assert reach["level"] == 4.0 and reach["scratch_steps"] == 40
    assert reach["arms"]["carry_on"]["step"] == 1  # the first smoothed value is the first loss, 4.0
    assert reach["arms"]["scratch"]["step"] == 20  # when its window holds only 4.0s
    assert reach["arms"]["last_block"]["step"] is None
    nll_target, step_target = convergence_targets("pydoc", arms, reach)
    assert step_target["measured_ratio"] == pytest.approx(1 / 40) and step_target["holds"]
    assert step_target["binding"] and not nll_target["binding"]
    assert nll_target["measured_ratio"] == 0.5 and nll_target["holds"]


def test_a_carry_on_that_never_reaches_scratch_gives_an_infinite_ratio():
    arms = arms_of([9.0] * 5, [3.0] * 5, nll=(2.0, 1.0))
    reach = reach_scratch(arms, window=10)
    nll_target, step_target = convergence_targets("gsm8k", arms, reach)
    assert math.isinf(step_target["measured_ratio"]) and not step_target["holds"]
    assert "never reached" in step_target["note"] and not step_target["binding"]
    assert nll_target["binding"] and not nll_target["holds"]  # 2.0 / 1.0 > 1


def test_plot_writes_a_png_and_markdown_names_every_arm(tmp_path):
    arms = arms_of([4.0, 2.0, 1.0], [8.0, 5.0, 4.0], nll=(1.0, 2.0))
    reach = reach_scratch(arms)
    result = {"dataset": "pydoc", "quick": True, "seconds_per_arm": 5.0, "batch": 8, "max_length": 256,
              "train_rows": 32, "eval_tokens": 1000, "cpu_count": 2, "wall_seconds": 60.0,
              "load_average": {"before": 0.1, "after": 2.0}, "base": {"nll": 2.5}, "arms": arms,
              "reach_scratch": reach}
    path = plot_convergence(result, tmp_path / "plots" / "convergence_pydoc.png")
    written = Path(str(path))
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown(result)
    assert "| carry-on | 1,000 | 3 |" in table and "never" in table  # the last block never gets there
    assert "last block + final norm" in table and "from scratch" in table


def test_the_quality_study_reports_each_convergence_target_in_its_table():
    convergence = {}
    for dataset, carry_on in (("gsm8k", [4.0, 2.0] + [1.0] * 8), ("pydoc", [9.0] * 5)):
        arms = arms_of(carry_on, [8.0] * 5 + [4.0] * 5, nll=(1.0, 2.0))
        convergence[dataset] = {"targets": convergence_targets(dataset, arms, reach_scratch(arms))}
    results = {"convergence": convergence}
    results["targets"] = targets(results)
    assert [row["holds"] for row in results["targets"]] == [True, True, True, False]
    table = tables(results)
    assert "| pydoc: carry-on reaches scratch's final train loss in <= 1/5 of scratch's steps | inf (" in table
    assert "(information)" in table
