"""The KL autoencoder (diffusers' AutoencoderKL) of Stable Diffusion and the x4 upscaler.

Module and attribute names mirror diffusers, so its checkpoints load by name with
`jaxdiff.weights.convert.load_state_dict`. Layout is NHWC. Latents here are unscaled:
the engine multiplies by `scaling_factor` after encoding and divides before decoding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.blocks import (Attention, Downsample2D, ResnetBlock2D, UnsupportedConfig, Upsample2D,
                                   conv2d, known_config_values)
from jaxdiff.models.group_norm import group_norm

# The autoencoder's norms use a fixed eps, not a config field.
_EPS = 1e-6

_REQUIRED_VALUES: dict[str, Any] = {"act_fn": "silu"}
# Keys that do not change encode/decode: the nominal image size, and latent statistics only
# SDXL-class pipelines apply (diffusers' SD 1.x/2.x and upscaler pipelines, like the engine,
# use scaling_factor alone).
_IGNORED_KEYS = ("sample_size", "latents_mean", "latents_std")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' AutoencoderKL config.json."""
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    # Applied by SD3/Flux pipelines only; SD pipelines (and the engine) leave it unused.
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # Float16 overflows this VAE's activations: the loader keeps it in float32 when the rest
    # of the family runs in float16, as diffusers' pipelines upcast it.
    force_upcast: bool = True

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent along each side (8 for SD, 4 for the x4 upscaler)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "VAEConfig":
        """Validates a diffusers config.json dict; raises UnsupportedConfig naming the field."""
        values = known_config_values(cls, config, model="VAE", required=_REQUIRED_VALUES,
                                     ignored=_IGNORED_KEYS, hint="is this an AutoencoderKL config.json?")
        defaults = cls()
        channels = tuple(values.get("block_out_channels", defaults.block_out_channels))
        n = len(channels)
        # diffusers' defaults are one block; a config.json always lists them.
        down = tuple(values.get("down_block_types", ("DownEncoderBlock2D",) * n))
        up = tuple(values.get("up_block_types", ("UpDecoderBlock2D",) * n))
        for name, types, allowed in (("down_block_types", down, "DownEncoderBlock2D"),
                                     ("up_block_types", up, "UpDecoderBlock2D")):
            for t in types:
                if t != allowed:
                    raise UnsupportedConfig(
                        f"VAE config: {name} entry {t!r} is not supported (only {allowed!r})")
            if len(types) != n:
                raise UnsupportedConfig(
                    f"VAE config: {name} has {len(types)} entries, block_out_channels has {n}")
        layers = values.get("layers_per_block", defaults.layers_per_block)
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise UnsupportedConfig(f"VAE config: layers_per_block={layers!r} is not supported "
                                    f"(a positive int)")
        values.update(block_out_channels=channels, down_block_types=down, up_block_types=up)
        return cls(**values)


class UNetMidBlock2D(nnx.Module):
    """resnet, self-attention over all pixels (single head), resnet."""

    def __init__(self, channels: int, *, groups: int, add_attention: bool, dtype, rngs: nnx.Rngs):
        def resnet():
            return ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=_EPS,
                                 dtype=dtype, rngs=rngs)

        self.resnets = nnx.List([resnet(), resnet()])
        # diffusers gives the VAE attention one head as wide as the channels.
        self.attentions = nnx.List([
            Attention(channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups,
                      eps=_EPS, residual_connection=True, dtype=dtype, rngs=rngs)
            if add_attention else None])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int,
                 add_downsample: bool, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                          groups=groups, eps=_EPS, dtype=dtype, rngs=rngs)
            for i in range(num_layers)])
        self.downsamplers = (nnx.List([Downsample2D(out_channels, padding=0, dtype=dtype, rngs=rngs)])
                             if add_downsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int,
                 add_upsample: bool, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                          groups=groups, eps=_EPS, dtype=dtype, rngs=rngs)
            for i in range(num_layers)])
        self.upsamplers = (nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)])
                           if add_upsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    """Image -> 2 * latent_channels moments (mean and log-variance), downscaled 2**(blocks-1)."""

    def __init__(self, config: VAEConfig, *, dtype, rngs: nnx.Rngs):
        c = config
        channels = c.block_out_channels
        groups = c.norm_num_groups
        self.conv_in = conv2d(c.in_channels, channels[0], 3, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], num_layers=c.layers_per_block,
                               groups=groups, add_downsample=i < len(channels) - 1,
                               dtype=dtype, rngs=rngs)
            for i in range(len(channels))])
        self.mid_block = UNetMidBlock2D(channels[-1], groups=groups,
                                        add_attention=c.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.conv_norm_out = group_norm(channels[-1], groups, _EPS, dtype=dtype, rngs=rngs)
        self.conv_out = conv2d(channels[-1], 2 * c.latent_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class Decoder(nnx.Module):
    """Latents -> image, upscaled 2**(blocks-1)."""

    def __init__(self, config: VAEConfig, *, dtype, rngs: nnx.Rngs):
        c = config
        rev = tuple(reversed(c.block_out_channels))
        groups = c.norm_num_groups
        self.conv_in = conv2d(c.latent_channels, rev[0], 3, dtype=dtype, rngs=rngs)
        self.mid_block = UNetMidBlock2D(rev[0], groups=groups, add_attention=c.mid_block_add_attention,
                                        dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], num_layers=c.layers_per_block + 1,
                             groups=groups, add_upsample=i < len(rev) - 1, dtype=dtype, rngs=rngs)
            for i in range(len(rev))])
        self.conv_norm_out = group_norm(rev[-1], groups, _EPS, dtype=dtype, rngs=rngs)
        self.conv_out = conv2d(rev[-1], c.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


def _blend(before: jax.Array, after: jax.Array, extent: int, axis: int) -> jax.Array:
    """Fades `after`'s first `extent` rows (axis 1) or columns (axis 2) in from the last
    ones of `before`, linearly: weight 0 for `after` at its edge, rising by 1/extent."""
    extent = min(before.shape[axis], after.shape[axis], extent)
    if extent == 0:
        return after
    ramp_shape = [1, 1, 1, 1]
    ramp_shape[axis] = extent
    ramp = (jnp.arange(extent, dtype=jnp.float32) / extent).reshape(ramp_shape).astype(after.dtype)
    tail = jax.lax.slice_in_dim(before, before.shape[axis] - extent, before.shape[axis], axis=axis)
    head = jax.lax.slice_in_dim(after, 0, extent, axis=axis)
    rest = jax.lax.slice_in_dim(after, extent, after.shape[axis], axis=axis)
    return jnp.concatenate([tail * (1 - ramp) + head * ramp, rest], axis=axis)


class AutoencoderKL(nnx.Module):
    """`encode` images in [-1, 1] to the latent Gaussian, `decode` latents to images.

    `dtype` is the parameter and compute dtype; group-norm statistics and the attention
    softmax stay in float32.
    """

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        moments = 2 * config.latent_channels
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)
        self.quant_conv = (conv2d(moments, moments, 1, dtype=dtype, rngs=rngs)
                           if config.use_quant_conv else None)
        self.post_quant_conv = (conv2d(config.latent_channels, config.latent_channels, 1,
                                       dtype=dtype, rngs=rngs)
                                if config.use_post_quant_conv else None)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels).

        The log-variance is clamped to [-30, 20] as in diffusers' DiagonalGaussianDistribution.
        """
        c = self.config
        if x.ndim != 4 or x.shape[-1] != c.in_channels:
            raise ValueError(f"VAE encode: image has shape {x.shape}; expected NHWC "
                             f"(batch, height, width, {c.in_channels})")
        f = c.downscale_factor
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"VAE encode: image size {x.shape[1]}x{x.shape[2]} is not a multiple "
                             f"of {f}; resize or pad the image")
        moments = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """(B, h, w, latent_channels) unscaled latents -> (B, h*f, w*f, out_channels), about [-1, 1]."""
        c = self.config
        if z.ndim != 4 or z.shape[-1] != c.latent_channels:
            raise ValueError(f"VAE decode: latents have shape {z.shape}; expected NHWC "
                             f"(batch, height, width, {c.latent_channels})")
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def tiled_decode(self, z: jax.Array, *, tile_latent: int, overlap: int | None = None) -> jax.Array:
        """Decodes overlapping `tile_latent`-square tiles and blends their seams linearly.

        For outputs too large to decode at once: the decoder's activations are one tile's at
        a time. Tiles start every
        `tile_latent - overlap` latents; each is blended into the processed tile above and to
        its left over `overlap * f` pixels, then cropped to its stride, as diffusers' tiled
        decode does (overlap defaults to a quarter tile, its factor 0.25), so the two agree.
        Each distinct tile shape is traced once and its tiles decoded in a sequential loop.
        """
        if overlap is None:
            overlap = tile_latent // 4
        if not isinstance(tile_latent, int) or tile_latent < 1:
            raise ValueError(f"VAE tiled_decode: tile_latent={tile_latent!r}; give a positive int "
                             f"(latent pixels per tile side)")
        if not isinstance(overlap, int) or not 0 <= overlap < tile_latent:
            raise ValueError(f"VAE tiled_decode: overlap={overlap!r}; give an int in "
                             f"[0, tile_latent={tile_latent})")
        if z.ndim != 4:
            raise ValueError(f"VAE tiled_decode: latents have shape {z.shape}; expected NHWC")
        if z.shape[1] <= tile_latent and z.shape[2] <= tile_latent:
            return self.decode(z)
        f = self.config.downscale_factor
        stride = tile_latent - overlap
        row_starts = list(range(0, z.shape[1], stride))
        col_starts = list(range(0, z.shape[2], stride))

        # Decode all tiles of one shape in one lax.map, so the decoder is traced once per
        # shape (full tiles, plus the narrower ones at the bottom and right edges).
        by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i in row_starts:
            for j in col_starts:
                shape = (min(tile_latent, z.shape[1] - i), min(tile_latent, z.shape[2] - j))
                by_shape.setdefault(shape, []).append((i, j))
        decoded: dict[tuple[int, int], jax.Array] = {}
        for (h, w), starts in by_shape.items():
            tiles = jnp.stack([z[:, i:i + h, j:j + w] for i, j in starts])
            images = jax.lax.map(self.decode, tiles)
            for n, start in enumerate(starts):
                decoded[start] = images[n]

        blend = overlap * f
        keep = stride * f
        rows = []
        blended_above: dict[int, jax.Array] = {}
        for i in row_starts:
            row = []
            left = None
            for j in col_starts:
                tile = decoded[(i, j)]
                if i > 0:
                    tile = _blend(blended_above[j], tile, blend, axis=1)
                if left is not None:
                    tile = _blend(left, tile, blend, axis=2)
                # Blending uses the neighbours as already blended, as diffusers does.
                blended_above[j] = left = tile
                row.append(tile[:, :keep, :keep])
            rows.append(jnp.concatenate(row, axis=2))
        return jnp.concatenate(rows, axis=1)
