"""Tiny random diffusers checkpoints, written to disk with save_pretrained, for tests.

Dimensions are small and odd-sized where the architecture allows, so layout mistakes
(transposes, channel orders) cannot hide behind square shapes.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from tools.random_family import write_char_tokenizer



def _text_encoder(vocab_size: int, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act=hidden_act,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                         projection_dim=16)
    return CLIPTextModel(cfg).eval()


def _vae(blocks: int, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        block_out_channels=tuple([8, 12, 12, 12][:blocks]),
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        sample_size=32, scaling_factor=scaling_factor).eval()


def _randomize(module: torch.nn.Module, scale: float = 0.2) -> None:
    # Fresh-init norms are identity and some convs start at zero: randomise everything so
    # every parameter's layout matters.
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)


def _amplify(module: torch.nn.Module, names: tuple[str, ...], factor: float) -> None:
    """Multiplies the parameters whose names hold any of `names` by `factor`. At the common
    scale the UNet's output moved by 2/1000 of its size for another prompt, and the x4's
    little for its noise level (its class label): too little for the parity tests to see
    guidance, the prompt pairs or the class label go wrong."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(n in name for n in names):
                p.mul_(factor)


def _unit_scale_latents(vae) -> None:
    """Sets the VAE's scaling_factor to 1 / the std of its encodings of random images, as
    SD's 0.18215 makes its latents about unit scale: at 0.18215 the tiny VAE's init latents
    peaked at 0.055, so the init image hardly counted next to the noise."""
    images = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (4, 3, 16, 16)).astype(np.float32))
    with torch.no_grad():
        std = vae.encode(images).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 3))


def make_sd_folder(path: str, *, seed: int = 0, unet_in_channels: int = 4, prediction_type: str = "epsilon",
                   scheduler: str = "DDIMScheduler", hidden_act: str = "quick_gelu",
                   time_cond_proj_dim: int | None = None) -> str:
    """A tiny text-to-image (or 9-channel inpainting, or guidance-distilled LCM) pipeline
    folder; images are 16x16."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler,
                           StableDiffusionPipeline, UNet2DConditionModel)

    torch.manual_seed(seed)
    tok_dir = os.path.join(path, "tokenizer")
    vocab_size = write_char_tokenizer(tok_dir)
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=unet_in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), time_cond_proj_dim=time_cond_proj_dim).eval()
    vae = _vae(2, 1.0)  # scaling_factor: set below
    text_encoder = _text_encoder(vocab_size, hidden_act)
    for m in (unet, vae, text_encoder):
        _randomize(m)
    _amplify(unet, ("attn2.to_k", "attn2.to_v"), 5.0)
    _unit_scale_latents(vae)
    sched_cls = {"DDIMScheduler": DDIMScheduler, "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
                 "EulerDiscreteScheduler": EulerDiscreteScheduler, "LCMScheduler": LCMScheduler}[scheduler]
    sched = sched_cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type=prediction_type, steps_offset=1, timestep_spacing="leading",
                      **({"clip_sample": False, "set_alpha_to_one": False} if scheduler == "DDIMScheduler" else {}))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_upscaler_folder(path: str, *, seed: int = 1) -> str:
    """A tiny SD x4 upscaler folder (f=4 VAE, 7-channel UNet with noise-level class labels)."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tok_dir = os.path.join(path, "tokenizer")
    vocab_size = write_char_tokenizer(tok_dir)
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2, num_class_embeds=1000,
        only_cross_attention=[True, False], down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).eval()
    vae = _vae(3, 0.08333)
    text_encoder = _text_encoder(vocab_size, "gelu")
    for m in (unet, vae, text_encoder):
        _randomize(m)
    _amplify(unet, ("attn2.to_k", "attn2.to_v", "class_embedding"), 5.0)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                                steps_offset=1, timestep_spacing="leading"),
        max_noise_level=350)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
