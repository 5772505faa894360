"""Reports written into RUN_DIR/reports: the loss curve and markdown tables (no Ray here)."""

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
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    target = location(path)
    target.write_bytes(buffer.getvalue())
    return target


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of `rows` (dicts) in the order of `columns`; floats get 4 decimals."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)
