"""Group norm of the UNet's and VAE's resnets and transformers, and two kernels for it on
GPUs.

"xla" (the default): nnx.GroupNorm's arithmetic with the variance of norm_statistics (one
pass, robust to a group's offset), the optional shift (the resnets' time embedding) and SiLU
as XLA fuses them. XLA compiles each norm as a reduction to per-channel sums, two
small kernels that combine them into a group's mean and scale, and a pass that normalises:
four kernels, two of them tiny. "pallas" (opt in with JAXDIFF_GROUP_NORM=pallas, for GPUs):
two Pallas (Triton) kernels, one for the group sums and one that combines them and
normalises, with the shift and SiLU inside. The same bytes move; half the kernels run.
On other backends the same kernels run in Pallas' interpreter (slow: for tests).

A group spans all of a sample's pixels, so its statistics need a pass over the whole sample
before any pixel can be normalised: one kernel cannot do both without a grid-wide barrier.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models import attention
from jaxdiff.models.kernel_paths import chosen
from jaxdiff.models.norm_statistics import mean_and_variance
from jaxdiff.models.per_chip import per_chip

_IMPLEMENTATIONS = ("xla", "pallas")
# Elements one loop iteration of a kernel holds (pixels x groups x channels per group, each
# rounded up to a power of two, as Triton's blocks must be): 8 pixels of SD's 320 channels.
# The sums kernel keeps two float32 accumulators of this size: 64 registers a thread at 4
# warps.
_CHUNK_ELEMENTS = 4096
# Kernel instances to aim for per norm (a few per SM of a large GPU).
_INSTANCES = 512


def implementation() -> str:
    return chosen("JAXDIFF_GROUP_NORM", _IMPLEMENTATIONS)


def _real(base, shape, pixels: int, groups: int, group_size: int):
    """Which elements of a (pixels, groups, channels in a group) block starting at pixel
    `base` are x's: blocks are padded to powers of two, and Triton's loads and stores go
    unchecked (a padded column would be the next group's, a padded row past x's end)."""
    iota = functools.partial(jax.lax.broadcasted_iota, jnp.int32, shape)
    return (base + iota(0) < pixels) & (iota(1) < groups) & (iota(2) < group_size)


def _vector_mask(shape, groups: int, group_size: int):
    iota = functools.partial(jax.lax.broadcasted_iota, jnp.int32, shape)
    return (iota(0) < groups) & (iota(1) < group_size)


def _refs(refs, inputs: int, shifted: bool):
    """A kernel's refs with None in the shift's place when there is none: its inputs (the
    shift last among them), then its outputs."""
    refs = list(refs)
    if not shifted:
        refs.insert(inputs, None)
    return refs


def _sums_kernel(*refs, pixels: int, groups: int, group_size: int, chunk: int, shifted: bool):
    """One instance: a run of one sample's pixels, summed (and squared) per group relative to
    the run's first element of the group (its first pixel and channel, shift added), which
    it stores too: the normalising kernel combines the runs from these (Chan's formula), so
    a group's mean far from zero does not cancel its variance away (norm_statistics.py)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    x_ref, shift_ref, sum_ref, sum_sq_ref, first_ref = _refs(refs, 1, shifted)
    block_pixels, g_pad, c_pad = x_ref.shape
    first = pl.program_id(1) * block_pixels
    vector = _vector_mask((g_pad, c_pad), groups, group_size)
    shift = 0.0
    if shift_ref is not None:
        shift = pl_triton.load(shift_ref, mask=vector, other=0.0).astype(jnp.float32)[None]
    # The run's first pixel (a run starts inside x), each group's first channel picked by a
    # masked sum: Triton's blocks take no slices.
    x0 = pl_triton.load(x_ref.at[pl.ds(0, 1)], mask=vector[None], other=0.0).astype(jnp.float32) + shift
    channel = jax.lax.broadcasted_iota(jnp.int32, (1, g_pad, c_pad), 2)
    x0 = jnp.sum(jnp.sum(jnp.where(channel == 0, x0, 0.0), axis=2), axis=0)
    shift = shift - x0[None, :, None]

    def body(i, sums):
        total, total_sq = sums
        real = _real(first + i * chunk, (chunk, g_pad, c_pad), pixels, groups, group_size)
        x = pl_triton.load(x_ref.at[pl.ds(i * chunk, chunk)], mask=real, other=0.0).astype(jnp.float32)
        x = jnp.where(real, x + shift, 0.0)
        return total + x, total_sq + x * x

    zeros = jnp.zeros((chunk, g_pad, c_pad), jnp.float32)
    total, total_sq = jax.lax.fori_loop(0, block_pixels // chunk, body, (zeros, zeros))
    in_groups = jax.lax.broadcasted_iota(jnp.int32, (g_pad,), 0) < groups
    pl_triton.store(sum_ref, jnp.sum(jnp.sum(total, axis=2), axis=0), mask=in_groups)
    pl_triton.store(sum_sq_ref, jnp.sum(jnp.sum(total_sq, axis=2), axis=0), mask=in_groups)
    pl_triton.store(first_ref, x0, mask=in_groups)


def _normalize_kernel(*refs, pixels: int, groups: int, group_size: int, runs: int, chunk: int,
                      epsilon: float, silu: bool, shifted: bool):
    """One instance: a sample's runs' sums combined into each group's mean and variance, then
    a run of its pixels normalised (shifted first, SiLU after)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    x_ref, sum_ref, sum_sq_ref, first_ref, scale_ref, bias_ref, shift_ref, out_ref = _refs(refs, 6, shifted)
    block_pixels, g_pad, c_pad = x_ref.shape
    runs_pad = sum_ref.shape[0]
    iota = functools.partial(jax.lax.broadcasted_iota, jnp.int32, (runs_pad, g_pad))
    ran = (iota(0) < runs) & (iota(1) < groups)
    # Each run's count, mean and sum of squared deviations, then the group's (Chan et al.):
    # M2 = sum of the runs' M2 + sum of n_r (mean_r - mean)^2.
    n = jnp.where(ran, jnp.minimum(block_pixels, pixels - iota(0) * block_pixels) * group_size, 0)
    n = n.astype(jnp.float32)
    sums = pl_triton.load(sum_ref, mask=ran, other=0.0)
    firsts = pl_triton.load(first_ref, mask=ran, other=0.0)
    # Means relative to the first run's first element, which keeps them small.
    origin = jnp.sum(jnp.where(iota(0) == 0, firsts, 0.0), axis=0)
    run_mean = firsts - origin[None] + sums / jnp.maximum(n, 1.0)
    count = pixels * group_size
    mean = jnp.sum(n * run_mean, axis=0) / count
    apart = run_mean - mean[None]
    mean = origin + mean
    m2 = pl_triton.load(sum_sq_ref, mask=ran, other=0.0) - sums * sums / jnp.maximum(n, 1.0) + n * apart * apart
    rstd = jax.lax.rsqrt(jnp.maximum(jnp.sum(m2, axis=0) / count, 0.0) + epsilon)
    vector = _vector_mask((g_pad, c_pad), groups, group_size)
    # y = (x + shift - mean) * rstd * scale + bias = x * a + b
    a = rstd[:, None] * pl_triton.load(scale_ref, mask=vector, other=0.0).astype(jnp.float32)
    b = pl_triton.load(bias_ref, mask=vector, other=0.0).astype(jnp.float32) - mean[:, None] * a
    if shift_ref is not None:
        b = b + pl_triton.load(shift_ref, mask=vector, other=0.0).astype(jnp.float32) * a
    first = pl.program_id(1) * block_pixels

    @pl.loop(0, block_pixels // chunk)
    def _(i):
        real = _real(first + i * chunk, (chunk, g_pad, c_pad), pixels, groups, group_size)
        rows = pl.ds(i * chunk, chunk)
        y = pl_triton.load(x_ref.at[rows], mask=real, other=0.0).astype(jnp.float32) * a + b
        if silu:
            y = y * jax.nn.sigmoid(y)
        pl_triton.store(out_ref.at[rows], y.astype(out_ref.dtype), mask=real)


def fused_group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
                     epsilon: float, *, shift: jax.Array | None = None, silu: bool = False,
                     interpret: bool = False, chunk_elements: int = _CHUNK_ELEMENTS,
                     instances: int = _INSTANCES, num_warps: int = 4) -> jax.Array:
    """Group norm of channels-last x (B, ..., C) over everything but its batch axis, in two
    Pallas kernels, x's dtype out, float32 inside. `shift` (B, C) is added to x first, SiLU
    applied after when `silu`. `interpret` runs the kernels in Pallas' interpreter (any
    backend: the tests); `chunk_elements`, `instances` and `num_warps` size them
    (tools/kernel_bench.py tries others)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    shape, batch, channels = x.shape, x.shape[0], x.shape[-1]
    group_size = channels // groups
    pixels = math.prod(shape[1:-1])
    x = x.reshape(batch, pixels, groups, group_size)
    g_pad, c_pad = pl.next_power_of_2(groups), pl.next_power_of_2(group_size)
    chunk = max(1, chunk_elements // (g_pad * c_pad))
    chunk = min(chunk, pl.next_power_of_2(pixels))
    runs = max(1, min(pl.cdiv(instances, batch), pl.cdiv(pixels, chunk)))
    block_pixels = max(chunk, pl.next_power_of_2(pl.cdiv(pixels, runs)))
    runs = pl.cdiv(pixels, block_pixels)
    runs_pad = pl.next_power_of_2(runs)
    grid = (batch, runs)
    params = None if interpret else pl_triton.CompilerParams(num_warps=num_warps)
    pixel_block = pl.BlockSpec((None, block_pixels, g_pad, c_pad), lambda n, r: (n, r, 0, 0))
    per_sample = pl.BlockSpec((None, g_pad, c_pad), lambda n, r: (n, 0, 0))
    per_run = pl.BlockSpec((None, None, g_pad), lambda n, r: (n, r, 0))
    all_runs = pl.BlockSpec((None, runs_pad, g_pad), lambda n, r: (n, 0, 0))
    whole = pl.BlockSpec((g_pad, c_pad), lambda n, r: (0, 0))
    shifted = shift is not None
    shift_args = (shift.reshape(batch, groups, group_size),) if shifted else ()
    shift_specs = [per_sample] if shifted else []
    sums_out = jax.ShapeDtypeStruct((batch, runs_pad, g_pad), jnp.float32)
    sums, sums_sq, firsts = pl.pallas_call(
        functools.partial(_sums_kernel, pixels=pixels, groups=groups, group_size=group_size,
                          chunk=chunk, shifted=shifted),
        grid=grid, in_specs=[pixel_block, *shift_specs], out_specs=[per_run, per_run, per_run],
        out_shape=[sums_out, sums_out, sums_out], compiler_params=params, interpret=interpret,
        name="group_norm_sums",
    )(x, *shift_args)
    out = pl.pallas_call(
        functools.partial(_normalize_kernel, pixels=pixels, groups=groups, group_size=group_size,
                          runs=runs, chunk=chunk, epsilon=epsilon, silu=silu, shifted=shifted),
        grid=grid, in_specs=[pixel_block, all_runs, all_runs, all_runs, whole, whole, *shift_specs],
        out_specs=pixel_block, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=params, interpret=interpret, name="group_norm",
    )(x, sums, sums_sq, firsts, scale.reshape(groups, group_size), bias.reshape(groups, group_size),
      *shift_args)
    return out.reshape(shape)


class GroupNorm(nnx.GroupNorm):
    """nnx.GroupNorm over channels-last x (its parameters and names; statistics in float32
    even when `dtype` is half, as flax's), with an optional per-sample, per-channel `shift`
    added to x first and SiLU applied after (`silu`), on the path `implementation()` names.

    The shift is the resnets' time embedding. Added to the convolution's output before the
    norm, XLA fuses it into cuDNN's convolution as a side input, which must be full size:
    the (B, C) embedding is first written out as a (B, H, W, C) map. Added here, it rides in
    the norm's own passes over x."""

    def __call__(self, x: jax.Array, *, shift: jax.Array | None = None, silu: bool = False) -> jax.Array:
        if implementation() == "xla" or x.size == 0:
            return self._xla(x, shift, silu)
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        kernel = functools.partial(fused_group_norm, groups=self.num_groups, epsilon=self.epsilon,
                                   silu=silu, interpret=attention.target_backend() != "gpu")
        # Each chip's own samples (`per_chip`); a batch that does not split over the chips
        # takes nnx's path.
        if shift is None:
            return per_chip(kernel, (x,), (scale, bias),
                            otherwise=lambda x, *_: self._xla(x, None, silu))
        return per_chip(lambda x, t, s, b: kernel(x, s, b, shift=t), (x, shift), (scale, bias),
                        otherwise=lambda x, t, *_: self._xla(x, t, silu))

    def _xla(self, x: jax.Array, shift: jax.Array | None, silu: bool) -> jax.Array:
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        as_groups = lambda a: a.reshape(*a.shape[:-1], self.num_groups, self.group_size)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)  # of the grouped array: pixels and group channels
        # Sums relative to each group's first element (norm_statistics): one pass over x.
        first = as_groups(x)[(slice(None), *(slice(0, 1),) * (x.ndim - 2), slice(None), slice(0, 1))]
        first = first.astype(jnp.float32)
        if shift is not None:
            shift = shift.reshape(shift.shape[0], *(1,) * (x.ndim - 2), shift.shape[-1])
            # Taken from x and the shift apart: x + shift then has no reader but the norm's passes.
            first = first + as_groups(shift)[..., :1].astype(jnp.float32)
            # In float32, rounded once: the same values as adding in x's dtype.
            x = (x.astype(jnp.float32) + shift.astype(jnp.float32)).astype(x.dtype)
        groups = as_groups(x)
        mean, variance = mean_and_variance(groups, axes, first)
        y = ((groups.astype(jnp.float32) - mean) * jax.lax.rsqrt(variance + self.epsilon)).reshape(x.shape)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        if silu:
            y = jax.nn.silu(y)
        return y.astype(x.dtype)


def group_norm(num_channels: int, num_groups: int, eps: float, *, dtype, rngs: nnx.Rngs) -> GroupNorm:
    if num_channels % num_groups:
        raise ValueError(
            f"group norm: {num_channels} channels do not split into {num_groups} groups; "
            f"choose block_out_channels that are multiples of norm_num_groups")
    return GroupNorm(num_channels, num_groups=num_groups, epsilon=eps,
                     dtype=dtype, param_dtype=dtype, rngs=rngs)
