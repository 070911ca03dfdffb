"""The accelerators the benchmark tools know, one row a kind, with the vendors' datasheet
figures: the bf16 peak that tools.bench gives a UNet's share of, and the peak and memory
bandwidth that tools.step_hlo's floors are at."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # as tools.step_hlo's reports and --target name it
    kind: str  # found in jax's device_kind
    platform: str  # "cuda" or "tpu"
    peak_tflops: float  # bf16 dense: the "with sparsity" figures are twice these
    memory_tbps: float | None  # None where the card's variants differ
    compile_for: str | None = None  # without the chip: a GpuTargetConfig in tools/gpu_targets/, or a TPU topology


# First match on the device kind: the H100's PCIe and NVL cards and the H200's NVL card run
# at lower clocks (and the H100 PCIe with slower memory) than the SXM ones; TPU v5 lite is v5e.
CHIPS = (
    Chip("h100-pcie", "H100 PCIe", "cuda", 756.0, 2.0),
    Chip("h100-nvl", "H100 NVL", "cuda", 835.0, 3.9),
    Chip("h100", "H100", "cuda", 989.0, 3.35, "h100.txtpb"),
    Chip("h200-nvl", "H200 NVL", "cuda", 835.0, 4.8),
    Chip("h200", "H200", "cuda", 989.0, 4.8, "h200.txtpb"),
    Chip("a100", "A100", "cuda", 312.0, None),
    Chip("l4", "L4", "cuda", 121.0, 0.3),
    Chip("v5e", "TPU v5 lite", "tpu", 197.0, 0.819, "v5e:2x2"),
    Chip("v6e", "TPU v6 lite", "tpu", 918.0, 1.64, "v6e:2x2"),
    Chip("v5p", "TPU v5", "tpu", 459.0, 2.765, "v5p:2x2x1"),
)
# What tools.step_hlo can compile for without the chip.
TARGETS = {chip.name: chip for chip in CHIPS if chip.compile_for}


def chip_of(device_kind: str) -> Chip | None:
    """The row for a jax device_kind ("NVIDIA H200", "TPU v5 lite"); None for others (CPU)."""
    return next((chip for chip in CHIPS if chip.kind in device_kind), None)
