"""Carry-on artifacts: a directory with `config.json` and `model.safetensors` (no pickle).

`config.json` holds the architecture, the layout (sources, codec, bits), α and the bases'
identities (name, weight fingerprint, tokenizer hash). Loading refuses an artifact whose
bases do not match the running ones, naming what differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from carryon_ray.carry_on import CarryOn, CarryOnConfig
from carryon_ray.records import Layout

ARTIFACT_FORMAT = "carryon_ray/1"


def save_carryon(
    directory: str | Path,
    carry_on: CarryOn,
    layout: Layout,
    *,
    alpha: float,
    extra: dict | None = None,
) -> Path:
    """Write atomically: a reader never sees a half-written artifact."""
    directory = Path(directory)
    partial = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    # float32 whatever dtype it trained in (train.param_dtype): artifacts load as float32.
    state = {
        name: (tensor.float() if tensor.is_floating_point() else tensor).detach().contiguous().cpu()
        for name, tensor in carry_on.state_dict().items()
    }
    save_file(state, partial / "model.safetensors")
    config = {
        "format": ARTIFACT_FORMAT,
        "carry_on": carry_on.config.to_dict(),
        "layout": json.loads(layout.to_json()),
        "alpha": alpha,
        "bases": layout.bases,
        "parameters": carry_on.num_parameters(),
        **(extra or {}),
    }
    (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if directory.exists():
        backup = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        directory.rename(backup)
        partial.rename(directory)
        for child in backup.iterdir():
            child.unlink()
        backup.rmdir()
    else:
        partial.rename(directory)
    return directory


def read_described(directory: str | Path, filename: str, *, format: str, what: str) -> dict:
    """The JSON a directory describes itself with, refused when missing or of another format."""
    directory = Path(directory)
    path = directory / filename
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a {what}: {filename} is missing")
    described = json.loads(path.read_text())
    if described.get("format") != format:
        raise ValueError(
            f"{directory}: {what} format {described.get('format')!r} is not {format!r}; it was "
            "written by another version of carryon_ray"
        )
    return described


def read_artifact_config(directory: str | Path) -> dict:
    return read_described(directory, "config.json", format=ARTIFACT_FORMAT, what="carry-on artifact")


def check_bases(config: dict, running: list[dict[str, str]], where: str) -> None:
    """Refuse an artifact trained on other bases than the running ones.

    The primaries must be the same base; every other base the artifact reads must be running
    (a server may run more bases than one carry-on needs).
    """
    expected = config["bases"]
    running_by_name = {base["name"]: base for base in running}
    if not running or expected[0]["name"] != running[0]["name"]:
        raise ValueError(
            f"{where} was trained on primary base '{expected[0]['name']}', but the running "
            f"primary is {running[0]['name'] if running else None!r}"
        )
    for want in expected:
        have = running_by_name.get(want["name"])
        if have is None:
            raise ValueError(
                f"{where} reads base '{want['name']}', which is not running; running: "
                f"{[b['name'] for b in running]}"
            )
        for field in ("fingerprint", "tokenizer"):
            if want[field] != have[field]:
                raise ValueError(
                    f"{where} was trained on base '{want['name']}' with {field} {want[field]}, "
                    f"but the running base '{have['name']}' has {field} {have[field]}; "
                    "serve it with the base it was trained on, or retrain it"
                )


def load_carryon(
    directory: str | Path, *, running_bases: list[dict[str, str]] | None = None
) -> tuple[CarryOn, Layout, dict]:
    """Return (carry-on in eval mode, its layout, its config.json)."""
    directory = Path(directory)
    config = read_artifact_config(directory)
    if running_bases is not None:
        check_bases(config, running_bases, where=f"carry-on {directory.name}")
    carry_on = CarryOn(CarryOnConfig(**config["carry_on"]))
    weights = directory / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{directory}: model.safetensors is missing")
    carry_on.load_state_dict(load_file(weights))
    layout = Layout.from_json(json.dumps(config["layout"]))
    return carry_on.eval().requires_grad_(False), layout, config

