"""The model family shipped inside the package, so a fresh install renders offline."""

from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def _shipped(name: str) -> str:
    path = os.path.join(_HERE, name)
    if not os.path.exists(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"the shipped model {name!r} is not installed at {path}; name a diffusers folder "
            f"with --model / model=..., or reinstall jaxdiff")
    return path


def default_model_path() -> str:
    return _shipped("default")


def default_upscaler_path() -> str:
    return _shipped("default-x4")
