"""The render job end to end with the dry-run renderer: shards, failures, resume, crashes, retries."""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import tqdm
from PIL import Image

from jaxdiff import storage
from pipelines import job, shards
from pipelines.dry_run import DryRunRenderer

GOOD = [{"id": f"g{i:02d}", "prompt": f"a red circle number {i}"} for i in range(11)]
BAD = [
    ("{not json", "malformed"),
    (json.dumps({"id": "empty", "prompt": ""}), "empty prompt"),
    (json.dumps({"id": "badseed", "prompt": "a square", "seed": "twelve"}), "not an integer"),
    (json.dumps({"id": "badsize", "prompt": "a square", "width": 12}), "unsupported size"),
    (json.dumps({"id": "noimage", "prompt": "a square", "mode": "img2img", "init_image": "missing.png"}),
     "missing.png"),
]


@pytest.fixture(autouse=True)
def own_tmpdir(tmp_path, monkeypatch):
    """Beam leaves temp folders in $TMPDIR: one per test."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(folder))


def _manifest_lines() -> list[str]:
    lines = [json.dumps(r) for r in GOOD]
    # Bad records spread between good ones, so several shards see both.
    for k, (line, _) in enumerate(BAD):
        lines.insert(2 * k + 1, line)
    return lines


def _config(**kw) -> job.RenderConfig:
    base = dict(dry_run=True, width=16, height=8, shard_size=5, batch_size=2, steps=3)
    base.update(kw)
    return job.RenderConfig(**base)


def _ids_in_output(out: str, local_copy: str) -> tuple[list[str], list[dict]]:
    """(ids in the tar files, read with webdataset; failure records), checking parquet and
    index.json agree with the files."""
    import hashlib

    import webdataset as wds

    os.makedirs(local_copy, exist_ok=True)
    index = json.loads(storage.read_text(storage.join(out, "index.json")))
    assert index["wids_version"] == 1
    # wids cannot index an empty tar: the shardlist holds the shards with images, all of them.
    assert index["shardlist"] == [{"url": e["url"], "nsamples": e["nsamples"]} for e in index["shards"]
                                  if e["nsamples"]]
    tar_paths = []
    for entry in index["shards"]:
        local = os.path.join(local_copy, entry["url"])
        storage.download(storage.join(out, entry["url"]), local)
        tar_paths.append(local)
    ids, failures = [], []
    for entry, local in zip(index["shards"], tar_paths):
        with open(local, "rb") as f:
            tar_bytes = f.read()
        assert (entry["filesize"], entry["sha256"]) == (len(tar_bytes), hashlib.sha256(tar_bytes).hexdigest())
        # webdataset groups members by key: two images under one key would read as one sample.
        with tarfile.open(local) as tar:
            names = tar.getnames()
        assert len(names) == len(set(names)), f"{entry['url']}: a member name repeats"
        n, shard_ids = 0, []
        for item in wds.WebDataset(local, shardshuffle=False, empty_check=False):
            meta = json.loads(item["json"])
            image = np.asarray(Image.open(io.BytesIO(item["png"])))
            assert image.shape == (meta["height"], meta["width"], 3)
            assert item["txt"].decode() == meta["prompt"]
            shard_ids.append(meta["id"])
            n += 1
        assert n == entry["nsamples"]
        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, entry["parquet"]))))
        keys = table.column("key").to_pylist()
        assert len(keys) == len(set(keys)) and set(keys) == {name.split(".", 1)[0] for name in names}
        assert sorted(table.column("id").to_pylist()) == sorted(shard_ids)
        ids += shard_ids
        shard_failures = shards.read_failures(out, entry["url"][: -len(".tar")])
        assert entry["failed"] == len(shard_failures)
        failures += shard_failures
    return ids, failures


def _partials(out: str) -> list[str]:
    """The temporary files (hidden: .NAME.RANDOM.partial) anywhere under `out`."""
    return glob.glob(os.path.join(out, "**", "*.partial"), recursive=True, include_hidden=True)


def _assert_every_id_once(ids: list[str], failures: list[dict]) -> None:
    good_ids = [r["id"] for r in GOOD]
    assert sorted(ids) == sorted(good_ids), "each good id exactly once in the shards"
    assert len(failures) == len(BAD)
    reasons = " | ".join(f["reason"] for f in failures)
    for _, expected in BAD:
        assert expected in reasons
    assert not set(ids) & {f["id"] for f in failures}


@pytest.mark.pipeline
@pytest.mark.faults
def test_gcs_end_to_end_bad_records_resume_conflict_and_fresh(gcs_bucket, tmp_path):
    manifest_url = f"gs://{gcs_bucket}/e2e/manifest.jsonl"
    storage.write_bytes(manifest_url, ("\n".join(_manifest_lines()) + "\n").encode())
    out = f"gs://{gcs_bucket}/e2e/out"

    start = time.time()
    summary = job.run([manifest_url], out, _config(), progress=False)
    assert time.time() - start < 60, "gs:// access must not wait on credential lookups"
    assert summary.complete and summary.shards == 4
    assert (summary.rendered, summary.failed) == (len(GOOD), len(BAD))
    ids, failures = _ids_in_output(out, str(tmp_path / "copy1"))
    _assert_every_id_once(ids, failures)
    run_record = json.loads(storage.read_text(storage.join(out, "run.json")))
    assert run_record["model"]["model"] == "dry-run"
    assert run_record["manifest"]["fingerprint"].startswith("sha256:")

    # The same command again: everything is already complete.
    again = job.run([manifest_url], out, _config(batch_size=3), progress=False)
    assert (again.skipped_shards, again.rendered_shards) == (4, 0)

    # Other settings, or another manifest, against this output are refused ...
    with pytest.raises(job.RunConflict, match="different settings.*steps"):
        job.run([manifest_url], out, _config(steps=4), progress=False)
    other = f"gs://{gcs_bucket}/e2e/other.jsonl"
    storage.write_bytes(other, (json.dumps(GOOD[0]) + "\n").encode())
    with pytest.raises(job.RunConflict, match="different manifest.*--fresh"):
        job.run([other], out, _config(), progress=False)
    # ... unless --fresh, which starts over.
    fresh = job.run([other], out, _config(), fresh=True, progress=False)
    assert (fresh.shards, fresh.rendered, fresh.failed) == (1, 1, 0)
    assert sorted(shards.complete_shards(out)) == ["shard-00000"]


class FailOncePerShard:
    """A dry-run renderer that raises the first time it sees a marked id, as a crashing worker would."""

    def __init__(self, marker_dir: str, fail_ids: tuple[str, ...]):
        self.marker_dir, self.fail_ids = marker_dir, fail_ids

    def __call__(self):
        inner = DryRunRenderer(2, width=16, height=8)
        marker_dir, fail_ids = self.marker_dir, self.fail_ids

        class Renderer:
            batch_size = inner.batch_size
            describe = inner.describe

            def render_samples(self, samples):
                for s in samples:
                    marker = os.path.join(marker_dir, s.id)
                    if s.id in fail_ids and not os.path.exists(marker):
                        open(marker, "w").close()
                        raise RuntimeError(f"simulated worker crash at {s.id}")
                return inner.render_samples(samples)

        return Renderer()


@pytest.mark.pipeline
@pytest.mark.faults
def test_shard_that_raises_is_retried_without_duplicates(tmp_path):
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text("\n".join(_manifest_lines()) + "\n")
    out = str(tmp_path / "out")
    markers = tmp_path / "markers"
    markers.mkdir()
    factory = FailOncePerShard(str(markers), ("g04", "g09"))

    # A retry inside one worker: the shard's first attempt dies midway, the second commits.
    from pipelines import manifest

    spec = manifest.plan_shards([str(manifest_path)], 5)[1]
    renderer = factory()
    defaults = job.manifest_defaults(_config())
    with pytest.raises(RuntimeError, match="simulated"):
        job.render_shard(spec, out, renderer, defaults, model_info={})
    assert not shards.complete_shards(out)
    assert not [n for n in os.listdir(out) if n.endswith(".partial")], "a failed attempt leaves no temp files"
    stats = job.render_shard(spec, out, renderer, defaults, model_info={})
    assert stats["samples"] == spec.num_records

    # Through the runner: the failing shard stops the run; the rerun renders only what is missing.
    config = _config()
    with pytest.raises(job.JobError, match="rerun the same command"):
        job.run([str(manifest_path)], out, config, renderer_factory=factory, progress=False)
    assert "shard-00002" not in shards.complete_shards(out)  # g09's shard
    # The index still lists what is committed, as the stats markers say, after a failed run.
    index = json.loads(storage.read_text(os.path.join(out, job.INDEX_FILE)))
    assert sorted(e["url"] for e in index["shards"]) == sorted(n + ".tar" for n in shards.complete_shards(out))
    for entry in index["shards"]:
        assert entry["sha256"] == shards.read_stats(out, entry["url"][:-4])["tar_sha256"]
    summary = job.run([str(manifest_path)], out, config, renderer_factory=factory, progress=False)
    assert summary.complete
    ids, failures = _ids_in_output(out, str(tmp_path / "copy"))
    _assert_every_id_once(ids, failures)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from jaxdiff.cli import main; sys.exit(main())", "render", *args]


def _dry_run_command(tmp_path, *flags: str) -> tuple:
    """(output folder, the dry run's arguments over the test manifest, the environment) for a
    run of the command in a process of its own, one record a batch, three a shard."""
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text("\n".join(_manifest_lines()) + "\n")
    out = tmp_path / "out"
    common = [str(manifest_path), "--out", str(out), "--dry-run", "--width", "16", "--height", "8",
              "--shard-size", "3", "--batch-size", "1", "--no-progress", *flags]
    return out, common, dict(os.environ, NO_GCE_CHECK="true", JAX_PLATFORMS="cpu")


@pytest.mark.pipeline
@pytest.mark.faults
def test_killed_run_resumes_with_two_worker_processes(tmp_path):
    out, common, env = _dry_run_command(tmp_path)

    proc = subprocess.Popen(_cli(*common, "--dry-run-delay", "0.4"), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not glob.glob(str(out / "*.stats.json")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no shard committed in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    complete = shards.complete_shards(str(out))
    assert 1 <= len(complete) < 6, "killed partway"
    for name in complete:  # every marker vouches for a whole shard
        stats = shards.read_stats(str(out), name)
        assert stats["samples"] == 3 and os.path.getsize(out / f"{name}.tar") == stats["tar_bytes"]

    rerun = subprocess.run(
        _cli(*common, "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"),
        env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "already complete" in rerun.stderr
    assert not [p for p in glob.glob(str(out / ".*")) if p.endswith(".partial")]
    ids, failures = _ids_in_output(str(out), str(tmp_path / "copy"))
    _assert_every_id_once(ids, failures)


@pytest.mark.pipeline
@pytest.mark.faults
def test_ctrl_c_ends_the_command_and_its_worker_processes_at_once_and_the_rerun_completes(tmp_path):
    """Beam's own cleanup after an interrupt could wait forever for its worker processes. The
    command ends without it, and leaves no temporary folder behind."""
    import psutil

    out, common, env = _dry_run_command(tmp_path, "--direct_num_workers", "2",
                                        "--direct_running_mode", "multi_processing")
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = subprocess.Popen(_cli(*common, "--dry-run-delay", "0.4"), env=dict(env, TMPDIR=str(temp)),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while len(psutil.Process(proc.pid).children(recursive=True)) < 2:  # the workers are up
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "no worker processes in time"
            time.sleep(0.05)
        workers = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGINT)  # as `kill -INT` or a supervisor sends it
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == ("jaxdiff render: interrupted. Committed shards are kept: rerun the "
                                            "same command to render the rest.")
    psutil.wait_procs(workers, timeout=10)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    assert not list(temp.iterdir()), "the command's temporary files (Beam's pipeline folder) are removed"

    rerun = subprocess.run(_cli(*common), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    ids, failures = _ids_in_output(str(out), str(tmp_path / "copy"))
    _assert_every_id_once(ids, failures)


@pytest.mark.pipeline
def test_retry_failures_renders_only_failed_ids(tmp_path):
    """--retry-failures: an init image missing at first, present later, moves from failures/
    to the shard, though the manifest was moved in between (same content, other path)."""
    manifest_path = tmp_path / "m.jsonl"
    late = tmp_path / "late.png"
    records = [{"id": "a", "prompt": "one"},
               {"id": "b", "prompt": "two", "mode": "img2img", "init_image": str(late)},
               {"id": "c", "prompt": "three"}]
    manifest_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = str(tmp_path / "out")
    config = _config(shard_size=10)
    first = job.run([str(manifest_path)], out, config, progress=False)
    assert (first.rendered, first.failed) == (2, 1)
    assert first.rendered_now == 2
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(late)
    hashes_before = pq.read_table(os.path.join(out, "shard-00000.parquet")).to_pylist()
    (tmp_path / "moved").mkdir()
    manifest_path = manifest_path.rename(tmp_path / "moved" / "m.jsonl")

    earlier = {"shard-00000": shards.read_stats(out, "shard-00000")}
    watcher = job.ProgressWatcher(out, {"shard-00000": 3}, earlier=earlier, enabled=False)
    bar = tqdm.tqdm(total=3, file=io.StringIO())
    watcher.poll(bar)  # the shard's marker is the earlier run's: not done yet
    assert (bar.n, watcher.images) == (0, 0)
    second = job.run([str(manifest_path)], out, config, retry_failures=True, progress=False)
    assert (second.rendered, second.failed) == (3, 0)
    assert second.rendered_now == 1, "images/s counts only the images this run rendered"
    watcher.poll(bar)
    assert (bar.n, watcher.images) == (3, 1)
    assert shards.read_failures(out, "shard-00000") == []
    table = pq.read_table(os.path.join(out, "shard-00000.parquet"))
    assert sorted(table.column("id").to_pylist()) == ["a", "b", "c"]
    rows = {r["id"]: r for r in table.to_pylist()}
    for before in hashes_before:  # earlier images are kept as they were
        assert rows[before["id"]] == before


class FailsOneImageOnce:
    """The dry run, but the first render of one image id fails for that image alone (as the
    engine reports a sample's error); a marker file remembers it across runs."""

    def __init__(self, marker: str, image_id: str):
        self.marker, self.image_id = marker, image_id

    def __call__(self):
        marker, image_id = self.marker, self.image_id

        class Renderer(DryRunRenderer):
            def render_samples(self, samples):
                results = super().render_samples(samples)
                for result in results:
                    if result.id == image_id and not os.path.exists(marker):
                        open(marker, "w").close()
                        result.image, result.error = None, "simulated: out of memory"
                return results

        return Renderer(2, width=16, height=8)


@pytest.mark.pipeline
@pytest.mark.faults
def test_retry_failures_renders_a_failed_variant_alone_and_leaves_shards_without_failures(tmp_path):
    """A num_images 3 record whose second image failed: the retry renders a_1 only (a and
    a_2 are in the shard already, and rendering them again would put each in it twice); the
    other shard has nothing to retry and counts as complete, not as rendered now."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "prompt": "cats", "num_images": 3}\n{"id": "b", "prompt": "a dog"}\n')
    out = str(tmp_path / "out")
    factory = FailsOneImageOnce(str(tmp_path / "failed-once"), "a_1")
    config = _config(shard_size=1)
    first = job.run([str(path)], out, config, renderer_factory=factory, progress=False)
    assert (first.rendered, first.failed) == (3, 1)
    assert [f["id"] for f in shards.read_failures(out, "shard-00000")] == ["a_1"]
    second = job.run([str(path)], out, config, renderer_factory=factory, retry_failures=True, progress=False)
    assert second.complete and (second.rendered, second.failed, second.rendered_now) == (4, 0, 1)
    assert (second.rendered_shards, second.skipped_shards) == (1, 1)
    ids, failures = _ids_in_output(out, str(tmp_path / "copy"))  # each id once, each tar member name once
    assert sorted(ids) == ["a", "a_1", "a_2", "b"] and failures == []


def test_the_progress_bar_lists_a_slow_output_a_fifth_of_the_time_at_most(tmp_path, monkeypatch):
    """Listing thousands of shards on GCS takes a while: polling without pause would list
    them all the run long."""
    calls = []

    def slow_listing(out):
        calls.append(time.monotonic())
        time.sleep(0.1)
        return set()

    monkeypatch.setattr(shards, "complete_shards", slow_listing)
    watcher = job.ProgressWatcher(str(tmp_path), {"shard-00000": 1}, interval_s=0.01, enabled=False)
    watcher.start()
    time.sleep(1.2)
    watcher.stop()
    assert 2 <= len(calls) <= 4  # at a 0.01 s interval alone, about 11


@pytest.mark.pipeline
def test_naming_the_default_a_run_left_open_resumes_it(tmp_path):
    """steps, sampler and guidance left open render at the engine's defaults (no model
    folder recommends others here): giving those defaults again is the same run."""
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text(json.dumps({"id": "a", "prompt": "one"}) + "\n")
    out = str(tmp_path / "out")
    job.run([str(manifest_path)], out, _config(steps=None), progress=False)
    same = job.run([str(manifest_path)], out, _config(steps=25, sampler="dpmpp_2m", guidance=7.5), progress=False)
    assert (same.skipped_shards, same.rendered_shards) == (1, 0)
    with pytest.raises(job.RunConflict, match="steps: 25 -> 30"):
        job.run([str(manifest_path)], out, _config(steps=30), progress=False)


def test_a_resume_at_another_batch_shape_is_noted_per_chip_or_by_the_commands_batch_size():
    """Per chip where the driver loaded the renderer (8 on 4 chips is 2 on 1: the same
    programs); by the command's batch size where a remote runner's record has no devices."""
    def local(batch_size, chips, dtype="bfloat16"):
        return {"batch_size": batch_size, "model": {"batch_size": batch_size, "devices": ["d"] * chips,
                                                    "base": {"dtype": dtype}}}

    assert job.batch_shape_note("out", local(8, 4), local(2, 1)) is None
    note = job.batch_shape_note("out", local(8, 4), local(8, 1))
    assert "out was rendered 2 samples per chip, this run renders 8" in note
    assert "bfloat16" in note and "--batch-size (8) on as many chips" in note
    assert "float32" in job.batch_shape_note("out", local(8, 1, "float32"), local(4, 1, "float32"))
    remote = {"batch_size": 16, "model": {"model": None, "upscaler": None}}
    assert "rendered 16 samples a batch, this run renders 32" in job.batch_shape_note(
        "gs://b/run", remote, dict(remote, batch_size=32))
    assert job.batch_shape_note("gs://b/run", remote, remote) is None


@pytest.mark.pipeline
def test_a_dry_run_resumed_at_another_batch_size_is_not_warned_of_rounding(tmp_path, caplog):
    """Placeholder images do not depend on how samples are batched: a dry run resumed at
    another --batch-size says nothing of images differing, as a real run resumed so does."""
    import logging

    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD[:4]))
    factory = job.RendererFactory(_config(height=16))  # the dry run's renderer, for both runs

    def resume(dry_run: bool) -> str:
        out = str(tmp_path / f"out-{dry_run}")
        config = _config(dry_run=dry_run, height=16, shard_size=2, batch_size=2)
        job.run([str(path)], out, config, renderer_factory=factory, progress=False)
        os.remove(shards.shard_paths(out, "shard-00001")["stats"])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipelines.job"):
            job.run([str(path)], out, dataclasses.replace(config, batch_size=1), renderer_factory=factory,
                    progress=False)
        return caplog.text

    assert "rendered 2 samples a batch, this run renders 1" in resume(dry_run=False)
    assert "samples a batch" not in resume(dry_run=True)


@pytest.mark.pipeline
@pytest.mark.faults
def test_dry_run_draws_and_checks_an_outpaint_canvas_at_its_own_size(tmp_path):
    """The canvas is the init image plus the outpaint pixels: the dry run's placeholder has
    its size, and a canvas the run's model does not take (the shipped one: multiples of 16)
    fails there as in a real run, naming pads it takes. Other image modes draw at their
    photo's shape."""
    photo, big = tmp_path / "photo.png", tmp_path / "big.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(photo)
    Image.fromarray(np.zeros((100, 250, 3), np.uint8)).save(big)
    manifest_path = tmp_path / "m.jsonl"
    records = [
        {"id": "wide", "prompt": "p", "mode": "outpaint", "init_image": str(photo), "outpaint": [0, 0, 64, 0]},
        {"id": "odd", "prompt": "p", "mode": "outpaint", "init_image": str(photo), "outpaint": [5, 0, 0, 0]},
        {"id": "sixteens", "prompt": "p", "mode": "outpaint", "init_image": str(photo), "outpaint": [16, 0, 16, 0]},
        {"id": "photo", "prompt": "p", "mode": "img2img", "init_image": str(big)}]
    manifest_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = str(tmp_path / "out")
    summary = job.run([str(manifest_path)], out, _config(shard_size=10, width=None, height=None), progress=False)
    assert (summary.rendered, summary.failed) == (3, 1)
    rows = {row["id"]: row for row in pq.read_table(os.path.join(out, "shard-00000.parquet")).to_pylist()}
    assert (rows["wide"]["width"], rows["wide"]["height"]) == (128, 64)
    assert (rows["sixteens"]["width"], rows["sixteens"]["height"]) == (96, 64)
    # An img2img record without a size: its photo's shape at the placeholders' pixel count.
    assert (rows["photo"]["width"], rows["photo"]["height"]) == (120, 48)
    (failure,) = shards.read_failures(out, "shard-00000")
    assert failure["stage"] == "render" and failure["record"] == json.dumps(records[1])  # the line as written
    assert failure["id"] == "odd" and failure["reason"] == (
        "the outpaint canvas is 69x64 (init_image 64x64 plus outpaint [5, 0, 0, 0]): each side must be a multiple "
        "of 16, e.g. outpaint [5, 0, 11, 0]")


@pytest.mark.pipeline
def test_records_sizes_are_held_to_what_the_runs_model_takes(tmp_path):
    """Each side a multiple of the model's VAE and UNet downsampling, read from its configs:
    16 for the shipped model (so a size it rendered on its own can be asked for), 64 for an
    SD-shaped one."""
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "prompt": "p", "width": 48, "height": 80}, {"id": "b", "prompt": "p", "width": 40}]))
    summary = job.run([str(manifest_path)], str(tmp_path / "shipped"), _config(shard_size=10), progress=False)
    assert (summary.rendered, summary.failed) == (1, 1)
    (failure,) = shards.read_failures(str(tmp_path / "shipped"), "shard-00000")
    assert failure["id"] == "b" and "use multiples of 16 up to 2048" in failure["reason"]

    sd = tmp_path / "sd"
    for part in ("unet", "vae"):
        (sd / part).mkdir(parents=True)
        (sd / part / "config.json").write_text(json.dumps({"block_out_channels": [320, 640, 1280, 1280]}))
    summary = job.run([str(manifest_path)], str(tmp_path / "sd-out"), _config(shard_size=10, model=str(sd)),
                      progress=False)
    assert (summary.rendered, summary.failed) == (0, 2)
    assert job.model_size_multiple(_config(model=str(tmp_path / "nothing"))) == 64  # the loader names what is wrong


@pytest.mark.pipeline
@pytest.mark.faults
def test_a_failed_record_fails_every_image_id_it_would_have_given(tmp_path):
    """A record asking for num_images 3 that fails (a missing init image, a bad field) has
    a failure line for {id}, {id}_1 and {id}_2: every id ends somewhere, and a later record
    claiming one of them is told where."""
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "prompt": "one"},
        {"id": "b", "prompt": "two", "num_images": 3, "mode": "img2img", "init_image": str(tmp_path / "no.png")},
        {"id": "c", "prompt": "three", "num_images": 2, "steps": 0},
        {"id": "b_2", "prompt": "four"}]))
    out = str(tmp_path / "out")
    summary = job.run([str(manifest_path)], out, _config(shard_size=10), progress=False)
    assert (summary.rendered, summary.failed) == (1, 6)
    ids, failures = _ids_in_output(out, str(tmp_path / "copy"))
    assert ids == ["a"]
    by_id = {}
    for f in failures:
        by_id.setdefault(f["id"], []).append(f)
    assert sorted(by_id) == ["b", "b_1", "b_2", "c", "c_1"]
    assert [f["stage"] for f in by_id["b_1"]] == ["input-image"] and "does not exist" in by_id["b_1"][0]["reason"]
    assert "steps 0 is out of range" in by_id["c_1"][0]["reason"]
    assert sorted(f["line"] for f in by_id["b_2"]) == [2, 4]
    assert "its failure's" in next(f for f in by_id["b_2"] if f["line"] == 4)["reason"]
    assert shards.read_stats(out, "shard-00000")["samples"] == 7


@pytest.mark.pipeline
@pytest.mark.faults
def test_a_shard_whose_every_record_failed_is_indexed_but_left_out_of_the_shardlist(tmp_path):
    """index.json lists every committed shard with its counts; wids, which reads the
    shardlist, cannot index a tar without samples."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "x", "prompt": ""}\nnot json\n{"id": "ok", "prompt": "one"}\n')
    out = str(tmp_path / "out")
    summary = job.run([str(path)], out, _config(shard_size=2), progress=False)
    assert summary.complete and (summary.rendered, summary.failed) == (1, 2)
    index = json.loads(storage.read_text(os.path.join(out, job.INDEX_FILE)))
    assert [(e["url"], e["nsamples"], e["failed"]) for e in index["shards"]] == [
        ("shard-00000.tar", 0, 2), ("shard-00001.tar", 1, 0)]
    assert index["shardlist"] == [{"url": "shard-00001.tar", "nsamples": 1}]
    assert (index["rendered"], index["failed"]) == (1, 2)
    ids, failures = _ids_in_output(out, str(tmp_path / "copy"))
    assert ids == ["ok"] and len(failures) == 2


def _overwrite_tail(path: str, count: int) -> None:
    with open(path, "r+b") as f:
        f.seek(-count, os.SEEK_END)
        f.write(b"\xff" * (count - 8))  # the last 8 bytes (footer length, magic) stay


@pytest.mark.pipeline
@pytest.mark.faults
def test_retrying_a_damaged_shard_names_it_and_the_fix_instead_of_vouching_for_it(tmp_path):
    """--retry-failures starts from a shard's committed files: a tar cut short, a missing
    parquet or failures file, a failures file a line short (its id would be lost) must not
    be copied into a new, complete-looking shard."""
    late = tmp_path / "late.png"
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two", "mode": "img2img", "init_image": str(late)},
        {"id": "c", "prompt": "three"}, {"id": "d", "prompt": "four", "mode": "img2img", "init_image": str(late)}]))
    out = str(tmp_path / "out")
    config = _config(shard_size=10)
    paths = shards.shard_paths(out, "shard-00000")
    def drop_a_row():  # a parquet that still reads
        table = pq.read_table(paths["parquet"])
        pq.write_table(table.slice(1), paths["parquet"])

    def drop_a_failure_line():  # a failures file that still reads
        lines = storage.read_text(paths["failures"]).splitlines(keepends=True)
        assert len(lines) == 2
        storage.write_bytes(paths["failures"], "".join(lines[1:]).encode())

    damages = {
        "tar": lambda: open(paths["tar"], "r+b").truncate(1536),  # at a member boundary: reads as a short tar
        "parquet cut short": lambda: open(paths["parquet"], "r+b").truncate(100),
        "parquet footer": lambda: _overwrite_tail(paths["parquet"], 40),  # pyarrow's OSError, not ArrowException
        "parquet row": drop_a_row,
        "failures cut short": lambda: open(paths["failures"], "r+b").truncate(20),
        "failures line dropped": drop_a_failure_line,
    }
    for part in ("parquet", "failures"):  # a shard missing a file is not complete: it renders whole
        job.run([str(manifest_path)], out, config, fresh=True, progress=False)
        os.remove(paths[part])
        again = job.run([str(manifest_path)], out, config, retry_failures=True, progress=False)
        assert (again.rendered, again.failed, again.rendered_shards) == (2, 2, 1), part
    for part, damage in damages.items():
        job.run([str(manifest_path)], out, config, fresh=True, progress=False)
        marker = open(paths["stats"]).read()
        damage()
        with pytest.raises(job.JobError, match=r"shard-00000 in .* is damaged: .*Delete .*shard-00000\.stats\.json "
                                               "and rerun the same command"):
            job.run([str(manifest_path)], out, config, retry_failures=True, progress=False)
        assert open(paths["stats"]).read() == marker, f"{part}: no new marker vouches for the damaged files"
        os.remove(paths["stats"])  # as the message says
        again = job.run([str(manifest_path)], out, config, progress=False)
        assert (again.rendered, again.failed) == (2, 2), part


@pytest.mark.pipeline
@pytest.mark.faults
def test_an_id_used_twice_renders_once_and_fails_the_rest_naming_the_first(tmp_path):
    """Within a file and across files: the first record in manifest order is rendered, each
    later one goes to the failures naming where the first is; a resumed run agrees."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "dup", "prompt": "first"}, {"id": "x", "prompt": "x"},
        {"id": "dup", "prompt": "again in a"}, {"id": "y", "prompt": "y"}]))
    b.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "z", "prompt": "z"}, {"id": "dup", "prompt": "again in b"}, {"prompt": "no id"}]))
    out = str(tmp_path / "out")
    config = _config(shard_size=2)
    summary = job.run([str(a), str(b)], out, config, progress=False)
    assert (summary.rendered, summary.failed) == (5, 2)
    ids, failures = _ids_in_output(out, str(tmp_path / "copy"))
    assert sorted(i for i in ids if len(i) < 20) == ["dup", "x", "y", "z"] and len(ids) == 5
    assert sorted((f["source"], f["line"]) for f in failures) == [(str(a), 3), (str(b), 2)]
    for f in failures:
        assert f["id"] == "dup" and f["stage"] == "manifest"
        # The line as written, so the record can be fixed and found again.
        prompt = "again in a" if f["source"] == str(a) else "again in b"
        assert f["record"] == json.dumps({"id": "dup", "prompt": prompt})
        assert f"duplicate id 'dup': the record at {a}:1 gives an image the same id and comes first" in f["reason"]
    table = pq.read_table(os.path.join(out, "shard-00000.parquet"))
    assert table.to_pylist()[0]["prompt"] == "first"

    # The shard holding b's duplicate is lost; rendering it again still knows about a:1.
    lost = next(f for f in sorted(glob.glob(os.path.join(out, "failures", "*.jsonl")))
                if str(b) in open(f).read())
    name = os.path.basename(lost)[: -len(".jsonl")]
    os.remove(shards.shard_paths(out, name)["stats"])
    again = job.run([str(a), str(b)], out, config, progress=False)
    assert again.rendered_shards == 1 and (again.rendered, again.failed) == (5, 2)
    assert [f["reason"] for f in shards.read_failures(out, name)] == [failures[-1]["reason"]]


@pytest.mark.pipeline
@pytest.mark.faults
@pytest.mark.parametrize("variant_first", [True, False])
def test_a_record_id_equal_to_another_records_variant_id_renders_once(tmp_path, variant_first):
    """num_images 2 gives 'cat' and 'cat_1': a record with id 'cat_1' shares an image id with
    it. Whichever comes first in the manifest keeps the id; the other image is a failure."""
    records = [{"id": "cat", "prompt": "cats", "num_images": 2}, {"id": "cat_1", "prompt": "one cat"}]
    if not variant_first:
        records.reverse()
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = str(tmp_path / "out")
    summary = job.run([str(path)], out, _config(), progress=False)
    assert (summary.rendered, summary.failed) == (2, 1)
    table = pq.read_table(os.path.join(out, "shard-00000.parquet")).to_pylist()
    rows = {r["id"]: r["prompt"] for r in table}
    assert rows == {"cat": "cats", "cat_1": "cats" if variant_first else "one cat"}
    ids, _ = _ids_in_output(out, str(tmp_path / "copy"))  # each image its own key in the tar
    assert sorted(ids) == ["cat", "cat_1"]
    (failure,) = shards.read_failures(out, "shard-00000")
    assert failure["id"] == "cat_1" and failure["line"] == 2
    assert f"duplicate id 'cat_1': the record at {path}:1" in failure["reason"]


@pytest.mark.pipeline
def test_records_without_ids_in_two_files_render_under_ids_of_their_own(tmp_path):
    """A derived id hashes the file's base name with the record number and the prompt: two
    prompt lists starting with the same line must not give one id (the second would fail
    as a duplicate)."""
    for name in ("cats.txt", "more-cats.txt"):
        (tmp_path / name).write_text("a cat\n")
    out = str(tmp_path / "out")
    summary = job.run([str(tmp_path / "*.txt")], out, _config(), progress=False)
    assert (summary.shards, summary.rendered, summary.failed) == (2, 2, 0)
    ids, _ = _ids_in_output(out, str(tmp_path / "copy"))
    assert len(set(ids)) == 2


def test_merged_id_counts_keep_the_earliest_record():
    """Dataflow combines an id's places in parts and merges them, in any order (the local
    runner never merges): the record that keeps a repeated id is still the first in the
    manifest."""
    combine = job.FirstOccurrence()
    early, late = job._pack_place(0, 1, 2), job._pack_place(3, 40, 41)
    parts = [combine.add_input(combine.create_accumulator(), late), combine.create_accumulator(),
             combine.add_input(combine.add_input(combine.create_accumulator(), early), late)]
    for order in (parts, parts[::-1]):
        assert combine.extract_output(combine.merge_accumulators(order)) == (3, early)


def test_local_runs_use_the_fnapi_runner_unless_told_otherwise():
    # Beam's own default may be Prism, which downloads a binary.
    from apache_beam.options.pipeline_options import StandardOptions

    options = job.pipeline_options([])
    assert options.view_as(StandardOptions).runner == "FnApiRunner" and job.is_local(options)
    assert job.pipeline_options(["--runner=DirectRunner"]).view_as(StandardOptions).runner == "DirectRunner"


def test_options_spelled_two_ways_are_one_run():
    explicit = job.RenderConfig(model="/m", upscaler="none", keep_base=True)
    assert explicit.identity() == job.RenderConfig(model="/m").identity()  # no upscaler, no base kept
    assert job.RenderConfig().identity() == job.RenderConfig(model="default").identity()
    assert job.RenderConfig().upscaler_path() == "default-x4"
    assert job.RenderConfig(upscaler="none").identity() != job.RenderConfig().identity()


# Settings that do not decide the images: a resumed run may change them.
_NOT_IDENTITY = ("batch_size", "dry_run_delay_s", "compilation_cache")
# Another value for each setting that decides the images, valid with _config(image_format="webp").
_OTHER_SETTINGS = {
    "model": "/models/other", "upscaler": "none", "width": 32, "height": 16, "steps": 4, "sampler": "euler",
    "guidance": 3.0, "upscale_steps": 5, "upscale_sampler": "ddim", "upscale_guidance": 4.0, "noise_level": 7,
    "negative_prompt": "blurry", "strength": 0.5, "clip_skip": 1, "seed": 1, "image_format": "png",
    "quality": 80, "keep_base": True, "shard_size": 4, "dtype": "float32", "variant": "fp16", "dry_run": False,
}


def _run_resumed_with(tmp_path, name: str, value):
    """(out, before, changed): a run folder whose run.json holds `before`'s settings, and
    those settings with `name` set to `value` (which must differ)."""
    before = _config(image_format="webp")
    changed = dataclasses.replace(before, **{name: value})
    assert getattr(changed, name) != getattr(before, name)
    out = str(tmp_path / "out")
    shards.write_json(storage.join(out, job.RUN_FILE), {"config": before.identity(),
                                                         "manifest": {"fingerprint": "sha256:m"}})
    return out, before, changed


@pytest.mark.faults
@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(job.RenderConfig) if f.name not in _NOT_IDENTITY])
def test_resuming_with_any_setting_that_decides_the_images_changed_is_refused_naming_it(tmp_path, name):
    """Each such setting is part of the run: resumed at another shard size, say, the
    committed shards would hold other records than their names say, and records would be
    in no shard. A setting added without a case here fails this test."""
    if name not in _OTHER_SETTINGS:
        pytest.fail(f"RenderConfig.{name} is new: add another value for it to _OTHER_SETTINGS, or to "
                    f"_NOT_IDENTITY if it does not change an image")
    out, before, changed = _run_resumed_with(tmp_path, name, _OTHER_SETTINGS[name])
    assert job.check_existing_run(out, "sha256:m", before) is not None  # the same settings resume
    with pytest.raises(job.RunConflict, match=rf"with different settings \((.*; )?{name}: "):
        job.check_existing_run(out, "sha256:m", changed)


# Another value for each setting that does not decide the images.
_OTHER_RUN_ONLY_SETTINGS = {"batch_size": 3, "dry_run_delay_s": 0.5, "compilation_cache": "gs://bucket/xla"}


@pytest.mark.parametrize("name", _NOT_IDENTITY)
def test_resuming_with_a_setting_that_does_not_decide_the_images_changed_is_allowed(tmp_path, name):
    """Another batch size, dry-run delay or compilation cache folder renders the same
    images: a run resumed with one picks up where the earlier run stopped."""
    out, _, changed = _run_resumed_with(tmp_path, name, _OTHER_RUN_ONLY_SETTINGS[name])
    assert job.check_existing_run(out, "sha256:m", changed) is not None


class _DescribedWeights:
    """The dry run, describing its model as the engine does: the weights' path, sha256 and dtype."""

    def __call__(self):
        class Renderer(DryRunRenderer):
            def describe(self):
                return super().describe() | {"base": {"path": "/models/sd", "sha256": "a" * 64, "dtype": "float32"}}

        return Renderer(2, width=16, height=8)


@pytest.mark.pipeline
@pytest.mark.faults
def test_resuming_with_other_weights_behind_the_same_path_is_refused(tmp_path):
    """The settings name the model by its path: weights replaced there render other images."""
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "one"}) + "\n")
    out = str(tmp_path / "out")

    def run():
        return job.run([str(path)], out, _config(), renderer_factory=_DescribedWeights(), progress=False)

    run()
    assert run().skipped_shards == 1  # the same weights resume
    record = json.loads(storage.read_text(os.path.join(out, job.RUN_FILE)))
    record["model"]["base"]["sha256"] = "b" * 64
    shards.write_json(os.path.join(out, job.RUN_FILE), record)
    with pytest.raises(job.RunConflict, match=r"other models \(base weights at /models/sd changed \(sha256\)\)"):
        run()


@pytest.mark.faults
def test_a_refused_resume_names_the_model_files_that_changed():
    """A folder whose render_defaults.json changed is refused naming that file, not as
    other weights; a file added or removed is named too."""
    before = {"base": {"path": "/models/sd", "dtype": "float32",
                       "sha256": {"unet/w.safetensors": "a" * 64, "render_defaults.json": "b" * 64}}}
    now = {"base": {"path": "/models/sd", "dtype": "float32",
                    "sha256": {"unet/w.safetensors": "a" * 64, "render_defaults.json": "c" * 64,
                               "vae/config.json": "d" * 64}}}
    with pytest.raises(job.RunConflict) as caught:
        job.check_same_models("out", before, now)
    assert "base files at /models/sd changed (sha256): render_defaults.json, vae/config.json" in str(caught.value)
    assert "unet/w.safetensors" not in str(caught.value)
    job.check_same_models("out", before, before)  # the same files resume


@pytest.mark.faults
def test_a_bad_setting_is_refused_before_the_run_is_recorded(tmp_path):
    """A setting refused for manifests (a width the model cannot take) leaves no run.json
    behind, so the corrected command is not taken for a different run."""
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"prompt": "a square"}) + "\n")
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="width"):
        job.run([str(path)], out, _config(width=12), progress=False)
    assert not os.path.exists(os.path.join(out, job.RUN_FILE))
    assert job.run([str(path)], out, _config(), progress=False).rendered == 1


def test_the_commands_settings_win_over_what_the_model_folders_recommend():
    """render_defaults.json fills only what the command leaves open: --guidance and
    --upscale-guidance given are the ones the run renders with and records."""
    from jaxdiff import render_defaults
    from jaxdiff.checkpoints import resolve_model

    base = render_defaults.read(resolve_model("default"))["guidance"]
    upscale = render_defaults.read(resolve_model("default-x4"), "upscale")["guidance"]
    left_open = job.with_model_defaults(job.RenderConfig())
    assert (left_open.guidance, left_open.upscale_guidance) == (base, upscale)
    given = job.with_model_defaults(job.RenderConfig(guidance=base + 1, upscale_guidance=upscale + 2))
    assert (given.guidance, given.upscale_guidance) == (base + 1, upscale + 2)
    assert given.identity()["guidance"] == base + 1


@pytest.mark.faults
def test_run_settings_take_their_whole_range_and_refuse_what_is_past_it():
    """--upscale-guidance 0 is valid (guidance at 1 or below turns the x4 stage's CFG off,
    as for the base); a width or height of 0 is refused where it is given, naming the
    option, instead of rendering at some default size."""
    assert job.RenderConfig(upscale_guidance=0.0).upscale_guidance == 0.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--upscale-guidance must be a finite number >= 0"):
            job.RenderConfig(upscale_guidance=bad)
    for name in ("width", "height"):
        with pytest.raises(ValueError, match=rf"--{name} must be >= 1, got 0"):
            job.RenderConfig(dry_run=True, **{name: 0})


@pytest.mark.faults
def test_a_committed_shard_rendered_again_withdraws_its_marker_first(tmp_path, monkeypatch):
    """A retried bundle can render a committed shard again: if that attempt dies after the
    new tar and before the new marker, no stale marker may vouch for the new tar."""
    from pipelines import manifest

    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD[:3]))
    out = str(tmp_path / "out")
    spec = manifest.plan_shards([str(path)], 5)[0]
    renderer, defaults = DryRunRenderer(2, width=16, height=8), job.manifest_defaults(_config())
    job.render_shard(spec, out, renderer, defaults, model_info={})
    assert shards.complete_shards(out) == {spec.name}
    write_bytes = storage.write_bytes

    def parquet_upload_fails(dest, data):
        if dest.endswith(".parquet"):
            raise OSError("simulated upload failure")
        return write_bytes(dest, data)

    monkeypatch.setattr(storage, "write_bytes", parquet_upload_fails)
    with pytest.raises(RuntimeError, match=rf"{spec.name} \(.*m\.jsonl, records 1 to 3\): OSError: simulated") as info:
        job.render_shard(spec, out, renderer, defaults, model_info={})
    assert isinstance(info.value.__cause__, OSError)
    assert shards.complete_shards(out) == set()  # the next run renders it afresh
    assert not _partials(out)  # temp files gone too


@pytest.mark.pipeline
@pytest.mark.faults
@pytest.mark.parametrize("where", ["local", "gcs"])
def test_a_marker_whose_files_another_attempt_replaced_is_withdrawn(where, tmp_path, request, monkeypatch):
    """Dataflow can run a shard's work again while a lost worker's first attempt still
    runs. When both commit at once, the marker that lands last can vouch for the other
    attempt's tar: the run's end finds the files replaced since, withdraws that marker and
    says so; the next run renders the shard again, and its checksums are the tar's."""
    import hashlib

    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    out = str(tmp_path / "out") if where == "local" else f"gs://{request.getfixturevalue('gcs_bucket')}/withdraw"
    config = _config()
    paths = shards.shard_paths(out, "shard-00001")
    write_json, landed = shards.write_json, []

    def other_attempts_tar_lands_after_the_marker(dest, value):
        write_json(dest, value)
        if dest == paths["stats"] and not landed:
            landed.append(dest)
            storage.write_bytes(paths["tar"], storage.read_bytes(paths["tar"])[:-1024])

    monkeypatch.setattr(shards, "write_json", other_attempts_tar_lands_after_the_marker)
    first = job.run([str(path)], out, config, progress=False)
    assert (first.withdrawn_shards, first.missing_shards) == (["shard-00001"], ["shard-00001"])
    assert "shard-00001: files changed since the marker, or the marker does not read (two attempts wrote" in first.text()
    assert not storage.exists(paths["stats"])
    index = json.loads(storage.read_text(storage.join(out, "index.json")))
    assert [e["url"] for e in index["shards"]] == ["shard-00000.tar", "shard-00002.tar"]

    second = job.run([str(path)], out, config, progress=False)
    assert second.complete and second.rendered_shards == 1 and second.rendered_now == 5
    index = json.loads(storage.read_text(storage.join(out, "index.json")))
    entry = next(e for e in index["shards"] if e["url"] == "shard-00001.tar")
    assert entry["sha256"] == hashlib.sha256(storage.read_bytes(paths["tar"])).hexdigest()
    ids, _ = _ids_in_output(out, str(tmp_path / "copy"))
    assert sorted(ids) == sorted(r["id"] for r in GOOD)


@pytest.mark.pipeline
@pytest.mark.faults
def test_a_shard_whose_files_were_deleted_renders_again(tmp_path):
    """Its marker alone does not make it complete: the index must not list a missing tar."""
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(_manifest_lines()) + "\n")
    out = str(tmp_path / "out")
    job.run([str(path)], out, _config(), progress=False)
    before = {name: open(p, "rb").read() for name in ("tar", "failures")
              for p in [shards.shard_paths(out, "shard-00002")[name]]}
    for part, name in (("tar", "shard-00002"), ("parquet", "shard-00001"), ("failures", "shard-00002")):
        os.remove(shards.shard_paths(out, name)[part])
        again = job.run([str(path)], out, _config(), progress=False)
        assert again.complete and again.rendered_shards == 1, part
    for part, name in (("tar", "shard-00002"), ("failures", "shard-00000")):  # with failures, and without
        os.remove(shards.shard_paths(out, name)[part])
        again = job.run([str(path)], out, _config(), retry_failures=True, progress=False)
        assert again.complete and shards.is_complete(out, name), part
    assert {name: open(shards.shard_paths(out, "shard-00002")[name], "rb").read() for name in before} == before
    _assert_every_id_once(*_ids_in_output(out, str(tmp_path / "copy")))


@pytest.mark.pipeline
@pytest.mark.faults
def test_fresh_deletes_every_file_of_the_earlier_run_and_nothing_else(tmp_path):
    """--fresh starts over: no tar, parquet or failures file of the earlier run stays behind
    for a reader that globs the folder (as the README reads the parquet rows) to take for
    this run's; files that are not the run's stay."""
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(_manifest_lines()) + "\n")  # four shards, failures in each
    out = tmp_path / "out"
    job.run([str(path)], str(out), _config(), progress=False)
    (out / "notes.txt").write_text("mine")
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps(GOOD[0]) + "\n")
    summary = job.run([str(small)], str(out), _config(), fresh=True, progress=False)
    assert (summary.shards, summary.rendered, summary.failed) == (1, 1, 0)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["failures/shard-00000.jsonl", "index.json", "notes.txt", "run.json", "shard-00000.parquet",
                     "shard-00000.stats.json", "shard-00000.tar"]
    table = pq.read_table(sorted(glob.glob(str(out / "*.parquet"))), schema=shards.PARQUET_SCHEMA)
    assert table.column("id").to_pylist() == [GOOD[0]["id"]]


@pytest.mark.pipeline
@pytest.mark.faults
def test_files_replaced_after_a_run_are_found_by_the_next_one_even_with_nothing_to_render(tmp_path):
    """A stopped driver never checks the shards its job committed; rerunning the command
    then renders nothing, and its end still finds a tar, a parquet or a failures file that
    is not the one its marker vouches for."""
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(_manifest_lines()) + "\n")  # shard-00001 has failures
    out = str(tmp_path / "out")
    job.run([str(path)], out, _config(), progress=False)
    paths = shards.shard_paths(out, "shard-00001")

    def without_a_row(data: bytes) -> bytes:
        table, buffer = pq.read_table(io.BytesIO(data)), io.BytesIO()
        pq.write_table(table.slice(1), buffer)
        return buffer.getvalue()

    replaced = {"tar": lambda data: data[:-1024], "parquet": without_a_row,
                "failures": lambda data: b"".join(data.splitlines(keepends=True)[1:])}
    for part, replace in replaced.items():
        storage.write_bytes(paths[part], replace(storage.read_bytes(paths[part])))
        again = job.run([str(path)], out, _config(), progress=False)
        assert (again.rendered_shards, again.withdrawn_shards) == (0, ["shard-00001"]), part
        assert not again.complete and not storage.exists(paths["stats"]), part
        rendered = job.run([str(path)], out, _config(), progress=False)
        assert rendered.complete and rendered.rendered_shards == 1, part
    _assert_every_id_once(*_ids_in_output(out, str(tmp_path / "copy")))


@pytest.mark.faults
def test_a_marker_or_run_record_that_does_not_read_is_said_so_and_the_run_recovers(tmp_path, caplog):
    """A commit marker cut short or edited vouches for nothing: a rerun withdraws it and
    the next renders its shard again; --retry-failures, which must read it to find the
    failures, renders the whole shard at once, saying so. A run.json that does not read
    cannot be checked against: refused, naming it, until --fresh."""
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(_manifest_lines()) + "\n")  # shard-00001 has failures
    out = str(tmp_path / "out")
    job.run([str(path)], out, _config(), progress=False)
    marker = shards.shard_paths(out, "shard-00001")["stats"]
    for damaged in ("", '{"shard": "shard-00001", "rendered": 5', '{"samples": 5}', "[1, 2]"):
        storage.write_bytes(marker, damaged.encode())
        with caplog.at_level(logging.WARNING, logger="pipelines"):
            retried = job.run([str(path)], out, _config(), retry_failures=True, progress=False)
        assert retried.complete and shards.read_stats(out, "shard-00001")["samples"] == 5, damaged
        assert f"shard-00001: its marker {marker} " in caplog.text and "the whole shard renders again" in caplog.text
        caplog.clear()
        _assert_every_id_once(*_ids_in_output(out, str(tmp_path / "copy")))
        storage.write_bytes(marker, damaged.encode())
        again = job.run([str(path)], out, _config(), progress=False)
        assert (again.withdrawn_shards, again.missing_shards) == (["shard-00001"], ["shard-00001"]), damaged
        assert (again.rendered_shards, again.skipped_shards) == (0, again.shards - 1), "the withdrawn one is missing"
        assert "shard-00001" not in [e["url"][:-4] for e in json.loads(storage.read_text(f"{out}/index.json"))["shards"]]
        rendered = job.run([str(path)], out, _config(), progress=False)
        assert rendered.complete and rendered.rendered_shards == 1, damaged
    _assert_every_id_once(*_ids_in_output(out, str(tmp_path / "copy")))

    run_file = os.path.join(out, "run.json")
    for damaged in ('{"config": {', "[]"):
        storage.write_bytes(run_file, damaged.encode())
        with pytest.raises(job.RunConflict, match=re.escape(run_file) + ".*pass --fresh"):
            job.run([str(path)], out, _config(), progress=False)
    assert job.run([str(path)], out, _config(), fresh=True, progress=False).complete


@pytest.mark.pipeline
def test_an_output_folder_copied_elsewhere_resumes_without_rendering_again(tmp_path):
    """Copied files have other versions than their markers record: only shards a run
    commits itself are checked against theirs."""
    import shutil

    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    job.run([str(path)], str(tmp_path / "out"), _config(), progress=False)
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    again = job.run([str(path)], str(tmp_path / "copy"), _config(), progress=False)
    assert again.complete and (again.skipped_shards, again.withdrawn_shards) == (3, [])


def _committed_shard(out: str, samples, **writer_options) -> dict:
    """Commits one shard of `samples` (dry-run images) with a ShardWriter; returns its marker."""
    renderer = DryRunRenderer(len(samples), width=16, height=8)
    writer = shards.ShardWriter(out, "shard-00000", **writer_options)
    for k, (sample, rendered) in enumerate(zip(samples, renderer.render_samples(samples))):
        writer.add(f"00000_{k:06d}", sample, rendered)
    return writer.commit()


def test_a_shards_parquet_rows_give_the_size_and_sha256_of_the_images_in_its_tar(tmp_path):
    """Users check or pick images by the parquet alone: each row's image_bytes and
    image_sha256 are those of the image file under its key in the tar, as webdataset reads it,
    and its other columns are the .json's."""
    import hashlib

    import webdataset as wds

    from jaxdiff.engine.sample import Sample

    out = str(tmp_path / "out")
    samples = [Sample(id="a", prompt="a red circle", seed=7),
               Sample(id="b", prompt="a blue square", negative_prompt="blurry", guidance=3.0, width=32,
                      mode="img2img", strength=0.4, init_image=np.zeros((8, 16, 3), np.uint8),
                      input_files={"init_image": "gs://b/photo.png", "init_image_sha256": "ab" * 32})]
    _committed_shard(out, samples, image_format="jpg")
    tar = {s["__key__"]: s for s in wds.WebDataset(os.path.join(out, "shard-00000.tar"), shardshuffle=False)}
    rows = pq.read_table(os.path.join(out, "shard-00000.parquet")).to_pylist()
    assert sorted(row["key"] for row in rows) == sorted(tar) and len(rows) == 2
    for row in rows:
        image, meta = tar[row["key"]]["jpg"], json.loads(tar[row["key"]]["json"])
        assert (row["image_bytes"], row["image_sha256"]) == (len(image), hashlib.sha256(image).hexdigest())
        assert row["format"] == "jpg" and Image.open(io.BytesIO(image)).format == "JPEG"
        for name in ("id", "prompt", "negative_prompt", "mode", "seed", "width", "height", "steps", "guidance",
                     "sampler", "strength"):
            assert row[name] == meta.get(name), name
        assert row["init_image"] == meta.get("init_image") and row["mask"] == meta.get("mask")
    assert {row["id"]: row["init_image"] for row in rows} == {"a": None, "b": "gs://b/photo.png"}


def test_the_largest_seed_a_manifest_takes_is_written_to_the_parquet(tmp_path):
    """Manifests take seeds up to 2**32 - 1: the shard holding one commits, and its parquet
    row gives the seed the image was rendered with."""
    from jaxdiff.engine.sample import Sample
    from pipelines.manifest import MAX_SEED

    out = str(tmp_path / "out")
    stats = _committed_shard(out, [Sample(id="top", prompt="a circle", seed=MAX_SEED),
                                   Sample(id="zero", prompt="a circle", seed=0)])
    assert stats["rendered"] == 2
    rows = pq.read_table(os.path.join(out, "shard-00000.parquet")).to_pylist()
    assert {row["id"]: row["seed"] for row in rows} == {"top": MAX_SEED, "zero": 0}


@pytest.mark.faults
def test_retrying_a_committed_shard_leaves_no_copy_of_its_tar_behind(tmp_path):
    """--retry-failures starts from a local copy of the committed tar (hundreds of MB for a
    real shard): it is removed when the retried shard commits, and when the shard turns out
    damaged."""
    from jaxdiff.engine.sample import Sample

    out = str(tmp_path / "out")
    samples = [Sample(id=f"s{i}", prompt=f"shape {i}") for i in range(3)]
    stats = _committed_shard(out, samples)
    writer = shards.ShardWriter(out, "shard-00000")
    assert writer.copy_committed(stats) == {"s0", "s1", "s2"}
    assert writer.commit()["tar_sha256"] == stats["tar_sha256"]  # the same members, byte for byte
    assert not _partials(out)

    damaged = dict(stats, tar_sha256="0" * 64)
    writer = shards.ShardWriter(out, "shard-00000")
    with pytest.raises(shards.DamagedShard, match="sha256"):
        writer.copy_committed(damaged)
    writer.abort()
    assert not _partials(out)


@pytest.mark.faults
@pytest.mark.parametrize("where", ["local", "gcs"])
def test_the_output_folder_check_leaves_nothing_behind_and_names_a_folder_it_cannot_write(
        where, tmp_path, request, monkeypatch):
    """A run first checks that it can write --out: the check's probe file is removed again,
    and any refusal, a local OSError or a GCS permission error alike, names the folder."""
    import re

    from google.api_core.exceptions import Forbidden

    out = str(tmp_path / "out") if where == "local" else f"gs://{request.getfixturevalue('gcs_bucket')}/probe"
    storage.write_bytes(storage.join(out, "keep.txt"), b"x")
    shards.check_writable(out)
    assert storage.list_dir(out) == ["keep.txt"]

    def refused(dest, data):
        if where == "local":
            raise PermissionError(13, "Permission denied", dest)
        raise Forbidden(f"POST {dest}: caller does not have storage.objects.create access")

    monkeypatch.setattr(storage, "write_bytes", refused)
    refusal = re.escape(f"cannot write to the output folder '{out}'") + ".*with write permission"
    with pytest.raises(OSError, match=refusal):
        shards.check_writable(out)


@pytest.mark.faults
def test_a_run_starts_by_removing_what_a_killed_run_left_half_written(tmp_path):
    """A worker killed while writing leaves temporary files in the output folder and in its
    failures/ folder; the next run removes both, and nothing else."""
    out = str(tmp_path / "out")
    paths = shards.shard_paths(out, "shard-00000")
    for path in paths.values():
        storage.write_bytes(path, b"committed\n")
    partials = [storage.local_temp_for(paths[part]) for part in ("tar", "parquet", "failures", "stats")]
    assert {os.path.dirname(p) for p in partials} == {out, os.path.join(out, shards.FAILURES_DIR)}
    shards.remove_partials(out)
    assert not any(os.path.exists(p) for p in partials)
    assert all(storage.read_bytes(path) == b"committed\n" for path in paths.values())


@pytest.mark.faults
def test_metadata_is_strict_json_and_parquet_agrees_with_it(tmp_path):
    """Pass-through NaN and Infinity become strings (bare NaN is not JSON), lone surrogates
    in pass-through text are escaped, and the parquet's guidance is the .json's."""
    import tarfile

    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "prompt": "p", "guidance": 7.3, "score": NaN, "w": -Infinity, '
                    '"note": "x \\ud83d", "model": "my label"}\n')
    out = str(tmp_path / "out")
    summary = job.run([str(path)], out, _config(), progress=False)
    assert (summary.rendered, summary.failed) == (1, 0)

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))

    with tarfile.open(os.path.join(out, "shard-00000.tar")) as tar:
        meta = strict(tar.extractfile("00000_000000.json").read())
    assert meta["manifest"] == {"score": "NaN", "w": "-Infinity", "note": "x \ud83d", "model": "my label"}
    assert isinstance(meta["model"], dict)  # the run's model record, not the record's field
    row = pq.read_table(os.path.join(out, "shard-00000.parquet")).to_pylist()[0]
    assert strict(row["metadata"]) == meta["manifest"] and row["guidance"] == meta["guidance"] == 7.3


@pytest.mark.faults
def test_failures_lines_are_strict_json_when_the_record_holds_nan(tmp_path):
    """A failed record from a parquet manifest is kept in failures/ as its fields: a NaN or
    infinite number among them is written as text, so that every line reads as strict JSON."""
    import pyarrow as pa

    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["ok", "empty"], "prompt": ["a circle", ""],
                             "score": [0.5, float("nan")], "w": [1.0, float("-inf")]}), path)
    out = str(tmp_path / "out")
    summary = job.run([str(path)], out, _config(), progress=False)
    assert (summary.rendered, summary.failed) == (1, 1)
    text = storage.read_text(shards.shard_paths(out, "shard-00000")["failures"])
    failure = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert failure["id"] == "empty" and "empty prompt" in failure["reason"]
    assert (failure["record"]["score"], failure["record"]["w"]) == ("NaN", "-Infinity")
    assert shards.read_failures(out, "shard-00000") == [failure]


@pytest.mark.pipeline
def test_metadata_nested_too_deep_to_write_fails_its_id_not_the_shard(tmp_path):
    """A pass-through field that JSON reads but the writer could not write back (nested
    hundreds deep: a RecursionError that failed the shard on every retry) fails that record
    alone; the shard commits with nothing of it in the tar."""
    path = tmp_path / "m.jsonl"
    deep = "[" * 600 + "1" + "]" * 600
    path.write_text('{"id": "ok", "prompt": "p"}\n{"id": "deep", "prompt": "p", "x": ' + deep + '}\n')
    out = str(tmp_path / "out")
    summary = job.run([str(path)], out, _config(), progress=False)
    assert summary.complete and (summary.rendered, summary.failed) == (1, 1)
    [failure] = shards.read_failures(out, "shard-00000")
    assert (failure["id"], failure["stage"]) == ("deep", "manifest")
    assert "field 'x' is nested more than 64 levels deep" in failure["reason"]
    with tarfile.open(os.path.join(out, "shard-00000.tar")) as tar:
        assert sorted(tar.getnames()) == ["00000_000000.json", "00000_000000.png", "00000_000000.txt"]
    assert pq.read_table(os.path.join(out, "shard-00000.parquet")).column("id").to_pylist() == ["ok"]


@pytest.mark.pipeline
@pytest.mark.parametrize("shared", [False, True])
def test_run_inference_handler_renders_samples(shared):
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.testing.util import assert_that, equal_to

    from jaxdiff.engine.sample import Sample
    from pipelines.handler import JaxDiffusionModelHandler

    handler = JaxDiffusionModelHandler(job.RendererFactory(_config(batch_size=2)), batch_size=2,
                                       share_across_processes=shared)
    samples = [Sample(id=f"s{i}", prompt="p", seed=i) for i in range(5)] + [Sample(id="odd", prompt="p", width=12)]
    with beam.Pipeline("FnApiRunner") as p:
        results = (p | beam.Create(samples) | RunInference(handler)
                   | beam.Map(lambda r: (r.id, None if r.image is None else r.image.shape, r.error is None)))
        expected = [(f"s{i}", (8, 16, 3), True) for i in range(5)] + [("odd", None, False)]
        assert_that(results, equal_to(expected))


def test_run_inference_handler_batches_shares_and_refuses_as_asked():
    """The handler hands Beam its batch limits, shares one model across a worker's
    processes only when asked, and refuses per-call inference_args, which it would
    otherwise drop without a word."""
    from jaxdiff.engine.sample import Sample
    from pipelines.handler import JaxDiffusionModelHandler

    factory = job.RendererFactory(_config(batch_size=2))
    handler = JaxDiffusionModelHandler(factory, batch_size=2, share_across_processes=True,
                                       max_batch_duration_secs=5)
    assert handler.share_model_across_processes()
    assert not JaxDiffusionModelHandler(factory).share_model_across_processes()
    assert handler.batch_elements_kwargs() == {"min_batch_size": 1, "max_batch_size": 2,
                                               "max_batch_duration_secs": 5}
    model = handler.load_model()
    samples = [Sample(id="a", prompt="p", seed=1), Sample(id="b", prompt="q", seed=2)]
    assert [r.id for r in handler.run_inference(samples, model)] == ["a", "b"]
    with pytest.raises(ValueError, match=r"inference_args are not used by jaxdiff \(got \['guidance'\]\)"):
        handler.run_inference(samples, model, {"guidance": 3.0})
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        JaxDiffusionModelHandler(factory, batch_size=0)


@pytest.mark.pipeline
def test_run_inference_renders_batches_larger_than_the_renderers_own():
    """Beam grows RunInference's batches up to the handler's batch_size (8 by default),
    whatever the renderer's: the dry-run renderer, as the engine, renders any number of
    samples in batches of its own size, each image the one it renders alone."""
    from jaxdiff.engine.sample import Sample
    from pipelines.handler import JaxDiffusionModelHandler

    handler = JaxDiffusionModelHandler(job.RendererFactory(_config(batch_size=2)))
    model = handler.load_model()
    samples = [Sample(id=f"s{i}", prompt="p", seed=i) for i in range(5)]
    results = handler.run_inference(samples, model)
    assert [r.id for r in results] == [s.id for s in samples]
    for sample, result in zip(samples, results):
        np.testing.assert_array_equal(result.image, model.render_samples([sample])[0].image)


def test_dry_run_placeholders_follow_each_samples_seed_and_record_its_settings():
    """A record's own seed picks its placeholder (two ids given one seed draw one image;
    without a seed, each id its own), and the metadata gives the seed and the guidance the
    sample asked for, 0 included."""
    from jaxdiff.engine.sample import Sample

    renderer = DryRunRenderer(4, width=16, height=8)
    a, b, c, d = renderer.render_samples([Sample(id="a", prompt="p", seed=5, guidance=0.0),
                                          Sample(id="b", prompt="q", seed=5), Sample(id="c", prompt="p"),
                                          Sample(id="d", prompt="p")])
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(c.image, d.image)
    assert (a.metadata["seed"], a.metadata["guidance"], b.metadata["guidance"]) == (5, 0.0, 7.5)


class _UnevenRenderer:
    """The dry run's images, but every batch's first one large (slow to compress), so a
    pool of encoders finishes a batch's images out of order."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._inner = DryRunRenderer(batch_size, width=16, height=8)

    def describe(self) -> dict:
        return self._inner.describe()

    def render_samples(self, samples):
        results = self._inner.render_samples(samples)
        noise = np.random.default_rng(len(samples)).integers(0, 256, (512, 512, 3), dtype=np.uint8)
        results[0].image = noise
        for r in results:
            r.base_image = r.image[::2, ::2]
        return results


@pytest.mark.pipeline
def test_shards_are_the_same_whatever_the_number_of_encoder_threads(tmp_path):
    from pipelines import manifest

    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text("\n".join(_manifest_lines()) + "\n")
    spec = manifest.plan_shards([str(manifest_path)], 100)[0]
    defaults = job.manifest_defaults(_config())
    outputs = []
    for encoders in (1, 4):
        out = str(tmp_path / f"out{encoders}")
        threads = job.ShardThreads(encoders)
        try:
            job.render_shard(spec, out, _UnevenRenderer(4), defaults, model_info={}, keep_base=True,
                             threads=threads)
        finally:
            threads.shutdown()
        with tarfile.open(os.path.join(out, "shard-00000.tar")) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar]
        outputs.append((members, pq.read_table(os.path.join(out, "shard-00000.parquet")).to_pylist()))
        assert "timings" not in json.loads(members[1][1])  # they differ from run to run
    (tar1, rows1), (tar4, rows4) = outputs
    assert len(rows1) == len(GOOD) and rows1 == rows4
    assert tar1 == tar4  # same members, same order, same bytes
    assert open(os.path.join(tmp_path, "out1", "shard-00000.tar"), "rb").read() == \
        open(os.path.join(tmp_path, "out4", "shard-00000.tar"), "rb").read()
    assert [name for name, _ in tar4][:4] == ["00000_000000.png", "00000_000000.json", "00000_000000.txt",
                                              "00000_000000.base.png"]
    keys = [row["key"] for row in rows4]
    assert keys == sorted(keys)


@pytest.mark.faults
def test_a_failed_write_is_raised_after_every_write_has_finished():
    # A shard that fails is aborted (its temporary tar removed) right after the drain:
    # a later write still running then would write into the aborted shard, or the next.
    threads = job.ShardThreads(2)
    writes = job._Writes(threads, depth=10)
    finished = []

    def fail():
        raise RuntimeError("disk full")

    def slow():
        time.sleep(0.3)
        finished.append("slow")

    try:
        writes.submit(fail)
        writes.submit(slow)
        with pytest.raises(RuntimeError, match="disk full"):
            writes.drain()
        assert finished == ["slow"]
    finally:
        threads.shutdown()


class _RecordingRenderer(DryRunRenderer):
    """The dry run, keeping the ids of each batch it was given."""

    def __init__(self, batch_size: int):
        super().__init__(batch_size, width=16, height=8)
        self.batches: list[list[str]] = []

    def render_samples(self, samples):
        self.batches.append([s.id for s in samples])
        return super().render_samples(samples)


# Which shards the renderer has been given samples of (ids r0.. r7, four a shard), shared
# with the test: a local runner renders with the very renderer object the run loaded.
_SHARDS_RENDERED: set[int] = set()


class _ShardTrackingFactory:
    def __call__(self):
        class Renderer(DryRunRenderer):
            def render_samples(self, samples):
                _SHARDS_RENDERED.update(int(s.id[1:]) // 4 for s in samples)
                return super().render_samples(samples)
        return Renderer(2, width=16, height=8)


@pytest.mark.pipeline
def test_a_shards_upload_runs_while_the_next_shard_renders(tmp_path, monkeypatch):
    """A worker commits a finished shard (uploads its tar: seconds on GCS) on a thread of its
    own, so the accelerator renders the next shard meanwhile instead of waiting."""
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"p {i}"}) + "\n" for i in range(8)))
    _SHARDS_RENDERED.clear()
    put_file = storage.put_file
    seen_during_first_upload: list[set[int]] = []

    def upload(local_path, dest):
        if dest.endswith(".tar") and not seen_during_first_upload:
            uploading = int(os.path.basename(dest)[len("shard-"):-len(".tar")])
            deadline = time.monotonic() + 30  # a commit that blocked the renders would wait it out
            while not _SHARDS_RENDERED - {uploading} and time.monotonic() < deadline:
                time.sleep(0.01)
            seen_during_first_upload.append(set(_SHARDS_RENDERED))
        return put_file(local_path, dest)

    monkeypatch.setattr(storage, "put_file", upload)
    summary = job.run([str(path)], str(tmp_path / "out"), _config(shard_size=4), progress=False,
                      renderer_factory=_ShardTrackingFactory())
    assert summary.complete and summary.rendered == 8
    assert seen_during_first_upload == [{0, 1}], "the other shard rendered while the first one uploaded"


@pytest.mark.pipeline
@pytest.mark.faults
def test_a_commit_that_fails_beside_the_next_shard_fails_the_run_naming_its_shard(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"p {i}"}) + "\n" for i in range(12)))
    out = str(tmp_path / "out")
    put_file = storage.put_file

    def upload(local_path, dest):
        if dest.endswith("shard-00001.tar"):
            raise OSError("simulated upload failure")
        return put_file(local_path, dest)

    monkeypatch.setattr(storage, "put_file", upload)
    with pytest.raises(job.JobError, match=r"shard-00001 \(.*m\.jsonl, records 5 to 8\): OSError: simulated"):
        job.run([str(path)], out, _config(shard_size=4), progress=False)
    assert "shard-00001" not in shards.complete_shards(out)
    assert not _partials(out)
    monkeypatch.setattr(storage, "put_file", put_file)
    summary = job.run([str(path)], out, _config(shard_size=4), progress=False)
    assert summary.complete and summary.rendered == 12
    ids, failures = _ids_in_output(out, str(tmp_path / "copy"))
    assert sorted(ids) == sorted(f"r{i}" for i in range(12)) and not failures


@pytest.mark.pipeline
def test_guidance_on_and_off_fill_batches_of_their_own(tmp_path):
    # The engine renders guidance <= 1 (CFG off) at half the batch in programs of their
    # own: a batch mixing both would be split into two padded ones.
    from pipelines import manifest

    guidance = [7.5, 1.0, 3.0, 0.0, 1.5, 1.0]
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text("".join(json.dumps({"id": f"g{i}", "prompt": "p", "guidance": g}) + "\n"
                                     for i, g in enumerate(guidance)))
    spec = manifest.plan_shards([str(manifest_path)], 100)[0]
    renderer = _RecordingRenderer(2)
    stats = job.render_shard(spec, str(tmp_path / "out"), renderer, job.manifest_defaults(_config()),
                             model_info={})
    assert stats["rendered"] == len(guidance)
    assert renderer.batches == [["g0", "g2"], ["g1", "g3"], ["g4"], ["g5"]]


@pytest.mark.pipeline
def test_samples_of_many_shapes_render_part_filled_batches_as_they_come(tmp_path, monkeypatch):
    # Each record its own size (photos of many sizes): batches never fill, and waiting for
    # them held every record's images until the shard's end. Now at most two batches' worth
    # wait, the fullest going part-filled.
    from pipelines import manifest

    prepared = []
    prepare = job._prepare_record
    monkeypatch.setattr(job, "_prepare_record", lambda *args: prepared.append(1) or prepare(*args))
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text("".join(json.dumps({"id": f"s{i}", "prompt": "p", "width": 64, "height": 64 * (i + 1)})
                                     + "\n" for i in range(30)))
    spec = manifest.plan_shards([str(manifest_path)], 100)[0]
    renderer = _RecordingRenderer(4)
    seen_at_render = []
    record = renderer.render_samples
    monkeypatch.setattr(renderer, "render_samples", lambda samples: seen_at_render.append(len(prepared)) or
                        record(samples))
    stats = job.render_shard(spec, str(tmp_path / "out"), renderer, job.manifest_defaults(_config(height=None)),
                             model_info={})
    assert stats["rendered"] == 30 and sorted(i for b in renderer.batches for i in b) == sorted(f"s{i}" for i in range(30))
    assert seen_at_render[0] <= 2 * 4 + 1 + 2 * 4, "the first batch went before every record was read"


@pytest.mark.pipeline
def test_the_next_batchs_input_images_load_while_a_batch_renders(tmp_path, monkeypatch):
    # Init images load on reader threads ahead of the renders: a gs:// read takes tens of ms,
    # and 16 of them one after another would leave an accelerator idle between batches.
    import threading

    from pipelines import manifest

    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "init.png")
    records = [{"id": f"r{i}", "prompt": "p", "mode": "img2img", "init_image": str(tmp_path / "init.png")}
               for i in range(8)] + [{"id": "bad", "prompt": "p", "mode": "img2img", "init_image": "missing.png"}]
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded, reader_threads = threading.Condition(), set()
    count = [0]
    real_load = manifest._load_input

    def counting_load(uri, max_side, field):
        loaded_image = real_load(uri, max_side, field)
        with loaded:
            count[0] += 1
            reader_threads.add(threading.current_thread().name)
            loaded.notify_all()
        return loaded_image

    monkeypatch.setattr(manifest, "_load_input", counting_load)

    class WaitingRenderer(_RecordingRenderer):
        def render_samples(self, samples):
            if not self.batches:  # the first batch waits for the second's images, loaded meanwhile
                with loaded:
                    assert loaded.wait_for(lambda: count[0] >= 4, timeout=10), "no image loaded ahead"
            return super().render_samples(samples)

    renderer = WaitingRenderer(2)
    stats = job.render_shard(manifest.plan_shards([str(manifest_path)], 100)[0], str(tmp_path / "out"), renderer,
                             job.manifest_defaults(_config()), model_info={})
    assert (stats["rendered"], stats["failed"]) == (8, 1)
    assert renderer.batches == [[f"r{i}", f"r{i + 1}"] for i in range(0, 8, 2)]  # in manifest order
    assert reader_threads and all(name.startswith("record-reader") for name in reader_threads)
    (failure,) = shards.read_failures(str(tmp_path / "out"), "shard-00000")
    assert failure["id"] == "bad" and "does not exist" in failure["reason"]


@pytest.mark.pipeline
def test_storage_benchmark_runs_reads_and_writes(gcs_emulator):
    from tools import bench_storage

    read_bytes, put_file = storage.read_bytes, storage.put_file
    result = bench_storage.main(["--n", "6", "--batch-size", "4", "--batch-seconds", "0",
                                 "--read-latency", "0.01"])
    assert result["rendered"] == 6 and result["floor_seconds"] == 0 and result["seconds"] > 0
    result = bench_storage.main(["--mode", "txt2img", "--n", "6", "--batch-size", "4", "--batch-seconds", "0",
                                 "--size", "32", "--format", "jpg", "--shard-size", "3",
                                 "--upload-mb-per-s", "1000"])
    assert result["rendered"] == 6 and result["mode"] == "txt2img"
    # The tests' own emulator, reads and uploads are back.
    assert os.environ["STORAGE_EMULATOR_HOST"] == gcs_emulator
    assert storage.read_bytes is read_bytes and storage.put_file is put_file


def test_read_ahead_keeps_order_and_stops_at_its_depth_or_its_bytes():
    import concurrent.futures

    from jaxdiff.engine.sample import Sample

    class Inline(concurrent.futures.Executor):  # each record prepared when submitted: counts are exact
        def submit(self, fn, *args):
            future = concurrent.futures.Future()
            future.set_result(fn(*args))
            return future

    def run(**limits):
        prepared, handed = [], []
        for record, result in job._read_ahead(range(10), lambda r: prepared.append(r) or r, Inline(), **limits):
            handed.append((record, result, len(prepared)))
        assert [(r, res) for r, res, _ in handed] == [(r, r) for r in range(10)]
        return max(n - r for r, _, n in handed)  # how far ahead of the record handed on

    assert run(depth=5) == 5
    assert run(depth=5, max_bytes=250, size=lambda r: 100) == 3  # 300 bytes held: no more read ahead
    image, mask = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)
    variants = [Sample(id=f"v{i}", prompt="p", init_image=image, mask=mask) for i in range(3)]
    assert job._input_bytes([(v, v) for v in variants]) == 48 + 16  # shared by the variants: counted once


def test_the_jobs_counters_count_each_shards_rendered_images_and_failures(tmp_path, monkeypatch):
    """Dataflow shows the job's 'rendered' and 'failed' counters while it runs: each adds
    its shard's own counts, the last shard of a bundle included."""
    import apache_beam as beam
    from apache_beam.utils import shared

    from pipelines import manifest

    counts: dict[str, int] = {}

    class Counter:
        def __init__(self, namespace, name):
            self.name = name

        def inc(self, n=1):
            counts[self.name] = counts.get(self.name, 0) + n

    monkeypatch.setattr(beam.metrics.Metrics, "counter", Counter)
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(_manifest_lines()) + "\n")
    config = _config()
    specs = manifest.plan_shards([str(path)], config.shard_size)
    fn = job.RenderShardFn(str(tmp_path / "out"), job.RendererFactory(config), job.manifest_defaults(config),
                           image_format="png", quality=None, keep_base=False, retry_failures=False,
                           shared_handle=shared.Shared())
    fn.setup()
    try:
        fn.start_bundle()
        stats = [s for spec in specs for s in fn.process(spec)] + [w.value for w in fn.finish_bundle()]
    finally:
        fn.teardown()
    assert [s["shard"] for s in stats] == [spec.name for spec in specs]
    assert counts == {"rendered": len(GOOD), "failed": len(BAD)}


def test_the_summarys_images_per_second_counts_only_what_this_run_rendered():
    """A resumed run that rendered 10 of the output's 100 images in 2 s says 5.0 images/s."""
    summary = job.Summary(rendered=100, failed=0, processed_now=10, rendered_now=10, shards=10, rendered_shards=1,
                          skipped_shards=9, missing_shards=[], seconds=2.0)
    assert summary.images_per_s == 5.0
    assert summary.text().startswith("rendered 100, failed 0 (see failures/), shards 10 (1 rendered now, "
                                     "9 already complete), 2.0 s, 5.0 images/s")
