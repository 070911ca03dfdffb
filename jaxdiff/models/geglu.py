"""The transformer feed-forward's gated projection, GEGLU: `hidden * gelu(gate)` where
hidden and gate are the two halves of one biased linear projection.

Two paths. "xla" (the default, everywhere): the projection as one GEMM, then XLA's fusion
of the GELU and the product, which reads the projection's full width back from memory
(at SD 1.5's 64x64 level, 1.0 GB a call). "tokamax" (opt in with JAXDIFF_GEGLU=tokamax,
on Hopper and Blackwell GPUs): tokamax's fused gated linear unit, whose epilogue applies
the GELU and the product to the GEMM's accumulators, so only half the width is written
and nothing is read back. That kernel has no bias: the bias rides in the GEMM as a row
of weights (`fold_weights`) meeting an input channel of ones (`with_ones`), which the
transformer block's layer norm writes with its output.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp

from jaxdiff.models.blocks import gelu
from jaxdiff.models.kernel_paths import chosen
from jaxdiff.models.per_chip import per_chip

_IMPLEMENTATIONS = ("xla", "tokamax")
# tokamax's Hopper kernel (its default tiles): blocks of 128 rows by 128 output columns
# (two warpgroups of 64), the contraction in steps of 64 input channels.
_M_TILE, _N_TILE, _K_TILE = 128, 128, 64

# erf(x) for float32 as x * P(x^2) / Q(x^2) on x clipped to [-4, 4] (erf is +-1 to float32
# precision beyond): the rational form GPU compilers use, with its published coefficients.
# Mosaic GPU kernels have no erf of their own; these are only multiplies, adds and one
# division. Within 6e-7 of jax.lax.erf (tests/test_geglu.py).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _polynomial(coefficients, x):
    """The polynomial in x with these coefficients, the highest power's first (Horner)."""
    result = coefficients[0]
    for c in coefficients[1:]:
        result = result * x + c
    return result


def erf_rational(x: jax.Array) -> jax.Array:
    """erf of float32 `x` through multiplies, adds and one division."""
    x = jnp.clip(x, -4.0, 4.0)
    x2 = x * x
    return x * _polynomial(_ERF_P, x2) / _polynomial(_ERF_Q, x2)


def gelu_rational(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU of float32 `x`, with erf as `erf_rational`: what the fused kernel
    applies to its float32 accumulators."""
    return 0.5 * x * (1.0 + erf_rational(x * 0.7071067811865476))


# Set by `dispatch`: what a lowering for counting FLOPs takes (tools/bench.py).
_override: str | None = None


@contextlib.contextmanager
def dispatch(implementation: str):
    """Within the block, the path `implementation` whatever JAXDIFF_GEGLU says."""
    global _override
    previous, _override = _override, implementation
    try:
        yield
    finally:
        _override = previous


def implementation() -> str:
    return chosen("JAXDIFF_GEGLU", _IMPLEMENTATIONS, _override)


def folded_width(channels: int) -> int:
    """The fused kernel's input channels for x's `channels`: those, one of ones (the bias's
    row meets it) and zeros up to the kernel's 64-channel steps."""
    return -(-(channels + 1) // _K_TILE) * _K_TILE


def with_ones(x: jax.Array, width: int) -> jax.Array:
    """x (..., K) with a channel of ones, then zeros up to `width` channels: the fused
    kernel's input (`folded_width`)."""
    ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
    zeros = jnp.zeros(x.shape[:-1] + (width - x.shape[-1] - 1,), x.dtype)
    return jnp.concatenate([x, ones, zeros], axis=-1)


def fold_weights(kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """The projection's `kernel` (K, 2N) and `bias` (2N,), hidden half first (diffusers'
    GEGLU splits `proj` into hidden, gate), as the fused kernel's weights (K', 2, N) for
    `with_ones(x, K')`: [:, 0] the gate's, [:, 1] the hidden half's, the bias on the row
    that meets the channel of ones. Weights only: computed once where many calls share
    them (`UNet2DConditionModel.prepare`)."""
    channels = kernel.shape[0]
    padding = jnp.zeros((folded_width(channels) - channels - 1, kernel.shape[1]), kernel.dtype)
    hidden, gate = jnp.split(jnp.concatenate([kernel, bias[None, :], padding]), 2, axis=-1)
    return jnp.stack([gate, hidden], axis=1)


def geglu(x: jax.Array, kernel: jax.Array, bias: jax.Array, folded: jax.Array | None = None) -> jax.Array:
    """hidden * gelu(gate), with (hidden, gate) = split(x @ kernel + bias): diffusers' GEGLU
    on (batch, ..., K) tokens, by the path `implementation()` names; the fused kernel on
    each chip's own samples (`per_chip`). `x` may come with the fused kernel's channel of
    ones already (`with_ones`: the layer norm writes it so); `folded` is
    `fold_weights(kernel, bias)` if computed beforehand."""
    if implementation() == "xla":
        return _xla_geglu(x, kernel, bias)
    folded = fold_weights(kernel, bias) if folded is None else folded
    return per_chip(_fused_where_it_tiles, (x,), (kernel, bias, folded),
                    otherwise=lambda x, kernel, bias, _: _xla_geglu(x, kernel, bias))


def _xla_geglu(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    x = x[..., :kernel.shape[0]]  # without a channel of ones, if it came with one
    hidden, gate = jnp.split(x @ kernel + bias, 2, axis=-1)
    return hidden * gelu(gate)


def _fused_where_it_tiles(x: jax.Array, kernel: jax.Array, bias: jax.Array, folded: jax.Array) -> jax.Array:
    # The fused kernel's output blocks are 128 rows by 128 columns: other shapes (the
    # tests' tiny models) take the XLA path.
    if math.prod(x.shape[:-1]) % _M_TILE or (kernel.shape[1] // 2) % _N_TILE:
        return _xla_geglu(x, kernel, bias)
    if x.shape[-1] != folded.shape[0]:
        x = with_ones(x, folded.shape[0])
    return fused_geglu(x, folded)


def fused_geglu(x: jax.Array, weights: jax.Array) -> jax.Array:
    """tokamax's fused kernel on `with_ones(x, K')` and `fold_weights(...)` (K', 2, N),
    whatever the shape: an error where the kernel does not take it (no Hopper or Blackwell
    GPU; rows or width not a multiple of 128)."""
    try:
        import tokamax
    except ImportError as e:
        raise ImportError("JAXDIFF_GEGLU=tokamax needs the tokamax package: pip install 'jaxdiff[gpu]'") from e
    return tokamax.gated_linear_unit(x, weights, activation=gelu_rational, implementation="mosaic")
