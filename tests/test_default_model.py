"""The shipped default model family loads with no arguments and renders base + x4."""

from __future__ import annotations

import jaxdiff
from jaxdiff.checkpoints import default_model_path, default_upscaler_path, upscaler_for
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


def test_the_shipped_model_named_or_left_out_gets_its_x4_and_none_turns_it_off():
    """`--model default` renders base + x4 exactly as leaving `--model` out does; another
    model gets no upscaler unless one is named; `none` in any case or spacing, or an empty
    name, turns the upscaler off."""
    assert upscaler_for(None, None) == upscaler_for("default", None) == "default-x4"
    assert upscaler_for("/models/sd15", None) is None
    assert upscaler_for("/models/sd15", "/models/x4") == upscaler_for(None, "/models/x4") == "/models/x4"
    for off in ("none", " None ", ""):
        assert upscaler_for("default", off) is None and upscaler_for(None, off) is None, off
