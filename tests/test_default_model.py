"""The shipped default model family loads with no arguments and renders base + x4."""

from __future__ import annotations

import jaxdiff
from jaxdiff.checkpoints import default_model_path, default_upscaler_path
from jaxdiff.weights.family import load_family


def test_shipped_folders_are_diffusers_pipelines_of_the_right_kinds():
    assert load_family(default_model_path()).kind == "text2image"
    up = load_family(default_upscaler_path())
    assert up.kind == "upscale" and up.max_noise_level is not None


def test_default_pipeline_renders_64_then_256():
    pipe = jaxdiff.load_pipeline(steps=2, upscale_steps=2, batch_size=1, keep_base=True)
    (result,) = pipe.render(["a small red circle in the center on a white background"], seeds=[0])
    assert result.error is None
    assert result.base_image.shape == (64, 64, 3) and result.image.shape == (256, 256, 3)
    assert result.metadata["model"] == default_model_path()
