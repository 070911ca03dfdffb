"""jaxdiff.storage on local files and on gs:// URLs (in-process GCS emulator)."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from jaxdiff import storage


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# ---- URLs and listing -------------------------------------------------------------------

def test_gcs_object_names_with_special_characters_round_trip(gcs_bucket):
    for name in ["a b.txt", "h#x", "q?x", "p%20x", "ü.txt", "br[1].txt"]:
        url = f"gs://{gcs_bucket}/names/{name}"
        storage.write_bytes(url, name.encode())
        assert storage.exists(url)
        assert storage.read_bytes(url) == name.encode()
    assert storage.list_dir(f"gs://{gcs_bucket}/names/") == sorted(
        ["a b.txt", "h#x", "q?x", "p%20x", "ü.txt", "br[1].txt"])


def test_gcs_exists_folder_is_a_prefix_not_a_name_prefix(gcs_bucket):
    storage.write_bytes(f"gs://{gcs_bucket}/ex/shard-10/x", b"x")
    assert storage.exists(f"gs://{gcs_bucket}/ex/shard-10")
    assert storage.exists(f"gs://{gcs_bucket}/ex/shard-10/")
    assert not storage.exists(f"gs://{gcs_bucket}/ex/shard-1")


def test_gcs_exists_bucket_root(gcs_bucket):
    assert storage.exists(f"gs://{gcs_bucket}")
    assert storage.exists(f"gs://{gcs_bucket}/")
    assert not storage.exists("gs://jaxdiff-no-such-bucket")


def test_gcs_exists_in_missing_bucket_is_false(gcs_emulator):
    assert not storage.exists("gs://jaxdiff-no-such-bucket/out")


def test_gcs_list_dir_in_missing_bucket_names_the_path(gcs_emulator):
    with pytest.raises(FileNotFoundError, match="jaxdiff-no-such-bucket/out"):
        storage.list_dir("gs://jaxdiff-no-such-bucket/out")


def test_gcs_list_dir_names_a_file_and_folder_of_one_name_once(gcs_bucket):
    storage.write_bytes(f"gs://{gcs_bucket}/dup/x", b"file")
    storage.write_bytes(f"gs://{gcs_bucket}/dup/x/y", b"below")
    assert storage.list_dir(f"gs://{gcs_bucket}/dup") == ["x"]


def test_gcs_list_dir_names_files_and_sub_folders_as_a_local_folder_does(gcs_bucket, tmp_path):
    """An output folder's listing on GCS holds its sub-folders (failures/) and nothing of a
    sibling folder whose name starts with the same letters (out2, out-old), as on a local disk."""
    files = ["out/a.json", "out/failures/x.jsonl", "out/deep/er/y", "out2/b.json", "out-old/c", "outer"]
    for name in files:
        storage.write_bytes(f"gs://{gcs_bucket}/siblings/{name}", b"x")
        storage.write_bytes(str(tmp_path / "siblings" / name), b"x")
    for folder in ("siblings", "siblings/out", "siblings/out/deep", "siblings/out2"):
        local = storage.list_dir(str(tmp_path / folder))
        assert storage.list_dir(f"gs://{gcs_bucket}/{folder}") == local
        assert storage.list_dir(f"gs://{gcs_bucket}/{folder}/") == local
    assert storage.list_dir(f"gs://{gcs_bucket}/siblings/out") == ["a.json", "deep", "failures"]


def test_gcs_list_dir_missing_folder_is_empty_and_local_raises(gcs_bucket, tmp_path):
    assert storage.list_dir(f"gs://{gcs_bucket}/no-such-folder") == []
    with pytest.raises(FileNotFoundError):
        storage.list_dir(str(tmp_path / "missing"))


def test_gcs_bucket_url_is_not_an_object(gcs_bucket):
    for call in (storage.read_bytes, storage.open_reader):
        with pytest.raises(ValueError, match=f"gs://{gcs_bucket}"):
            call(f"gs://{gcs_bucket}/")


def test_join():
    assert storage.join("gs://b/out/", "x/y", "z") == "gs://b/out/x/y/z"
    assert storage.join("gs://b", "x") == "gs://b/x"
    assert storage.join("gs://b/out", "/x") == "gs://b/out/x"
    assert storage.join("out", "x") == os.path.join("out", "x")


# ---- reading ----------------------------------------------------------------------------

def test_read_missing_names_the_path(gcs_bucket, tmp_path):
    for path in (f"gs://{gcs_bucket}/missing.bin", str(tmp_path / "missing.bin")):
        with pytest.raises(FileNotFoundError, match="missing.bin"):
            storage.read_bytes(path)
        with pytest.raises(FileNotFoundError, match="missing.bin"):
            storage.open_reader(path)


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_range_reader_bounds(where, gcs_bucket, tmp_path):
    base = f"gs://{gcs_bucket}/ranges" if where == "gcs" else str(tmp_path)
    storage.write_bytes(storage.join(base, "five"), b"01234")
    storage.write_bytes(storage.join(base, "empty"), b"")
    reader = storage.open_reader(storage.join(base, "five"))
    assert reader.size == 5
    assert bytes(reader.read(3, 2)) == b"34"
    assert bytes(reader.read(1, 2)) == b"12" and bytes(reader.read(0, 5)) == b"01234"
    assert bytes(reader.read(5, 0)) == b""
    for start, length in [(3, 5), (5, 1), (9, 1)]:
        with pytest.raises(EOFError):
            reader.read(start, length)
    reader.close()
    empty = storage.open_reader(storage.join(base, "empty"))
    assert empty.size == 0 and bytes(empty.read(0, 0)) == b""
    with pytest.raises(EOFError):
        empty.read(0, 1)


def test_gcs_range_reader_stays_within_the_size_it_reported(gcs_bucket):
    url = f"gs://{gcs_bucket}/grown"
    storage.write_bytes(url, b"01234")
    reader = storage.open_reader(url)
    storage.write_bytes(url, b"0123456789")
    with pytest.raises(EOFError):
        reader.read(5, 2)


def test_gcs_range_reads_ask_for_the_generation_opened(gcs_bucket, monkeypatch):
    """A checkpoint replaced on GCS while it loads must not give tensors from two files: each
    range asks for the object's generation as opened (GCS then answers 404, not new bytes)."""
    url = f"gs://{gcs_bucket}/pinned"
    storage.write_bytes(url, b"01234")
    reader = storage.open_reader(url)
    generation = storage.gcs_client().bucket(gcs_bucket).get_blob("pinned").generation
    http = storage.gcs_client()._http
    request, urls = http.request, []

    def record(method, request_url, *args, **kwargs):
        urls.append(request_url)
        return request(method, request_url, *args, **kwargs)

    monkeypatch.setattr(http, "request", record)
    assert bytes(reader.read(1, 3)) == b"123"
    assert urls and all(f"generation={generation}" in u for u in urls)
    monkeypatch.setattr(http, "request", request)
    storage.delete(url)
    with pytest.raises(FileNotFoundError, match="pinned was replaced or deleted while it was read"):
        reader.read(0, 2)


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_download_of_missing_file_keeps_the_existing_destination(where, gcs_bucket, tmp_path):
    source = f"gs://{gcs_bucket}/missing.bin" if where == "gcs" else str(tmp_path / "missing.bin")
    dest = tmp_path / "dest" / "file.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"old")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.download(source, str(dest))
    assert dest.read_bytes() == b"old"
    assert os.listdir(dest.parent) == ["file.bin"]


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_download_copies_the_file(where, gcs_bucket, tmp_path):
    base = f"gs://{gcs_bucket}/dl" if where == "gcs" else str(tmp_path / "src")
    storage.write_bytes(storage.join(base, "a.bin"), b"data")
    dest = tmp_path / "a.bin"
    storage.download(storage.join(base, "a.bin"), str(dest))
    assert dest.read_bytes() == b"data"
    assert sorted(os.listdir(tmp_path)) == sorted(["a.bin"] + (["src"] if where == "local" else []))


# ---- writing ----------------------------------------------------------------------------

def test_local_write_bytes_makes_folders_replaces_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "a" / "b" / "x.json"
    storage.write_bytes(str(dest), b"1")
    storage.write_bytes(str(dest), b"2")
    assert dest.read_bytes() == b"2"
    assert os.listdir(dest.parent) == ["x.json"]


def test_a_local_write_replaces_the_file_and_never_writes_into_the_old_one(tmp_path):
    """Readers of the old file (a hard link, an open reader, a copy in progress) keep its
    whole bytes: the new file is moved into place, not written over the old one."""
    dest, link = tmp_path / "x.json", tmp_path / "link.json"
    storage.write_bytes(str(dest), b"old")
    os.link(dest, link)
    storage.write_bytes(str(dest), b"new")
    assert (dest.read_bytes(), link.read_bytes()) == (b"new", b"old")
    local = tmp_path / "upload"
    local.write_bytes(b"newer")
    storage.put_file(str(local), str(dest))
    assert (dest.read_bytes(), link.read_bytes()) == (b"newer", b"old")
    assert os.stat(dest).st_ino != os.stat(link).st_ino


def test_local_writes_get_the_usual_file_mode(tmp_path):
    dest = tmp_path / "x.json"
    storage.write_bytes(str(dest), b"{}")
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o666 & ~_umask()
    tar = storage.local_temp_for(str(tmp_path / "shard.tar"))
    storage.put_file(tar, str(tmp_path / "shard.tar"))
    assert stat.S_IMODE(os.stat(tmp_path / "shard.tar").st_mode) == 0o666 & ~_umask()


def test_write_bytes_removes_the_temp_file_when_the_move_fails(tmp_path):
    (tmp_path / "x.json").mkdir()  # os.replace of a file onto a folder fails
    with pytest.raises(OSError):
        storage.write_bytes(str(tmp_path / "x.json"), b"{}")
    assert os.listdir(tmp_path) == ["x.json"]


def test_gcs_put_file_uploads_and_removes_the_local_file(gcs_bucket, tmp_path):
    local = tmp_path / "shard.tar"
    local.write_bytes(b"t" * 1000)
    storage.put_file(str(local), f"gs://{gcs_bucket}/put/shard.tar")
    assert not local.exists()
    assert storage.read_bytes(f"gs://{gcs_bucket}/put/shard.tar") == b"t" * 1000


@pytest.mark.faults
def test_a_gcs_upload_is_retried_after_a_transient_error(gcs_bucket, monkeypatch):
    """GCS answers a few requests in a large job with 503 or drops the connection: one such
    answer must not fail a shard's commit (and with it the whole run, after its retries)."""
    from google.api_core.exceptions import ServiceUnavailable

    http = storage.gcs_client()._http
    request, uploads = http.request, []

    def flaky(method, url, *args, **kwargs):
        if "/upload/" in url:
            uploads.append(url)
            if len(uploads) == 1:
                raise ServiceUnavailable("simulated: backend unavailable")
        return request(method, url, *args, **kwargs)

    monkeypatch.setattr(http, "request", flaky)
    storage.write_bytes(f"gs://{gcs_bucket}/flaky/x.json", b"{}")
    assert len(uploads) == 2
    assert storage.read_bytes(f"gs://{gcs_bucket}/flaky/x.json") == b"{}"


def test_gcs_upload_content_type_follows_the_object_name(gcs_bucket):
    storage.write_bytes(f"gs://{gcs_bucket}/ctype/x.json", b"{}")
    storage.write_bytes(f"gs://{gcs_bucket}/ctype/x.parquet", b"PAR1")
    bucket = storage.gcs_client().bucket(gcs_bucket)
    assert bucket.get_blob("ctype/x.json").content_type == "application/json"
    assert bucket.get_blob("ctype/x.parquet").content_type == "application/octet-stream"


def test_delete_missing_is_a_no_op(gcs_bucket, tmp_path):
    storage.delete(f"gs://{gcs_bucket}/missing")
    storage.delete("gs://jaxdiff-no-such-bucket/missing")
    storage.delete(str(tmp_path / "missing"))
    storage.write_bytes(f"gs://{gcs_bucket}/gone", b"x")
    storage.delete(f"gs://{gcs_bucket}/gone")
    assert not storage.exists(f"gs://{gcs_bucket}/gone")


def test_local_delete_from_several_threads_at_once(tmp_path):
    path = str(tmp_path / "stats.json")
    errors = []

    def delete(barrier):
        barrier.wait()
        try:
            storage.delete(path)
        except OSError as e:
            errors.append(e)

    for _ in range(100):
        open(path, "wb").close()
        barrier = threading.Barrier(4)
        threads = [threading.Thread(target=delete, args=(barrier,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert not os.path.exists(path)


def test_gcs_client_is_shared_across_threads(gcs_bucket):
    first = storage.gcs_client()
    clients = []
    threads = [threading.Thread(target=lambda: clients.append(storage.gcs_client())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(c is first for c in clients)
    assert first.project == "jaxdiff-emulator"


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_each_write_has_a_version_that_the_folder_listing_gives(where, tmp_path, request):
    """A shard's marker records the versions of the files it vouches for; any later write of
    a file, even of the same bytes, gives another."""
    base = str(tmp_path / "v") if where == "local" else f"gs://{request.getfixturevalue('gcs_bucket')}/versions"
    first = storage.write_bytes(storage.join(base, "a.tar"), b"same")
    other = storage.write_bytes(storage.join(base, "b.json"), b"{}")
    storage.write_bytes(storage.join(base, "sub", "c"), b"below")
    assert storage.file_versions(base) == {"a.tar": first, "b.json": other}
    local = tmp_path / "upload"
    local.write_bytes(b"same")
    again = storage.put_file(str(local), storage.join(base, "a.tar"))
    assert again != first and storage.file_versions(base)["a.tar"] == again
    assert storage.file_versions(storage.join(base, "none")) == {}


@pytest.mark.faults
def test_upload_temp_files_of_gone_processes_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    """A worker killed mid-shard leaves its gs:// shard's local tar behind: the next worker
    on the machine removes it, not the files of a process still writing."""
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = storage.local_temp_for("gs://bucket/run/shard-00000.tar")
    folder = tmp_path / f"jaxdiff-uploads-{os.getuid()}"  # a user's own: another's would not be writable
    assert os.path.dirname(mine) == str(folder) and stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = str(folder / f".shard-00001.tar.{int(gone.stdout)}.abc123.partial")
    open(stale, "wb").close()
    assert storage.remove_stale_uploads() == [stale]
    assert os.path.exists(mine) and not os.path.exists(stale)
