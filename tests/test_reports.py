"""The loss-curve PNG and markdown tables of RUN_DIR/reports (no Ray)."""

from __future__ import annotations

from carryon_ray.reports import markdown_table, plot_loss_curve


def test_loss_curve_is_a_png_with_and_without_validation(tmp_path):
    records = [{"step": s, "loss": 3.0 / s} for s in range(1, 11)]
    records[4].update(val_nll_merged=1.5, val_nll_base=1.8)
    records[9].update(val_nll_merged=1.2, val_nll_base=1.8)
    path = plot_loss_curve(records, tmp_path / "reports" / "loss_curve.png", title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plain = plot_loss_curve(records[:3], tmp_path / "plain.png")
    assert plain.size() > 1000
    assert plot_loss_curve([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_markdown_table_formats_floats_and_blanks():
    table = markdown_table([{"a": 1, "b": 0.123456}, {"a": None, "b": "x"}], ["a", "b"])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |", "|  | x |"]
