"""Arrow records of compressed hidden states, and the layout that describes them.

One row is one sequence: `id`, `input_ids`, `target_mask` (1 where the token is a training
target) and, per stored layer, `<key>:codes` / `<key>:scales` as raw bytes (T rows of the
codec's fixed width). The `Layout` travels in the Parquet schema metadata, so a shard says
which codec, bits, layers and bases produced it, and a reader refuses a mismatch.

A layer is stored once, at the most precise bits any view asks for; a view with fewer bits is
derived by re-quantizing after decoding (SPEC §1, bridge σ).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from carryon_ray.codec import CodecSpec, decode, encode, roundtrip
from carryon_ray.storage import location

FORMAT_VERSION = 1
METADATA_KEY = b"carryon"


def precision(bits: int) -> int:
    """Bits of information per value: 0 (float16) is the most precise setting."""
    return 16 if bits == 0 else bits


@dataclass(frozen=True)
class LayerRef:
    base: str
    layer: int  # normalised: 0..L
    dim: int

    @property
    def key(self) -> str:
        return f"{self.base}.{self.layer}"


@dataclass(frozen=True)
class View:
    """A layer seen through σ at `bits` (the carry-on's input, or the residual x̂)."""

    key: str
    bits: int


@dataclass
class Layout:
    codec: str
    layers: dict[str, LayerRef]  # key -> layer
    stored_bits: dict[str, int]  # key -> bits on disk
    residual: View
    sources: list[View]
    bases: list[dict[str, str]]  # identities, primary first
    extra: dict = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        *,
        codec: str,
        residual: tuple[LayerRef, int],
        sources: list[tuple[LayerRef, int]],
        bases: list[dict[str, str]],
    ) -> Layout:
        layers: dict[str, LayerRef] = {}
        stored_bits: dict[str, int] = {}
        for ref, bits in [residual, *sources]:
            layers[ref.key] = ref
            if ref.key not in stored_bits or precision(bits) > precision(stored_bits[ref.key]):
                stored_bits[ref.key] = bits
        return cls(
            codec=codec,
            layers=layers,
            stored_bits=stored_bits,
            residual=View(residual[0].key, residual[1]),
            sources=[View(ref.key, bits) for ref, bits in sources],
            bases=bases,
        )

    def stored_spec(self, key: str) -> CodecSpec:
        return CodecSpec(self.codec, self.stored_bits[key], self.layers[key].dim)

    def view_spec(self, view: View) -> CodecSpec:
        return CodecSpec(self.codec, view.bits, self.layers[view.key].dim)

    @property
    def bytes_per_token(self) -> int:
        return sum(self.stored_spec(key).bytes_per_token for key in self.stored_bits)

    def to_json(self) -> str:
        data = asdict(self)
        data["format_version"] = FORMAT_VERSION
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Layout:
        data = json.loads(text)
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"embeddings were written in format {version}, this version reads {FORMAT_VERSION}; "
                "re-run the embed stage"
            )
        return cls(
            codec=data["codec"],
            layers={key: LayerRef(**ref) for key, ref in data["layers"].items()},
            stored_bits=data["stored_bits"],
            residual=View(**data["residual"]),
            sources=[View(**view) for view in data["sources"]],
            bases=data["bases"],
            extra=data.get("extra", {}),
        )

    def check_compatible(self, other: Layout, what: str = "embeddings") -> None:
        """Refuse data whose layers, codec or bases differ from what a model expects."""
        problems = []
        if self.codec != other.codec:
            problems.append(f"codec {other.codec} != {self.codec}")
        if self.residual != other.residual or self.sources != other.sources:
            problems.append(
                f"views {[other.residual, *other.sources]} != {[self.residual, *self.sources]}"
            )
        mine = [(b["name"], b["fingerprint"]) for b in self.bases]
        theirs = [(b["name"], b["fingerprint"]) for b in other.bases]
        if mine != theirs:
            problems.append(f"bases {theirs} != {mine}")
        if problems:
            raise ValueError(f"{what} do not match: " + "; ".join(problems))


def schema(layout: Layout) -> pa.Schema:
    fields = [
        pa.field("id", pa.string()),
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("target_mask", pa.list_(pa.int8())),
    ]
    for key in layout.stored_bits:
        fields += [pa.field(f"{key}:codes", pa.binary()), pa.field(f"{key}:scales", pa.binary())]
    return pa.schema(fields, metadata={METADATA_KEY: layout.to_json().encode()})


def layout_of(table_schema: pa.Schema) -> Layout:
    metadata = table_schema.metadata or {}
    if METADATA_KEY not in metadata:
        raise ValueError("these Parquet files carry no carry-on layout; were they written by embed?")
    return Layout.from_json(metadata[METADATA_KEY])


def check_shard(shard, layout: Layout) -> None:
    """Refuse a shard (a path, URI or `storage.Location`) whose schema metadata is not the
    layout the manifest records; reads the Parquet footer only."""
    where = location(shard)
    fix = ("remove it and re-run the embed stage (stages: [embed, ...]); it recomputes only the "
           "shards that are missing")
    if not where.is_file():
        raise FileNotFoundError(f"shard {where}, listed in the embeddings manifest, is missing; re-run "
                                "the embed stage (stages: [embed, ...]); it recomputes only missing shards")
    with where.open_input() as handle:
        try:
            stored = layout_of(pq.read_schema(handle))
        except ValueError as error:
            raise ValueError(f"shard {where}: {error}; {fix}") from error
    if stored.to_json() != layout.to_json():
        differ = [name for name in ("codec", "layers", "stored_bits", "residual", "sources", "bases", "extra")
                  if getattr(stored, name) != getattr(layout, name)]
        raise ValueError(
            f"shard {where} was written with another layout than the manifest records "
            f"({', '.join(differ)} differ); {fix}"
        )


def encode_rows(
    layout: Layout,
    *,
    ids: list[str],
    input_ids: list[list[int]],
    target_masks: list[list[int]],
    hidden: dict[str, list[torch.Tensor]],
) -> dict[str, list]:
    """Compress per-row hidden states ({key: [(T_r, D)]}) into column lists for Arrow."""
    columns: dict[str, list] = {
        "id": list(ids),
        "input_ids": [list(map(int, row)) for row in input_ids],
        "target_mask": [list(map(int, row)) for row in target_masks],
    }
    lengths = [len(row) for row in input_ids]
    for key in layout.stored_bits:
        spec = layout.stored_spec(key)
        states = hidden[key]
        assert [s.shape[0] for s in states] == lengths, "hidden states must match token counts"
        codes, scales = encode(torch.cat(states).float(), spec)  # one call for the whole batch
        columns[f"{key}:codes"] = [c.numpy().tobytes() for c in codes.split(lengths)]
        columns[f"{key}:scales"] = [s.numpy().tobytes() for s in scales.split(lengths)]
    return columns


def to_table(layout: Layout, columns: dict[str, list]) -> pa.Table:
    return pa.Table.from_pydict(columns, schema=schema(layout))


@dataclass
class Batch:
    """Decoded training inputs, right-padded to the longest row.

    input_ids (B, T) int64, target_mask (B, T) bool, lengths (B,),
    residual (B, T, D) float32 = x̂, sources: one (B, T, D_k) float32 per view.
    """

    input_ids: torch.Tensor
    target_mask: torch.Tensor
    lengths: torch.Tensor
    residual: torch.Tensor
    sources: list[torch.Tensor]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.target_mask.to(device),
            self.lengths.to(device),
            self.residual.to(device),
            [s.to(device) for s in self.sources],
        )


def _pad(rows: list[torch.Tensor], length: int, value=0) -> torch.Tensor:
    out = torch.full((len(rows), length, *rows[0].shape[1:]), value, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : row.shape[0]] = row
    return out


def _view(layout: Layout, view: View, stored: torch.Tensor) -> torch.Tensor:
    if precision(view.bits) >= precision(layout.stored_bits[view.key]):
        return stored
    return roundtrip(stored, layout.view_spec(view))


def decode_batch(layout: Layout, columns: dict) -> Batch:
    """Arrow/numpy columns of B rows (as Ray Data or pyarrow gives them) -> a padded Batch."""
    input_ids = [torch.tensor(np.asarray(row), dtype=torch.int64) for row in columns["input_ids"]]
    masks = [torch.tensor(np.asarray(row), dtype=torch.bool) for row in columns["target_mask"]]
    lengths = [row.shape[0] for row in input_ids]
    longest = max(lengths)
    decoded: dict[str, torch.Tensor] = {}
    for key in layout.stored_bits:
        spec = layout.stored_spec(key)
        codes = np.frombuffer(b"".join(columns[f"{key}:codes"]), dtype=np.uint8)
        scales = np.frombuffer(b"".join(columns[f"{key}:scales"]), dtype=np.float32)
        total = sum(lengths)
        flat = decode(
            torch.from_numpy(codes.copy()).reshape(total, spec.code_bytes),
            torch.from_numpy(scales.copy()).reshape(total, spec.num_scales),
            spec,
        )  # (sum T, D)
        decoded[key] = flat
    def padded(view: View) -> torch.Tensor:
        flat = _view(layout, view, decoded[view.key])
        return _pad(list(flat.split(lengths)), longest, 0.0)  # (B, T, D)

    return Batch(
        input_ids=_pad(input_ids, longest, 0),
        target_mask=_pad(masks, longest, False),
        lengths=torch.tensor(lengths),
        residual=padded(layout.residual),
        sources=[padded(view) for view in layout.sources],
    )


def serving_views(layout: Layout, exact: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The serving path: the exact residual x, and each source through σ̂ at its own bits."""
    residual = exact[layout.residual.key]
    sources = [roundtrip(exact[view.key], layout.view_spec(view)) for view in layout.sources]
    return residual, sources
