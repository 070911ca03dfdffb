"""The denoising step's ops that have more than one path (the transformer blocks' GEGLU and
layer norm, the group norms, the upsamplers) alone, at every shape a model's step runs
them: ms per call on each path, and TFLOP/s or GB/s.

    python -m tools.kernel_bench --op geglu --arch sd15 --batch 16 --out geglu.json   # GPU
    python -m tools.kernel_bench --op layer_norm --arch tiny --batch 1                # CPU (tested in CI)
    python -m tools.kernel_bench --op group_norm --arch sd15 --batch 16
    python -m tools.kernel_bench --op upsample --arch sd15 --batch 16

--op geglu (jaxdiff/models/geglu.py): "xla", the projection's GEMM and XLA's fusion of GELU
and product; "tokamax", the fused kernel on Hopper and Blackwell GPUs (its GEMM a little
wider: the bias rides as a channel of ones, rounded up to 64; each call here writes that
wider input first, which in the engine the layer norm writes as its output), with
tokamax's default config (the engine's) and FUSED_CONFIGS, its best reported with every
config's time; and
"projection", the GEMM and its bias alone, which the fused kernel would have to come near
to pay off. TFLOP/s count the model's FLOPs (2 x rows x channels x 2 x width) on every path.

--op layer_norm (jaxdiff/models/layer_norm.py): "xla", nnx.LayerNorm as XLA compiles it;
"pallas", the one-pass kernel (on a GPU; Pallas' interpreter elsewhere, timed but not a
speed), at the engine's block size and LAYER_NORM_CONFIGS, its best reported with every
config's time. GB/s count one read and one write of the tokens, the least any path can move.

--op group_norm (jaxdiff/models/group_norm.py), at every group norm of the UNet's step (the
shapes as one forward calls them: the resnets' with the time embedding and SiLU): "xla",
the module's XLA path; "pallas", the two kernels at the engine's sizes and
GROUP_NORM_CONFIGS. GB/s count two reads and one write of x (a group spans the sample: its
statistics need a pass of their own).

--op upsample (jaxdiff/models/blocks.py upsample_conv), at each upsampler of the UNet's up
path: "xla", the engine's 2x2 phase convolution (cuDNN on a GPU); "gemm", the same as one
GEMM over each output's 2x2 window, the windows written out first; "plain", diffusers'
form, the 2x image and a 3x3 convolution. TFLOP/s count the phase convolution's FLOPs on
every path (the plain form does 2.25x as many).
A path the backend or shape does not take is reported with its reason. Each is timed as
calls back to back in one program (tools/attention_bench.py's `chained`), each call's input
the last one's output (for GEGLU its first channels).
"""

from __future__ import annotations

import json
import sys

# tokamax kernel configs tried beside its default (the engine's): fields of its Config for
# the Hopper kernel, each a compile. The default: tile_m 128, tile_n 64, tile_k 64, 4 stages,
# the two warpgroups side by side along N. Each compiles for an H200 at every SD 1.5 shape
# (tile_k 128 does not: the folded contraction is a multiple of 64 only).
FUSED_CONFIGS = {
    "clusters of 2 along M": {"tile_m": 128, "tile_n": 64, "tile_k": 64, "num_stages": 4, "cluster_size_m": 2},
    "warpgroups along M": {"tile_m": 128, "tile_n": 64, "tile_k": 64, "num_stages": 4, "wg_dimension": "M"},
    "grid tiles 4 wide": {"tile_m": 128, "tile_n": 64, "tile_k": 64, "num_stages": 4, "grid_tile_width": 4},
}
# Sizes of the layer norm kernel's instances tried beside the engine's (8,192 elements, 4
# warps): (elements a block, warps).
LAYER_NORM_CONFIGS = ((4096, 4), (8192, 8), (16384, 8))
# Sizes of the group norm kernels tried beside the engine's (4,096 elements a loop
# iteration, 512 instances, 4 warps): (elements, instances, warps). Each compiles for an
# H200 at every group norm of SD 1.5's step.
GROUP_NORM_CONFIGS = ((8192, 512, 4), (8192, 512, 8), (4096, 1024, 4))
OPS = ("geglu", "layer_norm", "group_norm", "upsample")


def transformer_sites(arch: str, batch: int, size: int | None = None) -> list[dict]:
    """Each transformer level: rows (tokens at the CFG batch), channels, transformer blocks
    per step."""
    from jaxdiff.models.unet import UNetConfig
    from tools.step_hlo import arch_configs

    unet = UNetConfig.from_dict(arch_configs(arch)["unet"])
    latent = size or unet.sample_size or 64
    levels = len(unet.block_out_channels)
    sites = []
    for i, block in enumerate(unet.down_block_types):
        if "CrossAttn" in block:
            side = latent // 2 ** i
            sites.append({"site": f"unet {side}x{side}", "rows": 2 * batch * side * side,
                          "channels": unet.block_out_channels[i],
                          # transformers per level: layers_per_block down, one more up
                          "blocks": unet.transformer_layers_per_block[i] * (2 * unet.layers_per_block[i] + 1)})
    side = latent // 2 ** (levels - 1)
    sites.append({"site": f"unet mid {side}x{side}", "rows": 2 * batch * side * side,
                  "channels": unet.block_out_channels[-1], "blocks": unet.transformer_layers_per_block[-1]})
    return sites


def op_sites(op: str, arch: str, batch: int, size: int | None = None) -> list[dict]:
    """The op's shapes and calls per step: GEGLU once a transformer block, four times as
    wide out as in; layer norm three times (before each attention and the feed-forward)."""
    sites = []
    for s in transformer_sites(arch, batch, size):
        site = {"site": s["site"], "rows": s["rows"], "channels": s["channels"]}
        if op == "geglu":
            site.update(width=4 * s["channels"], calls=s["blocks"])
        else:
            site.update(calls=3 * s["blocks"])
        sites.append(site)
    return sites


def upsample_sites(arch: str, batch: int, size: int | None = None) -> list[dict]:
    """Each upsampler of the UNet's up path, once a step: its input at the CFG batch."""
    from jaxdiff.models.unet import UNetConfig
    from tools.step_hlo import arch_configs

    unet = UNetConfig.from_dict(arch_configs(arch)["unet"])
    latent = size or unet.sample_size or 64
    levels, channels = len(unet.block_out_channels), unet.block_out_channels[::-1]
    sides = [latent // 2 ** (levels - 1 - i) for i in range(levels - 1)]
    return [{"site": f"unet {side}->{2 * side} x{c}", "shape": [2 * batch, side, side, c], "calls": 1}
            for side, c in zip(sides, channels)]


def group_norm_sites(arch: str, batch: int, size: int | None = None) -> list[dict]:
    """Every group norm of one UNet forward at the CFG batch, as the model calls them
    (traced without weights): shape, groups, shift and SiLU, calls per step."""
    import collections

    import jax
    from flax import nnx

    from jaxdiff.models import group_norm
    from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig
    from jaxdiff.weights.family import abstract_model
    from tools.bench import guided_unet_inputs
    from tools.step_hlo import arch_configs

    configs = arch_configs(arch)
    cfg = UNetConfig.from_dict(configs["unet"])
    latent = size or cfg.sample_size or 64
    graphdef, state = nnx.split(abstract_model(UNet2DConditionModel, cfg, jax.numpy.float32))
    calls = collections.Counter()
    call = group_norm.GroupNorm.__call__

    def record(module, x, *, shift=None, silu=False):
        calls[(x.shape, module.num_groups, module.epsilon, shift is not None, silu)] += 1
        return call(module, x, shift=shift, silu=silu)

    args = guided_unet_inputs(cfg, configs["text_encoder"]["hidden_size"], batch, (latent, latent),
                              jax.numpy.float32, lambda shape, dt, seed: jax.ShapeDtypeStruct(shape, dt))
    group_norm.GroupNorm.__call__ = record
    try:
        jax.eval_shape(lambda state, *a: nnx.merge(graphdef, state)(*(a[:3] if a[3] is None else a)),
                       state, *args)
    finally:
        group_norm.GroupNorm.__call__ = call
    return [{"site": "x".join(map(str, shape)) + (" +temb" if shifted else "") + (" silu" if silu else ""),
             "shape": list(shape), "groups": groups, "epsilon": eps, "shift": shifted, "silu": silu, "calls": n}
            for (shape, groups, eps, shifted, silu), n in calls.items()]


def fused_with_config(fields: dict):
    """The fused GEGLU on tokamax's Hopper kernel with one config (its op class, which the
    public API does not take a config for). Imported when traced: no tokamax, no GPU is
    this path's error."""
    def call(x, kernel, bias):
        from tokamax._src.ops.gated_linear_unit import pallas_mosaic_gpu
        from tokamax._src.ops.gated_linear_unit import (
            pallas_mosaic_gpu_common as common,
        )

        from jaxdiff.models import geglu

        config = common.Config(**{k: common.MatmulDimension[v] if k.endswith("dimension") else v
                                  for k, v in fields.items()})
        x, weights = geglu.with_ones(x, geglu.folded_width(x.shape[-1])), geglu.fold_weights(kernel, bias)
        return pallas_mosaic_gpu.PallasMosaicGpuGatedLinearUnit(config=config)(
            x, weights, activation=geglu.gelu_rational)
    return call


def _paths(op: str, site: dict) -> dict:
    """name: fn(x, *params), or {config: fn} for a path timed at each config, its best kept."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.models import geglu, group_norm, layer_norm

    if op == "group_norm":
        def xla_group_norm(x, scale, bias, *shift):
            from flax import nnx
            module = group_norm.GroupNorm(x.shape[-1], num_groups=site["groups"], epsilon=site["epsilon"],
                                          dtype=x.dtype, param_dtype=x.dtype, rngs=nnx.Rngs(0))
            module.scale.value, module.bias.value = scale, bias
            return module._xla(x, shift[0] if shift else None, site["silu"])

        def kernels(chunk_elements=group_norm._CHUNK_ELEMENTS, instances=group_norm._INSTANCES, num_warps=4):
            def call(x, scale, bias, *shift):
                return group_norm.fused_group_norm(
                    x, scale, bias, site["groups"], site["epsilon"], shift=shift[0] if shift else None,
                    silu=site["silu"], interpret=jax.default_backend() != "gpu",
                    chunk_elements=chunk_elements, instances=instances, num_warps=num_warps)
            return call
        configs = {"default": kernels(), **{f"{e} elements, {n} instances, {w} warps": kernels(e, n, w)
                                            for e, n, w in GROUP_NORM_CONFIGS}}
        return {"xla": xla_group_norm, "pallas": configs}
    if op == "upsample":
        from jaxdiff.models import blocks

        def form(as_gemm=False, plain=False):
            def call(x, kernel, bias):
                if plain:  # diffusers': the 2x image, then the 3x3 convolution
                    y = jax.lax.conv_general_dilated(blocks.upsample_nearest(x), kernel, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
                else:
                    y = blocks.upsample_conv(x, *blocks.upsample_phases(kernel, bias), as_gemm=as_gemm)
                # Regrouped, not moved, to x's side (4x the channels): the chained calls' next input.
                return y.reshape(x.shape[:-1] + (4 * x.shape[-1],))
            return call
        return {"xla": form(), "gemm": form(as_gemm=True), "plain": form(plain=True)}
    if op == "layer_norm":
        def xla(x, scale, bias):
            from flax import nnx

            module = nnx.LayerNorm(x.shape[-1], epsilon=1e-5, dtype=x.dtype, param_dtype=x.dtype, rngs=nnx.Rngs(0))
            module.scale.value, module.bias.value = scale, bias
            return nnx.LayerNorm.__call__(module, x)  # the model's XLA path, nnx's own
        def pallas(block_elements=layer_norm._BLOCK_ELEMENTS, num_warps=4):
            return lambda x, scale, bias: layer_norm.fused_layer_norm(
                x, scale, bias, 1e-5, interpret=jax.default_backend() != "gpu",
                block_elements=block_elements, num_warps=num_warps)
        configs = {"default": pallas(), **{f"{e} elements, {w} warps": pallas(e, w) for e, w in LAYER_NORM_CONFIGS}}
        return {"xla": xla, "pallas": configs}

    def xla(x, kernel, bias):
        with geglu.dispatch("xla"):
            return geglu.geglu(x, kernel, bias)
    def engine_config(x, kernel, bias):  # tokamax's default config, the engine's
        x = geglu.with_ones(x, geglu.folded_width(x.shape[-1]))
        return geglu.fused_geglu(x, geglu.fold_weights(kernel, bias))
    fused = {"default": engine_config, **{name: fused_with_config(f) for name, f in FUSED_CONFIGS.items()}}
    return {"xla": xla, "tokamax": fused, "projection": lambda x, kernel, bias: jnp.dot(x, kernel) + bias}


def _inputs(op: str, site: dict, dtype):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    if op == "upsample":
        shape = site["shape"]
        channels = shape[-1]
        return (jnp.asarray(rng.standard_normal(shape), dtype),
                jnp.asarray(rng.standard_normal((3, 3, channels, channels)) / np.sqrt(9 * channels), dtype),
                jnp.asarray(rng.standard_normal(channels), dtype))
    if op == "group_norm":
        shape = site["shape"]
        x, scale, bias, shift = (jnp.asarray(rng.standard_normal(s), dtype)
                                 for s in (shape, shape[-1:], shape[-1:], (shape[0], shape[-1])))
        return (x, scale, bias, shift) if site["shift"] else (x, scale, bias)
    rows, channels = site["rows"], site["channels"]
    x = jnp.asarray(rng.standard_normal((rows, channels)), dtype)
    if op == "layer_norm":
        return x, jnp.asarray(rng.standard_normal(channels), dtype), jnp.asarray(rng.standard_normal(channels), dtype)
    width = site["width"]
    return (x, jnp.asarray(rng.standard_normal((channels, 2 * width)) / np.sqrt(channels), dtype),
            jnp.asarray(rng.standard_normal(2 * width), dtype))


def time_site(op: str, site: dict, dtype, reps: int) -> dict:
    import numpy as np

    from tools.attention_bench import time_configs

    args = _inputs(op, site, dtype)
    if op == "geglu":
        work = {"gflop": float(f"{2.0 * site['rows'] * site['channels'] * 2 * site['width'] / 1e9:.4g}")}
    elif op == "upsample":  # the phase convolution's: 4 taps a pixel on a grid one larger
        n, side, _, c = site["shape"]
        work = {"gflop": float(f"{2.0 * n * (side + 1) ** 2 * 4 * c * 4 * c / 1e9:.4g}")}
    else:  # one read and one write of x; the group norm's statistics read it once more
        passes = 3.0 if op == "group_norm" else 2.0
        work = {"gb": float(f"{passes * args[0].size * args[0].dtype.itemsize / 1e9:.4g}")}
    result = dict(site, **work, paths={})
    reference = None
    for name, path in _paths(op, site).items():
        timed, errors = time_configs(path, args, reps)
        if not timed:
            result["paths"][name] = {"error": next(iter(errors.values()))}
            continue
        seconds, config, out = min(timed, key=lambda t: t[0])
        entry = {"ms": round(seconds * 1e3, 4)}
        if "gflop" in work:
            entry["tflop_s"] = float(f"{work['gflop'] / seconds / 1e3:.4g}")
        else:
            entry["gb_s"] = float(f"{work['gb'] / seconds:.4g}")
        if name != "projection":  # the projection is not a GEGLU: no output to compare
            reference = out if reference is None else reference
            entry["max_diff_vs_xla"] = float(f"{np.abs(out - reference).max():.3g}")
        if config is not None:  # every config's time, the best first: the default's is the engine's
            entry["config"] = config
            entry["configs_ms"] = {c: round(t * 1e3, 4) for t, c, _ in sorted(timed, key=lambda t: t[0])}
            entry["failed_configs"] = errors
        result["paths"][name] = entry
    return result


def main(argv=None) -> dict:
    import jax.numpy as jnp

    from tools.attention_bench import parse_site_bench_args, site_bench_parser

    p = site_bench_parser("python -m tools.kernel_bench", __doc__)
    p.add_argument("--op", choices=OPS, required=True)
    args, dtype, device = parse_site_bench_args(p, argv)
    rate = "TFLOP/s" if args.op in ("geglu", "upsample") else "GB/s"
    print(f"{args.op}, {args.arch}, batch {args.batch}, {jnp.dtype(dtype).name}, {device}: "
          f"ms ({rate}) per call, calls per step")
    result = {"op": args.op, "arch": args.arch, "batch": args.batch, "device": device,
              "dtype": jnp.dtype(dtype).name, "sites": [], "unet_step_ms": {}}
    sites = {"group_norm": group_norm_sites, "upsample": upsample_sites}.get(
        args.op, lambda *a: op_sites(args.op, *a))(args.arch, args.batch, args.size)
    for site in sites:
        s = time_site(args.op, site, dtype, args.reps)
        result["sites"].append(s)
        # Per step, each path over every site (NaN where a site has no time on it).
        result["unet_step_ms"] = {
            name: round(sum(t["calls"] * t["paths"][name].get("ms", float("nan")) for t in result["sites"]), 3)
            for name in s["paths"]}
        if args.out:  # written as each site is timed: a run cut short keeps what it had
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        cells = [f"{n} {r['ms']:.3f} ({r.get('tflop_s', r.get('gb_s')):.4g})" if "ms" in r
                 else f"{n} - ({r['error'][:60]})" for n, r in s["paths"].items()]
        shape = (f"{s['rows']}x{s['channels']}" if "rows" in s else "") + (f"->{s['width']}" if "width" in s else "")
        print(f"{s['site']:<16}{shape:<18} x{s['calls']:<3}" + "  ".join(cells), flush=True)
    print("per step, ms: " + ", ".join(f"{n} {ms}" for n, ms in result["unet_step_ms"].items()))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
