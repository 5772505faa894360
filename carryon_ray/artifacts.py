"""Carry-on artifacts: a directory with `config.json` and `model.safetensors` (no pickle), on
any store `carryon_ray/storage.py` reaches, published as a whole.

`config.json` holds the architecture, the layout (sources, codec, bits), α and the bases'
identities (name, weight fingerprint, tokenizer hash). Loading refuses an artifact whose
bases do not match the running ones, naming what differs.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from carryon_ray.carry_on import CarryOn, CarryOnConfig
from carryon_ray.records import Layout
from carryon_ray.storage import Location, location

ARTIFACT_FORMAT = "carryon_ray/1"
CONFIG, WEIGHTS = "config.json", "model.safetensors"


def save_carryon(
    directory: str | Path | Location,
    carry_on: CarryOn,
    layout: Layout,
    *,
    alpha: float,
    extra: dict | None = None,
) -> Location:
    """Publish atomically (`Location.publish_directory`): a reader never sees a half-written
    artifact, on a local disk or on an object store."""
    target = location(directory)
    # float32 whatever dtype it trained in (train.param_dtype): artifacts load as float32.
    state = {
        name: (tensor.float() if tensor.is_floating_point() else tensor).detach().contiguous().cpu()
        for name, tensor in carry_on.state_dict().items()
    }
    config = {
        "format": ARTIFACT_FORMAT,
        "carry_on": carry_on.config.to_dict(),
        "layout": json.loads(layout.to_json()),
        "alpha": alpha,
        "bases": layout.bases,
        "parameters": carry_on.num_parameters(),
        **(extra or {}),
    }
    with tempfile.TemporaryDirectory(prefix="carryon-artifact-") as staging:
        save_file(state, Path(staging) / WEIGHTS)
        (Path(staging) / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        target.publish_directory(staging)
    return target


def artifact_files(directory: str | Path | Location) -> Location:
    """Where a published artifact's files are (the version its pointer names on an object
    store); FileNotFoundError when nothing was published there."""
    where = location(directory)
    current = where.current()
    if current is None:
        raise FileNotFoundError(f"no carry-on artifact at {where}; export one first (carryon run)")
    return current


def is_artifact(directory: str | Path | Location) -> bool:
    """Whether a carry-on was published at `directory` (its config.json is there)."""
    current = location(directory).current()
    return current is not None and (current / CONFIG).is_file()


def artifact_version(directory: str | Path | Location) -> str:
    """Changes whenever the artifact is published again (a server reloads it then)."""
    config = artifact_files(directory) / CONFIG
    info = config.fs.get_file_info(config.path)
    return f"{config.uri}|{info.mtime_ns}|{info.size}"


def read_described(directory: str | Path | Location, filename: str, *, format: str, what: str) -> dict:
    """The JSON a directory describes itself with, refused when missing or of another format."""
    directory = location(directory)
    path = directory / filename
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a {what}: {filename} is missing")
    described = json.loads(path.read_text())
    if described.get("format") != format:
        raise ValueError(
            f"{directory}: {what} format {described.get('format')!r} is not {format!r}; it was "
            "written by another version of carryon_ray"
        )
    return described


def read_artifact_config(directory: str | Path | Location) -> dict:
    where = location(directory)
    files = where.current()
    if files is None:
        raise FileNotFoundError(f"{where} is not a carry-on artifact: nothing was published there")
    return read_described(files, CONFIG, format=ARTIFACT_FORMAT, what="carry-on artifact")


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
    directory: str | Path | Location, *, running_bases: list[dict[str, str]] | None = None
) -> tuple[CarryOn, Layout, dict]:
    """Return (carry-on in eval mode, its layout, its config.json); the directory may be on
    any pyarrow.fs store (the weights are copied to the local cache once)."""
    directory = location(directory)
    files = artifact_files(directory)
    config = read_described(files, CONFIG, format=ARTIFACT_FORMAT, what="carry-on artifact")
    if running_bases is not None:
        check_bases(config, running_bases, where=f"carry-on {directory.name}")
    carry_on = CarryOn(CarryOnConfig(**config["carry_on"]))
    weights = files / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{directory}: {WEIGHTS} is missing")
    carry_on.load_state_dict(load_file(weights.materialize()))
    layout = Layout.from_json(json.dumps(config["layout"]))
    return carry_on.eval().requires_grad_(False), layout, config

