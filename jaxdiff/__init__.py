"""jaxdiff: offline latent-diffusion rendering in JAX."""

__version__ = "0.1.0"
