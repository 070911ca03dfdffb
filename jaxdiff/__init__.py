"""jaxdiff: offline latent-diffusion rendering in JAX."""

from jaxdiff.engine.sample import Rendered, Sample

__version__ = "0.1.0"


def load_pipeline(*args, **kwargs):
    """See `jaxdiff.engine.load_pipeline` (imported lazily: JAX starts only when needed)."""
    from jaxdiff.engine import load_pipeline as _load

    return _load(*args, **kwargs)


__all__ = ["Rendered", "Sample", "load_pipeline", "__version__"]
