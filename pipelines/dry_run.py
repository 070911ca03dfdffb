"""A renderer with no model: deterministic images from each sample's seed.

It has the engine's renderer interface (`batch_size`, `render_samples`, `describe`),
so `jaxdiff render --dry-run` exercises planning, batching, shard writing, resume and
progress at full speed, and the pipeline tests run without weights.
"""

from __future__ import annotations

import time

import numpy as np

import jaxdiff
from jaxdiff.engine.images import outpaint_size_problem, size_at_aspect
from jaxdiff.engine.sample import Rendered, Sample, derive_seed

# The placeholders' sizes: any multiple of 8 (the VAE's downsampling factor), so tiny
# images can test a huge manifest. A record's own width and height are held to the real
# run's rule before they get here (manifest.RenderDefaults), so a manifest checked with
# --dry-run is checked for real.
SIZE_MULTIPLE = 8
MAX_SIDE = 4096
# An outpaint canvas (the init image plus the outpaint pixels) sets its own size: held to
# what the run's model takes (`canvas_multiple`: its configs say, 64 for SD), as records'
# own sizes are.
CANVAS_MAX_SIDE = 2048


class DryRunRenderer:
    """Renders a flat colour plus a noise pattern, both drawn from the sample's seed."""

    def __init__(self, batch_size: int = 4, *, width: int = 512, height: int = 512, steps: int = 25,
                 guidance: float = 7.5, sampler: str = "dpmpp_2m", seed: int = 0, canvas_multiple: int = 64,
                 delay_s: float = 0.0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.width, self.height = width, height
        self.steps, self.guidance, self.sampler, self.seed = steps, guidance, sampler, seed
        self.canvas_multiple = canvas_multiple
        self.delay_s = delay_s  # per batch: lets tests and demos watch progress or kill a run midway

    def describe(self) -> dict:
        return {
            "model": "dry-run",
            "upscaler": None,
            "checksums": {},
            "sampler": self.sampler,
            "dtype": "uint8",
            "versions": {"jaxdiff": jaxdiff.__version__, "numpy": np.__version__},
        }

    def render_samples(self, samples: list[Sample]) -> list[Rendered]:
        """Any number of samples, in batches of `batch_size`, as the engine renders them
        (RunInference hands over batches of the handler's size, not the renderer's)."""
        out: list[Rendered] = []
        for first in range(0, len(samples), self.batch_size):
            start = time.perf_counter()
            if self.delay_s:
                time.sleep(self.delay_s)
            batch = [self._render_one(s) for s in samples[first:first + self.batch_size]]
            elapsed = time.perf_counter() - start
            for r in batch:
                r.metadata["timings"] = {"render_batch_s": round(elapsed, 6)}
            out += batch
        return out

    def _render_one(self, sample: Sample) -> Rendered:
        seed = sample.seed if sample.seed is not None else derive_seed(self.seed, sample.id)
        width, height = sample.width or self.width, sample.height or self.height
        if sample.mode != "txt2img" and sample.init_image is not None:
            image_height, image_width = np.shape(sample.init_image)[:2]
            if sample.mode == "outpaint" and sample.outpaint is not None:
                left, top, right, bottom = sample.outpaint
                width, height = image_width + left + right, image_height + top + bottom
                if max(width, height) > CANVAS_MAX_SIDE:
                    problem = f"the outpaint canvas is {width}x{height}, past {CANVAS_MAX_SIDE} a side"
                else:
                    problem = outpaint_size_problem(image_width, image_height, sample.outpaint, self.canvas_multiple)
                if problem:
                    return Rendered(sample.id, None, {}, error=problem)
            else:  # as the engine: the photo's aspect ratio at about the placeholders' pixel count
                width, height = size_at_aspect(image_width, image_height, int(np.sqrt(self.width * self.height)),
                                               SIZE_MULTIPLE, given_width=sample.width, given_height=sample.height)
        for name, side in (("width", width), ("height", height)):
            if side % SIZE_MULTIPLE or not SIZE_MULTIPLE <= side <= MAX_SIDE:
                # Reported per sample, as the engine reports its RenderError.
                return Rendered(sample.id, None, {}, error=(
                    f"unsupported {name} {side}: use a multiple of {SIZE_MULTIPLE} "
                    f"between {SIZE_MULTIPLE} and {MAX_SIDE}"))
        rng = np.random.default_rng(seed)
        colour = rng.integers(32, 224, size=3)
        noise = rng.integers(-32, 32, size=(height, width, 1))
        image = np.clip(colour[None, None, :] + noise, 0, 255).astype(np.uint8)
        return Rendered(
            id=sample.id,
            image=image,
            metadata={
                "seed": int(seed),
                "width": width,
                "height": height,
                "steps": sample.steps or self.steps,
                "guidance": sample.guidance if sample.guidance is not None else self.guidance,
                "sampler": sample.sampler or self.sampler,
                "mode": sample.mode,
            },
        )
