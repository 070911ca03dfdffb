"""Where models come from: the family shipped inside the package (so a fresh install
renders offline), folders (local or gs://), and Hub models already in the local Hugging
Face cache (never downloaded here)."""

from __future__ import annotations

import json
import os
import re

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


_SHIPPED = {"default": default_model_path, "default-x4": default_upscaler_path}


def upscaler_for(model: str | None, upscaler: str | None) -> str | None:
    """The upscaler a (model, upscaler) choice loads, by name: the shipped one with the
    shipped model unless told otherwise, the one named, or None ("none" or not given)."""
    if upscaler is None and model in (None, "default"):
        return "default-x4"
    return None if upscaler is None or str(upscaler).strip().lower() in ("none", "") else upscaler
_REPO_ID = re.compile(r"[\w.\-]+/[\w.\-]+")


def resolve_model(name: str) -> str:
    """The folder a model argument names.

    A gs:// URL or an existing local path is itself; `default` / `default-x4` are the
    shipped family; an `owner/name` Hub id is its snapshot in the local Hugging Face cache
    (`HF_HUB_CACHE`), found without network; anything else is returned as given, for the
    loader to name what is missing.
    """
    name = str(name)
    if name in _SHIPPED:
        return _SHIPPED[name]()
    if not name.startswith("gs://") and not os.path.exists(name) and "/" not in name:
        import difflib

        close = difflib.get_close_matches(name.lower(), [*_SHIPPED, "none"], n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise FileNotFoundError(f"model {name!r} is no folder here, nor a shipped model ({', '.join(_SHIPPED)}): "
                                f"give a diffusers folder, a gs:// URL or an owner/name Hub id{hint}")
    if name.startswith("gs://") or os.path.exists(name) or not _REPO_ID.fullmatch(name):
        return name
    import huggingface_hub
    from huggingface_hub import constants

    try:
        return huggingface_hub.snapshot_download(name, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, or a cache entry without a snapshot
        raise FileNotFoundError(
            f"{name!r} is no folder here and not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}): download it there first (`hf download {name}`), "
            f"or pass the diffusers folder") from e


def size_multiple(folder: str) -> int:
    """What each side of a render on the model in `folder` must be a multiple of: the VAE's
    downsampling times the UNet's, read from their configs (no JAX, no weights)."""
    from jaxdiff import storage

    def halvings(part: str) -> int:
        config = json.loads(storage.read_text(storage.join(folder, part, "config.json")))
        return len(config["block_out_channels"]) - 1

    return 2 ** (halvings("vae") + halvings("unet"))
