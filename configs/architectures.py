"""Full-size architectures as the config.json dicts that diffusers / transformers write.

Used to build random-weight models for benchmarks and memory measurements (speed does
not depend on weight values), and as the reference shapes for real checkpoints.
"""

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
    "attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
    "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
}

SD21_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                 use_linear_projection=True, upcast_attention=True)

SD_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "act_fn": "silu", "sample_size": 512, "scaling_factor": 0.18215,
}

CLIP_L = {
    "_class_name": "CLIPTextModel", "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}

OPENCLIP_H = dict(CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, hidden_act="gelu", projection_dim=512)

X4_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 7, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [256, 512, 512, 1024], "layers_per_block": 2, "cross_attention_dim": 1024,
    "attention_head_dim": 8, "num_class_embeds": 1000, "only_cross_attention": [True, True, True, False],
    "use_linear_projection": True, "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True,
    "freq_shift": 0, "act_fn": "silu",
}

X4_VAE = dict(SD_VAE, down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
              block_out_channels=[128, 256, 512], scaling_factor=0.08333)

SD_SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
    "timestep_spacing": "leading", "steps_offset": 1,
}

X4_SCHEDULER = dict(SD_SCHEDULER, _class_name="DPMSolverMultistepScheduler", beta_start=0.0001, beta_end=0.02,
                    prediction_type="v_prediction")
X4_LOW_RES_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                        "beta_end": 0.02, "beta_schedule": "scaled_linear"}

# name -> (text encoder, unet, vae, scheduler, low-res scheduler or None)
ARCHITECTURES = {
    "sd15": (CLIP_L, SD15_UNET, SD_VAE, SD_SCHEDULER, None),
    "sd21": (OPENCLIP_H, SD21_UNET, SD_VAE, dict(SD_SCHEDULER, prediction_type="v_prediction"), None),
    "x4-upscaler": (OPENCLIP_H, X4_UNET, X4_VAE, X4_SCHEDULER, X4_LOW_RES_SCHEDULER),
}

# Tiny versions of the same families, for CPU runs of the benchmark tools and tests.
TINY_UNET = dict(SD15_UNET, sample_size=8, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                 cross_attention_dim=16, attention_head_dim=2,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
TINY_VAE = dict(SD_VAE, block_out_channels=[8, 12], layers_per_block=1, norm_num_groups=4, sample_size=16,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
TINY_CLIP = dict(CLIP_L, vocab_size=514, hidden_size=16, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=2, projection_dim=16, bos_token_id=512, eos_token_id=513, pad_token_id=513)
ARCHITECTURES["tiny"] = (TINY_CLIP, TINY_UNET, TINY_VAE, SD_SCHEDULER, None)
