"""jaxdiff: offline latent-diffusion rendering in JAX."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Sample and Rendered come with the engine's package, which imports JAX: the command
    # answers --help and bad flags without it.
    if name in ("Rendered", "Sample"):
        from jaxdiff.engine import sample

        return getattr(sample, name)
    raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")


def load_pipeline(*args, **kwargs):
    """See `jaxdiff.engine.load_pipeline` (imported lazily: JAX starts only when needed)."""
    from jaxdiff.engine import load_pipeline as _load

    return _load(*args, **kwargs)


__all__ = ["Rendered", "Sample", "load_pipeline", "__version__"]
