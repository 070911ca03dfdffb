"""The render settings a model folder recommends for itself, from its `render_defaults.json`.

A diffusers folder says nothing about how to sample it, yet a small model can want far
less guidance than Stable Diffusion's 7.5. The optional file, beside model_index.json,
holds what its makers measured best, e.g. for an x4 upscaler:

    {"steps": 20, "guidance": 3.0, "noise_level": 0}

Settings a user gives win over it; settings nobody gives fall back to SD's usual ones.
diffusers ignores the file. Reading it needs no JAX (the job launcher reads it).

A base model whose scheduler is LCMScheduler recommends, unless its file says otherwise,
the lcm sampler at 4 steps: a guidance-distilled UNet (time_cond_proj_dim) at guidance 8.5,
as diffusers' LatentConsistencyModelPipeline defaults to; any other UNet (LCM-LoRA merged
into SD) at guidance 1, no CFG, as LCM-LoRA is run.
"""

from __future__ import annotations

import hashlib
import json
import math

from jaxdiff import storage

FILE = "render_defaults.json"
# What each kind of folder may recommend. An upscaler's values are its own stage's:
# its "steps" are the engine's upscale_steps.
KEYS = {"base": ("steps", "sampler", "guidance"), "upscale": ("steps", "sampler", "guidance", "noise_level")}
# An upscaler's file names its own stage's settings; the engine's (and the job's) names.
UPSCALE_SETTINGS = {"steps": "upscale_steps", "sampler": "upscale_sampler", "guidance": "upscale_guidance",
                    "noise_level": "noise_level"}


LCM_DEFAULTS = {"sampler": "lcm", "steps": 4}


class RenderDefaultsError(ValueError):
    """A render_defaults.json that cannot be used; the message names the file."""


def read(folder: str, kind: str = "base", digests: dict | None = None) -> dict:
    """The settings `folder` (local or gs://) recommends ({} without the file), checked.
    `digests`, if given, gets the file's sha256 under its path. A folder that is not of
    `kind` (an x4 upscaler read as a base model, or the reverse) is a ValueError."""
    folder = str(folder).rstrip("/")
    unet = _read_config(folder, "unet", "config.json")
    if unet:  # a missing or broken config: the model loader names it
        check_kind(folder, kind, unet.get("in_channels", 4))
    path = storage.join(folder, FILE)
    try:
        raw = storage.read_bytes(path)
    except (FileNotFoundError, NotADirectoryError):  # a file given as the folder: the loader names it
        raw = None
    if raw is not None and digests is not None:
        digests[path] = hashlib.sha256(raw).hexdigest()
    recommended = {} if raw is None else parse(raw, path, kind)
    # The scheduler config, read once: base folders for LCM's defaults, any folder whose file
    # recommends steps for their bound (an upscaler's otherwise costs no read).
    needs_scheduler = kind == "base" or "steps" in recommended
    scheduler = _read_config(folder, "scheduler", "scheduler_config.json") if needs_scheduler else {}
    if "steps" in recommended:
        train_steps = scheduler.get("num_train_timesteps", 1000)
        if isinstance(train_steps, int) and recommended["steps"] > train_steps:
            raise RenderDefaultsError(f"{path}: steps is {recommended['steps']}; use 1 to {train_steps} "
                                      f"(the model's num_train_timesteps)")
    # LCM's steps and guidance go with its sampler: a file naming another drops them.
    implied = (_lcm_defaults(scheduler, unet) if kind == "base" and recommended.get("sampler", "lcm") == "lcm"
               else {})
    return {**implied, **recommended}


def check_kind(folder: str, kind: str, in_channels: int) -> None:
    """Refuses a base model ("base") whose UNet takes `in_channels` named as the upscaler
    ("upscale"), or the reverse: else it fails only when rendering, with a message about
    tensor shapes or noise levels."""
    if kind == "upscale" and in_channels != 7:  # an x4 upscaler's UNet takes latents + the low-res image
        raise ValueError(f"{folder} is not an x4 upscaler (its UNet takes {in_channels} input channels, an "
                         f"upscaler's 7): pass an upscaler folder as --upscaler (upscaler=...), or none")
    if kind == "base" and in_channels == 7:
        raise ValueError(f"{folder} is an x4 upscaler, not a base model: pass it as --upscaler (upscaler=...) "
                         f"and a text-to-image model as --model")


def _lcm_defaults(scheduler: dict, unet: dict) -> dict:
    """What a base folder with these scheduler and UNet configs recommends for LCMScheduler
    (module docstring); {} for other schedulers."""
    if scheduler.get("_class_name") != "LCMScheduler":
        return {}
    distilled = unet.get("time_cond_proj_dim") is not None
    return {**LCM_DEFAULTS, "guidance": 8.5 if distilled else 1.0}


def _read_config(folder: str, *parts: str) -> dict:
    try:
        config = json.loads(storage.read_bytes(storage.join(folder, *parts)))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return {}  # the model loader names a missing or broken config
    return config if isinstance(config, dict) else {}


def parse(raw: bytes, path: str, kind: str = "base") -> dict:
    """Checks the JSON text of a render_defaults.json read from `path` (named in errors)."""
    try:
        values = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RenderDefaultsError(f"{path}: not valid JSON ({e}); fix or delete the file") from e
    if not isinstance(values, dict):
        raise RenderDefaultsError(f"{path}: expected a JSON object such as {{\"guidance\": 4.0}}")
    allowed = KEYS[kind]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise RenderDefaultsError(f"{path}: unknown setting(s) {', '.join(unknown)}; "
                                  f"a {kind} model's file may set {', '.join(allowed)}")

    def bad(name, rule):
        raise RenderDefaultsError(f"{path}: {name} is {values[name]!r}; {rule}")

    def integer(name):
        return isinstance(values[name], int) and not isinstance(values[name], bool)

    if "steps" in values and not (integer("steps") and values["steps"] >= 1):
        bad("steps", "use a whole number of at least 1")
    if "noise_level" in values and not (integer("noise_level") and values["noise_level"] >= 0):
        bad("noise_level", "use a whole number of at least 0")
    if "guidance" in values and (isinstance(values["guidance"], bool)
                                 or not isinstance(values["guidance"], (int, float))
                                 or not math.isfinite(values["guidance"]) or values["guidance"] < 0):
        bad("guidance", "use a finite number of at least 0")  # Python's json reads NaN and Infinity
    if "sampler" in values and not (isinstance(values["sampler"], str) and values["sampler"]):
        bad("sampler", "use a sampler's name, e.g. dpmpp_2m")
    return {k: (float(v) if k == "guidance" else v) for k, v in values.items()}
