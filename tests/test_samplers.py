"""Samplers against diffusers' PyTorch schedulers: whole trajectories, img2img starts, noising.

The denoiser is a fixed fake model, out = 0.3 * x + 0.1 * sin(t / 100), evaluated the same
way on both sides. Stochastic samplers get our per-step noise injected into diffusers by
replacing `randn_tensor` in the scheduler modules.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete, scheduling_lcm

from jaxdiff.samplers import (
    KARRAS_SAMPLERS,
    SAMPLER_NAMES,
    NoiseSchedule,
    UnsupportedConfig,
    add_noise,
    host_start_steps,
    initial_latents,
    make_sampler,
    noise_to_step,
    sample,
    sample_trajectory,
    start_step_for_strength,
)

DIFFUSERS_CLASS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "lcm": LCMScheduler,
}
# Stable Diffusion 1.x's scheduler_config.json (a PNDM config; no timestep_spacing stated).
SD_CONFIG = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
    "trained_betas": None,
}
SHAPE = (2, 3, 5, 7)
NUM_STEPS = 5
# Both sides run in float32; ours folds each step into float64-derived coefficients and
# computes the schedule in float64 where diffusers uses float32 tables. Errors are
# relative to the trajectory's scale (Euler latents reach ~15).
RTOL = 5e-6
ATOL_PER_SCALE = 5e-6

pytestmark = pytest.mark.parity
# The samplers whose steps follow timestep_spacing; LCM takes its own from the
# distillation's grid (tested on its own below).
SPACED_SAMPLERS = [n for n in SAMPLER_NAMES if n != "lcm"]


def fake_model_jax(x, t, i):
    return 0.3 * x + 0.1 * jnp.sin(t.astype(jnp.float32) / 100.0).reshape((-1,) + (1,) * (x.ndim - 1))


def fake_model_torch(x, t):
    return 0.3 * x + 0.1 * torch.sin(torch.as_tensor(t, dtype=torch.float32) / 100.0)


def our_noise(keys, num_steps, shape):
    """The noise contract: sample b draws normal(fold_in(keys[b], i)) at step i."""
    return np.stack([
        np.asarray(jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape))(keys))
        for i in range(num_steps)
    ])


def diffusers_trajectory(
    monkeypatch, name, config, num_steps, latents, *, noises=None, t_start=0, karras=False
):
    """diffusers' scheduler loop from step t_start (as its img2img pipelines run it)."""
    extra = {"use_karras_sigmas": True} if karras else {}
    sched = DIFFUSERS_CLASS[name].from_config({**config, **extra})
    sched.set_timesteps(num_steps)
    if t_start and hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start)
    current = {"step": None}

    def injected_randn(shape, **kwargs):
        return torch.from_numpy(noises[current["step"]]).reshape(shape)

    for module in (scheduling_ddpm, scheduling_euler_ancestral_discrete, scheduling_lcm):
        monkeypatch.setattr(module, "randn_tensor", injected_randn)
    x = torch.from_numpy(np.array(latents, np.float32))
    trajectory = []
    for k, t in enumerate(sched.timesteps[t_start:]):
        current["step"] = t_start + k
        out = fake_model_torch(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x).prev_sample
        trajectory.append(x.numpy().copy())
    return sched, np.stack(trajectory)


def assert_trajectories_close(ours, theirs):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    scale = max(1.0, float(np.abs(theirs).max()))
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL_PER_SCALE * scale)


def make_case(name, prediction_type, spacing, karras=False, num_steps=NUM_STEPS):
    config = {**SD_CONFIG, "prediction_type": prediction_type}
    if spacing is not None:
        config["timestep_spacing"] = spacing
    schedule = NoiseSchedule.from_config(config)
    return config, make_sampler(name, schedule, num_steps, karras_sigmas=karras)


def keys_for(batch, seed=0, impl="rbg"):
    # The noise contract holds for any key type; rbg keys compile far faster on CPU than
    # threefry, which the mixed-start test keeps covering.
    return jax.random.split(jax.random.key(seed, impl=impl), batch)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", SPACED_SAMPLERS)
def test_trajectory_matches_diffusers(monkeypatch, name, prediction_type, spacing):
    config, sampler = make_case(name, prediction_type, spacing)
    keys = keys_for(SHAPE[0])
    noise = np.asarray(jax.random.normal(jax.random.key(1), SHAPE))
    x = initial_latents(sampler, noise)
    sched, theirs = diffusers_trajectory(
        monkeypatch, name, config, NUM_STEPS, x, noises=our_noise(keys, NUM_STEPS, SHAPE[1:])
    )
    np.testing.assert_array_equal(sampler.timesteps, sched.timesteps.numpy().astype(np.float64))
    np.testing.assert_allclose(sampler.init_noise_sigma, float(sched.init_noise_sigma), rtol=1e-5)
    assert_trajectories_close(sample_trajectory(sampler, fake_model_jax, x, keys), theirs)


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["dpmpp_2m", "euler"])
def test_karras_trajectory_matches_diffusers(monkeypatch, name, prediction_type, spacing):
    config, sampler = make_case(name, prediction_type, spacing, karras=True, num_steps=6)
    x = initial_latents(sampler, jax.random.normal(jax.random.key(2), SHAPE))
    sched, theirs = diffusers_trajectory(monkeypatch, name, config, 6, x, karras=True)
    # diffusers' float32 beta tables (sigma off by up to 1.3e-5 relative at t=0) shift the
    # fractional timesteps a log-sigma interpolation finds by ~1e-5 relative.
    np.testing.assert_allclose(sampler.timesteps, sched.timesteps.numpy(), rtol=3e-5, atol=1e-6)
    assert_trajectories_close(sample_trajectory(sampler, fake_model_jax, x, None), theirs)


# LCM's img2img respaces its grid by strength (LCMScheduler.set_timesteps(strength=)), not
# by starting later on the txt2img steps: tested on its own below.
@pytest.mark.parametrize("name", SPACED_SAMPLERS)
def test_img2img_start_matches_diffusers(monkeypatch, name):
    config, sampler = make_case(name, "epsilon", None)
    x0 = jax.random.normal(jax.random.key(3), SHAPE)
    noise = jax.random.normal(jax.random.key(4), SHAPE)
    keys = keys_for(SHAPE[0], seed=5)
    start = start_step_for_strength(NUM_STEPS, [0.6, 0.6])
    t_start = int(start[0])
    assert t_start == 2

    x = initial_latents(sampler, noise, x0, start)
    # diffusers' img2img: set_timesteps, timesteps[t_start:], add_noise at the first of them.
    sched = DIFFUSERS_CLASS[name].from_config(config)
    sched.set_timesteps(NUM_STEPS)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start)
    first_t = sched.timesteps[t_start : t_start + 1].repeat(SHAPE[0])
    theirs_x = sched.add_noise(torch.from_numpy(np.array(x0)), torch.from_numpy(np.array(noise)), first_t)
    np.testing.assert_allclose(np.asarray(x), theirs_x.numpy(), rtol=1e-5, atol=1e-5)

    _, theirs = diffusers_trajectory(
        monkeypatch, name, config, NUM_STEPS, x, noises=our_noise(keys, NUM_STEPS, SHAPE[1:]), t_start=t_start
    )
    ours = np.asarray(sample_trajectory(sampler, fake_model_jax, x, keys, start_step=start))
    np.testing.assert_array_equal(ours[:t_start], np.broadcast_to(np.asarray(x), ours[:t_start].shape))
    assert_trajectories_close(ours[t_start:], theirs)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler_a"])
def test_mixed_start_steps_equal_each_sample_alone(name):
    _, sampler = make_case(name, "v_prediction", None)
    shape = (3,) + SHAPE[1:]
    x0 = jax.random.normal(jax.random.key(6), shape)
    noise = jax.random.normal(jax.random.key(7), shape)
    keys = keys_for(3, seed=8, impl="threefry2x32")
    start = jnp.array([0, 2, 4], jnp.int32)
    run = jax.jit(sample, static_argnums=(0, 1))
    batched = run(sampler, fake_model_jax, initial_latents(sampler, noise, x0, start), keys, start_step=start)
    for b in range(3):
        s = start[b : b + 1]
        alone = run(sampler, fake_model_jax, initial_latents(sampler, noise[b : b + 1], x0[b : b + 1], s),
                    keys[b : b + 1], start_step=s)
        np.testing.assert_allclose(np.asarray(batched[b : b + 1]), np.asarray(alone), rtol=1e-6, atol=1e-6)


# euler_a and ddpm draw noise at each step: the known region must still be exactly the
# re-noised init image after the blend, with no step noise on top.
@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "euler_a", "ddpm"])
def test_inpaint_blend_matches_diffusers_loop(monkeypatch, name):
    config, sampler = make_case(name, "epsilon", None)
    x0 = jax.random.normal(jax.random.key(9), SHAPE)
    noise = jax.random.normal(jax.random.key(10), SHAPE)
    mask = (jnp.arange(SHAPE[-1]) < 3).astype(jnp.float32)  # 1 = repaint
    keys = keys_for(SHAPE[0], seed=24) if sampler.stochastic else None
    step_noise = our_noise(keys, NUM_STEPS, SHAPE[1:]) if sampler.stochastic else None

    def blend(x, i):
        return (1 - mask) * noise_to_step(sampler, x0, noise, i) + mask * x

    x = initial_latents(sampler, noise)
    ours = sample_trajectory(sampler, fake_model_jax, x, keys, after_step=blend)

    # As diffusers' inpaint pipeline on a 4-channel UNet: step, then put back the known
    # region re-noised to the next step's t.
    sched = DIFFUSERS_CLASS[name].from_config(config)
    sched.set_timesteps(NUM_STEPS)
    current = {"step": 0}
    for module in (scheduling_ddpm, scheduling_euler_ancestral_discrete):
        monkeypatch.setattr(module, "randn_tensor",
                            lambda shape, **kw: torch.from_numpy(step_noise[current["step"]]).reshape(shape))
    tx0, tnoise, tmask = (torch.from_numpy(np.array(a)) for a in (x0, noise, mask))
    xt = torch.from_numpy(np.array(x))
    theirs = []
    for i, t in enumerate(sched.timesteps):
        current["step"] = i
        xt = sched.step(fake_model_torch(sched.scale_model_input(xt, t), t), t, xt).prev_sample
        known = tx0
        if i < NUM_STEPS - 1:
            known = sched.add_noise(tx0, tnoise, sched.timesteps[i + 1 : i + 2].repeat(SHAPE[0]))
        xt = (1 - tmask) * known + tmask * xt
        theirs.append(xt.numpy().copy())
    assert_trajectories_close(ours, np.stack(theirs))


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_add_noise_matches_diffusers(beta_schedule):
    config = {"beta_schedule": beta_schedule, "clip_sample": False, "variance_type": "fixed_small"}
    schedule = NoiseSchedule.from_config(config)
    theirs_sched = DDPMScheduler.from_config(config)
    # Ours is float64; diffusers' float32 cumulative product drifts to ~1.3e-5 relative by t=999.
    np.testing.assert_allclose(schedule.alphas_cumprod, theirs_sched.alphas_cumprod.numpy(), rtol=3e-5)
    x0 = jax.random.normal(jax.random.key(11), (4, 3, 5))
    noise = jax.random.normal(jax.random.key(12), (4, 3, 5))
    t = jnp.array([0, 250, 998, 999])
    ours = jax.jit(add_noise, static_argnums=0)(schedule, x0, noise, t)
    theirs = theirs_sched.add_noise(
        torch.from_numpy(np.array(x0)), torch.from_numpy(np.array(noise)), torch.from_numpy(np.array(t))
    )
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SPACED_SAMPLERS)
def test_trailing_spacing_runs_exactly_num_steps(monkeypatch, name):
    # np.arange(1000, 0, -1000 / 61) yields 62 points: diffusers then appends a step at t = -1.
    # Its first 61 timesteps are the schedule; DDIM and DDPM reach t = 0 at the 61st.
    n = 61
    config, sampler = make_case(name, "epsilon", "trailing", num_steps=n)
    shape = (1, 2, 3)
    keys = keys_for(1)
    x = initial_latents(sampler, jax.random.normal(jax.random.key(14), shape))
    sched, theirs = diffusers_trajectory(monkeypatch, name, config, n, x, noises=our_noise(keys, n + 1, shape[1:]))
    assert sched.timesteps[-1] == -1
    np.testing.assert_array_equal(sampler.timesteps, sched.timesteps[:n].numpy())
    ours = np.asarray(sample_trajectory(sampler, fake_model_jax, x, keys))
    same = n if name in ("ddim", "ddpm") else n - 1
    assert_trajectories_close(ours[:same], theirs[:same])


@pytest.mark.parametrize(
    "name, options",
    [
        ("dpmpp_2m", {"solver_type": "heun"}),
        ("dpmpp_2m", {"solver_order": 1}),
        # A DEIS / UniPC name, which diffusers' DPM-Solver reads as midpoint.
        ("dpmpp_2m", {"solver_type": "bh2"}),
        # No effect while the final sigma is zero.
        ("dpmpp_2m", {"lower_order_final": False, "euler_at_final": True}),
        ("dpmpp_2m", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
        ("euler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
        # Bounds past the schedule's own sigmas (SD's run 0.029 to 14.6): the model is fed
        # timesteps clamped to the training range, 999 and 0, as diffusers does.
        ("dpmpp_2m", {"use_karras_sigmas": True, "sigma_min": 0.002, "sigma_max": 20.0}),
        ("euler", {"use_karras_sigmas": True, "sigma_min": 0.002, "sigma_max": 20.0}),
        # A cosine schedule's Karras timesteps stay fractional. (diffusers' DPM-Solver means to
        # keep them so, then casts them to int64: 998 three times over at 6 steps, where its
        # step count goes wrong; jaxdiff's dpmpp_2m feeds the fractions.)
        ("euler", {"use_karras_sigmas": True, "beta_schedule": "squaredcos_cap_v2"}),
        # Other classes' options do not apply, as in diffusers' from_config.
        ("ddim", {"solver_order": 3, "final_sigmas_type": "sigma_min", "use_exponential_sigmas": True}),
        ("euler_a", {"interpolation_type": "log_linear", "final_sigmas_type": "sigma_min",
                     "timestep_type": "continuous"}),
        # EulerDiscreteScheduler's continuous timesteps change a v-prediction model's input only.
        ("euler", {"timestep_type": "continuous", "prediction_type": "epsilon"}),
    ],
)
def test_scheduler_options_match_diffusers(monkeypatch, name, options):
    config = {**SD_CONFIG, "prediction_type": "v_prediction", **options}
    karras = bool(options.get("use_karras_sigmas"))
    sampler = make_sampler(name, NoiseSchedule.from_config(config), 6, karras_sigmas=karras)
    keys = keys_for(SHAPE[0])
    x = initial_latents(sampler, jax.random.normal(jax.random.key(15), SHAPE))
    sched, theirs = diffusers_trajectory(monkeypatch, name, config, 6, x, noises=our_noise(keys, 6, SHAPE[1:]))
    np.testing.assert_allclose(sampler.timesteps, sched.timesteps.numpy(), rtol=3e-5, atol=1e-6)
    assert_trajectories_close(sample_trajectory(sampler, fake_model_jax, x, keys), theirs)


def test_dpmpp_karras_on_a_cosine_schedule_feeds_the_model_fractional_timesteps():
    """A cosine schedule's Karras sigmas crowd near t = 999: rounded, several steps would feed
    the model one timestep (diffusers keeps them unrounded for this schedule, then cuts them
    to int64: 998 three times at 6 steps, where its step count goes wrong). jaxdiff keeps
    the fractions."""
    config = {**SD_CONFIG, "use_karras_sigmas": True, "beta_schedule": "squaredcos_cap_v2"}
    sampler = make_sampler("dpmpp_2m", NoiseSchedule.from_config(config), 6, karras_sigmas=True)
    theirs = DPMSolverMultistepScheduler.from_config(config)
    theirs.set_timesteps(6)
    t = np.asarray(sampler.timesteps)
    assert len(np.unique(np.round(t))) < len(t) == len(np.unique(t))  # rounding would merge steps
    np.testing.assert_allclose(t, theirs.timesteps.numpy(), atol=1.0)


# Other checkpoints' scheduler_config.json, as published (fields diffusers saves that no
# sampler here reads are left out). SD 2.x (768) and the x4 upscaler: DDIM, v-prediction.
SD2_V_CONFIG = {**SD_CONFIG, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
X4_CONFIG = {**SD2_V_CONFIG, "beta_start": 0.0001, "beta_end": 0.02}
LCM_CONFIG = {**SD_CONFIG, "_class_name": "LCMScheduler", "original_inference_steps": 50, "set_alpha_to_one": True,
              "timestep_scaling": 10.0, "timestep_spacing": "leading", "thresholding": False}
DPM_KARRAS_CONFIG = {**SD_CONFIG, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
                     "solver_order": 2, "solver_type": "midpoint", "use_karras_sigmas": True,
                     "final_sigmas_type": "zero", "lower_order_final": True, "euler_at_final": False,
                     "lambda_min_clipped": -float("inf"), "timestep_spacing": "linspace", "variance_type": None}
EULER_TRAILING_CONFIG = {**SD_CONFIG, "_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
                         "timestep_spacing": "trailing", "use_karras_sigmas": False}


@pytest.mark.parametrize(
    "config, name, num_steps",
    [
        (SD2_V_CONFIG, "ddim", 7), (SD2_V_CONFIG, "euler_a", 7), (X4_CONFIG, "ddim", 7), (X4_CONFIG, "dpmpp_2m", 7),
        (LCM_CONFIG, "lcm", 7), (LCM_CONFIG, "ddim", 7),
        # 61 Karras steps round two timesteps to one integer (t = 1 twice).
        (DPM_KARRAS_CONFIG, "dpmpp_2m", 61), (DPM_KARRAS_CONFIG, "euler", 7),
        (DPM_KARRAS_CONFIG, "euler_a", 7),  # EulerAncestralDiscreteScheduler has no Karras sigmas
        (EULER_TRAILING_CONFIG, "euler", 7), (EULER_TRAILING_CONFIG, "dpmpp_2m", 7),
    ],
)
def test_checkpoint_configs_match_diffusers(monkeypatch, config, name, num_steps):
    # Karras sigmas as the engine takes them: from the config, for the samplers that have them.
    karras = bool(config.get("use_karras_sigmas")) and name in KARRAS_SAMPLERS
    sampler = make_sampler(name, NoiseSchedule.from_config(config), num_steps, karras_sigmas=karras)
    shape = (1, 2, 3)
    keys = keys_for(1, seed=16)
    x = initial_latents(sampler, jax.random.normal(jax.random.key(17), shape))
    sched, theirs = diffusers_trajectory(
        monkeypatch, name, config, num_steps, x, noises=our_noise(keys, num_steps, shape[1:])
    )
    np.testing.assert_allclose(sampler.timesteps, sched.timesteps.numpy(), rtol=3e-5, atol=1e-6)
    assert_trajectories_close(sample_trajectory(sampler, fake_model_jax, x, keys), theirs)


# Zero terminal SNR (SD 2.1-style fine-tunes): every sampler's diffusers class rescales the
# betas; DPM-Solver and the Euler samplers keep the last alpha-bar at 2**-24, not 0.
ZERO_SNR_CONFIG = {**SD_CONFIG, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction",
                   "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_zero_terminal_snr_matches_diffusers(monkeypatch, name, spacing):
    config = {**ZERO_SNR_CONFIG, "timestep_spacing": spacing}
    schedule = NoiseSchedule.from_config(config)
    theirs_sched = DIFFUSERS_CLASS[name].from_config(config)
    assert schedule.alphas_cumprod[-1] == 0.0
    # diffusers' float32 rescaling loses digits near the end, where sqrt(alpha-bar) nears its last value.
    np.testing.assert_allclose(schedule.alphas_cumprod[:-1], theirs_sched.alphas_cumprod.numpy()[:-1], rtol=1e-4)
    sampler = make_sampler(name, schedule, NUM_STEPS)
    keys = keys_for(SHAPE[0], seed=18)
    x = initial_latents(sampler, jax.random.normal(jax.random.key(19), SHAPE))
    sched, theirs = diffusers_trajectory(monkeypatch, name, config, NUM_STEPS, x,
                                         noises=our_noise(keys, NUM_STEPS, SHAPE[1:]))
    np.testing.assert_array_equal(sampler.timesteps, sched.timesteps.numpy().astype(np.float64))
    np.testing.assert_allclose(sampler.init_noise_sigma, float(sched.init_noise_sigma), rtol=1e-5)
    if hasattr(sched, "sigmas"):  # Euler and DPM-Solver: ~4096 at the terminal step, not inf
        ours_sigmas = np.asarray(sampler.noise_level) / np.asarray(sampler.signal_level)
        np.testing.assert_allclose(ours_sigmas, sched.sigmas.numpy(), rtol=1e-4)
    ours = np.asarray(sample_trajectory(sampler, fake_model_jax, x, keys))
    if name in ("euler", "euler_a") and spacing != "leading":
        # Their first step takes latents ~4096 wide down to ~10 in float32 on both sides: the
        # difference is that cancellation's, a few float32 ulps of the starting latents.
        start = float(np.abs(np.asarray(x)).max())
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=8 * np.finfo(np.float32).eps * start)
    else:
        assert_trajectories_close(ours, theirs)


@pytest.mark.faults
@pytest.mark.parametrize("name", ["ddim", "ddpm", "lcm"])
def test_zero_terminal_snr_with_an_epsilon_model_at_the_last_step_is_named(name):
    schedule = NoiseSchedule.from_config({**ZERO_SNR_CONFIG, "prediction_type": "epsilon"})
    with pytest.raises(ValueError, match=r"steps from t=999.*rescale_betas_zero_snr.*no signal left") as info:
        make_sampler(name, schedule, 4)
    assert "false" not in str(info.value)
    for other in ("dpmpp_2m", "euler", "euler_a"):  # 2**-24 keeps those finite, as in diffusers
        make_sampler(other, schedule, 4)
    assert "dpmpp_2m, euler or euler_a" in str(info.value)
    assert ("timestep_spacing leading" in str(info.value)) == (name != "lcm")
    if name != "lcm":  # as the message says
        make_sampler(name, NoiseSchedule.from_config({**ZERO_SNR_CONFIG, "prediction_type": "epsilon",
                                                      "timestep_spacing": "leading"}), 4)


@pytest.mark.parametrize("clip_range", [1.0, 0.05])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["ddim", "ddpm", "lcm"])
def test_clip_sample_matches_diffusers(monkeypatch, name, prediction_type, clip_range):
    config = {**SD_CONFIG, "prediction_type": prediction_type, "clip_sample": True,
              "clip_sample_range": clip_range, "timestep_spacing": "leading"}
    sampler = make_sampler(name, NoiseSchedule.from_config(config), NUM_STEPS)
    assert sampler.clip_range == clip_range
    keys = keys_for(SHAPE[0], seed=20)
    x = initial_latents(sampler, jax.random.normal(jax.random.key(21), SHAPE))
    sched, theirs = diffusers_trajectory(monkeypatch, name, config, NUM_STEPS, x,
                                         noises=our_noise(keys, NUM_STEPS, SHAPE[1:]))
    np.testing.assert_array_equal(sampler.timesteps, sched.timesteps.numpy().astype(np.float64))
    ours = np.asarray(sample_trajectory(sampler, fake_model_jax, x, keys))
    assert_trajectories_close(ours, theirs)
    # The clipping bites: without it the trajectory is another.
    unclipped = make_sampler(name, NoiseSchedule.from_config({**config, "clip_sample": False}), NUM_STEPS)
    assert np.abs(np.asarray(sample_trajectory(unclipped, fake_model_jax, x, keys)) - ours).max() > 1e-3


@pytest.mark.parametrize("name", ["ddim", "ddpm", "lcm"])
def test_a_config_that_does_not_state_clip_sample_does_not_clip(monkeypatch, name):
    """A scheduler_config.json without clip_sample (one saved by a class that has no such
    option) renders unclipped with the samplers that can clip: clipping SD latents to
    [-1, 1] would flatten the image. The trajectory is diffusers' with clip_sample false."""
    config = {k: v for k, v in SD_CONFIG.items() if k != "clip_sample"}
    sampler = make_sampler(name, NoiseSchedule.from_config(config), NUM_STEPS)
    assert sampler.clip_range == 0.0
    keys = keys_for(SHAPE[0], seed=25)
    x = initial_latents(sampler, jax.random.normal(jax.random.key(26), SHAPE))
    _, theirs = diffusers_trajectory(monkeypatch, name, {**config, "clip_sample": False}, NUM_STEPS, x,
                                     noises=our_noise(keys, NUM_STEPS, SHAPE[1:]))
    assert_trajectories_close(sample_trajectory(sampler, fake_model_jax, x, keys), theirs)


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler", "euler_a"])
def test_clip_sample_is_ignored_where_diffusers_ignores_it(monkeypatch, name):
    # PNDM / DPM-Solver / Euler configs may say clip_sample: their classes do not read it.
    config = {**SD_CONFIG, "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 0.05}
    sampler = make_sampler(name, NoiseSchedule.from_config(config), NUM_STEPS)
    assert sampler.clip_range == 0.0
    keys = keys_for(SHAPE[0], seed=22)
    x = initial_latents(sampler, jax.random.normal(jax.random.key(23), SHAPE))
    _, theirs = diffusers_trajectory(monkeypatch, name, config, NUM_STEPS, x,
                                     noises=our_noise(keys, NUM_STEPS, SHAPE[1:]))
    assert_trajectories_close(sample_trajectory(sampler, fake_model_jax, x, keys), theirs)


def test_unstated_spacing_follows_each_diffusers_default():
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    for name in SPACED_SAMPLERS:
        sched = DIFFUSERS_CLASS[name].from_config(SD_CONFIG)
        sched.set_timesteps(7)
        ours = make_sampler(name, schedule, 7).timesteps
        np.testing.assert_array_equal(ours, sched.timesteps.numpy(), err_msg=name)


def test_start_step_for_strength_is_diffusers_rule():
    for num_steps in (1, 5, 25, 50):
        for strength in (0.0, 0.29, 0.3, 0.6, 0.75, 0.999, 1.0):
            init = min(int(num_steps * strength), num_steps)
            expected = max(num_steps - init, 0)
            assert int(start_step_for_strength(num_steps, strength)[0]) == expected, (num_steps, strength)
            assert int(host_start_steps(num_steps, strength)[0]) == expected, (num_steps, strength)
    # Under jit, in float32: the same steps where num_steps x strength is not a whole number.
    traced = jax.jit(lambda s: start_step_for_strength(25, s))(jnp.array([0.0, 0.29, 0.6, 0.999, 1.0]))
    np.testing.assert_array_equal(np.asarray(traced), [25, 18, 10, 1, 0])


def test_full_start_returns_the_init_latents():
    _, sampler = make_case("dpmpp_2m", "epsilon", None)
    x0 = jax.random.normal(jax.random.key(13), SHAPE)
    start = start_step_for_strength(NUM_STEPS, [0.0, 0.0])
    x = initial_latents(sampler, jnp.zeros(SHAPE), x0, start)
    np.testing.assert_array_equal(np.asarray(sample(sampler, fake_model_jax, x, None, start_step=start)), x0)


@pytest.mark.faults
@pytest.mark.parametrize(
    "field, value",
    [
        ("beta_schedule", "sigmoid"),
        ("prediction_type", "sample"),
        ("timestep_spacing", "karras"),
        ("clip_sample", "yes"),
        ("clip_sample_range", 0.0),
        ("rescale_betas_zero_snr", 1),
        ("thresholding", True),
        ("trained_betas", [0.1, 0.2]),
        ("variance_type", "learned_range"),
    ],
)
def test_unsupported_config_names_field_and_value(field, value):
    with pytest.raises(UnsupportedConfig, match=re.escape(f"{field}={value!r}")):
        NoiseSchedule.from_config({**SD_CONFIG, field: value})


@pytest.mark.faults
@pytest.mark.parametrize(
    "name, field, value",
    [
        ("dpmpp_2m", "algorithm_type", "sde-dpmsolver++"),
        ("dpmpp_2m", "algorithm_type", "dpmsolver"),
        ("dpmpp_2m", "algorithm_type", "deis"),
        ("dpmpp_2m", "solver_order", 3),
        ("dpmpp_2m", "solver_type", "bogus"),
        ("dpmpp_2m", "final_sigmas_type", "sigma_min"),
        ("dpmpp_2m", "use_lu_lambdas", True),
        ("dpmpp_2m", "use_exponential_sigmas", True),
        ("dpmpp_2m", "use_beta_sigmas", True),
        ("dpmpp_2m", "use_flow_sigmas", True),
        ("dpmpp_2m", "lambda_min_clipped", -2.5),
        ("euler", "final_sigmas_type", "sigma_min"),
        ("euler", "interpolation_type", "log_linear"),
        ("euler", "use_exponential_sigmas", True),
        ("euler", "use_beta_sigmas", True),
        ("euler", "timestep_type", "continuous"),
    ],
)
def test_unsupported_solver_option_names_field_and_value(name, field, value):
    schedule = NoiseSchedule.from_config({**SD_CONFIG, "prediction_type": "v_prediction", field: value})
    with pytest.raises(UnsupportedConfig, match=re.escape(f"{field}={value!r}")):
        make_sampler(name, schedule, 5)


@pytest.mark.faults
def test_step_counts_past_the_schedule_are_refused():
    leading = NoiseSchedule.from_config({**SD_CONFIG, "timestep_spacing": "leading"})  # steps_offset 1
    for name in ("ddim", "ddpm"):  # would start at t = 1000
        with pytest.raises(ValueError, match="num_steps=1000"):
            make_sampler(name, leading, 1000)
    # Two steps at one noise level (t = 1000 is clamped to 999; linspace rounds two points together).
    for spacing, num_steps in (("leading", 999), ("leading", 1000), ("linspace", 1000)):
        schedule = NoiseSchedule.from_config({**SD_CONFIG, "timestep_spacing": spacing})
        with pytest.raises(ValueError, match=f"num_steps={num_steps}"):
            make_sampler("dpmpp_2m", schedule, num_steps)
    for name in SPACED_SAMPLERS:
        make_sampler(name, NoiseSchedule.from_config(SD_CONFIG), 999)
        make_sampler(name, NoiseSchedule.from_config({**SD_CONFIG, "timestep_spacing": "trailing"}), 1000)


@pytest.mark.faults
def test_bad_sampler_arguments_are_refused():
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    with pytest.raises(ValueError, match="'heun'"):
        make_sampler("heun", schedule, 5)
    with pytest.raises(ValueError, match="karras_sigmas"):
        make_sampler("ddim", schedule, 5, karras_sigmas=True)
    with pytest.raises(ValueError, match="num_steps=0"):
        make_sampler("euler", schedule, 0)
    with pytest.raises(ValueError, match=r"strength must lie in \[0, 1\], got \[1\.5\]"):
        start_step_for_strength(5, 1.5)
    sampler = make_sampler("euler_a", schedule, 3)
    with pytest.raises(ValueError, match="keys"):
        sample(sampler, fake_model_jax, jnp.zeros(SHAPE), None)
    # One key for a batch of two would broadcast: both samples would draw the same noise.
    with pytest.raises(ValueError, match=r"one PRNG key per sample \(2\), got shape \(1,\)"):
        sample(sampler, fake_model_jax, jnp.zeros(SHAPE), keys_for(1))


# A config's timestep_scaling sets the boundary condition's c_skip / c_out (0.1: the
# estimate keeps a visible share of the latents at every step).
@pytest.mark.faults
def test_per_sample_inputs_that_would_broadcast_are_refused():
    """initial_latents and sample refuse per-sample inputs for the wrong batch rather than
    broadcast them: start steps or init latents for one sample given for a batch of two
    would start every sample at the first one's step or from its image. A start step without
    the init latents it starts from is refused too (it would run a partial txt2img)."""
    _, sampler = make_case("ddim", "epsilon", None)
    x0, noise = jnp.ones(SHAPE), jnp.zeros(SHAPE)
    one = jnp.array([2], jnp.int32)
    with pytest.raises(ValueError, match=r"start_step must have shape \(batch,\) = \(2,\), got \(1,\)"):
        initial_latents(sampler, noise, x0, one)
    with pytest.raises(ValueError, match=r"start_step must have shape \(batch,\) = \(2,\), got \(1,\)"):
        sample(sampler, fake_model_jax, noise, None, start_step=one)
    with pytest.raises(ValueError, match=r"x0 shape \(1, 3, 5, 7\) must equal noise shape \(2, 3, 5, 7\)"):
        initial_latents(sampler, noise, x0[:1])
    with pytest.raises(ValueError, match="start_step needs x0"):
        initial_latents(sampler, noise, start_step=jnp.array([2, 2], jnp.int32))


@pytest.mark.parametrize("num_steps, original, prediction_type, scaling", [
    (1, 50, "epsilon", 10.0), (4, 50, "epsilon", 10.0), (8, 50, "v_prediction", 10.0), (3, 7, "epsilon", 10.0),
    (4, 50, "epsilon", 0.1)])
def test_lcm_steps_and_trajectory_match_diffusers(monkeypatch, num_steps, original, prediction_type, scaling):
    config = {**SD_CONFIG, "_class_name": "LCMScheduler", "original_inference_steps": original,
              "timestep_scaling": scaling, "prediction_type": prediction_type}
    sampler = make_sampler("lcm", NoiseSchedule.from_config(config), num_steps)
    keys = keys_for(SHAPE[0], seed=9)
    x = initial_latents(sampler, jax.random.normal(jax.random.key(10), SHAPE))
    sched, theirs = diffusers_trajectory(monkeypatch, "lcm", config, num_steps, x,
                                         noises=our_noise(keys, num_steps, SHAPE[1:]))
    np.testing.assert_array_equal(sampler.timesteps, sched.timesteps.numpy().astype(np.float64))
    assert_trajectories_close(sample_trajectory(sampler, fake_model_jax, x, keys), theirs)


def test_lcm_refuses_more_steps_than_its_grid():
    """LCM runs up to its grid's original_inference_steps, all of them as diffusers does,
    and refuses more."""
    config = {**SD_CONFIG, "_class_name": "LCMScheduler", "original_inference_steps": 50}
    schedule = NoiseSchedule.from_config(config)
    with pytest.raises(ValueError, match="original_inference_steps"):
        make_sampler("lcm", schedule, 51)
    sched = LCMScheduler.from_config(config)
    sched.set_timesteps(50)
    np.testing.assert_array_equal(make_sampler("lcm", schedule, 50).timesteps, sched.timesteps.numpy())


@pytest.mark.parametrize("num_steps, strength", [(4, 0.6), (2, 0.5), (3, 1.0)])
def test_lcm_img2img_respaces_its_steps_as_diffusers(num_steps, strength):
    # diffusers' LCM img2img: set_timesteps(strength=) keeps the grid's quietest share;
    # the image is noised to the first step's level (initial_latents at start 0).
    config = {**SD_CONFIG, "_class_name": "LCMScheduler"}
    sampler = make_sampler("lcm", NoiseSchedule.from_config(config), num_steps, strength=strength)
    sched = LCMScheduler.from_config(config)
    sched.set_timesteps(num_steps, strength=strength)
    np.testing.assert_array_equal(sampler.timesteps, sched.timesteps.numpy().astype(np.float64))
    x0, noise = jax.random.normal(jax.random.key(11), SHAPE), jax.random.normal(jax.random.key(12), SHAPE)
    theirs = sched.add_noise(torch.from_numpy(np.array(x0)), torch.from_numpy(np.array(noise)),
                             sched.timesteps[:1].repeat(SHAPE[0]))
    np.testing.assert_allclose(np.asarray(initial_latents(sampler, noise, x0, jnp.zeros(SHAPE[0], jnp.int32))),
                               theirs.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="raise the strength"):
        make_sampler("lcm", NoiseSchedule.from_config(config), 8, strength=0.1)
    with pytest.raises(ValueError, match="respaces lcm's steps only"):
        make_sampler("ddim", NoiseSchedule.from_config(config), 8, strength=0.5)
