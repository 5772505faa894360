"""Where run directories, data, registries and checkpoints live: any pyarrow.fs URI.

`Location` is a small pathlib-like handle over a `pyarrow.fs.FileSystem` and a path on it. A
plain path (`runs/demo`, `/data/x.jsonl`) is the local file system, resolved to an absolute
path; a URI (`s3://bucket/runs/demo`, `gs://...`, `file:///...`) goes through
`pyarrow.fs.FileSystem.from_uri`. S3 reads the usual environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`); an S3-compatible server is named by
`AWS_ENDPOINT_URL`, which this module passes to pyarrow explicitly. Options are not taken from
the URI (`?endpoint_override=`): they would reach the driver only, while workers rebuild a
location from its URI; they belong in every node's environment.

Errors of the store itself (no credentials, no such bucket, no network) surface as OSError;
`carryon` prints them as one line naming the URI.

Publishing is atomic on both kinds of store:
- a single object (`write_bytes`, `write_text`): on a local disk it is written to a temporary
  name and renamed; an object store makes one PUT visible whole or not at all;
- a directory of files (`publish_directory`), on both: the files go under a fresh versioned
  prefix `NAME/.versions/<version>/` (on a disk copied to a temporary sibling and renamed) and a
  small pointer object `NAME/CURRENT` naming it is written last. `current(NAME)` follows the
  pointer, so a reader that resolves it once sees the old version or the new one, never a
  half-written one and never nothing (a directory swapped by two renames would leave a moment
  with no artifact). The newest KEEP_VERSIONS versions and the current one are kept; older ones
  are removed once PRUNE_AFTER_S old (a server may be loading one). A local `NAME` holding an
  artifact's files directly (the earlier layout, or one made by hand) is read as it is until
  something is published there.

The two steps are also separate, for a registry with versions: `publish_version` adds a version
without moving the pointer, `promote(version)` moves it (to a new version, or back: a
rollback), `versions()` lists them oldest first.

Local code that needs a real file (torch, safetensors, transformers) calls `materialize()`,
which returns the local path itself or a copy of a remote tree in the local cache.
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import os
import posixpath
import re
import shutil
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

POINTER = "CURRENT"
VERSIONS = ".versions"
KEEP_VERSIONS = 3  # published versions kept (newest first), besides the current one
PRUNE_AFTER_S = 600  # older versions go only once this old: a reader may still be loading one
# A version's name: its UTC time of publishing, nanoseconds, and a random tag (sorts by time).
VERSION_NAME = re.compile(r"^\d{8}T\d{6}\.\d{9}-[0-9a-f]{8}$")


def _is_uri(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


@functools.lru_cache(maxsize=16)
def _s3(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    """One S3 client per endpoint and process (a new client fetches credentials again)."""
    kwargs: dict = {}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = urlsplit(endpoint).scheme or "http"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path on it) for a URI; S3 honours AWS_ENDPOINT_URL for S3-compatible
    servers."""
    parts = urlsplit(uri)
    if parts.query:
        raise ValueError(
            f"{uri!r}: options in the URI ({parts.query}) would reach this process only, not the "
            "cluster's workers; set them in the environment of every node instead "
            "(AWS_ENDPOINT_URL, AWS_DEFAULT_REGION; e.g. through the job's runtime_env or the "
            "pods' env) and give the plain URI"
        )
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"{uri!r} names no bucket; write s3://BUCKET/PREFIX")
        filesystem = _s3(os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_DEFAULT_REGION"))
        return filesystem, f"{parts.netloc}{parts.path}".rstrip("/")
    try:
        return pafs.FileSystem.from_uri(uri)
    except ValueError as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"cannot open {uri!r} with pyarrow.fs: {error}") from error


class Location:
    """A path on a pyarrow file system; `/` joins, like pathlib."""

    def __init__(self, filesystem: pafs.FileSystem, path: str, uri: str) -> None:
        self.fs, self.path, self.uri = filesystem, path, uri

    @classmethod
    def of(cls, where: str | os.PathLike | Location) -> Location:
        if isinstance(where, Location):
            return where
        text = os.fspath(where)
        if _is_uri(text):
            filesystem, path = _filesystem(text)
            return cls(filesystem, path, text.rstrip("/"))
        if text.startswith("file://"):
            text = urlsplit(text).path
        local = Path(text).expanduser().resolve()
        return cls(pafs.LocalFileSystem(), str(local), str(local))

    # ---- naming
    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on the local disk")
        return Path(self.path)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Location:
        return Location(self.fs, posixpath.dirname(self.path), self.uri.rsplit("/", 1)[0])

    def __truediv__(self, part: str) -> Location:
        part = str(part).strip("/")
        return Location(self.fs, f"{self.path}/{part}", f"{self.uri}/{part}")

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:  # local locations stand in for paths (torch, safetensors, open)
        return str(self.local_path)

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and (self.uri, type(self.fs)) == (other.uri, type(other.fs))

    def __hash__(self) -> int:
        return hash(self.uri)

    def __reduce__(self):  # travels to Ray workers as its URI; the file system is rebuilt there
        return (Location.of, (self.uri,))

    # ---- queries
    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def size(self) -> int:
        return self._info().size

    def files(self, suffix: str = "", *, recursive: bool = True) -> list[Location]:
        """Files under this directory (sorted), optionally those whose name ends with `suffix`."""
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive))
        return sorted(
            (Location(self.fs, info.path, self._uri_of(info.path)) for info in infos
             if info.type == pafs.FileType.File and info.path.endswith(suffix)),
            key=lambda location: location.path,
        )

    def children(self) -> list[Location]:
        """Immediate entries (files and folders), sorted by name."""
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return sorted((Location(self.fs, i.path, self._uri_of(i.path)) for i in infos), key=lambda c: c.path)

    def _uri_of(self, path: str) -> str:
        return self.uri + path[len(self.path):]

    def relative_to(self, other: Location) -> str:
        if not (self.path + "/").startswith(other.path.rstrip("/") + "/"):
            raise ValueError(f"{self.uri} is not under {other.uri}")
        return self.path[len(other.path):].lstrip("/")

    # ---- reads
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_table(self) -> pa.Table:
        """A Parquet file (a shard) read from its store."""
        return pq.read_table(self.path, filesystem=self.fs)

    def open_input(self):
        """A seekable binary file (what pyarrow.parquet and safetensors' byte readers take)."""
        return self.fs.open_input_file(self.path)

    # ---- writes
    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def write_bytes(self, data: bytes) -> None:
        """Atomic: a reader sees the old content or the new, never part of it."""
        if self.is_local:
            self.local_path.parent.mkdir(parents=True, exist_ok=True)
            partial = _staging(self.local_path)
            partial.write_bytes(data)
            os.replace(partial, self.local_path)
            return
        with self.fs.open_output_stream(self.path) as stream:  # one PUT
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def publish_file(self, local: str | os.PathLike) -> None:
        """Copy a finished local file here atomically (rename on a disk; one upload elsewhere)."""
        if self.is_local:
            self.local_path.parent.mkdir(parents=True, exist_ok=True)
            partial = _staging(self.local_path)
            shutil.copyfile(local, partial)
            os.replace(partial, self.local_path)
            return
        pafs.copy_files(os.fspath(local), self.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def remove(self) -> None:
        info = self._info()
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    # ---- directories published as a whole, in versions
    def publish_directory(self, local: str | os.PathLike) -> Location:
        """Make the finished local directory `local` appear here as a whole (see the module doc):
        `publish_version` then `promote`. Returns where its files now are: the new version."""
        version = self.publish_version(local)
        self.promote(version)
        return self / VERSIONS / version

    def publish_version(self, local: str | os.PathLike) -> str:
        """Copy the finished local directory `local` to a new version `NAME/.versions/<version>/`
        without moving the pointer: readers of `current()` still see the version they saw.
        Returns the version's name (its UTC time of publishing, `VERSION_NAME`)."""
        local = Path(local)
        now = time.time_ns()
        version = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now // 10**9))}.{now % 10**9:09d}-{uuid.uuid4().hex[:8]}"
        versioned = self / VERSIONS / version
        if self.is_local:
            target = versioned.local_path
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = _staging(target, hidden=True)
            shutil.copytree(local, staging)
            os.replace(staging, target)
        else:
            pafs.copy_files(str(local), versioned.path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        self._prune(self.current_version(), legacy=False)
        return version

    def promote(self, version: str) -> None:
        """Point `NAME/CURRENT` at a published version (one small atomic write): from here on
        readers resolve to it. Also how a rollback moves the pointer back."""
        target = self.version(version)
        if not target.is_dir():
            raise FileNotFoundError(
                f"{self} has no version {version!r}; its versions: {self.versions() or 'none'}"
            )
        legacy = self.is_local and not (self / POINTER).exists() and self.current() == self
        (self / POINTER).write_text(version + "\n")  # last: readers switch to it here
        self._prune(version, legacy=legacy)

    def version(self, version: str) -> Location:
        """Where a version's files are; ValueError for a name this module does not give."""
        if not VERSION_NAME.fullmatch(version):
            raise ValueError(
                f"{version!r} is not a version name (UTC time of publishing, e.g. "
                "20260101T120000.000000000-0123abcd); `carryon versions NAME` lists them"
            )
        return self / VERSIONS / version

    def versions(self) -> list[str]:
        """Published versions, oldest first (their names sort by time of publishing)."""
        return sorted(child.name for child in (self / VERSIONS).children()
                      if VERSION_NAME.fullmatch(child.name))

    def current_version(self) -> str | None:
        """The version the pointer names; None when there is no pointer."""
        current = self.current()
        return None if current is None or current == self else current.name

    def _prune(self, current: str | None, *, legacy: bool) -> None:
        """Remove versions beyond the newest KEEP_VERSIONS once PRUNE_AFTER_S old (never
        `current`), and the files of a local artifact published in the earlier flat layout, now
        that the pointer names another."""
        versions = sorted((child.name for child in (self / VERSIONS).children()
                           if not child.name.startswith(".")), reverse=True)  # not another's staging
        for name in versions[KEEP_VERSIONS:]:
            try:  # named by its UTC time of publishing
                age = time.time() - calendar.timegm(time.strptime(name[:15], "%Y%m%dT%H%M%S"))
            except ValueError:  # not a name this module gives: not ours to remove
                continue
            if name != current and age >= PRUNE_AFTER_S:
                (self / VERSIONS / name).remove()
        if legacy:
            for child in self.children():
                if child.name not in (VERSIONS, POINTER):
                    child.remove()

    def current(self) -> Location | None:
        """Where a published directory's files are: the version its pointer names (a local
        directory of files without a pointer: itself; a version's own directory: itself); None
        when nothing is current here."""
        pointer = self / POINTER
        if pointer.is_file():
            version = pointer.read_text().strip()
            if not VERSION_NAME.fullmatch(version):
                raise ValueError(f"{pointer.uri} names {version!r}, not a version; publish the directory again")
            return self / VERSIONS / version
        if self.parent.name == VERSIONS and VERSION_NAME.fullmatch(self.name):
            return self if self.is_dir() else None
        if self.is_local and any(child.name != VERSIONS for child in self.children()):
            return self  # files of the earlier flat layout (versions published beside them: not yet current)
        return None

    def materialize(self, cache: Path | None = None) -> Path:
        """A local path with this file's or directory's content (remote: copied into the cache,
        keyed by URI and size/mtime, once)."""
        if self.is_local:
            return self.local_path
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self.uri} does not exist")
        root = cache or cache_root()
        if info.type == pafs.FileType.Directory:  # keyed by every file's size and time (one listing)
            listing = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
            stamp = "|".join(sorted(f"{f.path}:{f.size}:{f.mtime_ns}" for f in listing
                                    if f.type == pafs.FileType.File))
        else:
            stamp = f"{info.size}|{info.mtime_ns}"
        key = hashlib.sha256(f"{self.uri}|{stamp}".encode()).hexdigest()[:16]
        target = root / "remote" / f"{key}-{self.name}"
        if target.exists():
            return target
        staging = _staging(target)
        staging.parent.mkdir(parents=True, exist_ok=True)
        if info.type == pafs.FileType.Directory:
            staging.mkdir()  # copy_files fills a directory that exists
        pafs.copy_files(self.path, str(staging), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        try:
            os.replace(staging, target)
        except OSError:  # another process materialized it first
            shutil.rmtree(staging, ignore_errors=True)
        return target


def _staging(path: Path, *, hidden: bool = False) -> Path:
    """A sibling of `path` to write before the rename that publishes it; its name carries the
    writer, so a killed writer's leftovers are recognisable (`.partial-`)."""
    return path.with_name(f"{'.' if hidden else ''}{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:6]}")


def cache_root() -> Path:
    """The local cache: converted bases, copies of remote files (`CARRYON_CACHE` overrides)."""
    return Path(os.environ.get("CARRYON_CACHE", Path.home() / ".cache" / "carryon_ray"))


def location(where: str | os.PathLike | Location) -> Location:
    """The `Location` of a path or URI (see the module doc)."""
    return Location.of(where)
