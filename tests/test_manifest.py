"""Prompt manifests: formats, globs, gs://, shard plans, validation failures, init images."""

from __future__ import annotations

import gzip
import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jaxdiff.engine.sample import derive_seed
from pipelines.manifest import (
    Failure,
    ManifestError,
    RenderDefaults,
    expand_patterns,
    load_image,
    load_mask,
    manifest_fingerprint,
    plan_shards,
    read_shard,
    to_samples,
)

DEFAULTS = RenderDefaults(width=128, height=64, steps=3, guidance=5.0, seed=11)
PROMPTS = ["a red circle", "two blue squares, left", 'a "quoted" star', "ünïcode triangle", "a green ring"]


def _write_jsonl(path, records, blank_every=0):
    with open(path, "w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            if blank_every and i % blank_every == 0:
                f.write("\n")
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def _write_csv(path, header, rows):
    import csv

    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def _read_all(files, shard_size):
    return [record for shard in plan_shards(files, shard_size) for record in read_shard(shard)]


def _samples(record, defaults=DEFAULTS):
    out = to_samples(record, defaults)
    assert isinstance(out, list), out
    return out


def _png_bytes(array, fmt="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


# ----------------------------------------------------------------------------- formats


def test_all_formats_give_the_same_records(tmp_path):
    jsonl = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS], blank_every=2)
    csv_path = _write_csv(tmp_path / "p.csv", ["prompt"], [[p] for p in PROMPTS])
    txt = tmp_path / "p.txt"
    txt.write_text("\n".join(PROMPTS[:2]) + "\n\n  \n" + "\n".join(PROMPTS[2:]), encoding="utf-8")  # no final newline
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS}), parquet, row_group_size=2)
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(open(jsonl, "rb").read()))
    csv_gz = tmp_path / "p.csv.gz"
    csv_gz.write_bytes(gzip.compress(open(csv_path, "rb").read()))

    for path in (jsonl, csv_path, str(txt), str(parquet), str(gz), str(csv_gz)):
        records = _read_all([path], 2)
        assert [r.fields["prompt"] for r in records] == PROMPTS, path
        assert [r.index for r in records] == list(range(5)), path
        assert all(r.error is None for r in records)
    # Lines are physical lines: blank lines in JSONL / text shift them, the CSV header is line 1.
    assert [r.line for r in _read_all([jsonl], 2)] == [2, 3, 5, 6, 8]
    assert [r.line for r in _read_all([str(txt)], 2)] == [1, 2, 5, 6, 7]
    assert [r.line for r in _read_all([csv_path], 2)] == [2, 3, 4, 5, 6]
    assert [r.line for r in _read_all([str(parquet)], 2)] == [1, 2, 3, 4, 5]


def test_csv_quoted_newlines_blank_rows_bom_and_crlf(tmp_path):
    path = tmp_path / "q.csv"
    path.write_bytes(b'\xef\xbb\xbfid,prompt,seed\r\na,"first\r\nsecond line",1\r\n\r\nb,"x, y",\r\nc,plain,3\r\n')
    records = _read_all([str(path)], 1)
    assert [(r.fields["id"], r.fields["prompt"], r.line) for r in records] == [
        ("a", "first\r\nsecond line", 2), ("b", "x, y", 5), ("c", "plain", 6)]
    assert "seed" not in records[1].fields  # an empty cell is an absent field
    assert [s.seed for r in records for s in _samples(r)][::2] == [1, 3]


def test_byte_order_marks_of_files_joined_with_cat_are_not_read_as_text(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "c.txt").write_bytes(bom + b"one\ntwo\n" + bom + b"three\n" + bom + b"\n")
    assert [r.fields["prompt"] for r in _read_all([str(tmp_path / "c.txt")], 2)] == ["one", "two", "three"]
    (tmp_path / "c.jsonl").write_bytes(bom + b'{"id": "a", "prompt": "one"}\n' + bom + b'{"id": "b", "prompt": "two"}\n')
    assert [(r.fields["id"], r.line) for r in _read_all([str(tmp_path / "c.jsonl")], 1)] == [("a", 1), ("b", 2)]
    # Joined CSV files repeat their header row; a U+FEFF starting a line inside a quoted cell is the cell's own.
    (tmp_path / "c.csv").write_bytes(bom + b'id,prompt\na,one\n' + bom + b'id,prompt\nb,"two\n' + bom + b'lines"\n')
    a, header, b = (to_samples(r, DEFAULTS) for r in _read_all([str(tmp_path / "c.csv")], 2))
    assert [s.prompt for s in a + b] == ["one", "two\n\ufefflines"]
    assert isinstance(header, Failure) and header.line == 3 and header.reason == (
        "row repeats the header row, as where CSV files were joined with cat: remove it, or join the files "
        "without their header rows (tail -n +2)")


def test_unknown_fields_pass_through_and_defaults_fill_in(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [
        {"id": "k1", "prompt": "a circle", "style": {"palette": "warm"}, "split": "train", "sampler": "Euler_A"},
        {"id": "k2", "prompt": "a square", "negative_prompt": "blur", "guidance": 2, "steps": 2,
         "width": 64, "height": 192, "seed": 5, "mode": None, "strength": None},  # null = absent
    ])
    first, second = (_samples(r)[0] for r in _read_all([path], 10))
    assert first.metadata == {"style": {"palette": "warm"}, "split": "train"}
    assert first.sampler == "euler_a" and second.sampler is None  # None: the run's sampler
    assert (first.width, first.height, first.steps, first.guidance) == (128, 64, 3, 5.0)
    assert first.seed == derive_seed(11, "k1") and first.mode == "txt2img" and first.strength is None
    assert (second.negative_prompt, second.guidance, second.steps, second.width, second.height, second.seed) == (
        "blur", 2.0, 2, 64, 192, 5)


@pytest.mark.faults
def test_a_field_name_off_only_in_case_spaces_or_hyphens_is_a_mistake(tmp_path):
    # As metadata, "Seed" would pass through while the record renders with the run's seed.
    path = _write_jsonl(tmp_path / "k.jsonl", [
        {"id": "j1", "prompt": "p", "Seed": 5}, {"id": "j2", "prompt": "p", "negative-prompt": "blur"},
        {"id": "j3", "prompt": "p", "Seeds": 1, "seed_note": "kept", "_id": {"$oid": "65a1"}, "mask_": 1}])
    j1, j2, j3 = (to_samples(r, DEFAULTS) for r in _read_all([path], 5))
    assert (j1.id, j1.line, j1.reason) == ("j1", 1, "field 'Seed' looks like 'seed': write it seed (field names are "
                                                   "exact; as it is, it would pass through as metadata)")
    assert j2.id == "j2" and j2.reason.startswith("field 'negative-prompt' looks like 'negative_prompt'")
    # Unknown fields still pass through, another system's "_id" (MongoDB, Elasticsearch) too.
    assert j3[0].metadata == {"Seeds": 1, "seed_note": "kept", "_id": {"$oid": "65a1"}, "mask_": 1}
    csv_path = _write_csv(tmp_path / "k.csv", ["id", "prompt", " Guidance"], [["c1", "p", "3"]])
    with pytest.raises(ManifestError) as refused:
        plan_shards([csv_path], 5)
    assert str(refused.value) == (f"{csv_path}: the CSV header names 'Guidance', which looks like the field "
                                  f"'guidance': rename the column guidance (field names are exact; as it is, it "
                                  f"would pass through as metadata)")
    with pytest.raises(ManifestError, match="the CSV header names 'Prompt', which looks like the field 'prompt'"):
        plan_shards([_write_csv(tmp_path / "p.csv", ["Prompt"], [["p"]])], 5)  # not "no 'prompt' column"
    pq.write_table(pa.table({"prompt": ["p"], "Num Images": [2]}), tmp_path / "k.parquet")
    with pytest.raises(ManifestError, match=r"k\.parquet: the Parquet file has a column 'Num Images', which looks "
                                            r"like the field 'num_images': rename the column num_images"):
        plan_shards([str(tmp_path / "k.parquet")], 5)


def test_num_images_variants_have_own_ids_and_seeds(tmp_path):
    path = _write_jsonl(tmp_path / "v.jsonl", [
        {"id": "cat", "prompt": "a cat", "num_images": 3},
        {"id": "dog", "prompt": "a dog", "num_images": "2", "seed": 4294967295},
    ])
    cats, dogs = (_samples(r) for r in _read_all([path], 10))
    assert [s.id for s in cats] == ["cat", "cat_1", "cat_2"]
    assert [s.seed for s in cats] == [derive_seed(11, i) for i in ("cat", "cat_1", "cat_2")]
    assert [(s.id, s.seed) for s in dogs] == [("dog", 4294967295), ("dog_1", 0)]


# ----------------------------------------------------------------------------- files, globs, gs://


def test_globs_several_files_sorted_once_each(tmp_path):
    for name in ("b.jsonl", "a.csv", "sub/c.txt", "sub/deep/d.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b"}])
    _write_csv(tmp_path / "a.csv", ["prompt"], [["a"]])
    (tmp_path / "sub/c.txt").write_text("c\n")
    pq.write_table(pa.table({"prompt": ["d"]}), tmp_path / "sub/deep/d.parquet")
    files = expand_patterns([str(tmp_path / "*.jsonl"), str(tmp_path / "**/*.*"), str(tmp_path / "a.csv")])
    assert files == sorted(str(tmp_path / n) for n in ("a.csv", "b.jsonl", "sub/c.txt", "sub/deep/d.parquet"))
    assert [r.fields["prompt"] for r in _read_all(files, 1)] == ["a", "b", "c", "d"]
    # A glob matching a folder beside the files (sub) names the files only.
    assert expand_patterns([str(tmp_path / "*")]) == [str(tmp_path / "a.csv"), str(tmp_path / "b.jsonl")]
    # One file named two ways is read once, under the first name given.
    again = expand_patterns([str(tmp_path / "b.jsonl"), str(tmp_path / "sub" / ".." / "b.jsonl")])
    assert again == [str(tmp_path / "b.jsonl")]


@pytest.mark.faults
def test_pattern_matching_nothing_names_it(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a"}])
    missing = str(tmp_path / "nothing-*.jsonl")
    with pytest.raises(ManifestError, match="nothing-"):
        expand_patterns([str(tmp_path / "a.jsonl"), missing])
    with pytest.raises(ManifestError, match="absent.jsonl"):
        expand_patterns([str(tmp_path / "absent.jsonl")])
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ManifestError, match=r"notes\.md: unknown manifest format"):
        expand_patterns([str(tmp_path / "*")])
    with pytest.raises(ManifestError, match="is a folder"):
        expand_patterns([str(tmp_path)])


def test_gcs_manifest_with_relative_init_image(gcs_bucket):
    from jaxdiff import storage

    bucket = storage.gcs_client().bucket(gcs_bucket)
    rgb = np.arange(48 * 3, dtype=np.uint8).reshape(4, 12, 3)
    bucket.blob("run1/images/init.png").upload_from_string(_png_bytes(rgb))
    lines = [{"id": f"g{i}", "prompt": f"gs prompt {i}"} for i in range(5)]
    lines[3] = {"id": "g3", "prompt": "from image", "mode": "img2img", "init_image": "../images/init.png"}
    bucket.blob("run1/m/a.jsonl").upload_from_string("\n".join(json.dumps(x) for x in lines) + "\n")
    table = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["pq0", "pq1", "pq2"], "seed": [1, None, 3]}), table, row_group_size=2)
    bucket.blob("run1/m/b.parquet").upload_from_string(table.getvalue())
    bucket.blob("run1/m/skip.txt.bak").upload_from_string("x")
    bucket.blob("run1/m/old/z.jsonl").upload_from_string('{"prompt": "a folder down"}\n')  # not matched by m/*
    bucket.blob("run1/odd/data[1].jsonl").upload_from_string('{"prompt": "bracketed"}\n')
    bucket.blob("run1/odd/q?x.jsonl").upload_from_string('{"prompt": "question"}\n')
    bucket.blob("run1/odd/qax.jsonl").upload_from_string('{"prompt": "another"}\n')
    # An object named as it is, glob characters and all; a glob where none is so named.
    assert expand_patterns([f"gs://{gcs_bucket}/run1/odd/data[1].jsonl"]) == [f"gs://{gcs_bucket}/run1/odd/data[1].jsonl"]
    assert expand_patterns([f"gs://{gcs_bucket}/run1/odd/q?x.jsonl"]) == [f"gs://{gcs_bucket}/run1/odd/q?x.jsonl"]
    assert expand_patterns([f"gs://{gcs_bucket}/run1/odd/qa?.jsonl"]) == [f"gs://{gcs_bucket}/run1/odd/qax.jsonl"]
    assert expand_patterns([f"gs://{gcs_bucket}/run1/odd/q[!a]x.jsonl"]) == [f"gs://{gcs_bucket}/run1/odd/q?x.jsonl"]

    with pytest.raises(ManifestError, match=r"gs://jaxdiff-test/run1/none/\*\.jsonl"):
        expand_patterns([f"gs://{gcs_bucket}/run1/none/*.jsonl"])
    assert expand_patterns([f"gs://{gcs_bucket}/run1/**/*.parquet"]) == [f"gs://{gcs_bucket}/run1/m/b.parquet"]
    assert expand_patterns([f"gs://{gcs_bucket}/run1/m/**/a.json?"]) == [f"gs://{gcs_bucket}/run1/m/a.jsonl"]
    files = expand_patterns([f"gs://{gcs_bucket}/run1/m/*.jsonl", f"gs://{gcs_bucket}/run1/m/b.parquet"])
    assert files == [f"gs://{gcs_bucket}/run1/m/a.jsonl", f"gs://{gcs_bucket}/run1/m/b.parquet"]
    shards = plan_shards(files, 2)
    assert [(s.name, s.first_record, s.end_record) for s in shards] == [
        ("shard-00000", 0, 2), ("shard-00001", 2, 4), ("shard-00002", 4, 5),
        ("shard-00003", 0, 2), ("shard-00004", 2, 3)]
    records = [r for s in shards for r in read_shard(s)]
    assert [r.fields["prompt"] for r in records] == [x["prompt"] for x in lines] + ["pq0", "pq1", "pq2"]
    assert records[6].fields == {"prompt": "pq1"}  # a null is an absent field
    sample = _samples(records[3])[0]
    np.testing.assert_array_equal(sample.init_image, rgb)
    before = manifest_fingerprint(files)
    assert manifest_fingerprint(files) == before and before.startswith("sha256:")
    # Changed content of the same size is a changed manifest, as it is locally.
    text = bucket.blob("run1/m/a.jsonl").download_as_bytes()
    bucket.blob("run1/m/a.jsonl").upload_from_string(text.replace(b"gs prompt 0", b"gs prompt 9"))
    assert manifest_fingerprint(files) != before
    # A relative path climbing out of the bucket is the record's mistake, named as such.
    from pipelines.manifest import RawRecord

    up = RawRecord(files[0], 7, 6, {"id": "up", "prompt": "p", "mode": "img2img", "init_image": "../../../x.png"})
    failure = to_samples(up, DEFAULTS)
    assert isinstance(failure, Failure) and failure.stage == "manifest"
    assert failure.reason == f"init_image '../../../x.png' points above the bucket gs://{gcs_bucket}"


# ----------------------------------------------------------------------------- shard plans


def _mixed_manifest(tmp_path, n=23):
    """Files with blank lines, a multi-line CSV cell, gzip and Parquet row groups."""
    records = [{"id": f"r{i}", "prompt": f"prompt {i}"} for i in range(n)]
    _write_jsonl(tmp_path / "a.jsonl", records, blank_every=3)
    _write_csv(tmp_path / "b.csv", ["id", "prompt"],
               [[f"c{i}", f"line one {i}\nline two" if i % 4 == 0 else f"c {i}"] for i in range(n)])
    txt = tmp_path / "c.txt.gz"
    txt.write_bytes(gzip.compress("".join(f"text {i}\n" + ("\n" if i % 5 == 0 else "") for i in range(n)).encode()))
    pq.write_table(pa.table({"prompt": [f"pq {i}" for i in range(n)]}), tmp_path / "d.parquet", row_group_size=4)
    return expand_patterns([str(tmp_path / "*")])


@pytest.mark.parametrize("shard_size", [1, 2, 3, 7, 23, 100])
def test_shard_slices_cover_every_record_once(tmp_path, shard_size):
    files = _mixed_manifest(tmp_path)
    whole = _read_all(files, 10_000)
    assert len(whole) == 4 * 23
    shards = plan_shards(files, shard_size)
    assert [s.index for s in shards] == list(range(len(shards)))
    assert all(0 < s.num_records <= shard_size for s in shards)
    sliced = []
    for shard in shards:
        got = list(read_shard(shard))
        assert [r.index for r in got] == list(range(shard.first_record, shard.end_record))
        assert {r.source for r in got} == {shard.file}
        sliced += got
    assert sliced == whole
    for path in files:  # each file's shards tile its byte range with no gap or overlap
        own = [s for s in shards if s.file == path]
        if own[0].format != "parquet":
            assert all(a.byte_end == b.byte_start for a, b in zip(own, own[1:]))


def test_plans_and_ids_are_stable_across_calls(tmp_path):
    path = _write_jsonl(tmp_path / "s.jsonl", [{"prompt": p} for p in PROMPTS])
    first, second = plan_shards([path], 2), plan_shards([path], 2)
    assert first == second
    ids = [[s.id for s in _samples(r)] for r in _read_all([path], 2)]
    assert ids == [[s.id for s in _samples(r)] for r in _read_all([path], 3)]
    assert len({i for group in ids for i in group}) == len(PROMPTS)


def test_derived_ids_follow_the_files_base_name_and_each_records_place(tmp_path):
    """A record without an id gets one from its file's base name, its record number and its
    prompt: a prompt given twice renders twice, and a manifest moved to another folder keeps
    its ids (and the images made under them)."""
    lines = ["a cat", "a cat", "a dog"]
    for folder in ("one", "two/deeper"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "p.txt").write_text("\n".join(lines) + "\n")
    ids = [[_samples(r)[0].id for r in _read_all([str(tmp_path / f / "p.txt")], 10)] for f in ("one", "two/deeper")]
    assert ids[0] == ids[1] and len(set(ids[0])) == 3


@pytest.mark.faults
def test_a_record_that_fails_to_read_keeps_its_place_in_the_numbering(tmp_path):
    """Record numbers count every record, unreadable ones too, so the ids derived after a
    bad line are the same whatever the shard size (a resumed or retried run finds them)."""
    (tmp_path / "b.txt").write_bytes(b"fine\n\xff broken\nafter\n")
    (tmp_path / "b.jsonl").write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n{"prompt": "after"}\n')
    for path in (str(tmp_path / "b.txt"), str(tmp_path / "b.jsonl")):
        whole, sliced = _read_all([path], 10), _read_all([path], 1)
        assert [r.index for r in whole] == [r.index for r in sliced] == [0, 1, 2], path
        assert _samples(whole[2])[0].id == _samples(sliced[2])[0].id


def test_fingerprint_follows_content(tmp_path):
    path = _write_jsonl(tmp_path / "f.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    before = manifest_fingerprint([path])
    assert manifest_fingerprint([path]) == before
    _write_jsonl(path, [{"prompt": "a"}, {"prompt": "c"}])  # same size, other content
    assert manifest_fingerprint([path]) != before


@pytest.mark.faults
def test_changed_file_is_refused_when_read(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": p} for p in PROMPTS])
    last = plan_shards([path], 2)[-1]
    _write_jsonl(path, [{"prompt": "only one"}])
    with pytest.raises(ManifestError, match="changed since"):
        list(read_shard(last))
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS}), table)
    last = plan_shards([str(table)], 2)[-1]
    pq.write_table(pa.table({"prompt": PROMPTS[:2]}), table)
    with pytest.raises(ManifestError, match="changed since"):
        list(read_shard(last))


@pytest.mark.faults
def test_file_level_mistakes_raise_manifest_errors(tmp_path):
    no_prompt = _write_csv(tmp_path / "n.csv", ["id", "text"], [["a", "b"]])
    with pytest.raises(ManifestError, match="no 'prompt' column"):
        plan_shards([no_prompt], 5)
    twice = _write_csv(tmp_path / "twice.csv", ["id", "prompt", "seed", "seed"], [["a", "b", "1", "2"]])
    with pytest.raises(ManifestError, match=r"twice\.csv: the CSV header names seed more than once$"):
        plan_shards([twice], 5)  # one of the two seeds would be dropped without a word
    array = tmp_path / "arr.json"
    array.write_text(json.dumps([{"prompt": "a"}]))
    with pytest.raises(ManifestError, match="JSON array"):
        plan_shards([str(array)], 5)
    with gzip.open(tmp_path / "arr.json.gz", "wt") as f:
        f.write(json.dumps([{"prompt": "a"}, {"prompt": "b"}], indent=1))  # read as broken records, before
    with pytest.raises(ManifestError, match="JSON array"):
        plan_shards([str(tmp_path / "arr.json.gz")], 5)
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(ManifestError, match="no 'prompt' column"):
        plan_shards([str(tmp_path / "c.parquet")], 5)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match="bad.parquet"):
        plan_shards([str(tmp_path / "bad.parquet")], 5)
    with pytest.raises(ManifestError, match="shard_size"):
        plan_shards([no_prompt], 0)
    with pytest.raises(ManifestError, match="does not exist"):
        plan_shards([str(tmp_path / "gone.jsonl")], 5)
    for name in ("mac.txt", "mac.jsonl", "mac.csv"):  # lines ended by \r alone would read as one record
        (tmp_path / name).write_bytes(b"prompt\ra cat\ra dog\r" if name.endswith("csv") else
                                      b'{"prompt": "a"}\r{"prompt": "b"}\r')
        with pytest.raises(ManifestError, match=r"carriage return \(\\r\) alone"):
            plan_shards([str(tmp_path / name)], 5)


@pytest.mark.faults
def test_pretty_printed_json_is_refused_saying_to_write_one_object_a_line(tmp_path):
    # Read as JSON Lines, each of its lines would fail on its own under a derived id.
    record = {"id": "p1", "prompt": "a cat", "seed": 3}
    (tmp_path / "one.json").write_text(json.dumps(record, indent=2) + "\n")
    (tmp_path / "stream.jsonl").write_text("\n".join(json.dumps(record, indent=1) for _ in range(2)))  # jq .
    (tmp_path / "cut.json.gz").write_bytes(gzip.compress(b'{\n  "prompt": "a cat",\n'))  # broken after a lone {
    for name in ("one.json", "stream.jsonl", "cut.json.gz"):
        with pytest.raises(ManifestError, match=rf"^{tmp_path / name} holds a JSON object spread over several "
                                                r"lines \(pretty-printed\); write one JSON object a line \(JSON "
                                                r"Lines\), e\.g\. jq -c \. old\.json > new\.jsonl$"):
            plan_shards([str(tmp_path / name)], 5)
    # A JSON Lines file whose first record is broken is read: that record fails on its own.
    path = _write_jsonl(tmp_path / "lines.jsonl", ['{"id": "b1", "prompt": "a cat"', json.dumps(record)])
    broken, good = (to_samples(r, DEFAULTS) for r in _read_all([path], 5))
    assert isinstance(broken, Failure) and "malformed JSON" in broken.reason and good[0].id == "p1"


@pytest.mark.faults
def test_a_utf16_or_utf32_file_is_refused_with_the_fix(tmp_path):
    # Windows PowerShell writes UTF-16 by default: read as UTF-8 its prompts would be full of NULs.
    (tmp_path / "ps.txt").write_text("a cat\r\na dog\r\n", encoding="utf-16")
    (tmp_path / "wide.csv").write_text("prompt\na cat\n", encoding="utf-32")
    (tmp_path / "nobom.jsonl").write_text('{"prompt": "a cat"}\n', encoding="utf-16-le")
    (tmp_path / "ps.txt.gz").write_bytes(gzip.compress((tmp_path / "ps.txt").read_bytes()))
    for name, encoding in (("ps.txt", "UTF-16"), ("wide.csv", "UTF-32"), ("ps.txt.gz", "UTF-16")):
        with pytest.raises(ManifestError, match=rf"^{tmp_path / name} is {encoding} text \(Windows PowerShell "
                                                rf"writes UTF-16 by default\): save it as UTF-8, e\.g\. iconv"):
            plan_shards([str(tmp_path / name)], 5)
    with pytest.raises(ManifestError, match=rf"^{tmp_path / 'nobom.jsonl'} holds NUL bytes, so it is not UTF-8 "
                                            r"text .*: save it as UTF-8$"):
        plan_shards([str(tmp_path / "nobom.jsonl")], 5)


@pytest.mark.faults
def test_a_text_line_holding_a_nul_byte_past_the_files_start_fails_that_line(tmp_path):
    # Past the first MiB that the file's encoding check reads.
    path = tmp_path / "long.txt"
    path.write_bytes(b"a cat\n" * 200_000 + b"a d\0g\n" + b"a bird\n")
    records = _read_all([str(path)], 1_000_000)
    assert [r.fields["prompt"] for r in records if r.fields][-1] == "a bird"
    (bad,) = [r for r in records if r.error]
    assert bad.line == 200_001 and "holds a NUL byte" in bad.error and "save it as UTF-8" in bad.error
    assert isinstance(to_samples(bad, DEFAULTS), Failure)


def test_a_file_named_with_glob_characters_is_that_file(tmp_path):
    path = _write_jsonl(tmp_path / "prompts [v2].jsonl", [{"prompt": "a"}])
    assert expand_patterns([path]) == [path]


# ----------------------------------------------------------------------------- bad records

BAD_RECORDS = [
    ('{"prompt": "unterminated', "malformed JSON"),
    ('["a list"]', "not an object"),
    ('{"id": "m1"}', "missing prompt"),
    ('{"prompt": "   "}', "empty prompt"),
    ('{"prompt": 7}', "prompt must be text"),
    ('{"prompt": "p", "seed": true}', "seed True is not an integer"),
    ('{"prompt": "p", "seed": 1.5}', "seed 1.5 is not an integer"),
    ('{"prompt": "p", "seed": "abc"}', "seed 'abc' is not an integer"),
    ('{"prompt": "p", "seed": -1}', "seed -1 is out of range"),
    ('{"prompt": "p", "width": 100, "height": 70}', "unsupported size 100x70: use multiples of 64 up to 2048"),
    ('{"prompt": "p", "width": 4096}', "unsupported size 4096x64"),
    ('{"prompt": "p", "guidance": "lots"}', "guidance 'lots' is not a finite number"),
    ('{"prompt": "p", "guidance": -2}', "guidance -2.0 is out of range"),
    ('{"prompt": "p", "steps": 0}', "steps 0 is out of range"),
    ('{"prompt": "p", "steps": 2.5}', "steps 2.5 is not an integer"),
    ('{"prompt": "p", "mode": "img2img", "init_image": "x.png", "strength": 1.5}', "strength 1.5 is out of range"),
    ('{"prompt": "p", "mode": "dream"}', "unknown mode 'dream'"),
    ('{"prompt": "p", "mode": "img2img"}', "mode img2img needs an init_image"),
    ('{"prompt": "p", "mode": "inpaint", "init_image": "x.png"}', "mode inpaint needs a mask"),
    ('{"prompt": "p", "mode": "outpaint", "init_image": "x.png"}', "mode outpaint needs outpaint pixels"),
    ('{"prompt": "p", "mode": "outpaint", "init_image": "x.png", "outpaint": [1, 2]}', "not four pixel counts"),
    ('{"prompt": "p", "init_image": "x.png"}', "init_image given but mode is txt2img"),
    ('{"prompt": "p", "strength": 0.5}', "strength given but mode is txt2img"),
    ('{"prompt": "p", "mode": "img2img", "init_image": "http://host/x.png"}', "only local paths and gs://"),
    # Not read as a path beside the manifest, which "does not exist" or is too long to open.
    ('{"prompt": "p", "mode": "img2img", "init_image": "data:image/png;base64,' + "iVBORw0KGgo" * 400 + '"}',
     "init_image 'data:image/png;base64,iVBORw0KGgoiVBORw0...' is a data: URI: only local paths and gs:// URLs "
     "are supported; write the image to a file and give its path"),
    ('{"prompt": "p", "num_images": 0}', "num_images 0 is out of range"),
    ('{"prompt": "p", "sampler": "plms"}', "unknown sampler 'plms'"),
    ('{"id": "../etc/passwd", "prompt": "p"}', "id '../etc/passwd' is not usable"),
    ('{"prompt": "p", "mode": "img2img", "init_image": "missing.png"}', "does not exist"),
    ('{"prompt": "p", "seed": 1' + "0" * 5000 + "}", "malformed JSON"),  # past Python's int digits
    ('{"prompt": "p", "guidance": 1' + "0" * 400 + "}", "guidance is a 401-digit integer, out of range"),
    ('{"prompt": "p", "mode": "img2img", "init_image": "x.png", "strength": -1' + "0" * 400 + "}",
     "strength is a 401-digit integer, out of range"),
    ('{"id": "half", "prompt": "a cat \\ud83d"}', "prompt holds a lone UTF-16 surrogate"),  # half a pair
    ('{"id": "' + "a" * 129 + '", "prompt": "p"}', "is not usable: use up to 128 letters"),
    ('{"prompt": "p", "num_images": 65}', "num_images 65 is out of range: use 1 to 64"),
    ('{"prompt": "p", "steps": 1001}', "steps 1001 is out of range: use 1 to 1000"),
    # A field the mode does not use is a mistake, not something to drop without a word.
    ('{"prompt": "p", "mode": "img2img", "init_image": "x.png", "mask": "x.png"}',
     "mask given but mode is img2img: masks are for mode inpaint"),
    ('{"prompt": "p", "mode": "img2img", "init_image": "x.png", "outpaint": [8, 0, 0, 0]}',
     "outpaint given but mode is img2img: set mode to outpaint"),
    ('{"prompt": "p", "mode": "outpaint", "init_image": "x.png", "outpaint": [0, 0, 0, 0]}',
     "outpaint [0, 0, 0, 0]: pixel counts must be >= 0 and at least one > 0"),
    ('{"prompt": "p", "mode": "outpaint", "init_image": "x.png", "outpaint": [-8, 0, 16, 0]}',
     "outpaint [-8, 0, 16, 0]: pixel counts must be >= 0 and at least one > 0"),
]


@pytest.mark.faults
def test_each_bad_record_fails_with_reason_and_line_while_good_ones_pass(tmp_path):
    lines = []
    for i, (bad, _) in enumerate(BAD_RECORDS):
        lines += [json.dumps({"id": f"ok{i}", "prompt": f"good {i}"}), bad]
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    (tmp_path / "x.png").write_bytes(_png_bytes(np.zeros((8, 8, 3), np.uint8)))
    results = [(r, to_samples(r, DEFAULTS)) for r in _read_all([path], 4)]
    good = [out for _, out in results if isinstance(out, list)]
    failures = [out for _, out in results if isinstance(out, Failure)]
    assert [s[0].id for s in good] == [f"ok{i}" for i in range(len(BAD_RECORDS))]
    assert len(failures) == len(BAD_RECORDS)
    for i, (failure, (bad, reason)) in enumerate(zip(failures, BAD_RECORDS)):
        assert reason in failure.reason, (bad, failure.reason)
        assert failure.line == 2 * i + 2 and failure.source == path
        assert failure.record == bad
        expected_stage = "input-image" if "missing.png" in bad else "manifest"
        assert failure.stage == expected_stage
        assert json.loads(json.dumps(failure.to_json()))["reason"] == failure.reason
        assert Failure.from_json(failure.to_json()) == failure


def test_a_value_at_either_end_of_its_range_is_taken(tmp_path):
    """The ranges include their ends: strength 1 (img2img repainting everything), guidance 0
    (no guidance) and 50, seed 0, 64 images, 1000 steps, a 2048-pixel side and an init image
    at the image size limit all render. BAD_RECORDS holds values just past them."""
    (tmp_path / "x.png").write_bytes(_png_bytes(np.zeros((8, 8, 3), np.uint8)))
    path = _write_jsonl(tmp_path / "ends.jsonl", [
        {"id": "strength", "prompt": "p", "mode": "img2img", "init_image": "x.png", "strength": 1},
        {"id": "g0", "prompt": "p", "guidance": 0}, {"id": "g50", "prompt": "p", "guidance": 50},
        {"id": "images", "prompt": "p", "num_images": 64, "seed": 0},
        {"id": "steps", "prompt": "p", "steps": 1000}, {"id": "side", "prompt": "p", "width": 2048}])
    limits = RenderDefaults(width=128, height=64, max_image_side=8)
    strength, g0, g50, images, steps, side = (_samples(r, limits) for r in _read_all([path], 10))
    assert strength[0].strength == 1.0 and strength[0].init_image.shape == (8, 8, 3)
    assert (g0[0].guidance, g50[0].guidance) == (0.0, 50.0)
    assert len(images) == 64 and images[-1].id == "images_63" and images[0].seed == 0
    assert steps[0].steps == 1000 and (side[0].width, side[0].height) == (2048, 64)


def test_records_leaving_out_negative_prompt_or_num_images_take_the_runs(tmp_path):
    """The run's negative prompt (--negative-prompt) and image count apply to every record
    that gives none; a record giving "" has no negative prompt. The ids the job checks for
    repeats are the ids rendered."""
    from pipelines.manifest import sample_ids

    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"id": "a", "prompt": "p"}, {"id": "b", "prompt": "p", "negative_prompt": "", "num_images": 1}])
    defaults = RenderDefaults(width=128, height=64, negative_prompt="blurry, text", num_images=2)
    a, b = _read_all([path], 10)
    assert [(s.id, s.negative_prompt) for s in _samples(a, defaults)] == [("a", "blurry, text"), ("a_1", "blurry, text")]
    assert [(s.id, s.negative_prompt) for s in _samples(b, defaults)] == [("b", "")]
    assert (sample_ids(a, defaults), sample_ids(b, defaults)) == (["a", "a_1"], ["b"])


def test_mode_and_sampler_cells_padded_with_spaces_are_read(tmp_path):
    """A hand-written CSV puts spaces after its commas: " Img2Img" is img2img, as seeds and
    steps so padded are numbers."""
    (tmp_path / "x.png").write_bytes(_png_bytes(np.zeros((8, 8, 3), np.uint8)))
    path = tmp_path / "s.csv"
    path.write_text("id,prompt,mode,init_image,sampler,seed\nr1,a cat, Img2Img ,x.png, Euler_A , 7\n")
    (sample,) = _samples(_read_all([str(path)], 5)[0])
    assert (sample.mode, sample.sampler, sample.seed, sample.strength) == ("img2img", "euler_a", 7, 0.75)


@pytest.mark.faults
def test_bad_csv_and_text_records_keep_their_lines(tmp_path):
    path = tmp_path / "b.csv"
    path.write_bytes(b"prompt,seed\ngood,1\ntoo,many,fields\nbad utf8 \xff,2\nfine,\nno seed cell\n")
    out = [to_samples(r, DEFAULTS) for r in _read_all([str(path)], 2)]
    assert [type(o).__name__ for o in out] == ["list", "Failure", "Failure", "list", "Failure"]
    assert (out[1].line, out[2].line, out[4].line) == (3, 4, 6)
    assert "3 fields but the header names 2" in out[1].reason and "UTF-8" in out[2].reason
    assert "row has 1 fields but the header names 2" in out[4].reason  # a cell short: which one is missing?
    # Spreadsheets add unnamed trailing columns: empty, they are ignored; a value in one is
    # that row's failure. A number past any limit is a bad value, not a crash.
    path = tmp_path / "u.csv"
    path.write_text("id,prompt,,\na,one,,\nb,two,,stray\nc,three," + "9" * 5000 + ",\n")
    out = [to_samples(r, DEFAULTS) for r in _read_all([str(path)], 2)]
    assert [s.id for s in out[0]] == ["a"] and "column" not in out[0][0].metadata
    assert isinstance(out[1], Failure) and "column 4 has a value but no name" in out[1].reason
    assert isinstance(out[2], Failure) and "column 3 has a value but no name" in out[2].reason
    path.write_text("id,prompt,seed\nc,three," + "9" * 5000 + "\n")
    (out,) = [to_samples(r, DEFAULTS) for r in _read_all([str(path)], 2)]
    assert isinstance(out, Failure) and "seed" in out.reason and "not an integer" in out.reason
    txt = tmp_path / "b.txt"
    txt.write_bytes(b"fine\n\xff\xfe broken\nalso fine\n")
    out = [to_samples(r, DEFAULTS) for r in _read_all([str(txt)], 1)]
    assert isinstance(out[1], Failure) and out[1].line == 2 and "UTF-8" in out[1].reason
    assert [o[0].prompt for o in (out[0], out[2])] == ["fine", "also fine"]


def test_whole_numbers_written_as_floats_are_taken_in_text(tmp_path):
    # pandas writes an int column holding a NaN as floats: 12.0 in CSV, as JSON and Parquet may give it.
    path = _write_csv(tmp_path / "p.csv", ["id", "prompt", "seed", "steps", "num_images"],
                      [["a", "p", "12.0", "2.", ""], ["b", "p", " +7.00 ", "", "2.0"], ["c", "p", "12.5", "", ""]])
    a, b, c = (to_samples(r, DEFAULTS) for r in _read_all([path], 5))
    assert (a[0].seed, a[0].steps) == (12, 2)
    assert [(s.id, s.seed) for s in b] == [("b", 7), ("b_1", 8)]
    assert isinstance(c, Failure) and c.id == "c" and c.line == 4
    assert c.reason == "seed '12.5' is not an integer: write a whole number, e.g. seed: 42"


def test_parquet_decimals_and_integral_float_ids_are_taken(tmp_path):
    # A Parquet decimal column reads as decimal.Decimal; pandas writes an int id column that
    # holds a NaN as float64 (12.0).
    from decimal import Decimal

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({
        "id": pa.array([12.0, 2.5, None]), "prompt": ["a", "b", "c"],
        "guidance": pa.array([Decimal("7.5"), Decimal("2"), None], pa.decimal128(4, 1)),
        "seed": pa.array([Decimal("5.0"), None, None], pa.decimal128(4, 1))}), path)
    a, b, c = (to_samples(r, DEFAULTS) for r in _read_all([str(path)], 5))
    assert [(s.id, s.guidance, s.seed) for s in a] == [("12", 7.5, 5)]
    assert isinstance(b, Failure) and b.line == 2 and b.reason.startswith("id 2.5 is not usable")
    assert c[0].guidance == 5.0 and len(c[0].id) == 20  # no id: derived


@pytest.mark.faults
def test_a_record_not_in_utf8_keeps_its_own_id_and_says_to_save_as_utf8(tmp_path):
    from pipelines.manifest import sample_ids

    latin1 = tmp_path / "l.csv"
    latin1.write_bytes(b"id,prompt\nr1,caf\xe9\nr\xe92,x\nr3,ok\n")
    r1, r2, r3 = _read_all([str(latin1)], 5)
    one, two = to_samples(r1, DEFAULTS), to_samples(r2, DEFAULTS)
    assert (one.id, one.line, one.reason) == (
        "r1", 2, "row is not valid UTF-8 (byte 0xe9 in column 'prompt'): save the file as UTF-8")
    assert sample_ids(r1, RenderDefaults(num_images=3)) == ["r1"]  # its own num_images is not known
    assert len(two.id) == 20 and "in column 'id'" in two.reason  # its id is the unreadable cell: derived
    assert _samples(r3)[0].id == "r3"
    jsonl = tmp_path / "l.jsonl"
    jsonl.write_bytes(b'{"id": "j1", "prompt": "caf\xe9"}\n')
    (failure,) = [to_samples(r, DEFAULTS) for r in _read_all([str(jsonl)], 5)]
    assert (failure.id, failure.reason) == (
        "j1", "line is not valid UTF-8 (byte 0xe9 at byte 28 of the line): save the file as UTF-8")
    header = tmp_path / "h.csv"
    header.write_bytes(b"id,prompt,l\xe9gende\nr1,p,x\n")
    with pytest.raises(ManifestError, match=rf"^{header} line 1: the CSV header row is not valid UTF-8 \(byte 0xe9\): "
                                            r"save the file as UTF-8$"):
        plan_shards([str(header)], 5)


@pytest.mark.faults
def test_a_json_key_given_twice_fails_its_record_naming_the_key(tmp_path):
    # json.loads keeps the last of a repeated key: the record would render "second" silently.
    path = _write_jsonl(tmp_path / "d.jsonl", [
        '{"id": "j7", "prompt": "first", "prompt": "second"}', '{"id": "j8", "id": "j9", "prompt": "p"}',
        '{"id": "j10", "prompt": "p", "style": {"a": 1, "a": 2}}', '{"id": "ok", "prompt": "fine"}'])
    j7, j8, j10, ok = (to_samples(r, DEFAULTS) for r in _read_all([path], 5))
    assert (j7.id, j7.line, j7.reason) == (
        "j7", 1, "key 'prompt' is given more than once, and JSON would keep only the last: keep one")
    assert len(j8.id) == 20 and j8.reason.startswith("key 'id' is given more than once")  # which id? derived
    assert j10.id == "j10" and j10.reason.startswith("key 'a' is given more than once")
    assert [s.prompt for s in ok] == ["fine"]


@pytest.mark.faults
def test_a_carriage_return_alone_in_a_line_fails_it_or_refuses_the_csv(tmp_path):
    # A \r alone ends a line in some editors: read as part of the line, records merged silently.
    fix = r"lines must end in \n or \r\n: convert the file, e.g. perl -pe 's/\r(?!\n)/\n/g' old > new"
    txt = tmp_path / "m.txt"
    txt.write_bytes(b"one\rtwo\rthree\nfour\r\n")
    merged, four = (to_samples(r, DEFAULTS) for r in _read_all([str(txt)], 5))
    assert isinstance(merged, Failure) and (merged.line, merged.record) == (1, "one\rtwo\rthree")
    assert merged.reason == "line holds a carriage return (\\r) alone; " + fix
    assert [s.prompt for s in four] == ["four"]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_bytes(b'{"id": "a", "prompt": "x"}\r{"id": "b", "prompt": "y"}\n{"id": "c", "prompt": "z"}\n')
    merged, c = (to_samples(r, DEFAULTS) for r in _read_all([str(jsonl)], 5))
    assert isinstance(merged, Failure) and merged.line == 1 and merged.reason.startswith("line holds a carriage return")
    assert [s.id for s in c] == ["c"]
    # Excel for Mac: rows end in \r, line breaks inside cells are \n: the header row tells.
    csv_path = tmp_path / "m.csv"
    cr = "malformed CSV: a carriage return (\\r) alone outside quotes: quote a cell that holds one; " + fix
    csv_path.write_bytes(b'id,prompt\rr1,a cat\rr2,"multi\nline"\rr3,a dog\r')
    with pytest.raises(ManifestError) as refused:
        plan_shards([str(csv_path)], 5)
    assert str(refused.value) == f"{csv_path} line 1: cannot read the CSV header row: " + cr
    # A data row holding one, as Python's csv module writes a cell with a \r: that row fails.
    csv_path.write_bytes(b"id,prompt\nc1,a\rb\nc2,x\n")
    bad, good = (to_samples(r, DEFAULTS) for r in _read_all([str(csv_path)], 5))
    assert isinstance(bad, Failure) and (bad.line, bad.record, bad.reason) == (2, "c1,a\rb", cr)
    assert [s.id for s in good] == ["c2"]
    csv_path.write_bytes(b'id,prompt\nc1,"a\rb"\n')  # inside quotes a \r is the cell's own
    assert [r.fields["prompt"] for r in _read_all([str(csv_path)], 5)] == ["a\rb"]


@pytest.mark.faults
def test_csv_quoting_errors_fail_their_row_or_refuse_a_file_whose_rows_they_swallow(tmp_path):
    # A stray quote fails its own row; the lenient parser read it into the cell, mangled.
    path = tmp_path / "q.csv"
    path.write_text('id,prompt\nr1,ok\nr2,"a 12" vinyl record on a table"\nr3,bad "quote" inside\nr4,"last\n')
    r1, r2, r3, r4 = (to_samples(r, DEFAULTS) for r in _read_all([str(path)], 2))
    assert [s.prompt for s in r1 + r3] == ["ok", 'bad "quote" inside']  # a quote inside an unquoted cell is text
    assert isinstance(r2, Failure) and (r2.line, r2.record) == (3, 'r2,"a 12" vinyl record on a table"')
    assert r2.reason == ("malformed CSV (',' expected after '\"'): close the quote, and write a quote inside a "
                         'quoted cell as two ("")')
    assert isinstance(r4, Failure) and r4.line == 5 and "unexpected end of data" in r4.reason  # nothing after it
    # A quote never closed reads the rows after it into its cell (lenient: u2 and u3 lost, exit 0):
    # refused when planned, naming the line and the fix.
    for body, last in (('u1,"oops unterminated\nu2,second\nu3,third\n', 4), ('u1,"oops\nu2,x\nu3,"third"\nu4,ok\n', 4)):
        path.write_text("id,prompt\n" + body)
        with pytest.raises(ManifestError, match=rf'^{path} line 2: a quote opened in the CSV row starting on this '
                                                rf'line is not closed where it should be, so lines 2 to {last} read '
                                                r'as one row \(.+\): close the quote, and write a quote inside a '
                                                r'quoted cell as two \(""\)$'):
            plan_shards([str(path)], 2)


# ----------------------------------------------------------------------------- init images


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_init_images_load_as_rgb(tmp_path, fmt, ext):
    # A smooth gradient, so the lossy JPEG stays close to it.
    y, x = np.mgrid[0:13, 0:17]
    rgb = np.stack([x * 15, y * 19, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    (tmp_path / f"init.{ext}").write_bytes(_png_bytes(rgb, fmt))
    image = load_image(str(tmp_path / f"init.{ext}"))
    assert image.shape == (13, 17, 3) and image.dtype == np.uint8
    if fmt != "JPEG":  # lossless
        np.testing.assert_array_equal(image, rgb)
    else:
        assert np.abs(image.astype(int) - rgb).mean() < 6  # JPEG loss, quality 75


def test_sixteen_bit_transparent_and_camera_images_load_as_seen(tmp_path):
    levels = np.array([[0, 1000, 16384, 32768, 49152, 65535]], np.uint16)
    Image.fromarray(levels).save(tmp_path / "grey16.png")  # Pillow writes it as a 16-bit PNG
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    expected = np.array([[0, 4, 64, 128, 191, 255]], np.uint8)  # scaled, not clipped at 255
    np.testing.assert_array_equal(load_mask(str(tmp_path / "grey16.png")), expected)
    np.testing.assert_array_equal(load_image(str(tmp_path / "grey16.png"))[..., 0], expected)
    # Transparent pixels that store red: a viewer shows white, and so does the image;
    # a mask's transparent pixels keep, whatever grey they store.
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[0, 0, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    image = load_image(str(tmp_path / "rgba.png"))
    assert image[0, 0].tolist() == [255, 0, 0] and image[1, 1].tolist() == [255, 255, 255]
    strokes = np.zeros((2, 2, 2), np.uint8)
    strokes[..., 0] = 255  # white everywhere, opaque only at one stroke pixel
    strokes[0, 1, 1] = 255
    Image.fromarray(strokes, "LA").save(tmp_path / "strokes.png")
    np.testing.assert_array_equal(load_mask(str(tmp_path / "strokes.png")), [[0, 255], [0, 0]])
    # A camera JPEG with a second picture (MPO) reads its main one.
    first, second = Image.new("RGB", (8, 6), (200, 30, 30)), Image.new("RGB", (8, 6), (0, 0, 255))
    first.save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[second])
    assert Image.open(tmp_path / "camera.jpg").format == "MPO"
    assert np.abs(load_image(str(tmp_path / "camera.jpg")).astype(int) - [200, 30, 30]).max() < 8


def test_a_photo_with_an_exif_rotation_loads_upright_as_viewers_show_it(tmp_path):
    """Cameras store a portrait photo's rotation in EXIF rather than turning its pixels: the
    init image (and a mask) is the picture as a viewer shows it, as Pillow's exif_transpose
    turns it, not lying on its side."""
    from PIL import ImageOps

    pixels = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(pixels).save(tmp_path / "portrait.png", exif=exif)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "portrait.png")).convert("RGB"))
    assert upright.shape == (6, 4, 3)
    np.testing.assert_array_equal(load_image(str(tmp_path / "portrait.png")), upright)
    assert load_mask(str(tmp_path / "portrait.png")).shape == (6, 4)


def test_modes_carry_their_images(tmp_path):
    rgb = np.full((16, 24, 3), 90, np.uint8)
    mask = np.zeros((16, 24), np.uint8)
    mask[4:12, 6:18] = 255
    Image.fromarray(rgb).save(tmp_path / "init.png")
    Image.fromarray(mask).convert("RGB").save(tmp_path / "mask.png")  # an RGB mask becomes grey levels
    Image.fromarray(mask[:8]).save(tmp_path / "small-mask.png")
    path = _write_jsonl(tmp_path / "modes.jsonl", [
        {"id": "i2i", "prompt": "p", "mode": "img2img", "init_image": "init.png", "strength": "0.5"},
        {"id": "inp", "prompt": "p", "mode": "inpaint", "init_image": str(tmp_path / "init.png"), "mask": "mask.png"},
        {"id": "out", "prompt": "p", "mode": "outpaint", "init_image": "init.png",
         "outpaint": {"left": 64, "right": 64}},
        {"id": "skt", "prompt": "p", "mode": "Sketch", "init_image": "init.png", "num_images": 2},
        {"id": "mis", "prompt": "p", "mode": "inpaint", "init_image": "init.png", "mask": "small-mask.png"},
    ])
    i2i, inp, out, skt, mis = (to_samples(r, DEFAULTS) for r in _read_all([path], 2))
    assert i2i[0].strength == 0.5 and i2i[0].mask is None
    np.testing.assert_array_equal(i2i[0].init_image, rgb)
    np.testing.assert_array_equal(inp[0].mask, mask)
    assert inp[0].strength is None and skt[0].strength is None  # the engine picks per-mode defaults
    assert out[0].outpaint == (64, 0, 64, 0)
    assert [s.mode for s in skt] == ["sketch", "sketch"] and skt[0].init_image is skt[1].init_image
    assert isinstance(mis, Failure) and mis.stage == "input-image"
    assert mis.reason.startswith(f"mask {tmp_path / 'small-mask.png'} is 24x8 but init_image {tmp_path / 'init.png'} "
                                 f"is 24x16, another aspect ratio: give a mask of the init image's size (24x16) or "
                                 f"aspect ratio (e.g. 24x16)")
    assert load_mask(str(tmp_path / "mask.png")).shape == (16, 24)


def test_outpaint_pixels_read_as_left_top_right_bottom_in_every_form(tmp_path):
    """A list, an object (missing sides 0), or "l,t,r,b" text as a CSV cell holds it: each
    side where it was asked for (a swapped pair would grow the canvas on the wrong side)."""
    Image.new("RGB", (16, 16)).save(tmp_path / "init.png")
    common = {"prompt": "p", "mode": "outpaint", "init_image": "init.png"}
    jsonl = _write_jsonl(tmp_path / "o.jsonl", [
        dict(common, outpaint=[8, 16, 0, 0]), dict(common, outpaint={"left": 8, "top": 16}),
        dict(common, outpaint={"right": 24, "bottom": 32}), dict(common, outpaint="8 16 0 0")])
    csv_path = _write_csv(tmp_path / "o.csv", ["prompt", "mode", "init_image", "outpaint"],
                          [["p", "outpaint", "init.png", "8,16,0,0"], ["p", "outpaint", "init.png", "0, 0, 24, 32"]])
    pads = [_samples(r)[0].outpaint for r in _read_all([jsonl, csv_path], 10)]
    assert pads == [(8, 16, 0, 0), (8, 16, 0, 0), (0, 0, 24, 32), (8, 16, 0, 0), (8, 16, 0, 0), (0, 0, 24, 32)]


def test_a_mask_of_the_init_images_aspect_ratio_is_taken_and_another_fails_its_record(tmp_path):
    # The engine's rule (jaxdiff.engine.images.mask_size_problem): a mask of the init image's
    # aspect ratio, within a pixel of rounding, goes to the engine as it is, which resizes it
    # with the image to the render size; another shape fails its record, not its neighbours'.
    Image.fromarray(np.full((16, 24, 3), 90, np.uint8)).save(tmp_path / "init.png")
    half = np.zeros((8, 12), np.uint8)
    half[2:6, 3:9] = 255
    Image.fromarray(half).save(tmp_path / "half.png")
    Image.fromarray(half[:, :11]).save(tmp_path / "rounded.png")  # 11x8: 24x16 halved, rounded down
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(tmp_path / "square.png")
    path = _write_jsonl(tmp_path / "masks.jsonl", [
        {"id": k, "prompt": "p", "mode": "inpaint", "init_image": "init.png", "mask": f"{k}.png", "num_images": 2}
        for k in ("half", "square", "rounded")])
    half_s, square, rounded = (to_samples(r, DEFAULTS) for r in _read_all([path], 5))
    assert [s.id for s in half_s] == ["half", "half_1"] and [s.id for s in rounded] == ["rounded", "rounded_1"]
    np.testing.assert_array_equal(half_s[0].mask, half)
    np.testing.assert_array_equal(rounded[1].mask, half[:, :11])
    # Each image keeps which files it started from, and each file's sha256.
    assert half_s[1].input_files == {
        "init_image": str(tmp_path / "init.png"),
        "init_image_sha256": hashlib.sha256((tmp_path / "init.png").read_bytes()).hexdigest(),
        "mask": str(tmp_path / "half.png"), "mask_sha256": hashlib.sha256((tmp_path / "half.png").read_bytes()).hexdigest()}
    assert isinstance(square, Failure) and square.stage == "input-image" and square.id == "square"
    assert square.reason == (
        f"mask {tmp_path / 'square.png'} is 12x12 but init_image {tmp_path / 'init.png'} is 24x16, another "
        f"aspect ratio: give a mask of the init image's size (24x16) or aspect ratio (e.g. 12x8); it is resized "
        f"with the image to the render size")


@pytest.mark.faults
def test_corrupt_or_unsupported_init_images_fail_at_input_image_stage(tmp_path):
    good = _png_bytes(np.zeros((32, 32, 3), np.uint8))
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "noise.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    Image.new("RGB", (8, 8)).save(tmp_path / "anim.gif")
    Image.new("RGB", (80, 8)).save(tmp_path / "wide.png")
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    path = _write_jsonl(tmp_path / "c.jsonl", [
        {"id": n.split(".")[0], "prompt": "p", "mode": "img2img", "init_image": n}
        for n in ("truncated.png", "noise.jpg", "anim.gif", "wide.png", "notes.png")] + [
        {"id": "mask", "prompt": "p", "mode": "inpaint", "init_image": "ok.png", "mask": "notes.png"}])
    limits = RenderDefaults(width=128, height=64, max_image_side=64)
    failures = [to_samples(r, limits) for r in _read_all([path], 10)]
    assert all(isinstance(f, Failure) and f.stage == "input-image" for f in failures)
    reasons = [f.reason for f in failures]
    assert "cannot decode init_image" in reasons[0] and "truncated.png" in reasons[0]
    assert "init_image" in reasons[1] and "noise.jpg" in reasons[1]
    assert "is GIF: use PNG, JPEG or WebP" in reasons[2]
    assert "80x8: use at most 64 pixels a side" in reasons[3]
    # The file and the field named, not the in-memory buffer Pillow read it from.
    assert reasons[4].endswith("notes.png is not an image Pillow can read: use PNG, JPEG or WebP")
    assert reasons[4].startswith("init_image ") and reasons[5].startswith("mask ") and "BytesIO" not in reasons[5]


def test_sampler_names_match_the_engine():
    from jaxdiff.samplers import SAMPLER_NAMES

    assert RenderDefaults.samplers == tuple(SAMPLER_NAMES)
    assert RenderDefaults.sampler in SAMPLER_NAMES


@pytest.mark.faults
def test_render_defaults_refuse_bad_values():
    with pytest.raises(ValueError, match="width=500"):
        RenderDefaults(width=500)
    with pytest.raises(ValueError, match="sampler='plms'"):
        RenderDefaults(sampler="plms")
    with pytest.raises(ValueError, match="strength=0"):
        RenderDefaults(strength=0)


def test_a_dry_run_holds_records_to_the_real_runs_sizes(tmp_path):
    # The dry run's own placeholders may be tiny (any multiple of 8); a record's own size
    # is checked as a real run checks it, so a manifest the dry run passes renders for real.
    from pipelines import job

    path = _write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "prompt": "p", "width": 128, "height": 192}, {"id": "b", "prompt": "p", "width": 72},
        {"id": "c", "prompt": "p", "height": 4096}, {"id": "d", "prompt": "p"}])
    records = _read_all([path], 10)
    dry = job.manifest_defaults(job.RenderConfig(dry_run=True, width=16, height=8))
    real = job.manifest_defaults(job.RenderConfig(width=512, height=512))
    for defaults in (dry, real):
        ok, wrong_width, too_tall, _ = (to_samples(r, defaults) for r in records)
        assert (ok[0].width, ok[0].height) == (128, 192)
        for failure in (wrong_width, too_tall):
            # The run's model is the shipped one: multiples of 16.
            assert isinstance(failure, Failure) and "multiples of 16 up to 2048" in failure.reason
    (placeholder,) = to_samples(records[3], dry)
    assert (placeholder.width, placeholder.height) == (16, 8)
    with pytest.raises(ValueError, match="multiple of 16 up to 2048"):
        job.manifest_defaults(job.RenderConfig(width=72))


def test_dry_run_placeholders_follow_each_samples_seed_and_settings():
    """The dry run's image is drawn from the sample's seed (the same seed, the same image;
    another, another), and its metadata, written to the shards, says what the sample asked
    for: guidance 0 stays 0, not the run's guidance."""
    from jaxdiff.engine.sample import Sample
    from pipelines.dry_run import DryRunRenderer

    renderer = DryRunRenderer(4, width=16, height=8, guidance=7.5, seed=3)
    a, again, other, unguided = renderer.render_samples([
        Sample(id="a", prompt="p", seed=1), Sample(id="b", prompt="p", seed=1), Sample(id="c", prompt="p", seed=2),
        Sample(id="d", prompt="p", seed=1, guidance=0.0, steps=4, width=32)])
    assert a.image.shape == (8, 16, 3) and unguided.image.shape == (8, 32, 3)
    np.testing.assert_array_equal(a.image, again.image)
    assert not np.array_equal(a.image, other.image)
    assert (a.metadata["seed"], other.metadata["seed"], a.metadata["guidance"]) == (1, 2, 7.5)
    assert {k: unguided.metadata[k] for k in ("guidance", "steps", "width", "height")} == {
        "guidance": 0.0, "steps": 4, "width": 32, "height": 8}


@pytest.mark.faults
def test_an_outpaint_canvas_past_the_size_limit_fails_its_record(tmp_path):
    """The canvas is the init image plus its outpaint pixels: past max_side the record
    fails, naming the fix, before any worker renders it."""
    (tmp_path / "edge.png").write_bytes(_png_bytes(np.zeros((16, 2000, 3), np.uint8)))
    (tmp_path / "tall.png").write_bytes(_png_bytes(np.zeros((2000, 16, 3), np.uint8)))
    records = [
        {"id": "canvas", "prompt": "p", "mode": "outpaint", "init_image": "edge.png", "outpaint": [64, 0, 0, 0]},
        {"id": "tall", "prompt": "p", "mode": "outpaint", "init_image": "tall.png", "outpaint": [0, 64, 0, 0]},
        {"id": "fits", "prompt": "p", "mode": "outpaint", "init_image": "edge.png", "outpaint": [48, 0, 0, 0]},
        {"id": "photo", "prompt": "p", "mode": "img2img", "init_image": "edge.png"},  # scaled to the model
    ]
    path = _write_jsonl(tmp_path / "m.jsonl", records)
    results = {r.fields["id"]: to_samples(r, RenderDefaults(steps=3, seed=11)) for r in _read_all([path], 4)}
    assert isinstance(results["canvas"], Failure) and results["canvas"].stage == "input-image"
    assert ("init_image 2000x16 with outpaint [64, 0, 0, 0] makes a 2064x16 canvas, past 2048 a side: use fewer "
            "outpaint pixels or a smaller image") in results["canvas"].reason
    assert isinstance(results["tall"], Failure) and "makes a 16x2064 canvas, past 2048 a side" in results["tall"].reason
    assert isinstance(results["fits"], list) and isinstance(results["photo"], list)


@pytest.mark.faults
def test_an_outpaint_record_giving_a_size_and_a_bad_strength_are_refused_with_their_fix(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "photo.png")
    path = _write_jsonl(tmp_path / "m.jsonl", [
        {"id": "sized", "prompt": "p", "mode": "outpaint", "init_image": "photo.png", "outpaint": [16, 0, 16, 0],
         "width": 64},
        {"id": "strength", "prompt": "p", "mode": "img2img", "init_image": "photo.png", "strength": "abc"}])
    sized, strength = (to_samples(r, RenderDefaults()) for r in _read_all([path], 4))
    assert "width/height given with mode outpaint, whose canvas (the init_image plus the outpaint pixels) sets " \
           "the size" in sized.reason
    assert strength.reason == "strength 'abc' is not a finite number: write a number, e.g. strength: 0.75"


def test_a_png_transparent_by_key_colour_is_transparent_as_one_with_alpha(tmp_path):
    """PNG optimisers store an all-or-nothing alpha as a tRNS key colour on a grey or RGB
    image: a sketch on it is lines on white, and a mask's transparent area is kept."""
    drawing = np.zeros((8, 8, 3), np.uint8)
    drawing[2:6, 2:6] = (0, 200, 0)
    Image.fromarray(drawing).save(tmp_path / "rgb.png", transparency=(0, 0, 0))
    grey = np.zeros((8, 8), np.uint8)
    grey[2:6, 2:6] = 255
    Image.fromarray(grey).save(tmp_path / "grey.png", transparency=0)
    rgba = np.dstack([drawing, np.where(drawing.any(-1), 255, 0).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(str(tmp_path / "rgb.png")), load_image(str(tmp_path / "rgba.png")))
    assert tuple(load_image(str(tmp_path / "rgb.png"))[0, 0]) == (255, 255, 255)
    mask = load_mask(str(tmp_path / "grey.png"))
    assert mask[0, 0] == 0 and mask[3, 3] == 255
