"""Pure-JAX noise schedules and solvers (DDIM, DPM-Solver++ 2M, Euler, Euler ancestral, DDPM).

No model inside: the sampling loop takes the denoiser as a function.
"""

from jaxdiff.samplers.sampling_loop import (
    host_start_steps,
    initial_latents,
    noise_to_step,
    sample,
    sample_trajectory,
    start_step_for_strength,
)
from jaxdiff.samplers.schedule import NoiseSchedule, UnsupportedConfig, add_noise
from jaxdiff.samplers.solvers import KARRAS_SAMPLERS, SAMPLER_NAMES, Sampler, make_sampler

__all__ = [
    "KARRAS_SAMPLERS",
    "NoiseSchedule",
    "SAMPLER_NAMES",
    "Sampler",
    "UnsupportedConfig",
    "add_noise",
    "host_start_steps",
    "initial_latents",
    "make_sampler",
    "noise_to_step",
    "sample",
    "sample_trajectory",
    "start_step_for_strength",
]
