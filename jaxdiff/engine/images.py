"""Host-side image preparation for the modes: resizing, masks, outpaint canvases."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def rgb_from_pil(image: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3) RGB of a decoded image: 16-bit grey scaled to 8 bits, transparency
    composited onto white (a sketch on a transparent canvas is lines on white, as a
    viewer shows it, whatever colour the transparent pixels happen to store)."""
    image = _eight_bit(image)
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def grey_from_pil(image: Image.Image) -> np.ndarray:
    """uint8 (H, W) grey levels of a decoded mask, 255 = repaint; where it has transparency,
    transparent means keep (strokes drawn on a transparent layer)."""
    image = _eight_bit(image)
    if _has_transparency(image):
        grey, alpha = (np.asarray(c, np.float32) for c in image.convert("RGBA").convert("LA").split())
        return np.round(grey * alpha / 255.0).astype(np.uint8)
    return np.asarray(image.convert("L"))


def _has_transparency(image: Image.Image) -> bool:
    # An alpha channel, or a PNG tRNS key colour (palette, grey or RGB): PNG optimisers
    # turn an RGBA drawing whose alpha is all-or-nothing into the latter.
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def _eight_bit(image: Image.Image) -> Image.Image:
    # Pillow opens 16-bit grey PNGs as I;16 (or I), whose convert() clips at 255 instead of scaling.
    if image.mode.startswith("I;16") or image.mode == "I":
        levels = np.asarray(image, np.float64) / 257.0
        return Image.fromarray(np.clip(np.round(levels), 0, 255).astype(np.uint8), "L")
    return image


def _refuse_path(name: str, value) -> None:
    if isinstance(value, (str, bytes, os.PathLike)):
        raise ValueError(f"{name} is {value!r}, a path: the Python API takes arrays or PIL images, e.g. "
                         f"PIL.Image.open(path) (the manifest job takes paths)")


def rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """An init image given as an array or PIL image -> uint8 (H, W, 3): a PIL image as a
    decoded file is (any mode: palette, grey, 16-bit, transparency), uint8 RGB as it is, grey
    (H, W) repeated, RGBA composited onto white, floats in [0, 1] scaled; else ValueError."""
    _refuse_path("init_image", image)
    if isinstance(image, Image.Image):
        return rgb_from_pil(image)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        if not (np.issubdtype(image.dtype, np.floating) and image.size and 0.0 <= image.min()
                and image.max() <= 1.0):
            raise ValueError(f"init_image of dtype {image.dtype}: give uint8 (0-255) or floats in [0, 1]")
        image = np.round(image * 255.0).astype(np.uint8)
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=-1)
    if image.ndim == 3 and image.shape[-1] == 4:
        return rgb_from_pil(Image.fromarray(image, "RGBA"))
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"init_image of shape {image.shape}: give (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grey")
    return image


def mask_array(mask: np.ndarray | Image.Image) -> np.ndarray:
    """A mask given as an array or PIL image -> uint8 (H, W), 255 = repaint: a PIL image as a
    decoded mask file is, bools and floats in [0, 1] (as diffusers takes them) scaled,
    (H, W, C) made grey; else ValueError."""
    _refuse_path("mask", mask)
    if isinstance(mask, Image.Image):
        return grey_from_pil(mask)
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        mask = mask.astype(np.uint8) * 255
    elif mask.dtype != np.uint8:
        if not (np.issubdtype(mask.dtype, np.floating) and mask.size and 0.0 <= mask.min() and mask.max() <= 1.0):
            raise ValueError(f"mask of dtype {mask.dtype}: give uint8 (255 = repaint), bools or floats in [0, 1]")
        mask = np.round(mask * 255.0).astype(np.uint8)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim == 3 and mask.shape[-1] in (3, 4):
        mask = grey_from_pil(Image.fromarray(mask, "RGB" if mask.shape[-1] == 3 else "RGBA"))
    if mask.ndim != 2:
        raise ValueError(f"mask of shape {mask.shape}: give (H, W) grey levels, 255 = repaint")
    return mask


def resize_rgb(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W, 3) resized to (height, width) with Lanczos, unchanged when it fits."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1], the range the VAE encoder expects."""
    return image.astype(np.float32) / 127.5 - 1.0


def mask_size_problem(mask_width: int, mask_height: int, image_width: int, image_height: int, *,
                      mask: str = "mask", image: str = "init_image") -> str | None:
    """Why a `mask_width` x `mask_height` mask cannot go with its `image_width` x
    `image_height` init image, naming both as `mask` and `image` (a field, or a field and
    its file); None when it can. A mask of the init image's size or aspect ratio can: it is
    resized with the image to the render size (`binary_mask`), as diffusers resizes both.
    A mask of another shape would stretch its strokes off what they mark, so it is refused.
    The manifest job and the Python API both ask this."""
    if (mask_width, mask_height) == (image_width, image_height):
        return None
    sizes = f"{mask} is {mask_width}x{mask_height} but {image} is {image_width}x{image_height}"
    if min(mask_width, mask_height, image_width, image_height) >= 1:
        # Equal aspect ratios within rounding. The tolerance: with the larger of the two
        # scaled so that its longer side is the smaller one's, their shorter sides differ
        # by at most one pixel. One made by resizing the other, each side rounded, is off
        # by at most half a pixel a side; scaled so, the longer side's half pixel carries
        # to the shorter side at most whole, so one pixel in all: a 768x512 photo takes a
        # 384x256 or a 383x256 mask, not a 384x254 or a 512x768 one.
        (small_w, small_h), (large_w, large_h) = sorted(
            [(mask_width, mask_height), (image_width, image_height)], key=lambda size: size[0] * size[1])
        if large_w >= large_h:
            off = abs(small_h - large_h * small_w / large_w)
        else:
            off = abs(small_w - large_w * small_h / large_h)
        if off <= 1:
            return None
    example = ""
    if min(mask_width, image_width) >= 1:  # the mask's width kept
        example = f" (e.g. {mask_width}x{max(1, round(mask_width * image_height / image_width))})"
    return (f"{sizes}, another aspect ratio: give a mask of the init image's size ({image_width}x{image_height}) "
            f"or aspect ratio{example}; it is resized with the image to the render size")


def binary_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W) mask, 255 = repaint -> float32 {0, 1} (H, W, 1) at the render size:
    resized with Lanczos (a mask of the init image's aspect ratio but another size, see
    `mask_size_problem`, too), then thresholded at half, so it stays a mask."""
    if mask.shape != (height, width):
        mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.LANCZOS))
    return (mask.astype(np.float32) / 255.0 >= 0.5).astype(np.float32)[..., None]


def latent_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """Pixel mask (H, W, 1) -> latent grid by nearest sampling (as torch's `interpolate`)."""
    return mask[::factor, ::factor]


def size_at_aspect(width: int, height: int, native: int, multiple: int, *, given_width: int | None = None,
                   given_height: int | None = None) -> tuple[int, int]:
    """A render size with the aspect ratio of a `width` x `height` image, each side a
    multiple of `multiple`: the side given as it is and the other from it; with neither,
    near the pixel count of a `native` square (what the model was trained at), so the
    photo keeps its shape and the render its cost and its model's scale. A side worked out
    here is at most four native sides long (a panorama's long side, say)."""
    if given_width is not None and given_height is not None:
        return given_width, given_height
    top = max(multiple, 4 * native // multiple * multiple)
    fit = lambda side: min(top, max(multiple, round(side / multiple) * multiple))
    if given_width is not None:
        return given_width, fit(given_width * height / width)
    if given_height is not None:
        return fit(given_height * width / height), given_height
    if width < height:  # a photo and its rotation get rotated sizes
        rotated = size_at_aspect(height, width, native, multiple)
        return rotated[1], rotated[0]
    # Both sides rounded alone can skew the shape (a 3:4 photo at 64 px, multiples of 16:
    # 48x80). Of all pairs of multiples, the one of least cost wins: its log distance from
    # the photo's aspect ratio, plus a tenth of its log distance from the native pixel count,
    # plus that distance again past 1.5x. A 768x512 photo on SD renders at 576x384, exact,
    # not 640x448. Ties go to the pixel count nearest native, then to the wider.
    sides = np.arange(multiple, top + 1, multiple, dtype=np.float64)
    w, h = (grid.ravel() for grid in np.meshgrid(sides, sides, indexing="ij"))
    pixels = np.abs(np.log(w * h / native**2))
    cost = np.abs(np.log(w / h / (width / height))) + 0.1 * pixels + np.maximum(0.0, pixels - math.log(1.5))
    best = np.lexsort((-w, pixels, np.round(cost, 9)))[0]
    return int(w[best]), int(h[best])


def outpaint_size_problem(width: int, height: int, pads, multiple: int) -> str | None:
    """Why the outpaint canvas of a `width` x `height` image plus `pads` (left, top, right,
    bottom) cannot render at sides that are multiples of `multiple`, naming pads that can;
    None when it can."""
    left, top, right, bottom = (int(p) for p in pads)
    canvas_w, canvas_h = width + left + right, height + top + bottom
    if not canvas_w % multiple and not canvas_h % multiple:
        return None
    fixed = [left, top, right + -canvas_w % multiple, bottom + -canvas_h % multiple]
    return (f"the outpaint canvas is {canvas_w}x{canvas_h} (init_image {width}x{height} plus outpaint "
            f"{[left, top, right, bottom]}): each side must be a multiple of {multiple}, e.g. outpaint {fixed}")


def outpaint_canvas(image: np.ndarray, pads: tuple[int, int, int, int], factor: int = 1
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Extends `image` by (left, top, right, bottom) pixels; the new area is masked for repaint.

    The new area starts from the nearest edge pixels, so the model sees plausible colours
    at the seam rather than a hard border. The kept area shrinks to whole `factor`-pixel
    cells (the VAE's latent grid): a latent cell holding any new pixel is repainted.
    """
    left, top, right, bottom = pads
    canvas = np.pad(image, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, np.uint8)
    inner = lambda start, size: (-(-start // factor) * factor, (start + size) // factor * factor)
    (y0, y1), (x0, x1) = inner(top, image.shape[0]), inner(left, image.shape[1])
    mask[y0:max(y0, y1), x0:max(x0, x1)] = 0
    return canvas, mask
