"""Reports written into RUN_DIR/reports: the loss curve, the tenant-by-carry-on NLL matrix and
markdown tables (no Ray here)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from carryon_ray.storage import Location, location

logger = logging.getLogger(__name__)


def plot_loss_curve(records: list[dict], path: str | Path | Location, *, title: str = "") -> Location | None:
    """Training loss per step and, where present, held-out NLL of merged and base.

    Returns where the PNG is (any store), or None when there is nothing to draw. Uses matplotlib's Agg
    backend, so no display is needed.
    """
    if not records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        logger.warning("matplotlib is not installed, so no loss curve is drawn: pip install matplotlib")
        return None
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    axis.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", linewidth=1)
    validations = [r for r in records if "val_nll_merged" in r]
    if validations:
        steps = [r["step"] for r in validations]
        axis.plot(steps, [r["val_nll_merged"] for r in validations], "o-", label="held-out NLL, merged")
        axis.plot(steps, [r["val_nll_base"] for r in validations], "s--", label="held-out NLL, base")
    axis.set_xlabel("step")
    axis.set_ylabel("NLL per target token (nats)")
    axis.set_title(title or "carry-on training")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save_png(figure, path)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of `rows` (dicts) in the order of `columns`; floats get 4 decimals."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def plot_nll_matrix(
    names: list[str], matrix: list[list[float]], base: list[float], path: str | Path | Location, *, title: str = ""
) -> Location | None:
    """A heat map of held-out NLL: row i is tenant i's held-out text, column 0 the base model and
    column j + 1 tenant j's carry-on; `matrix[i][j]` is the NLL of carry-on j on text i and
    `base[i]` the base's. Colour is NLL / base NLL of the row (blue below 1: better than the
    base, red above), so rows of different difficulty compare; values are written in the cells
    up to 32 tenants, and each row's best cell is boxed and bold.

    Returns where the PNG is (any store), or None when there is nothing to draw or no matplotlib.
    """
    if not names:
        return None
    if len(matrix) != len(names) or len(base) != len(names) or any(len(row) != len(names) for row in matrix):
        raise ValueError(
            f"plot_nll_matrix: matrix must be {len(names)} x {len(names)} and base {len(names)} long "
            f"(one per name); got {len(matrix)} rows and {len(base)} base values"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
        from matplotlib.colors import TwoSlopeNorm
        from matplotlib.patches import Rectangle
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        logger.warning("matplotlib is not installed, so no NLL matrix is drawn: pip install matplotlib")
        return None
    values = [[base[i], *matrix[i]] for i in range(len(names))]  # (tenants, 1 + tenants)
    ratios = [[value / base[i] if base[i] else 1.0 for value in row] for i, row in enumerate(values)]
    spread = max(max(abs(r - 1.0) for row in ratios for r in row), 1e-3)
    count = len(names)
    side = min(max(6.0, 0.45 * count + 2.5), 40.0)  # 16 tenants ~10in, 64 ~31in
    figure, axis = plt.subplots(figsize=(side + 1.5, side), dpi=100)
    image = axis.imshow(ratios, cmap="RdBu_r", norm=TwoSlopeNorm(1.0, 1.0 - spread, 1.0 + spread), aspect="auto")
    columns = ["base", *names]
    font = max(5.0, min(10.0, 240.0 / count))
    axis.set_xticks(range(count + 1), columns, rotation=90, fontsize=font)
    axis.set_yticks(range(count), names, fontsize=font)
    axis.set_xlabel("carry-on")
    axis.set_ylabel("held-out text of tenant")
    axis.axvline(0.5, color="black", linewidth=1)  # base | carry-ons
    for i, row in enumerate(values):
        best = min(range(len(row)), key=row.__getitem__)
        axis.add_patch(Rectangle((best - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5))
        if count <= 32:
            for j, value in enumerate(row):
                dark = abs(ratios[i][j] - 1.0) > 0.6 * spread  # light text on the saturated ends
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=font * 0.8,
                          color="white" if dark else "black", fontweight="bold" if j == best else "normal")
    figure.colorbar(image, ax=axis, label="NLL / base NLL of the row", fraction=0.04)
    axis.set_title(title or "held-out NLL per tenant (box: the row's best)")
    return _save_png(figure, path)


def matrix_markdown(names: list[str], matrix: list[list[float]], base: list[float]) -> str:
    """The NLL matrix as a markdown table: a row per tenant's held-out text, columns `base` then
    each tenant's carry-on, 4 decimals, the row's lowest NLL in bold."""
    lines = ["| held-out text \\ carry-on | base | " + " | ".join(names) + " |",
             "|" + "|".join("---" for _ in range(len(names) + 2)) + "|"]
    for name, row, base_value in zip(names, matrix, base, strict=True):
        values = [base_value, *row]
        best = min(values)
        cells = [f"**{value:.4f}**" if value == best else f"{value:.4f}" for value in values]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _save_png(figure, path: str | Path | Location) -> Location:
    """Write `figure` as a PNG to `path` on any store (one write) and close it."""
    from matplotlib import pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    target = location(path)
    target.write_bytes(buffer.getvalue())
    return target
