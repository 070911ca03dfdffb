"""Classifier-free guidance, with a scale per sample."""

import jax
import jax.numpy as jnp


def classifier_free_guidance(uncond: jax.Array, cond: jax.Array, scale: jax.Array) -> jax.Array:
    """uncond + scale * (cond - uncond), `scale` shaped (batch,); at a scale of 1 or less
    guidance is off and the prompt's prediction is used alone, as in diffusers (below 1 the
    formula would lean toward the negative prompt)."""
    scale = scale.astype(cond.dtype).reshape((-1,) + (1,) * (cond.ndim - 1))
    return jnp.where(scale > 1, uncond + scale * (cond - uncond), cond)
