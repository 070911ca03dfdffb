"""Small convolutional and attention blocks shared by the UNet and the VAE, and the
config checking every model family uses.

Attribute names mirror the diffusers PyTorch modules (`norm1`, `conv1`, `time_emb_proj`,
`to_q`, `to_out.0`, ...) so that `jaxdiff.weights.convert.load_state_dict` can fill them
from a diffusers checkpoint. Layout is NHWC throughout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.models.attention import dot_product_attention
from jaxdiff.models.group_norm import group_norm


class UnsupportedConfig(ValueError):
    """A config.json asks for an architecture variant this implementation does not have."""


_ACTIVATION_KEYS = ("act_fn", "timestep_post_act")


def known_config_values(cls, config: Mapping[str, Any], *, model: str, hint: str,
                        required: Mapping[str, Any], ignored: tuple[str, ...]) -> dict[str, Any]:
    """The entries of a config.json that are fields of the dataclass `cls`.

    Keys starting with "_" are metadata; `required` keys may only hold their given value;
    `ignored` keys do not change the math; any other unknown key raises, naming it, since
    silently dropping it could change what the checkpoint computes.
    """
    # diffusers' get_activation reads "swish" as SiLU.
    config = {k: "silu" if k in _ACTIVATION_KEYS and v == "swish" else v
              for k, v in config.items() if not k.startswith("_")}
    for key, value in required.items():
        if key in config and config[key] != value:
            raise UnsupportedConfig(f"{model} config: {key}={config[key]!r} is not supported (only {value!r})")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - fields - set(required) - set(ignored))
    if unknown:
        raise UnsupportedConfig(f"{model} config: unknown field(s) {unknown}; {hint}")
    return {k: v for k, v in config.items() if k in fields}


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as torch computes it, 0.5 x (1 + erf(x / sqrt 2)) in float32, the result
    in x's dtype. jax.nn.gelu's exact form goes through erfc, which XLA expands into both
    branches of a piecewise polynomial and an exponential: 68 operations an element in
    the SD 1.5 UNet's GEGLU fusion compiled for an H200, against 8 around one erf, which
    the GPU emits as one rational polynomial."""
    xf = x.astype(jnp.float32)
    return (0.5 * xf * (1.0 + jax.lax.erf(xf * (1.0 / math.sqrt(2.0))))).astype(x.dtype)


def conv2d(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
           padding=None, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """A square convolution; default padding keeps the size (PyTorch's `padding=k // 2`)."""
    if padding is None:
        half = (kernel_size - 1) // 2
        padding = ((half, half), (half, half))
    return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), strides=stride,
                    padding=padding, dtype=dtype, param_dtype=dtype, rngs=rngs)


def repeat_batch(x: jax.Array, batch: int) -> jax.Array:
    """Each row of `x` repeated in place to make `batch` rows (x0, x0, x1, x1, ...): where
    features computed once per sample meet rows computed once per (sample, context) pair
    (see UNet2DConditionModel)."""
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise ValueError(f"a batch of {x.shape[0]} cannot be repeated to {batch} rows")
    return jnp.repeat(x, batch // x.shape[0], axis=0)


class ResnetBlock2D(nnx.Module):
    """Two 3x3 convolutions with pre-activation group norms, an optional time embedding
    added between them, and a 1x1 shortcut when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None,
                 groups: int, eps: float, output_scale_factor: float = 1.0,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.output_scale_factor = output_scale_factor
        self.norm1 = group_norm(in_channels, groups, eps, dtype=dtype, rngs=rngs)
        self.conv1 = conv2d(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.time_emb_proj = (
            nnx.Linear(temb_channels, out_channels, dtype=dtype, param_dtype=dtype, rngs=rngs)
            if temb_channels is not None else None)
        self.norm2 = group_norm(out_channels, groups, eps, dtype=dtype, rngs=rngs)
        self.conv2 = conv2d(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                              if in_channels != out_channels else None)

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(self.norm1(x, silu=True))
        emb = None
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("ResnetBlock2D: this block was built with a time embedding; pass temb")
            emb = repeat_batch(self.time_emb_proj(jax.nn.silu(temb)), h.shape[0])
        h = self.conv2(self.norm2(h, shift=emb, silu=True))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = shortcut + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """Stride-2 3x3 convolution. `padding=0` is the VAE encoder's variant, which pads
    only the bottom and right edge by one (asymmetric, as in the original LDM code)."""

    def __init__(self, channels: int, *, padding: int = 1, dtype=jnp.float32, rngs: nnx.Rngs):
        pad = ((0, 1), (0, 1)) if padding == 0 else ((padding, padding), (padding, padding))
        self.conv = conv2d(channels, channels, 3, stride=2, padding=pad, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def upsample_nearest(x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    """Nearest-neighbour resize of NHWC `x` to twice its size, or to `output_size`."""
    if output_size is None:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    out_h, out_w = output_size
    in_h, in_w = x.shape[1], x.shape[2]
    # PyTorch's "nearest" picks source index floor(dst * in / out).
    rows = (jnp.arange(out_h) * in_h) // out_h
    cols = (jnp.arange(out_w) * in_w) // out_w
    return x[:, rows][:, :, cols]


# Which taps of a 3x3 kernel read which of two low-res rows, for each row phase of a 2x
# nearest upsampling: output row 2i (phase 0) reads low-res rows i-1 (tap 0) and i (taps 1
# and 2); row 2i+1 (phase 1) reads rows i (taps 0 and 1) and i+1 (tap 2). The same holds
# for columns. Indexed (phase, row of the 2x2 window, tap).
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]],
                        [[1, 1, 0], [0, 0, 1]]], np.float32)


def upsample_phases(kernel: jax.Array, bias: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """A 3x3 kernel (3, 3, C_in, C_out) as `upsample_conv` applies it after a 2x nearest
    upsampling: the four output phases' 2x2 kernels side by side, (2, 2, C_in, 4 C_out),
    and the bias on each phase's channels. Weights only: computed once where many calls
    share them (`UNet2DConditionModel.prepare`)."""
    c_in, c_out = kernel.shape[2], kernel.shape[3]
    taps = jnp.asarray(_PHASE_TAPS)
    # Full float32 (not TF32 or one bf16 pass): the summed taps are the conv's weights.
    phases = jnp.einsum("ayk,bxl,klio->yxiabo", taps, taps, kernel.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    phases = phases.reshape(2, 2, c_in, 4 * c_out).astype(kernel.dtype)
    return phases, None if bias is None else jnp.tile(bias, 4)


def upsample_conv(x: jax.Array, phases: jax.Array, bias: jax.Array | None, *,
                  as_gemm: bool = False) -> jax.Array:
    """A 3x3 "same" convolution of `x` upsampled 2x by nearest neighbour, without the
    upsampled image: each of the four output phases (row and column parity) is a 2x2
    convolution of `x` itself, with the taps that read the same source pixel summed
    (`phases`, `bias`: `upsample_phases` of the 3x3 conv's).

    4 taps per output pixel instead of 9 (2.25x fewer FLOPs) and no 4x-sized input
    written and read back. Equal to the plain form up to the rounding of the summed taps
    (in the kernel's dtype). `as_gemm`: the 2x2 convolution as one GEMM over each output
    pixel's 2x2 window of x, the windows written out first (4x x's size), for shapes where
    the GPU's convolution kernel runs slowly (`tools/kernel_bench.py --op upsample`)."""
    batch, height, width, c_in = x.shape
    c_out = phases.shape[3] // 4
    # One 2x2 convolution over x padded by one pixel gives every phase, on a grid one row
    # and column larger: phase (a, b) of output pixel (i, j) sits at (i + a, j + b).
    if as_gemm:
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        windows = jnp.concatenate([padded[:, r:r + height + 1, c:c + width + 1] for r in (0, 1) for c in (0, 1)],
                                  axis=-1)  # channels ordered (row, column, c_in), as the kernel's HWI
        y = (windows.reshape(-1, 4 * c_in) @ phases.reshape(4 * c_in, 4 * c_out)).reshape(
            batch, height + 1, width + 1, 4 * c_out)
    else:
        y = jax.lax.conv_general_dilated(x, phases, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if bias is not None:  # on each phase's channels, where the GPU fuses it into the conv
        y = y + bias
    y = y.reshape(batch, height + 1, width + 1, 2, 2, c_out)
    rows = [jnp.stack([y[:, a:a + height, b:b + width, a, b] for b in (0, 1)], axis=3) for a in (0, 1)]
    return jnp.stack(rows, axis=2).reshape(batch, 2 * height, 2 * width, c_out)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x (or to a given size) followed by a 3x3 convolution."""

    def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv2d(channels, channels, 3, dtype=dtype, rngs=rngs)

    def phases(self) -> tuple[jax.Array, jax.Array | None]:
        """`upsample_phases` of this conv's kernel and bias, cast as the conv casts them."""
        bias = None if self.conv.bias is None else self.conv.bias.get_value()
        kernel, bias = self.conv.promote_dtype((self.conv.kernel.get_value(), bias), dtype=self.conv.dtype)
        return upsample_phases(kernel, bias)

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None,
                 prepared: Prepared | None = None) -> jax.Array:
        """`prepared`: the UNet's `Prepared` context, which holds this conv's phases."""
        if output_size is not None and tuple(output_size) != (2 * x.shape[1], 2 * x.shape[2]):
            return self.conv(upsample_nearest(x, output_size))
        phases, bias = prepared.of(self) if prepared is not None else self.phases()
        x = self.conv.promote_dtype((x,), dtype=self.conv.dtype)[0]
        return upsample_conv(x, phases, bias)


class Prepared:
    """A text context (B, T, D) with what the UNet would compute the same at every step
    computed once (`UNet2DConditionModel.prepare`): each cross attention's keys and values
    of the context, each upsampler's phase kernels (and the fused GEGLU's folded weights),
    for calls that share them, the sampler's steps. Inside the loop XLA leaves such work in
    every step (its loop-invariant code motion keeps an op whose output is larger than its
    input). Modules find theirs by identity: one traced model's modules."""

    def __init__(self, states: jax.Array, per_module: dict[int, Any]):
        self.states = states
        self._per_module = per_module

    @property
    def shape(self) -> tuple[int, ...]:
        return self.states.shape

    @property
    def ndim(self) -> int:
        return self.states.ndim

    def of(self, module: nnx.Module) -> Any:
        """What was computed for `module`."""
        found = self._per_module.get(id(module))
        if found is None:
            raise ValueError("this Prepared context was made by another model's prepare: pass the "
                             "context array, or prepare(context) of the model being called")
        return found


class Attention(nnx.Module):
    """Multi-head attention with diffusers' parameter names (to_q, to_k, to_v, to_out.0).

    On tokens (B, T, C) it is the transformer's self- or cross-attention. On an NHWC
    feature map (the VAE mid block) it flattens the pixels into tokens, applies its own
    `group_norm` first and adds the input back (`residual_connection`).
    """

    def __init__(self, query_dim: int, *, heads: int, dim_head: int,
                 cross_attention_dim: int | None = None, bias: bool = False,
                 norm_num_groups: int | None = None, eps: float = 1e-5,
                 residual_connection: bool = False, rescale_output_factor: float = 1.0,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.heads = heads
        self.dim_head = dim_head
        self.cross = cross_attention_dim is not None
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        inner_dim = heads * dim_head
        context_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.group_norm = (group_norm(query_dim, norm_num_groups, eps, dtype=dtype, rngs=rngs)
                           if norm_num_groups is not None else None)

        def linear(n_in, n_out, use_bias):
            return nnx.Linear(n_in, n_out, use_bias=use_bias, dtype=dtype, param_dtype=dtype, rngs=rngs)

        self.to_q = linear(query_dim, inner_dim, bias)
        self.to_k = linear(context_dim, inner_dim, bias)
        self.to_v = linear(context_dim, inner_dim, bias)
        # A list so that the checkpoint key `to_out.0` (the Linear before dropout) lines up.
        self.to_out = nnx.List([linear(inner_dim, query_dim, True)])

    def keys_values(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values of a (B, T, D) context, (B, T, heads, dim_head) each."""
        shape = (*context.shape[:2], self.heads, self.dim_head)
        return self.to_k(context).reshape(shape), self.to_v(context).reshape(shape)

    def __call__(self, x: jax.Array, context: jax.Array | Prepared | None = None) -> jax.Array:
        spatial_shape = None
        if x.ndim == 4:
            spatial_shape = x.shape
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        residual = x
        if self.group_norm is not None:
            # Group norm over (B, T, C) reduces over tokens and channel groups, the
            # same statistics as over the (B, H, W, C) map.
            x = self.group_norm(x)
        batch, tokens = x.shape[0], x.shape[1]
        q = self.to_q(x).reshape(batch, tokens, self.heads, self.dim_head)
        k, v = (context.of(self) if isinstance(context, Prepared)
                else self.keys_values(x if context is None else context))
        out = dot_product_attention(q, k, v)
        out = self.to_out[0](out.reshape(batch, tokens, self.heads * self.dim_head))
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        if spatial_shape is not None:
            out = out.reshape(spatial_shape)
        return out
