"""The embed stage's input as one ordered Ray Data stream, from raw rows to a shard plan.

    read      RowsDatasource: one read task per file, blocks of BLOCK_ROWS rows, on any
              pyarrow.fs URI (Ray Data's read_json / read_text fail a whole file on one bad
              line; this reads the same formats row by row, so a bad row is counted with
              its file and line, through the same `readers.stream_rows` as `build_examples`)
    tokenize  CPU tasks; each worker process loads the primary's tokenizer once
    head      one actor fed in order: keeps the first train_size + eval_size usable units and
              counts every row it passes over (malformed, dropped, truncated)
    limit     stops the reads as soon as the split has its rows: a huge file is read only
              as far as the split needs
    plan      one task over the kept units (bounded by the split sizes): split, pack each
              side, sort by length and cut into shards named by a hash of the layout and
              their content; each shard becomes one block for the embed actor pool

The rows keep their order (`preserve_order`), so the stream makes exactly the examples
`data.build_examples` makes in one process. Nothing here passes through the driver.
"""

from __future__ import annotations

import functools
import hashlib
import json
import posixpath
from contextlib import contextmanager

import pyarrow as pa
import ray
from ray.data.datasource import FileBasedDatasource

from carryon_ray.config import DataSpec, TenantsSpec
from carryon_ray.data import Example, account, report_unit, split_and_pack, unit_of
from carryon_ray.readers import DataReport, RawRow, pydoc_rows, resolve_format, stream_rows
from carryon_ray.tenants import directory_files, row_tenant, split_tenant

BLOCK_ROWS = 1024
PROBLEMS_KEPT = 20  # as DataReport.note keeps

RAW_SCHEMA = pa.schema([
    ("position", pa.int64()), ("id", pa.string()), ("record", pa.string()), ("problem", pa.string()),
])
UNIT_SCHEMA = pa.schema([
    ("position", pa.int64()), ("id", pa.string()), ("input_ids", pa.list_(pa.int32())),
    ("target_mask", pa.list_(pa.int8())), ("status", pa.string()), ("problem", pa.string()),
    ("tenant", pa.string()),  # "" without tenants
])
# A kept unit carries the rows read since the previous kept one (itself included).
KEPT_SCHEMA = pa.schema([
    *UNIT_SCHEMA, ("read", pa.int64()), ("malformed", pa.int64()), ("dropped", pa.int64()),
    ("problems", pa.list_(pa.string())),
])
PLAN_SCHEMA = pa.schema([
    ("shard", pa.string()),  # relative to RUN_DIR/embeddings; "" on the row that reports an error
    ("split", pa.string()), ("rows", pa.int64()), ("tokens", pa.int64()),
    ("examples", pa.string()),  # the shard's examples as JSON
    ("plan_rows", pa.int64()),  # rows of the whole plan, for the progress bar
    ("report", pa.string()),  # the DataReport as JSON
    ("error", pa.string()),  # a split the data cannot honour, or a side without targets
    ("shortfall", pa.bool_()),  # fewer usable rows than the split asks for
    ("tenant", pa.string()),  # the shard's tenant ("" without tenants; set on a tenant's error row)
])


@contextmanager
def ordered():
    """Datasets built inside keep their rows in input order (the split is by order)."""
    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        yield
    finally:
        context.execution_options.preserve_order = saved


class RowsDatasource(FileBasedDatasource):
    """Raw rows of JSONL, text, Parquet or saved-HF Arrow files as RAW_SCHEMA blocks."""

    def __init__(self, files, *, kind: str, spec: DataSpec) -> None:
        super().__init__([file.path for file in files], filesystem=files[0].fs)
        self._kind, self._spec = kind, spec
        self._numbers = {file.path: number for number, file in enumerate(files)}
        self._names = {file.name: number for number, file in enumerate(files)}
        self._single = len(files) == 1

    def _read_stream(self, f, path: str):
        name = posixpath.basename(path)
        number = self._numbers.get(path, self._names.get(name))
        rows = stream_rows(self._kind, f, name=name, number=number, single=self._single, spec=self._spec)
        batch: list[RawRow] = []
        for raw in rows:
            batch.append(raw)
            if len(batch) == BLOCK_ROWS:
                yield _raw_table(batch)
                batch = []
        if batch:
            yield _raw_table(batch)


def _raw_table(rows: list[RawRow]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"position": raw.position, "id": raw.id, "problem": raw.problem,
          "record": None if raw.record is None else json.dumps(raw.record, default=str)} for raw in rows],
        schema=RAW_SCHEMA,
    )


def _pydoc_table(_batch, *, spec: DataSpec) -> pa.Table:
    return _raw_table(list(pydoc_rows(spec)))


def _pydoc_packages_table(_batch, *, spec: DataSpec) -> pa.Table:
    from carryon_ray.readers import pydoc_package_rows

    return _raw_table(list(pydoc_package_rows(spec)))


def raw_rows(spec: DataSpec, *, resources: dict[str, float], tenants: TenantsSpec | None = None) -> ray.data.Dataset:
    """`data.dataset` as a Dataset of RAW_SCHEMA rows, in input order (build inside `ordered()`)."""
    if tenants is None or tenants.by == "field":
        kind, _ = resolve_format(spec)
        if kind in ("pydoc", "pydoc-packages"):  # rendered from the standard library in a task
            table = _pydoc_table if kind == "pydoc" else _pydoc_packages_table
            return ray.data.range(1).map_batches(table, fn_kwargs={"spec": spec}, batch_format="pyarrow",
                                                 batch_size=None)
    kind, files, _ = directory_files(spec, tenants)
    if not files:
        raise FileNotFoundError(f"data.dataset '{spec.dataset}' holds no {kind} files; fix the path")
    return ray.data.read_datasource(RowsDatasource(files, kind=kind, spec=spec), resources=resources or None)


@functools.lru_cache(maxsize=4)
def load_tokenizer(base_path: str):
    """The tokenizer of a base (`bases[].path`), once per worker process."""
    from transformers import AutoTokenizer

    from carryon_ray.bases import resolve_base_path

    return AutoTokenizer.from_pretrained(resolve_base_path(base_path))


def _tokenize(
    batch: pa.Table, *, spec: DataSpec, base_path: str, tenants: TenantsSpec | None = None,
    file_tenants: list[str] | None = None,
) -> pa.Table:
    tokenizer = load_tokenizer(base_path)
    out = []
    for item in batch.to_pylist():
        record = None if item["record"] is None else json.loads(item["record"])
        raw = RawRow(item["position"], item["id"], record, item["problem"])
        tenant, problem = ("", None) if tenants is None else row_tenant(raw, tenants, file_tenants)
        if problem is None:
            status, unit, problem = unit_of(raw, spec, tokenizer)
        else:  # a row that names no valid tenant is malformed
            status, unit = "malformed", None
        out.append({
            "position": raw.position, "id": raw.id, "status": status, "problem": problem,
            "input_ids": unit.input_ids if unit else [], "target_mask": unit.target_mask if unit else [],
            "tenant": tenant,
        })
    return pa.Table.from_pylist(out, schema=UNIT_SCHEMA)


def units(
    spec: DataSpec, *, base_path: str, resources: dict[str, float], tenants: TenantsSpec | None = None
) -> ray.data.Dataset:
    """Every row as a UNIT_SCHEMA row (status, tokens, tenant), in input order."""
    file_tenants = directory_files(spec, tenants)[2] if tenants is not None else None
    return raw_rows(spec, resources=resources, tenants=tenants).map_batches(
        _tokenize, fn_kwargs={"spec": spec, "base_path": base_path, "tenants": tenants,
                              "file_tenants": file_tenants},
        batch_format="pyarrow", batch_size=None, num_cpus=1, **({"resources": resources} if resources else {}),
    )


class _Head:
    """Fed in input order (one actor, one task at a time): passes the first `wanted` usable
    units, each carrying the count of rows read since the one before."""

    def __init__(self, wanted: int) -> None:
        self.wanted, self.kept, self.problems = wanted, 0, 0
        self.pending = self._fresh()

    @staticmethod
    def _fresh() -> dict:
        return {"read": 0, "malformed": 0, "dropped": 0, "problems": []}

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():
            if self.kept >= self.wanted:
                break
            pending = self.pending
            pending["read"] += 1
            if row["status"] == "malformed":
                pending["malformed"] += 1
                if self.problems < PROBLEMS_KEPT:
                    pending["problems"].append(row["problem"])
                    self.problems += 1
            elif row["status"] == "dropped":
                pending["dropped"] += 1
            else:
                out.append({**row, **pending})
                self.pending, self.kept = self._fresh(), self.kept + 1
        return pa.Table.from_pylist(out, schema=KEPT_SCHEMA)


def shard_name(layout_json: str, split: str, number: int, payload: str) -> str:
    """A shard's path under RUN_DIR/embeddings: its number and a hash of layout and content."""
    digest = hashlib.sha256((layout_json + payload).encode()).hexdigest()[:12]
    return f"{split}/shard-{number:05d}-{digest}.parquet"


def plan_shards(
    layout_json: str, split: str, examples: list[Example], rows_per_shard: int, *, tenant: str = ""
) -> list[dict]:
    """Sort by length (small padding), cut into shards named by a hash of their content (a
    tenant's under tenants/<tenant>/, so its shards depend on its own rows only)."""
    ordered_examples = sorted(examples, key=lambda example: len(example.input_ids))
    folder = f"tenants/{tenant}/{split}" if tenant else split
    shards = []
    for number, start in enumerate(range(0, len(ordered_examples), rows_per_shard)):
        group = ordered_examples[start : start + rows_per_shard]
        payload = json.dumps([vars(example) for example in group])
        shards.append({
            "shard": shard_name(layout_json, folder, number, payload), "split": split, "rows": len(group),
            "tokens": sum(len(example.input_ids) for example in group), "examples": payload,
            "tenant": tenant,
        })
    return shards


def _plan(batch: pa.Table, *, spec: DataSpec, layout_json: str, rows_per_shard: int) -> pa.Table:
    rows = sorted(batch.to_pylist(), key=lambda row: row["position"])
    report = DataReport(unit=report_unit(spec))
    kept = []
    for row in rows:
        report.rows += row["read"] - 1
        report.malformed += row["malformed"]
        report.dropped_overlong += row["dropped"]
        report.problems += row["problems"][: PROBLEMS_KEPT - len(report.problems)]
        account(report, row["status"], None)  # the kept row itself
        kept.append(Example(row["id"], row["input_ids"], row["target_mask"]))
    try:
        train, held_out = split_and_pack(kept, spec, report)
    except ValueError as error:
        return pa.Table.from_pylist([{
            "shard": "", "split": "", "rows": 0, "tokens": 0, "examples": "", "plan_rows": 0,
            "report": json.dumps(vars(report)), "error": str(error),
            "shortfall": len(kept) < spec.train_size + spec.eval_size, "tenant": "",
        }], schema=PLAN_SCHEMA)
    shards = (plan_shards(layout_json, "train", train, rows_per_shard)
              + plan_shards(layout_json, "eval", held_out, rows_per_shard))
    total = sum(shard["rows"] for shard in shards)
    text = json.dumps(vars(report))
    return pa.Table.from_pylist(
        [{**shard, "plan_rows": total, "report": text, "error": "", "shortfall": False} for shard in shards],
        schema=PLAN_SCHEMA,
    )


def shard_plan(
    spec: DataSpec, *, base_path: str, layout_json: str, rows_per_shard: int, resources: dict[str, float]
) -> ray.data.Dataset:
    """The plan as a Dataset of PLAN_SCHEMA rows, one block per shard (build inside `ordered()`)."""
    wanted = spec.train_size + spec.eval_size
    head = units(spec, base_path=base_path, resources=resources).map_batches(
        _Head, fn_constructor_kwargs={"wanted": wanted}, batch_format="pyarrow", batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=1), num_cpus=0,
        **({"resources": resources} if resources else {}),  # on the role's nodes, not the head
    )
    plan = head.limit(wanted).repartition(1).map_batches(
        _plan, fn_kwargs={"spec": spec, "layout_json": layout_json, "rows_per_shard": rows_per_shard},
        batch_format="pyarrow", batch_size=None, num_cpus=1, **({"resources": resources} if resources else {}),
    )
    return plan.repartition(target_num_rows_per_block=1)


def _count(batch: pa.Table) -> pa.Table:
    rows = batch.to_pylist()
    statuses = [row["status"] for row in rows]
    problems = [row["problem"] for row in rows if row["status"] == "malformed"][:PROBLEMS_KEPT]
    return pa.Table.from_pylist([{
        "rows": len(rows), "usable": statuses.count("ok") + statuses.count("truncated"),
        "malformed": statuses.count("malformed"), "dropped": statuses.count("dropped"),
        "truncated": statuses.count("truncated"), "problems": problems,
    }])


def full_report(spec: DataSpec, *, base_path: str, resources: dict[str, float]) -> DataReport:
    """Every row of the data counted (for a split the data cannot honour, where the plan
    read it all but could not count rows after its last usable one)."""
    with ordered():
        summaries = units(spec, base_path=base_path, resources=resources).map_batches(
            _count, batch_format="pyarrow", batch_size=None
        ).take_all()
    report = DataReport(unit=report_unit(spec))
    for summary in summaries:
        report.rows += summary["rows"]
        report.usable += summary["usable"]
        report.malformed += summary["malformed"]
        report.dropped_overlong += summary["dropped"]
        report.truncated += summary["truncated"]
        report.problems += list(summary["problems"])[: PROBLEMS_KEPT - len(report.problems)]
    return report


def _plan_tenants(
    batch: pa.Table, *, spec: DataSpec, tenants: TenantsSpec, layout_json: str, rows_per_shard: int
) -> pa.Table:
    """Every tenant's shards from its own usable rows (its own split); a tenant that cannot be
    split gets one error row naming why, and the others are planned as usual."""
    reports: dict[str, DataReport] = {}
    kept: dict[str, list[Example]] = {}
    unassigned = DataReport(unit=report_unit(spec))  # rows that name no valid tenant
    wanted = None if tenants.only is None else set(tenants.only)
    for row in sorted(batch.to_pylist(), key=lambda row: row["position"]):
        tenant = row["tenant"]
        if wanted is not None and tenant and tenant not in wanted:
            continue
        units_of = kept.setdefault(tenant, []) if tenant else None
        if units_of is not None and tenants.max_per_tenant and len(units_of) >= tenants.max_per_tenant:
            continue  # this tenant has its rows: the rest are not read into its split
        report = reports.setdefault(tenant, DataReport(unit=report_unit(spec))) if tenant else unassigned
        account(report, row["status"], row["problem"])
        if tenant and row["status"] in ("ok", "truncated"):
            units_of.append(Example(row["id"], row["input_ids"], row["target_mask"]))
    out = []

    def failed(tenant: str, error: str, report: DataReport) -> None:
        out.append({"shard": "", "split": "", "rows": 0, "tokens": 0, "examples": "", "plan_rows": 0,
                    "report": json.dumps(vars(report)), "error": error, "shortfall": False, "tenant": tenant})

    for tenant in sorted(set(reports) | (wanted or set())):
        report = reports.get(tenant) or DataReport(unit=report_unit(spec))
        if not kept.get(tenant):
            failed(tenant, f"tenant '{tenant}' has no usable rows ({report.rows} read, {report.malformed} "
                           "malformed); check its data", report)
            continue
        try:
            train, held_out = split_tenant(kept[tenant], spec, tenants, report)
        except ValueError as error:
            failed(tenant, f"tenant '{tenant}': {error}", report)
            continue
        text = json.dumps(vars(report))
        out += [{**shard, "plan_rows": 0, "report": text, "error": "", "shortfall": False}
                for shard in (plan_shards(layout_json, "train", train, rows_per_shard, tenant=tenant)
                              + plan_shards(layout_json, "eval", held_out, rows_per_shard, tenant=tenant))]
    if unassigned.rows:
        failed("", f"{unassigned.rows} rows name no valid tenant; first problems: {unassigned.problems[:3]}",
               unassigned)
    total = sum(row["rows"] for row in out)
    return pa.Table.from_pylist([{**row, "plan_rows": total} for row in out], schema=PLAN_SCHEMA)


def tenant_plan(
    spec: DataSpec, tenants: TenantsSpec, *, base_path: str, layout_json: str, rows_per_shard: int,
    resources: dict[str, float],
) -> ray.data.Dataset:
    """Every tenant's shards as PLAN_SCHEMA rows, one block per shard (build inside `ordered()`):
    all tenants' rows read and tokenized in one stream, planned per tenant in one task."""
    plan = units(spec, base_path=base_path, resources=resources, tenants=tenants).repartition(1).map_batches(
        _plan_tenants, fn_kwargs={"spec": spec, "tenants": tenants, "layout_json": layout_json,
                                  "rows_per_shard": rows_per_shard},
        batch_format="pyarrow", batch_size=None, num_cpus=1, **({"resources": resources} if resources else {}),
    )
    return plan.repartition(target_num_rows_per_block=1)
