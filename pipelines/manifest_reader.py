"""Manifest files -> raw records: finding the files, planning shards, reading one shard.

A manifest is one or more files of prompt records, local or gs://, in one of these
formats (chosen by extension, case-insensitive):

  .jsonl / .json   JSON Lines: one JSON object a line; blank lines skipped; a key given
                   twice fails its record (JSON would keep only the last). A file holding
                   a JSON array, or objects pretty-printed over several lines, is refused
  .csv             a header row naming the fields, then one record a row; a row repeating
                   the header (files joined with cat) fails. Quoting is strict: a stray
                   quote fails its row, and a quote left open over later lines refuses the file
  .txt             one prompt a line; blank lines skipped
  .parquet         one record a row, columns named as the fields

The text formats may be gzip-compressed (`.jsonl.gz`, `.csv.gz`, `.txt.gz`), and are UTF-8:
a UTF-16 or UTF-32 file (a byte-order mark, or NUL bytes near its start) is refused. A
UTF-8 byte-order mark starting any line (or CSV row) is dropped, as files joined with cat
carry them. Lines end in \\n or \\r\\n: a carriage return alone (classic Mac, Excel for Mac
CSV) would merge records, so a file whose lines all end so refuses the file (a CSV one at
its header row), and a JSON-lines or text line, or a CSV row outside quotes, holding one
fails (one ending the file's last line merges nothing and is dropped).

A shard is a contiguous record range of ONE file. Planning makes one streaming pass
over each text file and keeps only the byte offset of every `shard_size`-th record, so
memory grows with the number of shards, not of records; a worker then reads just its
byte slice. Parquet needs no pass: its footer gives the row count, and a worker reads
only the row groups its rows fall in. For gzip files the offsets are positions in the
decompressed stream, so each worker decompresses from the start of the file up to its
slice: fine for manifests of modest size, slow for huge ones (use plain text or Parquet).

Record numbers (`index`) count records from 0 in each file and ignore blank lines;
`line` is the 1-based physical line a record starts on (the row number for Parquet).
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import os
import posixpath
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

from jaxdiff import storage

# Extension -> format name. Order matters only for readability.
_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".txt": "txt", ".parquet": "parquet"}
_GZIP_FORMATS = ("jsonl", "csv", "txt")
_READ_BUFFER = 1 << 20
_BOM = b"\xef\xbb\xbf"
# Converts only the lone carriage returns, so CRLF line ends stay as they are.
_CR_FIX = "lines must end in \\n or \\r\\n: convert the file, e.g. perl -pe 's/\\r(?!\\n)/\\n/g' old > new"


KNOWN_FIELDS = frozenset({
    "id", "prompt", "negative_prompt", "seed", "guidance", "steps", "width", "height",
    "num_images", "mode", "init_image", "mask", "strength", "outpaint", "sampler",
})
_FIELD_SPELLINGS = {re.sub(r"[\s_-]", "", name): name for name in KNOWN_FIELDS}


class ManifestError(ValueError):
    """A whole-run problem: a pattern matching nothing, an unreadable file, an unknown format."""


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """Records [first_record, end_record) of one manifest file.

    byte_start / byte_end bound the slice in the (decompressed) file for the text formats;
    they are None for Parquet, whose slice is the row range itself. first_line is the
    physical line the slice's first record starts on, so failures can name their line.
    """

    index: int
    name: str
    file: str
    format: str
    first_record: int
    end_record: int
    byte_start: int | None
    byte_end: int | None
    first_line: int = 1

    @property
    def num_records(self) -> int:
        return self.end_record - self.first_record


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """One record as read, before validation: its fields, or why they could not be parsed."""

    source: str                      # the manifest file
    line: int                        # 1-based physical line (Parquet: row number)
    index: int                       # 0-based record number within the file
    fields: dict[str, Any] | None    # None when the record could not be parsed
    error: str | None = None         # the parse error; fields then hold at most the id it plainly gives
    text: str | None = None          # the raw line(s) for text formats


def field_meant(name: str) -> str | None:
    """The known field a name differs from only in case, spaces, hyphens or underscores
    ("Seed", "negative-prompt"), else None. Such a name is a mistake: as unknown fields
    pass through as metadata, the record would take the default for the field meant."""
    if name in KNOWN_FIELDS or name.strip().startswith("_") or name.strip().endswith("_"):
        return None  # "_id" is another system's field (MongoDB, Elasticsearch exports), not ours
    return _FIELD_SPELLINGS.get(re.sub(r"[\s_-]", "", name).lower())


def _refuse_misnamed_columns(where: str, columns: list[str]) -> None:
    """A CSV or Parquet column named off a field (`field_meant`) refuses the file: every
    record would take the default for the field meant. `where` starts the message."""
    for column in columns:
        meant = field_meant(column)
        if meant:
            raise ManifestError(f"{where} {column!r}, which looks like the field {meant!r}: rename the column "
                                f"{meant} (field names are exact; as it is, it would pass through as metadata)")


def file_format(path: str) -> tuple[str, bool]:
    """(format, gzipped) for a manifest path, or ManifestError naming the path."""
    name = path.lower()
    gzipped = name.endswith(".gz")
    if gzipped:
        name = name[:-3]
    fmt = _FORMATS.get(os.path.splitext(name)[1])
    if fmt is None or (gzipped and fmt not in _GZIP_FORMATS):
        raise ManifestError(
            f"{path}: unknown manifest format; use .jsonl, .json (JSON lines), .csv, .txt "
            f"(each optionally .gz) or .parquet")
    return fmt, gzipped


# ----------------------------------------------------------------------------- files


def _glob_regex(pattern: str) -> re.Pattern:
    """Glob -> regex on object names: `*` and `?` stay within one folder, `**` crosses folders."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):  # zero or more folders, as glob's recursive `**/`
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            close = pattern.find("]", i + 1)
            if close < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:close]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = close
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _has_wildcard(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _expand_gcs(pattern: str) -> list[str]:
    bucket, _, name = pattern[len(storage.GCS_PREFIX):].partition("/")
    if not bucket or not name:
        raise ManifestError(f"{pattern!r} is not a gs://bucket/object pattern")
    client = storage.gcs_client()
    if client.bucket(bucket).blob(name).exists():  # an object named as it is, even with [ ] * ? in its name
        return [pattern]
    if not _has_wildcard(name):
        return []
    literal = re.split(r"[*?\[]", name, maxsplit=1)[0]
    regex = _glob_regex(name)
    return [f"gs://{bucket}/{blob.name}" for blob in client.list_blobs(bucket, prefix=literal)
            if not blob.name.endswith("/") and regex.match(blob.name)]


def _expand_local(pattern: str) -> list[str]:
    if os.path.isfile(pattern):  # a file named as it is, even with [ ] * ? in its name
        return [pattern]
    if not _has_wildcard(pattern):
        if os.path.isdir(pattern):
            raise ManifestError(f"{pattern} is a folder: name its files, e.g. {os.path.join(pattern, '*.jsonl')}")
        return [pattern] if os.path.isfile(pattern) else []
    return [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]


def expand_patterns(patterns: list[str]) -> list[str]:
    """Every manifest file the patterns name (paths or globs, local or gs://), sorted, once each.

    Raises ManifestError for a pattern that matches nothing and for a file of unknown format.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    if not patterns:
        raise ManifestError("no manifest given: name at least one file or glob pattern")
    files: dict[str, str] = {}  # where the file is -> the name it was first given by
    for pattern in map(str, patterns):
        try:
            matched = _expand_gcs(pattern) if storage.is_gcs(pattern) else _expand_local(pattern)
        except ManifestError:
            raise
        except Exception as e:  # listing failed: permissions, network, bad bucket name
            raise ManifestError(f"cannot list manifest pattern {pattern!r}: {e}") from e
        if not matched:
            raise ManifestError(f"manifest pattern {pattern!r} matches no file: check the path and the glob")
        for path in matched:
            file_format(path)
            # One file named two ways (x.jsonl, ./x.jsonl, an absolute path) is read once.
            files.setdefault(path if storage.is_gcs(path) else os.path.realpath(path), path)
    return sorted(files.values())


class _RangeFile(io.RawIOBase):
    """A seekable binary file over storage's byte-range reader (local or gs://)."""

    def __init__(self, path: str):
        self._reader = storage.open_reader(path)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._reader.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._reader.size - self._pos))
        if n:
            buffer[:n] = self._reader.read(self._pos, n)
            self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
        super().close()


def _open(path: str, gzipped: bool = False):
    """A buffered binary stream of the file (decompressed for gzip); ManifestError if unreadable."""
    try:
        stream = io.BufferedReader(_RangeFile(path), buffer_size=_READ_BUFFER)
    except FileNotFoundError as e:
        raise ManifestError(f"manifest file {path} does not exist") from e
    except Exception as e:
        raise ManifestError(f"cannot open manifest file {path}: {e}") from e
    return gzip.GzipFile(fileobj=stream, mode="rb") if gzipped else stream


# ----------------------------------------------------------------------------- text formats


def _lines(stream, offset: int, line: int) -> Iterator[tuple[int, int, int, bytes]]:
    """(start offset, end offset, line number, bytes) for each physical line from the stream's position."""
    for raw in stream:
        end = offset + len(raw)
        if raw.startswith(_BOM):
            # A UTF-8 byte-order mark is no part of a record: at the file's start, or at
            # any line's where files were joined with cat.
            raw = raw[len(_BOM):]
        yield offset, end, line, raw
        offset, line = end, line + 1


def _line_records(fmt: str, source: str, stream, offset: int, line: int, index: int
                  ) -> Iterator[tuple[int, RawRecord]]:
    """(start offset, record) for JSON-lines and plain-text files; blank lines are not records."""
    for start, _, number, raw in _lines(stream, offset, line):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            yield start, RawRecord(source, number, index, _plain_id(text) if fmt == "jsonl" else None,
                                   f"line is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                   f"of the line): save the file as UTF-8", text)
            index += 1
            continue
        if "\r" in text:
            # A \r alone ends a line in some editors: the line may hold several records.
            yield start, RawRecord(source, number, index, _plain_id(text) if fmt == "jsonl" else None,
                                   f"line holds a carriage return (\\r) alone; {_CR_FIX}", text)
        elif fmt == "txt" and "\0" in text:  # JSON refuses control characters on its own
            yield start, RawRecord(source, number, index, None, "line holds a NUL byte, which no prompt has (the "
                                   "file may be UTF-16 text or not text): save it as UTF-8", text)
        elif fmt == "txt":
            yield start, RawRecord(source, number, index, {"prompt": text.strip()}, None, text)
        else:
            try:
                value = json.loads(text, object_pairs_hook=_object_once)
            except _RepeatedKey as e:
                key = e.args[0]
                yield start, RawRecord(source, number, index, None if key == "id" else _plain_id(text),
                                       f"key {key!r} is given more than once, and JSON would keep only the "
                                       f"last: keep one", text)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, ints past Python's digit limit
                yield start, RawRecord(source, number, index, None, f"malformed JSON: {e}", text)
            else:
                if isinstance(value, dict):
                    yield start, RawRecord(source, number, index, value, None, text)
                else:
                    yield start, RawRecord(source, number, index, None,
                                           f"line is JSON {type(value).__name__}, not an object: "
                                           f'write one object a line, e.g. {{"prompt": "..."}}', text)
        index += 1


class _RepeatedKey(ValueError):
    """A JSON object naming a key twice (args[0]): json.loads would silently keep the last."""


def _object_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook: the object, or _RepeatedKey for a key given twice."""
    value = dict(pairs)
    if len(value) < len(pairs):
        seen: set[str] = set()
        raise _RepeatedKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return value


def _plain_id(text: str) -> dict[str, Any] | None:
    """{"id": its id} for a JSON line that fails for another reason, where the id reads
    plainly, so the failure names the record by its own id."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    given = value.get("id") if isinstance(value, dict) else None
    if isinstance(given, (str, int, float)) and "\ufffd" not in str(given):  # U+FFFD: a byte not UTF-8
        return {"id": given}
    return None


class _CsvLines:
    """Feeds decoded lines to csv.reader while remembering where the rows start and end."""

    def __init__(self, stream, offset: int, line: int):
        self._lines = _lines(stream, offset, line)
        self.end = offset          # byte offset just past the last line handed out
        self.next_line = line      # line number of the next line to hand out
        self.bad_byte: int | None = None  # the row's first byte that is not UTF-8
        self.texts: list[str] = []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        start, self.end, number, raw = next(self._lines)
        if self.end - start > len(raw) and any(t.strip() for t in self.texts):
            raw = _BOM + raw  # a line inside a quoted cell: its U+FEFF is the cell's own
        self.next_line = number + 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.bad_byte is None:
                self.bad_byte = raw[e.start]
            text = raw.decode("utf-8", "replace")
        self.texts.append(text)
        return text


class _CsvRow(NamedTuple):
    start: int             # byte offset where the previous row ended
    end: int               # byte offset just past this row
    line: int              # line the row begins on
    next_line: int         # line just past this row
    text: str              # the row's raw text
    cells: list[str] | None  # None when error
    error: str | None
    bad_byte: int | None   # the first byte that is not UTF-8 (its cell then holds U+FFFD)


def _csv_rows(source: str, stream, offset: int, line: int) -> Iterator[_CsvRow]:
    """Each non-blank CSV row from the stream's position.

    A row starts where the previous one ended, so a slice that begins there parses
    exactly as the whole file does. Parsing is strict (a closing quote must be followed
    by a comma or the line end), since the lenient parser reads a stray quote into the
    cell, or an unclosed one through the rest of the file, without a word.

    A quoting error on one line fails that row. One in a row that runs over several lines
    raises ManifestError: the lines after the bad quote were read into that row, so their
    records can no longer be told apart, and failing them as one record would lose them.
    Planning reads every row, so such a file is refused before anything renders.
    """
    feed = _CsvLines(stream, offset, line)
    reader = csv.reader(feed, strict=True)
    while True:
        start, number = feed.end, feed.next_line
        feed.bad_byte, feed.texts = None, []
        try:
            cells, error = next(reader), None
        except StopIteration:
            return
        except csv.Error as e:
            cells, error = None, str(e)
        if cells is not None and not any(cell.strip() for cell in cells):
            continue  # a blank line
        # The row begins on the first non-blank line the reader took.
        skipped = next((i for i, t in enumerate(feed.texts) if t.strip()), 0)
        quote_fix = 'close the quote, and write a quote inside a quoted cell as two ("")'
        if error and "new-line character" in error:  # csv's words for a \r alone outside quotes
            # Fails the row; in the header row (where a file whose rows end in \r alone, as
            # Excel for Mac writes them, stops) it refuses the file (_csv_header).
            error = (f"malformed CSV: a carriage return (\\r) alone outside quotes: quote a cell that holds "
                     f"one; {_CR_FIX}")
        elif error and len(feed.texts) - skipped > 1:
            raise ManifestError(f"{source} line {number + skipped}: a quote opened in the CSV row starting on this "
                                f"line is not closed where it should be, so lines {number + skipped} to "
                                f"{feed.next_line - 1} read as one row ({error}): {quote_fix}")
        elif error:
            error = (f"malformed CSV ({error}): " + (f"keep each cell under {csv.field_size_limit()} characters"
                                                    if "field limit" in error else quote_fix))
        text = "".join(feed.texts[skipped:]).rstrip("\r\n")
        yield _CsvRow(start, feed.end, number + skipped, feed.next_line, text, cells, error, feed.bad_byte)


def _csv_header(source: str, stream) -> tuple[list[str], int, int]:
    """(column names, byte offset just past the header row, line just past it)."""
    for row in _csv_rows(source, stream, 0, 1):
        if row.error:
            raise ManifestError(f"{source} line {row.line}: cannot read the CSV header row: {row.error}")
        if row.bad_byte is not None:
            raise ManifestError(f"{source} line {row.line}: the CSV header row is not valid UTF-8 "
                                f"(byte 0x{row.bad_byte:02x}): save the file as UTF-8")
        columns = [c.strip() for c in row.cells]
        _refuse_misnamed_columns(f"{source}: the CSV header names", columns)
        if "prompt" not in columns:
            raise ManifestError(
                f"{source}: the CSV header row has no 'prompt' column (columns: {', '.join(columns)}); "
                f"the first row must name the fields, e.g. id,prompt,seed")
        duplicated = sorted({c for c in columns if c and columns.count(c) > 1})
        if duplicated:
            raise ManifestError(f"{source}: the CSV header names {', '.join(duplicated)} more than once")
        return columns, row.end, row.next_line
    raise ManifestError(f"{source}: the CSV file is empty; it needs a header row naming the fields")


def _csv_records(source: str, stream, columns: list[str], offset: int, line: int, index: int
                 ) -> Iterator[tuple[int, RawRecord]]:
    """(start offset, record) for the data rows of a CSV file."""
    for row in _csv_rows(source, stream, offset, line):
        error, plain_id = row.error, None
        if not error and row.bad_byte is not None:
            cells = dict(zip(columns, row.cells)) if len(row.cells) == len(columns) else {}
            bad = [repr(c) for c, v in cells.items() if c and "\ufffd" in v]  # U+FFFD: a byte not UTF-8
            error = (f"row is not valid UTF-8 (byte 0x{row.bad_byte:02x}"
                     f"{' in column ' + ', '.join(bad) if bad else ''}): save the file as UTF-8")
            if cells.get("id") and "\ufffd" not in cells["id"]:
                plain_id = {"id": cells["id"]}  # so the failure names the record by its own id
        elif not error and len(row.cells) != len(columns):
            error = (f"row has {len(row.cells)} fields but the header names {len(columns)}: "
                     f"quote fields that contain commas")
        elif not error and [c.strip() for c in row.cells] == columns:
            error = ("row repeats the header row, as where CSV files were joined with cat: remove it, or "
                     "join the files without their header rows (tail -n +2)")
        elif not error:
            # Spreadsheets export trailing unnamed columns; they must stay empty.
            unnamed = [i + 1 for i, (c, v) in enumerate(zip(columns, row.cells)) if not c and v.strip()]
            if unnamed:
                error = (f"column {unnamed[0]} has a value but no name in the header row: name it there, "
                         f"or leave its cells empty")
        if error:
            yield row.start, RawRecord(source, row.line, index, plain_id, error, row.text)
        else:
            # CSV has no null: an empty cell means the field is absent.
            fields = {c: v for c, v in zip(columns, row.cells) if c and v != ""}
            yield row.start, RawRecord(source, row.line, index, fields, None, row.text)
        index += 1


def _text_records(fmt: str, source: str, stream, offset: int, line: int, index: int,
                  columns: list[str] | None) -> Iterator[tuple[int, RawRecord]]:
    if fmt == "csv":
        return _csv_records(source, stream, columns, offset, line, index)
    return _line_records(fmt, source, stream, offset, line, index)


def _record_starts(fmt: str, source: str, stream, offset: int, line: int,
                   columns: list[str] | None) -> Iterator[tuple[int, int]]:
    """(start offset, line) of each record, as _text_records finds them, without parsing JSON."""
    if fmt == "csv":
        for start, record in _csv_records(source, stream, columns, offset, line, 0):
            yield start, record.line
        return
    for start, _, number, raw in _lines(stream, offset, line):
        if raw.strip():  # the same test _line_records uses to skip blank lines
            yield start, number


def _refuse_utf16(path: str, head: bytes) -> None:
    """UTF-16 (Windows PowerShell's default) or UTF-32 text would read as prompts full of
    NULs: say so up front."""
    for encoding, boms in (("UTF-32", (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)),
                           ("UTF-16", (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))):
        if head.startswith(boms):
            raise ManifestError(f"{path} is {encoding} text (Windows PowerShell writes UTF-16 by default): save "
                                f"it as UTF-8, e.g. iconv -f {encoding} -t UTF-8 old > new")
    if b"\0" in head:
        raise ManifestError(f"{path} holds NUL bytes, so it is not UTF-8 text (UTF-16 or UTF-32 without a "
                            f"byte-order mark, or not text at all): save it as UTF-8")


def _refuse_cr_line_ends(path: str, head: bytes) -> None:
    """Lines ended by \\r alone (classic Mac) would all read as one record: say so up front."""
    if b"\r" in head and b"\n" not in head:
        raise ManifestError(f"{path}: its lines end in a carriage return (\\r) alone; {_CR_FIX}")


def _refuse_json_document(path: str, head: bytes) -> None:
    """A .json file holding one array, or objects pretty-printed over several lines, is a
    common mix-up with JSON Lines (each of its lines would fail on its own): say so up front."""
    body = head.lstrip(_BOM + b" \t\r\n")
    if body.startswith(b"["):
        raise ManifestError(f"{path} holds a JSON array; write one JSON object a line (JSON Lines)")
    if not body.startswith(b"{"):
        return
    # Spread over lines: the first object ends past its first line, or (cut off in the
    # head, or broken) that line is a lone brace. A broken first record of a JSON Lines
    # file is not refused: it fails on its own.
    text = body.decode("utf-8", "replace")
    try:
        end = json.JSONDecoder().raw_decode(text)[1]
    except (ValueError, RecursionError):
        end = len(text) if text.split("\n", 1)[0].strip() == "{" else 0
    if "\n" in text[:end]:
        raise ManifestError(f"{path} holds a JSON object spread over several lines (pretty-printed); write "
                            f"one JSON object a line (JSON Lines), e.g. jq -c . old.json > new.jsonl")


# ----------------------------------------------------------------------------- Parquet


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    stream = _open(path)
    try:
        parquet = pq.ParquetFile(stream)
    except Exception as e:
        stream.close()
        raise ManifestError(f"cannot read Parquet file {path}: {e}") from e
    try:
        _refuse_misnamed_columns(f"{path}: the Parquet file has a column", parquet.schema_arrow.names)
    except ManifestError:
        stream.close()
        raise
    if "prompt" not in parquet.schema_arrow.names:
        stream.close()
        raise ManifestError(f"{path}: the Parquet file has no 'prompt' column "
                            f"(columns: {', '.join(parquet.schema_arrow.names)})")
    return parquet, stream


def _parquet_records(spec: ShardSpec) -> Iterator[RawRecord]:
    """The rows of a shard, reading only the row groups they fall in, a batch at a time."""
    parquet, stream = _parquet_file(spec.file)
    with stream:
        metadata = parquet.metadata
        groups, group_start = [], 0
        for g in range(metadata.num_row_groups):
            rows = metadata.row_group(g).num_rows
            if group_start < spec.end_record and group_start + rows > spec.first_record:
                groups.append(g)
            group_start += rows
        if group_start < spec.end_record:
            raise ManifestError(f"{spec.file} holds {group_start} rows, fewer than planned for {spec.name} "
                                f"(up to row {spec.end_record}): it changed since the run was planned")
        row = sum(metadata.row_group(g).num_rows for g in range(groups[0]))
        for batch in parquet.iter_batches(batch_size=1024, row_groups=groups):
            for fields in batch.to_pylist():
                if spec.first_record <= row < spec.end_record:
                    # Parquet has nulls: a null field is absent.
                    present = {k: v for k, v in fields.items() if v is not None}
                    yield RawRecord(spec.file, row + 1, row, present)
                row += 1
                if row >= spec.end_record:
                    return


# ----------------------------------------------------------------------------- plan and read


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def plan_shards(files: list[str], shard_size: int) -> list[ShardSpec]:
    """Cuts every file into shards of `shard_size` records (the last of each file may be shorter).

    Shard indices run over all files in the order given (expand_patterns sorts them), so
    the same manifest files always give the same plan. Text files are read once, keeping
    only every `shard_size`-th record's offset; Parquet files only have their footer read.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ManifestError(f"shard_size must be a positive integer, got {shard_size!r}")
    shards: list[ShardSpec] = []

    def add(path, fmt, first, end, byte_start, byte_end, first_line):
        shards.append(ShardSpec(len(shards), _shard_name(len(shards)), path, fmt, first, end,
                                byte_start, byte_end, first_line))

    for path in files:
        fmt, gzipped = file_format(path)
        if fmt == "parquet":
            parquet, stream = _parquet_file(path)
            with stream:
                rows = parquet.metadata.num_rows
            for first in range(0, rows, shard_size):
                add(path, fmt, first, min(first + shard_size, rows), None, None, first + 1)
            continue
        try:
            with _open(path, gzipped) as stream:
                columns, offset, line = None, 0, 1
                # The file's first MiB, which the checks below read, left in the stream's buffer.
                head = stream.peek(_READ_BUFFER)[:_READ_BUFFER] if hasattr(stream, "peek") else b""
                _refuse_utf16(path, head)
                _refuse_cr_line_ends(path, head)
                if fmt == "csv":
                    columns, offset, line = _csv_header(path, stream)
                    stream.seek(offset)
                elif fmt == "jsonl":
                    _refuse_json_document(path, head)
                # (record number, offset, line) of the first record of each shard.
                starts: list[tuple[int, int, int]] = []
                count = 0
                for start, record_line in _record_starts(fmt, path, stream, offset, line, columns):
                    if count % shard_size == 0:
                        starts.append((count, start, record_line))
                    count += 1
                end_offset = stream.tell()  # the records were read to the end
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise ManifestError(f"cannot read manifest file {path}: {e}") from e
        for k, (first, byte_start, first_line) in enumerate(starts):
            if k + 1 < len(starts):
                byte_end = starts[k + 1][1]
            else:
                byte_end = end_offset
            add(path, fmt, first, min(first + shard_size, count), byte_start, byte_end, first_line)
    return shards


def read_shard(spec: ShardSpec) -> Iterator[RawRecord]:
    """The records of one shard, reading only its slice of the file (see the module notes on gzip).

    Raises ManifestError when the file no longer holds the records the plan expects.
    """
    if spec.format == "parquet":
        yield from _parquet_records(spec)
        return
    _, gzipped = file_format(spec.file)
    count = 0
    try:
        with _open(spec.file, gzipped) as stream:
            columns = None
            if spec.format == "csv":
                columns, _, _ = _csv_header(spec.file, stream)
            stream.seek(spec.byte_start)
            for _, record in _text_records(spec.format, spec.file, stream, spec.byte_start,
                                           spec.first_line, spec.first_record, columns):
                yield record
                count += 1
                if count == spec.num_records:
                    return
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ManifestError(f"cannot read manifest file {spec.file}: {e}") from e
    raise ManifestError(f"{spec.file} holds fewer records than planned for {spec.name} "
                        f"({count} of {spec.num_records}): it changed since the run was planned")


def manifest_fingerprint(files: list[str]) -> str:
    """sha256 over each file's name, size and content digest, in order.

    A resumed run compares it with the one stored beside its output and refuses a
    changed manifest, whose shards would no longer mean the same records. Names are
    base names, so a manifest moved to another folder keeps its fingerprint. The content
    digest is the object's stored CRC32C / MD5 on gs:// (no download) and a sha256 of
    the bytes for local files.
    """
    total = hashlib.sha256()
    for path in files:
        if storage.is_gcs(path):
            bucket, _, name = path[len(storage.GCS_PREFIX):].partition("/")
            blob = storage.gcs_client().bucket(bucket).get_blob(name)
            if blob is None:
                raise ManifestError(f"manifest file {path} does not exist")
            size, digest = blob.size, f"crc32c:{blob.crc32c}:md5:{blob.md5_hash}"
        else:
            try:
                size, content = os.path.getsize(path), hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(_READ_BUFFER), b""):
                        content.update(chunk)
            except OSError as e:
                raise ManifestError(f"cannot read manifest file {path}: {e}") from e
            digest = content.hexdigest()
        name = posixpath.basename(path) if storage.is_gcs(path) else os.path.basename(path)
        total.update(json.dumps([name, size, digest]).encode() + b"\n")
    return "sha256:" + total.hexdigest()
