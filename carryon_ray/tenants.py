"""Tenants' data: which rows belong to whom, and each tenant's own fixed split (no Ray here).

A pipeline with a `tenants` section (`config.TenantsSpec`) makes one carry-on per tenant. Its
rows come from one dataset, either a directory of per-tenant datasets (`by: directory`: a file
`acme.jsonl` is tenant `acme`, a subfolder `acme/` of files too) or rows naming their tenant in
a field (`by: field`). The embed stage's Ray Data graph (`stages/corpus.py`) tags every row
with its tenant (`row_tenant`) and plans each tenant's shards from its own usable rows
(`split_tenant`); a tenant whose rows cannot make a split is reported, never fatal to the rest.
"""

from __future__ import annotations

import math

from carryon_ray.config import DataSpec, TenantsSpec, tenant_problem
from carryon_ray.data import Example, split_and_pack
from carryon_ray.readers import FILE_SHIFT, SUFFIXES, DataReport, RawRow, data_files, resolve_format
from carryon_ray.storage import Location, location


def tenant_files(data: DataSpec, tenants: TenantsSpec) -> tuple[str, list[Location], list[str]]:
    """`by: directory`: (format, files in read order, the tenant of each file). Every entry of
    `data.dataset` is a tenant: a data file (its name without the suffix) or a folder of them."""
    where = location(data.dataset)
    if not where.is_dir():
        raise ValueError(
            f"tenants.by=directory needs data.dataset to be a directory holding one dataset per "
            f"tenant (a file or a folder each); '{data.dataset}' is not one. Use tenants.by=field "
            "for one dataset whose rows name their tenant"
        )
    files, owners, kinds = [], [], set()
    for entry in sorted(where.children(), key=lambda child: child.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            inner = [f for f in entry.files(recursive=False) if _suffix(f.name) in SUFFIXES]
            tenant = entry.name
        elif _suffix(entry.name) in SUFFIXES:
            inner, tenant = [entry], entry.name[: -len(_suffix(entry.name))]
        else:
            continue
        kinds |= {SUFFIXES[_suffix(f.name)] for f in inner}
        files += inner
        owners += [tenant] * len(inner)
    if len(kinds) > 1:
        raise ValueError(
            f"data.dataset {where}: the tenants' files mix formats {sorted(kinds)}; give every tenant "
            "the same kind of file (.jsonl, .parquet or .txt)"
        )
    if not files:
        raise FileNotFoundError(
            f"data.dataset {where} holds no tenant datasets: put one file (acme.jsonl) or one folder "
            f"(acme/) of {sorted(SUFFIXES)} files per tenant in it"
        )
    return (kinds.pop() if data.format == "auto" else data.format), files, owners


def _suffix(name: str) -> str:
    return "." + name.rsplit(".", 1)[1] if "." in name else ""


def row_tenant(raw: RawRow, tenants: TenantsSpec, file_tenants: list[str] | None) -> tuple[str, str | None]:
    """(tenant id, why the row has none or None). A row without a valid tenant is malformed."""
    if tenants.by == "directory":
        tenant = (file_tenants or [""])[raw.position >> FILE_SHIFT]
    elif raw.record is None:
        return "", None  # unreadable: counted as malformed with its own reason
    else:
        tenant = raw.record.get(tenants.field)
        if tenant is None:
            return "", f"row {raw.id}: no tenant field '{tenants.field}'"
    problem = tenant_problem(tenant)
    return (str(tenant), None) if problem is None else ("", f"row {raw.id}: {problem}")


def split_counts(usable: int, tenants: TenantsSpec) -> tuple[int, int]:
    """(train, held-out) usable rows of one tenant, or raises naming the shortfall."""
    held = max(tenants.min_eval, round(tenants.eval_fraction * usable))
    if usable - held < tenants.min_train:
        need = tenants.min_train + max(tenants.min_eval, math.ceil(tenants.eval_fraction * usable))
        raise ValueError(
            f"{usable} usable rows, fewer than the {need} a split needs (tenants.min_train="
            f"{tenants.min_train}, tenants.min_eval={tenants.min_eval}, tenants.eval_fraction="
            f"{tenants.eval_fraction}); add data for it or lower those settings"
        )
    return usable - held, held


def split_tenant(
    units: list[Example], data: DataSpec, tenants: TenantsSpec, report: DataReport
) -> tuple[list[Example], list[Example]]:
    """One tenant's usable units in input order -> (training, held-out) sequences:
    `max(min_eval, eval_fraction x n)` rows are held out (the last ones, or with `holdout:
    spread` the middle row of each of that many equal stretches), the rest train in input
    order, each side packed on its own. Raises ValueError (naming the problem) when the tenant
    cannot be split."""
    train, held = split_counts(len(units), tenants)
    if tenants.holdout == "spread":
        chosen = {(2 * number + 1) * len(units) // (2 * held) for number in range(held)}
        units = [unit for index, unit in enumerate(units) if index not in chosen] + [
            units[index] for index in sorted(chosen)
        ]
    spec = data.model_copy(update={"train_size": train, "eval_size": held, "shrink_split": False})
    return split_and_pack(units, spec, report)


def directory_files(data: DataSpec, tenants: TenantsSpec | None) -> tuple[str, list[Location], list[str] | None]:
    """The files the embed stage reads and, with tenants by directory, each file's tenant."""
    if tenants is not None and tenants.by == "directory":
        return tenant_files(data, tenants)
    kind, where = resolve_format(data)
    return kind, ([] if where is None else data_files(kind, where, data)), None
