"""The conditional UNet of Stable Diffusion 1.x / 2.x and the SD x4 upscaler, in Flax NNX.

Module and attribute names mirror diffusers' `UNet2DConditionModel`, so a diffusers
checkpoint loads with `jaxdiff.weights.convert.load_state_dict`. Layout is NHWC.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.blocks import (Attention, Downsample2D, Prepared, ResnetBlock2D, UnsupportedConfig,
                                   Upsample2D, conv2d, known_config_values, repeat_batch)
from jaxdiff.models.geglu import fold_weights, folded_width, geglu
from jaxdiff.models.geglu import implementation as geglu_implementation
from jaxdiff.models.group_norm import group_norm
from jaxdiff.models.layer_norm import LayerNorm


DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)

# Keys whose value we only accept at the given (diffusers default) value: anything else
# selects a variant (SDXL's added embeddings, fourier time, spatial norms, ...) we lack.
_REQUIRED_VALUES: dict[str, Any] = {
    "act_fn": "silu",
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "attention_type": "default",
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
# Keys that do not change inference: training dropout, the head count of an added
# embedding we refuse anyway, and the mid block's only_cross_attention (diffusers'
# UNetMidBlock2DCrossAttn ignores it).
_IGNORED_KEYS = ("dropout", "addition_embed_type_num_heads",
                 "mid_block_only_cross_attention")


def _per_block(name: str, value: Any, n_blocks: int, kind: type) -> tuple:
    """An int/bool broadcast to every block, or a list with one entry per block."""
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return (value,) * n_blocks
    if isinstance(value, (list, tuple)) and len(value) == n_blocks and all(
            isinstance(v, kind) and not (kind is int and isinstance(v, bool)) for v in value):
        return tuple(value)
    raise UnsupportedConfig(
        f"UNet config: {name}={value!r} is not supported; give one {kind.__name__} "
        f"or a list of {n_blocks} (one per down block)")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The fields of diffusers' UNet2DConditionModel config.json that the math depends on.

    Per-block fields are stored as tuples with one entry per down block (in down order).
    """
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: tuple[bool, ...] = (False,) * 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2,) * 4
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: tuple[int, ...] = (1280,) * 4
    transformer_layers_per_block: tuple[int, ...] = (1,) * 4
    # diffusers' historical misnomer: this is the number of heads per block, not their width.
    attention_head_dim: tuple[int, ...] = (8,) * 4
    use_linear_projection: bool = False
    upcast_attention: bool = False
    num_class_embeds: int | None = None
    # diffusers passes it only to block types jaxdiff does not build (ResnetDownsampleBlock2D,
    # SimpleCrossAttn*): for the SD blocks it changes nothing, here as there.
    resnet_out_scale_factor: float = 1.0
    time_embedding_dim: int | None = None
    # Guidance-distilled models (LCM): the width of the guidance-scale embedding added to
    # the timestep's (`timestep_cond`); such a model takes no classifier-free guidance.
    time_cond_proj_dim: int | None = None
    timestep_post_act: str | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # The latent side the model was trained at: the engine's default render size.
    sample_size: int | None = None

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "UNetConfig":
        """Validates a diffusers config.json dict; raises UnsupportedConfig naming the field."""
        values = known_config_values(cls, config, model="UNet", required=_REQUIRED_VALUES,
                                     ignored=_IGNORED_KEYS,
                                     hint="is this a UNet2DConditionModel config.json?")
        defaults = cls()

        down = tuple(values.get("down_block_types", defaults.down_block_types))
        up = tuple(values.get("up_block_types", defaults.up_block_types))
        for name, types, allowed in (("down_block_types", down, DOWN_BLOCK_TYPES),
                                     ("up_block_types", up, UP_BLOCK_TYPES)):
            for t in types:
                if t not in allowed:
                    raise UnsupportedConfig(
                        f"UNet config: {name} entry {t!r} is not supported (only {list(allowed)})")
        mid = values.get("mid_block_type", defaults.mid_block_type)
        if mid not in MID_BLOCK_TYPES:
            raise UnsupportedConfig(
                f"UNet config: mid_block_type={mid!r} is not supported (only {list(MID_BLOCK_TYPES)})")
        channels = tuple(values.get("block_out_channels", defaults.block_out_channels))
        n = len(down)
        if len(up) != n or len(channels) != n:
            raise UnsupportedConfig(
                f"UNet config: down_block_types ({n}), up_block_types ({len(up)}) and "
                f"block_out_channels ({len(channels)}) must have the same length")
        values["down_block_types"], values["up_block_types"] = down, up
        values["block_out_channels"] = channels
        values["only_cross_attention"] = _per_block(
            "only_cross_attention", values.get("only_cross_attention", False), n, bool)
        for name, default in (("layers_per_block", 2), ("cross_attention_dim", 1280),
                              ("transformer_layers_per_block", 1), ("attention_head_dim", 8)):
            values[name] = _per_block(name, values.get(name, default), n, int)
        if values.get("norm_num_groups", defaults.norm_num_groups) is None:
            raise UnsupportedConfig("UNet config: norm_num_groups=None is not supported (give an int)")
        if values.get("timestep_post_act") not in (None, "silu"):
            raise UnsupportedConfig(
                f"UNet config: timestep_post_act={values['timestep_post_act']!r} is not supported "
                f"(only None or 'silu')")
        for name in ("conv_in_kernel", "conv_out_kernel"):
            k = values.get(name, 3)
            if not isinstance(k, int) or k % 2 == 0:
                raise UnsupportedConfig(f"UNet config: {name}={k!r} is not supported (odd int only)")
        for i, (c, heads) in enumerate(zip(channels, values["attention_head_dim"])):
            if c % heads:
                raise UnsupportedConfig(
                    f"UNet config: block {i} has {c} channels, not divisible by "
                    f"attention_head_dim (head count) {heads}")
        return cls(**values)


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim), float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def guidance_embedding(guidance: jax.Array, dim: int) -> jax.Array:
    """A guidance-distilled model's condition: (guidance - 1) * 1000 embedded as a timestep
    (sin before cos, frequencies over half - 1), as diffusers' LCM pipeline does, (B,) -> (B, dim)."""
    return timestep_embedding((jnp.asarray(guidance, jnp.float32) - 1.0) * 1000.0, dim,
                              flip_sin_to_cos=False, freq_shift=1)


class TimestepEmbedding(nnx.Module):
    """Two linear layers with SiLU between them (and optionally after); a condition (LCM's
    guidance-scale embedding), projected to the input's width, is added to the input."""

    def __init__(self, in_features: int, out_features: int, *, post_act: bool, cond_proj_dim: int | None = None,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.post_act = post_act
        self.cond_proj = (nnx.Linear(cond_proj_dim, in_features, use_bias=False, dtype=dtype, param_dtype=dtype,
                                     rngs=rngs) if cond_proj_dim is not None else None)
        self.linear_1 = nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.linear_2 = nnx.Linear(out_features, out_features, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, condition: jax.Array | None = None) -> jax.Array:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("UNet: timestep_cond given, but the config has no time_cond_proj_dim")
            x = x + self.cond_proj(condition)
        x = self.linear_2(jax.nn.silu(self.linear_1(x)))
        return jax.nn.silu(x) if self.post_act else x


class GEGLU(nnx.Module):
    """Linear projection to twice the width, half of it gating the other through GELU."""

    def __init__(self, dim_in: int, dim_out: int, *, dtype, rngs: nnx.Rngs):
        self.proj = nnx.Linear(dim_in, 2 * dim_out, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def input_width(self) -> int | None:
        """The channels the fused kernel's GEMM takes its input with (`geglu.with_ones`: the
        layer norm before writes them); None on the XLA path."""
        return folded_width(self.proj.in_features) if geglu_implementation() == "tokamax" else None

    def folded(self) -> jax.Array:
        """`geglu.fold_weights` of the projection, cast as the Linear casts it."""
        kernel, bias = self.proj.promote_dtype((self.proj.kernel.get_value(), self.proj.bias.get_value()),
                                               dtype=self.proj.dtype)
        return fold_weights(kernel, bias)

    def __call__(self, x: jax.Array, prepared: Prepared | None = None) -> jax.Array:
        """`x` (..., dim_in), or `input_width()` wide; `prepared`: the UNet's `Prepared`
        context, which holds the folded weights on the fused path."""
        proj = self.proj
        # Cast as the Linear itself casts its input and parameters.
        x, kernel, bias = proj.promote_dtype((x, proj.kernel.get_value(), proj.bias.get_value()), dtype=proj.dtype)
        folded = prepared.of(self) if prepared is not None and geglu_implementation() == "tokamax" else None
        return geglu(x, kernel, bias, folded)


class FeedForward(nnx.Module):
    def __init__(self, dim: int, *, mult: int = 4, dtype, rngs: nnx.Rngs):
        # `net.1` is dropout in the checkpoint layout: no parameters, a None placeholder.
        self.net = nnx.List([GEGLU(dim, dim * mult, dtype=dtype, rngs=rngs), None,
                             nnx.Linear(dim * mult, dim, dtype=dtype, param_dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, prepared: Prepared | None = None) -> jax.Array:
        return self.net[2](self.net[0](x, prepared))


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention and a GEGLU feed-forward, each pre-norm and residual.

    With `only_cross_attention` the first attention also attends to the context instead
    of to itself (the x4 upscaler's early blocks).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, *, cross_attention_dim: int,
                 only_cross_attention: bool, dtype, rngs: nnx.Rngs):
        self.only_cross_attention = only_cross_attention

        def layer_norm():
            return LayerNorm(dim, epsilon=1e-5, dtype=dtype, param_dtype=dtype, rngs=rngs)

        self.norm1 = layer_norm()
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head,
                               cross_attention_dim=cross_attention_dim if only_cross_attention else None,
                               dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm()
        self.attn2 = Attention(dim, heads=heads, dim_head=dim_head,
                               cross_attention_dim=cross_attention_dim, dtype=dtype, rngs=rngs)
        self.norm3 = layer_norm()
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        if self.only_cross_attention:
            x = repeat_batch(x, context.shape[0])
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        x = repeat_batch(x, context.shape[0])  # self attention ran once per sample
        x = x + self.attn2(self.norm2(x), context)
        # On the fused GEGLU's path the norm writes its output with the GEMM's channel of
        # ones (the bias's row meets it), not a copy after it.
        return x + self.ff(self.norm3(x, ones_to=self.ff.net[0].input_width()), _prepared(context))


class Transformer2DModel(nnx.Module):
    """Group norm, projection to tokens, transformer blocks, projection back, residual.

    SD 1.x projects with 1x1 convolutions, SD 2.x with linear layers; on NHWC both are
    the same matmul over channels, only the checkpoint layout differs (the converter
    squeezes 1x1 conv kernels into Linear kernels), so both use nnx.Linear here.
    """

    def __init__(self, heads: int, dim_head: int, in_channels: int, *, num_layers: int,
                 cross_attention_dim: int, norm_num_groups: int, only_cross_attention: bool, dtype, rngs: nnx.Rngs):
        inner_dim = heads * dim_head
        # diffusers fixes this norm's eps at 1e-6, whatever the UNet's norm_eps.
        self.norm = group_norm(in_channels, norm_num_groups, 1e-6, dtype=dtype, rngs=rngs)
        self.proj_in = nnx.Linear(in_channels, inner_dim, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.proj_out = nnx.Linear(inner_dim, in_channels, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner_dim, heads, dim_head, cross_attention_dim=cross_attention_dim,
                                  only_cross_attention=only_cross_attention, dtype=dtype, rngs=rngs)
            for _ in range(num_layers)])

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, _ = x.shape
        h = self.proj_in(self.norm(x))
        h = h.reshape(batch, height * width, h.shape[-1])
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h.reshape(h.shape[0], height, width, h.shape[-1]))
        return h + repeat_batch(x, h.shape[0])


class CrossAttnDownBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int, num_layers: int,
                 transformer_layers: int, heads: int, cross_attention_dim: int,
                 only_cross_attention: bool, add_downsample: bool, config: UNetConfig,
                 dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                          temb_channels=temb_channels, groups=config.norm_num_groups,
                          eps=config.norm_eps,
                          dtype=dtype, rngs=rngs)
            for i in range(num_layers)])
        self.attentions = nnx.List([
            Transformer2DModel(heads, out_channels // heads, out_channels,
                               num_layers=transformer_layers, cross_attention_dim=cross_attention_dim,
                               norm_num_groups=config.norm_num_groups,
                               only_cross_attention=only_cross_attention, dtype=dtype, rngs=rngs)
            for _ in range(num_layers)])
        self.downsamplers = (nnx.List([Downsample2D(out_channels, padding=config.downsample_padding,
                                                    dtype=dtype, rngs=rngs)])
                             if add_downsample else None)

    def __call__(self, x, temb, context):
        skips = []
        for resnet, attention in zip(self.resnets, self.attentions):
            x = attention(resnet(x, temb), context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class DownBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int, num_layers: int,
                 add_downsample: bool, config: UNetConfig, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                          temb_channels=temb_channels, groups=config.norm_num_groups,
                          eps=config.norm_eps,
                          dtype=dtype, rngs=rngs)
            for i in range(num_layers)])
        self.downsamplers = (nnx.List([Downsample2D(out_channels, padding=config.downsample_padding,
                                                    dtype=dtype, rngs=rngs)])
                             if add_downsample else None)

    def __call__(self, x, temb, context):
        del context  # no attention in this block
        skips = []
        for resnet in self.resnets:
            x = resnet(x, temb)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet, then (transformer, resnet) once: the bottleneck at the lowest resolution."""

    def __init__(self, channels: int, *, temb_channels: int, transformer_layers: int, heads: int,
                 cross_attention_dim: int, config: UNetConfig, dtype, rngs: nnx.Rngs):
        def resnet():
            return ResnetBlock2D(channels, channels, temb_channels=temb_channels,
                                 groups=config.norm_num_groups, eps=config.norm_eps,
                                 output_scale_factor=config.mid_block_scale_factor,
                                 dtype=dtype, rngs=rngs)

        self.resnets = nnx.List([resnet(), resnet()])
        self.attentions = nnx.List([
            Transformer2DModel(heads, channels // heads, channels, num_layers=transformer_layers,
                               cross_attention_dim=cross_attention_dim,
                               norm_num_groups=config.norm_num_groups,
                               only_cross_attention=False, dtype=dtype, rngs=rngs)])

    def __call__(self, x, temb, context):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


def _prepared(context) -> Prepared | None:
    """The `Prepared` context an up block's upsampler takes its phase kernels from, if any."""
    return context if isinstance(context, Prepared) else None


def _up_resnets(in_channels: int, prev_output_channels: int, out_channels: int, *,
                temb_channels: int, num_layers: int, config: UNetConfig, dtype, rngs):
    """Resnets of an up block: each takes the running features concatenated with one skip."""
    resnets = []
    for i in range(num_layers):
        skip_channels = in_channels if i == num_layers - 1 else out_channels
        running_channels = prev_output_channels if i == 0 else out_channels
        resnets.append(ResnetBlock2D(running_channels + skip_channels, out_channels,
                                     temb_channels=temb_channels, groups=config.norm_num_groups,
                                     eps=config.norm_eps,
                                     dtype=dtype, rngs=rngs))
    return nnx.List(resnets)


class CrossAttnUpBlock2D(nnx.Module):
    def __init__(self, in_channels: int, prev_output_channels: int, out_channels: int, *,
                 temb_channels: int, num_layers: int, transformer_layers: int, heads: int,
                 cross_attention_dim: int, only_cross_attention: bool, add_upsample: bool,
                 config: UNetConfig, dtype, rngs: nnx.Rngs):
        self.resnets = _up_resnets(in_channels, prev_output_channels, out_channels,
                                   temb_channels=temb_channels, num_layers=num_layers,
                                   config=config, dtype=dtype, rngs=rngs)
        self.attentions = nnx.List([
            Transformer2DModel(heads, out_channels // heads, out_channels,
                               num_layers=transformer_layers, cross_attention_dim=cross_attention_dim,
                               norm_num_groups=config.norm_num_groups,
                               only_cross_attention=only_cross_attention, dtype=dtype, rngs=rngs)
            for _ in range(num_layers)])
        self.upsamplers = (nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)])
                           if add_upsample else None)

    def __call__(self, x, skips, temb, context, upsample_size=None):
        for resnet, attention in zip(self.resnets, self.attentions):
            x = jnp.concatenate([x, repeat_batch(skips.pop(), x.shape[0])], axis=-1)
            x = attention(resnet(x, temb), context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size, _prepared(context))
        return x


class UpBlock2D(nnx.Module):
    def __init__(self, in_channels: int, prev_output_channels: int, out_channels: int, *,
                 temb_channels: int, num_layers: int, add_upsample: bool, config: UNetConfig,
                 dtype, rngs: nnx.Rngs):
        self.resnets = _up_resnets(in_channels, prev_output_channels, out_channels,
                                   temb_channels=temb_channels, num_layers=num_layers,
                                   config=config, dtype=dtype, rngs=rngs)
        self.upsamplers = (nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)])
                           if add_upsample else None)

    def __call__(self, x, skips, temb, context, upsample_size=None):
        for resnet in self.resnets:
            x = resnet(jnp.concatenate([x, repeat_batch(skips.pop(), x.shape[0])], axis=-1), temb)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size, _prepared(context))
        return x


class UNet2DConditionModel(nnx.Module):
    """Predicts the noise (or v) of NHWC latents given timesteps and a text context.

    `dtype` is the parameter and compute dtype (bfloat16 on accelerators); group-norm
    statistics and the attention softmax are computed in float32 regardless.
    """

    def __init__(self, config: UNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        c = config
        channels = c.block_out_channels
        n = len(channels)
        time_dim = c.time_embedding_dim or channels[0] * 4

        self.conv_in = conv2d(c.in_channels, channels[0], c.conv_in_kernel, dtype=dtype, rngs=rngs)
        self.time_embedding = TimestepEmbedding(channels[0], time_dim,
                                                post_act=c.timestep_post_act == "silu",
                                                cond_proj_dim=c.time_cond_proj_dim, dtype=dtype, rngs=rngs)
        self.class_embedding = (nnx.Embed(c.num_class_embeds, time_dim, dtype=dtype,
                                          param_dtype=dtype, rngs=rngs)
                                if c.num_class_embeds is not None else None)

        down_blocks = []
        out_ch = channels[0]
        for i, block_type in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, channels[i]
            common = dict(temb_channels=time_dim, num_layers=c.layers_per_block[i],
                          add_downsample=i < n - 1, config=c, dtype=dtype, rngs=rngs)
            if block_type == "CrossAttnDownBlock2D":
                down_blocks.append(CrossAttnDownBlock2D(
                    in_ch, out_ch, transformer_layers=c.transformer_layers_per_block[i],
                    heads=c.attention_head_dim[i], cross_attention_dim=c.cross_attention_dim[i],
                    only_cross_attention=c.only_cross_attention[i], **common))
            else:
                down_blocks.append(DownBlock2D(in_ch, out_ch, **common))
        self.down_blocks = nnx.List(down_blocks)

        self.mid_block = UNetMidBlock2DCrossAttn(
            channels[-1], temb_channels=time_dim,
            transformer_layers=c.transformer_layers_per_block[-1], heads=c.attention_head_dim[-1],
            cross_attention_dim=c.cross_attention_dim[-1], config=c, dtype=dtype, rngs=rngs)

        # The up path visits the levels in reverse, each with one more resnet than down.
        rev_channels = channels[::-1]
        rev_layers = c.layers_per_block[::-1]
        rev_transformer_layers = c.transformer_layers_per_block[::-1]
        rev_heads = c.attention_head_dim[::-1]
        rev_context_dim = c.cross_attention_dim[::-1]
        rev_only_cross = c.only_cross_attention[::-1]
        up_blocks = []
        out_ch = rev_channels[0]
        for i, block_type in enumerate(c.up_block_types):
            prev_ch, out_ch = out_ch, rev_channels[i]
            in_ch = rev_channels[min(i + 1, n - 1)]
            common = dict(temb_channels=time_dim, num_layers=rev_layers[i] + 1,
                          add_upsample=i < n - 1, config=c, dtype=dtype, rngs=rngs)
            if block_type == "CrossAttnUpBlock2D":
                up_blocks.append(CrossAttnUpBlock2D(
                    in_ch, prev_ch, out_ch, transformer_layers=rev_transformer_layers[i],
                    heads=rev_heads[i], cross_attention_dim=rev_context_dim[i],
                    only_cross_attention=rev_only_cross[i], **common))
            else:
                up_blocks.append(UpBlock2D(in_ch, prev_ch, out_ch, **common))
        self.up_blocks = nnx.List(up_blocks)

        self.conv_norm_out = group_norm(channels[0], c.norm_num_groups, c.norm_eps, dtype=dtype, rngs=rngs)
        self.conv_out = conv2d(channels[0], c.out_channels, c.conv_out_kernel, dtype=dtype, rngs=rngs)

    def prepare(self, encoder_hidden_states: jax.Array) -> Prepared:
        """The context with each cross attention's keys and values, each upsampler's phase
        kernels and, on the fused GEGLU's path, its folded weights computed once, to pass as
        `encoder_hidden_states` to calls that share them (the sampler's steps)."""
        states = encoder_hidden_states.astype(self.dtype)
        per_module = {}
        for _, module in nnx.iter_graph(self):
            if isinstance(module, Attention) and module.cross:
                per_module[id(module)] = module.keys_values(states)
            elif isinstance(module, Upsample2D):
                per_module[id(module)] = module.phases()
            elif isinstance(module, GEGLU) and geglu_implementation() == "tokamax":
                per_module[id(module)] = module.folded()
        return Prepared(states, per_module)

    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array | Prepared,
                 class_labels: jax.Array | None = None, timestep_cond: jax.Array | None = None) -> jax.Array:
        """(B, H, W, in_channels), (B,) or scalar, (k*B, T, D), (B,) int -> (k*B, H, W, out_channels).

        `encoder_hidden_states` may be `prepare(...)` of it: the same output.

        `timestep_cond` (B, time_cond_proj_dim): a guidance-distilled model's embedding of
        its guidance scale (`guidance_embedding`).

        With k contexts per sample, each sample's adjacent (CFG's uncond and cond: k = 2),
        output row i*k + j is sample i under context row i*k + j, as if each sample had
        been repeated k times. It is not: what comes before the first read of the context
        (conv_in, the down blocks without attention before the first with it, that one's
        first resnet and self attention) runs once per sample, and its results
        are repeated where they meet the context (`repeat_batch`). A sample's rows stay
        together, so a batch sharded over chips needs no exchange between them."""
        c = self.config
        if sample.ndim != 4 or sample.shape[-1] != c.in_channels:
            raise ValueError(
                f"UNet: sample has shape {sample.shape}; expected NHWC (batch, height, width, "
                f"{c.in_channels})")
        if (encoder_hidden_states.ndim != 3
                or encoder_hidden_states.shape[-1] not in c.cross_attention_dim):
            raise ValueError(
                f"UNet: encoder_hidden_states has shape {encoder_hidden_states.shape}; "
                f"expected (batch, tokens, {c.cross_attention_dim[0]})")
        if encoder_hidden_states.shape[0] % sample.shape[0]:
            raise ValueError(
                f"UNet: encoder_hidden_states has {encoder_hidden_states.shape[0]} rows for "
                f"{sample.shape[0]} samples; pass one context per sample, or k per sample, "
                f"each sample's k rows together")
        if self.class_embedding is not None and class_labels is None:
            raise ValueError(
                "UNet: this model has num_class_embeds set (e.g. the x4 upscaler's noise "
                "level); pass class_labels of shape (batch,)")
        batch = sample.shape[0]
        sample = sample.astype(self.dtype)
        context = (encoder_hidden_states if isinstance(encoder_hidden_states, Prepared)
                   else encoder_hidden_states.astype(self.dtype))
        if c.center_input_sample:
            sample = 2 * sample - 1.0

        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        t_emb = timestep_embedding(timesteps, c.block_out_channels[0],
                                   flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift)
        temb = self.time_embedding(t_emb.astype(self.dtype),
                                   None if timestep_cond is None else timestep_cond.astype(self.dtype))
        if self.class_embedding is not None:
            temb = temb + self.class_embedding(jnp.asarray(class_labels, jnp.int32))

        # A size not divisible by 2**downsamples makes the up path resize to each skip's size.
        downsamples = len(c.block_out_channels) - 1
        exact = sample.shape[1] % 2 ** downsamples == 0 and sample.shape[2] % 2 ** downsamples == 0

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            block_skips = skips[len(skips) - len(block.resnets):]
            del skips[len(skips) - len(block.resnets):]
            upsample_size = None if exact or not skips else tuple(skips[-1].shape[1:3])
            x = block(x, block_skips, temb, context, upsample_size)
        x = self.conv_out(self.conv_norm_out(x, silu=True))
        return x
