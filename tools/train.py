"""Trains the default model family on the shapes world and writes two diffusers-format folders.

    python -m tools.train --out OUT                      # about 5 minutes on one GPU
    python -m tools.train --quick --out OUT              # tiny data and 2 steps a stage (CPU test)
    python -m tools.train --out OUT --resume OUT         # continue from OUT/checkpoint

Stages, each stopped on time by its share of --budget-seconds:
  1. data: shapes-world examples (train split only) drawn by a process pool into numpy arrays;
  2. vae: one f=4 AutoencoderKL shared by both folders (64x64 images and 64x64 crops of 256s);
  3. base: CLIP text encoder + base UNet on 16x16x4 latents, epsilon prediction, 10% empty captions;
  4. x4: upscaler UNet on 64x64x4 latents (trained on crops), v-prediction; its low-res input
     is the 64x64 image after a VAE round trip (as the base stage's output is), noise-augmented,
     with the noise level as class label; the text encoder is frozen here;
  5. export: OUT/default (StableDiffusionPipeline) and OUT/default-x4
     (StableDiffusionUpscalePipeline), plus OUT/train_log.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxdiff import render_defaults
from jaxdiff.engine.programs import to_uint8
from jaxdiff.models.clip import CLIPTextConfig, CLIPTextModel, load_tokenizer, tokenize
from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig
from jaxdiff.models.vae import AutoencoderKL, VAEConfig
from jaxdiff.samplers import NoiseSchedule, add_noise
from jaxdiff.weights.export import save_safetensors, write_json
from tools import train_data

# The library versions whose folder layout and config fields these files follow.
DIFFUSERS_VERSION = "0.42.1"
TRANSFORMERS_VERSION = "5.24.0"
TOKENS = 77            # SD pipelines always pad prompts to 77 tokens
MAX_NOISE_LEVEL = 350  # as the SD x4 upscaler
# diffusers' StableDiffusionUpscalePipeline overwrites any other VAE scaling_factor with this
# one, so the x4 folder's VAE is rescaled to it (see `rescale_latents`).
X4_SCALING_FACTOR = 0.08333
CFG_DROP = 0.1         # share of captions replaced by the empty prompt
MIN_SNR_GAMMA = 5.0    # loss weight min(SNR, gamma) / SNR: converges several times faster (Hang et al. 2023)

VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64], "layers_per_block": 1, "norm_num_groups": 8, "act_fn": "silu",
    "mid_block_add_attention": False, "sample_size": 64, "scaling_factor": 1.0, "force_upcast": False,
}
TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 128,
    "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4,
    "max_position_embeddings": TOKENS, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 128,
    "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
    "dtype": "float32", "transformers_version": TRANSFORMERS_VERSION,
}
# Attention only at 8x8 and 4x4: on a CPU the 256-token attention at 16x16 took 60% of a
# training step, and a 3x3 grid of positions needs no finer map for the words to act on.
BASE_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "sample_size": 16, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [64, 128, 128], "layers_per_block": 1, "cross_attention_dim": 128,
    "attention_head_dim": 4, "norm_num_groups": 32, "norm_eps": 1e-5, "use_linear_projection": True,
    "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "center_input_sample": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1,
}
X4_UNET_CONFIG = dict(
    BASE_UNET_CONFIG, sample_size=64, in_channels=7,
    down_block_types=["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    block_out_channels=[16, 32, 64], norm_num_groups=8, num_class_embeds=MAX_NOISE_LEVEL + 1)
BASE_SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
    "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True,
    "thresholding": False, "trained_betas": None,
}
X4_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction", "timestep_spacing": "leading", "steps_offset": 1,
    "clip_sample": False, "set_alpha_to_one": False, "thresholding": False, "trained_betas": None,
}
# Sampling settings the exported folders recommend (render_defaults.json), measured on the
# trained model with tools/evaluate.py (`--guidance`, `--upscale-guidance`): this small model
# draws true corners and tips at far lower guidance than SD's 7.5 (base) and 9 (x4). Base
# plus x4, 96 unseen captions: 71.9% fully correct at SD's values, 95.8% at these.
BASE_RENDER_DEFAULTS = {"guidance": 2.5}
X4_RENDER_DEFAULTS = {"guidance": 3.0}
LOW_RES_SCHEDULER = {
    "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "scaled_linear",
    "clip_sample": False, "variance_type": "fixed_small", "prediction_type": "epsilon",
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much data, how large the batches and how the time is shared."""

    count: int = 30_000          # 64x64 examples
    count_256: int = 4_000       # of which also kept at 256x256 (upscaler and VAE crops)
    vae_batch: int = 128
    base_batch: int = 256
    x4_batch: int = 128
    x4_crop: int = 32            # latent (= low-res pixel) side of upscaler training crops
    vae_lr: float = 2e-3
    base_lr: float = 1e-3
    x4_lr: float = 1e-3
    warmup_steps: int = 200
    max_steps: int | None = None  # per stage and run; None: run each stage until its time is up
    shares: tuple = (("vae", 0.2), ("base", 0.5), ("x4", 0.3))
    export_reserve_s: float = 15.0
    checkpoint_every_s: float = 60.0


QUICK = Plan(count=24, count_256=8, vae_batch=4, base_batch=4, x4_batch=2, x4_crop=16, warmup_steps=1,
             max_steps=2, export_reserve_s=5.0, checkpoint_every_s=1e9)


def compute_dtype():
    """bfloat16 activations on accelerators; float32 on CPU (where bf16 is emulated and slow)."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


# --- models -------------------------------------------------------------------------------

class Trainable:
    """A model's float32 master parameters and the graph of its compute-dtype twin."""

    def __init__(self, build, seed: int):
        model = build(jnp.float32, nnx.Rngs(seed))
        _, self.params = nnx.split(model)
        self.graphdef = nnx.split(nnx.eval_shape(lambda: build(compute_dtype(), nnx.Rngs(seed))))[0]
        self.export_graphdef = nnx.split(model)[0]

    def bind(self, params):
        """The model in compute dtype, reading `params` (traced inside a jitted step)."""
        dtype = compute_dtype()
        return nnx.merge(self.graphdef, jax.tree.map(lambda p: p.astype(dtype), params))

    def module(self, params=None) -> nnx.Module:
        """A float32 module holding `params` (for export and evaluation)."""
        return nnx.merge(self.export_graphdef, self.params if params is None else params)


def build_models(vocab_size: int, seed: int) -> dict[str, Trainable]:
    text_cfg = CLIPTextConfig.from_dict(text_config(vocab_size))
    return {
        "vae": Trainable(lambda d, r: AutoencoderKL(VAEConfig.from_dict(VAE_CONFIG), dtype=d, rngs=r), seed),
        "text": Trainable(lambda d, r: CLIPTextModel(text_cfg, dtype=d, rngs=r), seed + 1),
        "base": Trainable(lambda d, r: UNet2DConditionModel(UNetConfig.from_dict(BASE_UNET_CONFIG),
                                                            dtype=d, rngs=r), seed + 2),
        "x4": Trainable(lambda d, r: UNet2DConditionModel(UNetConfig.from_dict(X4_UNET_CONFIG),
                                                          dtype=d, rngs=r), seed + 3),
    }


def text_config(vocab_size: int) -> dict:
    # The word-level tokenizer puts BOS and EOS last, as CLIP's does; EOS also pads.
    return dict(TEXT_CONFIG, vocab_size=vocab_size, bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def param_count(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


# --- optimisation -------------------------------------------------------------------------

def make_optimizer(lr: float):
    """AdamW whose learning rate is a state entry, so the host can set it each step."""
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.inject_hyperparams(optax.adamw)(learning_rate=lr, b1=0.9, b2=0.99,
                                                             weight_decay=0.01))


def _with_lr(opt_state, lr):
    clip, adamw = opt_state
    return clip, adamw._replace(hyperparams={**adamw.hyperparams, "learning_rate": lr})


def learning_rate(base: float, step: int, progress: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 10% over the stage's progress (0..1)."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    return base * warm * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def make_step(loss_fn, tx):
    """A jitted train step: (params, opt_state, frozen, data, key, lr) -> (params, opt_state, loss)."""

    def step(params, opt_state, frozen, data, key, lr):
        loss, grads = jax.value_and_grad(loss_fn)(params, frozen, data, key)
        opt_state = _with_lr(opt_state, lr)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def _to_unit(images_u8):
    return images_u8.astype(jnp.float32) / 127.5 - 1.0


def _crop(arrays, starts, size):
    """Same-place square crops of several (B, H, W, C) arrays at per-sample (y, x) starts."""
    def one(a, y, x):
        return jax.lax.dynamic_slice(a, (y, x, 0), (size, size, a.shape[-1]))
    return [jax.vmap(one)(a, starts[:, 0], starts[:, 1]) for a in arrays]


def vae_loss(models, batch: int):
    vae = models["vae"]

    def loss_fn(params, frozen, data, key):
        k_small, k_large, k_crop, k_eps = jax.random.split(key, 4)
        # Three quarters 64x64 images: at that size a small shape is 14 pixels wide and its
        # corners are what the decoder gets wrong; 64x64 crops of 256s are learnt much sooner.
        n_crops = batch // 4
        small = data["images64"][jax.random.randint(k_small, (batch - n_crops,), 0, data["images64"].shape[0])]
        large = data["images256"][jax.random.randint(k_large, (n_crops,), 0, data["images256"].shape[0])]
        starts = jax.random.randint(k_crop, (n_crops, 2), 0, 256 - 64 + 1)
        (large,) = _crop([large], starts, 64)
        x = _to_unit(jnp.concatenate([small, large]))
        model = vae.bind(params)
        mean, logvar = model.encode(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_eps, mean.shape, mean.dtype)
        out = model.decode(z).astype(jnp.float32)
        mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
        kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
        return jnp.mean(jnp.abs(out - x)) + jnp.mean((out - x) ** 2) + 1e-4 * kl

    return loss_fn


def training_schedules() -> dict[str, NoiseSchedule]:
    """The forward processes the stages train with ("base", "x4", and "low_res" for the x4
    stage's noise augmentation): those of the scheduler configs the folders are exported
    with, so that sampling removes the noise exactly as training added it."""
    return {"base": NoiseSchedule.from_config(BASE_SCHEDULER), "x4": NoiseSchedule.from_config(X4_SCHEDULER),
            "low_res": NoiseSchedule.from_config(LOW_RES_SCHEDULER)}


def _drop_captions(key, ids, empty_ids):
    drop = jax.random.uniform(key, (ids.shape[0],)) < CFG_DROP
    return jnp.where(drop[:, None], empty_ids[None, :], ids)


def base_loss(models, batch: int, schedule: NoiseSchedule):
    text, unet = models["text"], models["base"]
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)

    def loss_fn(params, frozen, data, key):
        k_idx, k_drop, k_t, k_noise = jax.random.split(key, 4)
        idx = jax.random.randint(k_idx, (batch,), 0, data["latents64"].shape[0])
        x0 = data["latents64"][idx]
        ids = _drop_captions(k_drop, data["ids"][idx], data["empty_ids"])
        t = jax.random.randint(k_t, (batch,), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, x0.shape)
        context = text.bind(params["text"])(ids).last_hidden_state
        pred = unet.bind(params["unet"])(add_noise(schedule, x0, noise, t), t, context).astype(jnp.float32)
        snr = abar[t] / (1.0 - abar[t])
        weight = jnp.minimum(snr, MIN_SNR_GAMMA) / snr
        return jnp.mean(weight * jnp.mean((pred - noise) ** 2, axis=(1, 2, 3)))

    return loss_fn


def x4_loss(models, batch: int, crop: int, schedule: NoiseSchedule, low_res_schedule: NoiseSchedule):
    text, unet = models["text"], models["x4"]
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)

    def loss_fn(params, frozen, data, key):
        k_idx, k_crop, k_drop, k_t, k_noise, k_level, k_low, k_aug = jax.random.split(key, 8)
        idx = jax.random.randint(k_idx, (batch,), 0, data["latents256"].shape[0])
        starts = jax.random.randint(k_crop, (batch, 2), 0, 64 - crop + 1)
        x0, low = _crop([data["latents256"][idx], _to_unit(data["low_res"][idx])], starts, crop)
        # Half the batch at the low noise levels used when rendering, half over the full range.
        level = jnp.where(jax.random.uniform(k_level, (batch,)) < 0.5,
                          jax.random.randint(k_low, (batch,), 0, 51),
                          jax.random.randint(k_level, (batch,), 0, MAX_NOISE_LEVEL + 1))
        low = add_noise(low_res_schedule, low, jax.random.normal(k_aug, low.shape), level)
        ids = _drop_captions(k_drop, data["ids256"][idx], data["empty_ids"])
        context = jax.lax.stop_gradient(text.bind(frozen)(ids).last_hidden_state)
        t = jax.random.randint(k_t, (batch,), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, x0.shape)
        a = abar[t][:, None, None, None]
        target = jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0   # v
        x_t = add_noise(schedule, x0, noise, t)
        pred = unet.bind(params)(jnp.concatenate([x_t, low], -1), t, context,
                                 class_labels=level).astype(jnp.float32)
        snr = abar[t] / (1.0 - abar[t])
        weight = jnp.minimum(snr, MIN_SNR_GAMMA) / (snr + 1.0)   # min-SNR for a v target
        return jnp.mean(weight * jnp.mean((pred - target) ** 2, axis=(1, 2, 3)))

    return loss_fn


# --- checkpoints (npz, no pickle) ---------------------------------------------------------

def save_checkpoint(path: str, trees: dict, info: dict) -> None:
    """Writes every leaf of `trees` to one npz keyed by its tree path, atomically."""
    arrays = {}
    for name, tree in trees.items():
        for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            arrays[name + jax.tree_util.keystr(p)] = np.asarray(leaf)
    arrays["__info__"] = np.frombuffer(json.dumps(info).encode(), np.uint8)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def checkpoint_info(path: str) -> dict:
    """The info dict `save_checkpoint` stored beside the arrays (reads no array)."""
    with np.load(path, allow_pickle=False) as f:
        return json.loads(bytes(f["__info__"]).decode())


def load_checkpoint(path: str, templates: dict) -> tuple[dict, dict]:
    """Fills trees shaped like `templates` from `save_checkpoint`'s file; returns (trees, info)."""
    info = checkpoint_info(path)
    with np.load(path, allow_pickle=False) as f:
        out = {}
        for name, tree in templates.items():
            flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
            leaves = []
            for p, leaf in flat:
                key = name + jax.tree_util.keystr(p)
                if key not in f:
                    raise ValueError(f"{path}: no {key!r}; was it written by another version of tools/train.py?")
                value = f[key]
                if value.shape != np.shape(leaf):
                    raise ValueError(f"{path}: {key!r} has shape {value.shape}, expected {np.shape(leaf)}")
                leaves.append(jnp.asarray(value, dtype=jnp.asarray(leaf).dtype))
            out[name] = jax.tree_util.tree_unflatten(treedef, leaves)
    return out, info


# --- the stage loop -----------------------------------------------------------------------

def run_stage(name: str, step_fn, params, opt_state, frozen, data, *, lr: float, plan: Plan,
              budget_s: float, key, checkpoint_path: str, start: dict | None, log: dict):
    """Steps until `budget_s` seconds (compile included) or plan.max_steps; prints progress."""
    step = start["step"] if start else 0
    progress0 = start["progress"] if start else 0.0
    restarts = start.get("restarts", 0) if start else 0
    first_step = step
    t0 = time.perf_counter()
    last_print = last_ckpt = t0
    losses, first_step_s, pending = [], None, None
    ema = None
    progress = progress0

    def record(loss_value, at_step):
        nonlocal ema
        ema = loss_value if ema is None else 0.98 * ema + 0.02 * loss_value
        losses.append((at_step, round(time.perf_counter() - t0, 3), loss_value))

    while True:
        elapsed = time.perf_counter() - t0
        progress = progress0 + (1.0 - progress0) * min(1.0, elapsed / budget_s)
        if plan.max_steps is not None:  # steps in this run
            progress = max(progress, (step - first_step) / plan.max_steps)
            if step - first_step >= plan.max_steps:
                break
        if elapsed >= budget_s:
            break
        key, sub = jax.random.split(key)
        rate = learning_rate(lr, step, progress, plan.warmup_steps)
        params, opt_state, loss = step_fn(params, opt_state, frozen, data, sub, jnp.float32(rate))
        if pending is not None:  # one step in flight: the host waits on the previous loss
            record(float(pending), step - 1)
        pending = loss
        step += 1
        now = time.perf_counter()
        if first_step_s is None:
            jax.block_until_ready(loss)
            first_step_s = time.perf_counter() - t0
            print(f"[{name}] first step (compile) {first_step_s:.1f}s", flush=True)
        elif now - last_print > 5.0:
            done = len(losses)
            rate_sps = done / max(now - t0 - first_step_s, 1e-9)
            print(f"[{name}] step {step} | {rate_sps:.1f} steps/s | loss {ema:.4f} | lr {rate:.2e} | "
                  f"ETA {max(0.0, budget_s - (now - t0)):.0f}s", flush=True)
            last_print = now
        if now - last_ckpt > plan.checkpoint_every_s:
            save_checkpoint(checkpoint_path, {"params": params, "opt": opt_state},
                            {"stage": name, "step": step, "progress": progress, "done": False,
                             "restarts": restarts})
            last_ckpt = now
    if pending is not None:
        record(float(pending), step - 1)
    seconds = time.perf_counter() - t0
    save_checkpoint(checkpoint_path, {"params": params, "opt": opt_state},
                    {"stage": name, "step": step, "progress": 1.0, "done": True, "restarts": restarts})
    print(f"[{name}] done: {step} steps in {seconds:.1f}s, loss {ema if ema is not None else float('nan'):.4f}",
          flush=True)
    log["stages"][name] = {"steps": step, "seconds": round(seconds, 2), "compile_s": round(first_step_s or 0.0, 2),
                           "final_loss": ema, "losses": losses[:: max(1, len(losses) // 400)]}
    return params, opt_state


class Clock:
    """Shares what is left of the total budget among the stages still to run."""

    def __init__(self, budget_s: float, plan: Plan):
        self.deadline = time.perf_counter() + budget_s
        self.plan = plan

    def budget_for(self, name: str) -> float:
        shares = dict(self.plan.shares)
        names = [n for n, _ in self.plan.shares]
        remaining = sum(shares[n] for n in names[names.index(name):])
        left = self.deadline - time.perf_counter() - self.plan.export_reserve_s
        return max(1.0, left * shares[name] / remaining)


# --- export -------------------------------------------------------------------------------

def rescale_latents(vae, factor: float):
    """A copy of `vae` whose latents are `factor` times the original's, decoding identically.

    The latent mean comes out of the linear 1x1 `quant_conv` and goes into the linear
    `post_quant_conv`, so scaling the one and unscaling the other is exact.
    """
    vae = nnx.clone(vae)
    c = vae.config.latent_channels
    kernel, bias = vae.quant_conv.kernel.get_value(), vae.quant_conv.bias.get_value()
    vae.quant_conv.kernel.set_value(kernel.at[..., :c].multiply(factor))
    vae.quant_conv.bias.set_value(bias.at[:c].multiply(factor).at[c:].add(2.0 * math.log(factor)))
    vae.post_quant_conv.kernel.set_value(vae.post_quant_conv.kernel.get_value() / factor)
    return vae


def _write_component(folder: str, module, config: dict, weights_name: str, dtype) -> int:
    write_json(os.path.join(folder, "config.json"), config)
    save_safetensors(module, os.path.join(folder, weights_name), dtype=dtype)
    return os.path.getsize(os.path.join(folder, weights_name))


def export_family(folder: str, *, kind: str, text, unet, vae, vocab_size: int, scaling_factor: float,
                  dtype=np.float16) -> dict:
    """Writes one diffusers pipeline folder; kind "base" (StableDiffusionPipeline) or "x4"."""
    if os.path.exists(folder):
        shutil.rmtree(folder)
    sizes = {}
    unet_config = dict(BASE_UNET_CONFIG if kind == "base" else X4_UNET_CONFIG,
                       _diffusers_version=DIFFUSERS_VERSION)
    vae_config = dict(VAE_CONFIG, scaling_factor=float(scaling_factor), _diffusers_version=DIFFUSERS_VERSION)
    if kind == "x4":
        vae_config["sample_size"] = 256
    sizes["unet"] = _write_component(os.path.join(folder, "unet"), unet, unet_config,
                                     "diffusion_pytorch_model.safetensors", dtype)
    sizes["vae"] = _write_component(os.path.join(folder, "vae"), vae, vae_config,
                                    "diffusion_pytorch_model.safetensors", dtype)
    sizes["text_encoder"] = _write_component(os.path.join(folder, "text_encoder"), text,
                                             text_config(vocab_size), "model.safetensors", dtype)
    train_data.write_tokenizer(os.path.join(folder, "tokenizer"), TOKENS)
    index = {
        "_diffusers_version": DIFFUSERS_VERSION,
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None], "feature_extractor": [None, None],
    }
    if kind == "base":
        index.update(_class_name="StableDiffusionPipeline", requires_safety_checker=False,
                     image_encoder=[None, None], scheduler=["diffusers", BASE_SCHEDULER["_class_name"]])
        write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), BASE_SCHEDULER)
    else:
        index.update(_class_name="StableDiffusionUpscalePipeline", max_noise_level=MAX_NOISE_LEVEL,
                     watermarker=[None, None], scheduler=["diffusers", X4_SCHEDULER["_class_name"]],
                     low_res_scheduler=["diffusers", LOW_RES_SCHEDULER["_class_name"]])
        write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), X4_SCHEDULER)
        write_json(os.path.join(folder, "low_res_scheduler", "scheduler_config.json"), LOW_RES_SCHEDULER)
    write_json(os.path.join(folder, "model_index.json"), index)
    write_json(os.path.join(folder, render_defaults.FILE), BASE_RENDER_DEFAULTS if kind == "base" else X4_RENDER_DEFAULTS)
    return sizes


# --- main ---------------------------------------------------------------------------------

def _encode_all(vae_module, images_u8: np.ndarray, batch: int, *, round_trip: bool = False) -> np.ndarray:
    """Posterior means of uint8 images, in batches (the last one padded, never recompiled);
    with `round_trip`, the uint8 images decoded from those means instead."""
    graphdef, state = nnx.split(vae_module)

    @jax.jit
    def encode(state, x):
        vae = nnx.merge(graphdef, state)
        mean = vae.encode(_to_unit(x))[0]
        if not round_trip:
            return mean
        return to_uint8(vae.decode(mean))

    out = []
    for s in range(0, len(images_u8), batch):
        chunk = images_u8[s:s + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
        out.append(np.asarray(encode(state, jnp.asarray(chunk)))[:batch - pad])
    return np.concatenate(out)


def _token_ids(tokenizer, captions: list[str]) -> np.ndarray:
    unique = sorted(set(captions))
    tokens = tokenize(tokenizer, unique, max_length=TOKENS)
    if any(tokens.truncated):
        raise ValueError("a training caption is longer than 77 tokens: the tokenizer does not cover the world")
    row = {c: i for i, c in enumerate(unique)}
    return tokens.ids[[row[c] for c in captions]]


def _stage_start(checkpoint_dir: str | None, name: str, templates: dict, reopen: tuple = ()):
    """(trees, info) saved for stage `name` under `checkpoint_dir`, or (None, None).

    A finished stage named in `reopen` trains on: a warm restart of its cosine schedule at
    half the peak learning rate of its previous cycle, from its saved weights and optimizer.
    """
    if not checkpoint_dir:
        return None, None
    path = os.path.join(checkpoint_dir, f"{name}.npz")
    if not os.path.exists(path):
        return None, None
    trees, info = load_checkpoint(path, templates)
    if info["done"] and name in reopen:
        info = dict(info, done=False, progress=0.0, restarts=info.get("restarts", 0) + 1)
        print(f"[{name}] continuing from {path} at step {info['step']}, peak learning rate "
              f"x{restart_scale(info)}", flush=True)
    else:
        print(f"[{name}] resuming from {path} at step {info['step']}{' (done)' if info['done'] else ''}",
              flush=True)
    return trees, info


def _cached_latents(checkpoint_dir: str | None, key: dict):
    """(latents64, latents256) saved under `checkpoint_dir` for the same VAE and data, or None."""
    path = os.path.join(checkpoint_dir, "latents.npz") if checkpoint_dir else None
    if not path or not os.path.exists(path) or checkpoint_info(path) != key:
        return None
    print(f"[latents] reusing {path}", flush=True)
    with np.load(path, allow_pickle=False) as f:
        return f["latents64"], f["latents256"]


def restart_scale(info: dict | None) -> float:
    return 0.5 ** (info or {}).get("restarts", 0)


def train(out: str, *, plan: Plan, budget_s: float, seed: int = 0, workers: int | None = None,
          resume: str | None = None, reopen: tuple = (), export_dtype=np.float16) -> dict:
    """Runs every stage and writes OUT/default, OUT/default-x4, OUT/train_log.json; returns the log."""
    clock = Clock(budget_s, plan)
    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    ckpt_dir = os.path.join(out, "checkpoint")
    os.makedirs(ckpt_dir, exist_ok=True)
    resume_dir = os.path.join(resume, "checkpoint") if resume else None
    log = {"plan": dataclasses.asdict(plan), "budget_s": budget_s, "seed": seed, "backend": jax.default_backend(),
           "devices": [str(d) for d in jax.devices()], "compute_dtype": jnp.dtype(compute_dtype()).name,
           "stages": {}}
    previous_log = os.path.join(resume, "train_log.json") if resume else None
    if previous_log and os.path.exists(previous_log):
        with open(previous_log) as f:
            previous = json.load(f)
        # What the earlier runs trained stays on record beside this run's stages.
        log["earlier_runs"] = previous.get("earlier_runs", []) + [
            {k: previous[k] for k in ("budget_s", "total_s", "stages") if k in previous}]

    # Data and tokenizer.
    workers = workers or min(16, os.cpu_count() or 1)
    t = time.perf_counter()
    captions, images64, images256 = train_data.generate(seed, plan.count, plan.count_256, workers)
    tok_dir = os.path.join(out, "tokenizer")
    vocab_size = train_data.write_tokenizer(tok_dir, TOKENS)
    tokenizer = load_tokenizer(tok_dir)
    ids = _token_ids(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""], max_length=TOKENS).ids[0]
    log["stages"]["data"] = {"seconds": round(time.perf_counter() - t, 2), "examples": len(captions),
                             "examples_256": len(images256), "workers": workers}
    print(f"[data] {len(captions)} examples ({len(images256)} at 256) in {time.perf_counter() - t:.1f}s "
          f"with {workers} processes", flush=True)

    models = build_models(vocab_size, seed)
    log["params"] = {name: param_count(m.params) for name, m in models.items()}
    print("[models] parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in log["params"].items()), flush=True)
    key = jax.random.key(seed)
    schedules = training_schedules()
    schedule, x4_schedule, low_res_schedule = schedules["base"], schedules["x4"], schedules["low_res"]

    # VAE.
    tx = make_optimizer(plan.vae_lr)
    params, opt = models["vae"].params, tx.init(models["vae"].params)
    saved, info = _stage_start(resume_dir, "vae", {"params": params, "opt": opt}, reopen)
    if saved:
        params, opt = saved["params"], saved["opt"]
    if not (info and info["done"]):
        data = {"images64": jnp.asarray(images64), "images256": jnp.asarray(images256)}
        params, opt = run_stage("vae", make_step(vae_loss(models, plan.vae_batch), tx), params, opt, None, data,
                                lr=plan.vae_lr * restart_scale(info), plan=plan, budget_s=clock.budget_for("vae"),
                                key=jax.random.fold_in(key, 1), checkpoint_path=os.path.join(ckpt_dir, "vae.npz"),
                                start=info, log=log)
        del data
    else:
        save_checkpoint(os.path.join(ckpt_dir, "vae.npz"), {"params": params, "opt": opt}, info)
    models["vae"].params = params
    vae = models["vae"].module()
    t = time.perf_counter()
    # Encoding every example takes minutes on a CPU: a resumed run reuses the latents when
    # they came from the same VAE checkpoint and the same data.
    latents_key = {"vae_step": checkpoint_info(os.path.join(ckpt_dir, "vae.npz"))["step"], "seed": seed,
                   "count": plan.count, "count_256": plan.count_256}
    cached = _cached_latents(resume_dir, latents_key)
    if cached is None:
        latents64 = _encode_all(vae, images64, 256 if len(images64) >= 256 else len(images64))
        latents256 = _encode_all(vae, images256, 32 if len(images256) >= 32 else len(images256))
    else:
        latents64, latents256 = cached
    save_checkpoint(os.path.join(ckpt_dir, "latents.npz"), {"latents64": latents64, "latents256": latents256},
                    latents_key)
    scaling_factor = float(1.0 / max(latents64.std(), 1e-6))
    log["scaling_factor"] = scaling_factor
    print(f"[latents] encoded in {time.perf_counter() - t:.1f}s; scaling_factor {scaling_factor:.4f}", flush=True)

    # Text encoder + base UNet.
    tx = make_optimizer(plan.base_lr)
    params = {"text": models["text"].params, "unet": models["base"].params}
    opt = tx.init(params)
    saved, info = _stage_start(resume_dir, "base", {"params": params, "opt": opt}, reopen)
    if saved:
        params, opt = saved["params"], saved["opt"]
    if not (info and info["done"]):
        data = {"latents64": jnp.asarray(latents64 * scaling_factor), "ids": jnp.asarray(ids),
                "empty_ids": jnp.asarray(empty_ids)}
        params, opt = run_stage("base", make_step(base_loss(models, plan.base_batch, schedule), tx), params, opt,
                                None, data, lr=plan.base_lr * restart_scale(info), plan=plan, budget_s=clock.budget_for("base"),
                                key=jax.random.fold_in(key, 2), checkpoint_path=os.path.join(ckpt_dir, "base.npz"),
                                start=info, log=log)
        del data
    else:
        save_checkpoint(os.path.join(ckpt_dir, "base.npz"), {"params": params, "opt": opt}, info)
    models["text"].params, models["base"].params = params["text"], params["unet"]

    # x4 upscaler (text encoder frozen).
    tx = make_optimizer(plan.x4_lr)
    params, opt = models["x4"].params, tx.init(models["x4"].params)
    saved, info = _stage_start(resume_dir, "x4", {"params": params, "opt": opt}, reopen)
    if saved:
        params, opt = saved["params"], saved["opt"]
    if not (info and info["done"]):
        n256 = len(images256)
        # The upscaler's input when rendering is the base stage's decoded image, with the
        # VAE's own softening (small triangles lose their tips): it learns from such images.
        low_res = _encode_all(vae, images64[:n256], 32 if n256 >= 32 else n256, round_trip=True)
        data = {"latents256": jnp.asarray(latents256 * scaling_factor), "low_res": jnp.asarray(low_res),
                "ids256": jnp.asarray(ids[:n256]), "empty_ids": jnp.asarray(empty_ids)}
        step_fn = make_step(x4_loss(models, plan.x4_batch, plan.x4_crop, x4_schedule, low_res_schedule), tx)
        params, opt = run_stage("x4", step_fn, params, opt, models["text"].params, data, lr=plan.x4_lr * restart_scale(info),
                                plan=plan, budget_s=clock.budget_for("x4"), key=jax.random.fold_in(key, 3),
                                checkpoint_path=os.path.join(ckpt_dir, "x4.npz"), start=info, log=log)
        del data
    else:
        save_checkpoint(os.path.join(ckpt_dir, "x4.npz"), {"params": params, "opt": opt}, info)
    models["x4"].params = params

    # Export.
    t = time.perf_counter()
    text = models["text"].module()
    common = dict(text=text, vocab_size=vocab_size, dtype=export_dtype)
    x4_vae = rescale_latents(vae, scaling_factor / X4_SCALING_FACTOR)
    sizes = {"default": export_family(os.path.join(out, "default"), kind="base", vae=vae,
                                      scaling_factor=scaling_factor, unet=models["base"].module(), **common),
             "default-x4": export_family(os.path.join(out, "default-x4"), kind="x4", vae=x4_vae,
                                         scaling_factor=X4_SCALING_FACTOR, unet=models["x4"].module(), **common)}
    log["file_bytes"] = sizes
    log["total_bytes"] = int(sum(v for s in sizes.values() for v in s.values()))
    log["stages"]["export"] = {"seconds": round(time.perf_counter() - t, 2)}
    log["total_s"] = round(time.perf_counter() - t_start, 2)
    log["model_configs"] = {"vae": VAE_CONFIG, "text_encoder": text_config(vocab_size),
                            "unet": BASE_UNET_CONFIG, "x4_unet": X4_UNET_CONFIG}
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(f"[export] {out}/default and {out}/default-x4: {log['total_bytes'] / 1e6:.1f} MB of weights; "
          f"total {log['total_s']:.1f}s", flush=True)
    return log


def parse_shares(text: str, parser: argparse.ArgumentParser) -> tuple:
    """`vae=0.2,base=0.5,x4=0.3` -> (("vae", 0.2), ("base", 0.5), ("x4", 0.3)), every stage named once."""
    stages = [name for name, _ in Plan.shares]
    try:
        given = {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        parser.error(f"--shares {text!r}: write stage=fraction pairs, e.g. vae=0.2,base=0.5,x4=0.3")
    if sorted(given) != sorted(stages) or min(given.values()) <= 0:
        parser.error(f"--shares {text!r}: give each of {', '.join(stages)} once, with a fraction above 0")
    total = sum(given.values())
    return tuple((name, given[name] / total) for name in stages)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (default/, default-x4/, train_log.json)")
    parser.add_argument("--budget-seconds", type=float, default=300.0,
                        help="wall time for everything, data to export (default 300)")
    parser.add_argument("--quick", action="store_true", help="tiny data and 2 steps a stage, for CPU tests")
    parser.add_argument("--steps", type=int, default=None, help="at most this many steps per stage in this run")
    parser.add_argument("--count", type=int, default=None, help="64x64 training examples")
    parser.add_argument("--count-256", type=int, default=None, help="of which also kept at 256x256")
    parser.add_argument("--workers", type=int, default=None, help="drawing processes (default: CPUs, max 16)")
    parser.add_argument("--batch", type=int, default=None,
                        help="base batch size; the VAE and x4 stages take half (CPU runs want small ones)")
    parser.add_argument("--shares", default=None,
                        help="the budget's split among stages, e.g. vae=0.2,base=0.5,x4=0.3 (the default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", default=None, help="an earlier --out folder to continue from")
    parser.add_argument("--continue", dest="reopen", default="",
                        help="with --resume: finished stages to train on, e.g. base,x4 (a warm restart "
                             "at half the previous peak learning rate)")
    parser.add_argument("--export-dtype", choices=("float16", "float32"), default="float16")
    args = parser.parse_args(argv)

    plan = QUICK if args.quick else Plan()
    overrides = {k: v for k, v in (("max_steps", args.steps), ("count", args.count),
                                   ("count_256", args.count_256)) if v is not None}
    if args.batch:
        overrides.update(base_batch=args.batch, vae_batch=max(1, args.batch // 2), x4_batch=max(1, args.batch // 2))
    if args.shares:
        overrides["shares"] = parse_shares(args.shares, parser)
    plan = dataclasses.replace(plan, **overrides)
    if plan.count < 1 or not 1 <= plan.count_256 <= plan.count:
        parser.error(f"--count {plan.count} / --count-256 {plan.count_256}: need 1 <= count-256 <= count")
    if args.resume and not os.path.isdir(os.path.join(args.resume, "checkpoint")):
        parser.error(f"--resume {args.resume}: no checkpoint/ folder there; pass an earlier --out folder")
    reopen = tuple(s.strip() for s in args.reopen.split(",") if s.strip())
    stages = [name for name, _ in Plan.shares]
    if reopen and not args.resume:
        parser.error("--continue needs --resume: the stages to continue come from an earlier --out folder")
    if set(reopen) - set(stages):
        parser.error(f"--continue {args.reopen}: stages are {', '.join(stages)}")
    train(args.out, plan=plan, budget_s=args.budget_seconds, seed=args.seed, workers=args.workers,
          resume=args.resume, reopen=reopen, export_dtype=np.dtype(args.export_dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
