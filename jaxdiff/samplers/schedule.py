"""Training noise schedules: beta tables, inference timestep spacing, forward noising.

Everything here is computed once on the host in float64 numpy; only `add_noise` runs
on the device. Config names and defaults follow the `scheduler_config.json` that
diffusers-format checkpoints carry, so a checkpoint's file can be read as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small",)


class UnsupportedConfig(ValueError):
    """A scheduler config asks for something these samplers do not implement."""


def _unsupported(field: str, value: Any, fix: str) -> UnsupportedConfig:
    return UnsupportedConfig(f"scheduler config: {field}={value!r} is not supported; {fix}")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The discrete forward process a model was trained with.

    `timestep_spacing` None means "not stated in the config": each sampler then uses
    the spacing its diffusers counterpart defaults to (leading for ddim / ddpm,
    linspace for the others), as `XScheduler.from_config(config)` does. One default is not
    theirs: a config that does not state clip_sample reads as false (see from_config).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    variance_type: str = "fixed_small"
    # Options only some diffusers classes read (defaults as theirs); each solver checks the
    # ones its class has, so a config written for another class still loads.
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    interpolation_type: str = "linear"
    timestep_type: str = "discrete"
    algorithm_type: str = "dpmsolver++"
    solver_order: int = 2
    solver_type: str = "midpoint"
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    lambda_min_clipped: float = -math.inf
    original_inference_steps: int = 50  # LCMScheduler: the distillation's step grid
    timestep_scaling: float = 10.0      # LCMScheduler: t's scale in the boundary condition
    clip_sample: bool = False           # DDIM / DDPM / LCM: clip the x0 estimate to +-clip_sample_range
    clip_sample_range: float = 1.0
    # Betas rescaled so the last training step has zero signal (Lin et al. 2023, "Common
    # diffusion noise schedules and sample steps are flawed"), as every diffusers class here.
    rescale_betas_zero_snr: bool = False
    # Not a config key: alpha-bar at the last training step in place of a zero-SNR schedule's
    # 0. The samplers whose diffusers classes set 2**-24 there (so that sigma stays finite)
    # take a copy with it set; see solvers.make_sampler.
    terminal_alpha_cumprod: float | None = None

    def __post_init__(self):
        if not (isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 2):
            raise _unsupported("num_train_timesteps", self.num_train_timesteps, "use an integer >= 2")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise _unsupported("beta_schedule", self.beta_schedule, f"use one of {BETA_SCHEDULES}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise _unsupported("prediction_type", self.prediction_type, f"use one of {PREDICTION_TYPES}")
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise _unsupported("timestep_spacing", self.timestep_spacing, f"use one of {TIMESTEP_SPACINGS}")
        if self.variance_type not in VARIANCE_TYPES:
            raise _unsupported("variance_type", self.variance_type, f"use one of {VARIANCE_TYPES}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise _unsupported(
                "beta_start/beta_end", (self.beta_start, self.beta_end), "use 0 < beta_start <= beta_end < 1"
            )
        if not (isinstance(self.steps_offset, int) and self.steps_offset >= 0):
            raise _unsupported("steps_offset", self.steps_offset, "use a non-negative integer")
        for flag in ("clip_sample", "rescale_betas_zero_snr"):
            if not isinstance(getattr(self, flag), bool):
                raise _unsupported(flag, getattr(self, flag), "use true or false")
        if isinstance(self.clip_sample_range, bool) or not (
                isinstance(self.clip_sample_range, (int, float)) and self.clip_sample_range > 0):
            raise _unsupported("clip_sample_range", self.clip_sample_range, "use a positive number")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Reads a diffusers `scheduler_config.json` dict; keys for other options are ignored."""
        # Options that change the math and are not implemented: refuse rather than ignore.
        refused = {
            "thresholding": (False, "set it to false"),
            "trained_betas": (None, "use a named beta_schedule instead"),
        }
        for field, (accepted, fix) in refused.items():
            value = config.get(field, accepted)
            if value != accepted:
                raise _unsupported(field, value, fix)
        # A config without clip_sample reads as false, though DDIMScheduler / DDPMScheduler
        # default it to true: their own saved configs always state it, and clipping SD latents to
        # [-1, 1] only happens when another class's config is loaded into them.
        known = {f.name for f in dataclasses.fields(cls)} - {"terminal_alpha_cumprod"}
        kwargs = {k: v for k, v in config.items() if k in known}
        if kwargs.get("variance_type") is None:
            kwargs.pop("variance_type", None)
        return cls(**kwargs)

    def _named_betas(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
        if self.beta_schedule == "scaled_linear":
            return np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float64) ** 2
        # squaredcos_cap_v2: the cosine schedule of improved DDPM, capped so no beta reaches 1.
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])

    @functools.cached_property
    def betas(self) -> np.ndarray:
        betas = self._named_betas()
        return _zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """alpha-bar_t for t = 0 .. num_train_timesteps-1 (float64)."""
        abar = np.cumprod(1.0 - self.betas)
        if self.terminal_alpha_cumprod is not None and self.rescale_betas_zero_snr:
            abar[-1] = self.terminal_alpha_cumprod
        return abar

    @functools.cached_property
    def sigmas(self) -> np.ndarray:
        """Variance-exploding noise level sqrt((1 - abar) / abar) per training timestep (inf
        at a zero-SNR schedule's last step, unless terminal_alpha_cumprod is set)."""
        abar = self.alphas_cumprod
        with np.errstate(divide="ignore"):
            return np.sqrt((1.0 - abar) / abar)


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose last alpha-bar is 0, sqrt(alpha-bar) shifted and scaled so its first value
    stays (Lin et al. 2023, Algorithm 1; diffusers' rescale_zero_terminal_snr)."""
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    abar = root**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def spaced_timesteps(schedule: NoiseSchedule, num_steps: int, spacing: str, *, rounded: bool) -> np.ndarray:
    """The descending training timesteps an N-step sampler visits (float64).

    `rounded` False keeps linspace's fractional timesteps (Euler samplers interpolate
    sigma between training steps); True rounds them to integers as DDIM / DDPM do.
    """
    n_train = schedule.num_train_timesteps
    if spacing == "linspace":
        t = np.linspace(0, n_train - 1, num_steps)[::-1]
        return np.round(t) if rounded else t.astype(np.float32).astype(np.float64)
    if spacing == "leading":
        ratio = n_train // num_steps
        return (np.arange(num_steps) * ratio)[::-1].astype(np.float64) + schedule.steps_offset
    if spacing == "trailing":
        # np.arange's float step can add a point (1000 / 61 gives 62; diffusers then runs a
        # 62nd step, at t = -1): keep the first num_steps, the schedule asked for.
        return np.round(np.arange(n_train, 0, -n_train / num_steps)[:num_steps]) - 1.0
    raise _unsupported("timestep_spacing", spacing, f"use one of {TIMESTEP_SPACINGS}")


def karras_sigmas(sigma_max: float, sigma_min: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels: uniform in sigma^(1/rho), descending."""
    ramp = np.linspace(0.0, 1.0, num_steps)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_timestep(schedule: NoiseSchedule, sigma: np.ndarray) -> np.ndarray:
    """Fractional training timestep whose log-sigma matches, by linear interpolation in log sigma."""
    log_sigmas = np.log(schedule.sigmas)
    log_sigma = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))
    # log_sigmas rises with t: the bracketing pair is found by counting entries below.
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0.0, 1.0)
    return low + w


def interpolate_sigmas(schedule: NoiseSchedule, timesteps: np.ndarray) -> np.ndarray:
    """Sigma at (possibly fractional) training timesteps, linear in t."""
    return np.interp(timesteps, np.arange(schedule.num_train_timesteps), schedule.sigmas)


def add_noise(
    schedule: NoiseSchedule, x0: jnp.ndarray, noise: jnp.ndarray, timesteps: jnp.ndarray
) -> jnp.ndarray:
    """Forward process q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, per sample.

    timesteps: integer (B,) training timesteps, traced; x0 and noise: (B, ...).
    """
    abar = schedule.alphas_cumprod
    signal = jnp.asarray(np.sqrt(abar), jnp.float32)[timesteps]
    spread = jnp.asarray(np.sqrt(1.0 - abar), jnp.float32)[timesteps]
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return signal.reshape(shape) * x0 + spread.reshape(shape) * noise
