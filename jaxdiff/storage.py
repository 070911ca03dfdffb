"""Reading and writing files at a local path or a `gs://bucket/object` URL with one small API.

Checkpoints are read by byte range (one tensor at a time), so both backends expose
`open_reader(path)` with `.size` and `.read(start, length)`. With STORAGE_EMULATOR_HOST
set (tests, local emulators) the GCS client uses anonymous credentials and a fixed
project, so nothing ever looks for credentials or probes a metadata server.
"""

from __future__ import annotations

import contextlib
import functools
import mimetypes
import os
import posixpath
import tempfile
import uuid
from typing import BinaryIO, Protocol

GCS_PREFIX = "gs://"


def is_gcs(path: str) -> bool:
    return str(path).startswith(GCS_PREFIX)


def join(base: str, *parts: str) -> str:
    """Joins path parts with "/" for gs:// URLs and os.path.join for local paths."""
    base = str(base)
    if is_gcs(base):  # a part starting with "/" must not drop the bucket
        return posixpath.join(base.rstrip("/"), *(str(p).lstrip("/") for p in parts))
    return os.path.join(base, *parts)


def _split_gcs(url: str) -> tuple[str, str]:
    rest = url[len(GCS_PREFIX):]
    bucket, _, name = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url!r} is not a gs://bucket/object URL")
    return bucket, name


@functools.lru_cache(maxsize=4)
def _client(emulator_host: str | None):
    from google.cloud import storage

    if emulator_host:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="jaxdiff-emulator", credentials=AnonymousCredentials())
    return storage.Client()


def gcs_client():
    """The process-wide google-cloud-storage client (one per emulator endpoint)."""
    return _client(os.environ.get("STORAGE_EMULATOR_HOST") or None)


def _blob(url: str):
    bucket, name = _split_gcs(url)
    if not name:
        raise ValueError(f"{url!r} names a bucket, not an object")
    return gcs_client().bucket(bucket).blob(name)


def exists(path: str) -> bool:
    path = str(path)
    if is_gcs(path):
        from google.api_core.exceptions import NotFound

        bucket, name = _split_gcs(path)
        if not name.strip("/"):
            return gcs_client().bucket(bucket).exists()
        if gcs_client().bucket(bucket).blob(name).exists():
            return True
        # A "directory" exists on GCS when any object lies below it.
        prefix = name.rstrip("/") + "/"
        try:
            return any(True for _ in gcs_client().list_blobs(bucket, prefix=prefix, max_results=1))
        except NotFound:  # no such bucket
            return False
    return os.path.exists(path)


def list_dir(path: str) -> list[str]:
    """Names (files and sub-folders) directly inside the folder `path`, sorted."""
    path = str(path)
    if is_gcs(path):
        from google.api_core.exceptions import NotFound

        bucket, name = _split_gcs(path)
        prefix = name.rstrip("/") + "/" if name.strip("/") else ""
        blobs = gcs_client().list_blobs(bucket, prefix=prefix, delimiter="/")
        try:
            names = [b.name[len(prefix):] for b in blobs]
        except NotFound as e:
            raise FileNotFoundError(f"{path}: bucket {bucket!r} does not exist") from e
        names += [p[len(prefix):].rstrip("/") for p in blobs.prefixes]
        # An object "x" and objects below "x/" are one name, as on a local disk.
        return sorted({n for n in names if n})
    return sorted(os.listdir(path))


def read_bytes(path: str) -> bytes:
    """The whole file; FileNotFoundError if it does not exist (local or gs://)."""
    path = str(path)
    if is_gcs(path):
        from google.api_core.exceptions import NotFound

        try:
            return _blob(path).download_as_bytes()
        except NotFound as e:
            raise FileNotFoundError(f"{path} does not exist") from e
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def download(path: str, local_path: str) -> None:
    """Copies one file (local or gs://) to `local_path`, which holds the whole copy or is
    left as it was."""
    tmp = local_temp_for(local_path)
    try:
        if is_gcs(path):
            from google.api_core.exceptions import NotFound

            try:
                _blob(path).download_to_filename(tmp)
            except NotFound as e:
                raise FileNotFoundError(f"{path} does not exist") from e
        else:
            import shutil

            shutil.copyfile(path, tmp)
        os.replace(tmp, local_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class RangeReader(Protocol):
    path: str
    size: int

    def read(self, start: int, length: int) -> bytes | bytearray: ...

    def close(self) -> None: ...


class _LocalReader:
    def __init__(self, path: str):
        self.path = path
        self._file: BinaryIO = open(path, "rb")
        self.size = os.fstat(self._file.fileno()).st_size

    def read(self, start: int, length: int) -> bytearray:
        buffer = bytearray(length)
        got = os.preadv(self._file.fileno(), [buffer], start) if length else 0
        while 0 < got < length:  # pread may return short reads on some filesystems
            more = os.preadv(self._file.fileno(), [memoryview(buffer)[got:]], start + got)
            if more == 0:
                break
            got += more
        if got != length:
            raise EOFError(f"{self.path}: wanted bytes {start}..{start + length}, file has {self.size}")
        return buffer

    def close(self) -> None:
        self._file.close()


class _GcsReader:
    def __init__(self, url: str):
        self.path = url
        blob = _blob(url)
        # Fetches the size and the generation, which every range read then asks for: an object
        # replaced while it is read (a checkpoint uploaded again) fails the read rather than
        # mixing two files' bytes. Raises NotFound for a missing object.
        blob.reload()
        self._blob = blob
        self.size = int(blob.size)

    def read(self, start: int, length: int) -> bytes:
        # The size is the object's as opened: a read past it is past the end, whatever the
        # object holds now (GCS itself answers 416 for a start at or past the end).
        if start + length > self.size:
            raise EOFError(f"{self.path}: wanted bytes {start}..{start + length}, object has {self.size}")
        if length == 0:
            return b""
        # `end` is inclusive in google-cloud-storage. Ranged reads skip the whole-object
        # checksum; callers that need integrity hash the bytes themselves.
        from google.api_core.exceptions import NotFound

        try:
            data = self._blob.download_as_bytes(start=start, end=start + length - 1, checksum=None)
        except NotFound as e:
            raise FileNotFoundError(f"{self.path} was replaced or deleted while it was read (generation "
                                    f"{self._blob.generation} is gone): read it again") from e
        if len(data) != length:
            raise EOFError(f"{self.path}: wanted bytes {start}..{start + length}, object has {self.size}")
        return data

    def close(self) -> None:
        pass


def open_reader(path: str) -> RangeReader:
    """A reader of byte ranges of one file; raises FileNotFoundError if it does not exist."""
    path = str(path)
    if is_gcs(path):
        from google.api_core.exceptions import NotFound

        try:
            return _GcsReader(path)
        except NotFound as e:
            raise FileNotFoundError(f"{path} does not exist") from e
    return _LocalReader(path)


# ---- writing: build locally, then move into place in one step --------------------------

def _local_version(st: os.stat_result) -> str:
    # A file moved into place keeps its temporary file's inode: a new one each write.
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def put_file(local_path: str, dest: str) -> str:
    """Moves a finished local file to `dest` in one step. Returns the version written,
    which any later write of `dest` changes (GCS: the object's generation), as
    `file_versions` lists them."""
    if is_gcs(dest):
        # The content type follows `dest`, not the temporary file's name.
        content_type = mimetypes.guess_type(posixpath.basename(dest))[0]
        blob = _blob(dest)
        blob.upload_from_filename(local_path, content_type=content_type)
        os.unlink(local_path)
        return str(blob.generation)
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    os.replace(local_path, dest)
    return _local_version(os.stat(dest))


def file_versions(folder: str) -> dict[str, str]:
    """{name: version} of the files directly in `folder`, in one listing; empty when it
    does not exist."""
    folder = str(folder)
    if is_gcs(folder):
        from google.api_core.exceptions import NotFound

        bucket, name = _split_gcs(folder)
        prefix = name.rstrip("/") + "/" if name.strip("/") else ""
        try:
            return {b.name[len(prefix):]: str(b.generation)
                    for b in gcs_client().list_blobs(bucket, prefix=prefix, delimiter="/")}
        except NotFound:
            return {}
    if not os.path.isdir(folder):
        return {}
    return {e.name: _local_version(e.stat()) for e in os.scandir(folder) if e.is_file()}


def _upload_temp_dir() -> str:
    # One a user: another user's folder in a shared temp folder is not writable.
    return os.path.join(tempfile.gettempdir(), f"jaxdiff-uploads-{os.getuid()}" if hasattr(os, "getuid")
                        else "jaxdiff-uploads")


def local_temp_for(dest: str) -> str:
    """A temporary file on the same filesystem as `dest` (so os.replace is atomic); for a
    gs:// `dest`, one in the temp folder's jaxdiff-uploads-UID/, named with this process's id
    (see remove_stale_uploads)."""
    prefix = "." + os.path.basename(dest) + "."
    if is_gcs(dest):
        os.makedirs(_upload_temp_dir(), mode=0o700, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}.", suffix=".partial", dir=_upload_temp_dir())
    else:
        folder = os.path.dirname(dest) or "."
        os.makedirs(folder, exist_ok=True)
        # Not mkstemp: its 0600 mode would stay on the file moved into place; 0666 gets
        # the umask applied, as for any file the user creates.
        path = os.path.join(folder, prefix + uuid.uuid4().hex[:12] + ".partial")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    return path


def remove_stale_uploads() -> list[str]:
    """Deletes the temporary files of gs:// uploads whose process is gone (a killed worker's
    shard tar: hundreds of MB each), leaving those of running processes; returns their paths."""
    import psutil

    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(_upload_temp_dir()):
            parts = entry.name.removesuffix(".partial").rsplit(".", 2)  # .{name}.{pid}.{random}
            if len(parts) == 3 and parts[1].isdigit() and not psutil.pid_exists(int(parts[1])):
                with contextlib.suppress(FileNotFoundError, PermissionError):  # another's sweep took it
                    os.unlink(entry.path)
                    removed.append(entry.path)
    return removed


def write_bytes(dest: str, data: bytes) -> str:
    """Writes `data` to `dest` so that readers see the old file or the whole new one;
    returns the version written (see put_file)."""
    tmp = local_temp_for(dest)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        return put_file(tmp, dest)
    finally:
        if os.path.exists(tmp):  # a failed upload or move leaves no temporary file behind
            os.unlink(tmp)


def delete(path: str) -> None:
    """Removes one file if it exists."""
    if is_gcs(path):
        from google.api_core.exceptions import NotFound

        try:
            _blob(path).delete()
        except NotFound:
            pass
    else:
        try:  # not exists() then unlink(): another worker may delete it in between
            os.unlink(path)
        except FileNotFoundError:
            pass
