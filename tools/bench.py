"""Throughput of jaxdiff on one machine: images/s in steady state, time per stage, UNet TFLOP/s.

    python -m tools.bench --arch sd15 --batch-sizes 1,8,32 --steps 25 --compare diffusers --out bench.json
    python -m tools.bench --arch x4-upscaler --batch-sizes 1,8 --steps 20
    python -m tools.bench --arch tiny --batch-sizes 1,2 --steps 2          # CPU, tested in CI
    python -m tools.bench --arch sd15 --batch-sizes 16 --no-stages --variants none,fused,gn,tokamax,ln,attn,all

Work (as ../shared/bench/diffusers_baseline.py): random weights at full size (speed does
not depend on values), DPM-Solver++ (2M), CFG, VAE decode to uint8 on the host included;
the text encoder runs too, on both sides (the baseline feeds random context: a few ms at
most). `default` benchmarks the shipped model family. Times: the median of --reps calls
after a warm-up call (compilation apart), each to its images on the host. UNet FLOPs
are counted as the baseline counts them (tools/hlo_ops.program_flops) on the forward as
the engine runs it (`unet_gflop_per_forward`, which `unet_tflops` and
`unet_share_of_peak` use): fewer than the same work in diffusers (its side reports
torch's count, `unet_gflop_per_forward_b1`), since each sample runs once before it meets
its two contexts and upsampling convolutions run as 2x2 phases. With --compare,
jaxdiff runs in a process of its own, then each diffusers variant in another: none holds
the accelerator's memory while another runs. With --variants, the engine's opt-in kernel
paths (VARIANTS) each get a pipeline of their own in this one process, on the same weights,
and their timed calls take turns (one batch of each, --reps rounds): a machine's drift
lands on all of them alike. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from tools.chips import chip_of


# The engine's kernel paths --variants can name: the environment each traces its programs in.
_ALL_FUSED = {"JAXDIFF_GEGLU": "tokamax", "JAXDIFF_LAYER_NORM": "pallas", "JAXDIFF_GROUP_NORM": "pallas"}
VARIANTS = {
    "none": {},
    "tokamax": {"JAXDIFF_GEGLU": "tokamax"},
    "ln": {"JAXDIFF_LAYER_NORM": "pallas"},
    "gn": {"JAXDIFF_GROUP_NORM": "pallas"},
    "fused": _ALL_FUSED,
    "attn": {"JAXDIFF_ATTENTION": "tokamax"},  # tokamax's flash attention
    "all": {**_ALL_FUSED, "JAXDIFF_ATTENTION": "tokamax"},
}
_PATH_VARIABLES = sorted({k for env in VARIANTS.values() for k in env})


@contextlib.contextmanager
def variant_environment(name: str):
    """The block runs with `name`'s kernel paths asked for (and the others not)."""
    previous = {k: os.environ.get(k) for k in _PATH_VARIABLES}
    for k in _PATH_VARIABLES:
        os.environ.pop(k, None)
    os.environ.update(VARIANTS[name])
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _kernel_paths() -> dict:
    """The path each op with several takes in this environment."""
    from jaxdiff.models import attention, geglu, group_norm, layer_norm

    return {"attention": attention.implementation(), "geglu": geglu.implementation(),
            "layer_norm": layer_norm.implementation(), "group_norm": group_norm.implementation()}


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peak(device) -> float | None:
    """The device's bf16 dense peak, TFLOP/s (tools/chips.py); None for a CPU."""
    chip = chip_of(getattr(device, "device_kind", ""))
    return chip.peak_tflops if chip else None


@contextlib.contextmanager
def countable_kernels():
    """Attention as XLA's plain dots, whole, and GEGLU as its own GEMM, while a function is
    lowered for counting its FLOPs: a fused kernel's custom call has no dots to count (and
    the fused GEGLU's GEMM runs a padded width), and past MAX_SCORES the XLA attention
    runs chunks of queries in a loop whose body tools.hlo_ops.program_flops counts once
    (SD 1.5's 64x64 self attention at UNet batch 32 counted a quarter of its FLOPs)."""
    from jaxdiff.models import attention, geglu

    chunk_limit = attention.MAX_SCORES
    attention.MAX_SCORES = float("inf")
    try:
        with attention.dispatch(implementation="xla"), geglu.dispatch("xla"):
            yield
    finally:
        attention.MAX_SCORES = chunk_limit


def _flops(module, args) -> float | None:
    """A module call's FLOPs as torch's FlopCounterMode (and the diffusers baseline) counts
    them: two per multiply-add of its matmuls, convolutions and attention, read off a
    lowering (not compiled) under countable_kernels. Not XLA's cost analysis: it skips
    convolutions' padded positions and adds elementwise work (790.5 against 803.3 GFLOP for
    SD 1.5's UNet at batch 1)."""
    from tools.hlo_ops import program_flops

    # A fresh jit (its trace cache does not see the dispatch), lowered and not compiled.
    fresh, state = _jit_module(module)
    with countable_kernels():
        text = fresh.lower(state, *args).as_text(dialect="hlo")
    return program_flops(text) or None


def _jit_module(module, method=None):
    """A jitted call of an NNX module with its state as an argument (not baked in as constants)."""
    import jax
    from flax import nnx

    from jaxdiff.engine.programs import compiler_options

    graphdef, state = nnx.split(module)

    def call(state, *args):
        m = nnx.merge(graphdef, state)
        return (getattr(m, method) if method else m)(*args)

    return jax.jit(call, compiler_options=compiler_options()), state


def arch_family(arch: str, dtype):
    """The shipped default family (`default`), or random weights at full size for a named architecture."""
    if arch == "default":
        from jaxdiff.checkpoints import default_model_path
        from jaxdiff.weights.family import load_family
        return load_family(default_model_path(), dtype=dtype)
    from tools.random_family import random_family
    return random_family(arch, dtype)


def vae_factor(family) -> int:
    """Image pixels per latent pixel along a side."""
    return 2 ** (len(family.vae_config.block_out_channels) - 1)


def native_side(family) -> int:
    """The upscaler's low-res input side is its latent side; a base model's image side is
    its latent side times the VAE factor."""
    return (family.unet_config.sample_size or 64) * (1 if family.kind == "upscale" else vae_factor(family))


def guided_unet_inputs(cfg, context_dim: int, batch: int, latent_hw: tuple[int, int], dtype, make) -> tuple:
    """The UNet's arguments as the engine's CFG step passes them (jaxdiff.engine.programs):
    `batch` samples (latents, with the upscaler's low-res image or inpainting's mask
    channels), their timesteps, two contexts per sample (uncond, cond), and the upscaler's
    noise levels. `make(shape, dtype, seed)` makes each array; no noise levels: None."""
    import jax.numpy as jnp

    h, w = latent_hw
    return (make((batch, h, w, cfg.in_channels), dtype, 0), make((batch,), jnp.float32, 1),
            make((2 * batch, 77, context_dim), dtype, 2),
            make((batch,), jnp.int32, 3) if cfg.num_class_embeds is not None else None)


def random_input(shape, dtype, seed):
    import jax.numpy as jnp
    import numpy as np

    if jnp.issubdtype(dtype, jnp.integer):  # noise levels in range
        return jnp.full(shape, 20, dtype)
    if len(shape) == 1:  # timesteps: one per sample
        return jnp.full(shape, 500.0, dtype)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def stage_times(family, batch: int, latent_hw: tuple[int, int], reps: int) -> dict:
    """Each stage alone at this batch: text encoder, one UNet forward (CFG batch), VAE decode."""
    import jax
    import jax.numpy as jnp

    dtype = family.dtype
    out = {}
    text, text_state = _jit_module(family.text_encoder)
    ids = jnp.zeros((2 * batch, 77), jnp.int32)
    run = lambda: jax.block_until_ready(text(text_state, ids).last_hidden_state)
    run()
    out["text_s"] = _median_time(run, reps)

    unet, unet_state = _jit_module(family.unet)
    inputs = guided_unet_inputs(family.unet_config, family.text_encoder_config.hidden_size, batch,
                                latent_hw, dtype, random_input)
    args = (unet_state,) + tuple(a for a in inputs if a is not None)
    compiled = unet.lower(*args).compile()
    run = lambda: jax.block_until_ready(compiled(*args))
    run()
    out["unet_forward_s"] = _median_time(run, reps)
    flops = _flops(family.unet, args[1:])
    if flops:
        out["unet_gflop_per_forward"] = float(f"{flops / 1e9:.4g}")
        out["unet_tflops"] = float(f"{flops / out['unet_forward_s'] / 1e12:.4g}")
        peak = _peak(jax.devices()[0])
        if peak:
            out["unet_share_of_peak"] = round(out["unet_tflops"] / peak, 3)

    decode, vae_state = _jit_module(family.vae, "decode")
    z = random_input((batch, *latent_hw, family.vae_config.latent_channels), dtype, 2)
    run = lambda: jax.block_until_ready(decode(vae_state, z))
    run()
    out["decode_s"] = _median_time(run, reps)
    return {k: round(v, 5) if isinstance(v, float) and k.endswith("_s") else v for k, v in out.items()}


def bench_arch(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdiff.engine.pipeline import enable_compilation_cache
    from jaxdiff.engine.programs import compiler_options

    start = time.perf_counter()
    # Progress on stderr as it goes: a run cut off by a time limit still says where it was.
    progress = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)
    enable_compilation_cache(args.cache_dir)
    dtype = jnp.dtype(args.dtype or ("bfloat16" if jax.default_backend() != "cpu" else "float32"))
    progress(f"{jax.default_backend()} backend up; building {args.arch} with random weights")
    family = arch_family(args.arch, dtype)
    progress("models built")
    result = {"system": "jaxdiff", "arch": args.arch, "device": jax.devices()[0].device_kind,
              "device_count": jax.device_count(), "jax": jax.__version__, "dtype": str(dtype),
              "steps": args.steps, "sampler": args.sampler, "guidance": args.guidance,
              "unet_params": sum(x.size for x in jax.tree.leaves(nnx.state(family.unet, nnx.Param))),
              "timing": f"median of {args.reps} after a warm-up call, images on the host",
              # What the programs were compiled with, so runs with other options tell apart.
              "xla_options": compiler_options(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
              **_kernel_paths(), "batches": {}}
    side = args.size or native_side(family)
    result["size"] = side
    # Against diffusers on one GPU, jaxdiff runs on one chip; alone, on all of them. Decode is
    # whole on both sides (the engine tiles past 768 px by default, diffusers does not).
    devices = jax.local_devices()[:1] if args.one_chip else jax.local_devices()
    result["chips"] = len(devices)
    variants = args.variants.split(",") if args.variants else [None]
    if args.variants:
        result["variants"] = {v: {"env": VARIANTS[v], "batches": {}} for v in variants}
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        works = {}
        for v in variants:
            with variant_environment(v) if v else contextlib.nullcontext():
                progress(f"batch {B}{f', {v}' if v else ''}: first call (compiles, or loads from the cache)")
                try:
                    work, latent_hw = _batch_work(family, B, side, args, devices)
                    t = time.perf_counter()
                    work()
                except Exception as e:
                    if not v:
                        raise
                    # A kernel path that does not compile or run on this chip: the others
                    # are still timed, and the error kept.
                    result["variants"][v]["error"] = f"{type(e).__name__}: {e}"[:2000]
                    progress(f"batch {B}, {v}: failed: {type(e).__name__}: {str(e)[:300]}")
                    continue
                works[v] = work, round(time.perf_counter() - t, 2)
                if v:
                    result["variants"][v]["paths"] = _kernel_paths()
            progress(f"batch {B}{f', {v}' if v else ''}: first call took {works[v][1]:.1f} s")
        # Timed calls take turns: one batch of each variant a round.
        times = {v: [] for v in works}
        for _ in range(args.reps):
            for v in works:
                t = time.perf_counter()
                works[v][0]()
                times[v].append(time.perf_counter() - t)
        for v in works:
            batch_s = statistics.median(times[v])
            # Five significant digits: a tiny model's batch of a few ms keeps its images/s to 1e-4.
            entry = {"first_call_s": works[v][1], "batch_s": float(f"{batch_s:.5g}"),
                     "images_per_s": round(B / batch_s, 3)}
            if v is None:
                if not args.no_stages:
                    entry["stages"] = stage_times(family, B, latent_hw, args.reps)
                    entry["stages"]["denoise_s"] = round(entry["stages"]["unet_forward_s"] * args.steps, 4)
                print(json.dumps({"batch": B, **entry}), flush=True)
            else:
                entry["batches_s"] = [float(f"{t:.5g}") for t in times[v]]
                result["variants"][v]["batches"][str(B)] = entry
                print(json.dumps({"batch": B, "variant": v, **entry}), flush=True)
            if v == next(iter(works)):  # the run's figures (and its ratios with --compare)
                result["batches"][str(B)] = entry
    return result


def _batch_work(family, B: int, side: int, args, devices):
    """(a call that renders one batch of B on a fresh pipeline, the latents' height and width)."""
    import numpy as np

    from jaxdiff.engine import Pipeline, RenderSettings, Sample

    if family.kind == "upscale":
        settings = RenderSettings(upscale_steps=args.steps, upscale_guidance=args.guidance,
                                  upscale_sampler=args.sampler, tile_pixels=None)
        pipe = Pipeline(None, family, batch_size=B, settings=settings, devices=devices)
        low = [np.random.default_rng(i).integers(0, 256, (side, side, 3), np.uint8) for i in range(B)]
        prompts = [f"prompt {i}" for i in range(B)]
        return (lambda: pipe.upscale(low, prompts, seeds=list(range(B)))), (side, side)
    settings = RenderSettings(width=side, height=side, steps=args.steps, sampler=args.sampler,
                              guidance=args.guidance, tile_pixels=None)
    pipe = Pipeline(family, None, batch_size=B, settings=settings, devices=devices)
    samples = [Sample(id=str(i), prompt=f"prompt {i}", seed=i) for i in range(B)]
    return (lambda: pipe.render_samples(samples)), (side // vae_factor(family),) * 2


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_child(cmd: list[str], capture_stdout: bool) -> tuple[int, str, str]:
    """Runs a child process whose stderr passes through as it comes, so a run cut off by a
    time limit still shows where it was: (exit status, its stdout if captured, else "",
    the tail of its stderr). An uncaptured stdout passes through too."""
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE if capture_stdout else None,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
    tail = collections.deque(maxlen=100)

    def relay_stderr():
        for line in child.stderr:
            sys.stderr.write(line)
            tail.append(line)

    relay = threading.Thread(target=relay_stderr, daemon=True)
    relay.start()
    stdout = child.stdout.read() if capture_stdout else ""
    child.wait()
    relay.join()
    return child.returncode, stdout, "".join(tail)


def _child_json(cmd: list[str]) -> dict:
    """The last JSON line a child process printed (the children print one after each
    batch), with an error (exit status, stderr's tail) where it failed."""
    status, stdout, stderr = _run_child(cmd, capture_stdout=True)
    result = {}
    for line in reversed(stdout.splitlines()):
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(result, dict):
            break
        result = {}
    if status != 0 or not result:
        result["error"] = f"exit status {status}: {(stderr or stdout)[-2000:]}"
    return result


def compare_diffusers(args, compiled: bool, dtype: str | None) -> dict:
    cmd = [sys.executable, "-m", "tools.bench_diffusers", "--arch", args.arch, "--batch-sizes", args.batch_sizes,
           "--steps", str(args.steps), "--guidance", str(args.guidance), "--reps", str(args.reps)]
    if args.size:
        cmd += ["--size", str(args.size)]
    if dtype:
        cmd += ["--dtype", dtype]
    if compiled:
        cmd.append("--compile")
    return _child_json(cmd)


def _jaxdiff_in_child(argv: list[str], out_path: str) -> dict:
    """bench_arch in a process of its own: XLA keeps the accelerator memory it took until
    its process ends, and diffusers runs next."""
    cmd = [sys.executable, "-m", "tools.bench", *argv, "--compare", "none", "--one-chip", "--out", out_path]
    status, _, stderr = _run_child(cmd, capture_stdout=False)
    try:
        with open(out_path) as f:
            return json.load(f)["jaxdiff"]
    except (OSError, ValueError, KeyError):
        return {"error": f"exit status {status}: {stderr[-2000:]}", "batches": {}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd15", help="sd15, sd21, x4-upscaler, default or tiny (configs/architectures.py)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--size", type=int, default=None, help="image side (base) or low-res side (x4-upscaler)")
    p.add_argument("--dtype", default=None, help="bfloat16 on accelerators, float32 on CPU by default")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage timings")
    p.add_argument("--compare", default="none", choices=["none", "diffusers", "diffusers-compiled", "both"])
    p.add_argument("--cache-dir", default=None, help="persistent compilation cache (default ~/.cache/jaxdiff/xla)")
    p.add_argument("--one-chip", action="store_true", help="jaxdiff on one chip (set with --compare)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated kernel paths to time in turns in this process ({', '.join(VARIANTS)}); "
                        "per-stage timings are then left out")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS) if args.variants else set()
    if unknown:
        p.error(f"--variants: {', '.join(sorted(unknown))} not among {', '.join(VARIANTS)}")
    if args.compare != "none" and args.sampler != "dpmpp_2m":
        p.error("the diffusers side runs DPM-Solver++ (2M) only: compare with --sampler dpmpp_2m")
    if args.compare != "none" and args.arch == "default":
        p.error("the diffusers side builds named architectures only (configs/architectures.py): the shipped "
                "model has no --compare")

    if args.compare == "none":
        result = {"jaxdiff": bench_arch(args)}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = {"jaxdiff": _jaxdiff_in_child(argv, os.path.join(tmp, "jaxdiff.json"))}
        if "error" in result["jaxdiff"]:
            print("jaxdiff failed:", result["jaxdiff"]["error"][-400:], flush=True)

    def save():
        # After each stage: a run cut short by a time limit keeps what it measured.
        ratios = {}
        for name in ("diffusers_eager", "diffusers_compiled"):
            other = result.get(name, {}).get("batches", {})
            for B, entry in result["jaxdiff"].get("batches", {}).items():
                if B in other:
                    ratios[f"vs_{name}_b{B}"] = round(entry["images_per_s"] / other[B]["images_per_s"], 3)
            # And each kernel variant's, against the same diffusers figures.
            for v, variant in result["jaxdiff"].get("variants", {}).items():
                for B, entry in variant["batches"].items():
                    if B in other:
                        ratios[f"vs_{name}_b{B}_{v}"] = round(entry["images_per_s"] / other[B]["images_per_s"], 3)
        result["ratios"] = ratios
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    save()
    # Each diffusers variant in its own process, after jaxdiff's has ended.
    for name, compiled, wanted in (("diffusers_eager", False, ("diffusers", "both")),
                                   ("diffusers_compiled", True, ("diffusers-compiled", "both"))):
        if args.compare in wanted:
            result[name] = compare_diffusers(args, compiled, result["jaxdiff"].get("dtype", args.dtype))
            print(name, json.dumps(result[name])[:400], flush=True)
            save()
    ratios = result["ratios"]
    for v, entry in result["jaxdiff"].get("variants", {}).items():
        print(f"{v:>8} " + entry.get("error", "")[:200] + "  ".join(
            f"batch {B}: {e['images_per_s']} img/s (first call {e['first_call_s']} s) "
            + " ".join(f"{k}={r}" for k, r in ratios.items() if k.endswith(f"_b{B}_{v}"))
            for B, e in entry["batches"].items()))
    print(f"{'batch':>6} {'img/s':>9} {'first s':>8} {'UNet TFLOP/s':>13}  ratios")
    for B, e in result["jaxdiff"].get("batches", {}).items():
        rs = " ".join(f"{k}={v}" for k, v in ratios.items() if k.endswith(f"_b{B}"))
        print(f"{B:>6} {e['images_per_s']:>9} {e['first_call_s']:>8} "
              f"{e.get('stages', {}).get('unet_tflops', '-'):>13}  {rs}")
    return result


if __name__ == "__main__":
    main()
