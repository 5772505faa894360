"""Versions of a carry-on in the registry: scores recorded with them, promotion only past the
base and the current version, rollback; on the local disk and on S3."""

from __future__ import annotations

import pytest

from carryon_ray.registry import SCORE, decide_promotion, read_score, rollback, version_table
from carryon_ray.storage import Location, location


@pytest.fixture(params=["local", "s3"])
def carryon(tmp_path, request) -> Location:
    if request.param == "local":
        return location(tmp_path / "registry" / "alice")
    return location(request.getfixturevalue("s3_bucket") + "/registry/alice")


def publish(carryon: Location, tmp_path, text: str) -> str:
    source = tmp_path / f"src-{text}"
    source.mkdir()
    (source / "config.json").write_text(text)
    return carryon.publish_version(source)


def test_a_first_version_that_does_not_beat_the_base_is_not_served(carryon, tmp_path):
    version = publish(carryon, tmp_path, "1")
    result = decide_promotion(carryon, version, nll_merged=3.1, nll_base=3.0, tokens=10)
    assert not result.promoted and result.current is None
    assert "does not beat the base" in result.reason and "does not serve it" in result.reason
    assert carryon.current() is None
    assert read_score(carryon, version)["promoted"] is False
    assert (carryon.version(version) / SCORE).is_file()


def test_promotion_needs_the_base_and_the_current_version_beaten(carryon, tmp_path):
    first = publish(carryon, tmp_path, "1")
    assert decide_promotion(carryon, first, nll_merged=2.5, nll_base=3.0, tokens=10).promoted
    assert carryon.current_version() == first
    worse = publish(carryon, tmp_path, "2")
    result = decide_promotion(carryon, worse, nll_merged=2.6, nll_base=3.0, tokens=10)
    assert not result.promoted and result.current == first
    assert f"current version {first}" in result.reason
    assert carryon.current_version() == first
    better = publish(carryon, tmp_path, "3")
    result = decide_promotion(carryon, better, nll_merged=2.4, nll_base=3.0, tokens=10)
    assert result.promoted and carryon.current_version() == better
    assert "previous version" in result.reason
    rows = version_table(carryon)
    assert [row["version"] for row in rows] == [first, worse, better]
    assert [row["current"] for row in rows] == [False, False, True]
    assert [row["nll_merged"] for row in rows] == [2.5, 2.6, 2.4]


def test_a_previous_version_without_a_score_is_beaten_by_beating_the_base(carryon, tmp_path):
    first = publish(carryon, tmp_path, "1")
    carryon.promote(first)  # published without evaluation (save_carryon)
    second = publish(carryon, tmp_path, "2")
    result = decide_promotion(carryon, second, nll_merged=2.9, nll_base=3.0, tokens=10)
    assert result.promoted and "no recorded score" in result.reason


def test_rollback_moves_the_pointer_back_skipping_refused_versions(carryon, tmp_path):
    first = publish(carryon, tmp_path, "1")
    decide_promotion(carryon, first, nll_merged=2.5, nll_base=3.0, tokens=10)
    refused = publish(carryon, tmp_path, "2")
    decide_promotion(carryon, refused, nll_merged=2.8, nll_base=3.0, tokens=10)
    third = publish(carryon, tmp_path, "3")
    decide_promotion(carryon, third, nll_merged=2.0, nll_base=3.0, tokens=10)
    assert rollback(carryon) == (third, first)  # the refused one is skipped
    assert (carryon.current() / "config.json").read_text() == "1"
    with pytest.raises(ValueError, match="no earlier version"):
        rollback(carryon)
    assert rollback(carryon, refused) == (first, refused)  # named: forced
    with pytest.raises(ValueError, match="has no version"):
        rollback(carryon, "20260101T120000.000000000-0123abcd")
    with pytest.raises(ValueError, match="not a version name"):
        rollback(carryon, "latest")
    assert carryon.current_version() == refused


def test_a_run_that_starts_at_evaluate_scores_the_newest_version(tmp_path, tiny_base):
    from carryon_ray.artifacts import load_carryon, publish_carryon
    from carryon_ray.pipeline import read_export
    from tests.test_serve import export_carryon

    carryon = location(export_carryon(tmp_path / "carryons" / "tiny", tiny_base, seed=1))
    current = carryon.current_version()
    carry_on, layout, _ = load_carryon(carryon)
    newest = publish_carryon(carryon, carry_on, layout, alpha=1.0)
    exported = read_export(location(tmp_path), "tiny")
    assert (exported.version, exported.path, exported.carryon) == (newest.name, newest.uri, carryon.uri)
    assert carryon.current_version() == current != newest.name  # exporting moved nothing
    assert read_export(location(tmp_path), "nobody") is None
