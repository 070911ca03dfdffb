"""The feed-forward's GEGLU alone, at every shape a model's denoising step runs it: ms and
TFLOP/s per path.

    python -m tools.geglu_bench --arch sd15 --batch 16 --out geglu.json   # GPU
    python -m tools.geglu_bench --arch tiny --batch 1                     # CPU (tested in CI)

Paths (jaxdiff/models/geglu.py): "xla", the projection's GEMM and XLA's fusion of GELU and
product; "tokamax", the fused kernel on Hopper and Blackwell GPUs (its GEMM a little wider:
the bias rides as a channel of ones, rounded up to 64); and "projection", the GEMM and its
bias alone, which the fused kernel would have to come near to pay off. The fused kernel is
timed with tokamax's default config (the engine's) and a few others (FUSED_CONFIGS); its
best is reported, with every config's time. TFLOP/s count the
model's FLOPs (2 x rows x channels x 2 x width), on every path. A path the backend or shape
does not take is reported with its reason. Each is timed as CHAINED_CALLS calls back to back
in one program, each call's input the first channels of the last one's output.
"""

from __future__ import annotations

import argparse
import json
import sys

CHAINED_CALLS = 8
# tokamax kernel configs tried beside its default (the engine's): fields of its Config for
# the Hopper kernel, each a compile. The default: tile_m 128, tile_n 64, tile_k 64, 4 stages,
# the two warpgroups side by side along N.
FUSED_CONFIGS = {
    "clusters of 2 along M": {"tile_m": 128, "tile_n": 64, "tile_k": 64, "num_stages": 4, "cluster_size_m": 2},
    "warpgroups along M": {"tile_m": 128, "tile_n": 64, "tile_k": 64, "num_stages": 4, "wg_dimension": "M"},
    "grid tiles 4 wide": {"tile_m": 128, "tile_n": 64, "tile_k": 64, "num_stages": 4, "grid_tile_width": 4},
}


def geglu_sites(arch: str, batch: int, size: int | None = None) -> list[dict]:
    """Each transformer level's GEGLU shape: rows (tokens at the CFG batch), channels in,
    width out, calls per step."""
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
                          "channels": unet.block_out_channels[i], "width": 4 * unet.block_out_channels[i],
                          # transformers per level: layers_per_block down, one more up
                          "calls": unet.transformer_layers_per_block[i] * (2 * unet.layers_per_block[i] + 1)})
    side = latent // 2 ** (levels - 1)
    sites.append({"site": f"unet mid {side}x{side}", "rows": 2 * batch * side * side,
                  "channels": unet.block_out_channels[-1], "width": 4 * unet.block_out_channels[-1],
                  "calls": unet.transformer_layers_per_block[-1]})
    return sites


def fused_with_config(fields: dict):
    """The fused GEGLU on tokamax's Hopper kernel with one config (its op class, which the
    public API does not take a config for). Imported when traced: no tokamax, no GPU is
    this path's error."""
    def call(x, kernel, bias):
        from tokamax._src.ops.gated_linear_unit import pallas_mosaic_gpu, pallas_mosaic_gpu_common as common

        from jaxdiff.models import geglu

        config = common.Config(**{k: common.MatmulDimension[v] if k.endswith("dimension") else v
                                  for k, v in fields.items()})
        x, weights = geglu.fold_bias(x, kernel, bias)
        return pallas_mosaic_gpu.PallasMosaicGpuGatedLinearUnit(config=config)(
            x, weights, activation=geglu.gelu_rational)
    return call


def _paths() -> dict:
    """name: fn, or {config: fn} for a path timed at each config, its best kept."""
    import jax.numpy as jnp

    from jaxdiff.models import geglu

    def xla(x, kernel, bias):
        with geglu.dispatch("xla"):
            return geglu.geglu(x, kernel, bias)
    fused = {"default": geglu.fused_geglu, **{name: fused_with_config(f) for name, f in FUSED_CONFIGS.items()}}
    return {"xla": xla, "tokamax": fused, "projection": lambda x, kernel, bias: jnp.dot(x, kernel) + bias}


def chained(fn, calls: int = CHAINED_CALLS):
    """`fn(x, kernel, bias)` run `calls` times in one jitted program, each call's input the
    first channels of the last call's output (no call can be skipped or hoisted)."""
    import jax

    def run(x, kernel, bias):
        for _ in range(calls):  # unrolled: no loop between the calls
            x = fn(x, kernel, bias)[..., :x.shape[-1]].astype(x.dtype)
        return x
    return jax.jit(run)


def time_site(site: dict, dtype, reps: int) -> dict:
    import jax
    import numpy as np

    from tools.attention_bench import _reason
    from tools.bench import _median_time

    rng = np.random.default_rng(0)
    rows, channels, width = site["rows"], site["channels"], site["width"]
    x = jax.numpy.asarray(rng.standard_normal((rows, channels)), dtype)
    kernel = jax.numpy.asarray(rng.standard_normal((channels, 2 * width)) / np.sqrt(channels), dtype)
    bias = jax.numpy.asarray(rng.standard_normal((2 * width,)), dtype)
    flops = 2.0 * rows * channels * 2 * width
    result = dict(site, gflop=float(f"{flops / 1e9:.4g}"), paths={})
    reference = None
    for name, path in _paths().items():
        configs = path if isinstance(path, dict) else {None: path}
        timed, errors = [], {}
        for config, fn in configs.items():
            try:
                # Traced here, not at import: jit's cache does not see the dispatch inside.
                out = np.asarray(jax.block_until_ready(jax.jit(fn)(x, kernel, bias)), np.float32)
                run = chained(fn)
                jax.block_until_ready(run(x, kernel, bias))
                seconds = _median_time(lambda: jax.block_until_ready(run(x, kernel, bias)), reps) / CHAINED_CALLS
                timed.append((seconds, config, out))
            except Exception as e:  # a path (or config) this backend or shape does not take
                errors[config] = _reason(e)
        if not timed:
            result["paths"][name] = {"error": list(errors.values())[0]}
            continue
        seconds, config, out = min(timed, key=lambda t: t[0])
        entry = {"ms": round(seconds * 1e3, 4), "tflop_s": float(f"{flops / seconds / 1e12:.4g}")}
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
    import jax
    import jax.numpy as jnp

    p = argparse.ArgumentParser(prog="python -m tools.geglu_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd15", help="sd15, sd21, x4-upscaler, default or tiny")
    p.add_argument("--batch", type=int, default=16, help="images per batch; the UNet runs 2x this (CFG)")
    p.add_argument("--size", type=int, default=None, help="latent side (default: the config's sample_size)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    if args.batch < 1 or args.reps < 1:
        p.error("--batch and --reps must be at least 1")
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    device = jax.devices()[0].device_kind
    print(f"{args.arch}, batch {args.batch}, {jnp.dtype(dtype).name}, {device}: ms (TFLOP/s) per call, calls per step")
    result = {"arch": args.arch, "batch": args.batch, "device": device, "dtype": jnp.dtype(dtype).name,
              "sites": [], "unet_step_ms": {}}
    for site in geglu_sites(args.arch, args.batch, args.size):
        s = time_site(site, dtype, args.reps)
        result["sites"].append(s)
        # Per step, each path over every site (NaN where a site has no time on it).
        result["unet_step_ms"] = {
            name: round(sum(t["calls"] * t["paths"][name].get("ms", float("nan")) for t in result["sites"]), 3)
            for name in s["paths"]}
        if args.out:  # written as each site is timed: a run cut short keeps what it had
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        cells = [f"{n} {r['ms']:.3f} ({r['tflop_s']:.4g})" if "ms" in r else f"{n} - ({r['error'][:60]})"
                 for n, r in s["paths"].items()]
        print(f"{s['site']:<16}{s['rows']}x{s['channels']}->{s['width']:<8} x{s['calls']:<3}" + "  ".join(cells),
              flush=True)
    print("per step, ms: " + ", ".join(f"{n} {ms}" for n, ms in result["unet_step_ms"].items()))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
