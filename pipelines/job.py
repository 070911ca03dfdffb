"""The render job: manifests in, committed shards out, resumable, every id accounted for.

    expand patterns -> plan shards (stable names) -> drop complete shards -> Reshuffle
    -> RenderShardFn: read the shard's slice, make Samples, render in fixed-size batches,
       write tar + parquet + failures, then the stats marker

The driver writes `run.json` before the pipeline starts and `index.json` after it ends,
and watches committed stats files for the progress bar. A `renderer_factory` (a
picklable callable returning an object with `batch_size`, `render_samples(samples)`,
`describe()` and, where it prepares samples itself, `prepare_all(samples)`) is the coupling
to the engine.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import threading
import time
from typing import Callable, Iterable, Iterator, Mapping

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import DebugOptions, GoogleCloudOptions, PipelineOptions, StandardOptions
from apache_beam.utils import shared

import jaxdiff
from jaxdiff import storage
from jaxdiff.engine.pipeline import RenderSettings
from jaxdiff.engine.sample import Sample, guidance_on
from pipelines import dry_run, manifest, shards

# Runners in this process, by the name Beam takes in any case, with or without "Runner".
LOCAL_RUNNERS = ("fnapi", "direct", "bundlebaseddirect", "switchingdirect")
DRY_RUN_SIZE = 64  # a dry run's image side when --width / --height are not given
RUN_FILE = "run.json"
INDEX_FILE = "index.json"
log = logging.getLogger(__name__)


class RunConflict(RuntimeError):
    """The output folder holds a run made from another manifest or with other settings."""


class JobError(RuntimeError):
    """A whole-run problem (not one bad record): named, with the fix."""


@dataclasses.dataclass(frozen=True)
class RenderConfig:
    """Run-wide settings. All but batch_size, dry_run_delay_s and compilation_cache decide the images."""

    model: str | None = None          # None: the shipped default model
    upscaler: str | None = None       # None: checkpoints.upscaler_for's choice; "none": no upscaling
    width: int | None = None          # None: the model's native size
    height: int | None = None
    # None: what the model folder's render_defaults.json recommends, else SD's 25 / dpmpp_2m / 7.5.
    steps: int | None = None
    sampler: str | None = None
    guidance: float | None = None
    # The x4 stage's own; None: what the upscaler folder recommends, else the engine's.
    upscale_steps: int | None = None
    upscale_sampler: str | None = None
    upscale_guidance: float | None = None
    noise_level: int | None = None
    negative_prompt: str = ""         # for records without their own
    strength: float | None = None     # img2img records without their own; None: the engine's 0.75
    clip_skip: int = 0                # text encoder layers skipped from the top
    seed: int = 0
    image_format: str = "png"
    quality: int | None = None        # jpg / webp only; None: shards.DEFAULT_QUALITY
    keep_base: bool = False
    shard_size: int = 1000
    dtype: str | None = None
    variant: str | None = None        # diffusers' weight variant, e.g. "fp16"
    dry_run: bool = False
    batch_size: int = 8
    dry_run_delay_s: float = 0.0
    # Where compiled programs persist (None: $JAXDIFF_CACHE_DIR or ~/.cache/jaxdiff/xla); a
    # gs:// folder serves all of a job's workers.
    compilation_cache: str | None = None

    def __post_init__(self):
        shards.save_options(self.image_format, self.quality)
        for name, low in (("steps", 1), ("shard_size", 1), ("batch_size", 1), ("upscale_steps", 1),
                          ("noise_level", 0), ("clip_skip", 0)):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if self.upscale_guidance is not None and not (math.isfinite(self.upscale_guidance)
                                                      and self.upscale_guidance >= 0):
            raise ValueError(f"--upscale-guidance must be a finite number >= 0, got {self.upscale_guidance}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")

    def upscaler_path(self) -> str | None:
        """The upscaler this config loads, by name (see checkpoints.upscaler_for)."""
        from jaxdiff.checkpoints import upscaler_for

        return upscaler_for(self.model, self.upscaler)

    def identity(self) -> dict:
        """The settings a resumed run must share with the run that wrote the output: each
        that changes an image, in one spelling."""
        out = dataclasses.asdict(self)
        # The batch size changes an image only through rounding (README "Python API"): a
        # resumed run may take another. The delay only slows a dry run; the cache only
        # spares compiles.
        del out["batch_size"], out["dry_run_delay_s"], out["compilation_cache"]
        out["model"] = self.model or "default"
        out["upscaler"] = self.upscaler_path()
        out["keep_base"] = self.keep_base and out["upscaler"] is not None
        out["quality"] = shards.save_options(self.image_format, self.quality).get("quality")
        return out

    def open_settings(self) -> dict:
        """steps, sampler and guidance where this config sets them."""
        return {k: getattr(self, k) for k in ("steps", "sampler", "guidance") if getattr(self, k) is not None}

    def settings(self) -> dict:
        """Run-wide render defaults, as the engine's RenderSettings names them."""
        return {"width": self.width, "height": self.height, "steps": self.steps, "sampler": self.sampler,
                "guidance": self.guidance, "seed": self.seed, "keep_base": self.keep_base,
                "negative_prompt": self.negative_prompt, "strength": self.strength, "clip_skip": self.clip_skip,
                "upscale_steps": self.upscale_steps, "upscale_sampler": self.upscale_sampler,
                "upscale_guidance": self.upscale_guidance, "noise_level": self.noise_level}


@dataclasses.dataclass(frozen=True)
class RendererFactory:
    """Builds the renderer in a worker: the engine, or the dry-run renderer."""

    config: RenderConfig
    size_multiple: int | None = None  # the model's, as the driver read it (None: read it here)

    def __call__(self):
        c = self.config
        if c.dry_run:
            return dry_run.DryRunRenderer(c.batch_size, width=c.width or DRY_RUN_SIZE,
                                          height=c.height or DRY_RUN_SIZE, seed=c.seed,
                                          canvas_multiple=self.size_multiple or model_size_multiple(c),
                                          delay_s=c.dry_run_delay_s, **c.open_settings())
        from jaxdiff.engine import load_pipeline

        return load_pipeline(c.model, c.upscaler_path() or "none", dtype=c.dtype, variant=c.variant,
                             batch_size=c.batch_size, compilation_cache=c.compilation_cache,
                             **c.settings())


def with_model_defaults(config: RenderConfig) -> RenderConfig:
    """`config` with the settings it leaves open taken from the model's and the upscaler's
    render_defaults.json, so the run's record, the resume check and every worker agree."""
    if config.dry_run:
        return config
    from jaxdiff import render_defaults
    from jaxdiff.checkpoints import resolve_model

    folder = resolve_model(config.model or "default")
    recommended = render_defaults.read(folder)
    # The file's values are held to the limits a record's are (guidance up to 50, say):
    # else the run's settings check would blame a flag the command never passed.
    taken = {k: v for k, v in recommended.items() if k in ("steps", "guidance") and getattr(config, k) is None}
    try:
        manifest.RenderDefaults(**taken)
    except manifest.SettingError as e:
        raise ValueError(f"{storage.join(folder, render_defaults.FILE)}: {e}; edit the file, or set "
                         f"--{e.name} for this run") from e
    if config.upscaler_path() is not None:
        upscale = render_defaults.read(resolve_model(config.upscaler_path()), "upscale")
        recommended.update({render_defaults.UPSCALE_SETTINGS[k]: v for k, v in upscale.items()})
    return dataclasses.replace(config, **{k: v for k, v in recommended.items() if getattr(config, k) is None})


def model_size_multiple(config: RenderConfig) -> int:
    """What the run's model takes each side of a render to be a multiple of (16 for the
    shipped model, 64 for SD), read from its configs; SD's 64 where they cannot be read
    here (the model's loader then names what is wrong)."""
    from jaxdiff.checkpoints import resolve_model, size_multiple

    try:
        return size_multiple(resolve_model(config.model or "default"))
    except Exception:  # missing, unreadable (permissions, credentials) or malformed configs
        return manifest.RenderDefaults.size_multiple


def manifest_defaults(config: RenderConfig) -> manifest.RenderDefaults:
    """The run's defaults and limits for manifest records."""
    values = ({"seed": config.seed, "size_multiple": model_size_multiple(config),
               "negative_prompt": config.negative_prompt} | config.open_settings())
    if config.strength is not None:
        values["strength"] = config.strength
    if values.get("sampler") not in manifest.RenderDefaults.samplers:
        values.pop("sampler", None)  # the engine names an unknown sampler in each failure
    if config.width is not None:
        values["width"] = config.width
    if config.height is not None:
        values["height"] = config.height
    if config.dry_run:
        # The dry run draws any multiple of 8, so tiny images can test a huge manifest;
        # records' own sizes are checked as a real run checks them.
        values.update(run_size_multiple=dry_run.SIZE_MULTIPLE, run_max_side=dry_run.MAX_SIDE)
    try:
        return manifest.RenderDefaults(**values)
    except manifest.SettingError as e:
        raise ValueError(f"invalid run setting {e} (the command's --{e.name.replace('_', '-')})") from e


# ---- one shard ----------------------------------------------------------------------------

def _shape_key(sample: Sample) -> tuple:
    """What fixes a compiled program: samples sharing it fill one batch (the engine would
    split a batch that mixes guidance on and off into two padded ones)."""
    return (sample.width, sample.height, sample.steps, sample.sampler, sample.mode, guidance_on(sample.guidance))


# Records read ahead of the renders, in batches: their init images and masks load (a gs://
# read takes tens of ms) while the accelerator renders the batch before them. Fewer once
# the decoded images read ahead pass READ_AHEAD_BYTES (an 8192 px image is 192 MiB).
READ_AHEAD_BATCHES = 2
READ_AHEAD_BYTES = 256 << 20
READER_THREADS = 4  # each holds an image mid-decode; four already hide 40 ms reads (docs/performance.md)


class ShardThreads:
    """The threads behind the renders: a pool reads records' input images ahead, one thread
    writes each shard's files in order, a pool compresses images, one thread commits each
    finished shard (uploads its files) while the next one renders. Pillow lets go of the GIL
    while it decodes and compresses, and reads and uploads wait on storage, so none of this
    holds an accelerator back (one encoder alone, 60 ms a 512 px PNG, would; a shard's
    upload, seconds, would leave it idle between shards)."""

    def __init__(self, encoders: int | None = None, readers: int = READER_THREADS):
        self.readers = concurrent.futures.ThreadPoolExecutor(readers, thread_name_prefix="record-reader")
        self.writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self.committer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shard-committer")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.encoders = concurrent.futures.ThreadPoolExecutor(encoders or cores or 1, thread_name_prefix="image-encoder")

    def shutdown(self) -> None:
        self.readers.shutdown(cancel_futures=True)
        self.writer.shutdown()
        self.committer.shutdown()
        self.encoders.shutdown()


def _read_ahead(records: Iterable, prepare: Callable, pool: concurrent.futures.Executor, depth: int,
                max_bytes: float = math.inf, size: Callable = lambda result: 0) -> Iterator[tuple]:
    """(record, prepare(record)) in the records' order, with up to `depth` records prepared
    ahead on `pool`, and no more once the prepared ones hold over `max_bytes` (by `size`).
    prepare's exceptions are raised here, at their record."""
    window: collections.deque = collections.deque()

    def full() -> bool:
        if len(window) >= depth:
            return True
        ready = (future.result() for _, future in window if future.done() and not future.exception())
        return sum(map(size, ready)) > max_bytes

    try:
        for record in records:
            window.append((record, pool.submit(prepare, record)))
            while window and full():
                first, future = window.popleft()
                yield first, future.result()
        while window:
            first, future = window.popleft()
            yield first, future.result()
    finally:
        for _, future in window:  # the shard stopped early: reads not yet begun are dropped
            future.cancel()


class _Writes:
    """Shard writes in order on the writer thread, at most `depth` batches behind the
    renders; each batch's images are compressed meanwhile on the encoder pool."""

    def __init__(self, threads: ShardThreads, depth: int = 2):
        self._threads, self._depth = threads, depth
        self._futures: collections.deque = collections.deque()

    def encode(self, writer: shards.ShardWriter, rendered) -> concurrent.futures.Future:
        return self._threads.encoders.submit(writer.encode, rendered)

    def submit(self, fn: Callable, *args) -> None:
        self._futures.append(self._threads.writer.submit(fn, *args))
        while len(self._futures) > self._depth:
            self._futures.popleft().result()

    def drain(self) -> None:
        """Waits for every write; then raises the first that failed. None is left running
        when it returns, so an aborted shard's files are not written to after."""
        futures, self._futures = list(self._futures), collections.deque()
        concurrent.futures.wait(futures)
        for future in futures:
            future.result()


def _failure(raw, reason: str, stage: str, sample_id: str) -> dict:
    return manifest.Failure(id=sample_id, source=raw.source, line=raw.line, reason=reason, stage=stage,
                            record=raw.text if raw.text is not None else raw.fields).to_json()


# ---- ids used by more than one record ----------------------------------------------------

# A record's place packed in one int, (shard index, record index, line), which orders as
# the manifest does: a local runner holds one per distinct id, so it is kept small.
_PLACE_BITS = 40


def _pack_place(shard: int, record: int, line: int) -> int:
    return (shard << 2 * _PLACE_BITS) | (record << _PLACE_BITS) | line


def _unpack_place(place: int) -> tuple[int, int, int]:
    mask = (1 << _PLACE_BITS) - 1
    return place >> 2 * _PLACE_BITS, (place >> _PLACE_BITS) & mask, place & mask


def shard_sample_ids(spec, defaults) -> Iterator[tuple[str, int]]:
    """(id, packed place of its record) for each image id the shard's records would give:
    a record's id and its variants' ({id}_1, ...), which another record's id can equal."""
    for raw in manifest.read_shard(spec):
        place = _pack_place(spec.index, raw.index, raw.line)
        for sample_id in manifest.sample_ids(raw, defaults):
            yield sample_id, place


class FirstOccurrence(beam.CombineFn):
    """(how many records carry an id, the place of the first of them in manifest order)."""

    def create_accumulator(self):
        return 0, None

    def add_input(self, accumulator, place):
        count, first = accumulator
        return count + 1, place if first is None or place < first else first

    def merge_accumulators(self, accumulators):
        count, first = 0, None
        for n, place in accumulators:
            count += n
            if place is not None and (first is None or place < first):
                first = place
        return count, first

    def extract_output(self, accumulator):
        return accumulator


def duplicate_ids(specs, defaults) -> beam.PTransform:
    """id -> (shard index, record index, source, line) of its first record, for image ids
    that more than one record of the whole manifest gives (every shard is read, done or not)."""

    files = {spec.index: spec.file for spec in specs}

    def first_record(item):
        record_id, (_, place) = item
        shard, record, line = _unpack_place(place)
        return record_id, (shard, record, files[shard], line)

    @beam.ptransform_fn
    def expand(pipeline):
        return (pipeline
                | "AllShards" >> beam.Create(specs, reshuffle=False)
                | "SpreadIdReads" >> beam.Reshuffle()
                | "SampleIds" >> beam.FlatMap(shard_sample_ids, defaults)
                | "CountIds" >> beam.CombinePerKey(FirstOccurrence())
                | "Repeated" >> beam.Filter(lambda kv: kv[1][0] > 1)
                | "FirstRecord" >> beam.Map(first_record))

    return expand()


def _duplicate_failure(raw, sample_id: str, first: tuple) -> dict:
    _, _, source, line = first
    return _failure(raw, f"duplicate id {sample_id!r}: the record at {source}:{line} gives an image the same "
                         "id and comes first in the manifest, so the id is its (its image's, or its failure's: "
                         "see failures/); give every record its own id "
                         "(num_images > 1 also uses {id}_1, {id}_2, ...), or leave id out to derive one",
                    "manifest", sample_id)


# ---- rendering ----------------------------------------------------------------------------

def render_shard(spec, out: str, renderer, defaults, **options) -> dict:
    """Renders one shard and commits it; returns its stats. Raises on a whole-shard error.
    `options`: those of `render_shard_files`."""
    return render_shard_files(spec, out, renderer, defaults, **options)()


def render_shard_files(spec, out: str, renderer, defaults, *, model_info: dict, image_format: str = "png",
                       quality: int | None = None, keep_base: bool = False, retry_failures: bool = False,
                       threads: ShardThreads | None = None,
                       duplicates: Mapping[str, tuple] | None = None) -> Callable[[], dict]:
    """Renders one shard's files; returns the call that commits them and returns the
    shard's stats. Committing uploads the shard's tar (hundreds of MB to GCS), so a worker
    runs it beside the next shard's renders (RenderShardFn). Raises on a whole-shard error.

    `duplicates` (from `duplicate_ids`): a record whose id an earlier record carries goes
    to the failures instead of being rendered.
    """
    # Lines of the shard's file to render again; a shard is one file's range, so the line
    # alone names a record, wherever the manifest has moved since.
    retry_lines: set[int] | None = None
    old_failures: list[dict] = []
    writer = shards.ShardWriter(out, spec.name, image_format=image_format, quality=quality, keep_base=keep_base,
                                model=model_info)
    own_threads = threads is None
    threads = threads or ShardThreads()
    writes = _Writes(threads)
    try:
        rendered_ids: set[str] = set()
        # A shard without all its files renders whole (its marker is withdrawn at commit).
        if retry_failures and shards.is_complete(out, spec.name):
            stats = shards.read_stats(out, spec.name)
            try:
                old_failures = shards.read_failures(out, spec.name)
            except ValueError as e:  # a line cut short
                raise shards.DamagedShard(out, spec.name, f"its failures file does not read ({e})") from e
            if len(old_failures) != stats["failed"]:
                raise shards.DamagedShard(out, spec.name, f"failures/ holds {len(old_failures)} lines, its marker "
                                                          f"counts {stats['failed']}")
            if not old_failures:
                writer.abort()
                return lambda: stats
            retry_lines = {f["line"] for f in old_failures}
            rendered_ids = writer.copy_committed(stats)

        buckets: dict[tuple, list] = {}

        def render(batch: list) -> None:
            results = renderer.render_samples([item for *_, item in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"renderer returned {len(results)} results for {len(batch)} samples")
            encoded = [writes.encode(writer, result) if _has_image(result) else None for result in results]
            writes.submit(_write_batch, writer, batch, results, encoded)

        seen_lines = set()
        wanted = (raw for raw in manifest.read_shard(spec) if retry_lines is None or raw.line in retry_lines)
        depth = max(READ_AHEAD_BATCHES * renderer.batch_size, READER_THREADS)
        prepare_all = getattr(renderer, "prepare_all", None)  # the engine's: init images to render size
        reads = _read_ahead(wanted, lambda raw: _prepare_record(raw, defaults, prepare_all), threads.readers,
                            depth, READ_AHEAD_BYTES, _input_bytes)
        with contextlib.closing(reads) as prepared:  # a shard that fails stops its reads
            for raw, result in prepared:
                seen_lines.add(raw.line)
                position = raw.index - spec.first_record
                if isinstance(result, manifest.Failure):
                    # One line for each id the record would have given ({id}, {id}_1, ...).
                    for sample_id in manifest.sample_ids(raw, defaults) or [result.id]:
                        writes.submit(writer.add_failure, dataclasses.replace(result, id=sample_id).to_json())
                    continue
                for j, (sample, item) in enumerate(result):
                    first = (duplicates or {}).get(sample.id)
                    if first is not None and tuple(first[:2]) != (spec.index, raw.index):
                        writes.submit(writer.add_failure, _duplicate_failure(raw, sample.id, first))
                        continue
                    if sample.id in rendered_ids:
                        continue
                    if isinstance(item, _Refused):
                        writes.submit(writer.add_failure, _failure(raw, item.reason, "render", sample.id))
                        continue
                    key = f"{spec.index:05d}_{position:06d}" + (f"_{j}" if j else "")
                    bucket = buckets.setdefault(_batch_key(sample, item), [])
                    bucket.append((key, raw, sample, item))
                    if len(bucket) == renderer.batch_size:
                        render(buckets.pop(_batch_key(sample, item)))
                    elif sum(map(len, buckets.values())) > READ_AHEAD_BATCHES * renderer.batch_size:
                        # Samples of many shapes (photos of many sizes) would wait for batches that
                        # may never fill, holding their images: the fullest goes part-filled.
                        render(buckets.pop(max(buckets, key=lambda k: len(buckets[k]))))
        for bucket in buckets.values():
            if bucket:
                render(bucket)
        for failure in old_failures:  # a record no longer read stays recorded, not lost
            if failure["line"] not in seen_lines:
                writes.submit(writer.add_failure, failure)
        writes.drain()
    except BaseException as e:
        try:
            writes.drain()
        except Exception:
            pass
        writer.abort()
        raise _shard_error(spec, e)
    finally:
        if own_threads:
            threads.shutdown()

    def commit() -> dict:
        try:
            return writer.commit()
        except BaseException as e:
            writer.abort()
            raise _shard_error(spec, e)
    return commit


def _shard_error(spec, e: BaseException) -> BaseException:
    """The error to raise for a shard: what went wrong, naming the shard and its records."""
    if isinstance(e, Exception) and not isinstance(e, shards.DamagedShard):
        error = RuntimeError(f"{spec.name} ({spec.file}, records {spec.first_record + 1} to {spec.end_record}): "
                             f"{e.__class__.__name__}: {e}")
        error.__cause__ = e
        return error
    return e


@dataclasses.dataclass(frozen=True)
class _Refused:
    """A sample the renderer's prepare refused: its failure, written as it is read."""
    reason: str


def _prepare_record(raw, defaults, prepare_all: Callable | None):
    """A record's Failure, or its (sample, what the renderer takes) pairs: the renderer's
    own preparation, where it has one, done here on a reader thread (a record's variants
    share their prepared images)."""
    result = manifest.to_samples(raw, defaults)
    if isinstance(result, manifest.Failure):
        return result
    if prepare_all is None:
        return [(sample, sample) for sample in result]
    # The engine's RenderError (a ValueError): a sample it cannot render as asked.
    return [(sample, _Refused(str(item)) if isinstance(item, ValueError) else item)
            for sample, item in zip(result, prepare_all(result))]


def _batch_key(sample: Sample, item) -> tuple:
    """Which samples share a batch: the renderer's key for those it prepared (the compiled
    program they share), else what fixes a program as far as the sample tells."""
    return ("prepared", item.batch_key) if item is not sample else _shape_key(sample)


def _input_bytes(result) -> int:
    """The input images a prepared record holds, as read and as prepared (its variants
    share the ones read)."""
    if isinstance(result, manifest.Failure):
        return 0
    arrays = {}
    for pair in result:
        for held in pair:  # a Sample's init_image and mask; a PreparedSample's image and mask
            for name in ("init_image", "mask", "image"):
                value = getattr(held, name, None)
                if isinstance(value, np.ndarray):
                    arrays[id(value)] = value
    return sum(a.nbytes for a in arrays.values())


def _has_image(result) -> bool:
    return not result.error and result.image is not None


def _write_batch(writer: shards.ShardWriter, batch: list, results: list, encoded: list) -> None:
    for (key, raw, sample, _), result, images in zip(batch, results, encoded):
        if _has_image(result):
            writer.add(key, sample, result, images.result())
        else:
            writer.add_failure(_failure(raw, result.error or "renderer returned no image", "render", sample.id))


class RenderShardFn(beam.DoFn):
    """Renders whole shards; the renderer loads once per worker process and is shared by its threads."""

    def __init__(self, out: str, renderer_factory: Callable, defaults, *, image_format: str, quality: int | None,
                 keep_base: bool, retry_failures: bool, shared_handle: shared.Shared):
        self._out, self._factory, self._defaults = out, renderer_factory, defaults
        self._image_format, self._quality, self._keep_base = image_format, quality, keep_base
        self._retry = retry_failures
        self._shared = shared_handle
        self._rendered = beam.metrics.Metrics.counter("jaxdiff", "rendered")
        self._failed = beam.metrics.Metrics.counter("jaxdiff", "failed")

    def setup(self):
        storage.remove_stale_uploads()  # what killed workers on this machine left on its disk
        self._renderer = self._shared.acquire(self._factory)
        self._model_info = self._renderer.describe()
        self._threads = ShardThreads()

    def start_bundle(self):
        self._commit = None  # the last shard's commit, running beside the next shard's renders

    def process(self, spec, duplicates=None):
        try:
            commit = render_shard_files(
                spec, self._out, self._renderer, self._defaults, model_info=self._model_info,
                image_format=self._image_format, quality=self._quality, keep_base=self._keep_base,
                retry_failures=self._retry, threads=self._threads, duplicates=duplicates)
        except BaseException:
            self._wait()
            raise
        # One thread commits, in order: the previous shard's commit is done (or failed)
        # before this one's starts, so at most two shards' tars wait on disk.
        previous, self._commit = self._commit, self._threads.committer.submit(commit)
        yield from self._stats(previous)

    def finish_bundle(self):
        last, self._commit = self._commit, None
        for stats in self._stats(last):
            yield beam.transforms.window.GlobalWindows.windowed_value(stats)

    def _stats(self, commit) -> Iterator[dict]:
        """A shard's stats, once its commit is done; its error, if it failed."""
        if commit is None:
            return
        try:
            stats = commit.result()
        except BaseException:
            self._wait()
            raise
        self._rendered.inc(stats["rendered"])  # on the bundle's thread, where Beam's metrics count
        self._failed.inc(stats["failed"])
        yield stats

    def _wait(self) -> None:
        """Lets the commit in flight land before the bundle fails: its retry's commit of the
        same shard then comes after it, not beside it."""
        if self._commit is not None:
            concurrent.futures.wait([self._commit])

    def teardown(self):
        if getattr(self, "_threads", None):
            self._threads.shutdown()


# ---- run records --------------------------------------------------------------------------

def _versions() -> dict:
    versions = {"jaxdiff": jaxdiff.__version__, "apache_beam": beam.__version__, "python": platform.python_version()}
    for name in ("jax", "flax", "numpy"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return versions


# Settings that neither the command nor a model folder set render at the engine's own
# defaults: a run that names such a default renders the same images as one that left it open.
_ENGINE_DEFAULTS = ("steps", "sampler", "guidance", "upscale_steps", "upscale_guidance", "noise_level", "strength")


def _with_engine_defaults(identity: dict) -> dict:
    defaults = RenderSettings()
    return {k: getattr(defaults, k) if k in _ENGINE_DEFAULTS and v is None else v for k, v in identity.items()}


def _differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_existing_run(out: str, fingerprint: str, config: RenderConfig) -> dict | None:
    """The existing run.json, or None; RunConflict when it was made from other inputs."""
    path = storage.join(out, RUN_FILE)
    if not storage.exists(path):
        return None
    try:
        existing = json.loads(storage.read_text(path))
        why = f"a JSON {type(existing).__name__}, not an object"
    except ValueError as e:  # not JSON, or not UTF-8
        existing, why = None, str(e)
    if not isinstance(existing, dict):
        raise RunConflict(f"{path} does not read as the record of a run ({why}): it was cut short or edited, "
                          f"so what rendered the shards here cannot be checked. To start over in this folder and "
                          f"delete its shards, pass --fresh; or choose another --out.")
    problems = []
    if existing.get("manifest", {}).get("fingerprint") != fingerprint:
        problems.append("from a different manifest (its fingerprint changed)")
    recorded = dict(existing.get("config", {}))
    if "quality" not in recorded and recorded.get("image_format") in shards.FORMATS:
        # Recorded before --quality existed: jpg and webp were written at the default quality.
        recorded["quality"] = shards.save_options(recorded["image_format"]).get("quality")
    # A setting added since that run was recorded: the run rendered at its default.
    fields = {f.name: f.default for f in dataclasses.fields(RenderConfig)}
    for name in config.identity():
        recorded.setdefault(name, fields[name])
    diffs = _differences(_with_engine_defaults(recorded), _with_engine_defaults(config.identity()))
    if diffs:
        problems.append("with different settings (" + "; ".join(diffs) + ")")
    if problems:
        raise RunConflict(
            f"{out} holds a run made {' and '.join(problems)}. To resume it, rerun with its manifest and "
            f"settings; to start over in this folder and delete its shards, pass --fresh; or choose another --out.")
    return existing


def check_same_models(out: str, recorded: dict, loaded: dict) -> None:
    """RunConflict when the models loaded now differ from the ones the output was rendered
    with: other weights behind the same path, or another dtype (None resolves per platform:
    bf16 on accelerators, fp32 on CPU)."""
    diffs = []
    for part in ("base", "upscaler"):
        before, now = recorded.get(part), loaded.get(part)
        if not isinstance(before, dict) or not isinstance(now, dict):
            continue  # not recorded (a run launched for a remote runner), or no such stage
        if before.get("dtype") != now.get("dtype"):
            diffs.append(f"{part} dtype: {before.get('dtype')} -> {now.get('dtype')}")
        old_sums, new_sums = before.get("sha256"), now.get("sha256")
        if old_sums != new_sums:
            if isinstance(old_sums, dict) and isinstance(new_sums, dict):
                # Name the files: a changed render_defaults.json or config is not other weights.
                changed = sorted(n for n in old_sums.keys() | new_sums.keys() if old_sums.get(n) != new_sums.get(n))
                diffs.append(f"{part} files at {now.get('path')} changed (sha256): {', '.join(changed)}")
            else:
                diffs.append(f"{part} weights at {now.get('path')} changed (sha256)")
    if diffs:
        raise RunConflict(f"{out} holds a run rendered with other models ({'; '.join(diffs)}). To resume it, "
                          f"load the same weights with the same --dtype; to start over, pass --fresh; or "
                          f"choose another --out.")


def _per_chip(record: dict) -> int | None:
    """Samples per chip of a run.json: from the loaded renderer's record where the driver had
    one (batch size padded to the chips), else None."""
    model = record.get("model") or {}
    if isinstance(model.get("batch_size"), int) and model.get("devices"):
        return model["batch_size"] // len(model["devices"])
    return None


def batch_shape_note(out: str, recorded: dict, now: dict) -> str | None:
    """A note when this run splits its batches otherwise than the run recorded in `out`: the
    batch size is not part of a run's identity, but its images differ by rounding at another
    per-chip batch (README "Python API"), visibly in bfloat16."""
    before, after = _per_chip(recorded), _per_chip(now)
    unit = "per chip"
    if before is None or after is None:  # a remote runner's record: only the command's batch size
        before, after, unit = recorded.get("batch_size"), now.get("batch_size"), "a batch"
    if before is None or before == after:
        return None
    dtypes = {part.get("dtype") for part in ((now.get("model") or {}).get(p) for p in ("base", "upscaler"))
              if isinstance(part, dict)}
    effect = ("one level at most (float32)" if dtypes == {"float32"}
              else "a few levels, some edges by tens, in bfloat16 or float16")
    return (f"{out} was rendered {before} samples {unit}, this run renders {after}: its images differ from "
            f"what the earlier batch size renders by rounding, {effect}. To render the rest as before, rerun "
            f"with the earlier --batch-size ({recorded.get('batch_size')}) on as many chips.")


def clear_output(out: str) -> None:
    """Deletes what a run wrote to `out` (markers first, so nothing half-deleted looks complete)."""
    names = shards.list_files(out)
    owned = [n for n in names if n.startswith("shard-") or n in (RUN_FILE, INDEX_FILE)]
    for name in sorted(owned, key=lambda n: not n.endswith(shards.STATS_SUFFIX)):
        storage.delete(storage.join(out, name))
    failures = storage.join(out, shards.FAILURES_DIR)
    for name in shards.list_files(failures):
        storage.delete(storage.join(failures, name))


def write_index(out: str, markers: list[dict]) -> dict:
    """index.json: every shard (its stats marker) with counts and checksums, readable by
    webdataset's `wids`."""
    entries, rendered, failed = [], 0, 0
    for stats in markers:
        rendered += stats["rendered"]
        failed += stats["failed"]
        entries.append({"url": stats["tar"], "nsamples": stats["rendered"], "failed": stats["failed"],
                        "filesize": stats["tar_bytes"], "sha256": stats["tar_sha256"],
                        "parquet": stats["shard"] + ".parquet"})
    index = {
        "wids_version": 1,
        "name": "jaxdiff render",
        # wids cannot index an empty tar: shards whose every sample failed stay in "shards" only.
        "shardlist": [{"url": e["url"], "nsamples": e["nsamples"]} for e in entries if e["nsamples"]],
        "shards": entries,
        "rendered": rendered,
        "failed": failed,
    }
    shards.write_json(storage.join(out, INDEX_FILE), index)
    return index


# ---- progress -----------------------------------------------------------------------------

class ProgressWatcher(threading.Thread):
    """Polls the output for new stats markers and drives a tqdm bar over manifest records
    (done / total, images rendered, images/s, ETA); a shard's records count once its marker
    exists. `earlier`: the markers of shards rendered again (--retry-failures) as they were
    before the run: such a shard counts once its marker changes, and only its new images."""

    def __init__(self, out: str, records: dict[str, int], *, earlier: dict[str, dict] | None = None,
                 interval_s: float = 1.0, enabled: bool = True):
        super().__init__(daemon=True, name="jaxdiff-progress")
        self._out, self._records, self._interval = out, dict(records), interval_s
        self._earlier = dict(earlier or {})
        self._stopping = threading.Event()
        self._enabled = enabled
        self.images = 0
        self._t0 = time.time()

    def poll(self, bar) -> None:
        """Counts the shards committed since the last poll."""
        try:
            done = shards.complete_shards(self._out) & self._records.keys()
        except Exception:  # a transient listing error must not end the run
            done = set()
        records = 0
        for name in done:
            try:
                stats = shards.read_stats(self._out, name)
            except Exception:
                continue
            earlier = self._earlier.get(name)
            if stats == earlier:
                continue
            self.images += stats["rendered"] - (earlier or {}).get("rendered", 0)
            records += self._records.pop(name)
        rate = self.images / max(time.time() - self._t0, 1e-9)
        bar.set_postfix(images=self.images, img_s=f"{rate:.1f}", refresh=False)
        bar.update(records)  # after the postfix: the bar redraws the records and images together

    def run(self):
        from tqdm import tqdm

        with tqdm(total=sum(self._records.values()), unit="record", disable=not self._enabled,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            wait = self._interval
            while True:
                stopping = self._stopping.wait(wait)
                started = time.monotonic()
                self.poll(bar)
                # A large output on GCS takes a while to list: the bar then lists at most a
                # fifth of the time, not without pause.
                wait = max(self._interval, 4 * (time.monotonic() - started))
                if stopping:
                    break

    def stop(self):
        self._stopping.set()
        self.join()


# ---- the whole run ------------------------------------------------------------------------

@dataclasses.dataclass
class Summary:
    rendered: int             # in the whole output, this run and earlier ones
    failed: int
    processed_now: int        # samples this run rendered or recorded as failed
    rendered_now: int         # images this run rendered
    shards: int
    rendered_shards: int
    skipped_shards: int
    missing_shards: list[str]
    seconds: float
    # Markers withdrawn: their files changed, or they did not read.
    withdrawn_shards: list[str] = dataclasses.field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every id accounted for: each planned shard has its commit marker."""
        return not self.missing_shards

    @property
    def images_per_s(self) -> float:
        return self.rendered_now / max(self.seconds, 1e-9)

    def text(self) -> str:
        line = (f"rendered {self.rendered}, failed {self.failed} (see failures/), shards {self.shards} "
                f"({self.rendered_shards} rendered now, {self.skipped_shards} already complete), "
                f"{self.seconds:.1f} s, {self.images_per_s:.1f} images/s")
        if self.missing_shards:
            count = len(self.missing_shards)
            line += f"; INCOMPLETE: {count} shard{'s' * (count != 1)} not committed (rerun the same command)"
        if self.withdrawn_shards:
            line += (f"; {', '.join(self.withdrawn_shards)}: files changed since the marker, or the marker "
                     f"does not read (two attempts wrote them at once, or they were edited), so the marker was "
                     f"withdrawn and the shard renders again on the rerun")
        return line


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    """Beam options from pass-through flags; locally FnApiRunner (never Prism: it downloads a
    binary). On Dataflow workers with GPUs or TPUs, one SDK process a worker and one thread
    in it, unless the flags say otherwise (`_one_renderer_per_worker`)."""
    options = PipelineOptions(list(beam_args))
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = "FnApiRunner"
    if _runner_name(options) in ("dataflow", "testdataflow"):
        _one_renderer_per_worker(options)
    return options


def _one_renderer_per_worker(options: PipelineOptions) -> None:
    """Dataflow starts an SDK process per vCPU unless told not to: on an accelerator worker
    each would load the model and claim the chips (JAX takes 75% of a GPU's memory a
    process; a TPU's chips open in one process only), so all but the first fail. One
    process renders on every local chip, and one thread keeps its batches full (a finished
    shard's upload and its images' encoding have threads of their own)."""
    service = options.view_as(GoogleCloudOptions).dataflow_service_options or []
    if not any(o.strip().startswith("worker_accelerator") for o in service):
        return
    debug = options.view_as(DebugOptions)
    if not {"use_multiple_sdk_containers", "no_use_multiple_sdk_containers"} & set(debug.experiments or []):
        debug.add_experiment("no_use_multiple_sdk_containers")
    if debug.number_of_worker_harness_threads is None:
        debug.number_of_worker_harness_threads = 1


def build_pipeline(options: PipelineOptions, specs: list, out: str, renderer_factory: Callable, defaults,
                   config: RenderConfig, *, retry_failures: bool = False,
                   shared_handle: shared.Shared | None = None, all_specs: list | None = None) -> beam.Pipeline:
    """The job graph (nothing runs until `.run()`): renders `specs`, the shards still to do,
    checking ids against every shard of the manifest (`all_specs`, default `specs`)."""
    pipeline = beam.Pipeline(options=options)
    duplicates = pipeline | "DuplicateIds" >> duplicate_ids(all_specs or specs, defaults)
    _ = (
        pipeline
        | "PlannedShards" >> beam.Create(specs, reshuffle=False)
        # Spread shards over workers; a shard's samples stay together on one worker.
        | "SpreadShards" >> beam.Reshuffle()
        | "RenderShards" >> beam.ParDo(RenderShardFn(
            out, renderer_factory, defaults, image_format=config.image_format, quality=config.quality,
            keep_base=config.keep_base, retry_failures=retry_failures, shared_handle=shared_handle or shared.Shared()),
            duplicates=beam.pvalue.AsDict(duplicates))
    )
    return pipeline


def _index_committed(out: str, specs: list, *, withdraw: bool = True) -> tuple[set[str], dict, list[str]]:
    """(names of the committed shards, the index written for them, the shards whose markers
    were withdrawn). With `withdraw`, a shard whose files changed since its marker (another
    attempt replaced them, or they were damaged) is withdrawn: it renders again on the next
    run, where its checksums would be wrong; so is one whose marker does not read, which is
    never indexed."""
    done = shards.complete_shards(out)
    markers, unreadable = {}, []
    for spec in specs:
        if spec.name in done:
            try:
                markers[spec.name] = shards.read_stats(out, spec.name)
            except shards.DamagedShard:  # a marker that cannot vouch for anything: never indexed
                unreadable.append(spec.name)
                done.discard(spec.name)
    withdrawn = (unreadable + shards.overwritten_shards(out, markers)) if withdraw else []
    for name in withdrawn:
        storage.delete(shards.shard_paths(out, name)["stats"])
        markers.pop(name, None)
        done.discard(name)
    return done, write_index(out, list(markers.values())), withdrawn


def _runner_name(options: PipelineOptions) -> str:
    """The runner as Beam's create_runner matches it: any case, "Runner" optional."""
    runner = options.view_as(StandardOptions).runner
    return runner.split(".")[-1].lower().removesuffix("runner") if isinstance(runner, str) else ""


def is_local(options: PipelineOptions) -> bool:
    return _runner_name(options) in LOCAL_RUNNERS


def _check_dataflow(options: PipelineOptions, out: str, files: list[str]) -> None:
    """Before anything is written, for a Dataflow job: the launcher has Beam's Dataflow
    clients, and the paths the workers read and write are gs://. A path on this machine
    would fail there, or leave each worker's shards on its own disk."""
    runner = options.view_as(StandardOptions).runner
    if _runner_name(options) not in ("dataflow", "testdataflow"):
        return
    try:
        from apache_beam.runners.dataflow.internal import apiclient  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--runner {runner} needs Beam's Dataflow clients ({e}): install jaxdiff with them, "
                         "pip install 'jaxdiff[dataflow]' (or -e '.[dataflow]' in a checkout)") from e
    for flag, path in [("--out", out)] + [("manifest", f) for f in files]:
        if not storage.is_gcs(path):
            raise ValueError(f"{flag} {path} is on this machine, where Dataflow's workers cannot reach it: "
                             f"give a gs:// path")


def run(manifests: list[str], out: str, config: RenderConfig, *, beam_args: Iterable[str] = (),
        renderer_factory: Callable | None = None, fresh: bool = False, retry_failures: bool = False,
        progress: bool = True, shared_handle: shared.Shared | None = None) -> Summary:
    """Renders every record of `manifests` into shards under `out`; returns the run's summary.

    `shared_handle`: a handle through which a renderer was already acquired in this
    process (a warmed engine, say), for in-process runners to reuse.

    Raises manifest.ManifestError, RunConflict or JobError for whole-run problems.
    """
    started = time.time()
    if storage.is_gcs(str(out)) and not str(out)[len(storage.GCS_PREFIX):].partition("/")[0]:
        raise ValueError(f"--out {out} names no bucket: give gs://BUCKET or gs://BUCKET/PREFIX")
    out = str(out).rstrip("/") if storage.is_gcs(str(out)) else str(out)
    config = with_model_defaults(config)
    defaults = manifest_defaults(config)  # bad settings fail here, before run.json is written
    files = manifest.expand_patterns(list(manifests))
    options = pipeline_options(list(beam_args))
    _check_dataflow(options, out, files)
    shards.check_writable(out)
    fingerprint = manifest.manifest_fingerprint(files)
    if fresh:
        clear_output(out)
    existing = check_existing_run(out, fingerprint, config)
    shards.remove_partials(out)

    specs = manifest.plan_shards(files, config.shard_size)
    done = shards.complete_shards(out)
    pending = [s for s in specs if s.name not in done]
    earlier: dict[str, dict] = {}  # markers of complete shards rendered again
    if retry_failures:
        for spec in specs:
            if spec.name not in done:
                continue
            try:
                stats = shards.read_stats(out, spec.name)
            except shards.DamagedShard as e:  # its failures cannot be told from its images
                log.warning(f"{spec.name}: {e.what}: the whole shard renders again")
                storage.delete(shards.shard_paths(out, spec.name)["stats"])
                pending.append(spec)
                continue
            if stats["failed"]:
                earlier[spec.name] = stats
                pending.append(spec)

    renderer_factory = renderer_factory or RendererFactory(config, defaults.size_multiple)
    local = is_local(options)
    model_info = {"model": config.model, "upscaler": config.upscaler}
    handle = shared_handle or shared.Shared()
    renderer = None
    if local:
        # Loaded once: an in-process runner's workers acquire this same object through
        # `handle`; and a bad model path fails here, before any worker starts.
        renderer = handle.acquire(renderer_factory)
        model_info = renderer.describe()
        check_same_models(out, (existing or {}).get("model", {}), model_info)
    record = {
        "config": config.identity(),
        "batch_size": config.batch_size,
        "manifest": {"files": files, "fingerprint": fingerprint, "shards": len(specs)},
        "model": model_info,
        "versions": _versions(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "runner": str(options.view_as(StandardOptions).runner),
    }
    note = existing and done and pending and not config.dry_run and batch_shape_note(out, existing, record)
    if note:
        log.warning(note)
    shards.write_json(storage.join(out, RUN_FILE), record)

    if pending:
        pipeline = build_pipeline(options, pending, out, renderer_factory, defaults, config,
                                  retry_failures=retry_failures, shared_handle=handle, all_specs=specs)
        watcher = ProgressWatcher(out, {s.name: s.num_records for s in pending}, earlier=earlier, enabled=progress)
        watcher.start()
        try:
            result = pipeline.run()
            result.wait_until_finish()
        except Exception as e:
            # The index lists what is committed now: shards this run committed (or, retried,
            # committed anew) before the failure, not the checksums of their earlier files.
            with contextlib.suppress(Exception):  # best effort: the run's own error is the one to report
                _index_committed(out, specs, withdraw=False)
            raise JobError(f"the pipeline failed ({e.__class__.__name__}: {e}). Committed shards are kept: "
                           f"fix the cause and rerun the same command to render the rest.") from e
        finally:
            watcher.stop()

    del renderer  # the shared map keeps it no longer than needed
    done, index, withdrawn = _index_committed(out, specs)
    now = [e for e in index["shards"] if e["url"] in {s.name + ".tar" for s in pending}]
    rendered_now = sum(e["nsamples"] - earlier.get(e["url"][:-4], {}).get("rendered", 0) for e in now)
    rendered_shards = sum(s.name in done for s in pending)
    return Summary(
        rendered=index["rendered"], failed=index["failed"], processed_now=sum(e["nsamples"] + e["failed"] for e in now),
        rendered_now=rendered_now, shards=len(specs), rendered_shards=rendered_shards,
        # Complete shards this run left alone (a marker withdrawn at the end counts as missing).
        skipped_shards=sum(s.name in done for s in specs) - rendered_shards,
        missing_shards=[s.name for s in specs if s.name not in done], seconds=time.time() - started,
        withdrawn_shards=withdrawn)
