"""Where every stage reads and writes: a local path or a URI, through one pyarrow filesystem API.

A location is a string: a local path ("data/raw", "~/x") or a URI ("s3://bucket/x", "gs://...",
"file:///x", "hdfs://..."; protocols pyarrow lacks, such as "memory://", go through fsspec).
Local paths are made absolute: Ray workers run in other working directories, and on a cluster
every node must see the same path (a shared mount).

Committing ("atomic") writes: a file appears under its final name complete, or not at all.
- Filesystems with an atomic rename (local disks, NFS/Lustre mounts, HDFS): the bytes go to a
  hidden temporary name in the same folder (same device, so the rename is atomic), then renamed.
- Object stores (S3, GCS, Azure...): a rename is a copy plus a delete, but an object only becomes
  visible once its upload completes. So the bytes are gathered in memory and written to the final
  name in one put; nothing is written when the producer fails. Memory use is one file's size.
Temporary names are `.NAME.tmp-<12 hex>`: hidden, unique per writer, and found again by
remove_temporaries() after a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import uuid
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

TEMP_MARK = ".tmp-"
# Filesystems (words of pyarrow's type_name) whose rename is atomic; any other one is treated as an
# object store. "memory" and "mock" are test filesystems that behave like a local disk.
_ATOMIC_RENAME = frozenset({"local", "file", "hdfs", "viewfs", "memory", "mock"})


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in os.fspath(location)


def absolute(location: str | os.PathLike) -> str:
    """URIs unchanged; local paths absolute, with ~ expanded."""
    location = os.fspath(location)
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """A location -> (filesystem, path inside it), for pyarrow calls that take `filesystem=`."""
    location = absolute(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), location
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except pa.ArrowInvalid:  # a protocol pyarrow does not know: fsspec may
        import fsspec

        fsspec_fs, path = fsspec.core.url_to_fs(location)
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs))
    return fs, path.rstrip("/") or "/"


def join(location: str | os.PathLike, *names: str) -> str:
    return "/".join([absolute(location).rstrip("/"), *names])


def is_object_store(fs: pafs.FileSystem) -> bool:
    return not set(re.findall(r"[a-z0-9]+", fs.type_name)) & _ATOMIC_RENAME


# ------------------------------------------------------------------------------- reading

def file_type(location: str | os.PathLike) -> pafs.FileType:
    fs, path = resolve(location)
    return fs.get_file_info(path).type


def exists(location: str | os.PathLike) -> bool:
    return file_type(location) != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    return file_type(location) == pafs.FileType.File


def is_dir(location: str | os.PathLike) -> bool:
    return file_type(location) == pafs.FileType.Directory


def list_dir(location: str | os.PathLike) -> dict[str, pafs.FileInfo]:
    """Everything directly in a folder (nothing when it does not exist), by name, sorted."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return {info.base_name: info for info in sorted(infos, key=lambda i: i.base_name)}


def list_files(location: str | os.PathLike, suffix: str = "", hidden: bool = False) -> dict[str, pafs.FileInfo]:
    """Files directly in a folder whose names end with `suffix`. Hidden ones (temporaries of
    running or crashed writers) only when asked for."""
    return {name: info for name, info in list_dir(location).items()
            if info.type == pafs.FileType.File and name.endswith(suffix)
            and (hidden or not name.startswith("."))}


def open_input(location: str | os.PathLike) -> pa.NativeFile:
    """A sequential read stream (for tars, CSV...); use it as a context manager."""
    fs, path = resolve(location)
    return fs.open_input_stream(path, compression=None)  # the bytes as stored, even for *.gz


def read_bytes(location: str | os.PathLike) -> bytes:
    with open_input(location) as stream:
        return stream.read()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def read_json(location: str | os.PathLike) -> Any:
    return json.loads(read_bytes(location))


@contextlib.contextmanager
def local_dir(location: str | os.PathLike) -> Iterator[str]:
    """A local path to the folder at `location`, for code that only opens local files (DeepSpeed's
    load_checkpoint, UNet.from_pretrained). A local path is handed over as it is (made absolute); a URI's
    folder, with everything under it, is copied into a temporary directory under the folder's own name,
    removed when the with-block ends. FileNotFoundError when there is no folder at `location`."""
    location = absolute(location)
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{location.rstrip('/')} is not a folder (nothing there, or a file)")
    if not is_uri(location):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="fetched-") as tmp:
        target = os.path.join(tmp, path.rstrip("/").rpartition("/")[2] or "root")
        os.makedirs(target)  # copy_files creates no folder for an empty source
        pafs.copy_files(path, target, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield target


# ------------------------------------------------------------------------------- writing

def temp_name(location: str) -> str:
    """The hidden temporary name next to `location` (a location or a path inside a filesystem)."""
    head, _, name = location.rpartition("/")
    return f"{head}/.{name}{TEMP_MARK}{uuid.uuid4().hex[:12]}"


def is_temporary(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def makedirs(location: str | os.PathLike) -> None:
    fs, path = resolve(location)
    if not is_object_store(fs):  # object stores have no folders: a marker object is only clutter
        fs.create_dir(path, recursive=True)


@contextlib.contextmanager
def atomic_output(location: str | os.PathLike) -> Iterator[pa.NativeFile]:
    """A stream whose bytes appear under `location` only when the with-block ends without error
    (see the module docstring for how, per kind of filesystem)."""
    fs, path = resolve(location)
    if is_object_store(fs):
        buffer = pa.BufferOutputStream()
        yield buffer
        with fs.open_output_stream(path, compression=None) as stream:
            stream.write(buffer.getvalue())
        return
    fs.create_dir(path.rpartition("/")[0] or "/", recursive=True)
    tmp = temp_name(path)
    try:
        with fs.open_output_stream(tmp, compression=None) as stream:
            yield stream
        fs.move(tmp, path)
    except BaseException:
        if fs.get_file_info(tmp).type == pafs.FileType.File:
            fs.delete_file(tmp)
        raise


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    with atomic_output(location) as stream:
        stream.write(data)


def write_text(location: str | os.PathLike, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def write_json(location: str | os.PathLike, data: Any) -> None:
    """Indented JSON; values JSON lacks (paths, numpy scalars) are written as their str()."""
    write_text(location, json.dumps(data, indent=2, default=str) + "\n")


def remove(location: str | os.PathLike) -> bool:
    """Delete a file; False when nothing was there. A folder there is an error, not deleted:
    a file's name taken by a folder means something is wrong with the output (remove_dir)."""
    fs, path = resolve(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        raise IsADirectoryError(f"{location} is a folder, not a file")
    if kind == pafs.FileType.File:
        fs.delete_file(path)
    return kind == pafs.FileType.File


def remove_dir(location: str | os.PathLike) -> bool:
    """Delete a folder with everything in it; False when there was none."""
    fs, path = resolve(location)
    found = fs.get_file_info(path).type == pafs.FileType.Directory
    if found:
        fs.delete_dir(path)
    return found


def remove_temporaries(location: str | os.PathLike) -> int:
    """Delete the temporary files killed writers left directly in a folder; returns how many."""
    stale = [name for name in list_files(location, hidden=True) if is_temporary(name)]
    for name in stale:
        remove(join(location, name))
    return len(stale)


# ------------------------------------------------------------------------------- redacting

REDACTED = "***"
# The user info of any URI (scheme://user:password@host, s3://KEY:SECRET@bucket): everything before the '@'.
_USER_INFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/@?#'\"]+@")
# The values of query parameters that carry a signature or a credential: presigned S3 / GCS URLs (X-Amz-Signature,
# X-Amz-Credential, X-Amz-Security-Token, X-Goog-...), Azure SAS (sig), CloudFront and S3 v2 (Signature,
# AWSAccessKeyId), and tokens, keys and passwords by any other name.
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:[\w.-]*(?:signature|credential|token|secret|password|passwd|api[_-]?key)|sig|awsaccesskeyid)"
    r"=)[^&#\s'\"]+", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the credentials inside every URI in it replaced by ***: user info and signed query values.

    For whatever leaves the process (reports, MLflow params and tags, checkpoint and export metadata, log lines);
    the process itself keeps using the real location. The replacement has no quote, backslash or separator,
    so JSON text stays JSON and a query stays parseable."""
    return _SECRET_QUERY.sub(rf"\g<key>{REDACTED}", _USER_INFO.sub(rf"\g<scheme>{REDACTED}@", text))


def redact_values(value: Any) -> Any:
    """redact applied to every string inside dicts, lists and tuples (keys included); other values unchanged."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_values(k): redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(v) for v in value)
    return value
