"""Attention alone, at every shape a model's denoising step and VAE decode run it: ms and
TFLOP/s per path.

    python -m tools.attention_bench --arch sd15 --batch 16 --out attention.json   # GPU
    python -m tools.attention_bench --arch tiny --batch 1                         # CPU (tested in CI)

The call sites: each UNet level with transformers (self or, where the config says
only_cross_attention, text attention; then text attention), the mid block, all at the
CFG batch (2 x --batch) but the first self attention, which comes before any text and runs
once per sample (jaxdiff/models/unet.py), and the VAE decoder's mid-block attention at the
image batch.
Each is timed on every path, as CHAINED_CALLS calls back to back in one program: XLA's own
attention, cuDNN flash attention, cuDNN with the head dim zero-padded to a multiple of 64
(flash kernels run a head dim of 40 as a wider one: is padding it ourselves free?), and
jax's FlashAttention-3 style Hopper kernel (Pallas on Mosaic GPU, in f16, head dim padded
the same way), best of a few block sizes, and tokamax's flash attention (its Mosaic GPU and
its Triton kernels; the gpu extra). A path the backend or shape does not take is
reported with its reason. On a GPU it names the candidate kernels per shape; the small
sites, timed one call at a time (before 2026-11-28), changed order from one H200 run to
the next, so a change to jaxdiff/models/attention.py's dispatch is decided end to end
(tools/gpu_bench.sh).
"""

from __future__ import annotations

import argparse
import json
import sys

TEXT_TOKENS = 77
# (block_q, block_kv) tried for the Mosaic GPU kernel: few, as each is a compile. Two
# warpgroups take block_q query rows each; a head dim padded to 192 leaves shared memory
# for block_kv 64 only.
FA3_BLOCKS = ((64, 128), (64, 64))
# Calls timed back to back in one program, each taking the last one's output as its
# queries: a lone call of 0.2-0.5 ms also timed its launch and the host's wait, and the
# small sites changed order from one H200 run to the next that way.
CHAINED_CALLS = 8


def chained(fn, calls: int = CHAINED_CALLS):
    """`fn(x, *rest)` run `calls` times in one jitted program, each call's first argument
    the last call's output, cut to that argument's channels (attention's queries, whose
    shape the output has; a GEGLU's tokens, from its wider output): no call can be
    skipped or hoisted."""
    import jax

    def run(x, *rest):
        for _ in range(calls):  # unrolled: no loop between the calls
            x = fn(x, *rest)[..., :x.shape[-1]].astype(x.dtype)
        return x
    return jax.jit(run)


def attention_sites(arch: str, batch: int, size: int | None = None) -> list[dict]:
    """The distinct attention shapes of one step and one decode: (name, batch, query and
    key tokens, heads, head dim, calls per step or decode)."""
    from jaxdiff.models.unet import UNetConfig
    from jaxdiff.models.vae import VAEConfig
    from tools.step_hlo import arch_configs

    configs = arch_configs(arch)
    unet, vae = UNetConfig.from_dict(configs["unet"]), VAEConfig.from_dict(configs["vae"])
    latent = size or unet.sample_size or 64
    levels = len(unet.block_out_channels)
    sites = []

    def add(name, n, tokens, kv_tokens, heads, head_dim, calls):
        if calls:
            sites.append({"site": name, "batch": n, "q_tokens": tokens, "kv_tokens": kv_tokens,
                          "heads": heads, "head_dim": head_dim, "calls": calls})

    first = True  # the first transformer's self attention comes before any text: once per sample
    for i, block in enumerate(unet.down_block_types):
        if "CrossAttn" not in block:
            continue
        side, heads = latent // 2 ** i, unet.attention_head_dim[i]
        head_dim = unet.block_out_channels[i] // heads
        # Transformers per level: layers_per_block down, one more up.
        calls = unet.transformer_layers_per_block[i] * (2 * unet.layers_per_block[i] + 1)
        if unet.only_cross_attention[i]:  # both attentions of each transformer read the text
            add(f"unet {side}x{side} text", 2 * batch, side * side, TEXT_TOKENS, heads, head_dim, 2 * calls)
            first = False
            continue
        if first:
            add(f"unet {side}x{side} self 1st", batch, side * side, side * side, heads, head_dim, 1)
        add(f"unet {side}x{side} self", 2 * batch, side * side, side * side, heads, head_dim,
            calls - 1 if first else calls)
        first = False
        add(f"unet {side}x{side} text", 2 * batch, side * side, TEXT_TOKENS, heads, head_dim, calls)
    side, heads = latent // 2 ** (levels - 1), unet.attention_head_dim[-1]
    head_dim = unet.block_out_channels[-1] // heads
    calls = unet.transformer_layers_per_block[-1]
    if first:  # no down level attends: the mid block's first self attention is the first
        add(f"unet mid {side}x{side} self 1st", batch, side * side, side * side, heads, head_dim, 1)
    add(f"unet mid {side}x{side} self", 2 * batch, side * side, side * side, heads, head_dim,
        calls - 1 if first else calls)
    add(f"unet mid {side}x{side} text", 2 * batch, side * side, TEXT_TOKENS, heads, head_dim, calls)
    if vae.mid_block_add_attention:
        add(f"vae mid {latent}x{latent}", batch, latent * latent, latent * latent, 1,
            vae.block_out_channels[-1], 1)
    return sites


def with_padded_head_dim(attend, padded: int):
    """`attend(q, k, v, scale=...)` run with the head dim zero-padded to `padded`: the zeros
    added to q and k leave q.k as it was, the scale stays that of the real head dim, and
    v's added columns are cut off the output."""
    import math

    import jax.numpy as jnp

    def call(q, k, v):
        head_dim = q.shape[-1]
        pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, padded - head_dim)))
        return attend(pad(q), pad(k), pad(v), scale=1.0 / math.sqrt(head_dim))[..., :head_dim]
    return call


def mosaic_fa3(block_q: int, block_kv: int):
    """jax's FlashAttention-3 style Hopper kernel as an `attend` for with_padded_head_dim. It
    takes a head dim that is a multiple of 64, kv tokens a multiple of block_kv, q tokens
    a multiple of 2 x block_q, and applies no softmax scale itself: q comes pre-scaled. Its
    shared-memory buffers are float16 whatever the input (bf16 fails to trace), so it runs
    in f16, cast from and back to the input dtype. Imported when traced, so a missing or
    broken module is the path's error."""
    def attend(q, k, v, scale):
        import jax.numpy as jnp
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        config = attention_mgpu.TuningConfig(block_q=block_q, block_kv=block_kv, max_concurrent_steps=2)
        f16 = lambda x: x.astype(jnp.float16)
        return attention_mgpu.attention(f16(q * scale), f16(k), f16(v), config).astype(q.dtype)
    return attend


def _paths(head_dim: int) -> dict:
    """name: attention fn, or {config: fn} for a path timed at each config, its best kept."""
    import functools

    import jax

    from jaxdiff.models.attention import _round_up

    paths = {name: functools.partial(jax.nn.dot_product_attention, implementation=name)
             for name in ("xla", "cudnn")}
    padded = _round_up(head_dim, 64)
    if padded != head_dim:
        paths[f"cudnn_pad{padded}"] = with_padded_head_dim(paths["cudnn"], padded)
    paths["mosaic_fa3"] = {f"block_q {bq} block_kv {bkv}": with_padded_head_dim(mosaic_fa3(bq, bkv), _round_up(head_dim, 64))
                           for bq, bkv in FA3_BLOCKS}
    for name in ("mosaic_gpu", "triton"):
        paths[f"tokamax_{name}"] = functools.partial(_tokamax_attention, implementation=name)
    return paths


def _tokamax_attention(q, k, v, *, implementation: str):
    """tokamax's flash attention (its Mosaic GPU kernel for Hopper and Blackwell, or its
    Triton one; both pad the head dim themselves). Imported when traced: a missing
    tokamax is the path's error."""
    import tokamax

    return tokamax.dot_product_attention(q, k, v, implementation=implementation)


def _reason(e: Exception) -> str:
    """An exception in one line; a bare assert gives its source line instead."""
    import traceback

    lines = str(e).strip().splitlines()
    if not lines:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        lines = [f"{frame.filename.split('/')[-1]}: {frame.line}"]
    return f"{type(e).__name__}: {lines[0][:200]}"


def time_configs(path, args: tuple, reps: int) -> tuple[list, dict]:
    """A path (fn, or {config: fn}) timed at each config: ([(seconds a call, config,
    output)], {config: the reason it failed}). Each fn is traced here, not at import (jit's
    cache does not see a dispatch inside), and timed as `chained(fn)`, CHAINED_CALLS calls
    in one program."""
    import jax
    import numpy as np

    from tools.bench import _median_time

    timed, errors = [], {}
    for config, fn in (path if isinstance(path, dict) else {None: path}).items():
        try:
            out = np.asarray(jax.block_until_ready(jax.jit(fn)(*args)), np.float32)
            run = chained(fn)
            jax.block_until_ready(run(*args))
            seconds = _median_time(lambda: jax.block_until_ready(run(*args)), reps) / CHAINED_CALLS
            timed.append((seconds, config, out))
        except Exception as e:  # a path (or config) this backend or shape does not take
            errors[config] = _reason(e)
    return timed, errors


def time_site(site: dict, dtype, reps: int) -> dict:
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    b, h, d = site["batch"], site["heads"], site["head_dim"]
    q = jax.numpy.asarray(rng.standard_normal((b, site["q_tokens"], h, d)), dtype)
    k, v = (jax.numpy.asarray(rng.standard_normal((b, site["kv_tokens"], h, d)), dtype) for _ in range(2))
    flops = 4.0 * b * h * site["q_tokens"] * site["kv_tokens"] * d  # q.k and p.v
    from jaxdiff.models import attention

    result = dict(site, gflop=float(f"{flops / 1e9:.4g}"), dispatch=attention._choose(q), paths={})
    reference = None
    for name, path in _paths(d).items():
        timed, errors = time_configs(path, (q, k, v), reps)
        if not timed:  # the reason of the last config tried: the smallest blocks
            entry = {"error": list(errors.values())[-1]}
        else:
            seconds, config, out = min(timed, key=lambda t: t[0])
            reference = out if reference is None else reference
            entry = {"ms": round(seconds * 1e3, 4), "tflop_s": float(f"{flops / seconds / 1e12:.4g}"),
                     "max_diff_vs_xla": float(f"{np.abs(out - reference).max():.3g}")}
            if config:
                entry["config"] = config
        if isinstance(path, dict):
            entry["failed_configs"] = errors
        result["paths"][name] = entry
    return result


def _step_totals(sites: list[dict]) -> dict:
    """The UNet's attention time per step (each site x its calls): on the path the
    dispatch picks, and on each site's fastest path."""
    dispatch = best = 0.0
    for s in sites:
        if not s["site"].startswith("unet"):
            continue
        timed = {name: r["ms"] for name, r in s["paths"].items() if "ms" in r}
        dispatch += s["calls"] * timed.get(s["dispatch"], float("nan"))
        best += s["calls"] * min(timed.values(), default=float("nan"))
    return {"dispatch": round(dispatch, 3), "best": round(best, 3)}


def site_bench_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The arguments of a bench over a model's call sites (this one, tools/kernel_bench.py)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd15", help="sd15, sd21, x4-upscaler, default or tiny")
    p.add_argument("--batch", type=int, default=16, help="images per batch; the UNet runs 2x this (CFG)")
    p.add_argument("--size", type=int, default=None, help="latent side (default: the config's sample_size)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="write the JSON result here")
    return p


def parse_site_bench_args(p: argparse.ArgumentParser, argv):
    """(args, dtype, device kind): float32 on a CPU, bfloat16 on accelerators."""
    import jax
    import jax.numpy as jnp

    args = p.parse_args(argv)
    if args.batch < 1 or args.reps < 1:
        p.error("--batch and --reps must be at least 1")
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return args, dtype, jax.devices()[0].device_kind


def main(argv=None) -> dict:
    import jax.numpy as jnp

    args, dtype, device = parse_site_bench_args(site_bench_parser("python -m tools.attention_bench", __doc__), argv)
    print(f"{args.arch}, batch {args.batch}, {jnp.dtype(dtype).name}, {device}: ms (TFLOP/s) per call, "
          "calls per step, the dispatch's path")
    result = {"arch": args.arch, "batch": args.batch, "device": device, "dtype": jnp.dtype(dtype).name,
              "sites": [], "unet_step_ms": {}}
    for site in attention_sites(args.arch, args.batch, args.size):
        # Each site printed and written as soon as it is timed: a run cut short by a
        # timeout keeps what it had.
        s = time_site(site, dtype, args.reps)
        result["sites"].append(s)
        result["unet_step_ms"] = _step_totals(result["sites"])
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        shape = f"{s['batch']}x{s['q_tokens']}x{s['kv_tokens']} h{s['heads']} d{s['head_dim']}"
        cells = [f"{n} {r['ms']:.3f} ({r['tflop_s']:.4g})" + (f" [{r['config']}]" if "config" in r else "")
                 if "ms" in r else f"{n} -" for n, r in s["paths"].items()]
        print(f"{s['site']:<22}{shape:<28}x{s['calls']:<3}{s['dispatch']:<13}" + "  ".join(cells), flush=True)
    totals = result["unet_step_ms"]
    print(f"UNet attention per step: {totals['dispatch']} ms on the paths the dispatch picks, "
          f"{totals['best']} ms on the fastest path of each site")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
