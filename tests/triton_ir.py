"""Pallas kernels lowered for a GPU on any machine, read back as Triton IR: the tests can
see what Triton will run without a card (the Triton compiler itself needs one)."""

from __future__ import annotations

import re

import jax
from jax._src.lib import triton
from jax._src.lib.mlir import ir


def gpu_held() -> bool:
    """Whether this process holds a GPU, where the kernels compile for real."""
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def kernels(fn, *args) -> dict[str, str]:
    """Each Pallas Triton kernel of jit(fn)(*args) lowered for CUDA: {name: Triton IR}."""
    module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    found = {}

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    inner = inner.operation
                    if inner.name == "stablehlo.custom_call" and "mhlo.backend_config" in inner.attributes:
                        config = ir.DictAttr(inner.attributes["mhlo.backend_config"])
                        if "ir" in config and "name" in config:
                            name = ir.StringAttr(config["name"]).value
                            with ir.Context() as context:
                                triton.dialect.register_dialect(context)
                                found[name] = str(ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes))
                    walk(inner)

    walk(module.operation)
    return found


def unmasked_memory_ops(triton_ir: str) -> list[str]:
    """The loads and stores that carry no mask (tt.load ptr[, mask[, other]]; tt.store ptr,
    value[, mask]): Triton checks no bounds, so each of these must be in bounds by itself."""
    found = []
    for line in triton_ir.splitlines():
        op = re.search(r"tt\.(load|store) ((?:%[\w#]+(?:, )?)+)", line)
        if op and len(op.group(2).rstrip(", ").split(", ")) == {"load": 1, "store": 2}[op.group(1)]:
            found.append(line.strip())
    return found
