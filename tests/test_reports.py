"""The loss-curve PNG and markdown tables of RUN_DIR/reports (no Ray)."""

from __future__ import annotations

from carryon_ray.reports import markdown_table, matrix_markdown, plot_loss_curve, plot_nll_matrix


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


def _nll_matrix(count: int) -> tuple[list[str], list[list[float]], list[float]]:
    """Each tenant's own carry-on is best on its text; the others are near the base."""
    names = [f"tenant{i:02d}" for i in range(count)]
    base = [2.0 + 0.1 * i for i in range(count)]
    matrix = [[base[i] * (0.7 if i == j else 0.98 + 0.01 * ((i + j) % 5)) for j in range(count)] for i in range(count)]
    return names, matrix, base


def test_nll_matrix_is_a_png_for_few_and_many_tenants(tmp_path):
    for count in (3, 20):
        names, matrix, base = _nll_matrix(count)
        path = plot_nll_matrix(names, matrix, base, tmp_path / "reports" / f"nll_{count}.png", title="t")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.size() > 1000
    assert plot_nll_matrix([], [], [], tmp_path / "none.png") is None


def test_matrix_markdown_bolds_the_winning_diagonal():
    names, matrix, base = _nll_matrix(3)
    lines = matrix_markdown(names, matrix, base).splitlines()
    assert lines[0].split("|")[2].strip() == "base" and len(lines) == 5
    for i, line in enumerate(lines[2:]):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == names[i]
        assert [j for j, cell in enumerate(cells[1:]) if cell.startswith("**")] == [i + 1]
