"""pipelines/core/storage.py: local paths and URIs (fsspec's in-memory filesystem and file://, no network)."""

from __future__ import annotations

import os
import pathlib
import re
import tempfile
import types
import uuid

import pytest

from pipelines.core import storage
from pipelines.core.runtime import StageReport
from pipelines.data.schema import Manifest


@pytest.fixture
def memory_root():
    """A fresh folder on fsspec's memory:// filesystem (one store per process, so unique names)."""
    root = f"memory://test-storage-{uuid.uuid4().hex}"
    yield root
    storage.remove_dir(root)


def _manifest() -> Manifest:
    return Manifest(image_size=64, latent_shape=(4, 8, 8), text_shape=(6, 8), vae={"id": "v", "scaling_factor": 0.5},
                    text_encoder={"id": "t"}, shards=({"name": "part-00000.parquet", "rows": 3},))


def test_local_paths_become_absolute_and_uris_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("data/raw") == str(tmp_path / "data" / "raw")
    assert storage.absolute("~/x") == os.path.join(os.path.expanduser("~"), "x")
    assert storage.absolute("s3://bucket/x/") == "s3://bucket/x/"
    assert storage.join("data/", "a.tar") == str(tmp_path / "data" / "a.tar")
    assert storage.join("s3://bucket/x/", "a", "b.json") == "s3://bucket/x/a/b.json"
    fs, path = storage.resolve("data")
    assert fs.type_name == "local" and path == str(tmp_path / "data")


def test_local_write_read_and_overwrite_leave_no_temporaries(tmp_path):
    target = tmp_path / "new" / "deeper" / "report.json"  # parent folders are created
    storage.write_json(target, {"rows": 3, "where": tmp_path})  # default=str: paths are fine
    assert storage.read_json(target) == {"rows": 3, "where": str(tmp_path)}
    storage.write_text(str(target), "replaced")
    assert storage.read_text(target) == "replaced" and target.read_text() == "replaced"
    storage.write_bytes(tmp_path / "blob.gz", b"\x00raw")  # no compression guessed from the name
    assert storage.read_bytes(tmp_path / "blob.gz") == b"\x00raw"
    assert sorted(os.listdir(target.parent)) == ["report.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "shard.tar"
    storage.write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="producer died"):
        with storage.atomic_output(target) as stream:
            stream.write(b"half of the new")
            raise RuntimeError("producer died")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["shard.tar"]


def test_listing_hides_temporaries_until_asked_and_remove_temporaries_deletes_them(tmp_path):
    for name in ("b.tar", "a.tar", "a_stats.json", ".a.tar.tmp-0123456789ab", ".hidden.tar"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.tar").mkdir()  # folders are not files
    assert list(storage.list_files(tmp_path, suffix=".tar")) == ["a.tar", "b.tar"]
    assert list(storage.list_files(tmp_path, suffix=".tar", hidden=True)) == [".hidden.tar", "a.tar", "b.tar"]
    assert ".a.tar.tmp-0123456789ab" in storage.list_files(tmp_path, hidden=True)
    assert storage.list_files(tmp_path / "missing") == {}
    assert storage.remove_temporaries(tmp_path) == 1
    assert not (tmp_path / ".a.tar.tmp-0123456789ab").exists() and (tmp_path / ".hidden.tar").exists()
    name = storage.temp_name(str(tmp_path / "part-00001.parquet")).rpartition("/")[2]
    assert storage.is_temporary(name) and name.startswith(".part-00001.parquet.tmp-")


def test_exists_and_removing_files_and_folders(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f.txt").write_text("x")
    assert storage.is_dir(tmp_path / "d") and storage.is_file(tmp_path / "d" / "e" / "f.txt")
    assert storage.remove(tmp_path / "d" / "e" / "f.txt") and not storage.exists(tmp_path / "d" / "e" / "f.txt")
    with pytest.raises(IsADirectoryError):  # remove is for files: a folder in a file's place is a problem
        storage.remove(tmp_path / "d")
    assert storage.remove_dir(tmp_path / "d") and not storage.exists(tmp_path / "d")
    assert not storage.remove(tmp_path / "d") and not storage.remove_dir(tmp_path / "d")  # nothing there


def test_file_uri_is_the_same_place_as_the_path(tmp_path):
    storage.write_text(f"file://{tmp_path}/via-uri.txt", "hello")
    assert (tmp_path / "via-uri.txt").read_text() == "hello"
    assert storage.read_text(f"file://{tmp_path}/via-uri.txt") == "hello"
    assert list(storage.list_files(f"file://{tmp_path}/")) == ["via-uri.txt"]


def test_uri_round_trip_through_a_non_local_filesystem(memory_root):
    fs, path = storage.resolve(memory_root + "/")
    assert fs.type_name != "local" and not path.endswith("/")
    location = storage.join(memory_root, "sub", "a.json")
    storage.write_json(location, {"ok": True})
    assert storage.is_file(location) and storage.is_dir(storage.join(memory_root, "sub"))
    assert storage.read_json(location) == {"ok": True}
    assert list(storage.list_files(storage.join(memory_root, "sub"), hidden=True)) == ["a.json"]
    assert storage.remove(location) and not storage.exists(location)


def test_reports_and_manifests_go_to_uris(memory_root):
    report = StageReport("demo", rows_in=3, rows_out=2)
    report.drop("bad", 1)
    report.write(storage.join(memory_root, "report.json"))
    written = storage.read_json(storage.join(memory_root, "report.json"))
    assert (written["rows_out"], written["dropped"]) == (2, {"bad": 1})
    _manifest().save(memory_root)
    assert Manifest.load(memory_root) == _manifest()
    with pytest.raises(FileNotFoundError, match="manifest.json not found.*precompute_latents"):
        Manifest.load(storage.join(memory_root, "empty"))


def test_object_stores_get_one_put_of_the_whole_file(memory_root, monkeypatch):
    monkeypatch.setattr(storage, "is_object_store", lambda fs: True)  # memory:// acting as S3
    target = storage.join(memory_root, "shard.tar")
    with pytest.raises(RuntimeError):
        with storage.atomic_output(target) as stream:
            stream.write(b"partial")
            raise RuntimeError("producer died")
    assert not storage.exists(target)  # nothing was put
    with storage.atomic_output(target) as stream:
        stream.write(b"complete")
        assert storage.list_files(memory_root, hidden=True) == {}  # not even a temporary name
    assert storage.read_bytes(target) == b"complete"


@pytest.mark.parametrize("type_name, object_store", [
    ("local", False), ("hdfs", False), ("py::fsspec+('file', 'local')", False), ("py::fsspec+memory", False),
    ("s3", True), ("gcs", True), ("abfs", True), ("py::fsspec+('s3', 's3a')", True),
])
def test_which_filesystems_count_as_object_stores(type_name, object_store):
    assert storage.is_object_store(types.SimpleNamespace(type_name=type_name)) == object_store


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_local_dir_fetches_a_uri_folder_into_a_temporary_copy_and_removes_it(kind, memory_root, tmp_path,
                                                                             monkeypatch):
    """What DeepSpeed's load_checkpoint and UNet.from_pretrained get for a URI: a local copy of the folder
    (nested files included, under the folder's own name), gone after the with-block."""
    source = tmp_path / "source" / "step_000000006"
    (source / "sub").mkdir(parents=True)
    (source / "a.bin").write_bytes(b"\x00\x01")
    (source / "sub" / "b.json").write_text("{}")
    root = memory_root if kind == "memory" else f"file://{tmp_path}/remote"
    for name, data in _tree(source).items():
        storage.write_bytes(storage.join(root, "step_000000006", name), data)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the temporary copy goes
    with storage.local_dir(storage.join(root, "step_000000006") + "/") as local:
        assert os.path.isabs(local) and os.path.basename(local) == "step_000000006"
        assert str(scratch) in local and _tree(pathlib.Path(local)) == _tree(source)
    assert os.listdir(scratch) == []
    with pytest.raises(FileNotFoundError, match=re.escape(storage.join(root, "nowhere"))):
        with storage.local_dir(storage.join(root, "nowhere")):
            pass
    assert os.listdir(scratch) == []


def test_local_dir_hands_a_local_path_over_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    with storage.local_dir("ckpt") as local:
        assert local == str(tmp_path / "ckpt")  # absolute, nothing copied
    with pytest.raises(FileNotFoundError, match="nowhere"):
        with storage.local_dir("nowhere"):
            pass
