"""The benchmark tools run end to end on the tiny architecture (CPU), diffusers side by side."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from tools import bench


def test_bench_reports_throughput_stages_and_ratio(tmp_path, monkeypatch):
    # Two chips in jaxdiff's process: against diffusers on one GPU it renders on one.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    out = tmp_path / "bench.json"
    result = bench.main(["--arch", "tiny", "--batch-sizes", "1,2", "--steps", "2", "--reps", "1",
                         "--compare", "diffusers", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["jaxdiff"]["attention"] == os.environ.get("JAXDIFF_ATTENTION", "auto")
    assert result["jaxdiff"]["geglu"] == os.environ.get("JAXDIFF_GEGLU", "xla")
    assert result["jaxdiff"]["layer_norm"] == os.environ.get("JAXDIFF_LAYER_NORM", "xla")
    assert result["jaxdiff"]["group_norm"] == os.environ.get("JAXDIFF_GROUP_NORM", "xla")
    assert (result["jaxdiff"]["device_count"], result["jaxdiff"]["chips"]) == (2, 1)
    for batch in ("1", "2"):
        entry = result["jaxdiff"]["batches"][batch]
        assert entry["images_per_s"] > 0 and entry["first_call_s"] > 0
        stages = entry["stages"]
        assert stages["unet_gflop_per_forward"] > 0 and stages["decode_s"] > 0 and stages["text_s"] > 0
        assert result["diffusers_eager"]["batches"][batch]["images_per_s"] > 0
        assert result["ratios"][f"vs_diffusers_eager_b{batch}"] > 0
        # images/s is the batch's images over its median time, on both sides, and the ratio
        # is jaxdiff's over diffusers' (above 1: jaxdiff is faster).
        theirs = result["diffusers_eager"]["batches"][batch]
        # (Each figure is rounded: images/s to 3 decimals, times to 5 significant digits.)
        assert entry["images_per_s"] == pytest.approx(int(batch) / entry["batch_s"], rel=1e-2, abs=2e-3)
        assert theirs["images_per_s"] == pytest.approx(int(batch) / theirs["batch_s"], rel=1e-2, abs=2e-3)
        assert result["ratios"][f"vs_diffusers_eager_b{batch}"] == pytest.approx(
            entry["images_per_s"] / theirs["images_per_s"], rel=1e-2, abs=2e-3)
        assert stages["denoise_s"] == pytest.approx(2 * stages["unet_forward_s"], rel=1e-3, abs=1e-4)  # 2 steps
        # Same work on both sides, counted the same way (CFG doubles diffusers' batch): jaxdiff
        # does less of it, running the part before the first cross attention once per
        # sample (test_unet_flops_are_counted_as_the_diffusers_baseline_counts_them checks
        # the count itself).
        other = result["diffusers_eager"]
        ratio = stages["unet_gflop_per_forward"] / (2 * int(batch) * other["unet_gflop_per_forward_b1"])
        assert 0.8 < ratio < 0.99
    jaxdiff, other = result["jaxdiff"], result["diffusers_eager"]
    assert jaxdiff["unet_params"] == other["unet_params"] == 52004
    assert jaxdiff["xla_options"] == {"xla_backend_optimization_level": 1} and "xla_flags" in jaxdiff
    assert (jaxdiff["dtype"], jaxdiff["size"], jaxdiff["steps"]) == (other["dtype"], other["size"], other["steps"])


def test_bench_runs_the_upscaler_architecture(tmp_path):
    from configs import architectures

    architectures.ARCHITECTURES["tiny-x4"] = (
        architectures.TINY_CLIP,
        dict(architectures.TINY_UNET, in_channels=7, num_class_embeds=1000, only_cross_attention=[True, False],
             down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
             up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"]),
        architectures.TINY_VAE, architectures.X4_SCHEDULER, architectures.X4_LOW_RES_SCHEDULER)
    try:
        result = bench.main(["--arch", "tiny-x4", "--batch-sizes", "1", "--steps", "2", "--reps", "1",
                             "--size", "8", "--cache-dir", str(tmp_path / "cache")])
        unet_cfg, context_dim = architectures.ARCHITECTURES["tiny-x4"][1], architectures.TINY_CLIP["hidden_size"]
    finally:
        del architectures.ARCHITECTURES["tiny-x4"]
    assert result["jaxdiff"]["batches"]["1"]["images_per_s"] > 0
    # The upscaler's stages run at its low-res side: --size 8 is an 8x8 latent (no VAE factor).
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig

    cfg = UNetConfig.from_dict(unet_cfg)
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    args = (jax.ShapeDtypeStruct((1, 8, 8, 7), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((2, 77, context_dim), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32))
    stages = result["jaxdiff"]["batches"]["1"]["stages"]
    assert stages["unet_gflop_per_forward"] == pytest.approx(bench._flops(unet, args) / 1e9, rel=1e-3)


def test_op_profile_puts_every_op_in_a_category(tmp_path, monkeypatch):
    from tools import op_profile

    # A trace event that is no instruction of the program (on GPU, a CUDA graph of several
    # ops) is "other", never a guessed category.
    real_op_times = op_profile.op_times
    monkeypatch.setattr(op_profile, "op_times", lambda *a: {**real_op_times(*a), "command_buffer_7": 1.0})
    monkeypatch.setenv("XLA_FLAGS", "")  # main() turns command buffers off in it
    out = tmp_path / "profile.json"
    result = op_profile.main(["--arch", "tiny", "--batch", "1", "--reps", "2", "--out", str(out)])
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_enable_command_buffer="
    assert {"op": "command_buffer_7", "category": "other"}.items() <= result["top_ops"][0].items()
    # Times are per forward: the trace's 1 s over its 2 forwards is 0.5 s, in its category too.
    assert result["top_ops"][0]["s"] == 0.5 and 0.5 <= result["categories"]["other"]["s"] < 0.6
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    categories = result["categories"]
    assert set(categories) == set(op_profile.CATEGORIES)
    assert abs(sum(c["s"] for c in categories.values()) - result["op_time_s"]) < 1e-5
    assert sum(c["share"] for c in categories.values()) == pytest.approx(1.0, abs=1e-3)  # of the ops' time
    # The tiny UNet has convolutions and cross-attention: both must be found by name.
    assert categories["convolution"]["s"] > 0 and categories["attention"]["s"] > 0
    assert categories["matmul"]["ops"] > 0
    # FLOPs and bytes read off the HLO give each category its achieved rates.
    for category in ("convolution", "attention", "matmul"):
        entry = categories[category]
        assert entry["gflop"] > 0 and entry["tflop_s"] > 0 and entry["gb_s"] > 0, category
        assert entry["tflop_s"] == pytest.approx(entry["gflop"] / entry["s"] / 1e3, rel=0.01), category
        assert entry["gb_s"] == pytest.approx(entry["gb"] / entry["s"], rel=0.01), category
    assert categories["elementwise"]["gflop"] == 0 and categories["elementwise"]["gb"] > 0
    assert result["top_ops"] and all(o["category"] in categories for o in result["top_ops"])
    # Every op is listed, slowest first, the top ones among them, each with where in the
    # models it comes from (the stand-in event has no source).
    ops = result["ops"]
    assert ops[:20] == result["top_ops"] and [o["s"] for o in ops] == sorted((o["s"] for o in ops), reverse=True)
    assert sum(o["s"] for o in ops) == pytest.approx(result["op_time_s"], abs=1e-4)
    assert ops[0]["source"] == "?"
    sources = {o["source"].split(":")[0] for o in ops if o["category"] == "convolution"}
    assert sources & {"unet.py", "blocks.py"}, sources


def test_op_profile_names_gpu_library_calls():
    from tools import hlo_ops

    hlo = """HloModule m

%fused_conv (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  ROOT %c = (f32[2]{0}, u8[0]{0}) custom-call(%p), custom_call_target="__cudnn$convBiasActivationForward"
}

ENTRY %main (a: f32[2]) -> f32[2] {
  %a = f32[2]{0} parameter(0)
  %fmha = (f32[2]{0}, u8[0]{0}) custom-call(%a), custom_call_target="__cudnn$fmhaSoftmax"
  %gemm = (f32[2]{0}, s8[0]{0}) custom-call(%a), custom_call_target="__cublas$gemm"
  %conv_fusion = f32[2]{0} fusion(%a), kind=kCustom, calls=%fused_conv
  %t = f32[2]{0} transpose(%a), dimensions={0}
  ROOT %e = f32[2]{0} exponential(%a)
}
"""
    instructions, computations = hlo_ops.parse_hlo(hlo)
    found = {name: hlo_ops.categorize(name, instructions, computations)
             for name in ("fmha", "gemm", "conv_fusion", "t", "e")}
    assert found == {"fmha": "attention", "gemm": "matmul", "conv_fusion": "convolution",
                     "t": "layout", "e": "elementwise"}


def test_attention_bench_times_every_call_site_on_each_path(tmp_path):
    from tools import attention_bench

    out = tmp_path / "attention.json"
    result = attention_bench.main(["--arch", "tiny", "--batch", "1", "--reps", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    sites = {s["site"]: s for s in result["sites"]}
    # The tiny UNet attends at 8x8 (self and text), in its 4x4 mid block, and its VAE at 8x8.
    # Its first self attention comes before any text: once per sample, not per context.
    assert set(sites) == {"unet 8x8 self 1st", "unet 8x8 self", "unet 8x8 text", "unet mid 4x4 self",
                          "unet mid 4x4 text", "vae mid 8x8"}
    assert sites["unet 8x8 self"]["batch"] == 2 and sites["vae mid 8x8"]["batch"] == 1  # CFG doubles
    assert sites["unet 8x8 self 1st"]["batch"] == 1 and sites["unet 8x8 self 1st"]["calls"] == 1
    assert sites["unet 8x8 text"]["kv_tokens"] == 77 and sites["unet 8x8 text"]["calls"] == 3
    assert sites["unet 8x8 self"]["calls"] == 2
    for site in result["sites"]:
        assert site["paths"]["xla"]["tflop_s"] > 0
        assert "cuDNN" in site["paths"]["cudnn"]["error"]  # no GPU here: named, not hidden
        for name in ("mosaic_fa3", "tokamax_mosaic_gpu", "tokamax_triton"):
            path = site["paths"][name]  # timed or, with its reason, not: never missing
            assert path.get("ms", 0) > 0 or path["error"].split(": ", 1)[1], name
    # Each site's FLOPs are what XLA's attention at its shape counts as, and its rates those
    # FLOPs over its time.
    import jax

    from tools.hlo_ops import program_flops

    for s in result["sites"]:
        q = jax.ShapeDtypeStruct((s["batch"], s["q_tokens"], s["heads"], s["head_dim"]), jax.numpy.float32)
        kv = jax.ShapeDtypeStruct((s["batch"], s["kv_tokens"], s["heads"], s["head_dim"]), jax.numpy.float32)
        lowered = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")).lower(q, kv, kv)
        assert s["gflop"] == pytest.approx(program_flops(lowered.as_text(dialect="hlo")) / 1e9, rel=1e-3), s["site"]
        xla = s["paths"]["xla"]
        assert xla["tflop_s"] == pytest.approx(s["gflop"] / xla["ms"], rel=0.01), s["site"]


def test_attention_step_totals_weigh_each_unet_site_by_its_calls():
    """The UNet's attention time per step: each UNet site's time on the dispatch's path (or
    its fastest) times its calls per step; the VAE's attention is no part of a step."""
    from tools.attention_bench import _step_totals

    sites = [{"site": "unet 8x8 self", "calls": 2, "dispatch": "cudnn",
              "paths": {"xla": {"ms": 3.0}, "cudnn": {"ms": 2.0}, "mosaic_fa3": {"error": "no GPU"}}},
             {"site": "unet 8x8 text", "calls": 3, "dispatch": "xla",
              "paths": {"xla": {"ms": 1.0}, "cudnn_pad64": {"ms": 0.5}}},
             {"site": "vae mid 8x8", "calls": 1, "dispatch": "xla", "paths": {"xla": {"ms": 100.0}}}]
    assert _step_totals(sites) == {"dispatch": 2 * 2.0 + 3 * 1.0, "best": 2 * 2.0 + 3 * 0.5}


def test_attention_bench_times_calls_chained_in_one_program(monkeypatch):
    """Each timing runs CHAINED_CALLS calls in one program, each on the last one's output,
    and reports the time of one; the output compared against XLA's is one call's."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tools import attention_bench

    def halve(q, k, v):  # not attention: each call's effect shows in the chained output
        return q * 0.5
    run = attention_bench.chained(halve, calls=3)
    q = jnp.ones((1, 4, 1, 8))
    np.testing.assert_array_equal(np.asarray(run(q, q, q)), np.full((1, 4, 1, 8), 0.125))
    traced = []
    monkeypatch.setattr(attention_bench, "_paths", lambda d: {
        "xla": lambda q, k, v: traced.append(1) or jax.nn.dot_product_attention(q, k, v, implementation="xla")})
    monkeypatch.setattr(bench, "_median_time", lambda fn, reps: 0.8)  # time_site times with it
    site = {"site": "unet 4x4 self", "batch": 1, "q_tokens": 16, "kv_tokens": 16, "heads": 2, "head_dim": 8,
            "calls": 1}
    entry = attention_bench.time_site(site, jnp.float32, reps=1)["paths"]["xla"]
    assert len(traced) == 1 + attention_bench.CHAINED_CALLS  # the lone call, then the chain
    assert entry["ms"] == pytest.approx(800.0 / attention_bench.CHAINED_CALLS)


def test_attention_bench_sets_each_path_against_xlas_output(monkeypatch):
    """A path whose output differs from XLA's attention shows it in max_diff_vs_xla,
    whichever path was timed before it."""
    import functools

    import jax
    import jax.numpy as jnp

    from tools import attention_bench

    wrong = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla") + 1.0
    monkeypatch.setattr(attention_bench, "_paths", lambda d: {
        "xla": functools.partial(jax.nn.dot_product_attention, implementation="xla"), "wrong": wrong,
        "same": functools.partial(jax.nn.dot_product_attention, implementation="xla")})
    site = {"site": "unet 4x4 self", "batch": 1, "q_tokens": 16, "kv_tokens": 16, "heads": 2, "head_dim": 8,
            "calls": 1}
    paths = attention_bench.time_site(site, jnp.float32, reps=1)["paths"]
    assert paths["xla"]["max_diff_vs_xla"] == 0 and paths["wrong"]["max_diff_vs_xla"] == pytest.approx(1.0)
    assert paths["same"]["max_diff_vs_xla"] < 1e-6


def test_attention_with_a_zero_padded_head_dim_is_unchanged():
    import jax
    import numpy as np

    from tools.attention_bench import with_padded_head_dim

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 50, 3, 40)).astype(np.float32) for _ in range(3))
    plain = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    padded = with_padded_head_dim(lambda *a, **kw: jax.nn.dot_product_attention(*a, implementation="xla", **kw), 64)
    np.testing.assert_allclose(np.asarray(padded(q, k, v)), np.asarray(plain), rtol=1e-5, atol=1e-6)


def test_mosaic_attention_gets_a_prescaled_q_and_a_padded_head_dim(monkeypatch):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    from tools.attention_bench import mosaic_fa3, with_padded_head_dim

    # The kernel's contract, on XLA: f16, a head dim that is a multiple of 64, no softmax scale.
    def kernel(q, k, v, config):
        assert q.dtype == k.dtype == v.dtype == jnp.float16 and q.shape[-1] % 64 == 0
        assert (config.block_q, config.block_kv) == (64, 128)
        return jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation="xla")
    monkeypatch.setattr(attention_mgpu, "attention", kernel)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 128, 3, 40)).astype(np.float32) for _ in range(3))
    plain = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    out = with_padded_head_dim(mosaic_fa3(64, 128), 64)(q, k, v)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), rtol=1e-2, atol=5e-3)


def test_hlo_ops_counts_the_flops_of_each_kernel_kind():
    from tools import hlo_ops

    # Every way a GEMM, a convolution or attention shows up in an optimized module: plain
    # ops (CPU), cuDNN convolution, cuBLAS and cuDNN flash attention custom calls (GPU),
    # a dot inside a fusion (Triton GEMMs).
    hlo = """HloModule m

%gemm_computation (p0: f32[16,32], p1: f32[32,8]) -> f32[16,8] {
  %p0 = f32[16,32]{1,0} parameter(0)
  %p1 = f32[32,8]{1,0} parameter(1)
  ROOT %inner = f32[16,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[3,5,11], b: f32[3,11,7], x: f32[2,8,8,4], w: f32[3,3,4,16], wo: bf16[16,3,3,4], m: f32[16,32], n: f32[32,8], q: bf16[2,64,4,40], k: bf16[2,77,4,40], g: bf16[32,2,8]) -> f32[3,5,7] {
  %a = f32[3,5,11]{2,1,0} parameter(0)
  %b = f32[3,11,7]{2,1,0} parameter(1)
  %x = f32[2,8,8,4]{3,2,1,0} parameter(2)
  %w = f32[3,3,4,16]{3,2,1,0} parameter(3)
  %wo = bf16[16,3,3,4]{3,2,1,0} parameter(4)
  %m = f32[16,32]{1,0} parameter(5)
  %n = f32[32,8]{1,0} parameter(6)
  %q = bf16[2,64,4,40]{3,2,1,0} parameter(7)
  %k = bf16[2,77,4,40]{3,2,1,0} parameter(8)
  %g = bf16[32,2,8]{2,1,0} parameter(9)
  %glu = bf16[16,8]{1,0} custom-call(%m, %g), custom_call_target="mosaic_gpu_v2"
  %other_mosaic = bf16[16,8]{1,0} custom-call(%m, %n), custom_call_target="mosaic_gpu_v2"
  %flash = bf16[2,64,4,40]{3,2,1,0} custom-call(%q, %k, %k), custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(f)/vmap()/flash_attention_sm90/mpmd_map"}
  %batched = f32[3,5,7]{2,1,0} dot(%a, %b), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
  %conv = f32[2,8,8,16]{3,2,1,0} convolution(%x, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
  %cudnn = (f32[2,8,8,16]{3,2,1,0}, u8[0]{0}) custom-call(%x, %wo), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBiasActivationForward"
  %cublas = (f32[16,8]{1,0}, s8[0]{0}) custom-call(%m, %n), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %triton = f32[16,8]{1,0} fusion(%m, %n), kind=kCustom, calls=%gemm_computation
  %fmha = (bf16[2,4,64,40]{3,1,2,0}, u8[0]{0}) custom-call(%q, %k, %k), custom_call_target="__cudnn$fmhaSoftmax", backend_config={"cudnn_fmha_backend_config": {"bmm1_dot_dimension_numbers": {"lhs_contracting_dimensions": ["3"], "rhs_contracting_dimensions": ["3"], "lhs_batch_dimensions": ["0", "2"], "rhs_batch_dimensions": ["0", "2"]}, "bmm2_dot_dimension_numbers": {"lhs_contracting_dimensions": ["3"], "rhs_contracting_dimensions": ["1"], "lhs_batch_dimensions": ["0", "1"], "rhs_batch_dimensions": ["0", "2"]}}}
  ROOT %e = f32[3,5,7]{2,1,0} exponential(%batched)
}
"""
    instructions, computations = hlo_ops.parse_hlo(hlo)
    flops = {name: hlo_ops.op_flops(name, instructions, computations)
             for name in ("batched", "conv", "cudnn", "cublas", "triton", "fmha", "glu", "other_mosaic", "flash",
                          "e")}
    conv = 2 * (2 * 8 * 8 * 16) * (3 * 3 * 4)  # padding counted: the kernels compute it
    assert flops == {"batched": 2 * 3 * 5 * 7 * 11, "conv": conv, "cudnn": conv,
                     "cublas": 2 * 16 * 8 * 32, "triton": 2 * 16 * 8 * 32,
                     # q.k and p.v: 2 x batch x heads x 64 queries x 77 keys x 40, twice
                     "fmha": 4 * 2 * 4 * 64 * 77 * 40,
                     # tokamax's flash attention on Mosaic GPU (the "tokamax" attention path)
                     "flash": 4 * 2 * 4 * 64 * 77 * 40,
                     # tokamax's gated linear unit (jaxdiff/models/geglu.py): two GEMMs of
                     # 16 x 32 by 32 x 8 in one; a Mosaic GPU kernel of another shape: unknown
                     "glu": 2 * 2 * 16 * 8 * 32, "other_mosaic": 0, "e": 0}
    assert hlo_ops.categorize("glu", instructions, computations) == "matmul"
    assert hlo_ops.categorize("flash", instructions, computations) == "attention"


def test_hlo_ops_flops_agree_with_xlas_own_count_where_there_is_no_padding():
    """Grouped and strided convolutions and dots with several batch and contracting dims are
    counted as XLA's cost analysis counts them (unpadded, where the two counts agree)."""
    import jax
    import jax.numpy as jnp

    from tools import hlo_ops

    def grouped(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=4)

    def strided(x, w):
        return jax.lax.conv_general_dilated(x, w, (2, 2), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))

    def dots(a, b):
        return jnp.einsum("bhij,bhjk->bhik", a, b), jnp.einsum("hij,hjk->ik", a[0], b[0])

    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    for fn, args in ((grouped, (f32(2, 10, 10, 16), f32(3, 3, 4, 32))), (strided, (f32(2, 6, 11, 11), f32(8, 6, 3, 3))),
                     (dots, (f32(2, 3, 5, 11), f32(2, 3, 11, 7)))):
        lowered = jax.jit(fn).lower(*args)
        assert hlo_ops.program_flops(lowered.as_text(dialect="hlo")) == lowered.cost_analysis()["flops"], fn


def test_kernels_are_counted_by_the_model_code_they_come_from():
    """On a GPU, XLA's own attention becomes cuBLAS GEMM calls: those that come from
    jaxdiff/models/attention.py are attention time, not matmul time; a kernel from
    jaxdiff/models/layer_norm.py is norm time."""
    from tools import hlo_ops

    hlo = """HloModule m

ENTRY %main (a: f32[16,32], b: f32[32,8]) -> f32[16,8] {
  %a = f32[16,32]{1,0} parameter(0)
  %b = f32[32,8]{1,0} parameter(1)
  %scores = (f32[16,8]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(f)/dot_general" source_file="/src/jaxdiff/models/attention.py" source_line=120}
  %proj = (f32[16,8]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(f)/dot_general" source_file="/src/jaxdiff/models/blocks.py" source_line=40}
  %norm = f32[16,32]{1,0} custom-call(%a), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/pallas_call" source_file="/src/jaxdiff/models/layer_norm.py" source_line=64}
  %sums = f32[16,32]{1,0} custom-call(%a), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/group_norm_sums/pallas_call" source_file="/src/jaxdiff/models/group_norm.py" source_line=150}
  %normalised = f32[16,32]{1,0} custom-call(%a, %sums), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/group_norm/pallas_call" source_file="/src/jaxdiff/models/group_norm.py" source_line=157}
  ROOT %r = f32[16,8]{1,0} get-tuple-element(%scores), index=0
}
"""
    instructions, computations = hlo_ops.parse_hlo(hlo)
    assert hlo_ops.categorize("scores", instructions, computations) == "attention"
    assert hlo_ops.categorize("proj", instructions, computations) == "matmul"
    # The one-pass layer norm kernel (a Triton call) counts with the norms' statistics.
    assert hlo_ops.categorize("norm", instructions, computations) == "reduction"
    # The group norm's two kernels: its sums with the norms' statistics, the pass that
    # normalises with the elementwise ops (XLA's own is one).
    assert hlo_ops.categorize("sums", instructions, computations) == "reduction"
    assert hlo_ops.categorize("normalised", instructions, computations) == "elementwise"


def _scaled(x):
    return x * 2


def _shifted(x):
    return _scaled(x) + 1


def test_ops_are_traced_back_through_every_caller():
    """Each op's source is its whole call chain as XLA prints it, innermost first: an op is
    put in the attention category when any of its callers is in attention.py, and reports
    name the model line it comes from."""
    import jax
    import jax.numpy as jnp

    from tools import hlo_ops

    text = jax.jit(_shifted).lower(jax.ShapeDtypeStruct((4,), jnp.float32)).compile().as_text()
    chains = hlo_ops.stack_locations(text)
    frame = int(re.search(r"multiply\(.*stack_frame_id=(\d+)", text).group(1))
    assert [location.split(" ")[1] for location in chains[frame][:3]] == ["_scaled", "_shifted",
                                                                          "test_ops_are_traced_back_through_every_caller"]
    assert "test_bench.py" in hlo_ops.stack_files(chains)[frame]

# One step's body with a GEMM custom call and an elementwise fusion; the entry's own ops
# (outside the loop) are not counted.
LOOP_HLO = """HloModule m

%fused_add (p: f32[16,8]) -> f32[16,8] {
  %p = f32[16,8]{1,0} parameter(0)
  ROOT %a = f32[16,8]{1,0} add(%p, %p)
}

%fused_slice (q: f32[16,8]) -> f32[4,8] {
  %q = f32[16,8]{1,0} parameter(0)
  ROOT %s = f32[4,8]{1,0} slice(%q), slice={[0:4], [0:8]}
}

%body (arg: (s32[], f32[16,8], /*index=2*/bf16[8,8])) -> (s32[], f32[16,8], /*index=2*/bf16[8,8]) {
  %arg = (s32[], f32[16,8]{1,0}, bf16[8,8]{1,0}) parameter(0)
  %x = f32[16,8]{1,0} get-tuple-element(%arg), index=1
  %w = bf16[8,8]{1,0} get-tuple-element(%arg), index=2
  %gemm = (f32[16,8]{1,0}, s8[0]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %y = f32[16,8]{1,0} get-tuple-element(%gemm), index=0
  %sum = f32[16,8]{1,0} fusion(%y), kind=kLoop, calls=%fused_add
  %part = f32[4,8]{1,0} fusion(%sum), kind=kLoop, calls=%fused_slice
  %i = s32[] get-tuple-element(%arg), index=0
  ROOT %out = (s32[], f32[16,8]{1,0}, bf16[8,8]{1,0}) tuple(%i, %sum, %w)
}

%cond (arg: (s32[], f32[16,8], /*index=2*/bf16[8,8])) -> pred[] {
  %arg = (s32[], f32[16,8]{1,0}, bf16[8,8]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a0: f32[16,8], b0: bf16[8,8]) -> f32[16,8] {
  %a0 = f32[16,8]{1,0} parameter(0)
  %b0 = bf16[8,8]{1,0} parameter(1)
  %t = bf16[8,8]{0,1} transpose(%b0), dimensions={1,0}
  %z = s32[] constant(0)
  %init = (s32[], f32[16,8]{1,0}, bf16[8,8]{1,0}) tuple(%z, %a0, %t)
  %loop = (s32[], f32[16,8]{1,0}, bf16[8,8]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[16,8]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_step_hlo_counts_bytes_of_the_loop_body_ops():
    from tools import hlo_ops, step_hlo

    hlo = LOOP_HLO
    assert hlo_ops.type_bytes("(f32[16,8]{1,0}, s8[0]{0})") == 512
    assert hlo_ops.loop_body(hlo) == "body"
    # A loop inside a computation the step calls (chunked attention) is printed before the
    # entry: the step is still the entry's loop.
    chunked = hlo.replace("ENTRY %main", """%chunks (c: (s32[], f32[16,8], /*index=2*/bf16[8,8])) -> (s32[], f32[16,8], /*index=2*/bf16[8,8]) {
  %c = (s32[], f32[16,8]{1,0}, bf16[8,8]{1,0}) parameter(0)
  ROOT %w = (s32[], f32[16,8]{1,0}, bf16[8,8]{1,0}) while(%c), condition=%cond, body=%fused_add
}

ENTRY %main""")
    assert hlo_ops.parse_hlo(chunked)[1]["chunks"] == ["c", "w"] and hlo_ops.loop_body(chunked) == "body"
    summary = step_hlo.summarize(hlo, chip_rates=(1.0, 1.0))
    categories = summary["categories"]
    # GEMM: f32 x (512 B) and bf16 w (128 B) in, f32 (512 B) out, 16 x 8 x 8 multiply-adds;
    # the add: 512 in, 512 out; the slice reads only the 128 B it writes.
    assert categories["matmul"] == {"ops": 1, "bytes": 512 + 128 + 512, "flops": 2 * 16 * 8 * 8}
    assert categories["elementwise"] == {"ops": 1, "bytes": 1024, "flops": 0}
    assert categories["layout"] == {"ops": 1, "bytes": 256, "flops": 0}
    # At 1 TFLOP/s and 1 TB/s each op takes 1 ms per 1e9 FLOPs or bytes: the GEMM its
    # FLOPs (2048 > 1152 bytes), the others their bytes.
    assert summary["roofline_ms"] == pytest.approx((2048 + 1024 + 256) / 1e9)
    assert sum(c["ops"] for c in categories.values()) == 3  # the entry's transpose is hoisted work
    assert summary["kernels"] == {"fusion:kLoop": 2, "__cublas$lt$matmul": 1}


def test_step_hlo_finds_the_loop_invariant_kernels():
    """Ops that compute the same value at every step (from the weights the loop passes on
    unchanged, and constants) are reported apart; what reads a changing element is not."""
    from tools import hlo_ops, step_hlo

    hlo = LOOP_HLO.replace("""  %gemm = (f32[16,8]{1,0}, s8[0]{0}) custom-call(%x, %w),""", """  %one = bf16[] constant(1)
  %w2 = bf16[8,8]{1,0} fusion(%w, %one), kind=kLoop, calls=%scaled
  %gemm = (f32[16,8]{1,0}, s8[0]{0}) custom-call(%x, %w2),""").replace(
        "tuple(%i, %sum, %w)", "tuple(%i, %sum, /*index=2*/%w)").replace("%body (arg", """%scaled (p: bf16[8,8], s: bf16[]) -> bf16[8,8] {
  %p = bf16[8,8]{1,0} parameter(0)
  %s = bf16[] parameter(1)
  %b = bf16[8,8]{1,0} broadcast(%s), dimensions={}
  ROOT %m = bf16[8,8]{1,0} multiply(%p, %b)
}

%body (arg""")
    instructions, computations = hlo_ops.parse_hlo(hlo)
    # (This loop passes its counter on unchanged too.)
    assert hlo_ops.loop_invariant("body", instructions, computations) == {"i", "w", "one", "w2"}
    # The scaled weights: 128 B read, 128 B written, 2 B of constant.
    assert step_hlo.summarize(hlo)["loop_invariant"] == {"kernels": 1, "mb": 0.0, "sources_mb": {"?": 0.0}}
    assert step_hlo.summarize(LOOP_HLO)["loop_invariant"] == {"kernels": 0, "mb": 0.0, "sources_mb": {}}


def test_step_hlo_reads_each_gpu_targets_compute_capability():
    """What the attention dispatch is told when compiling for a GPU without one: the
    target's own capability (its cuDNN takes head dims up to 256 from 9.0 on)."""
    from tools import step_hlo

    for name in ("h100", "h200"):
        with open(os.path.join(step_hlo.TARGETS_DIR, step_hlo.TARGETS[name].compile_for)) as f:
            assert step_hlo.cuda_capability(f.read()) == (9, 0), name
    assert step_hlo.cuda_capability("cuda_compute_capability {\n  major: 8\n  minor: 6\n}") == (8, 6)
    assert step_hlo.cuda_capability("gpu_device_info {}") is None


def test_step_hlo_floors_use_the_target_chips_peak_and_bandwidth():
    """The floors a report gives: compute is the step's FLOPs at the chip's bf16 peak,
    memory the memory-bound ops' bytes (not the GEMMs') at its bandwidth, the roofline
    each op at the slower of the two; per category, its FLOPs at peak and bytes at bandwidth."""
    from tools import step_hlo

    # The loop above at a million times the elements: 2048 GFLOP of GEMM moving 1.152 GB,
    # 1.024 GB of elementwise and 0.256 GB of layout work.
    hlo = LOOP_HLO.replace("[16,8]", "[16000,8000]").replace("[8,8]", "[8000,8000]").replace("[4,8]", "[4000,8000]")
    for chip, peak, bandwidth in (("h100", 989.0, 3.35), ("h200", 989.0, 4.8)):
        result = step_hlo.report(hlo, 2048.0, chip)
        categories = result["categories"]
        assert (categories["matmul"]["gflop"], categories["matmul"]["gb"]) == (2048.0, 1.152)
        assert categories["elementwise"]["gb"] == 1.024 and categories["layout"]["gb"] == 0.256
        assert categories["matmul"]["ms_at_peak"] == round(2048 / peak, 3)
        assert categories["elementwise"]["ms_at_bandwidth"] == round(1.024 / bandwidth, 3)
        assert result["floors_ms"] == {
            "compute": round(2048 / peak, 3), "memory_bound_ops": round((1.024 + 0.256) / bandwidth, 3),
            "roofline": round(2048 / peak + (1.024 + 0.256) / bandwidth, 3)}, chip


def test_step_hlo_on_a_local_card_uses_that_cards_own_figures(monkeypatch):
    """--target local on a GPU machine gets the floors of the card it runs on: the H100's
    PCIe and NVL cards and the H200's NVL card are slower than the SXM figures; a card whose
    variants differ in bandwidth (A100) gets none rather than wrong ones, as TPUs, whose
    byte counts include copies between memory spaces."""
    from types import SimpleNamespace

    import jax

    from tools import step_hlo

    hlo = LOOP_HLO.replace("[16,8]", "[16000,8000]").replace("[8,8]", "[8000,8000]").replace("[4,8]", "[4000,8000]")
    found = {}
    for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL",
                 "NVIDIA A100-SXM4-80GB", "TPU v5 lite", "TPU v5", "cpu"):
        monkeypatch.setattr(jax, "devices", lambda kind=kind: [SimpleNamespace(device_kind=kind)])
        result = step_hlo.report(hlo, 2048.0, "local")
        found[kind] = (result["chip"], result.get("floors_ms", {}).get("compute"),
                       result.get("floors_ms", {}).get("memory_bound_ops"))
    # 2048 GFLOP at the peak; 1.28 GB of memory-bound ops at the bandwidth.
    assert found == {"NVIDIA H100 80GB HBM3": ("h100", round(2048 / 989, 3), round(1.28 / 3.35, 3)),
                     "NVIDIA H100 PCIe": ("h100-pcie", round(2048 / 756, 3), round(1.28 / 2.0, 3)),
                     "NVIDIA H100 NVL": ("h100-nvl", round(2048 / 835, 3), round(1.28 / 3.9, 3)),
                     "NVIDIA H200": ("h200", round(2048 / 989, 3), round(1.28 / 4.8, 3)),
                     "NVIDIA H200 NVL": ("h200-nvl", round(2048 / 835, 3), round(1.28 / 4.8, 3)),
                     "NVIDIA A100-SXM4-80GB": ("a100", None, None),
                     "TPU v5 lite": ("v5e", None, None), "TPU v5": ("v5p", None, None), "cpu": (None, None, None)}


def test_step_hlo_reports_one_step_on_the_local_backend(tmp_path):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs.architectures import ARCHITECTURES
    from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig
    from tools import step_hlo

    out = tmp_path / "report.json"
    result = step_hlo.main(["--arch", "tiny", "--batch", "1", "--target", "local", "--out", str(out)])
    assert result["xla_options"] == {"xla_backend_optimization_level": 1} and "xla_flags" in result  # CPU's
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    categories = result["categories"]
    for category in ("convolution", "attention", "matmul", "reduction"):
        assert categories[category]["ops"] > 0 and categories[category]["gb"] > 0, category
    assert result["conv_layouts"] and result["top_ops"]
    assert all(op["source"].split(":")[0] in {"unet.py", "blocks.py", "attention.py"}
               for op in result["top_ops"]), result["top_ops"]
    # One step's FLOPs are one UNet forward's as the engine's CFG step calls it: one
    # sample, two contexts.
    cfg = UNetConfig.from_dict(ARCHITECTURES["tiny"][1])
    graphdef, state = nnx.split(nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))))
    x = jax.ShapeDtypeStruct((1, cfg.sample_size, cfg.sample_size, cfg.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    ctx = jax.ShapeDtypeStruct((2, 77, ARCHITECTURES["tiny"][0]["hidden_size"]), jnp.float32)
    flops = bench._flops(nnx.merge(graphdef, state), (x, t, ctx))
    assert result["unet_gflop_per_step"] * 1e9 == pytest.approx(flops, rel=1e-3)
    # The compiled step's ops (dots, convolutions, attention) do that work, less what XLA
    # hoists out of the loop (the text context's keys and values).
    counted = sum(c["gflop"] for c in categories.values()) * 1e9
    assert 0.9 * flops < counted <= 1.001 * flops, (counted, flops)


def test_step_hlo_compiles_the_sharded_step_for_a_tpu_without_one():
    # libtpu compiles for a TPU topology on any machine: the UNet's attention must go
    # through Pallas' kernel (Mosaic), with the batch sharded over 4 chips, as the engine
    # runs it (a Mosaic kernel outside shard_map does not compile when sharded).
    pytest.importorskip("libtpu")
    from tools import step_hlo

    result = step_hlo.main(["--arch", "tiny", "--batch", "4", "--size", "16", "--target", "v5e",
                            "--chips", "4"])
    assert result["chip"] == "v5e" and result["chips"] == 4
    assert result["kernels"].get("tpu_custom_call", 0) >= 2  # self and cross attention at 16x16
    assert result["categories"]["attention"]["ops"] > 0 and "floors_ms" not in result
    # Nor a loop-invariant report: the weights' copies into on-chip memory run every step.
    assert "loop_invariant" not in result
    # The report is one chip's: a quarter of the batch, one sample's step.
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs.architectures import ARCHITECTURES
    from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig

    cfg = UNetConfig.from_dict(ARCHITECTURES["tiny"][1])
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    args = (jax.ShapeDtypeStruct((1, 16, 16, cfg.in_channels), jnp.bfloat16), jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((2, 77, ARCHITECTURES["tiny"][0]["hidden_size"]), jnp.bfloat16))
    assert result["unet_gflop_per_step"] * 1e9 == pytest.approx(bench._flops(unet, args), rel=1e-3)


def test_step_hlo_compiles_the_engines_text_to_image_program_for_a_tpu_slice():
    # The engine's whole base program (text encoder, CFG sampler scan, VAE decode) as
    # jaxdiff.engine.programs builds it, sharded over a v5e 2x2 slice: the tiny UNet's 3
    # transformers (self and cross attention) and the VAE's mid attention, all at 16x16
    # latents, are Mosaic kernels.
    pytest.importorskip("libtpu")
    from tools import step_hlo

    result = step_hlo.main(["--program", "base", "--arch", "tiny", "--batch", "4", "--size", "16",
                            "--target", "v5e", "--chips", "4"])
    assert result["custom_calls"].get("tpu_custom_call") == 7, result


def test_unet_flops_are_counted_as_the_diffusers_baseline_counts_them():
    # The shared baseline (torch's FlopCounterMode) gives SD 1.5's UNet 803.3 GFLOP per
    # forward at batch 1, 64x64 latents: two per multiply-add of its matmuls, convolutions
    # (padding included) and attention. XLA's cost analysis gives another figure: it leaves
    # out the padded positions of convolutions and adds elementwise work.
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs.architectures import ARCHITECTURES
    from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig

    from jaxdiff.models import blocks

    cfg = UNetConfig.from_dict(ARCHITECTURES["sd15"][1])
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    args = (jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.bfloat16), jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((1, 77, 768), jnp.bfloat16))
    as_run = bench._flops(unet, args) / 1e9
    # The model as diffusers computes it: upsampling as a resize, then a 3x3 convolution.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blocks.Upsample2D, "__call__",
                      lambda self, x, size=None, prepared=None: self.conv(blocks.upsample_nearest(x, size)))
        assert bench._flops(unet, args) / 1e9 == pytest.approx(803.3, abs=0.05)
    # jaxdiff's upsamplers (8->16 and 16->32 at 1280 channels, 32->64 at 640) run 4 taps a
    # pixel on a grid one larger instead of 9: 34.3 GFLOP fewer, plus summing their taps.
    saved = sum(2 * c * c * (9 * (2 * h) ** 2 - 16 * (h + 1) ** 2) for h, c in [(8, 1280), (16, 1280), (32, 640)])
    assert saved / 1e9 == pytest.approx(34.28, abs=0.01)
    assert as_run == pytest.approx(803.3 - saved / 1e9, abs=1.0)


def test_program_flops_counts_called_computations_each_time_they_run():
    from tools import hlo_ops

    hlo = """HloModule m

%mm (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  ROOT %d = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[4,8], b: f32[8,2]) -> f32[4,2] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %first = f32[4,2]{1,0} call(%a, %b), to_apply=%mm
  %second = f32[4,2]{1,0} call(%a, %b), to_apply=%mm
  ROOT %sum = f32[4,2]{1,0} add(%first, %second)
}
"""
    assert hlo_ops.program_flops(hlo) == 2 * (2 * 4 * 2 * 8)


def test_peak_is_the_cards_own_bf16_dense_figure():
    from types import SimpleNamespace

    peaks = {kind: bench._peak(SimpleNamespace(device_kind=kind))
             for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200",
                          "NVIDIA H200 NVL", "NVIDIA A100-SXM4-80GB", "NVIDIA L4", "TPU v5 lite", "TPU v5",
                          "TPU v6 lite", "cpu")}
    # Dense figures: the datasheets' larger "with sparsity" numbers are twice these.
    assert peaks == {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
                     "NVIDIA H200": 989.0, "NVIDIA H200 NVL": 835.0, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA L4": 121.0,
                     "TPU v5 lite": 197.0, "TPU v5": 459.0, "TPU v6 lite": 918.0, "cpu": None}


def test_step_times_are_the_median_call_so_one_stall_does_not_skew_them(monkeypatch):
    """One slow call among the timed ones (a pause of the host, another process on the
    card) leaves the reported time, and so images/s, at the typical call's."""
    from types import SimpleNamespace

    clock = iter([0.0, 1.0, 1.0, 2.0, 2.0, 12.0])  # calls of 1 s, 1 s and 10 s
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    assert bench._median_time(lambda: None, 3) == 1.0


def test_stage_times_give_the_unets_tflop_s_and_its_share_of_the_cards_peak(monkeypatch):
    """The UNet's achieved TFLOP/s is its counted FLOPs over one forward's time, and its
    share of peak that rate over the card's peak."""
    import jax.numpy as jnp

    from tools.random_family import random_family

    monkeypatch.setattr(bench, "_peak", lambda device: 2.0)
    family = random_family("tiny", jnp.float32)
    stages = bench.stage_times(family, 1, (8, 8), reps=1)
    tflops = stages["unet_gflop_per_forward"] / stages["unet_forward_s"] / 1e3
    assert stages["unet_tflops"] == pytest.approx(tflops, rel=0.02)
    assert stages["unet_share_of_peak"] == pytest.approx(stages["unet_tflops"] / 2.0, abs=1e-3)


def test_the_diffusers_side_renders_the_same_size_and_dtype(monkeypatch):
    """The diffusers child is asked for the image size and dtype jaxdiff ran at, so the
    ratio compares the same work."""
    commands = []
    monkeypatch.setattr(bench, "_child_json", lambda cmd: commands.append(cmd) or {})
    args = bench.argparse.Namespace(arch="sd15", batch_sizes="1,8", steps=25, guidance=7.5, reps=3, size=384)
    bench.compare_diffusers(args, compiled=True, dtype="float16")
    cmd = commands[0]
    assert cmd[cmd.index("--size") + 1] == "384" and cmd[cmd.index("--dtype") + 1] == "float16"
    assert cmd[cmd.index("--batch-sizes") + 1] == "1,8" and cmd[cmd.index("--steps") + 1] == "25"
    assert "--compile" in cmd


def test_a_failed_child_keeps_what_it_measured_and_says_why(tmp_path):
    import sys

    script = ("import json, sys\n"
              "print(json.dumps({'batches': {'8': {'images_per_s': 5.0}}}), flush=True)\n"
              "print('not json')\n"
              "sys.exit('out of memory at batch 16')\n")
    result = bench._child_json([sys.executable, "-c", script])
    assert result["batches"] == {"8": {"images_per_s": 5.0}}
    assert "exit status 1" in result["error"] and "out of memory at batch 16" in result["error"]
    assert bench._child_json([sys.executable, "-c", "print('no result')"])["error"]


def test_flop_count_sees_all_of_a_chunked_attention(monkeypatch):
    """Past MAX_SCORES XLA's attention loops over chunks of queries, and a loop's body counts
    once: the count lowers attention whole, so it is the same however it is chunked."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs.architectures import ARCHITECTURES
    from jaxdiff.models import attention
    from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig
    from tools.hlo_ops import program_flops

    text_cfg, unet_cfg = ARCHITECTURES["tiny"][:2]
    cfg = UNetConfig.from_dict(unet_cfg)
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    side = cfg.sample_size or 8
    args = (jax.ShapeDtypeStruct((2, side, side, cfg.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((2,), jnp.float32),
            jax.ShapeDtypeStruct((2, 77, text_cfg["hidden_size"]), jnp.float32))
    whole = bench._flops(unet, args)
    monkeypatch.setattr(attention, "MAX_SCORES", 64)  # every attention call chunked
    fresh, state = bench._jit_module(unet)
    with attention.dispatch(implementation="xla"):
        chunked = program_flops(fresh.lower(state, *args).as_text(dialect="hlo"))
    assert chunked < whole  # what a plain lowering would count
    assert bench._flops(unet, args) == whole and attention.MAX_SCORES == 64


def test_flop_count_leaves_attention_as_it_was_when_lowering_fails():
    """A lowering that fails while FLOPs are counted (a shape the model refuses, say) leaves
    attention chunked as before: later programs in the same process keep their memory bound."""
    from jaxdiff.models import attention

    before = attention.MAX_SCORES
    with pytest.raises(ValueError, match="no such shape"):
        with bench.countable_kernels():
            raise ValueError("no such shape")
    assert attention.MAX_SCORES == before

def test_the_jaxdiff_child_streams_its_stderr_and_names_its_failure(tmp_path, capsys):
    result = bench._jaxdiff_in_child(["--arch", "no-such-arch", "--batch-sizes", "1"], str(tmp_path / "out.json"))
    assert result["batches"] == {} and result["error"].startswith("exit status 1: ")
    assert "no-such-arch" in result["error"] and "no-such-arch" in capsys.readouterr().err


def test_comparisons_run_the_same_sampler_only():
    with pytest.raises(SystemExit):
        bench.main(["--arch", "tiny", "--sampler", "euler", "--compare", "diffusers"])


def test_gpu_bench_script_runs_the_named_steps_and_packs_every_log(tmp_path):
    """tools/gpu_bench.sh with stand-ins for python3 and nvidia-smi: each step's log and
    exit status land in one tgz, the triton step alone gets Triton GEMMs back, and an
    unknown step is refused before anything runs."""
    import subprocess
    import tarfile

    script = os.path.join(bench.ROOT, "tools", "gpu_bench.sh")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "python3").write_text('#!/bin/sh\necho "ran XLA_FLAGS=${XLA_FLAGS:-} JAXDIFF_ATTENTION=${JAXDIFF_ATTENTION:-} '
                                   'JAXDIFF_GEGLU=${JAXDIFF_GEGLU:-} JAXDIFF_LAYER_NORM=${JAXDIFF_LAYER_NORM:-} '
                                   'JAXDIFF_GROUP_NORM=${JAXDIFF_GROUP_NORM:-} $*"\n'
                                   'case "$*" in *op_profile*) exit 3;; esac\n')
    (stubs / "nvidia-smi").write_text("#!/bin/sh\necho stand-in GPU\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    env.pop("XLA_FLAGS", None)

    refused = subprocess.run(["bash", script, "jaxdiff", "bogus"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown step: bogus" in refused.stderr
    assert "ran" not in refused.stdout and not (tmp_path / "out").exists()

    done = subprocess.run(["bash", script, "jaxdiff", "triton", "b32", "profile", "parity", "geglu", "tokamax",
                           "norm", "upsample", "ln", "gn", "fused", "fprofile", "variants", "sd15v", "attention"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with tarfile.open(tmp_path / "out" / "gpu_bench.tgz") as tgz:
        logs = {os.path.basename(m.name): tgz.extractfile(m).read().decode() for m in tgz.getmembers() if m.isfile()}
    assert set(logs) == {"preamble.log", "jaxdiff.log", "triton.log", "b32.log", "profile.log", "parity.log",
                         "geglu.log", "tokamax.log", "norm.log", "upsample.log", "ln.log", "gn.log", "fused.log",
                         "fprofile.log", "variants.log", "sd15v.log", "attention.log"}
    assert "stand-in GPU" in logs["preamble.log"]
    assert "XLA_FLAGS=--xla_gpu_enable_triton_gemm=true" in logs["triton.log"]
    plain = "ran XLA_FLAGS= JAXDIFF_ATTENTION= JAXDIFF_GEGLU= JAXDIFF_LAYER_NORM= JAXDIFF_GROUP_NORM= -m tools."
    assert plain + "bench --arch sd15" in logs["jaxdiff.log"]
    assert plain + "bench --arch sd15 --batch-sizes 32" in logs["b32.log"]
    # The fused kernels: their parity tests with them asked for, then each alone; and the
    # engine end to end with each and all, beside the jaxdiff step.
    assert plain + "kernel_bench --op geglu --arch sd15 --batch 16" in logs["geglu.log"]
    assert "JAXDIFF_GEGLU=tokamax JAXDIFF_LAYER_NORM= JAXDIFF_GROUP_NORM= -m pytest" in logs["geglu.log"]
    assert "tests/test_geglu.py" in logs["geglu.log"]
    assert plain + "kernel_bench --op layer_norm --arch sd15 --batch 16" in logs["norm.log"]
    assert plain + "kernel_bench --op group_norm --arch sd15 --batch 16" in logs["norm.log"]
    assert plain + "kernel_bench --op upsample --arch sd15 --batch 16" in logs["upsample.log"]
    assert "JAXDIFF_GEGLU= JAXDIFF_LAYER_NORM=pallas JAXDIFF_GROUP_NORM=pallas -m pytest" in logs["norm.log"]
    assert "tests/test_layer_norm.py tests/test_group_norm.py" in logs["norm.log"]
    sd15 = " -m tools.bench --arch sd15"
    assert "JAXDIFF_GEGLU=tokamax JAXDIFF_LAYER_NORM= JAXDIFF_GROUP_NORM=" + sd15 in logs["tokamax.log"]
    assert "JAXDIFF_GEGLU= JAXDIFF_LAYER_NORM=pallas JAXDIFF_GROUP_NORM=" + sd15 in logs["ln.log"]
    assert "JAXDIFF_GEGLU= JAXDIFF_LAYER_NORM= JAXDIFF_GROUP_NORM=pallas" + sd15 in logs["gn.log"]
    assert "JAXDIFF_GEGLU=tokamax JAXDIFF_LAYER_NORM=pallas JAXDIFF_GROUP_NORM=pallas" + sd15 in logs["fused.log"]
    assert ("JAXDIFF_GEGLU=tokamax JAXDIFF_LAYER_NORM=pallas JAXDIFF_GROUP_NORM=pallas -m tools.op_profile"
            in logs["fprofile.log"])
    assert plain + "bench --arch sd15 --batch-sizes 16 --steps 25 --reps 3 --no-stages --variants none,fused,gn,tokamax,ln," \
        "attn,all" in logs["variants.log"]
    assert plain + "bench --arch sd15 --batch-sizes 16 --steps 25 --reps 2 --no-stages --compare both " \
        "--variants none,fused,attn,all" in logs["sd15v.log"]
    # tokamax's flash attention: its parity tests on the card with it asked for, then each shape alone.
    assert "JAXDIFF_ATTENTION=tokamax JAXDIFF_GEGLU= JAXDIFF_LAYER_NORM= JAXDIFF_GROUP_NORM= -m pytest" \
        in logs["attention.log"]
    assert plain + "attention_bench --arch sd15 --batch 16" in logs["attention.log"]
    assert "-m pytest -q -p no:cacheprovider -n 4 -m parity -k not tpu_attention tests/test_unet.py" in logs["parity.log"]
    assert logs["jaxdiff.log"].endswith("exit status 0\n") and logs["profile.log"].endswith("exit status 3\n")


def test_kernel_bench_times_every_geglu_shape(tmp_path):
    from tools import kernel_bench

    out = tmp_path / "geglu.json"
    result = kernel_bench.main(["--op", "geglu", "--arch", "tiny", "--batch", "1", "--reps", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    # The tiny UNet's transformers: three at 8x8 (one down, two up), one in its 4x4 mid
    # block, at CFG's two rows per sample; 8 and 16 channels, four times that wide.
    sites = {s["site"]: s for s in result["sites"]}
    assert {k: (s["rows"], s["channels"], s["width"], s["calls"]) for k, s in sites.items()} == {
        "unet 8x8": (128, 8, 32, 3), "unet mid 4x4": (32, 16, 64, 1)}
    for s in result["sites"]:
        assert s["gflop"] == float(f"{2 * s['rows'] * s['channels'] * 2 * s['width'] / 1e9:.4g}")
        assert s["paths"]["xla"]["tflop_s"] > 0 and s["paths"]["xla"]["max_diff_vs_xla"] == 0
        assert s["paths"]["projection"]["ms"] > 0
        assert "tokamax" in s["paths"]["tokamax"]["error"]  # no kernel here: named, not hidden
    assert result["unet_step_ms"]["xla"] == round(sum(s["calls"] * s["paths"]["xla"]["ms"]
                                                      for s in result["sites"]), 3)


def test_kernel_bench_times_every_layer_norm_shape_on_both_paths():
    """Three layer norms a transformer block; the one-pass kernel (in Pallas' interpreter
    here) gives the XLA path's output; GB/s over one read and one write of the tokens."""
    from tools import kernel_bench

    result = kernel_bench.main(["--op", "layer_norm", "--arch", "tiny", "--batch", "1", "--reps", "1"])
    sites = {s["site"]: s for s in result["sites"]}
    assert {k: (s["rows"], s["channels"], s["calls"]) for k, s in sites.items()} == {
        "unet 8x8": (128, 8, 9), "unet mid 4x4": (32, 16, 3)}
    for s in result["sites"]:
        assert s["gb"] == float(f"{2 * s['rows'] * s['channels'] * 4 / 1e9:.4g}")  # float32 on the CPU
        assert s["paths"]["pallas"]["max_diff_vs_xla"] < 1e-5
        assert s["paths"]["pallas"]["gb_s"] > 0 and s["paths"]["xla"]["gb_s"] > 0


def test_kernel_bench_times_every_upsampler_on_each_form():
    """One upsampler a level below the top, at the CFG batch; the GEMM over windows and
    diffusers' plain form give the phase convolution's output; TFLOP/s over the phase
    convolution's FLOPs."""
    from jaxdiff.models.unet import UNetConfig
    from tools import kernel_bench
    from tools.step_hlo import arch_configs

    unet = UNetConfig.from_dict(arch_configs("tiny")["unet"])
    result = kernel_bench.main(["--op", "upsample", "--arch", "tiny", "--batch", "1", "--reps", "1"])
    latent, channels = unet.sample_size, unet.block_out_channels[::-1]
    assert [s["shape"] for s in result["sites"]] == [
        [2, latent // 2 ** (len(channels) - 1 - i), latent // 2 ** (len(channels) - 1 - i), channels[i]]
        for i in range(len(channels) - 1)]
    for s in result["sites"]:
        n, side, _, c = s["shape"]
        assert s["gflop"] == float(f"{2 * n * (side + 1) ** 2 * 16 * c * c / 1e9:.4g}")
        for path in ("gemm", "plain"):
            assert s["paths"][path]["max_diff_vs_xla"] < 1e-4
        assert all(p["tflop_s"] > 0 for p in s["paths"].values())


def test_kernel_bench_times_every_group_norm_the_unet_calls(monkeypatch):
    """The sites are the group norms one forward calls, as the model calls them; the two
    kernels (in Pallas' interpreter here) give the XLA path's output; GB/s over two reads
    and one write of x."""
    from tools import kernel_bench

    # One kernel size beside the engine's (the interpreter's times say nothing of sizes).
    monkeypatch.setattr(kernel_bench, "GROUP_NORM_CONFIGS", kernel_bench.GROUP_NORM_CONFIGS[:1])
    result = kernel_bench.main(["--op", "group_norm", "--arch", "tiny", "--batch", "1", "--reps", "1"])
    sites = {s["site"]: s for s in result["sites"]}
    # The tiny UNet: 1 + 1 resnets down, 2 mid, 2 + 2 up, with two norms each (the second
    # with the time embedding); a norm in each of its 4 transformers (1 down, 1 mid, 2 up);
    # its output norm. Per sample before the first attention reads the context; at CFG's
    # two rows after.
    assert sum(s["calls"] for s in result["sites"]) == 2 * 8 + 4 + 1
    assert sum(s["calls"] for s in result["sites"] if s["shift"]) == 8
    assert all(s["silu"] for s in result["sites"] if s["shift"])
    assert {s["shape"][0] for s in result["sites"]} == {1, 2}
    assert sites["2x8x8x8 +temb silu"]["groups"] == 4  # tiny's norm_num_groups
    for s in result["sites"]:
        assert s["gb"] == float(f"{3 * np.prod(s['shape']) * 4 / 1e9:.4g}")  # float32 on the CPU
        assert s["paths"]["pallas"]["max_diff_vs_xla"] < 1e-4
        assert s["paths"]["pallas"]["gb_s"] > 0 and s["paths"]["xla"]["gb_s"] > 0
        assert len(s["paths"]["pallas"]["configs_ms"]) == 2


def test_bench_times_kernel_variants_in_turns_in_one_process(tmp_path, monkeypatch):
    """--variants: each kernel path on a pipeline of its own (its programs traced with its
    environment, the kernel really called), the timed batches taking turns; the first
    variant's figures stand as the run's; the environment is as it was after."""
    from jaxdiff.models import group_norm

    monkeypatch.delenv("JAXDIFF_GROUP_NORM", raising=False)
    called = []
    kernel = group_norm.fused_group_norm
    monkeypatch.setattr(group_norm, "fused_group_norm", lambda x, *a, **k: called.append(x.shape) or kernel(x, *a, **k))
    result = bench.main(["--arch", "tiny", "--batch-sizes", "2", "--steps", "2", "--reps", "2", "--no-stages",
                         "--variants", "none,gn", "--cache-dir", str(tmp_path / "cache")])["jaxdiff"]
    assert called  # traced once, for the gn variant's program
    assert list(result["variants"]) == ["none", "gn"]
    assert result["variants"]["gn"]["env"] == {"JAXDIFF_GROUP_NORM": "pallas"}
    assert result["variants"]["gn"]["paths"]["group_norm"] == "pallas"
    assert result["variants"]["none"]["paths"] == {"attention": "auto", "geglu": "xla", "layer_norm": "xla",
                                                   "group_norm": "xla"}
    for v in ("none", "gn"):
        entry = result["variants"][v]["batches"]["2"]
        assert len(entry["batches_s"]) == 2 and entry["images_per_s"] > 0
    assert result["batches"]["2"] == result["variants"]["none"]["batches"]["2"]
    assert "JAXDIFF_GROUP_NORM" not in os.environ
    with pytest.raises(SystemExit):
        bench.main(["--arch", "tiny", "--variants", "none,triton"])


def test_each_kernel_variant_gets_its_ratio_to_diffusers_in_the_same_run(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXDIFF_LAYER_NORM", raising=False)
    result = bench.main(["--arch", "tiny", "--batch-sizes", "2", "--steps", "2", "--reps", "1", "--no-stages",
                         "--compare", "diffusers", "--variants", "none,ln", "--cache-dir", str(tmp_path / "cache")])
    theirs = result["diffusers_eager"]["batches"]["2"]["images_per_s"]
    for v in ("none", "ln"):
        ours = result["jaxdiff"]["variants"][v]["batches"]["2"]["images_per_s"]
        assert result["ratios"][f"vs_diffusers_eager_b2_{v}"] == pytest.approx(ours / theirs, rel=1e-2, abs=2e-3)
    assert result["ratios"]["vs_diffusers_eager_b2"] == result["ratios"]["vs_diffusers_eager_b2_none"]


def test_a_variant_that_fails_is_recorded_and_the_others_still_timed(tmp_path, monkeypatch):
    """One device call runs every variant: a kernel path that does not compile or run there
    must not take the others' figures with it."""
    monkeypatch.delenv("JAXDIFF_GROUP_NORM", raising=False)
    monkeypatch.setitem(bench.VARIANTS, "broken", {"JAXDIFF_GROUP_NORM": "no-such-path"})
    result = bench.main(["--arch", "tiny", "--batch-sizes", "2", "--steps", "2", "--reps", "1", "--no-stages",
                         "--variants", "broken,none", "--cache-dir", str(tmp_path / "cache")])["jaxdiff"]
    broken = result["variants"]["broken"]
    assert "JAXDIFF_GROUP_NORM='no-such-path'" in broken["error"] and broken["batches"] == {}
    assert result["variants"]["none"]["batches"]["2"]["images_per_s"] > 0
    assert result["batches"]["2"] == result["variants"]["none"]["batches"]["2"]  # the first that ran
    assert "JAXDIFF_GROUP_NORM" not in os.environ


def test_a_comparison_the_diffusers_side_cannot_run_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--arch", "default", "--compare", "diffusers"])  # its child failed with KeyError: 'default'
    assert "the shipped model has no --compare" in capsys.readouterr().err


def test_gpu_bench_default_steps_fit_the_time_its_header_states():
    """The default steps' limits and the preamble's add up to what the header says: one
    10-minute call."""
    import re

    text = open(os.path.join(bench.ROOT, "tools", "gpu_bench.sh")).read()
    defaults = re.search(r"steps=\(sd15 warm x4 b32 profile\)", text)
    limits = dict(re.findall(r"^\s+(\w+)\) step \w+ (\d+) ", text, re.MULTILINE))
    preamble = re.findall(r"^\{? *timeout (\d+) ", text, re.MULTILINE)
    stated = int(re.search(r"add up to (\d+) s", text).group(1))
    assert defaults and len(preamble) == 2
    assert sum(int(limits[s]) for s in ("sd15", "warm", "x4", "b32", "profile")) + sum(map(int, preamble)) == stated
    assert stated <= 590


def test_random_weights_fill_every_parameter_at_its_initialisers_scale():
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from configs.architectures import ARCHITECTURES
    from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig
    from tools.random_family import random_weights

    cfg = UNetConfig.from_dict(ARCHITECTURES["tiny"][1])
    unet = random_weights(lambda: UNet2DConditionModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), jnp.bfloat16)
    # Shapes and dtypes as the initialisers would make them (not run: eager init is slow).
    reference = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    ours, theirs = dict(nnx.to_flat_state(nnx.state(unet))), dict(nnx.to_flat_state(nnx.state(reference)))
    assert ours.keys() == theirs.keys()
    kernels = []
    for path, variable in ours.items():
        value, expected = np.asarray(variable.get_value(), np.float32), theirs[path].get_value()
        assert (value.shape, variable.get_value().dtype) == (expected.shape, expected.dtype), path
        if path[-1] == "bias":
            assert not value.any(), path
        elif path[-1] == "scale":
            assert (value == 1).all(), path
        else:  # kernels as lecun_normal draws them: std 1/sqrt(fan-in)
            fan_in = int(np.prod(value.shape[:-1]))
            if value.size >= 1000:
                assert np.std(value) * np.sqrt(fan_in) == pytest.approx(1.0, rel=0.15), path
            kernels.append(value.ravel()[:64])
    assert len({k.tobytes() for k in kernels}) == len(kernels)  # each parameter starts elsewhere in the pool
    from jaxdiff.models.clip import CLIPTextConfig, CLIPTextModel

    clip_cfg = CLIPTextConfig.from_dict(ARCHITECTURES["tiny"][0])
    clip = random_weights(lambda: CLIPTextModel(clip_cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), jnp.float32)
    table = np.asarray(clip.text_model.embeddings.token_embedding.embedding.get_value())
    assert np.std(table) * np.sqrt(table.shape[-1]) == pytest.approx(1.0, rel=0.15)  # per row, as nnx.Embed
    x = jnp.ones((2, 8, 8, 4), jnp.bfloat16)
    out = nnx.jit(lambda model, *args: model(*args))(
        unet, x, jnp.array([10, 10]), jnp.ones((2, 77, cfg.cross_attention_dim[0]), jnp.bfloat16))
    assert np.isfinite(np.asarray(out, np.float32)).all() and 0.1 < float(jnp.std(out.astype(jnp.float32))) < 10


def test_attention_sites_put_the_first_self_attention_at_the_sample_batch():
    from configs import architectures
    from tools.attention_bench import attention_sites

    # x4: its first transformers attend only to the text, so no self attention comes first.
    x4 = {s["site"]: s for s in attention_sites("x4-upscaler", 8)}
    assert not any(name.endswith("1st") for name in x4) and x4["unet 64x64 text"]["batch"] == 16
    # No down level attends: the mid block's single self attention is the first.
    architectures.ARCHITECTURES["tiny-plain"] = (
        architectures.TINY_CLIP, dict(architectures.TINY_UNET, down_block_types=["DownBlock2D"] * 2,
                                      up_block_types=["UpBlock2D"] * 2),
        architectures.TINY_VAE, architectures.SD_SCHEDULER, None)
    try:
        sites = {s["site"]: s for s in attention_sites("tiny-plain", 4)}
    finally:
        del architectures.ARCHITECTURES["tiny-plain"]
    assert sites["unet mid 4x4 self 1st"]["batch"] == 4 and "unet mid 4x4 self" not in sites
    assert sites["unet mid 4x4 text"]["batch"] == 8



def test_attention_sites_have_each_levels_heads_the_mid_block_included():
    """SD 2.1 has a head count per level (diffusers' attention_head_dim: 5, 10, 20, 20, each
    head 64 wide): each site, the mid block's included, gets its own level's."""
    from tools.attention_bench import attention_sites

    sites = {s["site"]: (s["heads"], s["head_dim"]) for s in attention_sites("sd21", 1, 64)}
    assert sites == {"unet 64x64 self 1st": (5, 64), "unet 64x64 self": (5, 64), "unet 64x64 text": (5, 64),
                     "unet 32x32 self": (10, 64), "unet 32x32 text": (10, 64), "unet 16x16 self": (20, 64),
                     "unet 16x16 text": (20, 64), "unet mid 8x8 self": (20, 64), "unet mid 8x8 text": (20, 64),
                     "vae mid 64x64": (1, 512)}

def test_contact_sheet_lays_out_each_rendered_image_once_in_manifest_order(tmp_path):
    import io
    import json
    import tarfile

    from PIL import Image

    from tools.contact_sheet import contact_sheet, read_rendered

    def png(colour):
        data = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(data, "PNG")
        return data.getvalue()

    with tarfile.open(tmp_path / "shard-00000.tar", "w") as tar:
        for key, prompt, colour in (("00000_000001", "second", "blue"), ("00000_000000", "first", "red")):
            for name, data in ((f"{key}.png", png(colour)), (f"{key}.base.png", png("black")),
                               (f"{key}.json", json.dumps({"id": f"id-{key}", "prompt": prompt}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pairs = read_rendered(str(tmp_path), limit=10)
    assert [caption for _, caption in pairs] == ["first", "second"]  # --keep-base's images left out
    assert [tuple(image[0, 0]) for image, _ in pairs] == [(255, 0, 0), (0, 0, 255)]
    assert contact_sheet(pairs, columns=2, cell=16).size[0] == 32
    assert [caption for _, caption in read_rendered(str(tmp_path), limit=1)] == ["first"]


def test_contact_sheet_puts_each_caption_under_its_image_and_keeps_the_last_row():
    """A sheet of 3 images in 2 columns has 2 rows of image-plus-caption; the second row
    starts below the first row's captions, so no image covers a caption."""
    import numpy as np

    from tools.contact_sheet import contact_sheet

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    pairs = [(np.full((8, 8, 3), c, np.uint8), f"caption {i}") for i, c in enumerate(colours)]
    sheet = np.asarray(contact_sheet(pairs, columns=2, cell=16))
    height = sheet.shape[0] // 2  # one row: an image and its caption band
    assert sheet.shape[:2] == (2 * height, 32) and height > 16
    for i, colour in enumerate(colours):
        x, y = (i % 2) * 16, (i // 2) * height
        assert (sheet[y:y + 16, x:x + 16] == colour).all(), i
        band = sheet[y + 16:y + height, x:x + 16]
        assert (band.max(-1) < 128).any(), i  # dark caption text under the image
