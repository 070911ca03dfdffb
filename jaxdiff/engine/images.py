"""Host-side image preparation for the modes: resizing, masks, outpaint canvases."""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_rgb(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W, 3) resized to (height, width) with Lanczos, unchanged when it fits."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1], the range the VAE encoder expects."""
    return image.astype(np.float32) / 127.5 - 1.0


def binary_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W) mask, 255 = repaint -> float32 {0, 1} (H, W, 1) at the render size."""
    if mask.ndim == 3:
        mask = np.asarray(Image.fromarray(mask).convert("L"))
    if mask.shape != (height, width):
        mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.LANCZOS))
    return (mask.astype(np.float32) / 255.0 >= 0.5).astype(np.float32)[..., None]


def latent_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """Pixel mask (H, W, 1) -> latent grid by nearest sampling (as torch's `interpolate`)."""
    return mask[::factor, ::factor]


def outpaint_canvas(image: np.ndarray, pads: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Extends `image` by (left, top, right, bottom) pixels; the new area is masked for repaint.

    The new area starts from the nearest edge pixels, so the model sees plausible colours
    at the seam rather than a hard border.
    """
    left, top, right, bottom = pads
    canvas = np.pad(image, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, np.uint8)
    mask[top:top + image.shape[0], left:left + image.shape[1]] = 0
    return canvas, mask
