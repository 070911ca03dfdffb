"""The one place where attention is computed, so each backend can pick its kernel.

Layout is (batch, tokens, heads, head_dim), as in `jax.nn.dot_product_attention`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

# "auto" picks per backend; "xla" forces the plain path; "cudnn" forces cuDNN flash.
_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
_override: str | None = None


def set_attention_implementation(name: str | None) -> None:
    """Force one attention path for the whole process (None goes back to auto)."""
    if name is not None and name not in _IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r} is not one of {_IMPLEMENTATIONS}")
    global _override
    _override = name


def _choose(q: jax.Array) -> str | None:
    choice = _override or os.environ.get("JAXDIFF_ATTENTION", "auto")
    if choice not in _IMPLEMENTATIONS:
        raise ValueError(
            f"JAXDIFF_ATTENTION={choice!r} is not one of {_IMPLEMENTATIONS}")
    if choice == "auto":
        # cuDNN flash attention ran ~6x faster than the XLA path on H200; it needs
        # half precision and head dims that are multiples of 8 up to 128.
        head_dim = q.shape[-1]
        if (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
                and head_dim % 8 == 0 and head_dim <= 128):
            return "cudnn"
        return "xla"
    return choice


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          is_causal: bool = False, mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention with scale 1/sqrt(head_dim); mask is True where attending is allowed."""
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, implementation=_choose(q))
