"""Generation: samplers + models -> jitted, sharded programs -> images."""

from __future__ import annotations

from jaxdiff.engine.pipeline import (Pipeline, PreparedSample, RenderError, RenderSettings, enable_compilation_cache,
                                     settings_for)
from jaxdiff.engine.sample import Rendered, Sample


def load_pipeline(model: str | None = None, upscaler: str | None = None, *, dtype=None,
                  batch_size: int = 8, allow_pickle: bool = False, variant: str | None = None,
                  compilation_cache: str | None = None, devices=None, **settings) -> Pipeline:
    """Loads a diffusers-format folder (local or gs://) and, optionally, an x4 upscaler folder.

    `model=None` (or "default") is the shipped default model (with its own upscaler unless
    `upscaler="none"`). Keyword settings (steps, sampler, guidance, width, ...) become
    the run's RenderSettings; those left out (or None) come from each folder's
    render_defaults.json where it has one (see `settings_for`). `variant` (e.g. "fp16")
    loads diffusers' variant weight files of both folders.
    """
    from jaxdiff import render_defaults
    from jaxdiff.checkpoints import upscaler_for
    from jaxdiff.weights.family import load_family

    for name, value in (("model", model), ("upscaler", upscaler)):
        if value is not None and not str(value).strip():  # else "" would quietly mean the default
            raise ValueError(f"load_pipeline: {name} is empty: give a diffusers folder or Hub id, or None")
    enable_compilation_cache(compilation_cache)
    upscaler = upscaler_for(model, upscaler)
    kw = dict(dtype=dtype, allow_pickle=allow_pickle, variant=variant)
    base = load_family(model or "default", **kw)
    render_defaults.check_kind(base.path, "base", base.unet_config.in_channels)
    up = load_family(upscaler, **kw) if upscaler else None
    if up is not None:
        render_defaults.check_kind(up.path, "upscale", up.unet_config.in_channels)
    return Pipeline(base, up, batch_size=batch_size, settings=settings_for(base, up, **settings), devices=devices)


__all__ = ["Pipeline", "PreparedSample", "RenderError", "RenderSettings", "Rendered", "Sample", "load_pipeline",
           "enable_compilation_cache", "settings_for"]
