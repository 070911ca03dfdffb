"""Prompt manifests: records -> validated Samples, or Failures that say what to fix.

The reading side (finding files, planning shards, reading a shard) lives in
`pipelines.manifest_reader` and is re-exported here, so the pipeline imports one module.

Record fields (anything else passes through into Sample.metadata, except a name that differs
from one only in case, spaces, hyphens or underscores, "Seed" or "negative-prompt": that is a
mistake, and a CSV or Parquet column so named refuses the file, a JSON key fails its record):
  id               letters, digits, '.', '_', '-' (at most 128); a number, 12 or 12.0, is "12".
                   When absent, derived from the file's base name, the record number and the
                   prompt, so it is stable across runs; give files distinct base names or
                   explicit ids.
  prompt           required, non-empty text
  negative_prompt, seed (0..2**32-1), guidance, steps, width, height, strength (0 < s <= 1)
  num_images       variants of the record. Variant 0 keeps the record's id and variant k > 0
                   is `{id}_{k}`, so raising num_images later keeps the images already made.
                   Each variant has its own seed: seed + k when the record names a seed,
                   else derive_seed(run seed, variant id).
  mode             txt2img (default), img2img, sketch (need init_image), inpaint (needs
                   init_image and mask), outpaint (needs init_image and outpaint pixels)
  init_image, mask local paths or gs:// URLs (another URL, or a data: URI, fails its record);
                   a relative path is relative to the manifest file's folder. PNG, JPEG
                   or WebP. A mask of the init image's size or aspect ratio (within a
                   pixel's rounding: 384x256 or 383x256 for a 768x512 photo) is resized
                   with it to the render size; another shape is refused.
  outpaint         pixels added at [left, top, right, bottom]: a list, an object with those
                   keys, or "l,t,r,b" text (CSV)
  sampler          one of RenderDefaults.samplers (the engine's sampler names)

Whole-number fields (seed, steps, width, height, num_images, outpaint) take integers, floats
with nothing after the point (12.0) and their text ("12", "12.0", as pandas writes a column
holding a NaN); 12.5 is refused. Numbers may also be Parquet decimals.

Fields the record leaves out take the run's RenderDefaults, filled in here, so every
Sample says what it will render, except what the engine fills in: the sampler (the run's
own), the native size, and sketch, inpaint and outpaint strength (their own defaults).
"""

from __future__ import annotations

import dataclasses
import decimal
import hashlib
import io
import json
import math
import os
import posixpath
import re
import sys
from typing import Any

import numpy as np

from jaxdiff import storage
from jaxdiff.engine.images import grey_from_pil, mask_size_problem, rgb_from_pil
from jaxdiff.engine.sample import MODES, Sample, derive_seed, whole_number
from pipelines.manifest_reader import (
    KNOWN_FIELDS,
    ManifestError,
    RawRecord,
    ShardSpec,
    expand_patterns,
    file_format,
    field_meant,
    manifest_fingerprint,
    plan_shards,
    read_shard,
)

__all__ = [
    "Failure", "InputImageError", "ManifestError", "RawRecord", "RenderDefaults", "ShardSpec",
    "STAGES", "expand_patterns", "file_format", "load_image", "load_mask", "manifest_fingerprint",
    "plan_shards", "read_shard", "to_samples",
]

STAGES = ("manifest", "input-image", "render", "write")
IMAGE_MODES = ("img2img", "sketch", "inpaint", "outpaint")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "MPO")  # MPO: camera JPEGs with a second picture
MAX_SEED = 2**32 - 1
# Extra fields are written back as JSON with each image; far deeper nesting than any real
# metadata would overflow the writer's recursion and fail the whole shard.
MAX_METADATA_DEPTH = 64
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_DATA_URI = re.compile(r"data:[^,]*,", re.IGNORECASE)  # data:image/png;base64,...


class SettingError(ValueError):
    """A run setting out of its range; `name` is the RenderDefaults field."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@dataclasses.dataclass(frozen=True)
class RenderDefaults:
    """The run's settings for every field a record leaves out, and the limits records must keep."""

    width: int | None = None    # None: the model's native size (the engine knows it)
    height: int | None = None
    steps: int = 25
    guidance: float = 7.5
    sampler: str = "dpmpp_2m"
    seed: int = 0                      # the run seed
    negative_prompt: str = ""
    num_images: int = 1
    strength: float = 0.75
    size_multiple: int = 64            # a record's width and height: multiples of this (the job: its model's),
    max_side: int = 2048               # up to this
    # The run's own width and height may keep a finer rule where its renderer draws any
    # size (the dry run: multiples of 8, so tiny placeholders can test a huge manifest);
    # records stay held to the rule above, as a real run holds them. None: that rule.
    run_size_multiple: int | None = None
    run_max_side: int | None = None
    max_steps: int = 1000
    max_guidance: float = 50.0
    max_num_images: int = 64
    max_image_side: int = 8192         # init images / masks larger than this are refused
    # jaxdiff.samplers.SAMPLER_NAMES, spelled out so reading manifests needs no JAX.
    samplers: tuple[str, ...] = ("ddim", "dpmpp_2m", "euler", "euler_a", "ddpm", "lcm")

    def __post_init__(self):
        def bad(name, rule):
            raise SettingError(name, f"{name}={getattr(self, name)!r}: {rule}")

        for name in ("size_multiple", "max_side", "max_steps", "max_num_images", "max_image_side"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "use a positive integer")
        for name in ("run_size_multiple", "run_max_side"):
            if getattr(self, name) is not None and (not _is_int(getattr(self, name)) or getattr(self, name) < 1):
                bad(name, "use a positive integer, or None")
        multiple, top = self.run_size_multiple or self.size_multiple, self.run_max_side or self.max_side
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_int(value) or value % multiple or not 0 < value <= top:
                bad(name, f"use a multiple of {multiple} up to {top}")
        if not _is_int(self.steps) or not 1 <= self.steps <= self.max_steps:
            bad("steps", f"use 1 to {self.max_steps}")
        if not _is_number(self.guidance) or not 0 <= self.guidance <= self.max_guidance:
            bad("guidance", f"use a number from 0 to {self.max_guidance}")
        if not _is_number(self.strength) or not 0 < self.strength <= 1:
            bad("strength", "use a number in (0, 1]")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            bad("seed", f"use an integer from 0 to {MAX_SEED}")
        if not _is_int(self.num_images) or not 1 <= self.num_images <= self.max_num_images:
            bad("num_images", f"use 1 to {self.max_num_images}")
        if self.sampler not in self.samplers:
            bad("sampler", f"use one of {', '.join(self.samplers)}")
        if not isinstance(self.negative_prompt, str):
            bad("negative_prompt", "use text")


@dataclasses.dataclass(frozen=True)
class Failure:
    """A record that produced no image, and why. Every input id ends in a shard or here."""

    id: str
    source: str
    line: int
    reason: str
    stage: str                         # one of STAGES
    record: str | dict[str, Any] | None = None  # the raw line, or the parsed fields

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (values JSON cannot hold, e.g. bytes, become text)."""
        record = self.record
        if isinstance(record, dict):
            record = json.loads(json.dumps(record, default=str))
        return {"id": self.id, "source": self.source, "line": self.line, "reason": self.reason,
                "stage": self.stage, "record": record}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Failure:
        return cls(value["id"], value["source"], value["line"], value["reason"], value["stage"],
                   value.get("record"))


class InputImageError(ValueError):
    """An init image or mask that cannot be read or decoded."""


# ----------------------------------------------------------------------------- images


def _decode_image(uri: str, max_side: int, field: str):
    """(`field` (init_image or mask) read from `uri` and decoded, the sha256 of its file);
    InputImageError naming both."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise InputImageError(f"{field} {uri} does not exist") from e
    except Exception as e:  # gs:// NotFound, permissions, network
        raise InputImageError(f"cannot read {field} {uri}: {e}") from e
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in IMAGE_FORMATS:
            raise InputImageError(f"{field} {uri} is {image.format}: use PNG, JPEG or WebP")
        if max(image.size) > max_side:
            raise InputImageError(f"{field} {uri} is {image.size[0]}x{image.size[1]}: "
                                  f"use at most {max_side} pixels a side")
        image.load()  # decodes now, so a truncated or corrupt file fails here
        # Camera JPEGs store their rotation in EXIF.
        return ImageOps.exif_transpose(image), hashlib.sha256(data).hexdigest()
    except InputImageError:
        raise
    except UnidentifiedImageError as e:  # its text names an in-memory buffer, not the file
        raise InputImageError(f"{field} {uri} is not an image Pillow can read: use PNG, JPEG or WebP") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputImageError(f"cannot decode {field} {uri}: {e}") from e


def _load_input(uri: str, max_side: int, field: str) -> tuple[np.ndarray, str]:
    """(`field` from `uri`: init_image as uint8 RGB, mask as grey levels; its file's sha256)."""
    image, digest = _decode_image(uri, max_side, field)
    array = rgb_from_pil(image) if field == "init_image" else grey_from_pil(image)
    array.setflags(write=False)  # shared by all variants of a record
    return array, digest


def load_image(uri: str, *, max_side: int = 8192) -> np.ndarray:
    """A PNG / JPEG / WebP image (local path or gs://) as uint8 (H, W, 3) RGB."""
    return _load_input(uri, max_side, "init_image")[0]


def load_mask(uri: str, *, max_side: int = 8192) -> np.ndarray:
    """A mask image as uint8 (H, W) grey levels, 255 = repaint."""
    return _load_input(uri, max_side, "mask")[0]


# ----------------------------------------------------------------------------- field checks


class _Invalid(ValueError):
    """A record field breaks a rule; the message names the field and the fix."""


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    """A finite int, float or Decimal (a Parquet decimal column); an int too large for a float
    (JSON allows any) is not one."""
    if _is_int(value):
        return abs(value) <= sys.float_info.max
    if isinstance(value, decimal.Decimal):
        return value.is_finite() and abs(value) <= sys.float_info.max
    return isinstance(value, (float, np.floating)) and math.isfinite(value)


def _integer(name: str, value) -> int:
    """An int from an int, an integral float, or whole-number text ("12", "12.0"); never from a bool."""
    if whole_number(value) is not None:  # the engine's rule for numbers: ints and integral floats
        return whole_number(value)
    if isinstance(value, decimal.Decimal) and value.is_finite() and value == value.to_integral_value():
        return int(value)
    # "12.0" too: pandas writes a whole-number column holding a NaN as floats. 100 digits:
    # past any limit, and far inside Python's int-from-text one.
    whole = re.fullmatch(r"\s*([+-]?\d{1,100})(?:\.0*)?\s*", value) if isinstance(value, str) else None
    if whole:
        return int(whole[1])
    raise _Invalid(f"{name} {value!r} is not an integer: write a whole number, e.g. {name}: 42")


_EXAMPLES = {"strength": 0.75, "guidance": 7.5}


def _number(name: str, value) -> float:
    if _is_number(value):
        return float(value)
    if _is_int(value):
        raise _Invalid(f"{name} is a {len(str(abs(value)))}-digit integer, out of range: write a number, "
                       f"e.g. {name}: {_EXAMPLES.get(name, 1.5)}")
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                return number
    raise _Invalid(f"{name} {value!r} is not a finite number: write a number, e.g. {name}: {_EXAMPLES.get(name, 1.5)}")


def _text(name: str, value) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{name} must be text, got {type(value).__name__} {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a JSON \ud83d escape without its other half
        raise _Invalid(f"{name} holds a lone UTF-16 surrogate ({value[e.start:e.end]!r}): write the "
                       f"character itself, or both halves of its escaped pair") from None
    return value


def _record_id(raw: RawRecord, fields: dict[str, Any] | None) -> str:
    """The record's id, or its derived one: sha1 of base name, record number and prompt."""
    value = (fields or {}).get("id")
    if value is None:
        prompt = (fields or {}).get("prompt")
        prompt = prompt if isinstance(prompt, str) else ""
        name = posixpath.basename(raw.source) if storage.is_gcs(raw.source) else os.path.basename(raw.source)
        # surrogatepass: the id of a record that then fails on its text must still be made.
        return hashlib.sha1(f"{name}\n{raw.index}\n{prompt}".encode("utf-8", "surrogatepass")).hexdigest()[:20]
    if whole_number(value) is not None:  # 12.0 too: pandas' int column holding a NaN, as written to Parquet
        value = str(whole_number(value))
    if not isinstance(value, str) or not _ID.match(value):
        raise _Invalid(f"id {value!r} is not usable: use up to 128 letters, digits, '.', '_' or '-' "
                       f"(not starting with '.' or '-'), or leave id out to derive one")
    return value


def record_id(raw: RawRecord) -> str | None:
    """The id `to_samples` gives this record; None when the record fails before it has one."""
    if raw.fields is None:
        return None
    try:
        return _record_id(raw, {k: v for k, v in raw.fields.items() if v is not None})
    except _Invalid:
        return None


def sample_ids(raw: RawRecord, defaults: RenderDefaults) -> list[str]:
    """The ids `to_samples` gives this record's images ({id}, {id}_1, ...), or only the
    record's id where its num_images is unusable or the record unreadable (it then fails
    under that id); [] when the record fails before it has an id."""
    first = record_id(raw)
    if first is None:
        return []
    if raw.error is not None:  # unreadable: its own num_images is not known
        return [first]
    try:
        count = _num_images({k: v for k, v in raw.fields.items() if v is not None}, defaults)
    except _Invalid:
        count = 1
    return [first] + [f"{first}_{k}" for k in range(1, count)]


def _num_images(fields: dict[str, Any], defaults: RenderDefaults) -> int:
    num_images = _integer("num_images", fields["num_images"]) if "num_images" in fields else defaults.num_images
    if not 1 <= num_images <= defaults.max_num_images:
        raise _Invalid(f"num_images {num_images} is out of range: use 1 to {defaults.max_num_images}")
    return num_images


def _size(fields: dict[str, Any], defaults: RenderDefaults) -> tuple[int | None, int | None]:
    """The record's width and height; its own are checked here, the run's were when set."""
    width = _integer("width", fields["width"]) if "width" in fields else defaults.width
    height = _integer("height", fields["height"]) if "height" in fields else defaults.height
    m, top = defaults.size_multiple, defaults.max_side
    for name, side in (("width", width), ("height", height)):
        if name in fields and side is not None and (side % m or not m <= side <= top):
            shown = "x".join("native" if v is None else str(v) for v in (width, height))
            raise _Invalid(f"unsupported size {shown}: use multiples of {m} up to {top}")
    return width, height


def _outpaint(value) -> tuple[int, int, int, int]:
    sides = ("left", "top", "right", "bottom")
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(sides))
        if unknown:
            raise _Invalid(f"outpaint has unknown keys {unknown}: use left, top, right, bottom")
        value = [value.get(side, 0) for side in sides]
    elif isinstance(value, str):
        value = [part for part in re.split(r"[,\s]+", value.strip()) if part]
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise _Invalid(f"outpaint {value!r} is not four pixel counts: write [left, top, right, bottom]")
    pads = tuple(_integer("outpaint", v) for v in value)
    if min(pads) < 0 or max(pads) == 0:
        raise _Invalid(f"outpaint {list(pads)}: pixel counts must be >= 0 and at least one > 0")
    return pads


def _image_uri(name: str, value, source: str) -> str:
    uri = _text(name, value).strip()
    if not uri:
        raise _Invalid(f"{name} is empty: give a local path or a gs:// URL")
    if storage.is_gcs(uri) or os.path.isabs(uri):
        return uri
    if _URL_SCHEME.match(uri):
        raise _Invalid(f"{name} {uri!r}: only local paths and gs:// URLs are supported")
    if _DATA_URI.match(uri):  # read as a relative path it "does not exist", or is "too long"
        shown = uri if len(uri) <= 40 else uri[:40] + "..."
        raise _Invalid(f"{name} {shown!r} is a data: URI: only local paths and gs:// URLs are supported; "
                       f"write the image to a file and give its path")
    # Relative to the manifest's folder, so a manifest travels with its images.
    if storage.is_gcs(source):
        bucket, _, folder = source[len(storage.GCS_PREFIX):].partition("/")
        obj = posixpath.normpath(posixpath.join(posixpath.dirname(folder), uri))
        if obj == ".." or obj.startswith("../"):
            raise _Invalid(f"{name} {uri!r} points above the bucket gs://{bucket}")
        return f"{storage.GCS_PREFIX}{bucket}/{obj}"
    return os.path.normpath(os.path.join(os.path.dirname(source), uri))


def _nesting(value: Any) -> int:
    """How many levels of lists and objects `value` holds (0 for a plain value), counted
    level by level rather than recursively, and only to just past MAX_METADATA_DEPTH."""
    depth, level = 0, [value]
    while depth <= MAX_METADATA_DEPTH:
        containers = [x for x in level if isinstance(x, (dict, list, tuple))]
        if not containers:
            return depth
        depth += 1
        level = [item for x in containers for item in (x.values() if isinstance(x, dict) else x)]
    return depth


def _options(fields: dict[str, Any], defaults: RenderDefaults, source: str) -> dict[str, Any]:
    """Validated Sample fields, with the run's defaults filled in, plus num_images and image URIs."""
    for name in fields:
        meant = field_meant(name)
        if meant:
            raise _Invalid(f"field {name!r} looks like {meant!r}: write it {meant} (field names are exact; as "
                           f"it is, it would pass through as metadata)")
    if "prompt" not in fields:
        raise _Invalid("missing prompt: every record needs a non-empty 'prompt'")
    prompt = _text("prompt", fields["prompt"])
    if not prompt.strip():
        raise _Invalid("empty prompt: every record needs a non-empty 'prompt'")
    negative = _text("negative_prompt", fields.get("negative_prompt", defaults.negative_prompt))

    seed = None
    if "seed" in fields:
        seed = _integer("seed", fields["seed"])
        if not 0 <= seed <= MAX_SEED:
            raise _Invalid(f"seed {seed} is out of range: use 0 to {MAX_SEED}")
    steps = _integer("steps", fields["steps"]) if "steps" in fields else defaults.steps
    if not 1 <= steps <= defaults.max_steps:
        raise _Invalid(f"steps {steps} is out of range: use 1 to {defaults.max_steps}")
    guidance = _number("guidance", fields["guidance"]) if "guidance" in fields else defaults.guidance
    if not 0 <= guidance <= defaults.max_guidance:
        raise _Invalid(f"guidance {guidance} is out of range: use 0 to {defaults.max_guidance}")
    width, height = _size(fields, defaults)
    num_images = _num_images(fields, defaults)

    mode = _text("mode", fields.get("mode", "txt2img")).strip().lower()
    if mode not in MODES:
        raise _Invalid(f"unknown mode {fields['mode']!r}: use one of {', '.join(MODES)}")
    strength = None
    if mode in IMAGE_MODES:
        # Left unset, the engine picks each mode's own default (inpaint 1.0, sketch 0.8).
        strength = (_number("strength", fields["strength"]) if "strength" in fields
                    else defaults.strength if mode == "img2img" else None)
        if strength is not None and not 0 < strength <= 1:
            raise _Invalid(f"strength {strength} is out of range: use a number in (0, 1]")
    elif "strength" in fields:
        raise _Invalid("strength given but mode is txt2img, which starts from noise: set mode to img2img "
                       "(with an init_image), or leave strength out")

    init_uri = _image_uri("init_image", fields["init_image"], source) if "init_image" in fields else None
    mask_uri = _image_uri("mask", fields["mask"], source) if "mask" in fields else None
    if mode in IMAGE_MODES and init_uri is None:
        raise _Invalid(f"mode {mode} needs an init_image: add its path or gs:// URL")
    if mode == "txt2img" and init_uri is not None:
        raise _Invalid(f"init_image given but mode is txt2img: set mode to one of {', '.join(IMAGE_MODES)}")
    if mode == "inpaint" and mask_uri is None:
        raise _Invalid("mode inpaint needs a mask (white = repaint): add its path or gs:// URL")
    if mask_uri is not None and mode != "inpaint":
        raise _Invalid(f"mask given but mode is {mode}: masks are for mode inpaint")
    outpaint = _outpaint(fields["outpaint"]) if "outpaint" in fields else None
    if mode == "outpaint" and outpaint is None:
        raise _Invalid("mode outpaint needs outpaint pixels: add outpaint [left, top, right, bottom]")
    if outpaint is not None and mode != "outpaint":
        raise _Invalid(f"outpaint given but mode is {mode}: set mode to outpaint")
    if mode == "outpaint" and ("width" in fields or "height" in fields):
        raise _Invalid("width/height given with mode outpaint, whose canvas (the init_image plus the outpaint "
                       "pixels) sets the size: leave them out, or resize the image")

    sampler = None
    if "sampler" in fields:
        sampler = _text("sampler", fields["sampler"]).strip().lower()
        if sampler not in defaults.samplers:
            raise _Invalid(f"unknown sampler {fields['sampler']!r}: use one of {', '.join(defaults.samplers)}")
    metadata = {k: v for k, v in fields.items() if k not in KNOWN_FIELDS}
    for name, value in metadata.items():
        if _nesting(value) > MAX_METADATA_DEPTH:
            raise _Invalid(f"field {name!r} is nested more than {MAX_METADATA_DEPTH} levels deep: flatten it "
                           f"(extra fields are stored with each image as JSON)")

    return dict(prompt=prompt, negative_prompt=negative, seed=seed, guidance=guidance, steps=steps,
                sampler=sampler, width=width, height=height, mode=mode, strength=strength, outpaint=outpaint,
                metadata=metadata, num_images=num_images, init_uri=init_uri, mask_uri=mask_uri)


# ----------------------------------------------------------------------------- records -> samples


def to_samples(raw: RawRecord, defaults: RenderDefaults) -> list[Sample] | Failure:
    """The record's Samples (one per variant), or a Failure naming the record, its line and the fix."""
    record = raw.text if raw.text is not None else raw.fields

    def failure(sample_id: str, reason: str, stage: str = "manifest") -> Failure:
        return Failure(sample_id, raw.source, raw.line, reason, stage, record)

    if raw.error is not None or raw.fields is None:
        # Its fields hold at most the id it plainly gives, which then names it.
        try:
            return failure(_record_id(raw, raw.fields), raw.error or "unreadable record")
        except _Invalid:
            return failure(_record_id(raw, None), raw.error or "unreadable record")
    fields = {k: v for k, v in raw.fields.items() if v is not None}  # null = absent, as in Parquet
    try:
        sample_id = _record_id(raw, fields)
    except _Invalid as e:
        return failure(_record_id(raw, {"prompt": fields.get("prompt")}), str(e))
    try:
        options = _options(fields, defaults, raw.source)
    except _Invalid as e:
        return failure(sample_id, str(e))

    init_image = mask = None
    input_files = {}  # stored with each image: which files it started from
    try:
        if options["init_uri"] is not None:
            init_image, digest = _load_input(options["init_uri"], defaults.max_image_side, "init_image")
            input_files.update(init_image=options["init_uri"], init_image_sha256=digest)
        if options["mask_uri"] is not None:
            mask, digest = _load_input(options["mask_uri"], defaults.max_image_side, "mask")
            input_files.update(mask=options["mask_uri"], mask_sha256=digest)
    except InputImageError as e:
        return failure(sample_id, str(e), "input-image")
    if mask is not None:  # the engine's rule: the init image's size or aspect ratio, resized with it
        problem = mask_size_problem(mask.shape[1], mask.shape[0], init_image.shape[1], init_image.shape[0],
                                    mask=f"mask {options['mask_uri']}", image=f"init_image {options['init_uri']}")
        if problem:
            return failure(sample_id, problem, "input-image")
    if init_image is not None and options["mode"] == "outpaint":
        # The canvas is the image plus its pixels: held to the limit a record's own sizes
        # are, so no photo asks a worker for a render past it.
        left, top, right, bottom = options["outpaint"]
        width, height = init_image.shape[1] + left + right, init_image.shape[0] + top + bottom
        if max(width, height) > defaults.max_side:
            return failure(sample_id, f"init_image {init_image.shape[1]}x{init_image.shape[0]} with outpaint "
                                      f"{list(options['outpaint'])} makes a {width}x{height} canvas, past "
                                      f"{defaults.max_side} a side: use fewer outpaint pixels or a smaller "
                                      f"image", "input-image")

    seed, num_images = options["seed"], options["num_images"]
    kept = {k: options[k] for k in ("prompt", "negative_prompt", "guidance", "steps", "sampler", "width",
                                    "height", "mode", "strength", "outpaint")}
    samples = []
    for k in range(num_images):
        variant_id = sample_id if k == 0 else f"{sample_id}_{k}"
        variant_seed = (seed + k) % (MAX_SEED + 1) if seed is not None else derive_seed(defaults.seed, variant_id)
        samples.append(Sample(id=variant_id, seed=variant_seed, init_image=init_image, mask=mask,
                              metadata=dict(options["metadata"]), input_files=dict(input_files), **kept))
    return samples
