"""NNX state -> PyTorch (diffusers / transformers) tensor names and layouts.

The inverse of `jaxdiff.weights.convert`: a module whose attribute names mirror the
PyTorch module is written as a state dict that diffusers / transformers load directly.

| NNX leaf  | PyTorch leaf | layout change                    |
| kernel    | weight       | (in, out) -> (out, in); HWIO -> OIHW; Conv1d (W, I, O) -> (O, I, W) |
| scale     | weight       | none (norms)                     |
| embedding | weight       | none (nn.Embedding)              |
| bias      | bias         | none                             |
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np
from flax import nnx

_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def to_pytorch_layout(leaf: str, array: np.ndarray, *, as_conv_1x1: bool = False) -> np.ndarray:
    """Reorders one NNX leaf into PyTorch's layout.

    `as_conv_1x1` writes a Linear kernel as a (out, in, 1, 1) convolution, for checkpoints
    whose PyTorch module is a 1x1 Conv2d (SD 1.x's `proj_in` / `proj_out`).
    """
    if leaf != "kernel":
        return array
    if array.ndim == 2:
        array = array.T
        return array[:, :, None, None] if as_conv_1x1 else array
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if array.ndim == 3:
        return array.transpose(2, 1, 0)
    raise ValueError(f"kernel of shape {array.shape} has no PyTorch layout (expected 2, 3 or 4 dims)")


def state_dict(module: nnx.Module, *, dtype=None, prefix: str = "",
               conv_1x1: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Every parameter of `module` as {PyTorch key: contiguous numpy array}.

    `dtype` casts every tensor (e.g. np.float16 for a smaller file); `prefix` goes in front
    of every key (e.g. "text_model." is already part of our CLIP names, so none is needed
    there); keys ending with one of `conv_1x1` are written as 1x1 convolutions.
    """
    conv_1x1 = tuple(conv_1x1)
    out: dict[str, np.ndarray] = {}
    for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        leaf = str(path[-1])
        if leaf not in _TORCH_LEAF:
            raise ValueError(f"parameter {'.'.join(map(str, path))}: leaf {leaf!r} has no PyTorch name")
        key = prefix + ".".join(map(str, path[:-1] + (_TORCH_LEAF[leaf],)))
        if key in out:
            raise ValueError(f"two parameters map to the PyTorch key {key!r}")
        array = np.asarray(variable.get_value())
        base_key = key[: -len(".weight")] if key.endswith(".weight") else key
        array = to_pytorch_layout(leaf, array, as_conv_1x1=bool(conv_1x1) and base_key.endswith(conv_1x1))
        if dtype is not None:
            array = array.astype(dtype)
        out[key] = np.ascontiguousarray(array)
    return out


def save_safetensors(module: nnx.Module, path: str, *, dtype=None, prefix: str = "",
                     conv_1x1: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Writes `state_dict(module)` to a local safetensors file that PyTorch loaders accept."""
    from safetensors.numpy import save_file

    tensors = state_dict(module, dtype=dtype, prefix=prefix, conv_1x1=conv_1x1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # transformers refuses safetensors files without a "format" entry in their metadata.
    save_file(tensors, path, metadata={"format": "pt"})
    return tensors


def write_json(path: str, value: dict) -> None:
    """A config file as diffusers / transformers write them: sorted keys, 2-space indent."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
