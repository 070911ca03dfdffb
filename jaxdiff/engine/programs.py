"""The jitted programs: one per stage and shape signature, traced once, run many times.

Everything that varies per sample (prompts, seeds, guidance, strength, masks, noise
level) is a traced batch array; only what fixes shapes or the loop length is static.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff import samplers
from jaxdiff.engine.guidance import classifier_free_guidance
from jaxdiff.models.unet import guidance_embedding

# Streams folded into a sample's key, so each random draw has its own fixed stream:
# base stage (initial noise, solver noise), then the upscale stage's own key with
# (augmentation noise, initial noise, solver noise).
_INITIAL_NOISE, _SAMPLER_NOISE, _UPSCALE = 0, 1, 2
_AUG_NOISE, _UPSCALE_NOISE, _UPSCALE_SAMPLER_NOISE = 0, 1, 2


def compiler_options(backend: str | None = None) -> dict | None:
    """XLA options for jaxdiff's programs on `backend` (None: the default one).

    On GPU, GEMMs go to cuBLAS without Triton's autotuning. On an H200, with Triton allowed,
    the autotuner had picked cuBLAS for the SD 1.5 step's GEMMs anyway (148 cuBLAS calls,
    docs/bench/step-hlo-sd15-b16-autotuned-h200-2026-11-27.json), after timing Triton
    tilings for each, and kept the fusions made for Triton. Without it XLA folds bias and
    residual adds into cuBLAS's epilogue: compiled for an H200 without a device, the step's
    memory-bound ops went from 7.8 to 6.3 ms at the memory bandwidth. The program at batch
    16 had its first call (compile and one batch) in 15.7 s against 32.3 s, and ran 9.40
    img/s (one timed batch) against 9.30 (median of two).

    On CPU, LLVM optimises the generated kernels at level 1, not 2: the time goes to the
    convolutions and matmuls of its runtime libraries, which the level does not touch. The
    shipped model's base program compiles in 4.0-4.1 s against 4.5 and renders as fast
    (`python -m tools.bench --arch default --batch-sizes 8 --steps 20`, 2-core CPU); the
    README quickstart's two programs compile in 3.9 s against 5.6.

    A setting of the flag in the user's own XLA_FLAGS wins."""
    backend = backend or jax.default_backend()
    if backend == "cpu" and not xla_flag_given("xla_backend_optimization_level"):
        return {"xla_backend_optimization_level": 1}
    if backend != "gpu" or xla_flag_given("xla_gpu_enable_triton_gemm"):
        return None
    return {"xla_gpu_enable_triton_gemm": False}


def xla_flag_given(name: str) -> bool:
    """Whether XLA_FLAGS sets `name` itself (not a longer flag that starts with it)."""
    return re.search(rf"--{name}(=|\s|$)", os.environ.get("XLA_FLAGS", "")) is not None


def _jit(program: Callable, backend: str | None) -> Callable:
    return jax.jit(program, compiler_options=compiler_options(backend))


@dataclasses.dataclass(frozen=True)
class BaseSignature:
    """What fixes a compiled base-stage program."""

    batch: int
    height: int
    width: int
    steps: int
    sampler: str
    karras: bool
    lcm_grid: int = 0  # LCM grid points an img2img strength keeps (0: not respaced)
    cfg: bool = True   # False: one UNet call on the prompt alone (guidance <= 1, or distilled)


@dataclasses.dataclass(frozen=True)
class UpscaleSignature:
    """What fixes a compiled upscale-stage program (sizes are the low-res input's)."""

    batch: int
    height: int
    width: int
    steps: int
    sampler: str
    cfg: bool = True   # False: one UNet call on the prompt alone (guidance <= 1)


def sample_keys(seeds: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.key)(seeds)


def per_sample_normal(keys: jax.Array, stream: int, shape: tuple[int, ...]) -> jax.Array:
    """One standard-normal draw per sample from its own key: independent of batch layout."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, stream), shape))(keys)


def encode_text(text_encoder, ids: jax.Array, mask: jax.Array, clip_skip: int) -> jax.Array:
    """The UNet's context; the tokenizer's mask hides the padding only where the text
    encoder's config asks for it (use_attention_mask), as in diffusers."""
    mask = mask if text_encoder.config.use_attention_mask else None
    return text_encoder(ids, attention_mask=mask, clip_skip=clip_skip).last_hidden_state


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] float -> uint8 with rounding, as image processors do."""
    return jnp.round(jnp.clip((images + 1.0) * 127.5, 0.0, 255.0)).astype(jnp.uint8)


def all_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)


def decode_latents(vae, latents: jax.Array, scaling_factor: float, tile_pixels: int | None) -> jax.Array:
    """Latents -> images in [-1, 1]; images wider or taller than `tile_pixels` are decoded
    in tiles of that size. Pixels, not latents: the decoder's largest activations are at
    the output's resolution, whatever the VAE's downscale factor (8 for SD, 4 for x4)."""
    z = (latents / scaling_factor).astype(vae_dtype(vae))
    tile_latent = None if tile_pixels is None else tile_pixels // vae.config.downscale_factor
    if tile_latent is not None and max(z.shape[1:3]) > tile_latent:
        images = vae.tiled_decode(z, tile_latent=tile_latent)
    else:
        images = vae.decode(z)
    return images.astype(jnp.float32)


def vae_dtype(vae) -> jnp.dtype:
    return vae.decoder.conv_in.kernel.get_value().dtype  # post_quant_conv is optional


def unet_dtype(unet) -> jnp.dtype:
    return unet.conv_in.kernel.get_value().dtype


def _bind(graphdefs, states, inputs, clip_skip: int):
    """The family's modules inside a traced program, and the CFG context: each sample's
    negative prompt's row, then its prompt's (rows uncond_0, cond_0, uncond_1, ...), so a
    sample's rows stay on the chip that holds the sample when the batch is sharded.

    clip_skip applies to the negative prompt too, as A1111 and ComfyUI do: diffusers' SD
    pipelines skip layers for the prompt only, so CFG subtracts embeddings of two layers.
    """
    text_encoder, unet, vae = (nnx.merge(g, st) for g, st in zip(graphdefs, states))
    both = lambda name: jnp.stack([inputs["uncond_" + name], inputs[name]], axis=1).reshape(
        (-1,) + inputs[name].shape[1:])
    context = encode_text(text_encoder, both("ids"), both("ids_mask"), clip_skip)
    return unet, vae, context.astype(unet_dtype(unet))


def _given_or_drawn(given_flags: jax.Array, given: jax.Array, drawn: jax.Array) -> jax.Array:
    """Per sample: noise passed in by the caller (to reproduce a run) or drawn from its key."""
    return jnp.where(given_flags[:, None, None, None], given, drawn)


def _denoiser(cfg: bool, unet, context, guidance, conditioning=None, class_labels=None):
    """The samplers' denoise(x, t, i).

    With CFG (`cfg`), one UNet call on each sample's (uncond, cond) context rows, then
    guidance: the latents go in once with both contexts, so the UNet runs what precedes
    its first read of the context once per sample, not once per half of the CFG batch.
    Without, one call on the prompt's rows alone, at half CFG's batch: where guidance is off
    (<= 1, as in diffusers) or distilled into the UNet (LCM, time_cond_proj_dim), which then
    gets the scale as its embedding, as diffusers' LCM pipeline gives it.
    `conditioning` (per sample, channels-last) is concatenated to the latents: the
    inpainting UNet's mask and masked latents, or the upscaler's low-res image.
    """
    dtype = context.dtype
    extra = None if conditioning is None else conditioning.astype(dtype)
    kwargs = {} if class_labels is None else {"class_labels": class_labels}
    if not cfg:
        context = context[1::2]
        if unet.config.time_cond_proj_dim is not None:
            kwargs["timestep_cond"] = guidance_embedding(guidance, unet.config.time_cond_proj_dim)
    context = unet.prepare(context)  # the text's keys and values, the upsamplers' phases: once

    def denoise(x_in, t, i):
        model_in = x_in.astype(dtype)
        if extra is not None:
            model_in = jnp.concatenate([model_in, extra], axis=-1)
        out = unet(model_in, t, context, **kwargs).astype(jnp.float32)
        if not cfg:
            return out
        pairs = out.reshape((-1, 2) + out.shape[1:])  # each sample's (uncond, cond) rows
        return classifier_free_guidance(pairs[:, 0], pairs[:, 1], guidance)

    return denoise


def make_base_program(graphdefs, sampler, sig: BaseSignature, *, clip_skip: int,
                      scaling_factor: float, tile_pixels: int | None,
                      on_trace: Callable[[], None], backend: str | None = None) -> Callable:
    """Text -> latents (CFG, any mode) -> decoded images, as one XLA program, compiled
    with the XLA options for `backend` (None: the default one).

    Modes share it: `init_flag` picks image-started latents (img2img, sketch, inpaint
    with strength < 1), `mask` (1 = repaint) blends known latents back after each step
    for 4-channel UNets, and 9-channel inpainting UNets see mask and masked latents.
    """
    def program(states, inputs):
        on_trace()
        unet, vae, context = _bind(graphdefs, states, inputs, clip_skip)
        keys = sample_keys(inputs["seeds"])
        init_latents = inputs["init_latents"]
        shape = init_latents.shape[1:]
        noise = _given_or_drawn(inputs["noise_given"], inputs["noise"],
                                per_sample_normal(keys, _INITIAL_NOISE, shape))
        start = inputs["start_step"]
        from_image = samplers.initial_latents(sampler, noise, x0=init_latents, start_step=start)
        from_noise = samplers.initial_latents(sampler, noise)
        x = jnp.where(inputs["init_flag"][:, None, None, None], from_image, from_noise)

        mask = inputs["mask"]
        extra = None
        if unet.config.in_channels == shape[-1] + 1 + shape[-1]:  # 9-channel inpainting UNet
            extra = jnp.concatenate([mask, inputs["masked_latents"]], axis=-1)

        denoise = _denoiser(sig.cfg, unet, context, inputs["guidance"], conditioning=extra)

        def blend_known(x_i, i):
            # Known pixels follow the init image at this step's noise level.
            known = samplers.noise_to_step(sampler, init_latents, noise, i)
            return mask * x_i + (1.0 - mask) * known

        latents = samplers.sample(sampler, denoise, x, jax.vmap(lambda k: jax.random.fold_in(k, _SAMPLER_NOISE))(keys),
                                  start_step=start,
                                  after_step=None if extra is not None else blend_known)
        images = decode_latents(vae, latents, scaling_factor, tile_pixels)
        finite = all_finite(latents) & all_finite(images)
        return to_uint8(images), finite

    return _jit(program, backend)


def make_encode_program(vae_def, *, scaling_factor: float, on_trace: Callable[[], None],
                        backend: str | None = None) -> Callable:
    """Images in [-1, 1] -> scaled latents (the posterior mean: deterministic per image)."""

    def program(vae_state, images):
        on_trace()
        vae = nnx.merge(vae_def, vae_state)
        mean, _ = vae.encode(images.astype(vae_dtype(vae)))
        return mean.astype(jnp.float32) * scaling_factor

    return _jit(program, backend)


def make_upscale_program(graphdefs, sampler, low_res_schedule, sig: UpscaleSignature, *,
                         clip_skip: int, scaling_factor: float, tile_pixels: int | None,
                         on_trace: Callable[[], None], backend: str | None = None) -> Callable:
    """The SD x4 upscaler: noise-augmented low-res image + latents -> 4x image."""
    def program(states, inputs):
        on_trace()
        unet, vae, context = _bind(graphdefs, states, inputs, clip_skip)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, _UPSCALE))(sample_keys(inputs["seeds"]))
        low_res = inputs["low_res"]
        noise_level = inputs["noise_level"]
        aug_noise = _given_or_drawn(inputs["noise_given"], inputs["aug_noise"],
                                    per_sample_normal(keys, _AUG_NOISE, low_res.shape[1:]))
        image = samplers.add_noise(low_res_schedule, low_res, aug_noise, noise_level)
        latent_shape = low_res.shape[1:3] + (unet.config.out_channels,)
        noise = _given_or_drawn(inputs["noise_given"], inputs["noise"],
                                per_sample_normal(keys, _UPSCALE_NOISE, latent_shape))
        x = samplers.initial_latents(sampler, noise)
        denoise = _denoiser(sig.cfg, unet, context, inputs["guidance"], conditioning=image,
                            class_labels=noise_level)

        latents = samplers.sample(sampler, denoise, x,
                                  jax.vmap(lambda k: jax.random.fold_in(k, _UPSCALE_SAMPLER_NOISE))(keys))
        images = decode_latents(vae, latents, scaling_factor, tile_pixels)
        finite = all_finite(latents) & all_finite(images)
        return to_uint8(images), finite

    return _jit(program, backend)
