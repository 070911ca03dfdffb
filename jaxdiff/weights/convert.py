"""PyTorch (diffusers / transformers) tensor names and layouts -> NNX state.

Convention that makes this generic: every jaxdiff module mirrors the attribute names of
the PyTorch module it reproduces (lists are `nnx.List`), so a checkpoint key
`down_blocks.0.resnets.1.conv1.weight` addresses `('down_blocks', 0, 'resnets', 1,
'conv1', <leaf>)`. Only the leaf name and the layout differ:

| PyTorch leaf | NNX leaf    | layout change                           |
| weight (2-d) | kernel      | (out, in) -> (in, out)                  |
| weight (4-d) | kernel      | OIHW -> HWIO; a 1x1 conv into a Linear is squeezed |
| weight (1-d) | scale       | none (norms)                            |
| weight       | embedding   | none (nn.Embedding)                     |
| bias         | bias        | none                                    |
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import jax
import numpy as np
from flax import nnx

from jaxdiff.weights.export import to_pytorch_layout


class CheckpointError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def _nnx_path(torch_key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in torch_key.split("."))


def to_nnx_layout(leaf: str, array: np.ndarray, target_shape: tuple) -> np.ndarray:
    """Reorders one PyTorch tensor into the layout of the NNX leaf `leaf`."""
    if leaf == "kernel":
        if array.ndim == 4 and len(target_shape) == 2 and array.shape[2:] == (1, 1):  # 1x1 conv for a Linear
            array = array[:, :, 0, 0]
        if array.ndim == 2:
            array = array.T
        elif array.ndim == 4:
            array = array.transpose(2, 3, 1, 0)
        elif array.ndim == 3:  # Conv1d: (O, I, W) -> (W, I, O)
            array = array.transpose(2, 1, 0)
    elif leaf == "scale" and array.ndim == 4:  # legacy norms stored as (C, 1, 1, 1)
        array = array.reshape(-1)
    return array


def _place(key: str, value: np.ndarray, dtype, sharding) -> jax.Array:
    if sharding is None:  # cast on the host: jnp.asarray's cast compiles a program per shape
        return jax.device_put(np.asarray(value, dtype=dtype))
    if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding):
        sharding = sharding(key, value.shape)
    return jax.device_put(np.asarray(value, dtype=dtype), sharding)


def load_state_dict(model: nnx.Module, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                    *, dtype=None, source: str = "checkpoint",
                    ignore: Iterable[str] = (), sharding=None,
                    rename: Callable[[str], str] | None = None) -> nnx.Module:
    """Fills `model` (concrete or from `nnx.eval_shape`) with PyTorch-named tensors.

    Strict: an unknown key, a wrong shape, or a parameter left without a value raises
    CheckpointError naming `source` and the key. `tensors` may be a mapping or a lazy
    iterable of (key, array), so a loader can stream one tensor at a time. Keys whose
    name ends with one of `ignore` (buffers such as `position_ids`) are skipped.
    `sharding` places each value: None puts it on the default device, a
    `jax.sharding.Sharding` is used for every value, a callable `(key, shape) -> Sharding`
    chooses per parameter. `rename` maps a key as the file names it to the model's name for
    it (an added prefix, a legacy name); errors name the key as it is in the file.
    """
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    filled: set[tuple] = set()
    ignore = tuple(ignore)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for key, array in items:
        if ignore and key.endswith(ignore):
            continue
        path = _nnx_path(rename(key) if rename is not None else key)
        leaf = path[-1]
        if leaf == "weight":
            candidates = [path[:-1] + (name,) for name in _WEIGHT_LEAVES]
        else:
            candidates = [path]
        found = [p for p in candidates if p in flat]
        if not found:
            raise CheckpointError(
                f"{source}: unexpected key {key!r} (no such parameter in the model; "
                f"is the config.json from the same checkpoint?)")
        target = found[0]
        if target in filled:  # e.g. a VAE file with both the legacy and the current attention names
            raise CheckpointError(f"{source}: key {key!r} fills a parameter that another key of the "
                                  f"checkpoint already filled; keep one of the two")
        variable = flat[target]
        want = tuple(variable.get_value().shape)
        array = np.asarray(array)
        value = to_nnx_layout(target[-1], array, want)
        if tuple(value.shape) != want:
            conv_1x1 = array.ndim == 4 and len(want) == 2
            expected = to_pytorch_layout(target[-1], np.broadcast_to(np.float32(0), want), as_conv_1x1=conv_1x1)
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(array.shape)}, the model expects "
                f"{tuple(expected.shape)} (in PyTorch layout) from its config.json")
        target_dtype = dtype or variable.get_value().dtype
        variable.set_value(_place(key, value, target_dtype, sharding))
        filled.add(target)
    # Named as PyTorch names them (conv_out.weight, not conv_out.kernel): what a user looks
    # for in the checkpoint.
    missing = [".".join(map(str, p[:-1] + ("weight" if p[-1] in _WEIGHT_LEAVES else p[-1],))) for p in flat
               if p not in filled and isinstance(flat[p], nnx.Param)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{source}: missing keys {shown}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
