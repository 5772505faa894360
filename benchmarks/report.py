"""What every benchmark does last: print its markdown table and, with `--json PATH`, write the
same figures as JSON (the folder is created)."""

from __future__ import annotations

import json
from pathlib import Path


def publish(table: str, figures: dict, json_path: str | Path | None) -> None:
    print(table)
    if json_path:
        print(f"wrote {write_json(figures, json_path)}")


def write_json(figures: dict, json_path: str | Path) -> Path:
    """Write `figures` as JSON at `json_path` (its folder created); the path written."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2))
    return path
