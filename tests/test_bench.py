"""The benchmark tools run end to end on the tiny architecture (CPU), diffusers side by side."""

from __future__ import annotations

import json

from tools import bench


def test_bench_reports_throughput_stages_and_ratio(tmp_path):
    out = tmp_path / "bench.json"
    result = bench.main(["--arch", "tiny", "--batch-sizes", "1,2", "--steps", "2", "--reps", "1",
                         "--compare", "diffusers", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for batch in ("1", "2"):
        entry = result["jaxdiff"]["batches"][batch]
        assert entry["images_per_s"] > 0 and entry["first_call_s"] > 0
        stages = entry["stages"]
        assert stages["unet_gflop_per_forward"] > 0 and stages["decode_s"] > 0 and stages["text_s"] > 0
        assert result["diffusers_eager"]["batches"][batch]["images_per_s"] > 0
        assert result["ratios"][f"vs_diffusers_eager_b{batch}"] > 0


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
                             "--size", "8", "--no-stages", "--cache-dir", str(tmp_path / "cache")])
    finally:
        del architectures.ARCHITECTURES["tiny-x4"]
    assert result["jaxdiff"]["batches"]["1"]["images_per_s"] > 0


def test_op_profile_puts_every_op_in_a_category(tmp_path):
    from tools import op_profile

    out = tmp_path / "profile.json"
    result = op_profile.main(["--arch", "tiny", "--batch", "1", "--reps", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    categories = result["categories"]
    assert set(categories) == set(op_profile.CATEGORIES)
    assert abs(sum(c["s"] for c in categories.values()) - result["op_time_s"]) < 1e-5
    # The tiny UNet has convolutions and cross-attention: both must be found by name.
    assert categories["convolution"]["s"] > 0 and categories["attention"]["s"] > 0
    assert categories["matmul"]["ops"] > 0
    assert result["top_ops"] and all(o["category"] in categories for o in result["top_ops"])


def test_op_profile_names_gpu_library_calls():
    from tools import op_profile

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
    instructions, computations = op_profile.parse_hlo(hlo)
    found = {name: op_profile.categorize(name, instructions, computations)
             for name in ("fmha", "gemm", "conv_fusion", "t", "e")}
    assert found == {"fmha": "attention", "gemm": "matmul", "conv_fusion": "convolution",
                     "t": "layout", "e": "elementwise"}
