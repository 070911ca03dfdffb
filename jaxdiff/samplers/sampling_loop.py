"""The sampling loop: one `lax.scan` over a Sampler's tables, jittable, per-sample state.

The model is an argument, `denoise(model_input, t, step_index) -> model output`, so
guidance, conditioning and the network stay outside this layer. Per-sample start
steps (img2img strength) and per-sample PRNG keys are traced arrays: one compiled
program serves a batch that mixes them.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.solvers import Sampler

Denoise = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
AfterStep = Callable[[jax.Array, jax.Array], jax.Array]


def _table(values: tuple[float, ...]) -> jax.Array:
    return jnp.asarray(np.asarray(values, dtype=np.float32))


def _per_sample(v: jax.Array, ndim: int) -> jax.Array:
    """(B,) -> (B, 1, ..., 1) so it scales each sample's latents."""
    return v.reshape((-1,) + (1,) * (ndim - 1))


def start_step_for_strength(num_steps: int, strength) -> jax.Array:
    """First step each sample runs for img2img `strength` in [0, 1], as diffusers' img2img pipelines.

    init = min(int(num_steps * strength), num_steps); start = max(num_steps - init, 0).
    Host values are evaluated in float64 (exactly the pipelines' rule); traced ones in float32.
    """
    try:
        return jnp.asarray(host_start_steps(num_steps, strength))
    except jax.errors.TracerArrayConversionError:
        # Out-of-range strengths cannot raise under jit: clamp so the start stays a valid step.
        init = jnp.clip(jnp.floor(num_steps * jnp.asarray(strength, jnp.float32)), 0, num_steps)
        return (num_steps - init).astype(jnp.int32).reshape(-1)


def host_start_steps(num_steps: int, strength) -> np.ndarray:
    """start_step_for_strength of host values, as a NumPy array (no device round trip)."""
    s = np.atleast_1d(np.asarray(strength, dtype=np.float64))
    if not np.all((s >= 0.0) & (s <= 1.0)):
        raise ValueError(
            f"strength must lie in [0, 1], got {s.tolist()}; 1 ignores the init image, 0 keeps it"
        )
    init = np.minimum(np.floor(num_steps * s), num_steps)
    return np.maximum(num_steps - init, 0).astype(np.int32)


def _check_batch(name: str, v: jax.Array, batch: int):
    if v.shape != (batch,):
        raise ValueError(f"{name} must have shape (batch,) = ({batch},), got {tuple(v.shape)}")


def _level(sampler: Sampler, x0: jax.Array, noise: jax.Array, level: jax.Array) -> jax.Array:
    signal = _per_sample(_table(sampler.signal_level)[level], x0.ndim)
    spread = _per_sample(_table(sampler.noise_level)[level], x0.ndim)
    return signal * x0.astype(jnp.float32) + spread * noise.astype(jnp.float32)


def initial_latents(
    sampler: Sampler, noise: jax.Array, x0: jax.Array | None = None, start_step=None
) -> jax.Array:
    """Latents to start sampling from.

    txt2img (x0 None): noise * init_noise_sigma. img2img / inpaint: x0 noised to the
    level of each sample's start_step (0 when None); start_step = num_steps gives x0.
    """
    noise = jnp.asarray(noise, jnp.float32)
    if x0 is None:
        if start_step is not None:
            raise ValueError("start_step needs x0 (the encoded init image); pass x0 or leave start_step None")
        return noise * sampler.init_noise_sigma
    if x0.shape != noise.shape:
        raise ValueError(f"x0 shape {tuple(x0.shape)} must equal noise shape {tuple(noise.shape)}")
    batch = noise.shape[0]
    start = jnp.zeros((batch,), jnp.int32) if start_step is None else jnp.asarray(start_step, jnp.int32)
    _check_batch("start_step", start, batch)
    return _level(sampler, x0, noise, start)


def noise_to_step(sampler: Sampler, x0: jax.Array, noise: jax.Array, i) -> jax.Array:
    """x0 at the noise level the latents have after step i (clean x0 after the last step).

    For inpainting: the known region, re-noised, replaces the latents there after each step.
    """
    level = jnp.full((x0.shape[0],), jnp.asarray(i, jnp.int32) + 1)
    return _level(sampler, x0, noise, level)


def _step_noise(keys: jax.Array, i: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    # Folding the step index into each sample's own key keeps a sample's noise
    # independent of its batch neighbours and of where its run starts.
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(keys)


def _run(sampler, denoise, x, keys, start_step, after_step, keep_trajectory):
    x = jnp.asarray(x, jnp.float32)
    batch, ndim = x.shape[0], x.ndim
    if sampler.stochastic and keys is None:
        raise ValueError(
            f"sampler {sampler.name!r} draws noise at every step: pass keys, one PRNG key per sample"
        )
    if keys is not None and keys.shape[0] != batch:
        raise ValueError(f"keys must hold one PRNG key per sample ({batch}), got shape {tuple(keys.shape)}")
    start = jnp.zeros((batch,), jnp.int32) if start_step is None else jnp.asarray(start_step, jnp.int32)
    _check_batch("start_step", start, batch)
    tab = {name: _table(getattr(sampler, name)) for name in (
        "model_timesteps", "input_scale", "x0_from_x", "x0_from_out", "keep_x", "take_x0",
        "take_x0_multistep", "take_prev_x0", "take_clipped_x0", "noise_std")}

    def step(carry, i):
        x, prev_x0 = carry
        t = jnp.full((batch,), tab["model_timesteps"][i])
        out = denoise(x * tab["input_scale"][i], t, i).astype(jnp.float32)
        x0 = tab["x0_from_x"][i] * x + tab["x0_from_out"][i] * out
        # A sample's first active step has no previous estimate: it takes the first-order update.
        first = i == start
        take_x0 = jnp.where(first, tab["take_x0"][i], tab["take_x0_multistep"][i])
        take_prev = jnp.where(first, 0.0, tab["take_prev_x0"][i])
        new = tab["keep_x"][i] * x + _per_sample(take_x0, ndim) * x0
        if sampler.multistep:
            new = new + _per_sample(take_prev, ndim) * prev_x0
        if sampler.clip_range > 0:  # clip_sample: the estimate also enters clipped
            new = new + tab["take_clipped_x0"][i] * jnp.clip(x0, -sampler.clip_range, sampler.clip_range)
        if sampler.stochastic:
            new = new + tab["noise_std"][i] * _step_noise(keys, i, x.shape[1:])
        if after_step is not None:
            new = after_step(new, i).astype(jnp.float32)
        active = _per_sample(i >= start, ndim)
        new = jnp.where(active, new, x)
        x0 = jnp.where(active, x0, prev_x0)
        return (new, x0), (new if keep_trajectory else None)

    (x, _), trajectory = jax.lax.scan(step, (x, jnp.zeros_like(x)), jnp.arange(sampler.num_steps))
    return x, trajectory


def sample(
    sampler: Sampler,
    denoise: Denoise,
    x: jax.Array,
    keys: jax.Array | None,
    *,
    start_step: jax.Array | None = None,
    after_step: AfterStep | None = None,
) -> jax.Array:
    """Runs all num_steps steps from latents x (B, ...) and returns the final latents (the x0 estimate).

    denoise(model_input, t (B,) float32, step_index) returns the model output (epsilon or
    v, as the schedule's prediction_type); the solver's input scaling is applied before.
    keys: one PRNG key per sample (only stochastic samplers use them; None is allowed otherwise).
    start_step: (B,) int; a sample leaves steps before its start unchanged.
    after_step(x, i) -> x: applied after step i to active samples (e.g. inpainting's blend).
    """
    return _run(sampler, denoise, x, keys, start_step, after_step, keep_trajectory=False)[0]


def sample_trajectory(
    sampler: Sampler,
    denoise: Denoise,
    x: jax.Array,
    keys: jax.Array | None,
    *,
    start_step: jax.Array | None = None,
    after_step: AfterStep | None = None,
) -> jax.Array:
    """As `sample`, but returns the latents after every step, (num_steps, B, ...), for inspection."""
    return _run(sampler, denoise, x, keys, start_step, after_step, keep_trajectory=True)[1]
