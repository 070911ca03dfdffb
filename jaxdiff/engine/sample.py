"""What flows between the pipeline and the engine: one Sample in, one Rendered out."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

MODES = ("txt2img", "img2img", "inpaint", "outpaint", "sketch")


def guidance_on(scale: float) -> bool:
    """Classifier-free guidance at 1 or below is off, as in diffusers: the prompt's
    prediction alone, one UNet call at half CFG's batch, so such samples batch apart."""
    return scale > 1


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image to render. Fields left None take the run's defaults."""

    id: str
    prompt: str
    negative_prompt: str | None = None  # None: the run's; "" is no negative prompt
    seed: int | None = None            # None: derived from the run seed and the id
    guidance: float | None = None
    steps: int | None = None
    sampler: str | None = None
    width: int | None = None
    height: int | None = None
    mode: str = "txt2img"
    init_image: Any = None   # uint8 (H, W, 3) or a PIL image, img2img / inpaint / sketch / outpaint
    # uint8 (H, W) or a PIL image, 255 (white) = repaint; the init image's size or aspect
    # ratio (images.mask_size_problem), resized with it to the render size
    mask: Any = None
    strength: float | None = None
    outpaint: tuple[int, int, int, int] | None = None  # pixels added (left, top, right, bottom)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Where init_image and mask came from (path or URL, and the sha256 of each file), kept
    # with the image by the job; the engine does not read it.
    input_files: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Rendered:
    """The outcome of one Sample: an image, or the reason there is none."""

    id: str
    image: np.ndarray | None               # uint8 (H, W, 3)
    metadata: dict[str, Any]
    base_image: np.ndarray | None = None   # the base stage's image, when kept
    error: str | None = None               # e.g. "non-finite values in output"


def derive_seed(run_seed: int, sample_id: str) -> int:
    """A sample's seed when the manifest names none: a stable 31-bit hash of (run seed, id).

    Stable across processes and Python versions (unlike `hash`), so a rerun, a retry or
    another worker draws the same noise for the same id.
    """
    return _hash31(f"{run_seed}:{sample_id}")


def prompt_seed(run_seed: int, prompt: str, occurrence: int) -> int:
    """The seed `Pipeline.render` gives a prompt when neither seeds nor ids are given: a
    stable 31-bit hash of (run seed, prompt, how many times the prompt came earlier in the
    call), so a prompt's image does not depend on where it sits in the list, and a prompt
    given twice gets two images. Stable across processes, as `derive_seed` is."""
    return _hash31(f"{run_seed}:prompt:{occurrence}:{prompt}")


def _hash31(text: str) -> int:
    import hashlib

    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def check_keywords(function: str, given, known) -> None:
    """Refuses a keyword `function` does not take: a TypeError naming it and the closest one
    it takes (stpes= for steps=), instead of one from the class the keywords go to."""
    import difflib

    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            fix = f"did you mean {close[0]}=?" if close else f"it takes {', '.join(sorted(known))}"
            raise TypeError(f"{function}() got an unknown keyword {name}=: {fix}")


def whole_number(value) -> int | None:
    """`value` as an int where it is a whole number: an int, a numpy integer or an integral
    float (4.0), also held in a 0-d numpy or JAX array; None for anything else (1.7, NaN,
    text, bools), which callers refuse by name."""
    value = _scalar(value)
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def real_number(value) -> float | None:
    """`value` as a float where it is a number (int, float or numpy's, also in a 0-d numpy or
    JAX array); None for text, bools and anything else, which callers refuse by name."""
    value = _scalar(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


def _scalar(value):
    """The Python or numpy scalar a 0-d array holds (jax.random.randint gives seeds so)."""
    return np.asarray(value)[()] if getattr(value, "shape", None) == () and not np.isscalar(value) else value
