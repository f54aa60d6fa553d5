"""The Volumes API through the real, unmodified Declaw Python SDK (1.7.0)."""

import gzip
import hashlib
import io
import os
import tarfile

import pytest
from declaw import Volumes
from conftest import make_targz
from declaw.exceptions import (
    InvalidArgumentException,
    NotEnoughSpaceException,
    NotFoundException,
)


def members(archive: bytes) -> dict:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return {m.name.lstrip("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_create_from_open_file_then_get_list_download_delete(server, tmp_path):
    archive = make_targz({"rows.csv": b"".join(b"%d,x\n" % i for i in range(1000))})
    path = tmp_path / "training.tar.gz"
    path.write_bytes(archive)
    with open(path, "rb") as f:
        vol = Volumes.create(name="training-set", data=f)
    assert vol.volume_id.startswith("vol-")
    assert vol.name == "training-set"
    assert vol.size_bytes == len(archive)

    fetched = Volumes.get(vol.volume_id)
    assert fetched.volume_id == vol.volume_id
    assert fetched.size_bytes == len(archive)
    assert [v.volume_id for v in Volumes.list()] == [vol.volume_id]
    assert Volumes.download(vol.volume_id) == archive

    Volumes.delete(vol.volume_id)
    with pytest.raises(NotFoundException):
        Volumes.get(vol.volume_id)
    assert Volumes.list() == []
    Volumes.delete(vol.volume_id)  # idempotent for its owner


def test_create_from_bytes_and_from_directory(server, tmp_path):
    archive = make_targz({"a.txt": b"alpha"})
    from_bytes = Volumes.create(name="bytes", data=archive)
    assert hashlib.sha256(Volumes.download(from_bytes.volume_id)).digest() == hashlib.sha256(archive).digest()

    source = tmp_path / "dataset"
    (source / "nested").mkdir(parents=True)
    (source / "nested" / "b.txt").write_bytes(b"beta")
    (source / "c.bin").write_bytes(os.urandom(4096))
    from_dir = Volumes.create(name="dir", data=str(source))
    contents = members(Volumes.download(from_dir.volume_id))
    assert contents["nested/b.txt"] == b"beta"
    assert contents["c.bin"] == (source / "c.bin").read_bytes()

    listed = [v.volume_id for v in Volumes.list()]
    assert listed == [from_dir.volume_id, from_bytes.volume_id]


def test_empty_volume(server):
    vol = Volumes.create(name="empty")
    assert vol.size_bytes == 0
    assert Volumes.get(vol.volume_id).volume_id == vol.volume_id


def test_other_owner_gets_not_found(server):
    vol = Volumes.create(name="mine", data=make_targz({"x": b"x"}))
    other_key = server.create_key("mallory")
    with pytest.raises(NotFoundException):
        Volumes.get(vol.volume_id, api_key=other_key)
    with pytest.raises(NotFoundException):
        Volumes.download(vol.volume_id, api_key=other_key)
    with pytest.raises(NotFoundException):
        Volumes.delete(vol.volume_id, api_key=other_key)
    assert Volumes.list(api_key=other_key) == []
    assert Volumes.get(vol.volume_id).volume_id == vol.volume_id


@pytest.mark.parametrize(
    "body",
    [b"plain text, not gzip", gzip.compress(b"gzip but not a tar" * 100), make_targz({"a": b"a" * 5000})[:-64]],
    ids=["not-gzip", "not-tar", "truncated"],
)
def test_bad_archives_are_invalid_arguments(server, body):
    with pytest.raises(InvalidArgumentException) as raised:
        Volumes.create(name="bad", data=body)
    assert "HTTP 400" in str(raised.value)
    assert Volumes.list() == []


def test_oversize_upload_is_not_enough_space(server_factory):
    server_factory(**{"volumes.max_upload_bytes": 64 * 1024})
    with pytest.raises(NotEnoughSpaceException):
        Volumes.create(name="big", data=make_targz({"big": os.urandom(256 * 1024)}))
    assert Volumes.list() == []
