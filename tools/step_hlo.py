"""One UNet denoising step as XLA compiles it for a chip, without the chip: ops, bytes, floors.

    pip install "jax[cuda12]"   # XLA's GPU compiler (the CUDA plugin); no GPU or driver needed
    pip install libtpu          # the TPU compiler (jax[tpu] pins the matching version)
    python -m tools.step_hlo --arch sd15 --batch 16 --target h200 --out sd15-h200.json
    python -m tools.step_hlo --arch sd15 --batch 8 --target v5e --chips 4
    python -m tools.step_hlo --program base --arch sd15 --batch 8 --target v5e --chips 4
    python -m tools.step_hlo --arch sd15 --batch 16 --target local  # on a GPU machine: autotuned
    python -m tools.step_hlo --arch tiny --batch 1 --target local   # the CPU (tested in CI)

The step (the UNet as the engine's CFG step calls it: --batch samples, two contexts each,
so a CFG batch of 2 x --batch rows) is compiled inside a scan, as the generation program
runs it, so what XLA hoists out of the loop (weight transposes, merged weight matrices)
is not counted; with --chips the batch is sharded over several chips with
their mesh in context, as the engine does, and the program is one chip's. Each top-level op
of the loop body gets op_profile's category and its bytes moved: the sizes of its operands
and results, an upper bound (the caches keep some). From them, two floors for one step:
compute (the UNet's FLOPs at the chip's bf16 peak) and memory (the memory-bound ops' bytes
at its bandwidth), and the structure worth checking: convolution layouts, attention
kernels, GEMM kernels. `--program base` compiles the engine's whole text-to-image program
instead (text encoder, sampler scan, VAE decode) and counts its custom calls: the check
that it compiles for that chip.

Programs compile with the engine's XLA options (jaxdiff.engine.programs.compiler_options:
on GPU, cuBLAS GEMMs and no Triton). Without a GPU there is no autotuning: the conv
algorithms are XLA's defaults, not what a real run picks; fusion, layouts and the op
sequence are the GPU compiler's own. GPU targets are XLA GpuTargetConfig files in
tools/gpu_targets/; TPU targets are libtpu's own topologies, where the check is that the
program compiles (Pallas kernels through Mosaic, the sharded batch) and which kernels it
holds: their byte counts include async copies between memory spaces, so no floors.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import sys

from tools.chips import TARGETS, Chip, chip_of
from tools.hlo_ops import (CATEGORIES, bytes_moved, categorize, loop_body, loop_invariant, op_flops, op_source,
                           parse_hlo, program_flops, stack_files, stack_locations)

TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")
MEMORY_BOUND = ("elementwise", "reduction", "layout", "other")

_NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}


def summarize(text: str, body: str | None = None, top: int = 15,
              chip_rates: tuple[float, float] | None = None, invariant_report: bool = True) -> dict:
    """Ops, bytes and FLOPs by category over the top-level ops of one computation (default:
    the loop body, and with `invariant_report` its loop-invariant kernels apart:
    `loop_invariant`), with the `top` ops that move the most bytes. With the chip's
    (TFLOP/s, TB/s), also the roofline: each op at its compute or memory time, the slower."""
    instructions, computations = parse_hlo(text)
    locations = stack_locations(text)
    frames = stack_files(locations)
    invariants = body is None and invariant_report
    body = body or loop_body(text)
    invariant = loop_invariant(body, instructions, computations) if invariants else set()
    invariant_kernels, invariant_bytes = 0, collections.Counter()
    per_category = {c: {"ops": 0, "bytes": 0, "flops": 0.0} for c in CATEGORIES}
    kernels = collections.Counter()
    conv_layouts = collections.Counter()
    heaviest = []
    roofline_ms = 0.0
    for name in computations[body]:
        opcode, line = instructions[name]
        if opcode in _NOT_KERNELS:
            continue
        category = categorize(name, instructions, computations, frames)
        moved, flops = bytes_moved(name, instructions, computations), op_flops(name, instructions, computations)
        per_category[category]["ops"] += 1
        per_category[category]["bytes"] += moved
        per_category[category]["flops"] += flops
        if chip_rates:
            # FLOP / (TFLOP/s) / 1e9 and byte / (TB/s) / 1e9 are milliseconds.
            roofline_ms += max(flops / chip_rates[0], moved / chip_rates[1]) / 1e9
        heaviest.append((moved, name, category, op_source(line, locations)))
        if name in invariant:
            invariant_kernels += 1
            invariant_bytes[op_source(line, locations)] += moved
        target = re.search(r'custom_call_target="([^"]+)"', line)
        kind = re.search(r"kind=(\w+)", line)
        kernels[target.group(1) if target else f"{opcode}:{kind.group(1)}" if kind else opcode] += 1
        labels = re.search(r"dim_labels=(\S+?),", line)
        if category == "convolution" and labels:
            conv_layouts[labels.group(1)] += 1
    heaviest.sort(reverse=True)
    result = {"categories": per_category, "kernels": dict(kernels.most_common()),
              "conv_layouts": dict(conv_layouts),
              "top_ops": [{"op": name, "category": category, "mb": round(moved / 1e6, 1), "source": source}
                          for moved, name, category, source in heaviest[:top]]}
    if invariants:
        result["loop_invariant"] = {
            "kernels": invariant_kernels,
            "mb": round(sum(invariant_bytes.values()) / 1e6, 1),
            "sources_mb": {source: round(moved / 1e6, 1) for source, moved in invariant_bytes.most_common()}}
    if chip_rates:
        result["roofline_ms"] = roofline_ms
    return result


def arch_configs(arch: str) -> dict:
    """Config dicts (text_encoder, unet, vae, scheduler) of a named architecture or the
    shipped default model."""
    if arch == "default":
        from jaxdiff.checkpoints import default_model_path
        configs = {}
        for part, file in (("text_encoder", "config.json"), ("unet", "config.json"), ("vae", "config.json"),
                           ("scheduler", "scheduler_config.json")):
            with open(os.path.join(default_model_path(), part, file)) as f:
                configs[part] = json.load(f)
        return configs
    from configs.architectures import ARCHITECTURES
    text_cfg, unet_cfg, vae_cfg, scheduler, _ = ARCHITECTURES[arch]
    return {"text_encoder": text_cfg, "unet": unet_cfg, "vae": vae_cfg, "scheduler": scheduler}


def _backend(target: str) -> str | None:
    """The backend a target's chips are ("gpu", "tpu"); None for this machine's own."""
    return None if target == "local" else {"cuda": "gpu", "tpu": "tpu"}[TARGETS[target].platform]


def cuda_capability(target_config: str) -> tuple[int, int] | None:
    """(major, minor) compute capability of a GpuTargetConfig's device; None if it names none."""
    found = re.search(r"cuda_compute_capability \{([^}]*)\}", target_config)
    if not found:
        return None
    parts = dict(re.findall(r"(major|minor): (\d+)", found.group(1)))
    return int(parts.get("major", 0)), int(parts.get("minor", 0))  # a zero field is left out


def _devices(target: str, chips: int) -> tuple[list, str | None, tuple[int, ...] | None]:
    """(devices to compile for, backend whose attention kernels to pick, its CUDA compute
    capability) for a target."""
    import jax

    capability = None
    if target == "local":
        devices, backend = jax.devices(), None
    else:
        from jax.experimental import topologies

        platform, where = TARGETS[target].platform, TARGETS[target].compile_for
        if platform == "cuda":
            with open(os.path.join(TARGETS_DIR, where)) as f:
                config = f.read()
                capability = cuda_capability(config)
                # One device: the GPU plugin's deviceless topologies are single-host.
                try:
                    topology = topologies.get_topology_desc(platform="cuda", target_config=config,
                                                            topology="1x1x1")
                except NotImplementedError as e:  # jax without its CUDA plugin
                    raise SystemExit(f"--target {target} needs jax's CUDA plugin, GPU or not: "
                                     f"pip install 'jax[cuda12]' ({e})") from e
        else:
            topology = topologies.get_topology_desc(topology_name=where, platform="tpu")
        devices, backend = topology.devices, _backend(target)
    if chips > len(devices):
        raise ValueError(f"--chips {chips}: the {target} target has {len(devices)} device(s)")
    return list(devices[:chips]), backend, capability


def _dtype(target: str):
    """bfloat16 on accelerators, float32 when compiling for this machine's CPU."""
    import jax
    import jax.numpy as jnp

    return jnp.float32 if target == "local" and jax.default_backend() == "cpu" else jnp.bfloat16


@contextlib.contextmanager
def _cudnn_checks_for(capability: tuple[int, ...] | None):
    """jax checks what cuDNN attention takes (head dims over 128 from Hopper on) against the
    GPU this process holds, none when compiling ahead of time: within the block, against
    the target's compute capability, as the engine on that GPU would be."""
    if capability is None:
        yield
        return
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    held = cudnn_attention.check_compute_capability
    cudnn_attention.check_compute_capability = lambda wanted: capability >= tuple(map(int, wanted.split(".")))
    try:
        yield
    finally:
        cudnn_attention.check_compute_capability = held


def _compile_for(target: str, chips: int, lower) -> str:
    """Optimized HLO of `lower(replicated, batched)` (a Lowered, traced from a fresh
    function) for `chips` chips of `target`: the batch sharded over them, their mesh in
    context and the attention kernels theirs, as the engine runs it."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxdiff.engine.programs import compiler_options
    from jaxdiff.models import attention

    devices, backend, capability = _devices(target, chips)
    mesh = Mesh(np.array(devices), ("data",))
    with (attention.dispatch(backend=backend, cuda_capability=capability), jax.set_mesh(mesh),
          _cudnn_checks_for(capability)):
        lowered = lower(NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data")))
    # The engine's XLA options for the target's backend (on GPU: cuBLAS GEMMs, not Triton).
    return lowered.compile(compiler_options=compiler_options(backend)).as_text()


def compile_step(arch: str, batch: int, target: str, size: int | None = None,
                 chips: int = 1) -> tuple[str, float]:
    """(optimized HLO text, UNet GFLOP per step and chip) of a three-step scan of the UNet.

    With several chips the batch is sharded over them and the program traced with their
    mesh in context, as the engine does; the HLO is then one chip's.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig
    from jaxdiff.weights.family import abstract_model
    from tools.bench import countable_kernels, guided_unet_inputs

    configs = arch_configs(arch)
    cfg, context_dim = UNetConfig.from_dict(configs["unet"]), configs["text_encoder"]["hidden_size"]
    dtype = _dtype(target)
    latent = size or cfg.sample_size or 64
    if batch % chips:
        raise ValueError(f"the batch {batch} does not split over {chips} chips")
    model = abstract_model(UNet2DConditionModel, cfg, dtype)
    graphdef, state = nnx.split(model)
    upscale = cfg.num_class_embeds is not None

    def lowered_scan(weights_sharding, batch_sharding):
        # A fresh function per lowering: jit's trace cache does not see the attention
        # dispatch, which differs between the local and the target's lowering.
        def scan(state, sample, t, context, labels):
            # Inpainting and upscaling UNets also read fixed channels (mask and masked image,
            # or the low-res image) beside the latent they denoise.
            x, image = jnp.split(sample, [cfg.out_channels], axis=-1)
            model = nnx.merge(graphdef, state)
            context = model.prepare(context)  # as the engine: what every step shares, before the loop

            def step(x, i):
                sample = jnp.concatenate([x, image], axis=-1)
                out = model(sample, t + i, context, labels) if upscale else model(sample, t + i, context)
                pairs = out.reshape((-1, 2) + out.shape[1:])  # CFG, as the engine's step combines them
                return (pairs[:, 0] + 7.5 * (pairs[:, 1] - pairs[:, 0])).astype(x.dtype), None
            return jax.lax.scan(step, x, jnp.arange(3, dtype=jnp.float32))[0]

        spec = lambda shape, dt, seed: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding)
        args = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=weights_sharding), state),
                *guided_unet_inputs(cfg, context_dim, batch, (latent, latent), dtype, spec))
        return jax.jit(scan).trace(*args).lower()

    # FLOPs from a lowering with XLA's whole attention, as tools/bench.py counts them; they
    # do not depend on the backend. The loop's body counts once: that is one step.
    with countable_kernels():
        flops = program_flops(lowered_scan(None, None).as_text(dialect="hlo"))
    gflop = flops / 1e9 / chips if flops else float("nan")
    return _compile_for(target, chips, lowered_scan), gflop


def compile_base_program(arch: str, batch: int, target: str, size: int | None = None,
                         chips: int = 1, steps: int = 2) -> str:
    """Optimized HLO of the engine's whole text-to-image program (text encoder, sampler
    scan with CFG, VAE decode), built by jaxdiff.engine.programs as the engine builds it,
    with the batch sharded over `chips` and their mesh in context."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdiff import samplers
    from jaxdiff.engine.programs import BaseSignature, make_base_program
    from jaxdiff.models.clip import CLIPTextConfig, CLIPTextModel
    from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig
    from jaxdiff.models.vae import AutoencoderKL, VAEConfig
    from jaxdiff.weights.family import abstract_model

    configs = arch_configs(arch)
    dtype = _dtype(target)
    parts = ((CLIPTextModel, CLIPTextConfig, "text_encoder"), (UNet2DConditionModel, UNetConfig, "unet"),
             (AutoencoderKL, VAEConfig, "vae"))
    models = [abstract_model(m, c.from_dict(configs[k]), dtype) for m, c, k in parts]
    graphdefs, states = zip(*(nnx.split(m) for m in models))
    vae_cfg, unet_cfg = configs["vae"], configs["unet"]
    factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    latent = size or unet_cfg.get("sample_size") or 64
    channels = vae_cfg["latent_channels"]
    if batch % chips:
        raise ValueError(f"the batch {batch} does not split over {chips} chips")
    sig = BaseSignature(batch, latent * factor, latent * factor, steps, "dpmpp_2m", False)
    sampler = samplers.make_sampler("dpmpp_2m", samplers.NoiseSchedule.from_config(configs["scheduler"]), steps)
    program = make_base_program(graphdefs, sampler, sig, clip_skip=0,
                                scaling_factor=float(vae_cfg.get("scaling_factor", 0.18215)),
                                tile_pixels=None, on_trace=lambda: None, backend=_backend(target))

    latents = (latent, latent, channels)

    def lower(replicated, batched):
        spec = lambda shape, dt: jax.ShapeDtypeStruct((batch, *shape), dt, sharding=batched)
        # The per-batch inputs the engine's Pipeline puts on the chips for the base program.
        inputs = {**{name: spec((77,), jnp.int32) for name in ("ids", "ids_mask", "uncond_ids", "uncond_ids_mask")},
                  "guidance": spec((), jnp.float32), "seeds": spec((), jnp.uint32),
                  "start_step": spec((), jnp.int32), "init_flag": spec((), jnp.bool_),
                  "init_latents": spec(latents, jnp.float32), "mask": spec((latent, latent, 1), jnp.float32),
                  "masked_latents": spec(latents, jnp.float32), "noise": spec(latents, jnp.float32),
                  "noise_given": spec((), jnp.bool_)}
        weights = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), states)
        return program.trace(weights, inputs).lower()  # jitted with the target's options

    return _compile_for(target, chips, lower)


def _chip(target: str) -> Chip | None:
    """The chip compiled for; `local` on an accelerator machine is its own chip (and compiled
    with autotuning on a GPU: the kernels a real run picks)."""
    if target != "local":
        return TARGETS[target]
    import jax
    return chip_of(jax.devices()[0].device_kind)


def report(text: str, gflop: float, target: str) -> dict:
    chip = _chip(target)
    # On TPU the byte counts include async copies between memory spaces (HBM, VMEM):
    # there the compile itself and the kernels are the findings, not floors.
    rates = ((chip.peak_tflops, chip.memory_tbps) if chip and chip.platform == "cuda" and chip.memory_tbps
             else None)
    # On TPU the weights' copies into on-chip memory are invariant ops too, made each step
    # by design: no loop-invariant report there.
    summary = summarize(text, chip_rates=rates, invariant_report=not (chip and chip.platform == "tpu"))
    roofline_ms = summary.pop("roofline_ms", None)
    result = {"target": target, "chip": chip and chip.name, "unet_gflop_per_step": float(f"{gflop:.4g}"),
              **summary}
    for entry in result["categories"].values():
        entry["gb"] = round(entry.pop("bytes") / 1e9, 4)
        entry["gflop"] = float(f"{entry.pop('flops') / 1e9:.4g}")
    if rates:
        peak, bandwidth = rates
        for entry in result["categories"].values():
            # GFLOP / (TFLOP/s) and GB / (TB/s) are milliseconds.
            entry["ms_at_peak"] = round(entry["gflop"] / peak, 3)
            entry["ms_at_bandwidth"] = round(entry["gb"] / bandwidth, 3)
        memory_gb = sum(result["categories"][c]["gb"] for c in MEMORY_BOUND)
        result["floors_ms"] = {"compute": round(gflop / peak, 3) if gflop == gflop else None,
                               "memory_bound_ops": round(memory_gb / bandwidth, 3),
                               "roofline": round(roofline_ms, 3)}
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tools.step_hlo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd15", help="sd15, sd21, x4-upscaler, default or tiny")
    p.add_argument("--batch", type=int, default=16, help="images per batch; the UNet runs 2x this (CFG)")
    p.add_argument("--size", type=int, default=None, help="latent side (default: the config's sample_size)")
    p.add_argument("--target", default="h100", choices=[*TARGETS, "local"],
                   help="a chip to compile for without it, or this machine's own device "
                        "(on a GPU machine: with autotuning, the conv algorithms a real run picks)")
    p.add_argument("--chips", type=int, default=1,
                   help="shard the batch over this many chips, as the engine does (TPU targets "
                        "have 4, or 8 for v4; local: its devices); the report is one chip's")
    p.add_argument("--program", default="step", choices=["step", "base"],
                   help="step: one UNet step, reported; base: the engine's whole text-to-image "
                        "program (2 steps), compiled and its kernels counted")
    p.add_argument("--hlo-out", default=None, help="write the optimized HLO text here")
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    if args.batch < 1 or args.chips < 1:
        p.error("--batch and --chips must be at least 1")
    if args.target != "local" and TARGETS[args.target].platform == "cuda":
        # The CUDA plugin refuses to load without a driver unless told the checks are moot.
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    try:
        if args.program == "base":
            text = compile_base_program(args.arch, args.batch, args.target, args.size, args.chips)
        else:
            text, gflop = compile_step(args.arch, args.batch, args.target, args.size, args.chips)
    except ValueError as e:
        p.error(str(e))
    if args.hlo_out:
        with open(args.hlo_out, "w") as f:
            f.write(text)
    if args.program == "base":
        kernels = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
        result = {"program": "base", "arch": args.arch, "batch": args.batch, "chips": args.chips,
                  "target": args.target, "custom_calls": dict(kernels.most_common())}
        print(f"{args.arch}: the text-to-image program, batch {args.batch} over {args.chips} chip(s), "
              f"compiled for {args.target}; custom calls: {result['custom_calls']}")
    else:
        result = report(text, gflop, args.target)
        result.update(arch=args.arch, batch=args.batch, unet_rows=2 * args.batch, chips=args.chips)
        _print_step(result, gflop)
    # What the compile was asked for, so reports of differently built programs tell apart.
    from jaxdiff.engine.programs import compiler_options

    result.update(xla_options=compiler_options(_backend(args.target)), xla_flags=os.environ.get("XLA_FLAGS", ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _print_step(result: dict, gflop: float) -> None:
    amount = f"{gflop:,.0f}" if gflop >= 100 else f"{gflop:.4g}"
    print(f"{result['arch']}, UNet {result['batch']} samples x 2 contexts over {result['chips']} chip(s), one step "
          f"for {result['target']}: {amount} GFLOP per chip")
    floors = "floors_ms" in result
    print(f"{'category':<13}{'ops':>6}{'MB':>11}{'GFLOP':>10}" + (f"{'ms@peak':>9}{'ms@bw':>8}" if floors else ""))
    for name, e in sorted(result["categories"].items(), key=lambda kv: -kv[1]["gb"]):
        print(f"{name:<13}{e['ops']:>6}{e['gb'] * 1e3:>11.1f}{e['gflop']:>10,.{1 if e['gflop'] >= 1 else 4}f}"
              + (f"{e['ms_at_peak']:>9.2f}{e['ms_at_bandwidth']:>8.2f}" if floors else ""))
    if floors:
        f = result["floors_ms"]
        print(f"floors per step: compute {f['compute']} ms, memory-bound ops {f['memory_bound_ops']} ms, "
              f"roofline (each op at the slower of its FLOPs and bytes) {f['roofline']} ms")
    print("kernels:", ", ".join(f"{k} x{v}" for k, v in list(result["kernels"].items())[:8]))
    print("conv layouts:", result["conv_layouts"])
    if "loop_invariant" in result:
        invariant = result["loop_invariant"]
        print(f"loop-invariant (the same at every step): {invariant['kernels']} kernels, {invariant['mb']:.1f} MB:",
              ", ".join(f"{source} {mb:.1f} MB" for source, mb in list(invariant["sources_mb"].items())[:4]))
    print("ops moving the most bytes:")
    for op in result["top_ops"][:10]:
        print(f"  {op['mb']:>9.1f} MB  {op['category']:<12} {op['op']:<32} {op['source']}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
