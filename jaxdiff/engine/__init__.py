"""Generation: samplers + models -> jitted, sharded programs -> images."""

from __future__ import annotations

from jaxdiff.engine.pipeline import (DeviceMemoryError, Pipeline, PreparedSample, RenderError, RenderSettings,
                                     check_settings, enable_compilation_cache, settings_for)
from jaxdiff.engine.sample import Rendered, Sample, check_keywords


def load_pipeline(model: str | None = None, upscaler: str | None = None, *, dtype=None,
                  batch_size: int = 8, allow_pickle: bool = False, variant: str | None = None,
                  compilation_cache: str | None = None, devices=None, **settings) -> Pipeline:
    """Loads a diffusers-format folder (local or gs://) and, optionally, an x4 upscaler folder.

    `model=None` (or "default") is the shipped default model (with its own upscaler unless
    `upscaler="none"`). Keyword settings (steps, sampler, guidance, width, ...) become
    the run's RenderSettings; those left out (or None) come from each folder's
    render_defaults.json where it has one (see `settings_for`). `variant` (e.g. "fp16")
    loads diffusers' variant weight files of both folders, and the plain files of each
    component that has none; it is an error only where neither folder has any.
    """
    from jaxdiff import render_defaults
    from jaxdiff.checkpoints import upscaler_for
    from jaxdiff.weights.family import folder_has_variant, load_family

    for name, value in (("model", model), ("upscaler", upscaler)):
        if value is not None and not str(value).strip():  # else "" would quietly mean the default
            raise ValueError(f"load_pipeline: {name} is empty: give a diffusers folder or Hub id, or None")
    import dataclasses
    import inspect

    own = set(inspect.signature(load_pipeline).parameters) - {"settings"}
    check_keywords("load_pipeline", settings, {f.name for f in dataclasses.fields(RenderSettings)} | own)
    # Settings of the wrong kind are refused before the weights load; the model checks the rest.
    check_settings(RenderSettings(**{k: v for k, v in settings.items() if v is not None}), batch_size)
    enable_compilation_cache(compilation_cache)
    upscaler = upscaler_for(model, upscaler)
    kw = dict(dtype=dtype, allow_pickle=allow_pickle, variant=variant)
    # The variant is the run's: a folder without its files (the shipped x4 has no fp16 ones)
    # loads its plain files, as long as one of the two folders has them.
    up_has_variant = bool(variant and upscaler and folder_has_variant(upscaler, variant))
    base = load_family(model or "default", require_variant=not up_has_variant, **kw)
    render_defaults.check_kind(base.path, "base", base.unet_config.in_channels)
    up = load_family(upscaler, require_variant=False, **kw) if upscaler else None
    if up is not None:
        render_defaults.check_kind(up.path, "upscale", up.unet_config.in_channels)
    return Pipeline(base, up, batch_size=batch_size, settings=settings_for(base, up, **settings), devices=devices)


__all__ = ["DeviceMemoryError", "Pipeline", "PreparedSample", "RenderError", "RenderSettings", "Rendered", "Sample", "load_pipeline",
           "enable_compilation_cache", "settings_for"]
