"""The storage module on the local disk and on a real S3-compatible server."""

from __future__ import annotations

import pickle

import pytest

from carryon_ray import storage
from carryon_ray.storage import KEEP_VERSIONS, POINTER, VERSIONS, Location, location


def _stores(tmp_path, request) -> Location:
    if request.param == "local":
        return location(tmp_path / "store")
    return location(request.getfixturevalue("s3_bucket") + "/store")


@pytest.fixture(params=["local", "s3"])
def store(tmp_path, request) -> Location:
    return _stores(tmp_path, request)


def test_plain_paths_are_local_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = location("runs/demo")
    assert here.is_local and here.uri == str(tmp_path / "runs" / "demo")
    assert location(f"file://{tmp_path}/x").local_path == tmp_path / "x"


def test_an_s3_uri_is_never_a_local_folder(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = location(s3_bucket + "/runs/demo")
    assert not run.is_local and run.uri == s3_bucket + "/runs/demo"
    (run / "a.txt").write_text("x")
    assert (run / "a.txt").read_text() == "x"
    assert not any(tmp_path.iterdir())  # no `s3:` folder appeared


def test_bucketless_uri_is_refused():
    with pytest.raises(ValueError, match="names no bucket"):
        location("s3:///runs")


def test_write_read_list(store):
    (store / "a" / "x.json").write_text('{"a": 1}')
    (store / "a" / "b" / "y.parquet").write_bytes(b"PAR1")
    assert (store / "a" / "x.json").read_text() == '{"a": 1}'
    assert (store / "a").is_dir() and (store / "a" / "x.json").is_file()
    assert not (store / "missing").exists()
    assert [f.relative_to(store) for f in store.files()] == ["a/b/y.parquet", "a/x.json"]
    assert [f.name for f in store.files(".parquet")] == ["y.parquet"]
    assert (store / "a" / "b" / "y.parquet").size() == 4


def test_location_pickles_as_its_uri(store):
    (store / "f").write_text("v")
    again = pickle.loads(pickle.dumps(store / "f"))
    assert again == store / "f" and again.read_text() == "v"


def test_publish_directory_replaces_as_a_whole(store, tmp_path):
    first, second = tmp_path / "v1", tmp_path / "v2"
    first.mkdir()
    second.mkdir()
    (first / "weights").write_text("1")
    (first / "config").write_text("1")
    (second / "weights").write_text("2")
    target = store / "carryons" / "demo"
    assert target.current() is None
    target.publish_directory(first)
    assert (target.current() / "weights").read_text() == "1"
    target.publish_directory(second)
    current = target.current()
    assert (current / "weights").read_text() == "2"
    assert not (current / "config").exists()  # nothing of the old version shows through
    assert (target / POINTER).read_text().strip() == current.name  # written last, names the version
    assert sorted(p.name for p in (tmp_path / "store" / "carryons").iterdir()) == ["demo"] if store.is_local else True


def test_publishing_keeps_the_newest_versions_once_the_older_are_old(store, tmp_path, monkeypatch):
    target = store / "carryons" / "demo"
    published = []

    def publish(number: int) -> None:
        source = tmp_path / f"v{number}"
        source.mkdir()
        (source / "weights").write_text(str(number))
        published.append(target.publish_directory(source).name)
        assert (target.current() / "weights").read_text() == str(number)

    for number in range(KEEP_VERSIONS + 2):
        publish(number)
    assert len((target / VERSIONS).children()) == KEEP_VERSIONS + 2  # a reader may still load them
    monkeypatch.setattr(storage, "PRUNE_AFTER_S", 0)
    publish(KEEP_VERSIONS + 2)
    kept = [child.name for child in (target / VERSIONS).children()]
    assert kept == sorted(published)[-KEEP_VERSIONS:] == published[-KEEP_VERSIONS:]


def test_a_flat_local_artifact_is_read_as_it_is_until_published_over(tmp_path):
    target = location(tmp_path / "demo")
    target.local_path.mkdir()
    (target / "weights").write_text("flat")
    assert target.current() == target
    source = tmp_path / "new"
    source.mkdir()
    (source / "weights").write_text("new")
    target.publish_directory(source)
    assert (target.current() / "weights").read_text() == "new"
    assert sorted(child.name for child in target.children()) == [VERSIONS, POINTER]


def test_a_pointer_naming_a_path_is_refused(store):
    target = store / "carryons" / "evil"
    (target / POINTER).write_text("../../elsewhere\n")
    with pytest.raises(ValueError, match="not a version"):
        target.current()


def test_materialize_copies_remote_trees_once(store, tmp_path, monkeypatch):
    monkeypatch.setenv("CARRYON_CACHE", str(tmp_path / "cache"))
    (store / "d" / "w.bin").write_bytes(b"abc")
    local = (store / "d").materialize()
    assert (local / "w.bin").read_bytes() == b"abc"
    assert (store / "d").materialize() == local
    if store.is_local:
        assert local == (store / "d").local_path
    else:
        (store / "d" / "w.bin").write_bytes(b"abcd")  # changed content: a new copy
        assert ((store / "d").materialize() / "w.bin").read_bytes() == b"abcd"


def test_atomic_write_leaves_no_partials(tmp_path):
    target = location(tmp_path) / "m.json"
    target.write_text("1")
    target.write_text("2")
    assert target.read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_options_in_the_uri_are_refused_naming_the_environment():
    with pytest.raises(ValueError, match="AWS_ENDPOINT_URL"):
        location("s3://bucket/run?endpoint_override=http://127.0.0.1:9000")


def test_one_s3_client_per_endpoint(s3_bucket):
    assert location(s3_bucket + "/a").fs is location(s3_bucket + "/b/c").fs


def test_publish_version_leaves_the_pointer_until_promoted(store, tmp_path):
    target = store / "carryons" / "demo"
    for number in (1, 2):
        source = tmp_path / f"v{number}"
        source.mkdir()
        (source / "weights").write_text(str(number))
    first = target.publish_version(tmp_path / "v1")
    assert target.current() is None and target.current_version() is None  # nothing served yet
    assert target.versions() == [first]
    target.promote(first)
    second = target.publish_version(tmp_path / "v2")
    assert target.versions() == [first, second]  # named by time: oldest first
    assert (target.current() / "weights").read_text() == "1"  # still the promoted one
    assert (target.version(second).current() / "weights").read_text() == "2"  # a version reads as itself
    target.promote(second)
    assert target.current_version() == second
    target.promote(first)  # a rollback is a promote of an older version
    assert (target.current() / "weights").read_text() == "1"


def test_promote_refuses_unknown_or_malformed_versions(store):
    target = store / "carryons" / "demo"
    with pytest.raises(ValueError, match="not a version name"):
        target.promote("../../elsewhere")
    with pytest.raises(FileNotFoundError, match="no version"):
        target.promote("20260101T120000.000000000-0123abcd")
    assert not (target / POINTER).exists()
