"""The user-facing engine: prompts (or Samples) in, images out, over every local chip.

Samples are grouped by what fixes a compiled program (size, steps, sampler, LCM grid,
CFG on or off), cut into
fixed-size batches (a short last batch is padded with copies and the copies dropped),
and sent through the base program and, when an upscaler is loaded, the upscale program.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import threading
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdiff import render_defaults, samplers, storage
from jaxdiff.engine import images as imgs
from jaxdiff.engine.programs import (BaseSignature, UpscaleSignature, make_base_program,
                                     make_encode_program, make_upscale_program)
from jaxdiff.engine.sample import (MODES, Rendered, Sample, check_keywords, derive_seed, guidance_on, prompt_seed,
                                   real_number, whole_number)
from jaxdiff.models.clip import tokenize
from jaxdiff.weights.family import with_config_file

# Scheduler classes named in checkpoints -> our solvers. PNDM (SD 1.x's stored default)
# has no equivalent here; DPM-Solver++ is the better sampler at equal steps anyway.
SCHEDULER_CLASSES = {
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DDPMScheduler": "ddpm",
    "LCMScheduler": "lcm",
}


@dataclasses.dataclass(frozen=True)
class RenderSettings:
    """Run-wide defaults; a Sample's own fields override them."""

    width: int | None = None       # None: the model's native size
    height: int | None = None
    steps: int = 25
    sampler: str = "dpmpp_2m"
    karras: bool | None = None     # Karras sigmas; None: as the scheduler config's use_karras_sigmas
    guidance: float = 7.5
    negative_prompt: str = ""
    strength: float = 0.75         # img2img
    sketch_strength: float = 0.8   # sketches need more change than photos
    clip_skip: int = 0
    seed: int = 0                  # run seed: samples without a seed derive theirs from it and their id
    upscale: bool = True           # when an upscaler is loaded
    upscale_steps: int = 20
    upscale_guidance: float = 9.0
    upscale_sampler: str | None = None  # None: the upscaler checkpoint's own scheduler
    noise_level: int = 20
    keep_base: bool = False
    tile_pixels: int | None = 768  # decode larger images in tiles of this side; None: never tiled


def settings_for(base, upscaler=None, **given) -> RenderSettings:
    """The run's settings: those `given` (None: not given), else what each model folder
    recommends in its render_defaults.json, else RenderSettings' own defaults."""
    merged = dict(base.render_defaults) if base is not None else {}
    if upscaler is not None:
        merged.update({render_defaults.UPSCALE_SETTINGS[k]: v for k, v in upscaler.render_defaults.items()})
    merged.update({k: v for k, v in given.items() if v is not None})
    return RenderSettings(**merged)


def check_settings(settings: RenderSettings, batch_size: int = 1) -> tuple[RenderSettings, int]:
    """`settings` and `batch_size` with whole numbers as ints, or a ValueError naming the first
    setting of the wrong kind or range. What depends on the model (the sampler, the steps it
    allows, the size multiple) the Pipeline checks when it is built."""
    def bad(name, value, rule):
        raise ValueError(f"{name}={value!r}: {rule}")

    if whole_number(batch_size) is None or batch_size < 1:
        bad("batch_size", batch_size, "give a whole number >= 1, the images rendered at once")
    wholes = {"steps": 1, "upscale_steps": 1, "noise_level": 0, "clip_skip": 0, "seed": 0, "width": 1, "height": 1}
    fixed = {}
    for name, low in wholes.items():
        value = getattr(settings, name)
        if value is None and name in ("width", "height"):  # the model's native size
            continue
        if whole_number(value) is None or value < low:
            bad(name, value, f"give a whole number >= {low}")
        fixed[name] = whole_number(value)
    if fixed["seed"] >= 2**32:
        bad("seed", settings.seed, "give a whole number from 0 to 2**32 - 1")
    for name, rule in (("guidance", "a finite number >= 0"), ("upscale_guidance", "a finite number >= 0"),
                       ("strength", "a number in (0, 1]"), ("sketch_strength", "a number in (0, 1]")):
        value = real_number(getattr(settings, name))
        if value is None or not math.isfinite(value) or value < 0 or ("strength" in name and not 0 < value <= 1):
            bad(name, getattr(settings, name), f"give {rule}")
        fixed[name] = value
    tile = settings.tile_pixels  # None: never tiled; an int only (its own rule: 64.0 is refused)
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 64):
        raise ValueError(f"tile_pixels {tile!r}: give a whole number of pixels >= 64, the side past which "
                         "images decode in tiles")
    for name in ("sampler", "negative_prompt", "upscale_sampler"):
        value = getattr(settings, name)
        if not isinstance(value, str) and not (value is None and name == "upscale_sampler"):
            bad(name, value, "give text" if name == "negative_prompt" else "give a sampler's name, e.g. dpmpp_2m")
    return dataclasses.replace(settings, **fixed), whole_number(batch_size)


class RenderError(ValueError):
    """A sample that cannot be rendered as asked (reported per sample, not raised)."""


class DeviceMemoryError(RuntimeError):
    """A program needed more accelerator memory than there is: raised for the whole batch,
    naming the stage, batch size and image size, and what to lower."""


@dataclasses.dataclass
class PreparedSample:
    """A sample checked and made ready to render (its settings resolved, its images at render
    size): what `Pipeline.prepare` returns and `render_samples` takes as well as a Sample."""

    sample: Sample
    width: int
    height: int
    steps: int
    sampler: str
    guidance: float
    seed: int
    negative_prompt: str
    start_step: int = 0
    init_flag: bool = False
    image: np.ndarray | None = None     # float [-1, 1] at render size
    mask: np.ndarray | None = None      # float {0,1} (H, W, 1), 1 = repaint
    strength: float | None = None
    # A guidance-distilled model's lcm img2img: the LCM grid points its strength keeps, which
    # fix its steps (strengths keeping as many share one program); 0 for the whole grid and
    # for every other sample.
    lcm_grid: int = 0
    cfg: bool = True  # classifier-free guidance on (guidance > 1, and not distilled into the UNet)

    @property
    def batch_key(self) -> tuple:
        """Samples with equal keys share one compiled program, so they can share a batch."""
        return (self.height, self.width, self.steps, self.sampler, self.lcm_grid, self.cfg)


def enable_compilation_cache(path: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache, so a second process does not compile again.
    A gs:// folder serves every worker of a job: each one after the first loads the programs
    instead of compiling them, with the kernels the first one's GPU autotuner chose."""
    path = path or os.environ.get("JAXDIFF_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxdiff", "xla")
    if storage.is_gcs(path):
        if importlib.util.find_spec("gcsfs") is None:  # JAX reaches gs:// through etils and gcsfs
            raise ValueError(f"compilation cache {path}: a gs:// cache needs the gcsfs package: "
                             f"pip install 'jaxdiff[dataflow]'")
    else:
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def _config_path(family, folder: str = "scheduler") -> str:
    return storage.join(family.path, folder, "scheduler_config.json")


def _named(call, config_path: str):
    """call(), with a scheduler config it cannot follow named by its file, as model configs are."""
    try:
        return call()
    except samplers.UnsupportedConfig as e:
        raise with_config_file(e, config_path) from None


def _sampler_name(name: str | None, scheduler_config: dict, fallback: str) -> str:
    if name:
        return name
    return SCHEDULER_CLASSES.get(scheduler_config.get("_class_name", ""), fallback)


class Pipeline:
    """Base model family, optional x4 upscaler family, compiled programs and the device mesh."""

    def __init__(self, base, upscaler=None, *, batch_size: int = 8,
                 settings: RenderSettings | None = None, devices: Sequence[jax.Device] | None = None):
        self.base = base
        self.upscaler = upscaler
        self.settings, batch_size = check_settings(settings or RenderSettings(), batch_size)
        devices = [devices] if isinstance(devices, jax.Device) else list(devices or jax.local_devices())
        for i, device in enumerate(devices):
            if not isinstance(device, jax.Device):
                raise ValueError(f"devices[{i}] is {device!r}: give jax.Device objects, e.g. "
                                 f"devices=jax.local_devices()[:2]")
        self.mesh = Mesh(np.array(devices), ("data",))
        self._backend = devices[0].platform  # whose XLA options the programs compile with
        # The global batch splits evenly over the chips.
        n = len(devices)
        self.batch_size = -(-batch_size // n) * n
        self._replicated = NamedSharding(self.mesh, P())
        self._batched = NamedSharding(self.mesh, P("data"))
        self._programs: dict[Any, Any] = {}
        self.compile_count = 0
        if upscaler is not None and not 0 <= self.settings.noise_level <= (upscaler.max_noise_level or 0):
            raise ValueError(f"noise_level {self.settings.noise_level} is out of range for the upscaler at "
                             f"{upscaler.path}: use 0 to its max_noise_level {upscaler.max_noise_level}")
        self._up = self._place(upscaler) if upscaler is not None else None
        # The x4 stage's sampler: the one set, else its checkpoint's scheduler's (DDIM if unknown).
        self._upscale_sampler = None if upscaler is None else _sampler_name(
            self.settings.upscale_sampler, upscaler.scheduler_config, "ddim")
        if upscaler is not None:
            # Built at load: a scheduler config or setting the x4 stage cannot follow fails here.
            # Karras sigmas as its scheduler config says, as diffusers' scheduler built from it.
            up_karras = (bool(upscaler.scheduler_config.get("use_karras_sigmas"))
                         and self._upscale_sampler in samplers.KARRAS_SAMPLERS)
            up_schedule = _named(lambda: samplers.NoiseSchedule.from_config(upscaler.scheduler_config),
                                 _config_path(upscaler))
            self._upscale_solver = _named(lambda: samplers.make_sampler(
                self._upscale_sampler, up_schedule, self.settings.upscale_steps, karras_sigmas=up_karras),
                _config_path(upscaler))
            # Only add_noise is used from the low-res scheduler: its clip_sample setting (True in
            # DDPMScheduler's defaults) never applies.
            self._low_res_schedule = _named(lambda: samplers.NoiseSchedule.from_config(
                {**upscaler.low_res_scheduler_config, "clip_sample": False}),
                _config_path(upscaler, "low_res_scheduler"))
        if base is None:  # an upscale-only pipeline: `upscale()` works, `render()` does not
            if upscaler is None:
                raise ValueError("a Pipeline needs a base model family, an upscaler, or both")
            return
        self._base = self._place(base)
        # Read at load: a scheduler config the samplers cannot follow fails here; which
        # sampler and step count a sample asks for is checked per sample (_base_sampler).
        self._schedule = _named(lambda: samplers.NoiseSchedule.from_config(base.scheduler_config),
                                _config_path(base))
        self._samplers: dict[tuple, samplers.Sampler] = {}
        self._samplers_lock = threading.Lock()  # prepare() runs on a job's reader threads
        # LCM-distilled: the guidance scale is an input of the UNet (time_cond_proj_dim), no CFG.
        self._guidance_distilled = base.unet_config.time_cond_proj_dim is not None
        unet_cfg, vae_cfg = base.unet_config, base.vae_config
        self.vae_factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
        self.native_size = int(unet_cfg.sample_size or 64) * self.vae_factor
        # Each UNet downsampling halves the latents: sizes must survive all of them.
        self.size_multiple = self.vae_factor * 2 ** (len(unet_cfg.block_out_channels) - 1)
        self.latent_channels = int(vae_cfg.latent_channels)
        layers = base.text_encoder_config.num_hidden_layers
        if self.settings.clip_skip > layers:
            raise ValueError(f"clip_skip={self.settings.clip_skip}: this model's text encoder has {layers} layers; "
                             f"give 0 to {layers}")
        # The run's settings pass the checks each sample's do, so that a bad one is refused
        # here rather than in every sample.
        probe = Sample(id="settings", prompt="")
        if (self.settings.karras and self.settings.sampler in samplers.SAMPLER_NAMES
                and self.settings.sampler not in samplers.KARRAS_SAMPLERS):
            # Karras sigmas with a run sampler that does not take them: samples may pick one that does.
            probe = dataclasses.replace(probe, sampler=samplers.KARRAS_SAMPLERS[0])
        try:
            self._prepare(probe, {})
        except RenderError as e:
            raise ValueError(f"the run's settings: {e}") from None

    # -- setup ---------------------------------------------------------------------------
    def _place(self, family):
        parts = [family.text_encoder, family.unet, family.vae]
        graphdefs, states = zip(*(nnx.split(m) for m in parts))
        states = tuple(jax.device_put(s, self._replicated) for s in states)
        return graphdefs, states

    def _count_trace(self) -> None:
        self.compile_count += 1

    def _program(self, key, build):
        if key not in self._programs:
            jitted, mesh = build(), self.mesh

            def run(*args):
                # Traced with the mesh in context, so that kernels XLA cannot partition
                # (Pallas attention on TPU) run per chip over the batch.
                with jax.set_mesh(mesh):
                    try:
                        # Waited for here: a device runs out of memory when it runs a program.
                        return jax.block_until_ready(jitted(*args))
                    except jax.errors.JaxRuntimeError as e:
                        if "RESOURCE_EXHAUSTED" not in str(e):
                            raise
                        raise DeviceMemoryError(self._memory_advice(key, e)) from e

            self._programs[key] = run
        return self._programs[key]

    def _memory_advice(self, key, error: Exception) -> str:
        stage, sig = key[0], key[1] if len(key) == 2 else None
        batch, height, width = (sig.batch, sig.height, sig.width) if sig is not None else key[1:4]
        size = f"{width}x{height}" + (" (its low-res input; 4x that out)" if stage == "upscale" else "")
        devices = list(self.mesh.devices.flat)
        first_line = str(error).strip().splitlines()[0]
        return (f"out of device memory in the {stage} stage at batch {batch}, {size}, on "
                f"{len(devices)} x {devices[0].device_kind} ({first_line}): lower the "
                f"batch size (--batch-size, or batch_size= of load_pipeline; {self.batch_size} now), the size, "
                f"or use a device with more memory")

    # -- public API ----------------------------------------------------------------------
    def describe(self) -> dict:
        """Model ids, checksums and settings, for run records and per-image metadata."""
        out = {"base": None if self.base is None else _family_info(self.base), "settings": dataclasses.asdict(self.settings),
               "devices": [str(d) for d in self.mesh.devices.flat], "batch_size": self.batch_size}
        if self.upscaler is not None:
            out["upscaler"] = _family_info(self.upscaler)
        return out

    def render(self, prompts: Sequence[str], *, seeds: Sequence[int] | None = None,
               negative_prompts: Sequence[str] | None = None, ids: Sequence[str] | None = None,
               noise: np.ndarray | None = None, **fields) -> list[Rendered]:
        """Renders prompts; `fields` are Sample fields (mode, init_image, guidance, ...) for all.

        Without `seeds`, each prompt's seed comes from the run seed and its `ids` entry, as
        the job's do; without ids either, from the run seed and the prompt's text (and, for
        a prompt given again, how many times it came before), so a prompt renders the same
        image wherever it sits in the list.
        """
        if isinstance(prompts, str):
            raise ValueError("render: prompts is one string: give a list of prompts")
        per_prompt = {"id": "ids", "prompt": "prompts", "negative_prompt": "negative_prompts", "seed": "seeds"}
        clash = sorted(fields.keys() & per_prompt.keys())
        if clash:
            raise ValueError(f"render: {clash[0]}= is given per prompt here: pass {per_prompt[clash[0]]}=[...], "
                             "one per prompt")
        check_keywords("render", fields, {f.name for f in dataclasses.fields(Sample)} - per_prompt.keys()
                       | {"seeds", "negative_prompts", "ids", "noise"})
        for name, values in (("seeds", seeds), ("negative_prompts", negative_prompts), ("ids", ids)):
            if isinstance(values, str):
                raise ValueError(f"render: {name} is one string: give a list, one per prompt")
            if values is not None and (np.ndim(values) != 1 if isinstance(values, np.ndarray)
                                       else not hasattr(values, "__len__")):
                raise ValueError(f"render: {name} is {values!r}: give a list, one per prompt")
            if values is not None and len(values) != len(prompts):
                raise ValueError(f"render: {len(values)} {name} for {len(prompts)} prompts: give one per prompt")
        # All checked before any batch renders, and named by their place in the caller's lists.
        for name, texts in (("prompts", prompts), ("negative_prompts", negative_prompts)):
            for i, text in enumerate(() if texts is None else texts):
                # A negative prompt of None is the run's, as Sample takes it.
                if not isinstance(text, str) and not (text is None and name == "negative_prompts"):
                    raise ValueError(f"render: {name}[{i}] is {text!r}: give text")
        if seeds is not None:
            seeds = _seed_list("render", seeds)
        elif ids is None:
            seen: dict[str, int] = {}
            seeds = []
            for prompt in prompts:
                seeds.append(prompt_seed(self.settings.seed, prompt, seen.get(prompt, 0)))
                seen[prompt] = seen.get(prompt, 0) + 1
        samples = []
        for i, prompt in enumerate(prompts):
            samples.append(Sample(
                id=ids[i] if ids is not None else f"{i:06d}", prompt=prompt,
                negative_prompt=None if negative_prompts is None else negative_prompts[i],
                seed=None if seeds is None else seeds[i], **fields))
        return self.render_samples(samples, noise=noise)

    def render_samples(self, samples: Sequence[Sample | PreparedSample], *,
                       noise: np.ndarray | None = None) -> list[Rendered]:
        """Renders any number of samples (or samples `prepare` made ready); results come back
        in the order given.

        `noise` (optional, (N, h, w, C) latents) replaces each sample's initial noise, as
        diffusers' `latents=` argument does, to reproduce a run exactly.
        """
        if self.base is None:
            raise RenderError("no base model is loaded: this pipeline only upscales (see `upscale`)")
        results: list[Rendered | None] = [None] * len(samples)
        groups: dict[tuple, list[int]] = {}
        prepared = self.prepare_all(samples)
        for i, (sample, prep) in enumerate(zip(samples, prepared)):
            if isinstance(prep, RenderError):
                results[i] = Rendered(sample.id, None, {"prompt": sample.prompt}, error=str(prep))
            else:
                groups.setdefault(prep.batch_key, []).append(i)
        if noise is not None:  # checked whole before anything renders
            noise = np.asarray(noise)
            if len(noise) != len(samples):
                raise ValueError(f"render: noise holds {len(noise)} latents for {len(samples)} samples: give one each")
            for (height, width, *_), members in groups.items():
                latent = (height // self.vae_factor, width // self.vae_factor, self.latent_channels)
                if noise.shape[1:] != latent:
                    raise ValueError(f"render: noise latents are {noise.shape[1:]}, but sample "
                                     f"{prepared[members[0]].sample.id!r} renders at {width}x{height}, latents {latent}: "
                                     f"noise= takes samples of one size")
        for (height, width, steps, sampler, _, cfg), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                batch_noise = None if noise is None else noise[chunk]
                rendered = self._render_batch([prepared[i] for i in chunk], height, width, steps, sampler, cfg,
                                              batch_noise)
                for i, r in zip(chunk, rendered):
                    results[i] = r
        return results  # type: ignore[return-value]

    # -- per-sample preparation ----------------------------------------------------------
    def prepare(self, s: Sample) -> PreparedSample:
        """`s` checked, its settings resolved and its images converted to render size:
        RenderError if it cannot render. Safe on any thread, so a job can prepare the next
        batch while this one renders (resizing a 2048 px init image takes ~50 ms)."""
        return self._prepare(s, {})

    def prepare_all(self, samples: Sequence[Sample | PreparedSample]) -> list[PreparedSample | RenderError]:
        """`prepare` for each sample (one already prepared as it is), or the RenderError
        that refuses it. Samples given the same input arrays at one size (a manifest
        record's variants) share one prepared image and mask, made once."""
        shared: dict = {}
        out: list[PreparedSample | RenderError] = []
        for s in samples:
            try:
                out.append(s if isinstance(s, PreparedSample) else self._prepare(s, shared))
            except RenderError as err:
                out.append(err)
        return out

    def _prepare(self, s: Sample, shared: dict) -> PreparedSample:
        st = self.settings
        if s.mode not in MODES:
            raise RenderError(f"unknown mode {s.mode!r}: use one of {', '.join(MODES)}")
        # Inputs the mode does not use are refused, not ignored (the manifest refuses them too,
        # but for a strength on a txt2img record: a table's strength column may fill every row).
        for name in ("init_image", "strength"):
            if s.mode == "txt2img" and getattr(s, name) is not None:
                raise RenderError(f"{name} given but mode is txt2img: pass mode='img2img' (or inpaint, outpaint, "
                                  f"sketch) to start from an image, or leave {name} out")
        if s.mask is not None and s.mode != "inpaint":
            raise RenderError(f"mask given but mode is {s.mode}: masks are for mode='inpaint' (outpaint masks its "
                              "new pixels itself), or leave mask out")
        if s.outpaint is not None and s.mode != "outpaint":
            raise RenderError(f"outpaint given but mode is {s.mode}: pass mode='outpaint', or leave outpaint out")
        given = {"width": s.width if s.width is not None else st.width,
                 "height": s.height if s.height is not None else st.height,
                 "steps": s.steps if s.steps is not None else st.steps, "seed": s.seed}
        for name, value in given.items():  # None: unset
            if value is not None and whole_number(value) is None:
                raise RenderError(f"{name} is {value!r}: give a whole number (an int), not text or a fraction")
            given[name] = None if value is None else whole_number(value)
        guidance = st.guidance if s.guidance is None else s.guidance
        if real_number(guidance) is None:
            raise RenderError(f"guidance is {guidance!r}: give a number >= 0, e.g. guidance=7.5")
        guidance = real_number(guidance)
        if not isinstance(s.prompt, str):
            raise RenderError(f"prompt is {s.prompt!r}: give text")
        if s.negative_prompt is not None and not isinstance(s.negative_prompt, str):
            raise RenderError(f"negative_prompt is {s.negative_prompt!r}: give text (\"\" for none)")
        if s.strength is not None and real_number(s.strength) is None:
            raise RenderError(f"strength is {s.strength!r}: give a number in (0, 1], e.g. strength=0.6")
        prep = PreparedSample(
            # A 0 given is refused below, not taken for "unset". Unset (None here): the native
            # size for text-to-image; for the other modes, worked out from the init image.
            sample=s, width=given["width"], height=given["height"], steps=given["steps"],
            sampler=s.sampler or st.sampler, guidance=guidance,
            seed=derive_seed(st.seed, s.id) if given["seed"] is None else given["seed"],
            negative_prompt=st.negative_prompt if s.negative_prompt is None else s.negative_prompt,
            cfg=guidance_on(guidance) and not self._guidance_distilled)
        if not 0 <= prep.seed < 2**32:
            raise RenderError(f"seed {prep.seed} is out of range: use a whole number from 0 to 2**32 - 1")
        if prep.sampler not in samplers.SAMPLER_NAMES:
            raise RenderError(f"unknown sampler {prep.sampler!r}: use one of {', '.join(samplers.SAMPLER_NAMES)}")
        if not (math.isfinite(prep.guidance) and prep.guidance >= 0):
            raise RenderError(f"guidance {prep.guidance} is not a finite number >= 0")
        train_steps = int(self.base.scheduler_config.get("num_train_timesteps", 1000))
        if not 1 <= prep.steps <= train_steps:
            raise RenderError(f"steps {prep.steps} is out of range: use 1 to {train_steps} (the model's "
                              f"num_train_timesteps)")
        if st.karras and prep.sampler not in samplers.KARRAS_SAMPLERS:
            raise RenderError(f"Karras sigmas apply to {', '.join(samplers.KARRAS_SAMPLERS)} only, not to "
                              f"sampler {prep.sampler!r}: pick one of those, or turn karras off")
        if prep.negative_prompt and self._guidance_distilled:
            raise RenderError("this model's guidance is distilled into it (LCM: time_cond_proj_dim), so it takes "
                              "no negative prompt, as in diffusers' LatentConsistencyModelPipeline: leave it empty")
        try:
            self._base_sampler(prep.sampler, prep.steps)
        except ValueError as e:
            raise RenderError(f"sampler {prep.sampler} at {prep.steps} steps: {e}") from None
        if s.mode == "txt2img":
            prep.width = self.native_size if prep.width is None else prep.width
            prep.height = self.native_size if prep.height is None else prep.height
            self._check_size(prep.width, prep.height)
            return prep
        # A guidance-distilled model renders as diffusers' LCM pipelines (txt2img, img2img); a
        # plain UNet with lcm (LCM-LoRA) as SD's pipelines with LCMScheduler, every mode.
        distilled_lcm = prep.sampler == "lcm" and self._guidance_distilled
        if distilled_lcm and s.mode not in ("img2img", "sketch"):
            raise RenderError(f"sampler lcm on a guidance-distilled model renders txt2img, img2img and sketch, "
                              f"not mode {s.mode} (diffusers has no LCM {s.mode} pipeline): pick another sampler")
        if s.init_image is None:
            raise RenderError(f"mode {s.mode} needs an init_image")
        prep.image, prep.mask, prep.width, prep.height = self._images_at_render_size(s, prep, shared)
        if s.mode in ("img2img", "sketch"):
            prep.strength = float(s.strength) if s.strength is not None else (
                st.sketch_strength if s.mode == "sketch" else st.strength)
            prep.init_flag = True
        else:  # inpaint, outpaint
            prep.strength = 1.0 if s.strength is None else float(s.strength)
            # At full strength the masked area starts from pure noise (as diffusers does).
            prep.init_flag = prep.strength < 1.0
        if not 0.0 < prep.strength <= 1.0:
            raise RenderError(f"strength {prep.strength} is outside (0, 1]")
        if distilled_lcm:  # the strength respaces lcm's steps, and every one runs
            try:
                self._base_sampler("lcm", prep.steps, prep.strength)
            except ValueError as e:
                raise RenderError(str(e)) from None
            prep.lcm_grid = self._lcm_grid(prep.strength)
            return prep
        prep.start_step = int(samplers.host_start_steps(prep.steps, prep.strength)[0])
        if prep.start_step >= prep.steps:  # diffusers refuses this too
            raise RenderError(f"strength {prep.strength} at {prep.steps} steps leaves no step to take "
                              f"(int(steps x strength) = 0): raise the strength or the steps")
        return prep

    def _images_at_render_size(self, s: Sample, prep: PreparedSample, shared: dict) -> tuple:
        """(image in [-1, 1], mask in {0, 1} or None, width, height) for `s` at `prep`'s size
        (an outpaint canvas sets its own). `shared` holds what earlier samples of the same
        call got: a sample with the same input arrays (by identity: they cannot change within
        the call) at the same size gets the same result."""
        # The arrays themselves are kept with the result, so their ids stay theirs.
        key = (id(s.init_image), id(s.mask), s.mode, repr(s.outpaint), prep.width, prep.height)
        if key in shared:
            return shared[key][1]
        try:
            image = imgs.rgb_array(s.init_image)
            mask = None if s.mask is None else imgs.mask_array(s.mask)
        except ValueError as e:
            raise RenderError(str(e)) from None
        if mask is not None:  # one rule with the manifest's: the init image's size or aspect ratio
            problem = imgs.mask_size_problem(mask.shape[1], mask.shape[0], image.shape[1], image.shape[0])
            if problem:
                raise RenderError(problem)
        width, height = prep.width, prep.height
        if s.mode == "outpaint":
            try:
                pads = () if s.outpaint is None else tuple(s.outpaint)  # a list, a tuple, an array
            except TypeError:  # a single number
                pads = ()
            # Whole numbers as elsewhere (8 and 8.0 alike, as the manifest takes them), not 8.5 or True.
            whole = [whole_number(p) for p in pads]
            if len(pads) != 4 or not all(p is not None and p >= 0 for p in whole) or not any(whole):
                raise RenderError(f"mode outpaint needs `outpaint` pixels (left, top, right, bottom): whole "
                                  f"numbers >= 0, not all 0; got {s.outpaint!r}")
            pads = tuple(whole)
            problem = imgs.outpaint_size_problem(image.shape[1], image.shape[0], pads, self.size_multiple)
            if problem:
                raise RenderError(problem)
            image, mask = imgs.outpaint_canvas(image, pads, self.vae_factor)
            width, height = image.shape[1], image.shape[0]
        else:
            # The photo's shape at the model's scale: a side not given follows the photo's
            # aspect ratio (with neither, at about the native pixel count), so a non-square
            # photo is not squashed and a large one does not multiply the work (diffusers
            # renders at the photo's own size: give width and height for that).
            width, height = imgs.size_at_aspect(image.shape[1], image.shape[0], self.native_size, self.size_multiple,
                                                given_width=width, given_height=height)
        self._check_size(width, height)
        image = imgs.to_unit_range(imgs.resize_rgb(image, width, height))
        if s.mode in ("inpaint", "outpaint"):
            if mask is None:
                raise RenderError(f"mode {s.mode} needs a mask")
            mask = imgs.binary_mask(mask, width, height)
        else:
            mask = None  # img2img and sketch repaint everywhere
        for array in (image, mask):
            if array is not None:
                array.setflags(write=False)  # may be shared by several samples
        result = (image, mask, width, height)
        shared[key] = ((s.init_image, s.mask), result)
        return result

    def _check_size(self, width: int, height: int) -> None:
        multiple = self.size_multiple
        if width % multiple or height % multiple or min(width, height) < multiple:
            raise RenderError(f"unsupported size {width}x{height} (width x height): use multiples of {multiple}")

    # -- batches -------------------------------------------------------------------------
    def _put(self, array) -> jax.Array:
        return jax.device_put(array, self._batched)

    def _token_inputs(self, family, prompts: list[str], negatives: list[str]) -> tuple[dict, list[tuple[bool, bool]]]:
        """The programs' token inputs for prompts and negative prompts, and for each sample
        whether its prompt and its negative prompt were cut."""
        tokens, uncond = tokenize(family.tokenizer, prompts), tokenize(family.tokenizer, negatives)
        inputs = {"ids": tokens.ids, "ids_mask": tokens.mask, "uncond_ids": uncond.ids, "uncond_ids_mask": uncond.mask}
        return inputs, list(zip(tokens.truncated, uncond.truncated))

    def _lcm_grid(self, strength: float) -> int:
        """The LCM grid points an img2img strength keeps, which fix lcm's respaced steps; 0
        where it keeps the whole grid (the text-to-image steps)."""
        points = int(self._schedule.original_inference_steps * strength)
        return 0 if points >= self._schedule.original_inference_steps else points

    def _base_sampler(self, name: str, steps: int, lcm_strength: float = 1.0) -> tuple[samplers.Sampler, bool]:
        """The base stage's sampler and whether it takes Karras sigmas, built once per
        (name, steps, LCM grid points the strength keeps); ValueError where the checkpoint's
        scheduler config rules them out."""
        karras = self.settings.karras
        if karras is None:  # the checkpoint's scheduler says, for the samplers that take it
            karras = bool(self.base.scheduler_config.get("use_karras_sigmas")) and name in samplers.KARRAS_SAMPLERS
        key = (name, steps, karras, self._lcm_grid(lcm_strength))
        with self._samplers_lock:
            if key not in self._samplers:
                self._samplers[key] = _named(lambda: samplers.make_sampler(
                    name, self._schedule, steps, karras_sigmas=karras, strength=lcm_strength),
                    _config_path(self.base))
            return self._samplers[key], karras

    def _render_batch(self, preps: list[PreparedSample], height: int, width: int, steps: int, sampler_name: str,
                      cfg: bool, noise: np.ndarray | None) -> list[Rendered]:
        t0 = time.perf_counter()
        n_real = len(preps)
        padded = preps + [preps[-1]] * (self.batch_size - n_real)
        B = self.batch_size
        f = self.vae_factor
        lh, lw = height // f, width // f
        C = self.latent_channels

        token_inputs, truncated = self._token_inputs(self.base, [p.sample.prompt for p in padded],
                                                     [p.negative_prompt for p in padded])
        init_latents = np.zeros((B, lh, lw, C), np.float32)
        masked_latents = np.zeros((B, lh, lw, C), np.float32)
        mask = np.ones((B, lh, lw, 1), np.float32)
        # A 9-channel (inpainting) UNet sees every sample's mask and masked image; a sample
        # without a mask is all repaint, its masked image all zeros (diffusers' full mask),
        # so what it gets does not depend on its batch.
        nine_channel = self.base.unet_config.in_channels > C
        if nine_channel or any(p.image is not None for p in padded):
            scale = float(self.base.vae_config.scaling_factor)
            encode = self._program(("encode", B, height, width), lambda: make_encode_program(
                self._base[0][2], scaling_factor=scale, on_trace=self._count_trace, backend=self._backend))
            pixels = np.stack([p.image if p.image is not None else np.zeros((height, width, 3), np.float32)
                               for p in padded])
            if any(p.image is not None for p in padded):
                init_latents = np.asarray(encode(self._base[1][2], self._put(pixels)))
            masks = np.stack([p.mask if p.mask is not None else np.ones((height, width, 1), np.float32)
                              for p in padded])
            if any(p.mask is not None for p in padded):
                mask = np.stack([imgs.latent_mask(m, f) for m in masks])
            if nine_channel:
                masked_latents = np.asarray(encode(self._base[1][2], self._put(pixels * (masks < 0.5))))
        noise_given = np.zeros((B,), bool)
        noise_arr = np.zeros((B, lh, lw, C), np.float32)
        if noise is not None:
            noise_arr[:n_real] = noise
            noise_given[:n_real] = True
        inputs = {
            **token_inputs,
            "guidance": np.array([p.guidance for p in padded], np.float32),
            "seeds": np.array([p.seed for p in padded], np.uint32),
            "start_step": np.array([p.start_step for p in padded], np.int32),
            "init_flag": np.array([p.init_flag for p in padded], bool),
            "init_latents": init_latents, "mask": mask, "masked_latents": masked_latents,
            "noise": noise_arr, "noise_given": noise_given,
        }
        # Every sample here keeps the same LCM grid points (grouped so): any one's strength builds it.
        lcm_strength = preps[0].strength if preps[0].lcm_grid else 1.0
        sampler, karras = self._base_sampler(sampler_name, steps, lcm_strength)
        sig = BaseSignature(B, height, width, steps, sampler_name, karras, preps[0].lcm_grid, cfg)
        program = self._program(("base", sig), lambda: make_base_program(
            self._base[0], sampler, sig, clip_skip=self.settings.clip_skip, scaling_factor=float(self.base.vae_config.scaling_factor),
            tile_pixels=self.settings.tile_pixels, on_trace=self._count_trace, backend=self._backend))
        # Each program returns once its results are ready (`_program`): the stages' times are theirs.
        base_u8, base_ok = program(self._base[1], {k: self._put(v) for k, v in inputs.items()})
        base_time = time.perf_counter() - t0

        final_u8, final_ok, up_time = base_u8, base_ok, 0.0
        if self._up is not None and self.settings.upscale:
            t1 = time.perf_counter()
            final_u8, final_ok = self._upscale([p.sample.prompt for p in padded],
                                               [p.negative_prompt for p in padded],
                                               [p.seed for p in padded], base_u8)
            final_ok = final_ok & base_ok
            up_time = time.perf_counter() - t1
        final_u8, final_ok = np.asarray(final_u8), np.asarray(final_ok)
        base_np = np.asarray(base_u8) if self.settings.keep_base and self._up is not None else None
        per_image = {"base_s": round(base_time / n_real, 4), "upscale_s": round(up_time / n_real, 4)}

        out = []
        for i, p in enumerate(preps):
            meta = self._metadata(p, truncated[i], final_u8.shape[1:3], per_image)
            if not final_ok[i]:
                out.append(Rendered(p.sample.id, None, meta, error="non-finite values (NaN or Inf) in the output"))
                continue
            out.append(Rendered(p.sample.id, final_u8[i], meta, base_image=None if base_np is None else base_np[i]))
        return out

    def upscale(self, images: Sequence[np.ndarray], prompts: Sequence[str], *, seeds: Sequence[int],
                negative_prompts: Sequence[str] | None = None, noise: np.ndarray | None = None,
                aug_noise: np.ndarray | None = None) -> list[np.ndarray | None]:
        """Runs only the x4 stage on given images, all one size: uint8 (H, W, 3) RGB, or as a
        Sample's init_image takes them (grey, RGBA, floats in [0, 1]); returns uint8 images,
        None where the output is not finite.

        `noise` (latent noise, (N, H, W, C)) and `aug_noise` (the low-res augmentation noise,
        (N, H, W, 3)) replace the drawn noise, to reproduce a run exactly.
        """
        if self._up is None:
            raise RenderError("no upscaler is loaded: pass upscaler=... to load_pipeline")
        if (noise is None) != (aug_noise is None):
            raise ValueError("pass noise and aug_noise together (a run is reproduced by both), or neither")
        rgb, seeds = self._upscale_inputs(images, prompts, seeds, negative_prompts, noise, aug_noise)
        out = []
        for start in range(0, len(rgb), self.batch_size):
            sl = slice(start, start + self.batch_size)
            n = len(rgb[sl])
            pad = lambda xs: list(xs) + [xs[-1]] * (self.batch_size - n)
            negs = [self.settings.negative_prompt if text is None else text
                    for text in (negative_prompts[sl] if negative_prompts is not None else [None] * n)]
            batch = jax.device_put(np.stack(pad(rgb[sl])), self._batched)
            u8, ok = self._upscale(pad(prompts[sl]), pad(negs), pad(seeds[sl]), batch,
                                   None if noise is None else np.asarray(noise)[sl],
                                   None if aug_noise is None else np.asarray(aug_noise)[sl])
            u8, ok = np.asarray(u8), np.asarray(ok)
            out.extend(u8[i] if ok[i] else None for i in range(n))
        return out

    def _upscale_inputs(self, images, prompts, seeds, negative_prompts, noise, aug_noise
                        ) -> tuple[list[np.ndarray], list[int]]:
        """`images` as uint8 RGB arrays and `seeds` as ints, after checking that every list
        gives one entry per image and that the images and any given noise share one size; else
        a ValueError that names the input."""
        single = isinstance(images, np.ndarray) and (images.ndim == 2 or
                                                     images.ndim == 3 and images.shape[-1] in (3, 4))
        if single or isinstance(images, PIL.Image.Image):
            shape = f"an array of shape {images.shape}" if single else "a PIL image"
            raise ValueError(f"upscale: images is one image ({shape}): pass a list of images, e.g. [image], "
                             f"with one prompt and seed each")
        count = len(images)
        per_image = {"prompts": prompts, "seeds": seeds, "negative_prompts": negative_prompts,
                     "noise": noise, "aug_noise": aug_noise}
        for name, values in per_image.items():
            if isinstance(values, str):
                raise ValueError(f"upscale: {name} is one string: give a list, one per image")
            if values is not None and np.ndim(values) == 0:
                raise ValueError(f"upscale: {name} is {values!r}: give a list, one per image")
            # A short list would otherwise reach the program as a cryptic shape error, and short
            # noise would be drawn for the images past its end instead of reproduced.
            if values is not None and len(values) != count:
                raise ValueError(f"upscale: {len(values)} {name} for {count} images: give one per image")
        for name, texts in (("prompts", prompts), ("negative_prompts", negative_prompts)):
            for i, text in enumerate(() if texts is None else texts):
                # A negative prompt of None is the run's, as render takes it.
                if not isinstance(text, str) and not (text is None and name == "negative_prompts"):
                    raise ValueError(f"upscale: {name}[{i}] is {text!r}: give text")
        seeds = _seed_list("upscale", seeds)
        rgb = []
        for i, image in enumerate(images):
            try:
                rgb.append(imgs.rgb_array(image))
            except ValueError as e:
                raise ValueError(f"upscale: {str(e).replace('init_image', f'images[{i}]')}") from None
        if not rgb:
            return rgb, seeds
        height, width = rgb[0].shape[:2]
        for i, image in enumerate(rgb):
            if image.shape[:2] != (height, width):
                raise ValueError(f"upscale: images[{i}] is {image.shape[0]}x{image.shape[1]} (height x width), "
                                 f"images[0] {height}x{width}: one call upscales one size; call it once per size")
        if noise is not None:
            channels = int(self.upscaler.unet_config.out_channels)
            for name, array, c in (("noise", noise, channels), ("aug_noise", aug_noise, 3)):
                if np.shape(array) != (count, height, width, c):
                    raise ValueError(f"upscale: {name} has shape {np.shape(array)}; expected "
                                     f"{(count, height, width, c)} (images, height, width, channels last)")
        return rgb, seeds

    def _upscale(self, prompts: list[str], negatives: list[str], seeds: list[int], base_u8: jax.Array,
                 noise: np.ndarray | None = None, aug_noise: np.ndarray | None = None):
        st, fam = self.settings, self.upscaler
        B, height, width = base_u8.shape[0], base_u8.shape[1], base_u8.shape[2]
        sampler_name = self._upscale_sampler
        sig = UpscaleSignature(B, height, width, st.upscale_steps, sampler_name, guidance_on(st.upscale_guidance))
        program = self._program(("upscale", sig), lambda: make_upscale_program(
            self._up[0], self._upscale_solver, self._low_res_schedule, sig,
            # No clip skip: a base model's setting, which diffusers' upscale pipeline does not take.
            clip_skip=0, scaling_factor=float(fam.vae_config.scaling_factor),
            tile_pixels=st.tile_pixels, on_trace=self._count_trace, backend=self._backend))
        token_inputs, _ = self._token_inputs(fam, list(prompts), list(negatives))
        C = int(fam.unet_config.out_channels)
        noise_given = np.zeros((B,), bool)
        noise_arr = np.zeros((B, height, width, C), np.float32)
        aug_arr = np.zeros((B, height, width, 3), np.float32)
        if noise is not None:
            n = len(noise)
            noise_arr[:n], aug_arr[:n], noise_given[:n] = noise, aug_noise, True
        # The upscaler sees the base image as stored (uint8), so upscaling a saved base
        # image later reproduces the same result.
        low_res = base_u8.astype(jnp.float32) / 127.5 - 1.0
        inputs = {
            **{name: self._put(value) for name, value in token_inputs.items()},
            "guidance": self._put(np.full((B,), st.upscale_guidance, np.float32)),
            "seeds": self._put(np.array(seeds, np.uint32)),
            "low_res": jax.device_put(low_res, self._batched),
            "noise_level": self._put(np.full((B,), st.noise_level, np.int32)),
            "noise": self._put(noise_arr), "aug_noise": self._put(aug_arr),
            "noise_given": self._put(noise_given),
        }
        return program(self._up[1], inputs)

    def _metadata(self, p: PreparedSample, truncated: tuple[bool, bool], size, timings) -> dict:
        s = p.sample
        meta = {
            "id": s.id, "prompt": s.prompt, "negative_prompt": p.negative_prompt, "seed": p.seed,
            "mode": s.mode, "sampler": p.sampler, "steps": p.steps, "guidance": p.guidance,
            "width": int(size[1]), "height": int(size[0]), "base_width": p.width, "base_height": p.height,
            "prompt_truncated": bool(truncated[0]), "negative_prompt_truncated": bool(truncated[1]),
            "model": self.base.path, "timings": timings,
        }
        if p.strength is not None:
            meta["strength"] = p.strength
        if s.mode == "outpaint":
            meta["outpaint"] = [int(v) for v in s.outpaint]
        if self._up is not None and self.settings.upscale:
            st = self.settings
            meta.update(upscaler=self.upscaler.path, upscale_steps=st.upscale_steps,
                        upscale_guidance=st.upscale_guidance, noise_level=st.noise_level,
                        upscale_sampler=self._upscale_sampler)
        return meta  # what was rendered; the Sample keeps its own metadata


def _seed_list(caller: str, seeds) -> list[int]:
    """`seeds` as ints, each a whole number in [0, 2**32) (4 and 4.0 alike, not 4.5); else a
    ValueError naming the caller and the seed."""
    out = []
    for i, seed in enumerate(seeds):
        value = whole_number(seed)
        if value is None or not 0 <= value < 2**32:
            raise ValueError(f"{caller}: seeds[{i}] is {seed!r}: give whole numbers in [0, 2**32)")
        out.append(value)
    return out


def _family_info(family) -> dict:
    return {"path": family.path, "kind": family.kind, "dtype": jnp.dtype(family.dtype).name,
            "sha256": dict(family.sha256)}
