"""Classifier-free guidance, with a scale per sample."""

import jax


def classifier_free_guidance(uncond: jax.Array, cond: jax.Array, scale: jax.Array) -> jax.Array:
    """uncond + scale * (cond - uncond), `scale` shaped (batch,)."""
    scale = scale.astype(cond.dtype).reshape((-1,) + (1,) * (cond.ndim - 1))
    return uncond + scale * (cond - uncond)
