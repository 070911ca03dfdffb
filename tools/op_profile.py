"""Where the UNet's time goes: its jitted forward profiled and summed by op category.

    python -m tools.op_profile --arch sd15 --size 512 --batch 16 --out profile.json   # GPU
    python -m tools.op_profile --arch tiny --batch 2                                  # CPU (tested in CI)

One UNet forward as the engine's CFG step runs it (--batch samples, two contexts each),
random weights at full size, runs a few times under jax.profiler. Each XLA op's time in
the trace is given one category, read off the optimized HLO: convolution, attention (what
the kernel in jaxdiff/models/attention.py became), matmul, reduction (group and layer
norms), elementwise, layout (copies, transposes) or other. Each op's FLOPs (dots,
convolutions, attention kernels) and bytes (operands and result) are read off the HLO too (tools/hlo_ops.py), so each category says what it
achieved in TFLOP/s and GB/s: the kernels' distance from the chip's peak and bandwidth.
On a GPU the times are kernel times on the device; on a CPU they are summed over XLA's
threads, so they add up to more than the wall time. On a GPU the tool turns XLA's command
buffers (CUDA graphs) off, or each graph of many ops would be one event: its forward's
wall time is then not quite the engine's.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

from tools.hlo_ops import (CATEGORIES, bytes_moved, categorize, op_flops, op_source, parse_hlo, stack_files,
                           stack_locations)


def op_times(trace_dir: str, module_name: str) -> dict[str, float]:
    """Seconds per HLO op of `module_name` in the trace under `trace_dir` (device lines only)."""
    import jax

    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise RuntimeError(f"no trace was written under {trace_dir}")
    data = jax.profiler.ProfileData.from_file(paths[0])
    device_planes = [p for p in data.planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
    planes = device_planes or [p for p in data.planes if p.name == "/host:CPU"]
    times: dict[str, float] = collections.defaultdict(float)
    for plane in planes:
        for line in plane.lines:
            if not device_planes and not line.name.startswith("tf_XLA"):
                continue  # on the CPU, only XLA's own threads run the program's ops
            for event in line.events:
                stats = dict(event.stats)
                op = stats.get("hlo_op")
                if op and stats.get("hlo_module", module_name) == module_name:
                    times[str(op)] += event.duration_ns * 1e-9
    return dict(times)


def profile_unet(arch: str, batch: int, size: int | None, dtype_name: str | None, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from tools.bench import _jit_module, arch_family, guided_unet_inputs, native_side, random_input, vae_factor

    dtype = jnp.dtype(dtype_name or ("bfloat16" if jax.default_backend() != "cpu" else "float32"))
    family = arch_family(arch, dtype)
    cfg = family.unet_config
    upscale = family.kind == "upscale"
    side = size or native_side(family)
    latent = side if upscale else side // vae_factor(family)
    forward, state = _jit_module(family.unet)

    inputs = guided_unet_inputs(cfg, family.text_encoder_config.hidden_size, batch, (latent, latent), dtype,
                                random_input)
    args = (state,) + tuple(a for a in inputs if a is not None)
    compiled = forward.lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    walls = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        walls.append(time.perf_counter() - t0)

    hlo = compiled.as_text()
    module_name = re.search(r"HloModule\s+([\w.\-]+)", hlo).group(1)
    trace_dir = tempfile.mkdtemp(prefix="jaxdiff-profile-")
    with jax.profiler.trace(trace_dir):
        for _ in range(reps):
            out = compiled(*args)
        jax.block_until_ready(out)
    times = op_times(trace_dir, module_name)
    if not times:
        raise RuntimeError(f"the trace under {trace_dir} holds no op of {module_name}: "
                           "this backend's profiler does not report XLA ops")
    instructions, computations = parse_hlo(hlo)
    locations = stack_locations(hlo)
    frames = stack_files(locations)
    per_category = {c: {"s": 0.0, "ops": 0, "gflop": 0.0, "gb": 0.0} for c in CATEGORIES}
    ops = []
    for op, seconds in times.items():
        # An event that is no instruction of the program (a CUDA graph of several ops, say)
        # cannot be told apart: "other", not a guess.
        category = categorize(op, instructions, computations, frames) if op in instructions else "other"
        gflop = op_flops(op, instructions, computations) / 1e9 if op in instructions else 0.0
        gb = bytes_moved(op, instructions, computations) / 1e9 if op in instructions else 0.0
        entry = per_category[category]
        entry["s"] += seconds / reps
        entry["ops"] += 1
        entry["gflop"] += gflop
        entry["gb"] += gb
        source = op_source(instructions[op][1], locations) if op in instructions else "?"
        ops.append((seconds / reps, op, category, gflop, gb, source))
    total = sum(v["s"] for v in per_category.values())
    for entry in per_category.values():
        entry.update(_rates(entry["s"], entry["gflop"], entry["gb"]))
        entry["share"] = round(entry["s"] / total, 4) if total else 0.0
        entry["s"] = round(entry["s"], 6)
        entry["gflop"], entry["gb"] = float(f"{entry['gflop']:.4g}"), float(f"{entry['gb']:.4g}")
    ops.sort(reverse=True)
    ops = [{"op": op, "category": c, "s": round(s, 6), "share": round(s / total, 4), **_rates(s, gflop, gb),
            "source": source} for s, op, c, gflop, gb, source in ops]
    return {
        "arch": arch, "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "dtype": str(dtype), "batch": batch, "unet_rows": 2 * batch, "size": side, "latent": latent,
        "forward_wall_s": round(statistics.median(walls), 6), "op_time_s": round(total, 6),
        "categories": per_category,
        "top_ops": ops[:20],
        "ops": ops,  # every op, slowest first: each category's slow ones, with where they come from
    }


def _rates(seconds: float, gflop: float, gb: float) -> dict:
    """What the ops achieved: TFLOP/s (dots, convolutions, attention) and GB/s moved."""
    if seconds <= 0:
        return {"tflop_s": None, "gb_s": None}
    return {"tflop_s": float(f"{gflop / seconds / 1e3:.4g}"), "gb_s": float(f"{gb / seconds:.4g}")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tools.op_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd15", help="sd15, sd21, x4-upscaler, default or tiny")
    p.add_argument("--batch", type=int, default=16, help="images per batch; the UNet runs 2x this (CFG)")
    p.add_argument("--size", type=int, default=None, help="image side (base) or low-res side (x4-upscaler)")
    p.add_argument("--dtype", default=None, help="bfloat16 on accelerators, float32 on CPU by default")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    if args.batch < 1 or args.reps < 1:
        p.error("--batch and --reps must be at least 1")
    # XLA on GPU runs stretches of ops as one CUDA graph (a command buffer), one event in
    # the trace: with them off, each op is an event of its own. Read when the backend starts.
    from jaxdiff.engine.programs import xla_flag_given

    if not xla_flag_given("xla_gpu_enable_command_buffer"):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_enable_command_buffer=".strip()
    result = profile_unet(args.arch, args.batch, args.size, args.dtype, args.reps)
    print(f"{result['arch']} {result['size']}px, UNet {result['batch']} samples x 2 contexts, {result['dtype']}, "
          f"{result['device']}: forward {result['forward_wall_s'] * 1e3:.2f} ms wall, "
          f"{result['op_time_s'] * 1e3:.2f} ms in ops")
    print(f"{'category':<13}{'ms':>10}{'share':>8}{'ops':>6}{'GFLOP':>10}{'TFLOP/s':>9}{'GB':>8}{'GB/s':>8}")
    for name, e in sorted(result["categories"].items(), key=lambda kv: -kv[1]["s"]):
        print(f"{name:<13}{e['s'] * 1e3:>10.3f}{e['share']:>8.1%}{e['ops']:>6}{e['gflop']:>10.1f}"
              f"{e['tflop_s'] or 0:>9.1f}{e['gb']:>8.2f}{e['gb_s'] or 0:>8.0f}")
    print("slowest ops:")
    for o in result["top_ops"][:12]:
        print(f"  {o['s'] * 1e3:8.3f} ms  {o['category']:<12} {o['tflop_s'] or 0:7.1f} TFLOP/s {o['gb_s'] or 0:7.0f} GB/s"
              f"  {o['op']:<34} {o['source']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
