"""Which path a model op takes where there are several: the environment variables that ask
for one (JAXDIFF_ATTENTION, JAXDIFF_GEGLU, JAXDIFF_LAYER_NORM, JAXDIFF_GROUP_NORM), read
when a model is traced."""

from __future__ import annotations

import os


def chosen(variable: str, paths: tuple[str, ...], forced: str | None = None) -> str:
    """`forced` if given, else the variable's value, else the first of `paths` (the
    default); a value not among `paths` is refused naming the variable."""
    choice = forced or os.environ.get(variable, paths[0])
    if choice not in paths:
        raise ValueError(f"{variable}={choice!r} is not one of {paths}")
    return choice
