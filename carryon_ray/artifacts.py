"""Carry-on artifacts: a directory with `config.json` and `model.safetensors` (no pickle), on
any store `carryon_ray/storage.py` reaches, published as a whole.

`config.json` holds the architecture, the layout (sources, codec, bits), α and the bases'
identities (name, weight fingerprint, tokenizer hash). Loading refuses an artifact whose
bases do not match the running ones, naming what differs.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from carryon_ray.carry_on import CarryOn, CarryOnConfig
from carryon_ray.config import BITS, CODECS
from carryon_ray.records import Layout
from carryon_ray.storage import Location, location

ARTIFACT_FORMAT = "carryon_ray/1"
CONFIG, WEIGHTS = "config.json", "model.safetensors"

# Bounds an artifact's config.json must keep before anything is allocated for it.
MAX_WIDTH = 65_536  # input_dims, output_dim, hidden_size
MAX_LAYERS = 256
MAX_POSITIONS = 2**20
MAX_PARAMETERS = 2**31  # 8 GiB in float32
MAX_ALPHA = 100.0
MAX_DESCRIPTION_BYTES = 16 * 2**20  # config.json
WEIGHT_DTYPES = ("F32", "F16", "BF16")


class ArtifactError(ValueError):
    """A carry-on artifact whose files are broken: config.json off its schema or bounds, or
    weights that are not the tensors its config implies."""


def save_carryon(
    directory: str | Path | Location,
    carry_on: CarryOn,
    layout: Layout,
    *,
    alpha: float,
    extra: dict | None = None,
) -> Location:
    """Publish atomically and make it current (`Location.publish_directory`): a reader never
    sees a half-written artifact, on a local disk or on an object store. Returns `directory`."""
    target = location(directory)
    target.promote(publish_carryon(target, carry_on, layout, alpha=alpha, extra=extra).name)
    return target


def publish_carryon(
    directory: str | Path | Location,
    carry_on: CarryOn,
    layout: Layout,
    *,
    alpha: float,
    extra: dict | None = None,
) -> Location:
    """Publish a new version of the carry-on at `directory` without making it current
    (`Location.publish_version`); returns the version's location, which `load_carryon` reads.
    The evaluate stage decides whether it is promoted (`carryon_ray/registry.py`)."""
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
        version = target.publish_version(staging)
    return target.version(version)


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
    """Changes whenever the artifact is published again, or either of its files changes (a
    server reloads it then, and forgets a failure it remembered)."""
    files = artifact_files(directory)
    config, weights = files / CONFIG, files / WEIGHTS
    infos = config.fs.get_file_info([config.path, weights.path])
    return "|".join([config.uri, *(f"{info.mtime_ns}:{info.size}" for info in infos)])


def read_described(directory: str | Path | Location, filename: str, *, format: str, what: str) -> dict:
    """The JSON a directory describes itself with, refused when missing or of another format."""
    directory = location(directory)
    path = directory / filename
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a {what}: {filename} is missing")
    if path.size() > MAX_DESCRIPTION_BYTES:
        raise ArtifactError(f"{directory}: {filename} has more than {MAX_DESCRIPTION_BYTES} bytes")
    try:
        described = json.loads(path.read_text())
    except ValueError as error:  # not UTF-8, not JSON
        raise ArtifactError(f"{directory}: {filename} is not valid JSON ({error})") from None
    if not isinstance(described, dict):
        raise ArtifactError(f"{directory}: {filename} is not a JSON object")
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
    directory: str | Path | Location,
    *,
    running_bases: list[dict[str, str]] | None = None,
    running_shapes: dict[str, tuple[int, int]] | None = None,
) -> tuple[CarryOn, Layout, dict]:
    """Return (carry-on in eval mode, its layout, its config.json); the directory may be on
    any pyarrow.fs store (the weights are copied to the local cache once). The artifact is
    validated first (`validate_artifact`; ArtifactError), then checked against the running
    bases' identities and their (num_layers, hidden_size) by name when given."""
    directory = location(directory)
    files = artifact_files(directory)
    config = read_described(files, CONFIG, format=ARTIFACT_FORMAT, what="carry-on artifact")
    weights = files / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{directory}: {WEIGHTS} is missing")
    local_weights = weights.materialize()
    layout = validate_artifact(config, local_weights, where=f"carry-on {directory.name}")
    if running_bases is not None:
        check_bases(config, running_bases, where=f"carry-on {directory.name}")
    if running_shapes is not None:
        check_layers(layout, running_shapes, where=f"carry-on {directory.name}")
    carry_on = CarryOn(CarryOnConfig(**config["carry_on"]))
    try:
        carry_on.load_state_dict(load_file(local_weights))
    except (SafetensorError, RuntimeError) as error:  # the header held, the data did not
        raise ArtifactError(f"carry-on {directory.name}: {WEIGHTS} does not load: {error}") from None
    return carry_on.eval().requires_grad_(False), layout, config


# ---------------------------------------------------------------------------------------------
# Validation: the config's schema and bounds, then the weights' header against the config


_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]


class _CarryOnSchema(BaseModel):
    model_config = _STRICT

    input_dims: list[Width] = Field(min_length=1, max_length=64)
    output_dim: Width
    hidden_size: Width
    num_layers: int = Field(ge=0, le=MAX_LAYERS)
    num_heads: int = Field(ge=1, le=1024)
    mlp_ratio: int = Field(ge=1, le=64)
    max_positions: int = Field(ge=1, le=MAX_POSITIONS)
    dropout: float = Field(ge=0.0, lt=1.0)
    gate_bias_init: float
    extra: dict


class _Identity(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # the three keys a check compares

    name: str
    fingerprint: str
    tokenizer: str


class _LayerSchema(BaseModel):
    model_config = _STRICT

    base: str
    layer: int = Field(ge=0, le=4096)
    dim: Width


class _ViewSchema(BaseModel):
    model_config = _STRICT

    key: str
    bits: Literal[BITS]


class _LayoutSchema(BaseModel):
    model_config = _STRICT

    format_version: int
    codec: Literal[CODECS]
    layers: dict[str, _LayerSchema] = Field(min_length=1)
    stored_bits: dict[str, Literal[BITS]]
    residual: _ViewSchema
    sources: list[_ViewSchema] = Field(min_length=1)
    bases: list[_Identity] = Field(min_length=1)
    extra: dict = Field(default_factory=dict)


class _ArtifactSchema(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)  # + export's notes

    format: Literal[ARTIFACT_FORMAT]
    carry_on: _CarryOnSchema
    layout: _LayoutSchema
    alpha: float = Field(ge=0.0, le=MAX_ALPHA)
    bases: list[_Identity] = Field(min_length=1)
    parameters: int = Field(ge=0)


def validate_artifact(config: dict, weights: str | Path, *, where: str) -> Layout:
    """Refuse a broken artifact (ArtifactError naming `where` and the problem) before anything
    is allocated for it: config.json's schema and bounds, the layout agreeing with the
    carry-on's widths, and the safetensors header (read alone) holding exactly the tensors,
    shapes and float dtypes the config implies. Returns the layout."""
    try:
        schema = _ArtifactSchema.model_validate(config)
    except ValidationError as error:
        problems = [
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
            for item in error.errors()[:6]
        ]
        raise ArtifactError(f"{where}: {CONFIG} is invalid: {'; '.join(problems)}") from None
    shape, layout = schema.carry_on, schema.layout
    problems = []
    if shape.hidden_size % shape.num_heads:
        problems.append(f"hidden_size {shape.hidden_size} is not a multiple of num_heads {shape.num_heads}")
    views = [layout.residual, *layout.sources]
    missing = sorted({view.key for view in views} - layout.layers.keys())
    if missing or layout.stored_bits.keys() != layout.layers.keys():
        problems.append(f"layout views or stored_bits name layers it lacks ({missing or 'stored_bits'})")
    else:
        source_dims = [layout.layers[view.key].dim for view in layout.sources]
        if source_dims != shape.input_dims:
            problems.append(f"layout source widths {source_dims} differ from input_dims {shape.input_dims}")
        if layout.layers[layout.residual.key].dim != shape.output_dim:
            problems.append(f"the residual layer's width differs from output_dim {shape.output_dim}")
    names = [base.name for base in schema.bases]
    if [base.model_dump() for base in layout.bases] != [base.model_dump() for base in schema.bases]:
        problems.append("layout.bases differs from bases")
    strangers = sorted({ref.base for ref in layout.layers.values()} - set(names))
    if strangers:
        problems.append(f"layout reads bases {strangers} not among bases {names}")
    if problems:
        raise ArtifactError(f"{where}: {CONFIG} is inconsistent: {'; '.join(problems)}")
    expected = _expected_shapes(shape)
    count = sum(math.prod(dims) for dims in expected.values())
    if count > MAX_PARAMETERS:
        raise ArtifactError(f"{where}: {CONFIG} describes {count:,} parameters, over {MAX_PARAMETERS:,}")
    _check_header(weights, expected, where=where)
    try:
        return Layout.from_json(json.dumps(config["layout"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{where}: {CONFIG} layout is invalid: {error}") from None


def check_layers(layout: Layout, running: dict[str, tuple[int, int]], *, where: str) -> None:
    """Each layer the layout reads exists in its running base (index 0..num_layers) with the
    base's hidden size."""
    for key, ref in layout.layers.items():
        num_layers, hidden_size = running.get(ref.base, (None, None))
        if num_layers is None:
            continue  # check_bases names a base that is not running
        if ref.layer > num_layers or ref.dim != hidden_size:
            raise ArtifactError(
                f"{where}: layer {key} (width {ref.dim}) is not a layer of the running base "
                f"'{ref.base}' ({num_layers} layers of width {hidden_size})"
            )


def _expected_shapes(shape: _CarryOnSchema) -> dict[str, tuple[int, ...]]:
    """The state dict's names and shapes, from the module built on the meta device (no
    memory is allocated, whatever the sizes)."""
    with torch.device("meta"):
        module = CarryOn(CarryOnConfig(**shape.model_dump()))
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def _check_header(weights: str | Path, expected: dict[str, tuple[int, ...]], *, where: str) -> None:
    try:
        with safe_open(str(weights), framework="pt") as handle:
            found = {}
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                piece = handle.get_slice(name)
                found[name] = (tuple(piece.get_shape()), piece.get_dtype())
    except (SafetensorError, OSError) as error:
        raise ArtifactError(f"{where}: {WEIGHTS} is not a readable safetensors file ({error})") from None
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    wrong = [
        f"{name} {list(found[name][0])} (config implies {list(dims)})"
        for name, dims in expected.items()
        if name in found and found[name][0] != dims
    ]
    dtypes = sorted({dtype for _, dtype in found.values()} - set(WEIGHT_DTYPES))
    problems = [
        *([f"missing tensors {missing[:4]}"] if missing else []),
        *([f"unexpected tensors {extra[:4]}"] if extra else []),
        *([f"wrong shapes: {', '.join(wrong[:4])}"] if wrong else []),
        *([f"dtypes {dtypes} (expected one of {list(WEIGHT_DTYPES)})"] if dtypes else []),
    ]
    if problems:
        raise ArtifactError(f"{where}: {WEIGHTS} does not match {CONFIG}: {'; '.join(problems)}")

