"""The solvers, each reduced to per-step coefficient tables precomputed in float64.

Every solver step here is linear in the current latents x, the model's clean-latent
estimate x0 = x0_from_x * x + x0_from_out * model_out, the previous step's x0 (the
multistep solver only) and fresh noise:

    x_next = keep_x * x + take_x0 * x0 + take_prev_x0 * x0_prev + noise_std * noise

(plus take_clipped_x0 * clip(x0) where a config's clip_sample clips the estimate: DDIM,
DDPM and LCM read it, as their diffusers classes; the others ignore it, as theirs), so one
loop (`sampling_loop.py`) runs them all, and each solver below is only the numpy that
fills its tables to match its diffusers scheduler.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxdiff.samplers.schedule import (
    NoiseSchedule,
    UnsupportedConfig,
    _unsupported,
    interpolate_sigmas,
    karras_sigmas,
    sigma_to_timestep,
    spaced_timesteps,
)

SAMPLER_NAMES = ("ddim", "dpmpp_2m", "euler", "euler_a", "ddpm", "lcm")
KARRAS_SAMPLERS = ("dpmpp_2m", "euler")
# Those whose classes keep a zero-SNR schedule's last alpha-bar off 0 (2**-24: sigma stays finite).
_TERMINAL_ALPHA_CUMPROD = {"dpmpp_2m": 2.0**-24, "euler": 2.0**-24, "euler_a": 2.0**-24}
# The spacing each diffusers scheduler defaults to when the config names none.
DEFAULT_SPACING = {
    "ddim": "leading", "ddpm": "leading", "dpmpp_2m": "linspace", "euler": "linspace", "euler_a": "linspace",
}

# Options of the diffusers class each sampler mirrors, with the values implemented here.
# Only that class reads them, as in diffusers' from_config.
ACCEPTED_OPTIONS = {
    "euler": {
        "final_sigmas_type": ("zero",), "interpolation_type": ("linear",),
        "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
    },
    "dpmpp_2m": {
        "algorithm_type": ("dpmsolver++",), "solver_order": (1, 2),
        # logrho / bh1 / bh2 (DEIS and UniPC names) are read as midpoint by diffusers.
        "solver_type": ("midpoint", "heun", "logrho", "bh1", "bh2"),
        "final_sigmas_type": ("zero",), "use_lu_lambdas": (False,), "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,), "use_flow_sigmas": (False,),
    },
}

_TABLES = (
    "model_timesteps", "input_scale", "x0_from_x", "x0_from_out", "keep_x", "take_x0",
    "take_x0_multistep", "take_prev_x0", "take_clipped_x0", "noise_std", "signal_level", "noise_level",
)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A solver bound to a schedule and a step count; hashable, so it can be a static jit argument.

    Tables of length num_steps, indexed by step i:
      model_timesteps: t fed to the model; input_scale: factor on x before the model.
      x0_from_x, x0_from_out: the clean-latent estimate from x and the model output.
      keep_x, take_x0: the update when the step is a sample's first (or the solver is one-step);
      take_x0_multistep, take_prev_x0: the update when a previous estimate exists.
      take_clipped_x0: the update's share of the estimate clipped to +-clip_range (clip_range > 0 only).
      noise_std: scale of the fresh per-step noise (0 for deterministic solvers).
    Tables of length num_steps + 1, indexed by level i (the input of step i; i = num_steps is clean):
      signal_level, noise_level: latents at level i are signal * x0 + noise_level * noise.
    """

    name: str
    num_steps: int
    init_noise_sigma: float
    model_timesteps: tuple[float, ...]
    input_scale: tuple[float, ...]
    x0_from_x: tuple[float, ...]
    x0_from_out: tuple[float, ...]
    keep_x: tuple[float, ...]
    take_x0: tuple[float, ...]
    take_x0_multistep: tuple[float, ...]
    take_prev_x0: tuple[float, ...]
    take_clipped_x0: tuple[float, ...]
    noise_std: tuple[float, ...]
    signal_level: tuple[float, ...]
    noise_level: tuple[float, ...]
    clip_range: float = 0.0  # > 0: the clean estimate is also taken clipped to +-clip_range

    @property
    def timesteps(self) -> np.ndarray:
        """The t fed to the model at each step, (num_steps,) float64."""
        return np.asarray(self.model_timesteps, dtype=np.float64)

    @property
    def stochastic(self) -> bool:
        return any(s != 0.0 for s in self.noise_std)

    @property
    def multistep(self) -> bool:
        return any(c != 0.0 for c in self.take_prev_x0)


def _make(name: str, num_steps: int, init_noise_sigma: float, clip_range: float = 0.0,
          **tables: np.ndarray) -> Sampler:
    tables.setdefault("take_x0_multistep", tables["take_x0"])
    tables.setdefault("take_prev_x0", np.zeros(num_steps))
    tables.setdefault("take_clipped_x0", np.zeros(num_steps))
    tables.setdefault("noise_std", np.zeros(num_steps))
    tables.setdefault("input_scale", np.ones(num_steps))
    as_tuples = {k: tuple(float(v) for v in np.asarray(tables[k], dtype=np.float64)) for k in _TABLES}
    return Sampler(name=name, num_steps=num_steps, init_noise_sigma=float(init_noise_sigma),
                   clip_range=float(clip_range), **as_tuples)


def _clip_range(schedule: NoiseSchedule) -> float:
    return float(schedule.clip_sample_range) if schedule.clip_sample else 0.0


def _x0_shares(take: np.ndarray, clip: float) -> tuple[np.ndarray, np.ndarray]:
    """(take_x0, take_clipped_x0): the estimate's share of the update, moved to the clipped
    estimate where clip_sample clips it."""
    zero = np.zeros_like(take)
    return (zero, take) if clip else (take, zero)


def _check_signal(schedule: NoiseSchedule, name: str, t: np.ndarray) -> None:
    """An epsilon prediction gives no clean estimate at zero signal (a zero-SNR schedule's
    last step, which these samplers take as 0): diffusers returns NaN there."""
    if schedule.prediction_type == "epsilon" and np.any(schedule.alphas_cumprod[t] == 0.0):
        leading = ("" if name == "lcm" else  # lcm keeps its own grid, whatever the spacing
                   f", or timestep_spacing leading, which starts below the last timestep at fewer steps "
                   f"than the schedule's {schedule.num_train_timesteps}")
        raise UnsupportedConfig(
            f"{name} steps from t={int(np.max(t))}, where this model's zero-terminal-SNR schedule "
            f"(rescale_betas_zero_snr) has no signal left: an epsilon prediction gives no clean estimate "
            f"there (diffusers returns NaN). Use the dpmpp_2m, euler or euler_a sampler (they keep a "
            f"little signal there){leading}")


def _x0_coefficients(alpha: np.ndarray, sigma: np.ndarray, prediction_type: str):
    """x0 from variance-preserving latents x = alpha x0 + sigma eps and the model output."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    return alpha, -sigma  # v = alpha eps - sigma x0


def _with_clean(values: np.ndarray, clean: float) -> np.ndarray:
    return np.concatenate([values, [clean]])


def _integer_timesteps(schedule: NoiseSchedule, num_steps: int, spacing: str) -> np.ndarray:
    t = spaced_timesteps(schedule, num_steps, spacing, rounded=True).astype(np.int64)
    if t.max() >= schedule.num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps} with {spacing} spacing and steps_offset={schedule.steps_offset} starts "
            f"at t={t.max()}, past the last training step {schedule.num_train_timesteps - 1}; use fewer steps"
        )
    return t


def _ddim(schedule: NoiseSchedule, num_steps: int, spacing: str) -> Sampler:
    """DDIM with eta = 0 (Song et al. 2021), as diffusers' DDIMScheduler."""
    abar = schedule.alphas_cumprod
    t = _integer_timesteps(schedule, num_steps, spacing)
    _check_signal(schedule, "ddim", t)
    # diffusers steps to t - T // N whatever the spacing; kept for parity.
    prev = t - schedule.num_train_timesteps // num_steps
    final = 1.0 if schedule.set_alpha_to_one else abar[0]
    a, a_prev = abar[t], np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
    alpha, sigma = np.sqrt(a), np.sqrt(1 - a)
    alpha_prev, sigma_prev = np.sqrt(a_prev), np.sqrt(1 - a_prev)
    from_x, from_out = _x0_coefficients(alpha, sigma, schedule.prediction_type)
    # x_prev = alpha_prev x0 + sigma_prev eps, with eps = (x - alpha x0) / sigma. clip_sample
    # clips the first x0 only: diffusers keeps eps from the unclipped estimate.
    clip = _clip_range(schedule)
    take_x0, take_clipped_x0 = _x0_shares(alpha_prev, clip)
    return _make(
        "ddim", num_steps, 1.0, clip, model_timesteps=t, x0_from_x=from_x, x0_from_out=from_out,
        keep_x=sigma_prev / sigma, take_x0=take_x0 - sigma_prev * alpha / sigma, take_clipped_x0=take_clipped_x0,
        signal_level=_with_clean(alpha, 1.0), noise_level=_with_clean(sigma, 0.0),
    )


def _ddpm(schedule: NoiseSchedule, num_steps: int, spacing: str) -> Sampler:
    """Ancestral DDPM (Ho et al. 2020) posterior with the 'fixed_small' variance, as DDPMScheduler."""
    abar = schedule.alphas_cumprod
    t = _integer_timesteps(schedule, num_steps, spacing)
    _check_signal(schedule, "ddpm", t)
    a = abar[t]
    a_prev = np.append(abar[t[1:]], 1.0)
    step_beta = 1 - a / a_prev
    from_x, from_out = _x0_coefficients(np.sqrt(a), np.sqrt(1 - a), schedule.prediction_type)
    variance = np.maximum((1 - a_prev) / (1 - a) * step_beta, 1e-20)
    clip = _clip_range(schedule)
    take_x0, take_clipped_x0 = _x0_shares(np.sqrt(a_prev) * step_beta / (1 - a), clip)
    return _make(
        "ddpm", num_steps, 1.0, clip, model_timesteps=t, x0_from_x=from_x, x0_from_out=from_out,
        keep_x=np.sqrt(1 - step_beta) * (1 - a_prev) / (1 - a), take_x0=take_x0, take_clipped_x0=take_clipped_x0,
        noise_std=np.where(t > 0, np.sqrt(variance), 0.0),
        signal_level=_with_clean(np.sqrt(a), 1.0), noise_level=_with_clean(np.sqrt(1 - a), 0.0),
    )


def _lcm(schedule: NoiseSchedule, num_steps: int, strength: float) -> Sampler:
    """Latent consistency sampling (Luo et al. 2023), as diffusers' LCMScheduler: each step
    takes the consistency model's estimate (the x0 prediction under the boundary condition
    c_skip x + c_out x0) and noises it afresh to the next step's level; the last step
    returns the estimate. Steps are spread over the distillation's grid of
    original_inference_steps timesteps, of which img2img `strength` keeps the quietest
    share (every step then runs, from the image noised to the first one's level)."""
    original, n_train = schedule.original_inference_steps, schedule.num_train_timesteps
    if not 1 <= original <= n_train:
        raise _unsupported("original_inference_steps", original, f"use 1 to num_train_timesteps ({n_train})")
    if num_steps > original:
        raise ValueError(f"num_steps={num_steps} is more than the LCM grid's original_inference_steps "
                         f"({original}); use at most {original}")
    points = int(original * strength)
    if points < num_steps:
        raise ValueError(f"strength {strength} keeps {points} of the LCM grid's {original} timesteps, fewer "
                         f"than num_steps={num_steps}: raise the strength or lower the steps")
    grid = (np.arange(1, points + 1) * (n_train // original) - 1)[::-1]
    t = grid[np.floor(np.linspace(0, points, num_steps, endpoint=False)).astype(np.int64)]
    _check_signal(schedule, "lcm", t)
    abar = schedule.alphas_cumprod
    a = abar[t]
    a_next = np.append(abar[t[1:]], 1.0)  # after the last step: the estimate, unscaled
    scaled = t * schedule.timestep_scaling
    sigma_data = 0.5
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / np.sqrt(scaled ** 2 + sigma_data ** 2)
    from_x, from_out = _x0_coefficients(np.sqrt(a), np.sqrt(1 - a), schedule.prediction_type)
    clip = _clip_range(schedule)
    take_x0, take_clipped_x0 = _x0_shares(np.sqrt(a_next) * c_out, clip)
    return _make(
        "lcm", num_steps, 1.0, clip, model_timesteps=t, x0_from_x=from_x, x0_from_out=from_out,
        keep_x=np.sqrt(a_next) * c_skip, take_x0=take_x0, take_clipped_x0=take_clipped_x0,
        noise_std=np.sqrt(1 - a_next),
        signal_level=_with_clean(np.sqrt(a), 1.0), noise_level=_with_clean(np.sqrt(1 - a), 0.0),
    )


def _karras(schedule: NoiseSchedule, sigma_max: float, sigma_min: float, num_steps: int) -> np.ndarray:
    """Karras sigmas between the config's sigma_max / sigma_min where set, else the given bounds."""
    hi = sigma_max if schedule.sigma_max is None else schedule.sigma_max
    lo = sigma_min if schedule.sigma_min is None else schedule.sigma_min
    return karras_sigmas(hi, lo, num_steps)


def _euler_sigmas(schedule: NoiseSchedule, num_steps: int, spacing: str, karras: bool):
    t = spaced_timesteps(schedule, num_steps, spacing, rounded=False)
    sigmas = interpolate_sigmas(schedule, t)
    if karras:
        sigmas = _karras(schedule, sigmas[0], sigmas[-1], num_steps)
        # The model sees t in float32: take sigma's timestep at that precision.
        t = sigma_to_timestep(schedule, sigmas).astype(np.float32).astype(np.float64)
    return t, sigmas, np.append(sigmas, 0.0)


def _euler_common(schedule: NoiseSchedule, num_steps: int, spacing: str, karras: bool):
    """Euler samplers work on variance-exploding latents x = x0 + sigma eps (Karras et al. 2022)."""
    t, sigma, sigma_all = _euler_sigmas(schedule, num_steps, spacing, karras)
    alpha = 1.0 / np.sqrt(sigma**2 + 1)
    from_x, from_out = _x0_coefficients(alpha, sigma * alpha, schedule.prediction_type)
    # The model takes variance-preserving input alpha * x, so x0's x coefficient absorbs alpha.
    from_x = from_x * alpha
    # diffusers starts leading-spaced runs at sqrt(sigma_max^2 + 1); kept for parity.
    init = sigma.max() if spacing != "leading" else np.sqrt(sigma.max() ** 2 + 1)
    common = dict(
        model_timesteps=t, input_scale=alpha, x0_from_x=from_x, x0_from_out=from_out,
        signal_level=np.ones(num_steps + 1), noise_level=sigma_all,
    )
    return sigma, sigma_all[1:], init, common


def _euler(schedule: NoiseSchedule, num_steps: int, spacing: str, karras: bool) -> Sampler:
    # EulerDiscreteScheduler feeds the model 0.25 log(sigma) for this pair only.
    if schedule.timestep_type != "discrete" and schedule.prediction_type == "v_prediction":
        raise _unsupported("timestep_type", schedule.timestep_type, "use 'discrete'")
    sigma, sigma_next, init, common = _euler_common(schedule, num_steps, spacing, karras)
    ratio = sigma_next / sigma
    return _make("euler", num_steps, init, keep_x=ratio, take_x0=1 - ratio, **common)


def _euler_ancestral(schedule: NoiseSchedule, num_steps: int, spacing: str) -> Sampler:
    sigma, sigma_next, init, common = _euler_common(schedule, num_steps, spacing, False)
    # Step down deterministically to sigma_down, then add noise sigma_up: the two sum to sigma_next.
    sigma_up = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    ratio = np.sqrt(sigma_next**2 - sigma_up**2) / sigma
    return _make("euler_a", num_steps, init, keep_x=ratio, take_x0=1 - ratio, noise_std=sigma_up, **common)


def _dpm_timesteps(schedule: NoiseSchedule, num_steps: int, spacing: str) -> np.ndarray:
    """DPMSolverMultistepScheduler spaces N + 1 points and drops the last for linspace / leading."""
    n_train = schedule.num_train_timesteps
    # diffusers drops the training steps whose log-SNR is below lambda_min_clipped.
    lam = 0.5 * np.log(schedule.alphas_cumprod / (1 - schedule.alphas_cumprod))
    if lam.min() < schedule.lambda_min_clipped:
        raise _unsupported("lambda_min_clipped", schedule.lambda_min_clipped, "leave it unset (-inf)")
    if spacing == "linspace":
        return np.round(np.linspace(0, n_train - 1, num_steps + 1))[::-1][:-1].copy()
    if spacing == "leading":
        ratio = n_train // (num_steps + 1)
        return (np.arange(num_steps + 1) * ratio)[::-1][:-1].astype(np.float64) + schedule.steps_offset
    return spaced_timesteps(schedule, num_steps, spacing, rounded=True)


def _dpmpp_2m(schedule: NoiseSchedule, num_steps: int, spacing: str, karras: bool) -> Sampler:
    """DPM-Solver++(2M) (Lu et al. 2022): first order at the first and last step, final sigma 0.

    solver_order 1 makes every step first order; solver_type picks the second-order rule.
    """
    t = _dpm_timesteps(schedule, num_steps, spacing)
    if karras:
        sigma = _karras(schedule, schedule.sigmas[-1], schedule.sigmas[0], num_steps)
        t = sigma_to_timestep(schedule, sigma)
        if schedule.beta_schedule != "squaredcos_cap_v2":
            t = np.round(t)
    else:
        sigma = interpolate_sigmas(schedule, t)
    alpha = _with_clean(1.0 / np.sqrt(sigma**2 + 1), 1.0)
    sigma_vp = _with_clean(sigma * alpha[:-1], 0.0)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma_vp)  # log-SNR; +inf at the clean end
    h = lam[1:] - lam[:-1]
    if not np.all(h > 0):
        raise ValueError(
            f"num_steps={num_steps} with {spacing} spacing visits one noise level twice "
            "(diffusers gives NaN there); use fewer steps"
        )
    from_x, from_out = _x0_coefficients(alpha[:-1], sigma_vp[:-1], schedule.prediction_type)
    take = alpha[1:] * -np.expm1(-h)  # exp(-inf) = 0: the last step returns x0
    # A second-order step adds slope * (x0 - x0_prev) / r, with r = h_prev / h.
    second = (np.arange(num_steps) > 0) & (schedule.solver_order > 1)
    second[-1] = False  # the final step to sigma 0 is first order
    if schedule.solver_type == "heun":
        slope = alpha[1:] * (1 + np.expm1(-h) / h)
    else:
        slope = 0.5 * take  # x0 extrapolated to the step's midpoint
    r = np.ones(num_steps)
    r[1:] = h[:-1] / h[1:]
    d1 = np.where(second, slope / np.where(second, r, 1.0), 0.0)
    return _make(
        "dpmpp_2m", num_steps, 1.0, model_timesteps=t, x0_from_x=from_x, x0_from_out=from_out,
        keep_x=sigma_vp[1:] / sigma_vp[:-1], take_x0=take,
        take_x0_multistep=take + d1, take_prev_x0=-d1,
        signal_level=alpha, noise_level=sigma_vp,
    )


def make_sampler(
    name: str, schedule: NoiseSchedule, num_steps: int, *, karras_sigmas: bool = False, strength: float = 1.0
) -> Sampler:
    """The named solver for `schedule` with `num_steps` model calls. `strength` (lcm only):
    img2img's, which respaces LCM's steps; the other samplers start later instead
    (start_step_for_strength)."""
    if name not in SAMPLER_NAMES:
        raise ValueError(f"sampler name {name!r} is unknown; use one of {SAMPLER_NAMES}")
    if not (isinstance(num_steps, (int, np.integer)) and 1 <= num_steps <= schedule.num_train_timesteps):
        raise ValueError(
            f"num_steps={num_steps!r} must be an integer from 1 to num_train_timesteps "
            f"({schedule.num_train_timesteps})"
        )
    if karras_sigmas and name not in KARRAS_SAMPLERS:
        raise ValueError(f"karras_sigmas applies to {KARRAS_SAMPLERS} only; set it False for {name!r}")
    num_steps = int(num_steps)
    for field, accepted in ACCEPTED_OPTIONS.get(name, {}).items():
        value = getattr(schedule, field)
        if value not in accepted:
            raise _unsupported(field, value, f"use one of {accepted}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength {strength} is outside (0, 1]")
    if strength != 1.0 and name != "lcm":
        raise ValueError(f"strength respaces lcm's steps only; {name!r} starts img2img at a later step")
    if schedule.rescale_betas_zero_snr and name in _TERMINAL_ALPHA_CUMPROD:
        schedule = dataclasses.replace(schedule, terminal_alpha_cumprod=_TERMINAL_ALPHA_CUMPROD[name])
    if name == "lcm":  # steps from the distillation's grid, not a spacing
        return _lcm(schedule, num_steps, strength)
    spacing = schedule.timestep_spacing or DEFAULT_SPACING[name]
    if name == "ddim":
        return _ddim(schedule, num_steps, spacing)
    if name == "ddpm":
        return _ddpm(schedule, num_steps, spacing)
    if name == "euler":
        return _euler(schedule, num_steps, spacing, karras_sigmas)
    if name == "euler_a":
        return _euler_ancestral(schedule, num_steps, spacing)
    return _dpmpp_2m(schedule, num_steps, spacing, karras_sigmas)
