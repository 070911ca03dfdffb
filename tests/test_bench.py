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
