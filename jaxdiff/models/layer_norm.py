"""Layer norm of the UNet's transformer blocks, and a one-pass kernel for it on GPUs.

"xla" (the default): nnx.LayerNorm's arithmetic with the two-pass variance of
norm_statistics, which XLA compiles on a GPU into one Triton kernel a norm: the tokens read
once, written once. "pallas" (opt in with JAXDIFF_LAYER_NORM=pallas, for GPUs): one Pallas
(Triton) kernel that loads a block of tokens, whole rows, computes mean and variance in
float32 and writes the normalised block, and can write the fused GEGLU's channel of ones
with it (`ones_to`), which XLA's kernel leaves to a copy of its own. On other backends the
same kernel runs in Pallas' interpreter (slow: for tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models import attention
from jaxdiff.models.geglu import with_ones
from jaxdiff.models.kernel_paths import chosen
from jaxdiff.models.norm_statistics import mean_and_variance
from jaxdiff.models.per_chip import per_chip

_IMPLEMENTATIONS = ("xla", "pallas")
# Elements a kernel instance holds (rows x channels rounded up to a power of two, as
# Triton's blocks must be): 16 rows of SD's 320 channels.
_BLOCK_ELEMENTS = 8192


def implementation() -> str:
    return chosen("JAXDIFF_LAYER_NORM", _IMPLEMENTATIONS)


def _kernel(x_ref, scale_ref, bias_ref, out_ref, *, rows: int, channels: int, width: int, epsilon: float):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    # A block is padded to powers of two past x's last row and column. Triton's loads and
    # stores go unchecked, so each names the elements that are x's: the padding is never
    # read (it would be the next row's) nor written.
    block_rows, padded = x_ref.shape
    row = pl.program_id(0) * block_rows + jax.lax.broadcasted_iota(jnp.int32, (block_rows, padded), 0)
    column = jax.lax.broadcasted_iota(jnp.int32, (block_rows, padded), 1)
    real = (row < rows) & (column < channels)
    x = pl_triton.load(x_ref, mask=real, other=0.0).astype(jnp.float32)
    mean = jnp.sum(x, axis=1, keepdims=True) / channels
    centred = jnp.where(real, x - mean, 0.0)
    variance = jnp.sum(centred * centred, axis=1, keepdims=True) / channels
    out = centred * jax.lax.rsqrt(variance + epsilon)
    in_width = jax.lax.broadcasted_iota(jnp.int32, (1, padded), 1) < channels
    scale = pl_triton.load(scale_ref, mask=in_width, other=0.0).astype(jnp.float32)
    bias = pl_triton.load(bias_ref, mask=in_width, other=0.0).astype(jnp.float32)
    # Past x's channels (up to `width`): a channel of ones, then zeros (geglu.with_ones).
    out = jnp.where(column < channels, out * scale + bias, jnp.where(column == channels, 1.0, 0.0))
    pl_triton.store(out_ref, out.astype(out_ref.dtype), mask=(row < rows) & (column < width))


def fused_layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, *,
                     ones_to: int | None = None, interpret: bool = False,
                     block_elements: int = _BLOCK_ELEMENTS, num_warps: int = 4) -> jax.Array:
    """Layer norm over x's last axis in one Pallas kernel, x's dtype out, float32 inside
    (two passes over the row in registers: the variance of the centred values).
    `ones_to`: the output that many channels wide, a channel of ones and zeros after x's
    (`geglu.with_ones` of the output, written by the kernel: no copy after it).
    `interpret` runs the kernel in Pallas' interpreter (any backend: the tests);
    `block_elements` and `num_warps` size a kernel instance (tools/kernel_bench.py tries
    others)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    shape, channels = x.shape, x.shape[-1]
    width = ones_to or channels
    x = x.reshape(-1, channels)
    padded = pl.next_power_of_2(width)
    rows = max(1, block_elements // padded)
    row_block = pl.BlockSpec((rows, padded), lambda i: (i, 0))
    vector = pl.BlockSpec((1, padded), lambda i: (0, 0))
    out = pl.pallas_call(
        functools.partial(_kernel, rows=x.shape[0], channels=channels, width=width, epsilon=epsilon),
        grid=(pl.cdiv(x.shape[0], rows),),
        in_specs=[row_block, vector, vector],
        out_specs=row_block,
        out_shape=jax.ShapeDtypeStruct((x.shape[0], width), x.dtype),
        compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=num_warps),
        interpret=interpret,
        name="layer_norm",
    )(x, scale.reshape(1, channels), bias.reshape(1, channels))
    return out.reshape(shape[:-1] + (width,))


class LayerNorm(nnx.LayerNorm):
    """nnx.LayerNorm (its parameters and names), over the last axis; on the path
    `implementation()` names. `ones_to`: the output that many channels wide, a channel of
    ones and zeros after the normalised ones (`geglu.with_ones`: the fused GEGLU's input)."""

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, ones_to: int | None = None) -> jax.Array:
        def xla(x, *_):
            out = super(LayerNorm, self).__call__(x, mask=mask) if mask is not None else self._xla(x)
            return out if ones_to is None else with_ones(out, ones_to)  # XLA fuses it into the norm

        if implementation() == "xla" or mask is not None or math.prod(x.shape[:-1]) == 0:
            return xla(x)
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        kernel = functools.partial(fused_layer_norm, epsilon=self.epsilon, ones_to=ones_to,
                                   interpret=attention.target_backend() != "gpu")
        # Each chip's own samples (`per_chip`); a batch that does not split over
        # the chips takes the XLA path.
        return per_chip(kernel, (x,), (scale, bias), otherwise=xla)

    def _xla(self, x: jax.Array) -> jax.Array:
        """nnx.LayerNorm's arithmetic (float32 statistics, x's dtype out) with the variance
        of norm_statistics, not E[x^2] - E[x]^2."""
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        mean, variance = mean_and_variance(x, (x.ndim - 1,))
        y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(variance + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
