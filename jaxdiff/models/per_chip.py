"""Kernels XLA cannot partition, run on each chip's own samples."""

from __future__ import annotations

import jax


def per_chip(kernel, batched: tuple, replicated: tuple = (), *, otherwise):
    """kernel(*batched, *replicated), run on each chip's own samples when a mesh of several
    chips is in context: `batched` arrays split on their first axis, `replicated` ones go
    whole to every chip.

    XLA cannot partition a Pallas or Mosaic kernel: a batch-sharded jit holding one does not
    compile ("Mosaic kernels cannot be automatically partitioned"), or runs the whole batch
    on every chip. Inside shard_map each chip runs it on its own samples. A batch that does
    not split over the chips calls `otherwise` (an XLA path) with the same arguments.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(*batched, *replicated)
    if batched[0].shape[0] % mesh.size:
        return otherwise(*batched, *replicated)
    batch, whole = jax.sharding.PartitionSpec(mesh.axis_names), jax.sharding.PartitionSpec()
    return jax.shard_map(kernel, mesh=mesh, in_specs=(batch,) * len(batched) + (whole,) * len(replicated),
                         out_specs=batch, check_vma=False)(*batched, *replicated)
