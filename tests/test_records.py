"""Arrow records: tensors -> encode_rows -> Parquet -> decode_batch, and the Layout they carry."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from carryon_ray.codec import CodecSpec, decode, roundtrip
from carryon_ray.records import (
    LayerRef,
    Layout,
    View,
    decode_batch,
    encode_rows,
    layout_of,
    serving_views,
    to_table,
)

DIM = 37  # odd on purpose: exercises the codecs' padding
BASES = [{"name": "tiny", "fingerprint": "f00d", "tokenizer": "abcd"}]
FINAL = LayerRef("tiny", 2, DIM)
SHALLOW = LayerRef("tiny", 0, DIM)


def _layout(codec: str = "absmax", residual_bits: int = 8, input_bits: int = 4) -> Layout:
    """The final layer is both the residual and a carry-on input; a shallow layer is a shortcut."""
    return Layout.build(
        codec=codec,
        residual=(FINAL, residual_bits),
        sources=[(FINAL, input_bits), (SHALLOW, input_bits)],
        bases=BASES,
    )


def _rows(lengths=(5, 3, 7)):
    generator = torch.Generator().manual_seed(0)
    input_ids = [list(range(10, 10 + n)) for n in lengths]
    masks = [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths]
    hidden = {
        key: [torch.randn(n, DIM, generator=generator) for n in lengths]
        for key in (FINAL.key, SHALLOW.key)
    }
    return input_ids, masks, hidden


def _write_and_read(layout: Layout, tmp_path, lengths=(5, 3, 7)):
    input_ids, masks, hidden = _rows(lengths)
    columns = encode_rows(
        layout,
        ids=[f"r{i}" for i in range(len(lengths))],
        input_ids=input_ids,
        target_masks=masks,
        hidden=hidden,
    )
    path = tmp_path / "shard.parquet"
    pq.write_table(to_table(layout, columns), path)
    return columns, pq.read_table(path), hidden


def test_build_stores_a_shared_layer_once_at_the_higher_precision():
    layout = _layout(residual_bits=8, input_bits=4)
    assert layout.stored_bits == {FINAL.key: 8, SHALLOW.key: 4}
    assert layout.residual == View(FINAL.key, 8)
    assert layout.sources == [View(FINAL.key, 4), View(SHALLOW.key, 4)]
    # float16 (bits 0) is the most precise setting of all.
    assert _layout(residual_bits=4, input_bits=0).stored_bits[FINAL.key] == 0
    assert layout.bytes_per_token == (
        CodecSpec("absmax", 8, DIM).bytes_per_token + CodecSpec("absmax", 4, DIM).bytes_per_token
    )


@pytest.mark.parametrize(
    "codec,residual_bits,input_bits",
    [("absmax", 8, 4), ("absmax", 0, 2), ("blockwise8", 8, 0), ("nf4", 0, 4)],
)
def test_parquet_round_trip_is_byte_exact(tmp_path, codec, residual_bits, input_bits):
    layout = _layout(codec, residual_bits, input_bits)
    columns, table, _ = _write_and_read(layout, tmp_path)
    assert layout_of(table.schema) == layout
    read = table.to_pydict()
    for key in layout.stored_bits:
        assert read[f"{key}:codes"] == columns[f"{key}:codes"]
        assert read[f"{key}:scales"] == columns[f"{key}:scales"]
    assert read["input_ids"] == columns["input_ids"]
    assert read["target_mask"] == columns["target_mask"]


def _decode_rows(layout: Layout, columns: dict, key: str, row: int) -> torch.Tensor:
    """Decode one row's stored codes directly, independent of decode_batch."""
    spec = layout.stored_spec(key)
    codes = torch.frombuffer(bytearray(columns[f"{key}:codes"][row]), dtype=torch.uint8)
    scales = torch.frombuffer(bytearray(columns[f"{key}:scales"][row]), dtype=torch.float32)
    return decode(codes.reshape(-1, spec.code_bytes), scales.reshape(-1, spec.num_scales), spec)


@pytest.mark.parametrize("as_numpy", [False, True], ids=["pydict", "numpy"])
def test_decode_batch_matches_decoding_the_same_codes(tmp_path, as_numpy):
    layout = _layout("absmax", 8, 4)
    lengths = (5, 3, 7)
    columns, table, hidden = _write_and_read(layout, tmp_path, lengths)
    if as_numpy:  # what Ray Data hands a training worker
        read = {
            name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names
        }
    else:
        read = table.to_pydict()
    batch = decode_batch(layout, read)
    longest = max(lengths)
    assert batch.input_ids.shape == (3, longest) and batch.input_ids.dtype == torch.int64
    assert batch.target_mask.dtype == torch.bool
    assert batch.lengths.tolist() == list(lengths)
    assert batch.residual.shape == (3, longest, DIM) and batch.residual.dtype == torch.float32
    assert [s.shape for s in batch.sources] == [(3, longest, DIM)] * 2
    four = CodecSpec("absmax", 4, DIM)
    for row, n in enumerate(lengths):
        assert batch.input_ids[row, :n].tolist() == columns["input_ids"][row]
        assert batch.target_mask[row, :n].tolist() == [bool(m) for m in columns["target_mask"][row]]
        final = _decode_rows(layout, columns, FINAL.key, row)
        assert torch.equal(batch.residual[row, :n], final)
        # The 4-bit view of the final layer is derived from its 8-bit copy by re-quantizing.
        assert torch.equal(batch.sources[0][row, :n], roundtrip(final, four))
        assert torch.equal(
            batch.sources[1][row, :n], _decode_rows(layout, columns, SHALLOW.key, row)
        )
        # Padding is zeros and never a target.
        assert not batch.residual[row, n:].any() and not batch.target_mask[row, n:].any()
    # Derived views stay within the codec's bound of the original hidden states.
    for row, n in enumerate(lengths):
        original = hidden[FINAL.key][row]
        error = (batch.sources[0][row, :n] - original).abs().amax(dim=1)
        bound = (
            four.error_bound() + CodecSpec("absmax", 8, DIM).error_bound()
        ) * original.abs().amax(dim=1)
        assert torch.all(error <= bound * (1 + 1e-4))


def test_serving_views_keep_the_exact_residual_and_quantize_sources():
    layout = _layout("absmax", 8, 4)
    exact = {FINAL.key: torch.randn(1, 4, DIM), SHALLOW.key: torch.randn(1, 4, DIM)}
    residual, sources = serving_views(layout, exact)
    assert residual is exact[FINAL.key]
    four = CodecSpec("absmax", 4, DIM)
    assert torch.equal(sources[0], roundtrip(exact[FINAL.key], four))
    assert torch.equal(sources[1], roundtrip(exact[SHALLOW.key], four))


def test_layout_json_round_trip_and_version_check():
    layout = _layout()
    assert Layout.from_json(layout.to_json()) == layout
    data = json.loads(layout.to_json())
    data["format_version"] = 99
    with pytest.raises(ValueError, match="re-run the embed stage"):
        Layout.from_json(json.dumps(data))


def test_parquet_without_a_layout_is_refused():
    with pytest.raises(ValueError, match="no carry-on layout"):
        layout_of(pa.schema([pa.field("id", pa.string())]))


def test_check_compatible_names_each_mismatch():
    layout = _layout("absmax", 8, 4)
    layout.check_compatible(_layout("absmax", 8, 4))  # identical: no error
    with pytest.raises(ValueError, match="codec nf4 != absmax"):
        layout.check_compatible(_layout("nf4", 0, 4))
    with pytest.raises(ValueError, match="views"):
        layout.check_compatible(_layout("absmax", 8, 2))
    other_base = _layout()
    other_base.bases = [{**BASES[0], "fingerprint": "beef"}]
    with pytest.raises(ValueError, match="bases .*beef") as caught:
        layout.check_compatible(other_base, what="shards")
    assert str(caught.value).startswith("shards do not match")


def test_encode_rows_refuses_hidden_states_of_the_wrong_length():
    layout = _layout()
    input_ids, masks, hidden = _rows((4, 2))
    hidden[FINAL.key][0] = hidden[FINAL.key][0][:3]
    with pytest.raises(AssertionError, match="token counts"):
        encode_rows(layout, ids=["a", "b"], input_ids=input_ids, target_masks=masks, hidden=hidden)


def test_columns_hold_fixed_width_bytes_per_token():
    layout = _layout()
    input_ids, masks, hidden = _rows((2,))
    columns = encode_rows(layout, ids=["a"], input_ids=input_ids, target_masks=masks, hidden=hidden)
    table = to_table(layout, columns)
    assert table.schema.field(f"{FINAL.key}:codes").type == pa.binary()
    spec = layout.stored_spec(FINAL.key)
    assert len(columns[f"{FINAL.key}:codes"][0]) == 2 * spec.code_bytes
    assert np.frombuffer(columns[f"{FINAL.key}:scales"][0], dtype=np.float32).shape == (
        2 * spec.num_scales,
    )
