"""Training tool: a --quick run writes folders that jaxdiff and diffusers both load and render
alike; NNX -> PyTorch export round-trips; the tokenizer covers the world; checkpoints round-trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxdiff
from jaxdiff.weights.convert import load_state_dict
from jaxdiff.weights.export import state_dict
from tools import shapes_world, train, train_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# uint8 rounding is 0.5/255; fp32 XLA vs PyTorch over a few solver steps adds a little on top.
PIXEL_TOL = 2.5 / 255
STEPS = 3
PROMPTS = ["a small red circle in the top left corner on a white background",
           "a large blue square above a small yellow triangle on a black background"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train") / "model")
    # Two steps a stage on tiny data are all compile time: XLA's cheaper CPU optimisation
    # halves that, and the few steps run just as well.
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tools.train", "--quick", "--out", out, "--workers", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_run_writes_both_folders_and_a_log(trained):
    out, stdout = trained
    log = json.load(open(os.path.join(out, "train_log.json")))
    for stage in ("vae", "base", "x4"):
        assert log["stages"][stage]["steps"] == 2
        assert np.isfinite(log["stages"][stage]["final_loss"])
    assert log["total_bytes"] < 40e6
    assert "steps/s" in stdout and "ETA" in stdout
    base = json.load(open(os.path.join(out, "default", "model_index.json")))
    x4 = json.load(open(os.path.join(out, "default-x4", "model_index.json")))
    assert base["_class_name"] == "StableDiffusionPipeline"
    assert x4["_class_name"] == "StableDiffusionUpscalePipeline" and x4["max_noise_level"] == 350
    text = json.load(open(os.path.join(out, "default", "text_encoder", "config.json")))
    assert text["model_type"] == "clip_text_model" and text["architectures"] == ["CLIPTextModel"]
    # The base VAE's scaling_factor is the one its UNet was trained with (1 / std of the
    # latents); the x4 folder's is the one diffusers' upscale pipeline imposes.
    vae = json.load(open(os.path.join(out, "default", "vae", "config.json")))
    x4_vae = json.load(open(os.path.join(out, "default-x4", "vae", "config.json")))
    assert vae["scaling_factor"] == pytest.approx(log["scaling_factor"]) and log["scaling_factor"] != 1.0
    assert x4_vae["scaling_factor"] == pytest.approx(train.X4_SCALING_FACTOR)
    # Each folder recommends its own stage's sampling settings.
    from jaxdiff import render_defaults

    assert render_defaults.read(os.path.join(out, "default"), "base") == train.BASE_RENDER_DEFAULTS
    assert render_defaults.read(os.path.join(out, "default-x4"), "upscale") == train.X4_RENDER_DEFAULTS


def test_resume_continues_a_finished_stage_and_keeps_the_earlier_log(trained, tmp_path):
    out, _ = trained
    again = str(tmp_path / "again")
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tools.train", "--quick", "--out", again, "--workers", "1",
                           "--resume", out, "--continue", "base"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[base] continuing" in proc.stdout and "[vae] resuming" in proc.stdout
    assert "[latents] reusing" in proc.stdout  # the VAE and the data are those of the first run
    log = json.load(open(os.path.join(again, "train_log.json")))
    assert sorted(log["stages"]) == ["base", "data", "export"]  # the VAE and x4 were done
    assert log["stages"]["base"]["steps"] == 4                   # 2 before, 2 now
    assert sorted(log["earlier_runs"][0]["stages"]) == ["base", "data", "export", "vae", "x4"]
    info = train.checkpoint_info(os.path.join(again, "checkpoint", "base.npz"))
    assert info["done"] and info["restarts"] == 1 and info["step"] == 4
    # The optimizer state came along: its step counts (and Adam's moments) carry on from 2.
    with np.load(os.path.join(again, "checkpoint", "base.npz")) as saved:
        counts = {k: int(saved[k]) for k in saved.files if k.startswith("opt") and k.endswith(".count")}
    assert counts and set(counts.values()) == {4}, counts


def test_folders_load_and_render_64_to_256(trained):
    from jaxdiff.weights.family import load_family

    out, _ = trained
    base = load_family(os.path.join(out, "default"))
    up = load_family(os.path.join(out, "default-x4"))
    assert (base.kind, up.kind, up.max_noise_level) == ("text2image", "upscale", 350)
    pipe = jaxdiff.load_pipeline(os.path.join(out, "default"), upscaler=os.path.join(out, "default-x4"),
                                 steps=STEPS, upscale_steps=STEPS, batch_size=1, keep_base=True,
                                 width=64, height=64)
    (result,) = pipe.render(PROMPTS[:1], seeds=[0])
    assert result.error is None, result.error
    assert result.base_image.shape == (64, 64, 3) and result.image.shape == (256, 256, 3)


def _noise(n, c, side, seed):
    return torch.randn((n, c, side, side), generator=torch.Generator().manual_seed(seed))


def _nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


@pytest.mark.parity
def test_exported_base_renders_the_same_in_diffusers(trained):
    from diffusers import StableDiffusionPipeline

    out, _ = trained
    folder = os.path.join(out, "default")
    noise = _noise(2, 4, 16, seed=0)
    ref = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)(
        PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64, latents=noise,
        output_type="np").images
    pipe = jaxdiff.load_pipeline(folder, upscaler="none", steps=STEPS, guidance=7.5, batch_size=2,
                                 width=64, height=64)
    ours = pipe.render(PROMPTS, seeds=[0, 1], noise=_nhwc(noise))
    ours = np.stack([r.image for r in ours]).astype(np.float32) / 255.0
    assert ours.shape == ref.shape == (2, 64, 64, 3)
    assert np.abs(ours - ref).max() <= PIXEL_TOL, f"max diff {np.abs(ours - ref).max() * 255:.2f}/255"


@pytest.mark.parity
def test_exported_upscaler_renders_the_same_in_diffusers(trained, monkeypatch):
    from PIL import Image
    from diffusers import StableDiffusionUpscalePipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_upscale as module

    out, _ = trained
    folder = os.path.join(out, "default-x4")
    low = [shapes_world.example(5, 0).image64]
    aug, noise = _noise(1, 3, 64, seed=1), _noise(1, 4, 64, seed=2)
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: aug.reshape(shape))
    ref = StableDiffusionUpscalePipeline.from_pretrained(folder, dtype=torch.float32)(
        PROMPTS[:1], image=[Image.fromarray(i) for i in low], num_inference_steps=STEPS, guidance_scale=9.0,
        noise_level=20, latents=noise, output_type="np").images
    pipe = jaxdiff.load_pipeline(os.path.join(out, "default"), upscaler=folder, upscale_steps=STEPS,
                                 upscale_guidance=9.0, noise_level=20, batch_size=1)
    ours = pipe.upscale(low, PROMPTS[:1], seeds=[0], noise=_nhwc(noise), aug_noise=_nhwc(aug))
    ours = np.stack(ours).astype(np.float32) / 255.0
    assert ours.shape == ref.shape == (1, 256, 256, 3)
    assert np.abs(ours - ref).max() <= PIXEL_TOL, f"max diff {np.abs(ours - ref).max() * 255:.2f}/255"


def test_export_round_trips_through_load_state_dict():
    from jaxdiff.models.clip import CLIPTextConfig, CLIPTextModel
    from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig

    unet_cfg = UNetConfig.from_dict(dict(
        train.X4_UNET_CONFIG, block_out_channels=[8, 12, 12], norm_num_groups=4, cross_attention_dim=11,
        attention_head_dim=2, num_class_embeds=7, use_linear_projection=False))
    text_cfg = CLIPTextConfig(vocab_size=13, hidden_size=10, intermediate_size=7, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=5)
    for build in (lambda: UNet2DConditionModel(unet_cfg, rngs=nnx.Rngs(3)),
                  lambda: CLIPTextModel(text_cfg, rngs=nnx.Rngs(4))):
        model = build()
        # Give every parameter distinct values, so a wrong transpose cannot hide.
        graphdef, state = nnx.split(model)
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        state = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
        model = nnx.merge(graphdef, state)
        # SD 1.x stores proj_in / proj_out as 1x1 convolutions: those must round-trip too.
        tensors = state_dict(model, conv_1x1=("proj_in", "proj_out"))
        assert any(v.ndim == 4 and v.shape[2:] == (1, 1) and k.endswith("proj_in.weight") for k, v in tensors.items()) \
            or isinstance(model, CLIPTextModel)
        loaded = load_state_dict(nnx.eval_shape(build), tensors)
        for (p, a), (q, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(loaded))):
            assert p == q
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))


def test_rescaled_vae_scales_latents_and_decodes_the_same():
    from jaxdiff.models.vae import AutoencoderKL, VAEConfig

    vae = AutoencoderKL(VAEConfig.from_dict(train.VAE_CONFIG), rngs=nnx.Rngs(0))
    scaled = train.rescale_latents(vae, 7.0)
    x = jax.random.uniform(jax.random.key(1), (1, 16, 16, 3), minval=-1, maxval=1)
    (m, lv), (m2, lv2) = vae.encode(x), scaled.encode(x)
    np.testing.assert_allclose(m2, 7.0 * m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lv2, lv + 2 * np.log(7.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scaled.decode(7.0 * m), vae.decode(m), rtol=1e-4, atol=1e-4)


def test_export_matches_torch_module_names_and_shapes():
    from diffusers import AutoencoderKL as TorchVAE

    from jaxdiff.models.vae import AutoencoderKL, VAEConfig

    ours = state_dict(AutoencoderKL(VAEConfig.from_dict(train.VAE_CONFIG), rngs=nnx.Rngs(0)))
    config = {k: v for k, v in train.VAE_CONFIG.items() if not k.startswith("_")}
    theirs = {k: tuple(v.shape) for k, v in TorchVAE(**config).state_dict().items()}
    assert {k: v.shape for k, v in ours.items()} == theirs


def test_tokenizer_covers_every_caption_word_for_word(tmp_path):
    from jaxdiff.models.clip import load_tokenizer

    train_data.write_tokenizer(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    captions = shapes_world.all_captions("all")
    for caption, ids in zip(captions, tok(captions)["input_ids"]):
        tokens = tok.convert_ids_to_tokens(ids)
        assert tokens == [train_data.BOS] + [w + "</w>" for w in caption.split()] + [train_data.EOS], caption
    # Training reads one row of token ids per example, in the examples' order (repeats included).
    some = [captions[9], captions[2], captions[9], captions[5000], captions[0]]
    rows = train._token_ids(tok, some)
    for caption, row in zip(some, rows):
        np.testing.assert_array_equal(row, tok([caption], padding="max_length", max_length=77)["input_ids"][0])


def test_checkpoint_round_trips_params_and_optimizer_state(tmp_path):
    params = {"a": jnp.arange(6.0).reshape(2, 3), "b": [jnp.ones(4), jnp.zeros((), jnp.int32)]}
    tx = train.make_optimizer(1e-3)
    opt = tx.init(params)
    path = str(tmp_path / "stage.npz")
    train.save_checkpoint(path, {"params": params, "opt": opt}, {"stage": "x", "step": 7, "done": False})
    trees, info = train.load_checkpoint(path, {"params": params, "opt": opt})
    assert info["step"] == 7
    for a, b in zip(jax.tree.leaves((params, opt)), jax.tree.leaves((trees["params"], trees["opt"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="shape"):
        train.load_checkpoint(path, {"params": {**params, "a": jnp.zeros(3)}, "opt": opt})


@pytest.mark.parametrize("stage", ["vae", "upscaler"])
def test_evaluator_scores_one_stage_on_the_drawings(trained, tmp_path, stage):
    from tools import evaluate

    out, _ = trained
    report_path = tmp_path / "report.json"
    args = ["--stage", stage, "--n", "4", "--batch-size", "2", "--out", str(report_path)]
    args += ["--model", os.path.join(out, "default")] if stage == "vae" else \
        ["--upscaler", os.path.join(out, "default-x4")]
    assert evaluate.main(args) == 0
    report = json.loads(report_path.read_text())
    assert report["stage"] == stage and report["summary"]["all"]["n"] == 4
    assert all("error" not in e for e in report["examples"])  # every image was made and scored


class _Fake:
    """Stands in for a Trainable: `bind(params)` gives a function of the model's inputs."""

    def __init__(self, fn):
        self.fn = fn

    def bind(self, params):
        return lambda *args, **kwargs: self.fn(params, *args, **kwargs)


def _exported_alphas_cumprod(config: dict) -> jnp.ndarray:
    import diffusers

    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    return jnp.asarray(scheduler.alphas_cumprod.numpy(), jnp.float32)


def _text_stub():
    return _Fake(lambda params, ids: type("Out", (), {"last_hidden_state": jnp.zeros(ids.shape + (8,))})())


def test_base_loss_is_zero_for_the_exact_noise_under_the_exported_schedule():
    """The base UNet learns to predict the added noise (epsilon, as its exported scheduler
    says) under the very schedule diffusers reads from the exported folder: a model that
    returns the true noise of that schedule has zero loss."""
    x0 = jax.random.normal(jax.random.key(0), (1, 16, 16, 4))
    abar = _exported_alphas_cumprod(train.BASE_SCHEDULER)
    assert train.BASE_SCHEDULER["prediction_type"] == "epsilon"

    def oracle(params, x_t, t, context):
        a = abar[t][:, None, None, None]
        return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)

    models = {"text": _text_stub(), "base": _Fake(oracle)}
    data = {"latents64": jnp.repeat(x0, 6, axis=0), "ids": jnp.zeros((6, 77), jnp.int32),
            "empty_ids": jnp.ones((77,), jnp.int32)}
    loss_fn = jax.jit(train.base_loss(models, 64, train.training_schedules()["base"]))
    losses = [float(loss_fn({"text": None, "unet": None}, None, data, jax.random.key(k))) for k in range(3)]
    assert max(losses) < 1e-6, losses


def test_x4_loss_is_zero_for_the_exact_velocity_under_the_exported_schedule():
    """The x4 UNet learns v = sqrt(abar) noise - sqrt(1 - abar) x0 (v_prediction, as its
    exported scheduler says) under the schedule diffusers reads from the exported folder: a
    model that returns that v has zero loss."""
    assert train.X4_SCHEDULER["prediction_type"] == "v_prediction"
    abar = _exported_alphas_cumprod(train.X4_SCHEDULER)
    # Constant over space, so every training crop of it is the same array.
    x0 = jnp.array([0.7, -1.2, 0.3, 1.5])

    def oracle(params, x, t, context, class_labels):
        a = abar[t][:, None, None, None]
        x_t = x[..., :4]
        noise = (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
        return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0

    models = {"text": _text_stub(), "x4": _Fake(oracle)}
    data = {"latents256": jnp.broadcast_to(x0, (3, 64, 64, 4)) + 0.0,
            "low_res": jnp.full((3, 64, 64, 3), 128, jnp.uint8), "ids256": jnp.zeros((3, 77), jnp.int32),
            "empty_ids": jnp.ones((77,), jnp.int32)}
    schedules = train.training_schedules()
    loss_fn = jax.jit(train.x4_loss(models, 32, 8, schedules["x4"], schedules["low_res"]))
    losses = [float(loss_fn(None, None, data, jax.random.key(k))) for k in range(3)]
    assert max(losses) < 1e-6, losses


def test_about_one_caption_in_ten_is_dropped_for_guidance():
    """Classifier-free guidance needs the model to learn the empty prompt too: about 10% of
    the captions (not 90%) are replaced by the empty prompt's tokens, the rest kept."""
    ids = jnp.arange(4000 * 3, dtype=jnp.int32).reshape(4000, 3)
    empty = jnp.full((3,), -1, jnp.int32)
    out = np.asarray(train._drop_captions(jax.random.key(0), ids, empty))
    dropped = (out == -1).all(1)
    assert 0.08 < dropped.mean() < 0.12
    np.testing.assert_array_equal(out[~dropped], np.asarray(ids)[~dropped])


def test_training_data_is_the_train_split_in_index_order():
    """The images and captions trained on are shapes-world examples 0..count-1 of the
    "train" split for the seed, each caption beside its own image: no held-out pair and no
    "unseen" caption is trained on, and the first count_256 are kept at 256 too."""
    captions, images64, images256 = train_data.generate(3, 40, 5, workers=1)
    assert len(captions) == 40 and images64.shape == (40, 64, 64, 3) and images256.shape == (5, 256, 256, 3)
    for i in (0, 17, 39):
        ex = shapes_world.example(3, i, "train")
        assert captions[i] == ex.caption
        np.testing.assert_array_equal(images64[i], ex.image64)
    np.testing.assert_array_equal(images256[4], shapes_world.example(3, 4, "train").image256)
    assert all(shapes_world.parse_caption(c).split == "train" for c in captions)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    """The stage schedule: linear warmup to the peak, then cosine decay to 10% of it by the
    end of the stage's time."""
    assert train.learning_rate(1e-3, 0, 0.0, 10) == pytest.approx(1e-4)
    assert train.learning_rate(1e-3, 50, 0.0, 10) == pytest.approx(1e-3)
    assert train.learning_rate(1e-3, 50, 0.5, 10) == pytest.approx(0.55e-3)
    assert train.learning_rate(1e-3, 50, 1.0, 10) == pytest.approx(1e-4)


def test_saved_latents_are_reused_only_for_the_same_vae_and_data(tmp_path):
    """A resumed run skips re-encoding only when the saved latents came from the same VAE
    checkpoint step, seed and example counts; otherwise it encodes afresh rather than train
    on latents of other images or another VAE."""
    key = {"vae_step": 2, "seed": 0, "count": 24, "count_256": 8}
    latents64, latents256 = np.ones((24, 4, 4, 4), np.float32), np.zeros((8, 16, 16, 4), np.float32)
    train.save_checkpoint(str(tmp_path / "latents.npz"), {"latents64": latents64, "latents256": latents256}, key)
    cached = train._cached_latents(str(tmp_path), key)
    assert cached is not None
    np.testing.assert_array_equal(cached[0], latents64)
    np.testing.assert_array_equal(cached[1], latents256)
    for changed in ({"vae_step": 3}, {"seed": 1}, {"count": 25}, {"count_256": 4}):
        assert train._cached_latents(str(tmp_path), key | changed) is None, changed
    assert train._cached_latents(None, key) is None


def test_continuing_a_finished_stage_restarts_its_schedule(tmp_path):
    """`--continue STAGE` trains a finished stage on from its weights and optimizer, with its
    learning-rate schedule started over (at half the peak); without it the stage stays done."""
    params = {"w": jnp.arange(3.0)}
    tx = train.make_optimizer(1e-3)
    templates = {"params": params, "opt": tx.init(params)}
    train.save_checkpoint(str(tmp_path / "base.npz"), templates,
                          {"stage": "base", "step": 7, "progress": 1.0, "done": True, "restarts": 0})
    _, info = train._stage_start(str(tmp_path), "base", templates)
    assert info["done"] and info["step"] == 7
    trees, info = train._stage_start(str(tmp_path), "base", templates, reopen=("base",))
    assert not info["done"] and info["progress"] == 0.0 and info["step"] == 7 and info["restarts"] == 1
    assert train.restart_scale(info) == 0.5
    np.testing.assert_array_equal(trees["params"]["w"], params["w"])
    # The schedule starts over from the (halved) peak, not from the end of the last cycle.
    assert train.learning_rate(1e-3 * train.restart_scale(info), info["step"], info["progress"], 1) \
        == pytest.approx(0.5e-3)
