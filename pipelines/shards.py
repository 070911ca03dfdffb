"""Writing one output shard, and telling which shards are already complete.

A shard `shard-NNNNN` is four files under the output folder:

    shard-NNNNN.tar            webdataset: {key}.png|jpg|webp, {key}.json, {key}.txt, [{key}.base.png]
    shard-NNNNN.parquet        one row per rendered sample
    failures/shard-NNNNN.jsonl one line per id that could not be rendered (maybe empty)
    shard-NNNNN.stats.json     the commit marker: counts, bytes, sha256 of the tar, the versions of
                               the files it vouches for; written LAST

Each file is built in a local temporary file and then moved into place in one step
(os.replace locally; one object upload on GCS), so a shard killed midway never has a
stats file; rendering a shard again first withdraws its stats file, then replaces each
file whole.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import tarfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jaxdiff import storage
from jaxdiff.engine.sample import Rendered, Sample

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
LOSSY_FORMATS = ("jpg", "webp")
DEFAULT_QUALITY = 95
FAILURES_DIR = "failures"
STATS_SUFFIX = ".stats.json"


def _json_ready(value: Any) -> Any:
    """`value` as strict JSON can hold it: non-finite floats as the strings "NaN",
    "Infinity", "-Infinity" (bare NaN is not JSON), bytes as base64 text, numpy scalars as
    Python ones, anything else unknown as its str()."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return "NaN" if np.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def to_json(value: Any, **kwargs) -> str:
    """Strict JSON text (sorted keys) of metadata that may hold NaN, bytes or numpy values."""
    return json.dumps(_json_ready(value), sort_keys=True, allow_nan=False, **kwargs)


def write_json(dest: str, value: Any) -> None:
    storage.write_bytes(dest, (to_json(value, indent=1) + "\n").encode())


def list_files(folder: str) -> list[str]:
    """Names of the files directly in `folder`; empty when it does not exist."""
    if not storage.is_gcs(folder) and not os.path.isdir(folder):
        return []
    return storage.list_dir(folder)


def check_writable(out: str) -> None:
    """Fails early, naming `out`, when the output folder cannot be written."""
    probe = storage.join(out, ".jaxdiff-write-check")
    try:
        storage.write_bytes(probe, b"ok\n")
        storage.delete(probe)
    except Exception as e:
        raise OSError(f"cannot write to the output folder {out!r} ({e.__class__.__name__}: {e}); "
                      "pass an --out that exists or can be created, with write permission") from e


def remove_partials(out: str) -> None:
    """Deletes temporary files a killed run left in a local output folder (GCS gets none)."""
    for folder in (out, os.path.join(out, FAILURES_DIR)):
        if storage.is_gcs(out) or not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name.startswith(".") and name.endswith(".partial"):
                os.unlink(os.path.join(folder, name))


# ---- paths and completion ---------------------------------------------------------------

def shard_paths(out: str, name: str) -> dict[str, str]:
    return {
        "tar": storage.join(out, name + ".tar"),
        "parquet": storage.join(out, name + ".parquet"),
        "failures": storage.join(out, FAILURES_DIR, name + ".jsonl"),
        "stats": storage.join(out, name + STATS_SUFFIX),
    }


def complete_shards(out: str) -> set[str]:
    """Names of the shards whose commit marker and files exist (two listings, not probes
    per shard): a shard whose tar, parquet or failures file was deleted since its commit
    renders again, and the index never lists a file that is not there."""
    names = set(list_files(out))
    failures = set(list_files(storage.join(out, FAILURES_DIR)))
    marked = {n[: -len(STATS_SUFFIX)] for n in names if n.endswith(STATS_SUFFIX)}
    return {s for s in marked if {s + ".tar", s + ".parquet"} <= names and s + ".jsonl" in failures}


def is_complete(out: str, name: str) -> bool:
    """Whether one shard's marker and files exist (complete_shards, probing one shard)."""
    return all(storage.exists(path) for path in shard_paths(out, name).values())


# What the job reads of a marker (the index, resumes, --retry-failures).
MARKER_FIELDS = ("shard", "rendered", "failed", "tar", "tar_bytes", "tar_sha256")


def read_stats(out: str, name: str) -> dict:
    """A shard's commit marker; DamagedShard where it does not read as one (cut short, edited)."""
    path = shard_paths(out, name)["stats"]
    try:
        stats = json.loads(storage.read_text(path))
    except ValueError as e:  # not JSON, or not UTF-8
        raise DamagedShard(out, name, f"its marker {path} does not read as JSON ({e})") from e
    missing = [f for f in MARKER_FIELDS if f not in stats] if isinstance(stats, dict) else list(MARKER_FIELDS)
    if missing:
        raise DamagedShard(out, name, f"its marker {path} lacks {', '.join(missing)}")
    return stats


def folder_id(out: str) -> str:
    """The output folder as a marker records where it was written: gs:// URLs as they are,
    local paths made absolute."""
    return out if storage.is_gcs(out) else os.path.abspath(out)


def overwritten_shards(out: str, stats: dict[str, dict]) -> list[str]:
    """Names of committed shards (name: its marker) whose files are no longer the ones
    their marker vouches for. Dataflow can run a shard's work again while a lost worker's
    first attempt still runs; when both commit at once, the marker that lands last may
    name the other attempt's tar. Only markers written in `out` itself are checked: the
    files of a copied output folder have other versions throughout, and markers from
    before versions were recorded are taken as they are."""
    here = {name: s["versions"] for name, s in stats.items() if s.get("versions", {}).get("folder") == folder_id(out)}
    if not here:
        return []
    failures = storage.file_versions(storage.join(out, FAILURES_DIR))
    present = storage.file_versions(out) | {f"{FAILURES_DIR}/{n}": v for n, v in failures.items()}
    names = {"tar": "{}.tar", "parquet": "{}.parquet", "failures": FAILURES_DIR + "/{}.jsonl"}
    return [name for name, versions in here.items()
            if any(present.get(names[kind].format(name)) != versions[kind] for kind in names)]


def read_failures(out: str, name: str) -> list[dict]:
    path = shard_paths(out, name)["failures"]
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


# ---- encoding ---------------------------------------------------------------------------

def save_options(image_format: str, quality: int | None = None) -> dict:
    """Pillow's save options for `image_format`: the lossy formats' quality (None: 95).
    ValueError, naming the option, for a format or quality that cannot be written."""
    if image_format not in FORMATS:
        raise ValueError(f"unsupported --format {image_format!r}: use one of {', '.join(FORMATS)}")
    if image_format not in LOSSY_FORMATS:
        if quality is not None:
            raise ValueError(f"--quality applies to {' and '.join(LOSSY_FORMATS)}; {image_format} is lossless: "
                             "leave --quality out")
        return {}
    quality = DEFAULT_QUALITY if quality is None else quality
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"--quality {quality!r} is out of range: use a whole number from 1 to 100")
    return {"quality": quality}


def encode_image(image: np.ndarray, image_format: str, quality: int | None = None) -> bytes:
    options = save_options(image_format, quality)
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format=FORMATS[image_format], **options)
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class EncodedImages:
    """One sample's compressed files: its image (and that image's sha256), and its base
    image before upscaling when the shard keeps it."""
    image: bytes
    sha256: str
    base: bytes | None = None


def image_metadata(sample: Sample, rendered: Rendered, model: dict) -> dict:
    """What the shard's {key}.json says about one image: enough to reproduce it, and
    nothing that differs between two renders of it (timings), so a shard rendered again
    is the same file."""
    meta = {
        "id": sample.id,
        "prompt": sample.prompt,
        "negative_prompt": sample.negative_prompt,
        "mode": sample.mode,
        "strength": sample.strength,
        "model": model,
        "manifest": dict(sample.metadata),
        **sample.input_files,  # init_image and mask: path or URL, and sha256
    }
    meta.update(rendered.metadata)  # seed, sampler, steps, guidance, sizes as rendered
    meta.pop("timings", None)
    # The run's model record (paths, checksums, settings), less how the run batched and
    # placed its work, which changes an image only through rounding.
    meta["model"] = {k: v for k, v in model.items() if k not in ("batch_size", "devices")} or meta.get("model")
    return meta


class DamagedShard(RuntimeError):
    """A committed shard whose stats marker does not read, or whose files do not match it
    (found by --retry-failures)."""

    def __init__(self, out: str, name: str, what: str):
        self.what = what = " ".join(what.split())  # one line: a library's reason may hold newlines
        super().__init__(f"{name} in {out} is damaged: {what}. Delete {shard_paths(out, name)['stats']} and "
                         f"rerun the same command: the whole shard renders again")


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # identical content on a rerun gives an identical tar
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Streams one shard's images into a local tar; `commit()` moves everything into place.

    Memory stays flat: encoded images go straight to the tar file on disk, and only the
    parquet rows (a few hundred bytes per sample) are held until commit.
    """

    def __init__(self, out: str, name: str, *, image_format: str = "png", quality: int | None = None,
                 keep_base: bool = False, model: dict | None = None):
        save_options(image_format, quality)  # refuses what cannot be written before any file exists
        self.out, self.name, self.paths = out, name, shard_paths(out, name)
        self.image_format, self.quality, self.keep_base, self.model = image_format, quality, keep_base, model or {}
        self._tar_path = storage.local_temp_for(self.paths["tar"])
        self._tar = tarfile.open(self._tar_path, "w", format=tarfile.USTAR_FORMAT)
        self._rows: list[dict] = []
        self._failures: list[str] = []
        self._started = time.time()

    def encode(self, rendered: Rendered) -> EncodedImages:
        """The sample's image files, compressed. The slow part of adding a sample, and
        safe on any thread: it reads nothing of the shard but its settings."""
        image = encode_image(rendered.image, self.image_format, self.quality)
        base = None
        if self.keep_base and rendered.base_image is not None:
            base = encode_image(rendered.base_image, "png")
        return EncodedImages(image, hashlib.sha256(image).hexdigest(), base)

    def add(self, key: str, sample: Sample, rendered: Rendered, encoded: EncodedImages | None = None) -> None:
        """Appends one sample to the shard; `encoded` is `self.encode(rendered)`, done ahead."""
        meta = image_metadata(sample, rendered, self.model)
        # Both JSON texts before any member: metadata nested too deep to write raises
        # RecursionError here, leaving nothing of the sample in the tar.
        meta_json, manifest_json = to_json(meta), to_json(meta["manifest"])
        encoded = encoded or self.encode(rendered)
        image = encoded.image
        _add_member(self._tar, f"{key}.{self.image_format}", image)
        _add_member(self._tar, f"{key}.json", meta_json.encode())
        _add_member(self._tar, f"{key}.txt", sample.prompt.encode())
        if encoded.base is not None:
            _add_member(self._tar, f"{key}.base.png", encoded.base)
        self._rows.append({
            "key": key,
            "id": sample.id,
            "prompt": sample.prompt,
            "negative_prompt": meta.get("negative_prompt"),  # as rendered: the sample's, or the run's
            "mode": sample.mode,
            "seed": meta.get("seed"),
            "width": meta.get("width"),
            "height": meta.get("height"),
            "steps": meta.get("steps"),
            "guidance": meta.get("guidance"),
            "sampler": meta.get("sampler"),
            "strength": meta.get("strength"),
            "init_image": meta.get("init_image"),
            "mask": meta.get("mask"),
            "prompt_truncated": meta.get("prompt_truncated"),
            "negative_prompt_truncated": meta.get("negative_prompt_truncated"),
            "format": self.image_format,
            "image_bytes": len(image),
            "image_sha256": encoded.sha256,
            "metadata": manifest_json,
        })

    def add_failure(self, failure: dict) -> None:
        """One failures/ line: a manifest.Failure's to_json()."""
        self._failures.append(to_json(failure))

    def copy_committed(self, stats: dict) -> set[str]:
        """Starts from this shard's committed tar and parquet (for --retry-failures), checked
        against its stats marker; returns their ids. DamagedShard where they do not match."""
        local = storage.local_temp_for(self.paths["tar"])
        try:
            try:
                parquet = storage.read_bytes(self.paths["parquet"])
                storage.download(self.paths["tar"], local)
            except FileNotFoundError as e:
                raise DamagedShard(self.out, self.name, f"a file is missing ({e})") from e
            try:
                table = pq.read_table(io.BytesIO(parquet))
            except (pa.ArrowException, OSError) as e:  # pyarrow raises OSError for a broken footer
                raise DamagedShard(self.out, self.name, f"its parquet does not read ({e})") from e
            if _file_sha256(local) != stats["tar_sha256"]:
                raise DamagedShard(self.out, self.name, "its tar's sha256 is not the one its marker records")
            rows = table.to_pylist()
            if len(rows) != stats["rendered"]:
                raise DamagedShard(self.out, self.name, f"its parquet holds {len(rows)} rows, its marker counts "
                                                        f"{stats['rendered']} images")
            keep_keys = {row["key"] for row in rows}
            copied = set()
            with tarfile.open(local) as old:
                for member in old:
                    if member.name.split(".", 1)[0] in keep_keys:
                        _add_member(self._tar, member.name, old.extractfile(member).read())
                        copied.add(member.name.split(".", 1)[0])
            if copied != keep_keys:
                raise DamagedShard(self.out, self.name, f"{len(keep_keys - copied)} parquet rows have no image in "
                                                        "its tar")
        finally:
            if os.path.exists(local):
                os.unlink(local)
        self._rows.extend(rows)
        return {row["id"] for row in rows}

    @property
    def rendered(self) -> int:
        return len(self._rows)

    @property
    def failed(self) -> int:
        return len(self._failures)

    def commit(self) -> dict:
        """Moves tar, parquet and failures into place, then writes the stats marker."""
        self._tar.close()
        # Withdraw any marker before touching the files it vouches for (a retry, or a
        # shard committed before and rendered again by a retried bundle): a crash from
        # here on leaves an incomplete shard, which the next run renders afresh.
        storage.delete(self.paths["stats"])
        tar_bytes = os.path.getsize(self._tar_path)
        tar_sha256 = _file_sha256(self._tar_path)
        versions = {"folder": folder_id(self.out), "tar": storage.put_file(self._tar_path, self.paths["tar"])}

        parquet = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self._rows, schema=PARQUET_SCHEMA), parquet)
        versions["parquet"] = storage.write_bytes(self.paths["parquet"], parquet.getvalue())
        versions["failures"] = storage.write_bytes(self.paths["failures"],
                                                   "".join(line + "\n" for line in self._failures).encode())

        stats = {
            "shard": self.name,
            "rendered": self.rendered,
            "failed": self.failed,
            "samples": self.rendered + self.failed,
            "tar": os.path.basename(self.paths["tar"]),
            "tar_bytes": tar_bytes,
            "tar_sha256": tar_sha256,
            "parquet_bytes": len(parquet.getvalue()),
            "versions": versions,  # the files this marker vouches for (see overwritten_shards)
            "seconds": round(time.time() - self._started, 3),
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json(self.paths["stats"], stats)
        return stats

    def abort(self) -> None:
        """Drops the local temporary tar (the shard stays incomplete)."""
        self._tar.close()
        if os.path.exists(self._tar_path):
            os.unlink(self._tar_path)


PARQUET_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("id", pa.string()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("mode", pa.string()),
    ("seed", pa.int64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("steps", pa.int32()),
    ("guidance", pa.float64()),  # as the .json has it
    ("sampler", pa.string()),
    ("strength", pa.float64()),        # image modes
    ("init_image", pa.string()),       # path or URL as the manifest resolves it
    ("mask", pa.string()),
    ("prompt_truncated", pa.bool_()),  # cut to the text encoder's tokens
    ("negative_prompt_truncated", pa.bool_()),
    ("format", pa.string()),
    ("image_bytes", pa.int64()),
    ("image_sha256", pa.string()),
    ("metadata", pa.string()),
])
