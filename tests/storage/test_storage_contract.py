"""The Storage contract, run unchanged on every backend: local, memory, s3, gcs."""

from __future__ import annotations

import os

import pytest

from ckptio.errors import ObjectExistsError, ObjectNotFoundError
from ckptio.storage import Storage, open_storage

PART = 5 * 2**20  # the smallest part S3 accepts; a multiple of 256 KiB as GCS requires


@pytest.fixture
def chunked(backend_url) -> Storage:
    """The test's storage with a small multipart chunk, so multi-part objects stay small."""
    return open_storage(backend_url.url, block_size=PART, **backend_url.storage_options)


@pytest.mark.parametrize("size", [0, 1, 1000, 2 * PART + 12345], ids=["empty", "1B", "1KB", "multipart"])
def test_write_bytes_round_trip(chunked: Storage, size: int) -> None:
    data = os.urandom(size)
    chunked.write_bytes("obj.bin", data)
    assert chunked.read_bytes("obj.bin") == data
    assert chunked.size("obj.bin") == size


@pytest.mark.parametrize("size", [0, 1000, 2 * PART + 12345], ids=["empty", "1KB", "multipart"])
def test_streaming_writer_round_trip(chunked: Storage, size: int) -> None:
    data = os.urandom(size)
    with chunked.open_writer("stream/obj.bin") as writer:
        for start in range(0, size, 1 << 20):
            writer.write(data[start : start + (1 << 20)])
    assert writer.bytes_written == size
    assert chunked.read_bytes("stream/obj.bin") == data


def test_ranged_reads_at_edges(storage: Storage) -> None:
    data = bytes(range(256)) * 4
    storage.write_bytes("r.bin", data)
    assert storage.read_bytes("r.bin", 0, 1) == data[:1]
    assert storage.read_bytes("r.bin", 10, 10) == b""
    assert storage.read_bytes("r.bin", len(data) - 1, len(data)) == data[-1:]
    assert storage.read_bytes("r.bin", 100, 612) == data[100:612]
    assert storage.read_bytes("r.bin", 1000) == data[1000:]
    ranges = [(0, 4), (500, 700), (1020, 1024)]
    assert storage.read_ranges("r.bin", ranges) == [data[s:e] for s, e in ranges]


def test_listing_follows_writes_and_deletes(storage: Storage) -> None:
    assert storage.list() == []
    storage.write_bytes("a.txt", b"a")
    storage.write_bytes("dir/b.txt", b"b")
    storage.write_bytes("dir/sub/c.txt", b"c")
    assert storage.list() == ["a.txt", "dir"]
    assert storage.list("dir") == ["b.txt", "sub"]
    assert storage.walk() == ["a.txt", "dir/b.txt", "dir/sub/c.txt"]
    assert storage.walk("dir") == ["b.txt", "sub/c.txt"]
    storage.delete("dir/b.txt")
    assert storage.list("dir") == ["sub"]
    assert storage.walk() == ["a.txt", "dir/sub/c.txt"]
    assert storage.list("missing") == []


def test_overwrite_replaces_content(storage: Storage) -> None:
    storage.write_bytes("o.bin", b"first version")
    storage.write_bytes("o.bin", b"second")
    assert storage.read_bytes("o.bin") == b"second"
    with storage.open_writer("o.bin") as writer:
        writer.write(b"third")
    assert storage.read_bytes("o.bin") == b"third"


def test_delete_prefix_removes_everything_below(storage: Storage) -> None:
    for key in ("keep.txt", "gone/a", "gone/b/c", "gone-not/d"):
        storage.write_bytes(key, b"x")
    storage.delete_prefix("gone")
    assert storage.walk() == ["gone-not/d", "keep.txt"]
    assert not storage.exists("gone/a")
    storage.delete_prefix("never-was")  # a missing prefix is not an error


def test_missing_objects_raise_file_not_found(storage: Storage) -> None:
    with pytest.raises(FileNotFoundError) as excinfo:
        storage.read_bytes("nope.bin")
    assert isinstance(excinfo.value, ObjectNotFoundError)
    assert storage.url_of("nope.bin") in str(excinfo.value)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("nope.bin", 0, 10)
    with pytest.raises(FileNotFoundError):
        storage.info("nope.bin")
    with pytest.raises(FileNotFoundError):
        storage.delete("nope.bin", missing_ok=False)
    storage.delete("nope.bin")  # missing_ok by default
    assert not storage.exists("nope.bin")


def test_exists_and_is_file(storage: Storage) -> None:
    storage.write_bytes("d/f.txt", b"f")
    assert storage.exists("d/f.txt") and storage.is_file("d/f.txt")
    assert storage.exists("d") and not storage.is_file("d")
    assert not storage.exists("d/g.txt")


def test_info_reports_size_and_mtime(storage: Storage) -> None:
    storage.write_bytes("m.bin", b"12345")
    info = storage.info("m.bin")
    assert info.size == 5
    assert info.mtime is not None and info.mtime > 1_600_000_000


class Boom(RuntimeError):
    pass


def test_failed_stream_publishes_nothing_and_keeps_previous(chunked: Storage) -> None:
    chunked.write_bytes("s.bin", b"previous good object")
    with pytest.raises(Boom), chunked.open_writer("s.bin") as writer:
        writer.write(os.urandom(PART + 1))  # past one part: the upload has begun
        writer.write(b"more")
        raise Boom
    assert chunked.read_bytes("s.bin") == b"previous good object"
    with pytest.raises(Boom), chunked.open_writer("fresh.bin") as writer:
        writer.write(os.urandom(PART + 1))
        raise Boom
    assert not chunked.exists("fresh.bin")
    assert chunked.list() == ["s.bin"]


def test_aborted_writer_publishes_nothing(storage: Storage) -> None:
    writer = storage.open_writer("a.bin")
    writer.write(b"data")
    writer.abort()
    assert not storage.exists("a.bin")
    assert storage.list() == []


def test_create_exclusive(storage: Storage) -> None:
    storage.create_exclusive("lock.json", b"first")
    with pytest.raises(ObjectExistsError):
        storage.create_exclusive("lock.json", b"second")
    with pytest.raises(FileExistsError):
        storage.create_exclusive("lock.json", b"third")
    assert storage.read_bytes("lock.json") == b"first"


def test_child_is_rooted_below(storage: Storage) -> None:
    child = storage.child("sub/dir")
    child.write_bytes("x.txt", b"x")
    assert storage.read_bytes("sub/dir/x.txt") == b"x"
    assert child.url == storage.url_of("sub/dir")
    assert child.url_of("x.txt") == storage.url_of("sub/dir/x.txt")


def test_url_round_trips_through_open_storage(backend_url, storage: Storage) -> None:
    storage.write_bytes("k/v.txt", b"v")
    reopened = open_storage(storage.url_of("k"), **backend_url.storage_options)
    assert reopened.read_bytes("v.txt") == b"v"


@pytest.mark.parametrize("key", ["../escape", "/abs", "a/../../b", "s3://other/key"])
def test_keys_cannot_escape_the_root(storage: Storage, key: str) -> None:
    with pytest.raises(ValueError):
        storage.write_bytes(key, b"x")


def test_local_path_only_on_local_disk(backend_url, storage: Storage) -> None:
    storage.write_bytes("f.bin", b"abc")
    path = storage.local_path("f.bin")
    if backend_url.name == "local":
        assert path is not None
        with open(path, "rb") as f:
            assert f.read() == b"abc"
    else:
        assert path is None


def test_an_empty_object_reads_empty_from_its_start(storage: Storage) -> None:
    storage.write_bytes("empty.json", b"")
    assert storage.read_bytes("empty.json", 0) == b""
    assert storage.read_bytes("empty.json") == b""
