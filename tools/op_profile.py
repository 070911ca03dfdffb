"""Where the UNet's time goes: its jitted forward profiled and summed by op category.

    python -m tools.op_profile --arch sd15 --size 512 --batch 16 --out profile.json   # GPU
    python -m tools.op_profile --arch tiny --batch 2                                  # CPU (tested in CI)

One UNet forward at the CFG batch (2 x --batch), random weights at full size, runs a few
times under jax.profiler. Each XLA op's time in the trace is given one category, read off
the optimized HLO: convolution, attention (what the kernel in jaxdiff/models/attention.py
became), matmul, reduction (group and layer norms), elementwise, layout (copies, transposes)
or other. On a GPU the times are kernel times on the device; on a CPU they are summed over
XLA's threads, so they add up to more than the wall time.
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

CATEGORIES = ("convolution", "attention", "matmul", "reduction", "elementwise", "layout", "other")

# `name = type opcode(`, with or without the % sigil; tuple types are parenthesised.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\(.*?\)|\S+)\s+([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_SOURCE = re.compile(r'source_file="([^"]+)"')
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_TABLE_ROW = re.compile(r'^(\d+)\s+(?:"(.*)"|\{(.*)\})\s*$')
_LAYOUT_OPS = {"copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "concatenate",
               "dynamic-slice", "dynamic-update-slice", "pad", "parameter", "tuple", "get-tuple-element",
               "constant", "iota"}


def stack_locations(text: str) -> dict[int, list[str]]:
    """Each stack frame's call chain, innermost first, as "file.py:line function".

    Newer XLA prints op sources as `stack_frame_id=N` into tables at the top of the module:
    FileNames, FunctionNames, FileLocations, StackFrames, where a frame's printed
    parent_frame_id is its parent's id plus one (0: none).
    """
    tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
    table = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table = line
            continue
        m = _TABLE_ROW.match(line) if table else None
        if not m:
            table = None if table and line.strip() and not line.startswith(" ") else table
            continue
        tables[table][int(m.group(1))] = m.group(2) if m.group(2) is not None else m.group(3)

    def field(row: str, name: str) -> int:
        found = re.search(name + r"=(\d+)", row)
        return int(found.group(1)) if found else 0

    chains = {}
    for frame_id in tables["StackFrames"]:
        chain, frame, seen = [], frame_id, set()
        while frame and frame not in seen and frame in tables["StackFrames"]:
            seen.add(frame)
            row = tables["StackFrames"][frame]
            location = tables["FileLocations"].get(field(row, "file_location_id"), "")
            file = os.path.basename(tables["FileNames"].get(field(location, "file_name_id"), ""))
            function = tables["FunctionNames"].get(field(location, "function_name_id"), "")
            chain.append(f"{file}:{field(location, 'line')} {function}")
            frame = field(row, "parent_frame_id") - 1
        chains[frame_id] = chain
    return chains


def stack_files(text: str) -> dict[int, set[str]]:
    """Source files (base names) of each stack frame in the module's frame tables."""
    return {frame: {location.split(":")[0] for location in chain}
            for frame, chain in stack_locations(text).items()}


def parse_hlo(text: str) -> tuple[dict, dict]:
    """(instructions, computations) of an HLO module's text.

    instructions: name -> (opcode, line); computations: name -> list of instruction names.
    """
    instructions, computations = {}, {}
    current = None
    for line in text.splitlines():
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            instructions[m.group(1)] = (m.group(2), line)
            computations[current].append(m.group(1))
            continue
        m = _COMPUTATION.match(line)
        # Instructions hold "="; headers only inside /*index=N*/ comments of long tuples.
        if m and "=" not in re.sub(r"/\*.*?\*/", "", line).split("{")[0]:
            current = m.group(1)
            computations[current] = []
    return instructions, computations


def _custom_call_category(target: str) -> str:
    t = target.lower()
    if "conv" in t:
        return "convolution"
    if "fmha" in t or "flash" in t or "attention" in t:
        return "attention"
    if "gemm" in t or "matmul" in t or "cublas" in t:
        return "matmul"
    return "other"


def categorize(name: str, instructions: dict, computations: dict, frames: dict | None = None) -> str:
    """The category of one top-level instruction (a fusion: by what it fuses)."""
    seen_ops, sources, targets = set(), set(), []
    stack, visited = [name], set()
    while stack:
        inst = stack.pop()
        if inst in visited or inst not in instructions:
            continue
        visited.add(inst)
        opcode, line = instructions[inst]
        seen_ops.add(opcode)
        sources.update(os.path.basename(s) for s in _SOURCE.findall(line))
        for frame_id in _FRAME_ID.findall(line):
            sources.update((frames or {}).get(int(frame_id), ()))
        targets += _TARGET.findall(line)
        for called in _CALLS.findall(line):
            stack.extend(computations.get(called, ()))
    if "attention.py" in sources:
        return "attention"
    for target in targets:
        category = _custom_call_category(target)
        if category != "other":
            return category
    if "convolution" in seen_ops:
        return "convolution"
    if "dot" in seen_ops:
        return "matmul"
    if "reduce" in seen_ops or "reduce-window" in seen_ops:
        return "reduction"
    if seen_ops - {"fusion"} <= _LAYOUT_OPS:  # a fusion of copies, slices, transposes
        return "layout"
    if seen_ops - _LAYOUT_OPS - {"custom-call", "fusion", "while", "call", "conditional"}:
        return "elementwise"
    return "other"


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
    import numpy as np

    from tools.bench import _jit_module, arch_family, native_side, vae_factor

    dtype = jnp.dtype(dtype_name or ("bfloat16" if jax.default_backend() != "cpu" else "float32"))
    family = arch_family(arch, dtype)
    cfg = family.unet_config
    upscale = family.kind == "upscale"
    side = size or native_side(family)
    latent = side if upscale else side // vae_factor(family)
    forward, state = _jit_module(family.unet)

    rng = np.random.default_rng(0)
    n = 2 * batch
    args = (state, jnp.asarray(rng.standard_normal((n, latent, latent, cfg.in_channels)), dtype),
            jnp.full((n,), 500.0, jnp.float32),
            jnp.asarray(rng.standard_normal((n, 77, family.text_encoder_config.hidden_size)), dtype))
    if upscale:
        args += (jnp.full((n,), 20, jnp.int32),)
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
    frames = stack_files(hlo)
    per_category = {c: {"s": 0.0, "ops": 0} for c in CATEGORIES}
    top = []
    for op, seconds in times.items():
        category = categorize(op, instructions, computations, frames)
        per_category[category]["s"] += seconds / reps
        per_category[category]["ops"] += 1
        top.append((seconds / reps, op, category))
    total = sum(v["s"] for v in per_category.values())
    for entry in per_category.values():
        entry["share"] = round(entry["s"] / total, 4) if total else 0.0
        entry["s"] = round(entry["s"], 6)
    top.sort(reverse=True)
    return {
        "arch": arch, "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "dtype": str(dtype), "batch": batch, "unet_batch": n, "size": side, "latent": latent,
        "forward_wall_s": round(statistics.median(walls), 6), "op_time_s": round(total, 6),
        "categories": per_category,
        "top_ops": [{"op": op, "category": c, "s": round(s, 6), "share": round(s / total, 4)}
                    for s, op, c in top[:20]],
    }


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
    result = profile_unet(args.arch, args.batch, args.size, args.dtype, args.reps)
    print(f"{result['arch']} {result['size']}px, UNet batch {result['unet_batch']}, {result['dtype']}, "
          f"{result['device']}: forward {result['forward_wall_s'] * 1e3:.2f} ms wall, "
          f"{result['op_time_s'] * 1e3:.2f} ms in ops")
    print(f"{'category':<13}{'ms':>10}{'share':>8}{'ops':>6}")
    for name, e in sorted(result["categories"].items(), key=lambda kv: -kv[1]["s"]):
        print(f"{name:<13}{e['s'] * 1e3:>10.3f}{e['share']:>8.1%}{e['ops']:>6}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
