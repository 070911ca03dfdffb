"""Reads a .safetensors file one tensor at a time, from a local path or gs://.

The format is: 8 bytes little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`),
then the data buffer. We read the header, check it against the file size (so a
truncated file fails before any tensor is loaded), then read tensors in offset order
by byte range. Only one tensor's bytes are on the host at a time, and since the
reads in offset order cover the whole file, the file's sha256 comes for free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Iterator

import ml_dtypes
import numpy as np

from jaxdiff import storage
from jaxdiff.weights.convert import CheckpointError

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
# A header larger than this is not a safetensors header (the format caps it at 100 MB).
_MAX_HEADER_BYTES = 100_000_000


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class SafetensorsStream:
    """One safetensors file: `entries` from its header; iterate for (name, array).

    After a complete iteration `sha256` holds the hex digest of the whole file.
    """

    def __init__(self, path: str):
        self.path = str(path)
        try:
            self._reader = storage.open_reader(self.path)
        except FileNotFoundError as e:
            raise CheckpointError(f"{self.path}: file not found") from e
        self.size = self._reader.size
        self.sha256: str | None = None
        self._hash = hashlib.sha256()
        self._header_bytes, self.entries, self.metadata = self._read_header()

    def _read_header(self):
        if self.size < 8:
            raise CheckpointError(
                f"{self.path}: truncated safetensors file ({self.size} bytes, the header length "
                f"alone needs 8); re-download or re-save the checkpoint")
        prefix = bytes(self._reader.read(0, 8))
        header_len = int.from_bytes(prefix, "little")
        if header_len > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{self.path}: not a safetensors file (header length {header_len})")
        if 8 + header_len > self.size:
            raise CheckpointError(
                f"{self.path}: truncated safetensors header (needs {8 + header_len} bytes, "
                f"file has {self.size}); re-download or re-save the checkpoint")
        raw = bytes(self._reader.read(8, header_len))
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        entries = []
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has an unreadable header entry {info!r}") from e
            if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} spans bytes {begin}..{end}, which does not fit "
                    f"its shape {shape} and dtype {info['dtype']}")
            if data_start + end > self.size:
                raise CheckpointError(
                    f"{self.path}: truncated safetensors data: tensor {name!r} ends at byte "
                    f"{data_start + end}, file has {self.size}; re-download or re-save the checkpoint")
            entries.append(TensorEntry(name, dtype, shape, data_start + begin, data_start + end))
        entries.sort(key=lambda e: e.start)
        return prefix + raw, entries, metadata

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        self._hash.update(self._header_bytes)
        position = len(self._header_bytes)
        try:
            for entry in self.entries:
                if entry.start > position:  # padding between tensors still belongs to the file
                    self._hash.update(self._reader.read(position, entry.start - position))
                elif entry.start < position:  # overlapping tensors: the file is not covered once
                    self._hash = None
                data = self._reader.read(entry.start, entry.end - entry.start)
                if self._hash is not None:
                    self._hash.update(data)
                position = max(position, entry.end)
                array = np.frombuffer(data, dtype=entry.dtype).reshape(entry.shape)
                del data
                yield entry.name, array
            if self._hash is not None:
                if position < self.size:
                    self._hash.update(self._reader.read(position, self.size - position))
                self.sha256 = self._hash.hexdigest()
        finally:
            self._reader.close()

    def __len__(self) -> int:
        return len(self.entries)
