"""Engine: parity of every mode with diffusers' PyTorch pipelines, determinism, compile-once, NaN reporting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import jaxdiff
from tiny_models import make_sd_folder, make_upscaler_folder

STEPS = 3
# uint8 rounding is 0.5/255; fp32 XLA vs PyTorch adds a little on top.
PIXEL_TOL = 2.5 / 255
# Parity is checked on the final latents: the tiny VAE maps a latent change of a few
# hundredths (what guidance, a mask or the noise level move) to a level or two of uint8,
# under PIXEL_TOL, while fp32 XLA and PyTorch latents agree to about 1e-5.
LATENT_RTOL, LATENT_ATOL = 1e-4, 1e-4
# A feature a parity test checks must move diffusers' own latents by this much, or the
# test could not see it go wrong.
SEEN = 100 * LATENT_ATOL
PROMPTS = ["a red circle", "a small blue square on the left"]
NEGATIVE = ["", "blurry"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return make_sd_folder(str(tmp_path_factory.mktemp("sd") / "sd"))


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory):
    return make_sd_folder(str(tmp_path_factory.mktemp("inpaint") / "sd"), unet_in_channels=9, seed=3)


@pytest.fixture(scope="module")
def upscaler_folder(tmp_path_factory):
    return make_upscaler_folder(str(tmp_path_factory.mktemp("up") / "up"))


@pytest.fixture(scope="module")
def pipe(sd_folder):
    return jaxdiff.load_pipeline(sd_folder, upscaler="none", steps=STEPS, sampler="ddim", guidance=7.5,
                                 batch_size=2)


@pytest.fixture(scope="module")
def latent_pipe(sd_folder):
    """`pipe`'s twin for `_latents`: its programs are compiled to return latents."""
    return jaxdiff.load_pipeline(sd_folder, upscaler="none", steps=STEPS, sampler="ddim", guidance=7.5,
                                 batch_size=2)


def _noise(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 4, h, w), generator=g)


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


def _images(results) -> np.ndarray:
    assert all(r.error is None for r in results), [r.error for r in results]
    return np.stack([r.image for r in results]).astype(np.float32) / 255.0


def _assert_close(ours, theirs, tol=PIXEL_TOL):
    diff = np.abs(ours - theirs)
    assert diff.max() <= tol, f"max abs diff {diff.max() * 255:.2f}/255 over tolerance"


def _latent_results(render, *args, **kwargs) -> list:
    """What `render(*args, **kwargs)` (a pipeline's render, render_samples or upscale)
    returns, with each image replaced by its final latents (H, W, C), undecoded: the programs
    it compiles here return them. Give it a pipeline that renders nothing else, as its
    programs stay compiled so."""
    from jaxdiff.engine import programs

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(programs, "decode_latents", lambda vae, latents, *args: latents)
        patch.setattr(programs, "to_uint8", lambda images: images)
        return render(*args, **kwargs)


def _latents(render, *args, **kwargs) -> np.ndarray:
    """`_latent_results`' latents, stacked (N, H, W, C)."""
    results = _latent_results(render, *args, **kwargs)
    if all(isinstance(r, jaxdiff.Rendered) for r in results):
        assert all(r.error is None for r in results), [r.error for r in results]
        results = [r.image for r in results]
    return np.stack(results)


def _assert_latents_close(ours, theirs: torch.Tensor):
    np.testing.assert_allclose(ours, _nhwc(theirs), rtol=LATENT_RTOL, atol=LATENT_ATOL)


def _assert_seen(reference: torch.Tensor, without: torch.Tensor, what: str):
    """diffusers' latents move by more than SEEN when the feature under test changes."""
    moved = (reference - without).abs().max().item()
    assert moved > SEEN, f"{what} moves diffusers' latents by {moved:.2e} only: the test cannot see it"


def _rgb(seed, size=16):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _patch_noise(monkeypatch, module, tensors):
    """Makes a diffusers pipeline module draw the given tensors, in order, instead of random noise."""
    queue = list(tensors)
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: queue.pop(0).reshape(shape))


def _patch_posterior_mean(monkeypatch, module):
    # jaxdiff encodes images to the posterior mean (deterministic per image); make diffusers do the same.
    original = module.retrieve_latents
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": original(out, sample_mode="argmax"))


@pytest.mark.parity
def test_text_to_image_matches_diffusers(pipe, latent_pipe, sd_folder):
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(sd_folder)
    noise = _noise(2, 8, 8)
    run = lambda guidance, negative=NEGATIVE: reference(
        PROMPTS, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=guidance, height=16, width=16,
        latents=noise, output_type="latent").images
    ref = run(7.5)
    _assert_seen(ref, run(1.0), "guidance 7.5 against 1")
    _assert_seen(ref, run(7.5, PROMPTS), "the negative prompt")
    _assert_latents_close(_latents(latent_pipe.render, PROMPTS, negative_prompts=NEGATIVE, seeds=[0, 1],
                                   noise=_nhwc(noise)), ref)
    # The decoded images, as uint8, too.
    with torch.no_grad():
        decoded = reference.vae.decode(ref / reference.vae.config.scaling_factor).sample
    ours = _images(pipe.render(PROMPTS, negative_prompts=NEGATIVE, seeds=[0, 1], noise=_nhwc(noise)))
    _assert_close(ours, reference.image_processor.postprocess(decoded, output_type="np"))


@pytest.mark.parity
def test_a_text_encoder_that_asks_for_the_attention_mask_gets_it_as_in_diffusers(sd_folder, tmp_path):
    import json
    import shutil

    from diffusers import StableDiffusionPipeline

    import jax.numpy as jnp
    from flax import nnx

    from jaxdiff.engine import programs

    folder = tmp_path / "sd"
    shutil.copytree(sd_folder, folder)
    config_path = folder / "text_encoder" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_attention_mask": True}))
    reference = StableDiffusionPipeline.from_pretrained(folder)
    noise = _noise(2, 8, 8)
    ref = reference(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, height=16,
                    width=16, latents=noise, output_type="np").images
    pipe = jaxdiff.load_pipeline(str(folder), upscaler="none", steps=STEPS, sampler="ddim", guidance=7.5,
                                 batch_size=2)
    _assert_close(_images(pipe.render(PROMPTS, negative_prompts=NEGATIVE, seeds=[0, 1], noise=_nhwc(noise))), ref)

    # The tiny UNet hardly looks at the padding, so the context is checked too: the
    # engine's token inputs through its text encoder, against diffusers' prompt embeddings.
    inputs, _ = pipe._token_inputs(pipe.base, PROMPTS, NEGATIVE)
    text_encoder = nnx.merge(*[part[0] for part in pipe._base])
    context = programs.encode_text(text_encoder, inputs["ids"], inputs["ids_mask"], clip_skip=0)
    with torch.no_grad():
        expected, _ = reference.encode_prompt(PROMPTS, "cpu", 1, False)
    np.testing.assert_allclose(np.asarray(context), expected.numpy(), atol=3e-5, rtol=1e-4)
    unmasked = text_encoder(jnp.asarray(inputs["ids"]), attention_mask=np.ones_like(inputs["ids"])).last_hidden_state
    assert np.abs(np.asarray(unmasked) - expected.numpy()).max() > 1e-2


def _inject_lcm_step_noise(monkeypatch, steps: range, seeds=(0, 1), latent=(8, 8, 4)):
    """Makes diffusers' LCMScheduler draw, at each of `steps`, the noise our sampler draws
    there for these seeds (normal(fold_in(key, step)) of each sample's sampler key)."""
    import jax
    from diffusers.schedulers import scheduling_lcm

    from jaxdiff.engine.programs import _SAMPLER_NOISE, sample_keys

    keys = jax.vmap(lambda k: jax.random.fold_in(k, _SAMPLER_NOISE))(sample_keys(np.array(seeds, np.uint32)))
    drawn = iter([np.array(jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), latent))(keys))
                  for i in steps])
    monkeypatch.setattr(scheduling_lcm, "randn_tensor",
                        lambda shape, **kw: torch.from_numpy(next(drawn)).permute(0, 3, 1, 2).reshape(shape))


@pytest.mark.parity
@pytest.mark.parametrize("steps", [1, 3])
def test_latent_consistency_model_matches_diffusers(tmp_path, monkeypatch, steps):
    # A guidance-distilled UNet with LCMScheduler, as diffusers' LatentConsistencyModelPipeline
    # runs it: no CFG, the scale as an embedding, fresh noise between steps (ours injected).
    from diffusers import LatentConsistencyModelPipeline

    folder = make_sd_folder(str(tmp_path / "lcm"), scheduler="LCMScheduler", time_cond_proj_dim=8, seed=4)
    defaults = jaxdiff.load_pipeline(folder, upscaler="none", batch_size=2).settings  # its scheduler's
    assert (defaults.sampler, defaults.steps, defaults.guidance) == ("lcm", 4, 8.5)
    pipe = jaxdiff.load_pipeline(folder, upscaler="none", steps=steps, guidance=8.0, batch_size=2)
    noise = _noise(2, 8, 8, seed=5)
    _inject_lcm_step_noise(monkeypatch, range(steps))
    ref = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None)(
        PROMPTS, num_inference_steps=steps, guidance_scale=8.0, height=16, width=16, latents=noise,
        output_type="np").images
    results = pipe.render(PROMPTS, seeds=[0, 1], noise=_nhwc(noise))
    assert results[0].metadata["sampler"] == "lcm"
    _assert_close(_images(results), ref)
    (negative,) = pipe.render(["a"], negative_prompts=["blurry"])
    assert "takes no negative prompt" in negative.error
    (inpaint,) = pipe.render(["a"], mode="inpaint", init_image=_rgb(3), mask=np.ones((16, 16), np.uint8))
    assert "sampler lcm on a guidance-distilled model renders txt2img, img2img and sketch" in inpaint.error


@pytest.mark.parity
@pytest.mark.parametrize("guidance", [8.0, 0.5])
def test_a_guidance_distilled_unet_with_another_sampler_matches_diffusers(tmp_path, guidance):
    # diffusers' SD pipeline gives such a UNet the scale as its embedding (timestep_cond) and
    # runs no CFG at any scale; so does the engine, whatever the sampler.
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = make_sd_folder(str(tmp_path / "lcm"), scheduler="LCMScheduler", time_cond_proj_dim=8, seed=4)
    reference = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    noise = _noise(2, 8, 8, seed=3)
    ref = reference(PROMPTS, num_inference_steps=3, guidance_scale=guidance, height=16, width=16, latents=noise,
                    output_type="np").images
    pipe = jaxdiff.load_pipeline(folder, upscaler="none", steps=3, sampler="ddim", guidance=guidance, batch_size=2)
    _assert_close(_images(pipe.render(PROMPTS, seeds=[0, 1], noise=_nhwc(noise))), ref)


@pytest.mark.parity
def test_a_guidance_distilled_unet_takes_the_scale_as_its_embedding_only_as_diffusers_latents_show(tmp_path):
    """A guidance-distilled UNet is called once a step on the prompt alone, the scale given as
    its embedding, as diffusers runs it: no classifier-free guidance on top, which would lean
    the image on the empty negative prompt. Compared on the latents: the tiny VAE's pixels
    hardly show it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = make_sd_folder(str(tmp_path / "lcm"), scheduler="LCMScheduler", time_cond_proj_dim=8, seed=4)
    reference = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    noise = _noise(2, 8, 8, seed=3)
    ref = reference(PROMPTS, num_inference_steps=3, guidance_scale=8.0, height=16, width=16, latents=noise,
                    output_type="latent").images
    pipe = jaxdiff.load_pipeline(folder, upscaler="none", steps=3, sampler="ddim", guidance=8.0, batch_size=2)
    _assert_latents_close(_latents(pipe.render, PROMPTS, seeds=[0, 1], noise=_nhwc(noise)), ref)


@pytest.mark.parity
def test_latent_consistency_image_to_image_matches_diffusers(tmp_path, monkeypatch):
    # diffusers' LCM img2img: the strength keeps the quietest part of the LCM grid and every
    # step runs, from the image noised to the first step's level.
    from PIL import Image
    from diffusers import LatentConsistencyModelImg2ImgPipeline
    from diffusers.pipelines.latent_consistency_models import pipeline_latent_consistency_img2img as module

    folder = make_sd_folder(str(tmp_path / "lcm"), scheduler="LCMScheduler", time_cond_proj_dim=8, seed=4)
    pipe = jaxdiff.load_pipeline(folder, upscaler="none", steps=3, guidance=8.0, batch_size=2)
    init, noise = [_rgb(1), _rgb(2)], _noise(2, 8, 8, seed=6)
    _patch_noise(monkeypatch, module, [noise])
    _patch_posterior_mean(monkeypatch, module)
    _inject_lcm_step_noise(monkeypatch, range(3))
    ref = LatentConsistencyModelImg2ImgPipeline.from_pretrained(folder, safety_checker=None)(
        PROMPTS, image=[Image.fromarray(i) for i in init], strength=0.6, num_inference_steps=3,
        guidance_scale=8.0, output_type="np").images
    samples = [jaxdiff.Sample(id=str(i), prompt=p, seed=i, mode="img2img", init_image=init[i], strength=0.6)
               for i, p in enumerate(PROMPTS)]
    _assert_close(_images(pipe.render_samples(samples, noise=_nhwc(noise))), ref)
    (weak,) = pipe.render(["a"], mode="img2img", init_image=_rgb(3), strength=0.04)  # 2 of 50 grid points
    assert "raise the strength" in weak.error
    # Strengths keeping as many grid points (30 of 50) share one program and one batch.
    compiled = pipe.compile_count
    near = pipe.render(["a", "b"], mode="img2img", init_image=_rgb(3), seeds=[1, 2], strength=0.6)
    nearer = [pipe.render([p], mode="img2img", init_image=_rgb(3), seeds=[s], strength=0.61)[0]
              for p, s in (("a", 1), ("b", 2))]
    assert pipe.compile_count == compiled and [r.error for r in near + nearer] == [None] * 4
    np.testing.assert_array_equal(near[0].image, nearer[0].image)
    # Strengths keeping other grid points (30 and 45 of 50) batch apart: given in one call,
    # each renders on its own respaced steps, the image it gets alone.
    mixed = pipe.render_samples([jaxdiff.Sample(id=str(k), prompt=p, seed=s, mode="img2img", init_image=_rgb(3),
                                                strength=k) for p, s, k in (("a", 1, 0.6), ("b", 2, 0.9))])
    (strong,) = pipe.render(["b"], mode="img2img", init_image=_rgb(3), seeds=[2], strength=0.9)
    np.testing.assert_array_equal(mixed[0].image, near[0].image)
    np.testing.assert_array_equal(mixed[1].image, strong.image)


@pytest.mark.parity
def test_lcm_sampler_on_a_plain_unet_matches_sd_img2img_with_lcm_scheduler(tmp_path, monkeypatch):
    # LCM-LoRA merged into SD: diffusers runs it through its SD pipelines with LCMScheduler,
    # so img2img starts later on the txt2img steps (no respacing), with CFG.
    from PIL import Image
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    folder = make_sd_folder(str(tmp_path / "lcm-lora"), scheduler="LCMScheduler")
    pipe = jaxdiff.load_pipeline(folder, upscaler="none", steps=4, guidance=1.5, batch_size=2)
    init, noise = [_rgb(1), _rgb(2)], _noise(2, 8, 8, seed=7)
    _patch_noise(monkeypatch, module, [noise])
    _patch_posterior_mean(monkeypatch, module)
    _inject_lcm_step_noise(monkeypatch, range(2, 4))  # strength 0.5 of 4 steps starts at step 2
    ref = StableDiffusionImg2ImgPipeline.from_pretrained(folder)(
        PROMPTS, negative_prompt=NEGATIVE, image=[Image.fromarray(i) for i in init], strength=0.5,
        num_inference_steps=4, guidance_scale=1.5, output_type="np").images
    samples = [jaxdiff.Sample(id=str(i), prompt=p, negative_prompt=NEGATIVE[i], seed=i, mode="img2img",
                              init_image=init[i], strength=0.5) for i, p in enumerate(PROMPTS)]
    results = pipe.render_samples(samples, noise=_nhwc(noise))
    assert results[0].metadata["sampler"] == "lcm"
    _assert_close(_images(results), ref)


def test_an_lcm_scheduler_on_a_plain_unet_recommends_no_cfg(tmp_path):
    # LCM-LoRA merged into SD: the LCM sampler, and guidance 1 (CFG off), as it is run.
    folder = make_sd_folder(str(tmp_path / "lcm-lora"), scheduler="LCMScheduler")
    settings = jaxdiff.load_pipeline(folder, upscaler="none", batch_size=1).settings
    assert (settings.sampler, settings.steps, settings.guidance) == ("lcm", 4, 1.0)
    # A folder that recommends another sampler gets none of LCM's steps and guidance.
    (tmp_path / "lcm-lora" / "render_defaults.json").write_text('{"sampler": "dpmpp_2m"}')
    settings = jaxdiff.load_pipeline(folder, upscaler="none", batch_size=1).settings
    assert (settings.sampler, settings.steps, settings.guidance) == ("dpmpp_2m", 25, 7.5)


@pytest.mark.parity
@pytest.mark.parametrize("guidance", [7.5, 0.5])  # 0.5: no CFG, the negative prompt unused
def test_image_to_image_matches_diffusers(latent_pipe, sd_folder, monkeypatch, guidance):
    from PIL import Image
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    reference = StableDiffusionImg2ImgPipeline.from_pretrained(sd_folder)
    init = [_rgb(1), _rgb(2)]
    noise = _noise(2, 8, 8, seed=5)
    _patch_posterior_mean(monkeypatch, module)

    def run(images):
        _patch_noise(monkeypatch, module, [noise])
        return reference(PROMPTS, negative_prompt=["blurry"] * 2, image=[Image.fromarray(i) for i in images],
                         strength=0.7, num_inference_steps=STEPS, guidance_scale=guidance,
                         output_type="latent").images

    ref = run(init)
    _assert_seen(ref, run(init[::-1]), "the init image")
    samples = [jaxdiff.Sample(id=str(i), prompt=p, negative_prompt="blurry", seed=i, mode="img2img",
                              init_image=init[i], strength=0.7, guidance=guidance) for i, p in enumerate(PROMPTS)]
    _assert_latents_close(_latents(latent_pipe.render_samples, samples, noise=_nhwc(noise)), ref)


@pytest.mark.parity
@pytest.mark.parametrize("channels, guidance", [(9, 7.5), (4, 7.5), (9, 0.8)])  # 0.8: no CFG
def test_inpainting_matches_diffusers(channels, guidance, inpaint_folder, sd_folder, monkeypatch):
    """Two samples: a photo at strength 1 (the masked area from pure noise) whose mask's
    edges lie inside latent cells (2 px here), and a 24x24 photo and mask at strength 0.7
    (started from the photo), resized to the 16x16 render as diffusers resizes them."""
    from PIL import Image
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

    folder = inpaint_folder if channels == 9 else sd_folder
    reference = StableDiffusionInpaintPipeline.from_pretrained(folder)
    mask = np.zeros((16, 16), np.uint8)
    mask[5:11, 3:9] = 255
    # 4 px blocks, 2.7 px at the render size: how it is resized moves its edges.
    large_mask = np.kron(np.random.default_rng(1).integers(0, 2, (6, 6)), np.ones((4, 4), np.uint8)) * 255
    inputs = [(_rgb(7), mask, 1.0), (_rgb(8, 24), large_mask.astype(np.uint8), 0.7)]
    noise = _noise(2, 8, 8, seed=9)
    _patch_posterior_mean(monkeypatch, module)

    def run(i, image=None, mask_image=None):
        init, m, strength = inputs[i]
        _patch_noise(monkeypatch, module, [noise[i:i + 1]])  # latents= would drop the image below strength 1
        return reference(PROMPTS[:1], image=Image.fromarray(init if image is None else image),
                         mask_image=Image.fromarray(m if mask_image is None else mask_image), height=16, width=16,
                         strength=strength, num_inference_steps=STEPS, guidance_scale=guidance,
                         output_type="latent").images

    ref = torch.cat([run(0), run(1)])
    _assert_seen(ref[:1], run(0, mask_image=255 - mask), "the mask against its inverse")
    _assert_seen(ref[1:], run(1, image=_rgb(9, 24)), "the init image at strength 0.7")
    pipe = jaxdiff.load_pipeline(folder, upscaler="none", steps=STEPS, sampler="ddim", batch_size=2)
    samples = [jaxdiff.Sample(id=str(i), prompt=PROMPTS[0], seed=i, mode="inpaint", init_image=init, mask=m,
                              strength=strength, guidance=guidance, width=16, height=16)
               for i, (init, m, strength) in enumerate(inputs)]
    _assert_latents_close(_latents(pipe.render_samples, samples, noise=_nhwc(noise)), ref)


@pytest.mark.parity
def test_upscale_matches_diffusers(sd_folder, upscaler_folder, monkeypatch):
    from PIL import Image
    from diffusers import StableDiffusionUpscalePipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_upscale as module

    # A high noise level: the low-res image's augmentation noise and the UNet's class label
    # (the level) both count; the other upscale tests check the decoded pixels at level 20.
    reference = StableDiffusionUpscalePipeline.from_pretrained(upscaler_folder)
    low = [_rgb(11, 8), _rgb(12, 8)]
    aug = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(2))
    noise = _noise(2, 8, 8, seed=4)

    def run(noise_level, guidance=9.0):
        _patch_noise(monkeypatch, module, [aug])
        return reference(PROMPTS, image=[Image.fromarray(i) for i in low], negative_prompt=NEGATIVE,
                         num_inference_steps=STEPS, guidance_scale=guidance, noise_level=noise_level, latents=noise,
                         output_type="latent").images

    ref = run(150)
    _assert_seen(ref, run(20), "noise level 150 against 20")
    _assert_seen(ref, run(150, guidance=1.0), "guidance 9 against 1")
    pipe = jaxdiff.load_pipeline(sd_folder, upscaler=upscaler_folder, steps=STEPS, sampler="ddim",
                                 upscale_steps=STEPS, upscale_guidance=9.0, noise_level=150, batch_size=2)
    ours = _latents(pipe.upscale, low, PROMPTS, seeds=[0, 1], negative_prompts=NEGATIVE, noise=_nhwc(noise),
                    aug_noise=_nhwc(aug))
    _assert_latents_close(ours, ref)
    # clip_skip is the base model's: the x4 stage reads its text encoder's last layer, as diffusers does.
    skipping = jaxdiff.load_pipeline(sd_folder, upscaler=upscaler_folder, steps=STEPS, sampler="ddim", clip_skip=1,
                                     upscale_steps=STEPS, upscale_guidance=9.0, noise_level=150, batch_size=2)
    same = _latents(skipping.upscale, low, PROMPTS, seeds=[0, 1], negative_prompts=NEGATIVE, noise=_nhwc(noise),
                    aug_noise=_nhwc(aug))
    np.testing.assert_array_equal(same, ours)


@pytest.mark.parity
@pytest.mark.parametrize("guidance", [1.0, 0.5])
def test_upscale_with_guidance_off_matches_diffusers_at_half_the_batch(sd_folder, upscaler_folder, monkeypatch,
                                                                       guidance):
    from PIL import Image
    from diffusers import StableDiffusionUpscalePipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_upscale as module

    low = [_rgb(13, 8)]
    aug = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    noise = _noise(1, 8, 8, seed=6)
    _patch_noise(monkeypatch, module, [aug])
    ref = StableDiffusionUpscalePipeline.from_pretrained(upscaler_folder)(
        PROMPTS[:1], image=[Image.fromarray(i) for i in low], negative_prompt=NEGATIVE[:1],
        num_inference_steps=STEPS, guidance_scale=guidance, noise_level=20, latents=noise, output_type="np").images
    pipe = jaxdiff.load_pipeline(None, upscaler=upscaler_folder, upscale_steps=STEPS, upscale_guidance=guidance,
                                 noise_level=20, batch_size=1)
    ours = pipe.upscale(low, PROMPTS[:1], seeds=[0], negative_prompts=NEGATIVE[:1], noise=_nhwc(noise),
                        aug_noise=_nhwc(aug))
    _assert_close(np.stack(ours).astype(np.float32) / 255.0, ref)
    # diffusers turns CFG off at <= 1: one UNet call on the prompt alone, in its own program.
    assert [key[1].cfg for key in pipe._programs if key[0] == "upscale"] == [False]


@pytest.mark.parity
def test_upscale_of_non_square_images_in_a_short_batch_matches_diffusers_per_image(sd_folder, upscaler_folder,
                                                                                  monkeypatch):
    """Height and width differ, and 3 images at batch size 2 pad the last batch: each image
    equals diffusers run on it alone."""
    from PIL import Image
    from diffusers import StableDiffusionUpscalePipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_upscale as module

    low = [np.random.default_rng(i).integers(0, 256, (8, 12, 3), dtype=np.uint8) for i in range(3)]
    prompts, negatives = PROMPTS + ["green"], NEGATIVE + ["dark"]
    aug = torch.randn((3, 3, 8, 12), generator=torch.Generator().manual_seed(2))
    noise = _noise(3, 8, 12, seed=5)
    diffusers_pipe = StableDiffusionUpscalePipeline.from_pretrained(upscaler_folder)
    ref = []
    for i in range(3):
        _patch_noise(monkeypatch, module, [aug[i:i + 1]])
        ref.append(diffusers_pipe(
            prompts[i:i + 1], image=[Image.fromarray(low[i])], negative_prompt=negatives[i:i + 1],
            num_inference_steps=STEPS, guidance_scale=9.0, noise_level=20, latents=noise[i:i + 1],
            output_type="np").images)
    pipe = jaxdiff.load_pipeline(sd_folder, upscaler=upscaler_folder, steps=STEPS, sampler="ddim",
                                 upscale_steps=STEPS, upscale_guidance=9.0, noise_level=20, batch_size=2)
    ours = pipe.upscale(low, prompts, seeds=[0, 1, 2], negative_prompts=negatives, noise=_nhwc(noise),
                        aug_noise=_nhwc(aug))
    assert ours[0].shape == (32, 48, 3)
    _assert_close(np.stack(ours).astype(np.float32) / 255.0, np.concatenate(ref))


@pytest.mark.parity
def test_upscale_follows_its_scheduler_configs_karras_sigmas_as_diffusers(sd_folder, upscaler_folder, tmp_path,
                                                                          monkeypatch):
    import shutil
    from PIL import Image
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionUpscalePipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_upscale as module

    folder = str(tmp_path / "up")
    shutil.copytree(upscaler_folder, folder)
    scheduler = DPMSolverMultistepScheduler.from_pretrained(upscaler_folder, subfolder="scheduler",
                                                            use_karras_sigmas=True)
    scheduler.save_pretrained(f"{folder}/scheduler")
    low = _rgb(11, 8)
    aug = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(2))
    noise = _noise(1, 8, 8, seed=4)
    _patch_noise(monkeypatch, module, [aug])
    ref = StableDiffusionUpscalePipeline.from_pretrained(upscaler_folder, scheduler=scheduler)(
        PROMPTS[:1], image=[Image.fromarray(low)], num_inference_steps=4, guidance_scale=9.0, noise_level=20,
        latents=noise, output_type="np").images
    pipe = jaxdiff.load_pipeline(sd_folder, upscaler=folder, steps=2, sampler="ddim", upscale_steps=4,
                                 upscale_guidance=9.0, noise_level=20, batch_size=1)
    assert pipe._upscale_sampler == "dpmpp_2m"
    ours = pipe.upscale([low], PROMPTS[:1], seeds=[0], noise=_nhwc(noise), aug_noise=_nhwc(aug))
    _assert_close(np.stack(ours).astype(np.float32) / 255.0, ref)
    # On the tiny model Karras sigmas move the image by a few levels only: the timesteps
    # tell the two schedules apart for certain.
    scheduler.set_timesteps(4)
    plain = DPMSolverMultistepScheduler.from_pretrained(upscaler_folder, subfolder="scheduler")
    plain.set_timesteps(4)
    assert not np.allclose(scheduler.timesteps.numpy(), plain.timesteps.numpy())
    np.testing.assert_allclose(pipe._upscale_solver.model_timesteps, scheduler.timesteps.numpy())
    # An upscale sampler that takes no Karras sigmas is built from the same config, and steps as
    # diffusers' DDIM built from it does.
    from diffusers import DDIMScheduler

    ddim = jaxdiff.engine.Pipeline(None, pipe.upscaler, batch_size=1, settings=jaxdiff.engine.RenderSettings(
        upscale_sampler="ddim", upscale_steps=4))
    reference = DDIMScheduler.from_config(scheduler.config)
    reference.set_timesteps(4)
    np.testing.assert_array_equal(ddim._upscale_solver.model_timesteps, reference.timesteps.numpy())


@pytest.mark.faults
def test_upscale_converts_other_image_kinds_and_refuses_bad_input_by_name(sd_folder, upscaler_folder):
    up = jaxdiff.load_pipeline(sd_folder, upscaler=upscaler_folder, steps=2, sampler="ddim", upscale_steps=2,
                               batch_size=2)
    low = _rgb(1, 8)
    # Floats in [0, 1] are scaled as a Sample's init_image is, not read as 0-255 levels (near black).
    as_uint8, as_float, as_grey = up.upscale([low, low / 255.0, low[..., 0]], ["a"] * 3, seeds=[0, 0, 0])
    np.testing.assert_array_equal(as_float, as_uint8)
    assert as_grey.shape == (32, 32, 3)
    given = dict(images=[low, low], prompts=["a", "b"], seeds=[0, 1])
    refused = [
        (dict(images=[low, low * 1.0]), r"images\[1\] of dtype float64"),
        (dict(images=[low, _rgb(2, 12)]), r"images\[1\] is 12x12 .* images\[0\] 8x8"),
        (dict(prompts=["a"]), "1 prompts for 2 images"),
        (dict(negative_prompts=["x"]), "1 negative_prompts for 2 images"),
        (dict(seeds=[0, -1]), r"seeds\[1\] is -1"),
        # Named as render names them (the tokenizer raised a TypeError naming a negative prompt "prompts[0]").
        (dict(prompts=["a", 3]), r"upscale: prompts\[1\] is 3: give text"),
        (dict(negative_prompts=["x", 5]), r"upscale: negative_prompts\[1\] is 5: give text"),
        (dict(seeds=[0, 0.5]), r"seeds\[1\] is 0.5: give whole numbers"),
        (dict(seeds=1), "seeds is 1: give a list, one per image"),  # a TypeError from len()
        # Read as 8 images of one row each: "1 prompts for 8 images".
        (dict(images=low, prompts=["a"], seeds=[0]), r"images is one image \(an array of shape \(8, 8, 3\)\)"),
        # Short noise would leave the images past its end drawn, not reproduced.
        (dict(noise=np.zeros((1, 8, 8, 4), np.float32), aug_noise=np.zeros((1, 8, 8, 3), np.float32)),
         "1 noise for 2 images"),
        (dict(noise=np.zeros((2, 4, 8, 8), np.float32), aug_noise=np.zeros((2, 8, 8, 3), np.float32)),
         r"noise has shape \(2, 4, 8, 8\)"),
    ]
    for change, match in refused:
        with pytest.raises(ValueError, match=match):
            up.upscale(**{**given, **change})
    assert up.upscale([], [], seeds=[]) == []
    # Seeds follow render's rule: any whole number, 1.0 and numpy's ints as 1.
    np.testing.assert_array_equal(up.upscale([low], ["a"], seeds=[np.float64(0.0)])[0], as_uint8)
    # A negative prompt of None is the run's, as render takes it.
    np.testing.assert_array_equal(up.upscale([low], ["a"], seeds=[0], negative_prompts=[None])[0], as_uint8)


@pytest.mark.parity
def test_guidance_of_one_or_less_is_the_prompt_alone_as_in_diffusers(latent_pipe, sd_folder):
    """diffusers turns guidance off at a scale <= 1 (the prompt's prediction alone); the CFG
    formula below 1 would lean toward the negative prompt instead."""
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(sd_folder)
    noise = _noise(2, 8, 8, seed=3)
    run = lambda prompts: reference(
        prompts, negative_prompt=["blurry"] * 2, num_inference_steps=STEPS, guidance_scale=0.0, height=16,
        width=16, latents=noise, output_type="latent").images
    ref = run(PROMPTS)
    _assert_seen(ref, run(["blurry"] * 2), "the prompts' text against the negative prompt's")
    zero, one = (_latents(latent_pipe.render, PROMPTS, negative_prompts=["blurry"] * 2, seeds=[0, 1],
                          noise=_nhwc(noise), guidance=g) for g in (0.0, 1.0))
    _assert_latents_close(zero, ref)
    np.testing.assert_array_equal(zero, one)
    # Rendered by a program of its own that calls the UNet on the prompt alone (half CFG's batch).
    assert any(key[0] == "base" and not key[1].cfg for key in latent_pipe._programs)


def test_samples_of_different_guidance_in_one_batch_each_render_with_their_own(latent_pipe):
    """The guidance scale is each sample's own: two samples of different scales rendered in
    one batch give the latents each gives alone, not its neighbour's scale."""
    samples = [jaxdiff.Sample(id="a", prompt=PROMPTS[0], seed=1, guidance=7.5),
               jaxdiff.Sample(id="b", prompt=PROMPTS[1], seed=2, guidance=3.0)]
    together = _latents(latent_pipe.render_samples, samples)
    alone = np.concatenate([_latents(latent_pipe.render_samples, [s]) for s in samples])
    np.testing.assert_allclose(together, alone, rtol=LATENT_RTOL, atol=LATENT_ATOL)
    (neighbours,) = _latents(latent_pipe.render_samples, [jaxdiff.Sample(id="b", prompt=PROMPTS[1], seed=2,
                                                                         guidance=7.5)])
    assert np.abs(neighbours - alone[1]).max() > SEEN  # the scale moves the latents: the check sees it


def test_an_inpainting_unet_renders_a_sample_the_same_next_to_any_other(inpaint_folder):
    """The 9-channel UNet's mask and masked image come from each sample alone: a text-to-image
    sample gets the same full mask and empty image whether an inpaint sample shares its batch.
    Compared on the latents: the tiny VAE's pixels hardly show the mask channel."""
    pipe = jaxdiff.load_pipeline(inpaint_folder, upscaler="none", steps=2, sampler="ddim", batch_size=2)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    text = jaxdiff.Sample(id="t", prompt="a red circle", seed=4)
    neighbours = {"text": jaxdiff.Sample(id="n", prompt="x", seed=5),
                  "inpaint": jaxdiff.Sample(id="n", prompt="x", seed=5, mode="inpaint", init_image=_rgb(8),
                                            mask=mask)}
    latents = {name: _latents(pipe.render_samples, [text, other])[0] for name, other in neighbours.items()}
    np.testing.assert_allclose(latents["text"], latents["inpaint"], rtol=LATENT_RTOL, atol=LATENT_ATOL)


def test_karras_sigmas_follow_the_checkpoints_scheduler_unless_set(sd_folder, tmp_path):
    import shutil

    folder = str(tmp_path / "sd")
    shutil.copytree(sd_folder, folder)
    config_path = f"{folder}/scheduler/scheduler_config.json"
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump(dict(config, use_karras_sigmas=True), f)
    render = lambda path, **kw: jaxdiff.load_pipeline(path, upscaler="none", steps=3, sampler="dpmpp_2m",
                                                      batch_size=1, **kw).render(["a red circle"], seeds=[5])[0]
    from_config, asked, plain = render(folder), render(sd_folder, karras=True), render(sd_folder)
    np.testing.assert_array_equal(from_config.image, asked.image)
    assert np.abs(from_config.image.astype(int) - plain.image.astype(int)).max() > 2  # other sigmas
    np.testing.assert_array_equal(render(folder, karras=False).image, plain.image)
    # A sampler that takes no Karras sigmas loads from such a checkpoint and steps as diffusers'
    # DDIM built from its config does.
    from diffusers import DDIMScheduler

    ddim = jaxdiff.load_pipeline(folder, upscaler="none", steps=3, sampler="ddim", batch_size=1)
    reference = DDIMScheduler.from_config(dict(config, use_karras_sigmas=True))
    reference.set_timesteps(3)
    np.testing.assert_array_equal(ddim._base_sampler("ddim", 3)[0].model_timesteps, reference.timesteps.numpy())


@pytest.mark.faults
def test_settings_and_samples_outside_what_the_models_take_are_refused(sd_folder, upscaler_folder, pipe):
    with pytest.raises(ValueError, match="noise_level 400 is out of range.*max_noise_level 350"):
        jaxdiff.load_pipeline(sd_folder, upscaler=upscaler_folder, noise_level=400, batch_size=1)
    # Its max_noise_level itself is taken, as diffusers' upscale pipeline takes it.
    top = jaxdiff.load_pipeline(None, upscaler=upscaler_folder, noise_level=350, batch_size=1)
    assert top.settings.noise_level == 350
    up = jaxdiff.load_pipeline(None, upscaler=upscaler_folder, batch_size=1)
    with pytest.raises(ValueError, match="noise and aug_noise together"):
        up.upscale([_rgb(1, 8)], ["a"], seeds=[0], noise=np.zeros((1, 8, 8, 4), np.float32))
    karras = jaxdiff.load_pipeline(sd_folder, upscaler="none", steps=2, sampler="euler", karras=True, batch_size=2)
    ddim, euler = karras.render_samples([jaxdiff.Sample(id="d", prompt="a", seed=1, sampler="ddim"),
                                         jaxdiff.Sample(id="e", prompt="a", seed=1)])
    assert "Karras sigmas apply to" in ddim.error and euler.error is None
    steps, weak, good = pipe.render_samples([
        jaxdiff.Sample(id="s", prompt="a", steps=1001),
        jaxdiff.Sample(id="w", prompt="a", mode="img2img", init_image=_rgb(2), strength=0.2),  # 3 steps x 0.2
        jaxdiff.Sample(id="g", prompt="a", seed=1)])
    assert "steps 1001 is out of range: use 1 to 1000" in steps.error
    assert "leaves no step to take" in weak.error and good.error is None
    # Leading spacing with steps_offset 1 (the tiny checkpoint's DDIM config): 1000 steps
    # would start at t=1000, past the schedule; that sample fails, not its batch.
    past, good = pipe.render_samples([jaxdiff.Sample(id="p", prompt="a", steps=1000),
                                      jaxdiff.Sample(id="g", prompt="a", seed=1)])
    assert "sampler ddim at 1000 steps: num_steps=1000" in past.error and good.error is None


def test_a_scheduler_config_the_samplers_cannot_follow_fails_at_load_or_per_sampler(sd_folder, tmp_path):
    import shutil

    folder = tmp_path / "sd"
    shutil.copytree(sd_folder, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "thresholding": True}))
    with pytest.raises(ValueError, match="thresholding") as info:  # no sampler follows it: the model is refused
        jaxdiff.load_pipeline(str(folder), upscaler="none", batch_size=2)
    assert str(info.value).startswith(f"{folder}/scheduler/scheduler_config.json: ")  # as model configs
    # An option only DPM-Solver reads: a sample on that sampler fails, one on another renders.
    config_path.write_text(json.dumps({**config, "algorithm_type": "sde-dpmsolver++"}))
    pipe = jaxdiff.load_pipeline(str(folder), upscaler="none", steps=2, sampler="ddim", batch_size=2)
    dpm, ddim = pipe.render_samples([jaxdiff.Sample(id="d", prompt="a", sampler="dpmpp_2m"),
                                     jaxdiff.Sample(id="e", prompt="a")])
    assert "algorithm_type" in dpm.error and "sde-dpmsolver++" in dpm.error and ddim.error is None
    assert f"{folder}/scheduler/scheduler_config.json: " in dpm.error
    # clip_sample, which only DDIM / DDPM / LCM read (and follow), refuses no model.
    config_path.write_text(json.dumps({**config, "clip_sample": True}))
    assert jaxdiff.load_pipeline(str(folder), upscaler="none", batch_size=2).describe()["base"] is not None


@pytest.mark.faults
def test_an_upscalers_scheduler_configs_are_named_when_refused(upscaler_folder, tmp_path):
    import shutil

    folder = tmp_path / "up"
    shutil.copytree(upscaler_folder, folder)
    for sub in ("scheduler", "low_res_scheduler"):
        path = folder / sub / "scheduler_config.json"
        before = path.read_text()
        path.write_text(json.dumps({**json.loads(before), "trained_betas": [0.1, 0.2]}))
        with pytest.raises(ValueError, match="trained_betas") as info:
            jaxdiff.load_pipeline(None, upscaler=str(folder), batch_size=1)
        assert str(info.value).startswith(f"{path}: ")
        path.write_text(before)


@pytest.mark.parity
def test_a_zero_terminal_snr_model_matches_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    # SD 2.1-style zero-SNR fine-tune: v-prediction, rescaled betas, trailing DDIM steps from t=999.
    folder = make_sd_folder(str(tmp_path / "sd"), prediction_type="v_prediction", seed=4)
    config_path = tmp_path / "sd" / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}))
    noise = _noise(2, 8, 8, seed=3)
    ref = StableDiffusionPipeline.from_pretrained(folder)(
        PROMPTS, num_inference_steps=STEPS, guidance_scale=5.0, height=16, width=16, latents=noise,
        output_type="np").images
    pipe = jaxdiff.load_pipeline(folder, upscaler="none", steps=STEPS, sampler="ddim", guidance=5.0, batch_size=2)
    _assert_close(_images(pipe.render(PROMPTS, seeds=[0, 1], noise=_nhwc(noise))), ref)


def test_two_stage_render_keeps_base(sd_folder, upscaler_folder):
    pipe = jaxdiff.load_pipeline(sd_folder, upscaler=upscaler_folder, steps=2, sampler="ddim", upscale_steps=2,
                                 keep_base=True, batch_size=2)
    (r,) = pipe.render(["a red circle"], seeds=[3])
    assert r.image.shape == (64, 64, 3) and r.base_image.shape == (16, 16, 3)
    assert r.metadata["upscale_steps"] == 2 and r.metadata["width"] == 64


@pytest.fixture(scope="module")
def two_stage(sd_folder, upscaler_folder):
    """Base and x4 stages at 2 steps each, keeping the base images, with a run negative prompt."""
    return jaxdiff.load_pipeline(sd_folder, upscaler=upscaler_folder, steps=2, sampler="ddim", upscale_steps=2,
                                 keep_base=True, negative_prompt="blurry", batch_size=2)


def test_the_x4_stage_upscales_each_samples_own_base_image_prompt_and_seed(two_stage):
    """In a two-stage render each sample's base image is upscaled with its own prompt, negative
    prompt (its own, else the run's) and seed: `upscale` on its kept base image gives its image
    bit for bit. A non-square render records its size and its base size each side in its place;
    with upscale off the base image is the result, and no x4 settings are recorded."""
    samples = [jaxdiff.Sample(id="own", prompt="a red circle", negative_prompt="dark", seed=3, width=32),
               jaxdiff.Sample(id="run", prompt="a blue square", seed=4, width=32)]
    own, run = two_stage.render_samples(samples)
    assert own.image.shape == (64, 128, 3) and own.base_image.shape == (16, 32, 3)
    sizes = {k: own.metadata[k] for k in ("width", "height", "base_width", "base_height")}
    assert sizes == {"width": 128, "height": 64, "base_width": 32, "base_height": 16}
    upscale = lambda base, prompt, seed, **kw: two_stage.upscale([base], [prompt], seeds=[seed], **kw)[0]
    np.testing.assert_array_equal(upscale(own.base_image, "a red circle", 3, negative_prompts=["dark"]), own.image)
    np.testing.assert_array_equal(upscale(run.base_image, "a blue square", 4), run.image)  # the run's "blurry"
    # Another negative prompt or base image moves the x4's pixels: the checks above can see them.
    assert not np.array_equal(upscale(own.base_image, "a red circle", 3), own.image)
    assert not np.array_equal(upscale(run.base_image, "a blue square", 4, negative_prompts=[""]), run.image)
    assert not np.array_equal(upscale(own.base_image, "a blue square", 4), run.image)

    import dataclasses

    off = jaxdiff.engine.Pipeline(two_stage.base, two_stage.upscaler, batch_size=2,
                                  settings=dataclasses.replace(two_stage.settings, upscale=False))
    for kept, result in zip((own, run), off.render_samples(samples)):
        np.testing.assert_array_equal(result.image, kept.base_image)
        assert (result.metadata["width"], result.metadata["height"]) == (32, 16)
        assert not {"upscaler", "upscale_steps", "upscale_guidance", "noise_level"} & result.metadata.keys()


@pytest.mark.faults
def test_a_sample_whose_base_image_went_non_finite_is_reported_not_upscaled(two_stage):
    """The x4 stage turns a broken (NaN) base image into finite pixels: such a sample is
    reported with an error all the same, and its batch neighbour renders."""
    noise = np.random.default_rng(0).standard_normal((2, 8, 16, 4)).astype(np.float32)
    noise[1, 3, 3, 0] = np.nan
    ok, bad = two_stage.render_samples([jaxdiff.Sample(id="ok", prompt="a", seed=1, width=32),
                                        jaxdiff.Sample(id="bad", prompt="a", seed=1, width=32)], noise=noise)
    assert ok.error is None and ok.image.shape == (64, 128, 3)
    assert bad.image is None and "non-finite" in bad.error


def test_a_seeds_noise_is_drawn_from_its_own_stream_in_each_stage(pipe, two_stage):
    """Each random draw of a sample comes from its own stream of its seed's key: the base
    stage's initial noise from stream 0, the x4 stage's augmentation and initial noise from
    streams 0 and 1 of the key's stream 2. Passing those as noise= renders the same image, so
    a run's noise can be rebuilt from its seeds, and the x4's augmentation noise is not made
    of the same numbers as its initial noise."""
    import jax

    from jaxdiff.engine import programs

    def normal(shape, *streams):
        key = jax.random.key(5)
        for stream in streams:
            key = jax.random.fold_in(key, stream)
        return np.asarray(jax.random.normal(key, shape))[None]

    (drawn,) = pipe.render(["a red circle"], seeds=[5])
    (given,) = pipe.render(["a red circle"], seeds=[5], noise=normal((8, 8, 4), programs._INITIAL_NOISE))
    np.testing.assert_array_equal(given.image, drawn.image)
    low = np.random.default_rng(1).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    aug = normal((16, 32, 3), programs._UPSCALE, programs._AUG_NOISE)
    noise = normal((16, 32, 4), programs._UPSCALE, programs._UPSCALE_NOISE)
    (drawn,) = two_stage.upscale([low], ["a red circle"], seeds=[5])
    (given,) = two_stage.upscale([low], ["a red circle"], seeds=[5], noise=noise, aug_noise=aug)
    np.testing.assert_array_equal(given, drawn)


def test_each_images_timings_are_its_share_of_the_render(sd_folder, upscaler_folder):
    import time

    pipe = jaxdiff.load_pipeline(sd_folder, upscaler=upscaler_folder, steps=8, sampler="ddim", upscale_steps=8,
                                 batch_size=2)
    pipe.render(["a red circle", "a blue square"], seeds=[1, 2])  # compiles
    start = time.perf_counter()
    results = pipe.render(["a red circle", "a blue square"], seeds=[1, 2])
    wall = time.perf_counter() - start
    timings = [r.metadata["timings"] for r in results]
    assert timings[0] == timings[1] and timings[0]["base_s"] > 0 and timings[0]["upscale_s"] > 0
    # The device's work, not the moment jax handed it over: most of the wall time.
    assert 0.5 * wall <= sum(t["base_s"] + t["upscale_s"] for t in timings) <= wall + 1e-3


def test_a_folders_render_defaults_apply_where_no_setting_is_given(sd_folder, tmp_path):
    import shutil

    folder = str(tmp_path / "sd")
    shutil.copytree(sd_folder, folder)
    with open(f"{folder}/render_defaults.json", "w") as f:
        json.dump({"steps": 2, "sampler": "ddim", "guidance": 3.0}, f)
    recommended = jaxdiff.load_pipeline(folder, upscaler="none", batch_size=1)
    assert (recommended.settings.steps, recommended.settings.sampler, recommended.settings.guidance) == (2, "ddim", 3.0)
    given = jaxdiff.load_pipeline(sd_folder, upscaler="none", steps=2, sampler="ddim", guidance=3.0, batch_size=1)
    (ours,), (theirs,) = recommended.render(["a red circle"], seeds=[5]), given.render(["a red circle"], seeds=[5])
    np.testing.assert_array_equal(ours.image, theirs.image)
    assert jaxdiff.load_pipeline(folder, upscaler="none", guidance=6.0, batch_size=1).settings.guidance == 6.0


def test_settings_given_win_over_what_the_upscaler_folder_recommends(upscaler_folder, tmp_path):
    """An x4 folder's render_defaults.json fills the settings nobody gave, a noise level of 0
    included, and a setting the user gives (noise_level=50) wins over the folder's, as
    load_pipeline merges them."""
    import shutil

    from jaxdiff.engine import check_settings, settings_for
    from jaxdiff.weights.family import load_family

    folder = str(tmp_path / "up")
    shutil.copytree(upscaler_folder, folder)
    with open(f"{folder}/render_defaults.json", "w") as f:
        json.dump({"noise_level": 0, "guidance": 3.0}, f)
    up = load_family(folder)
    recommended, _ = check_settings(settings_for(None, up, noise_level=None))
    assert (recommended.noise_level, recommended.upscale_guidance) == (0, 3.0)
    given, _ = check_settings(settings_for(None, up, noise_level=50))
    assert (given.noise_level, given.upscale_guidance) == (50, 3.0)


def test_same_seed_same_image_anywhere_in_any_batch(sd_folder):
    """A sample's image depends on its prompt and seed only: not on batch size or position."""
    pipe4 = jaxdiff.load_pipeline(sd_folder, upscaler="none", steps=2, sampler="euler_a", batch_size=4)
    pipe1 = jaxdiff.load_pipeline(sd_folder, upscaler="none", steps=2, sampler="euler_a", batch_size=1)
    alone = pipe1.render(["a red circle"], seeds=[42])[0].image
    batch = pipe4.render(["a blue square", "a red circle", "a green circle"], seeds=[1, 42, 2])
    assert np.abs(batch[1].image.astype(int) - alone.astype(int)).max() <= 1
    moved = pipe4.render(["a red circle", "x"], seeds=[42, 5])[0].image
    assert np.abs(moved.astype(int) - alone.astype(int)).max() <= 1
    other = pipe1.render(["a red circle"], seeds=[43])[0].image
    assert np.abs(other.astype(int) - alone.astype(int)).max() > 10


def test_without_seeds_a_prompts_seed_follows_its_text_not_its_place_in_the_list(pipe):
    from jaxdiff.engine.sample import derive_seed

    # Before, the seeds came from the positions: "a blue square" first or second drew other noise.
    first = pipe.render(["a red circle", "a blue square", "a red circle"])
    moved = pipe.render(["a blue square", "a red circle"])
    seeds = [r.metadata["seed"] for r in first]
    assert seeds[0] == 41723144  # sha256 of the run seed and the text: the same in every process
    assert seeds[2] == 1587099726  # the prompt's second copy in a call: another image
    assert [r.metadata["seed"] for r in moved] == [seeds[1], seeds[0]]
    for a, b in ((moved[0], first[1]), (moved[1], first[0])):
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1
    # With ids, each seed comes from its id, as a job's record without a seed gets it.
    (named,) = pipe.render(["a red circle"], ids=["x"])
    assert named.metadata["seed"] == derive_seed(0, "x")


def test_a_samples_derived_seed_follows_the_run_seed_and_its_id_the_same_in_every_process(sd_folder, pipe):
    """Without a seed of its own, a sample's seed comes from the run seed and its id: the
    same in every process and version (a rerun or resume draws the same noise), and another
    run seed gives other images for the same ids."""
    from jaxdiff.engine.sample import derive_seed

    assert derive_seed(0, "x") == 634768859  # sha256 of "0:x": fixed across processes and releases
    other = jaxdiff.load_pipeline(sd_folder, upscaler="none", steps=STEPS, sampler="ddim", batch_size=2, seed=1)
    here, there = (p.prepare(jaxdiff.Sample(id="x", prompt="a")).seed for p in (pipe, other))
    assert here == derive_seed(0, "x") and there == derive_seed(1, "x") != here


def test_one_compilation_for_many_batches_of_one_signature(sd_folder):
    pipe = jaxdiff.load_pipeline(sd_folder, upscaler="none", steps=2, sampler="dpmpp_2m", batch_size=2)
    prompts = [f"prompt {i}" for i in range(7)]  # 4 batches, the last one short and padded
    results = pipe.render(prompts, seeds=list(range(7)), guidance=3.0)
    assert len(results) == 7 and all(r.image is not None for r in results)
    results = pipe.render(prompts[:3], seeds=[9, 8, 7], guidance=5.0)  # other guidance: traced, same program
    assert pipe.compile_count == 1
    pipe.render(["a"], seeds=[1], width=32, height=16)  # a new size is a new program
    assert pipe.compile_count == 2


def test_an_empty_negative_prompt_given_overrides_the_runs(sd_folder, pipe):
    run = jaxdiff.load_pipeline(sd_folder, upscaler="none", steps=STEPS, sampler="ddim", guidance=7.5,
                                batch_size=2, negative_prompt="blurry")
    (none,) = pipe.render(["a"], seeds=[1])  # a run without a negative prompt
    (given,) = run.render(["a"], seeds=[1], negative_prompts=[""])  # rendered with "blurry"
    sample, unset = run.render_samples([jaxdiff.Sample(id="s", prompt="a", seed=1, negative_prompt=""),
                                        jaxdiff.Sample(id="u", prompt="a", seed=1)])
    for result in (given, sample):
        assert result.metadata["negative_prompt"] == ""
        np.testing.assert_array_equal(result.image, none.image)
    assert unset.metadata["negative_prompt"] == "blurry"
    assert not np.array_equal(unset.image, none.image)  # the tiny model's text moves a pixel or so


@pytest.mark.faults
def test_non_finite_output_is_reported_per_sample(pipe):
    samples = [jaxdiff.Sample(id="ok", prompt="a", seed=1), jaxdiff.Sample(id="bad", prompt="a", seed=1)]
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    noise[1, 3, 3, 0] = np.nan  # one sample's computation goes non-finite
    ok, bad = pipe.render_samples(samples, noise=noise)
    assert ok.error is None and ok.image is not None
    assert bad.image is None and "non-finite" in bad.error
    (nan_guidance,) = pipe.render_samples([jaxdiff.Sample(id="g", prompt="a", guidance=float("nan"))])
    assert "guidance nan is not a finite number" in nan_guidance.error


@pytest.mark.faults
def test_bad_sample_requests_are_reported_not_raised(pipe):
    samples = [jaxdiff.Sample(id="size", prompt="a", width=18, height=16),
               jaxdiff.Sample(id="noimg", prompt="a", mode="img2img"),
               jaxdiff.Sample(id="mode", prompt="a", mode="paint"),
               jaxdiff.Sample(id="good", prompt="a", seed=1)]
    samples += [jaxdiff.Sample(id="neg", prompt="a", seed=-1), jaxdiff.Sample(id="big", prompt="a", seed=2**32)]
    samples += [jaxdiff.Sample(id="zero steps", prompt="a", steps=0), jaxdiff.Sample(id="zero", prompt="a", width=0)]
    size, noimg, mode, good, neg, big, zero_steps, zero = pipe.render_samples(samples)
    # A 0 given is refused, not taken for "unset" (it rendered 25 steps at the native size).
    assert "steps 0 is out of range" in zero_steps.error and "unsupported size 0x" in zero.error
    assert "unsupported size 18x16" in size.error
    assert "init_image" in noimg.error
    assert "unknown mode" in mode.error
    assert good.error is None
    # Before, a seed out of uint32's range raised OverflowError out of the whole batch.
    assert "seed -1 is out of range" in neg.error and "seed 4294967296 is out of range" in big.error


@pytest.mark.faults
def test_given_noise_must_fit_every_sample(pipe, monkeypatch):
    samples = [jaxdiff.Sample(id="square", prompt="a"), jaxdiff.Sample(id="wide", prompt="a", width=32)]
    # Refused before any batch renders (the square one fits, and would render first).
    monkeypatch.setattr(pipe, "_render_batch", lambda *args: pytest.fail("a batch rendered before the check"))
    with pytest.raises(ValueError, match="noise holds 1 latents for 2 samples"):
        pipe.render_samples(samples, noise=_nhwc(_noise(1, 8, 8)))
    with pytest.raises(ValueError, match=r"sample 'wide' renders at 32x16, latents \(8, 16, 4\): noise= takes "
                                         "samples of one size"):  # before, numpy's "could not broadcast"
        pipe.render_samples(samples, noise=_nhwc(_noise(2, 8, 8)))


def test_given_noise_rows_follow_their_samples_across_programs(pipe):
    """render_samples' `noise` rows belong to the samples in the order given, also where the
    samples render in different programs (guidance on and off here): each image is the one
    its sample renders alone with its own row."""
    noise = np.random.default_rng(2).standard_normal((3, 8, 8, 4)).astype(np.float32)
    samples = [jaxdiff.Sample(id="a", prompt="a red circle", seed=1),
               jaxdiff.Sample(id="b", prompt="a blue square", seed=2, guidance=1.0),
               jaxdiff.Sample(id="c", prompt="two shapes", seed=3)]
    together = pipe.render_samples(samples, noise=noise)
    for i, sample in enumerate(samples):
        (alone,) = pipe.render_samples([sample], noise=noise[i:i + 1])
        np.testing.assert_array_equal(together[i].image, alone.image)


@pytest.mark.faults
def test_run_settings_that_no_sample_could_render_with_are_refused_at_load(sd_folder):
    # Each loaded, then failed in every sample, in range(), or rendered [None].
    refused = [
        (dict(sampler="dpm++"), "the run's settings: unknown sampler 'dpm\\+\\+': use one of"),
        (dict(steps=0), "steps=0: give a whole number >= 1"),
        (dict(steps=1001), "the run's settings: steps 1001 is out of range: use 1 to 1000"),
        (dict(width=18), r"the run's settings: unsupported size 18x16 \(width x height\): use multiples of"),
        (dict(guidance="7"), "guidance='7': give a finite number >= 0"),
        (dict(clip_skip=3), "clip_skip=3: this model's text encoder has 2 layers; give 0 to 2"),
        (dict(seed=-1), "seed=-1: give a whole number >= 0"),
        (dict(strength=1.5), r"strength=1.5: give a number in \(0, 1\]"),
        (dict(batch_size=0), "batch_size=0: give a whole number >= 1"),
        (dict(batch_size=-1), "batch_size=-1: give a whole number >= 1"),
    ]
    for settings, match in refused:
        with pytest.raises(ValueError, match=match):
            jaxdiff.load_pipeline(sd_folder, upscaler="none", **settings)
    with pytest.raises(ValueError, match="batch_size=0"):  # built directly, as load_pipeline does
        jaxdiff.engine.Pipeline(None, None, batch_size=0)
    taken = jaxdiff.load_pipeline(sd_folder, upscaler="none", steps=2.0, batch_size=np.int64(2))
    assert (taken.settings.steps, taken.batch_size) == (2, 2) and type(taken.settings.steps) is int
    # Karras sigmas with a run sampler that does not take them: a sample may pick one that does.
    jaxdiff.load_pipeline(sd_folder, upscaler="none", sampler="ddim", karras=True)
    # The refusal's "0 to 2" is meant: skipping all of the text encoder's layers is taken.
    assert jaxdiff.load_pipeline(sd_folder, upscaler="none", clip_skip=2).settings.clip_skip == 2


@pytest.mark.faults
def test_run_settings_at_the_edges_of_their_range_are_taken_or_refused_by_name(sd_folder):
    """The run seed takes 0 to 2**32 - 1 (a noise key's range) and no more; a negative
    upscale guidance is refused like a negative guidance; a noise level of 0 (no noise on the
    low-res image) is a setting, not a mistake."""
    from jaxdiff.engine import RenderSettings, check_settings

    for settings, match in ((dict(seed=2**32), r"seed=4294967296: give a whole number from 0 to 2\*\*32 - 1"),
                            (dict(upscale_guidance=-1.0), "upscale_guidance=-1.0: give a finite number >= 0")):
        with pytest.raises(ValueError, match=match):
            jaxdiff.load_pipeline(sd_folder, upscaler="none", **settings)
    taken, _ = check_settings(RenderSettings(seed=2**32 - 1, noise_level=0, upscale_guidance=0.0))
    assert (taken.seed, taken.noise_level, taken.upscale_guidance) == (2**32 - 1, 0, 0.0)


@pytest.mark.faults
def test_a_tile_size_that_cannot_be_used_is_refused_at_load(sd_folder):
    for tile in (8.0, 32, True):  # 8.0 failed inside the first render, after the base stage's compile
        with pytest.raises(ValueError, match=f"tile_pixels {tile!r}: give a whole number of pixels >= 64"):
            jaxdiff.load_pipeline(sd_folder, upscaler="none", tile_pixels=tile)


def test_a_run_width_given_alone_keeps_the_native_height(sd_folder):
    """A run given only a width renders text-to-image at that width and the model's native
    height (README: left out, a side is the native size), not a square of the width."""
    wide = jaxdiff.load_pipeline(sd_folder, upscaler="none", steps=STEPS, sampler="ddim", width=32, batch_size=1)
    tall = jaxdiff.load_pipeline(sd_folder, upscaler="none", steps=STEPS, sampler="ddim", height=32, batch_size=1)
    native = wide.native_size
    assert native != 32
    for pipe, size in ((wide, (32, native)), (tall, (native, 32))):
        prepared = pipe.prepare(jaxdiff.Sample(id="s", prompt="a"))
        assert (prepared.width, prepared.height) == size


@pytest.mark.faults
def test_render_refuses_lists_that_do_not_match_the_prompts(pipe):
    with pytest.raises(ValueError, match="prompts is one string"):
        pipe.render("ab")  # not the prompts "a" and "b"
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        pipe.render(["a"], seeds=[1, 2])  # the second seed was dropped
    with pytest.raises(ValueError, match="1 negative_prompts for 2 prompts"):
        pipe.render(["a", "b"], negative_prompts=["x"])  # an IndexError
    with pytest.raises(ValueError, match="negative_prompts is one string"):
        pipe.render(["a", "b"], negative_prompts="bw")  # one character a prompt
    with pytest.raises(ValueError, match="ids is one string"):
        pipe.render(["a", "b"], ids="xy")
    with pytest.raises(ValueError, match=r"seed= is given per prompt here: pass seeds=\[...\]"):
        pipe.render(["a"], seed=5)  # a TypeError: Sample() got multiple values for 'seed'
    with pytest.raises(ValueError, match="negative_prompt= is given per prompt"):
        pipe.render(["a"], negative_prompt="blurry")


@pytest.mark.faults
def test_prompts_that_are_not_text_are_refused_before_anything_renders(pipe, monkeypatch):
    # Before, the batches ahead of a bad prompt rendered, then the error named its place in its batch.
    monkeypatch.setattr(pipe, "_render_batch", lambda *args: pytest.fail("a batch rendered before the check"))
    with pytest.raises(ValueError, match=r"render: prompts\[3\] is None: give text"):
        pipe.render(["a", "b", "c", None], seeds=[1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"render: prompts\[0\] is 123: give text"):
        pipe.render([123])
    with pytest.raises(ValueError, match=r"render: negative_prompts\[1\] is 3: give text"):
        pipe.render(["a", "b"], negative_prompts=["", 3])
    monkeypatch.undo()
    # None is the run's negative prompt, as a Sample takes it.
    assert pipe.render(["a"], seeds=[1], negative_prompts=[None])[0].error is None
    (number,) = pipe.render_samples([jaxdiff.Sample(id="n", prompt=7, seed=1)])
    assert number.error == "prompt is 7: give text"


@pytest.mark.faults
def test_whole_numbers_of_any_type_are_taken_and_fractions_or_text_refused_by_name(pipe, sd_folder):
    import jax.numpy as jnp

    one = pipe.render(["a"], seeds=[1])[0]
    for seeds in ([1.0], [np.int64(1)], np.array([1]), jnp.array([1]), [np.array(1)]):  # jax.random gives arrays
        again = pipe.render(["a"], seeds=seeds)[0]
        assert again.metadata["seed"] == 1
        np.testing.assert_array_equal(again.image, one.image)
    with pytest.raises(ValueError, match=r"render: seeds\[0\] is 1.7: give whole numbers in \[0, 2\*\*32\)"):
        pipe.render(["a"], seeds=[1.7])  # rendered with seed 1
    with pytest.raises(ValueError, match="render: seeds is 1: give a list, one per prompt"):
        pipe.render(["a"], seeds=1)  # a TypeError from len()
    (sized,) = pipe.render(["a"], seeds=[1], width=16.0, steps=np.int64(STEPS))  # width 16.0: a TypeError
    np.testing.assert_array_equal(sized.image, one.image)
    steps, guidance, seed = pipe.render_samples([jaxdiff.Sample(id="s", prompt="a", steps="4"),
                                                 jaxdiff.Sample(id="g", prompt="a", guidance="7"),
                                                 jaxdiff.Sample(id="f", prompt="a", seed=1.5)])
    assert "steps is '4': give a whole number" in steps.error
    assert "guidance is '7': give a number >= 0" in guidance.error
    assert "seed is 1.5: give a whole number" in seed.error
    with pytest.raises(ValueError, match=r"devices\[0\] is 0: give jax.Device objects"):
        jaxdiff.load_pipeline(sd_folder, upscaler="none", devices=[0])  # an AttributeError


@pytest.mark.faults
def test_true_and_false_are_not_numbers_and_numpy_integers_are(pipe):
    """A bool given for a number (steps=True, guidance=True, a seed of True) is refused by
    name rather than rendered as 1, as is a seed past uint32 in seeds= (before anything
    renders); numpy integers (np.int64(7), what a DataFrame column holds) are taken as numbers."""
    errors = [pipe.render_samples([jaxdiff.Sample(id=k, prompt="a", **{k: True}) for k in ("steps", "guidance")]),
              pipe.render_samples([jaxdiff.Sample(id="s", prompt="a", seed=True)])]
    (steps, guidance), (seed,) = errors
    assert steps.error == "steps is True: give a whole number (an int), not text or a fraction"
    assert guidance.error == "guidance is True: give a number >= 0, e.g. guidance=7.5"
    assert seed.error == "seed is True: give a whole number (an int), not text or a fraction"
    with pytest.raises(ValueError, match=r"render: seeds\[0\] is True: give whole numbers"):
        pipe.render(["a"], seeds=[True])
    with pytest.raises(ValueError, match=r"render: seeds\[0\] is 4294967296: give whole numbers in \[0, 2\*\*32\)"):
        pipe.render(["a"], seeds=[2**32])  # one past uint32: refused before anything renders
    prepared = pipe.prepare(jaxdiff.Sample(id="n", prompt="a", guidance=np.int64(7)))
    assert prepared.guidance == 7.0 and type(prepared.guidance) is float
    img = pipe.prepare(jaxdiff.Sample(id="i", prompt="a", mode="img2img", init_image=_rgb(1), strength=np.int64(1)))
    assert img.strength == 1.0


@pytest.mark.faults
def test_unknown_keywords_are_refused_by_the_function_taking_them_with_the_closest_one(sd_folder, pipe):
    # Before: TypeErrors from RenderSettings.__init__ and Sample.__init__.
    with pytest.raises(TypeError, match=r"^load_pipeline\(\) got an unknown keyword stpes=: did you mean steps=\?$"):
        jaxdiff.load_pipeline(sd_folder, upscaler="none", stpes=4)
    with pytest.raises(TypeError, match=r"^render\(\) got an unknown keyword guidence=: did you mean guidance=\?$"):
        pipe.render(["a"], seeds=[1], guidence=3)
    with pytest.raises(TypeError, match=r"unknown keyword num_inference_steps=: it takes guidance, height, ids"):
        pipe.render(["a"], seeds=[1], num_inference_steps=3)


@pytest.mark.faults
def test_load_pipeline_refuses_a_model_in_the_wrong_role(sd_folder, upscaler_folder):
    with pytest.raises(ValueError, match="is an x4 upscaler, not a base model"):
        jaxdiff.load_pipeline(upscaler_folder, upscaler="none")  # rendered, then failed on a UNet shape
    with pytest.raises(ValueError, match=r"is not an x4 upscaler \(its UNet takes 4 input channels"):
        jaxdiff.load_pipeline(sd_folder, upscaler=sd_folder)  # failed on noise_level ... max_noise_level None
    with pytest.raises(ValueError, match="model is empty"):
        jaxdiff.load_pipeline("")  # loaded the shipped model


def test_a_variant_the_upscaler_lacks_loads_its_plain_files(sd_folder, upscaler_folder, tmp_path):
    import shutil

    from diffusers import StableDiffusionPipeline

    # A base with fp16 files, the x4 without (as the shipped one): the run loads both.
    base = str(tmp_path / "sd")
    shutil.copytree(sd_folder, base)
    StableDiffusionPipeline.from_pretrained(sd_folder).to(torch.float16).save_pretrained(
        base, variant="fp16", safe_serialization=True)
    pipe = jaxdiff.load_pipeline(base, upscaler=upscaler_folder, variant="fp16", steps=2, upscale_steps=2,
                                 batch_size=1)
    info = pipe.describe()
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in info["base"]["sha256"]
    assert "unet/diffusion_pytorch_model.safetensors" in info["upscaler"]["sha256"]
    # Neither folder has the variant: refused, naming the file it lacks.
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bf16\.safetensors .*variant 'bf16'"):
        jaxdiff.load_pipeline(base, upscaler=upscaler_folder, variant="bf16")


def test_the_outpaint_canvas_repeats_the_photos_edge_pixels():
    from jaxdiff.engine import images

    photo = _rgb(5, 8)[:6]  # 6 rows, 8 columns
    canvas, _ = images.outpaint_canvas(photo, (3, 2, 5, 4))
    assert canvas.shape == (12, 16, 3)
    np.testing.assert_array_equal(canvas[2:8, 3:11], photo)
    np.testing.assert_array_equal(canvas[:2, 3:11], np.broadcast_to(photo[:1], (2, 8, 3)))
    np.testing.assert_array_equal(canvas[8:, 3:11], np.broadcast_to(photo[-1:], (4, 8, 3)))
    np.testing.assert_array_equal(canvas[:, :3], np.broadcast_to(canvas[:, 3:4], (12, 3, 3)))
    np.testing.assert_array_equal(canvas[:, 11:], np.broadcast_to(canvas[:, 10:11], (12, 5, 3)))


def test_init_images_scale_to_minus_one_to_one_and_masks_sample_the_latent_grid_as_in_diffusers():
    from PIL import Image
    from diffusers.image_processor import VaeImageProcessor

    from jaxdiff.engine import images

    levels = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=-1)
    unit = images.to_unit_range(levels)
    assert (unit.min(), unit.max()) == (-1.0, 1.0)
    np.testing.assert_allclose(unit, _nhwc(VaeImageProcessor().preprocess(Image.fromarray(levels)))[0], atol=1e-6)
    # The latent mask is the pixel mask at torch's nearest interpolation, as diffusers' inpaint
    # pipeline downsizes it: random masks, so no cell boundary hides an offset.
    rng = np.random.default_rng(0)
    for factor in (2, 4, 8):
        mask = (rng.random((48, 32, 1)) < 0.5).astype(np.float32)
        theirs = torch.nn.functional.interpolate(torch.from_numpy(mask[None, ..., 0][None]),
                                                 size=(48 // factor, 32 // factor))
        np.testing.assert_array_equal(images.latent_mask(mask, factor)[..., 0], theirs[0, 0].numpy())


def test_float_and_transparent_init_image_arrays_convert_as_diffusers_and_pil_do():
    """An init image given as floats in [0, 1] is the uint8 image diffusers' numpy_to_pil
    makes of it (rounded to the nearest level, not cut down), an RGBA array shows its
    transparent pixels white, as its PIL image composited onto white does, and floats
    outside [0, 1] (the VAE's [-1, 1], or 0-255) are refused instead of wrapping round."""
    from PIL import Image
    from diffusers.image_processor import VaeImageProcessor

    from jaxdiff.engine import images

    floats = np.random.default_rng(1).random((8, 8, 3))
    np.testing.assert_array_equal(images.rgb_array(floats), np.asarray(VaeImageProcessor.numpy_to_pil(floats)[0]))
    rgba = np.random.default_rng(2).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    white = Image.new("RGBA", (8, 8), "white")
    composited = Image.alpha_composite(white, Image.fromarray(rgba, "RGBA")).convert("RGB")
    np.testing.assert_array_equal(images.rgb_array(rgba), np.asarray(composited))
    assert images.rgb_array(rgba)[0, 0].tolist() == [255, 255, 255]
    for bad in (floats * 2 - 1, floats * 255):
        with pytest.raises(ValueError, match=r"init_image of dtype float64: give uint8 \(0-255\) or floats in \[0, 1\]"):
            images.rgb_array(bad)


def test_sixteen_bit_pil_images_in_either_mode_scale_to_eight_bits():
    """A 16-bit grey image given as a PIL image scales to 8 bits whether Pillow holds it as
    I;16 or as 32-bit I (how older Pillows and some TIFFs open 16-bit grey): mid-grey stays
    mid-grey instead of clipping to white."""
    from PIL import Image

    from jaxdiff.engine import images

    levels = np.array([[0, 1000, 16384, 32768, 49152, 65535]], np.uint16)
    expected = np.array([[0, 4, 64, 128, 191, 255]], np.uint8)
    for image in (Image.fromarray(levels), Image.fromarray(levels.astype(np.int32))):
        assert image.mode in ("I;16", "I")
        np.testing.assert_array_equal(images.mask_array(image), expected)
        np.testing.assert_array_equal(images.rgb_array(image), np.repeat(expected[..., None], 3, axis=-1))


def test_images_round_to_uint8_as_diffusers_postprocess_does():
    import jax.numpy as jnp
    from diffusers.image_processor import VaeImageProcessor

    from jaxdiff.engine.programs import to_uint8

    # Each level, and a third and two thirds of a level past it, from past black to past white.
    ramp = ((np.arange(-10, 266)[:, None] + [0.0, 0.3, 0.7]).ravel() / 127.5 - 1.0).astype(np.float32)
    ours = np.asarray(to_uint8(jnp.asarray(ramp)))
    as_image = torch.from_numpy(ramp).reshape(1, 1, 1, -1).expand(1, 3, 1, -1)
    theirs = np.asarray(VaeImageProcessor().postprocess(as_image, output_type="pil")[0])[0, :, 0]
    np.testing.assert_array_equal(ours, theirs)
    assert ours.dtype == np.uint8 and (ours.min(), ours.max()) == (0, 255)


def test_an_image_taller_than_a_tile_but_narrower_decodes_in_tiles(pipe):
    """tile_pixels bounds each side: a tall, narrow image decodes in tiles as a large square
    one does, not whole (which needs the memory tiling is there to save)."""
    from flax import nnx

    from jaxdiff.engine.programs import decode_latents

    vae = pipe.base.vae  # 2x: 6x2 latents are 12x4 pixels, over a tile of 8 on one side only
    z = np.random.default_rng(1).standard_normal((1, 6, 2, 4)).astype(np.float32)
    got = np.asarray(decode_latents(vae, z, 1.0, 8))
    np.testing.assert_allclose(got, np.asarray(vae.tiled_decode(z, tile_latent=4)), atol=1e-6)
    whole = nnx.jit(lambda vae, z: vae.decode(z))(vae, z)  # jitted: faster than op by op here
    assert np.abs(got - np.asarray(whole)).max() > 1e-2  # the tiles did change it


def test_outpaint_repaints_every_latent_cell_that_holds_new_pixels():
    from jaxdiff.engine import images

    # 20 px wide + 12 on the right = 32: columns 16..19 share a latent cell (8 px) with new ones;
    # 4 new rows on top share the first row of cells with 4 of the image's.
    canvas, mask = images.outpaint_canvas(np.zeros((20, 20, 3), np.uint8), (0, 4, 12, 0), factor=8)
    assert canvas.shape == (24, 32, 3)
    latents = images.latent_mask(images.binary_mask(mask, 32, 24), 8)[..., 0]
    np.testing.assert_array_equal(latents, [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]])  # 1 = repaint


@pytest.mark.faults
def test_image_inputs_of_other_kinds_convert_or_fail_per_sample(pipe):
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    init = _rgb(3)
    as_uint8, as_bool, as_float = pipe.render_samples([
        jaxdiff.Sample(id=k, prompt="a", seed=1, mode="inpaint", init_image=init, mask=m)
        for k, m in (("u8", mask), ("bool", mask > 0), ("float", mask / 255.0))])
    assert as_uint8.error is None
    np.testing.assert_array_equal(as_bool.image, as_uint8.image)
    np.testing.assert_array_equal(as_float.image, as_uint8.image)
    bad_shape, bad_pads, good = pipe.render_samples([
        jaxdiff.Sample(id="s", prompt="a", mode="img2img", init_image=np.zeros((16, 16, 5), np.uint8)),
        jaxdiff.Sample(id="p", prompt="a", mode="outpaint", init_image=init, outpaint=(-4, 0, 4, 0)),
        jaxdiff.Sample(id="g", prompt="a", seed=1)])
    assert "init_image of shape (16, 16, 5)" in bad_shape.error
    assert "whole numbers >= 0" in bad_pads.error and good.error is None


def test_colour_and_transparent_mask_arrays_read_as_their_mask_files_do(tmp_path):
    """A mask given as an RGB or RGBA array is the mask its PNG file gives in a manifest: an
    RGB one by its grey levels (not one channel), an RGBA one with transparent pixels kept
    whatever colour they store; floats past [0, 1] are refused, not wrapped round."""
    from PIL import Image

    from jaxdiff.engine import images
    from pipelines.manifest import load_mask

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    rgba = np.full((8, 8, 4), 255, np.uint8)
    rgba[..., 3] = 0
    rgba[2:6, 2:6, 3] = 255  # white strokes on a transparent, white-storing layer
    for name, array, mode in (("rgb", rgb, "RGB"), ("rgba", rgba, "RGBA")):
        Image.fromarray(array, mode).save(tmp_path / f"{name}.png")
        np.testing.assert_array_equal(images.mask_array(array), load_mask(str(tmp_path / f"{name}.png")))
    np.testing.assert_array_equal(images.mask_array(rgb), np.asarray(Image.fromarray(rgb).convert("L")))
    assert images.mask_array(rgba)[0, 0] == 0 and images.mask_array(rgba)[3, 3] == 255
    with pytest.raises(ValueError, match=r"mask of dtype float64: give uint8 \(255 = repaint\), bools or floats"):
        images.mask_array(np.full((8, 8), 255.0))


@pytest.mark.faults
def test_pil_images_are_read_as_decoded_files_are_and_paths_are_refused(pipe):
    from PIL import Image

    init = _rgb(3)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    palette = Image.fromarray(init).convert("P")  # read by np.asarray as palette indices, a grey image
    as_array, as_pil = pipe.render_samples([
        jaxdiff.Sample(id=k, prompt="a", seed=1, mode="inpaint", init_image=image, mask=m)
        for k, image, m in (("array", np.asarray(palette.convert("RGB")), mask),
                            ("pil", palette, Image.fromarray(mask).convert("P")))])
    assert as_array.error is None
    np.testing.assert_array_equal(as_pil.image, as_array.image)
    path, mask_path = pipe.render_samples([
        jaxdiff.Sample(id="p", prompt="a", mode="img2img", init_image="photo.png"),
        jaxdiff.Sample(id="m", prompt="a", mode="inpaint", init_image=init, mask="mask.png")])
    assert "init_image is 'photo.png', a path: the Python API takes arrays or PIL images" in path.error
    assert "mask is 'mask.png', a path" in mask_path.error


def test_a_mask_of_the_init_images_aspect_ratio_is_resized_with_it_in_the_api_and_the_manifest(pipe, tmp_path):
    # A mask at half the photo's size (or a pixel off, from rounding) is resized with the
    # photo to the render size, by the one rule the manifest job applies too. Here the half
    # mask is at the render size, so its full-size twin, resized down, must give the same
    # mask at render size, and so the same image.
    from PIL import Image

    from jaxdiff.engine import images
    from pipelines.manifest import RenderDefaults, plan_shards, read_shard, to_samples

    photo = np.random.default_rng(5).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    half = np.zeros((8, 16), np.uint8)
    half[2:6, 4:12] = 255
    full = np.repeat(np.repeat(half, 2, axis=0), 2, axis=1)
    rounded = half[:, :15]  # 15x8 for a 32x16 photo: one side rounded down
    size = {"width": 16, "height": 8}
    samples = [jaxdiff.Sample(id=k, prompt="a", seed=1, mode="inpaint", init_image=photo, mask=m, **size)
               for k, m in (("full", full), ("half", half), ("rounded", rounded))]
    for name, array in (("photo", photo), ("full", full), ("half", half)):
        Image.fromarray(array).save(tmp_path / f"{name}.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"m-{k}", "prompt": "a", "seed": 1, "mode": "inpaint",
                                            "init_image": "photo.png", "mask": f"{k}.png", **size}) + "\n"
                                for k in ("full", "half")))
    records = [r for shard in plan_shards([str(manifest)], 10) for r in read_shard(shard)]
    defaults = RenderDefaults(steps=STEPS, sampler="ddim", guidance=7.5, size_multiple=pipe.size_multiple)
    from_manifest = [to_samples(r, defaults)[0] for r in records]
    prepared = pipe.prepare_all(samples + from_manifest)
    assert not [p for p in prepared if isinstance(p, jaxdiff.engine.RenderError)], prepared
    full_p, half_p, rounded_p, m_full, m_half = prepared
    np.testing.assert_array_equal(half_p.mask, images.binary_mask(half, 16, 8))
    np.testing.assert_array_equal(rounded_p.mask, images.binary_mask(rounded, 16, 8))
    assert set(np.unique(rounded_p.mask)) == {0.0, 1.0}  # resized, still a mask
    for p in (full_p, m_full, m_half):
        np.testing.assert_array_equal(p.mask, half_p.mask)
    results = pipe.render_samples(prepared)
    assert all(r.error is None for r in results), [r.error for r in results]
    for r in results[:2] + results[3:]:
        np.testing.assert_array_equal(r.image, results[0].image)


def test_init_images_and_masks_resize_to_the_render_size_as_diffusers_does(pipe):
    """A photo and its mask rendered at another size are resized as diffusers' inpaint
    pipeline resizes them: the photo with Lanczos, the mask with Lanczos and then cut at
    half (its mask processor), so the repainted area is the one the user drew."""
    from PIL import Image
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(6)
    photo = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    mask = np.where(rng.random((24, 40)) < 0.5, 255, 0).astype(np.uint8)
    prepared = pipe.prepare(jaxdiff.Sample(id="p", prompt="a", mode="inpaint", init_image=photo, mask=mask,
                                           width=20, height=12))
    image = VaeImageProcessor(vae_scale_factor=pipe.vae_factor).preprocess(Image.fromarray(photo), height=12,
                                                                           width=20)
    np.testing.assert_allclose(prepared.image, _nhwc(image)[0], atol=1e-6)
    mask_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_factor, do_normalize=False, do_binarize=True,
                                       do_convert_grayscale=True)
    theirs = mask_processor.preprocess(Image.fromarray(mask), height=12, width=20)
    np.testing.assert_array_equal(prepared.mask, _nhwc(theirs)[0])


@pytest.mark.faults
def test_a_mask_of_another_aspect_ratio_is_refused_naming_both_sizes(pipe):
    photo = _rgb(3)[:8]  # 16x8
    square, rotated, good = pipe.render_samples([
        jaxdiff.Sample(id="s", prompt="a", mode="inpaint", init_image=photo, mask=np.zeros((8, 8), np.uint8)),
        jaxdiff.Sample(id="r", prompt="a", mode="inpaint", init_image=photo, mask=np.zeros((16, 8), np.uint8)),
        jaxdiff.Sample(id="g", prompt="a", seed=1, mode="inpaint", init_image=photo,
                       mask=np.zeros((4, 8), np.uint8))])
    assert square.error.startswith("mask is 8x8 but init_image is 16x8, another aspect ratio: give a mask of "
                                   "the init image's size (16x8) or aspect ratio (e.g. 8x4)")
    assert "mask is 8x16 but init_image is 16x8" in rotated.error
    assert good.error is None


def test_the_mask_size_rule_allows_a_pixel_of_rounding_on_the_shorter_side():
    from jaxdiff.engine.images import mask_size_problem

    for mask in ((768, 512), (384, 256), (383, 256), (385, 256), (384, 255), (1536, 1024), (192, 128)):
        assert mask_size_problem(*mask, 768, 512) is None, mask
        assert mask_size_problem(768, 512, *mask) is None, mask  # the same either way round
    for mask in ((384, 254), (381, 256), (512, 768), (768, 768), (0, 0)):
        problem = mask_size_problem(*mask, 768, 512)
        assert problem.startswith(f"mask is {mask[0]}x{mask[1]} but init_image is 768x512, another aspect ratio")
    assert mask_size_problem(300, 100, 768, 512, mask="mask m.png", image="init_image p.png") == (
        "mask m.png is 300x100 but init_image p.png is 768x512, another aspect ratio: give a mask of the init "
        "image's size (768x512) or aspect ratio (e.g. 300x200); it is resized with the image to the render size")


@pytest.mark.faults
def test_inputs_the_mode_does_not_use_are_refused_not_ignored(pipe):
    init, mask = _rgb(3), np.full((16, 16), 255, np.uint8)
    # Each rendered text-to-image, as if the input had not been given.
    results = pipe.render(["a"] * 5, seeds=[1] * 5, init_image=init, strength=0.5)
    assert all("init_image given but mode is txt2img: pass mode='img2img'" in r.error for r in results)
    strength, mask_txt, mask_img, pads = pipe.render_samples([
        jaxdiff.Sample(id="s", prompt="a", strength=0.5),
        jaxdiff.Sample(id="m", prompt="a", mask=mask),
        jaxdiff.Sample(id="i", prompt="a", mode="img2img", init_image=init, mask=mask),
        jaxdiff.Sample(id="o", prompt="a", mode="inpaint", init_image=init, mask=mask, outpaint=(8, 0, 0, 0))])
    assert "strength given but mode is txt2img" in strength.error
    assert "mask given but mode is txt2img: masks are for mode='inpaint'" in mask_txt.error
    assert "mask given but mode is img2img" in mask_img.error
    assert "outpaint given but mode is inpaint: pass mode='outpaint'" in pads.error


def test_sketch_is_img2img_at_the_sketch_strength_and_outpaint_is_inpaint_on_the_canvas(latent_pipe):
    # Sketch: img2img from the drawing at sketch_strength (0.8). Outpaint: inpaint of the
    # photo on a canvas of its edge pixels, every latent cell (2 px) holding new pixels masked.
    # Latents compared: the tiny VAE decodes even another drawing to within a few levels.
    sketch = np.full((16, 16, 3), 255, np.uint8)
    sketch[4:12, 8] = 0
    photo = _rgb(3, 8)
    canvas = np.pad(photo, ((0, 8), (4, 4), (0, 0)), mode="edge")
    mask = np.full((16, 16), 255, np.uint8)
    mask[:8, 4:12] = 0
    samples = [
        jaxdiff.Sample(id="o", prompt="a", seed=1, mode="outpaint", init_image=photo, outpaint=(4, 0, 4, 8)),
        jaxdiff.Sample(id="p", prompt="a", seed=1, mode="inpaint", init_image=canvas, mask=mask),
        jaxdiff.Sample(id="s", prompt="a", seed=1, mode="sketch", init_image=sketch),
        jaxdiff.Sample(id="i", prompt="a", seed=1, mode="img2img", init_image=sketch, strength=0.8),
        jaxdiff.Sample(id="x", prompt="a", seed=1, mode="img2img", init_image=255 - sketch, strength=0.8)]
    results = _latent_results(latent_pipe.render_samples, samples)
    assert [r.error for r in results] == [None] * 5
    out, inpainted, sk, img2img, other = (r.image for r in results)
    assert results[0].metadata["outpaint"] == [4, 0, 4, 8] and out.shape == (8, 8, 4)  # the 16x16 canvas
    np.testing.assert_array_equal(out, inpainted)
    assert results[2].metadata["strength"] == 0.8 and "outpaint" not in results[2].metadata
    np.testing.assert_array_equal(sk, img2img)
    assert np.abs(other - img2img).max() > SEEN  # the drawing counts


def test_each_image_mode_without_a_strength_gets_its_documented_default(pipe):
    """A sample that gives no strength renders at its mode's default: img2img at 0.75 (the
    documented --strength default), sketch at 0.8, inpaint and outpaint at diffusers'
    inpaint default (1.0: the masked area starts from pure noise)."""
    import inspect

    from diffusers import StableDiffusionInpaintPipeline

    inpaint_default = inspect.signature(StableDiffusionInpaintPipeline.__call__).parameters["strength"].default
    photo, mask = _rgb(3), np.full((16, 16), 255, np.uint8)
    strengths = {mode: pipe.prepare(jaxdiff.Sample(id=mode, prompt="p", mode=mode, init_image=photo, **extra))
                 for mode, extra in (("img2img", {}), ("sketch", {}), ("inpaint", {"mask": mask}),
                                     ("outpaint", {"outpaint": (8, 0, 0, 0)}))}
    assert {mode: p.strength for mode, p in strengths.items()} == {
        "img2img": 0.75, "sketch": 0.8, "inpaint": inpaint_default, "outpaint": inpaint_default}
    assert not strengths["inpaint"].init_flag and strengths["img2img"].init_flag


def test_samples_given_one_photo_share_its_prepared_image(pipe):
    # A manifest record's variants (num_images) share one init image: prepared once, not
    # once per variant (a 2048 px render holds 48 MiB of float32 per copy).
    photo = _rgb(3)
    a, b, wide, bad = pipe.prepare_all([
        jaxdiff.Sample(id="a", prompt="p", mode="img2img", init_image=photo),
        jaxdiff.Sample(id="b", prompt="p", mode="img2img", init_image=photo),
        jaxdiff.Sample(id="w", prompt="p", mode="img2img", init_image=photo, width=32),
        jaxdiff.Sample(id="x", prompt="p", mode="img2img", init_image=photo, strength=2.0)])
    assert a.image is b.image and a.seed != b.seed and not a.image.flags.writeable
    assert wide.image.shape == (32, 32, 3) and isinstance(bad, jaxdiff.engine.RenderError)  # the photo is square
    alone = pipe.prepare(jaxdiff.Sample(id="c", prompt="p", mode="img2img", init_image=photo))
    assert alone.image is not a.image  # nothing kept between calls
    np.testing.assert_array_equal(alone.image, a.image)


def test_samples_given_one_photo_with_another_mask_or_mode_get_their_own_mask(pipe):
    """Samples sharing a photo share its prepared image only where their masks and modes
    agree too: an inpaint sample with another mask repaints its own area, and an img2img
    sample of the same photo repaints everywhere, whatever came before it in the call."""
    photo = _rgb(3)
    left, right = np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8)
    left[:, :8], right[:, 8:] = 255, 255
    for order in (1, -1):
        samples = [jaxdiff.Sample(id="l", prompt="p", mode="inpaint", init_image=photo, mask=left),
                   jaxdiff.Sample(id="r", prompt="p", mode="inpaint", init_image=photo, mask=right),
                   jaxdiff.Sample(id="i", prompt="p", mode="img2img", init_image=photo)]
        prepared = {p.sample.id: p for p in pipe.prepare_all(samples[::order])}
        assert prepared["l"].mask[:, :8].all() and not prepared["l"].mask[:, 8:].any()
        assert prepared["r"].mask[:, 8:].all() and not prepared["r"].mask[:, :8].any()
        assert prepared["i"].mask is None


def test_image_modes_keep_the_photos_shape_at_the_models_scale(pipe):
    # A side not given follows the photo's aspect ratio at about the native pixel count: a
    # non-square photo is no longer squashed to the native square, and a large one does not
    # multiply the work. Given sides are taken as they are.
    m, native = pipe.size_multiple, pipe.native_size
    photo = np.random.default_rng(0).integers(0, 256, (6 * native + 3, 15 * native + 1, 3), dtype=np.uint8)
    mask = np.zeros(photo.shape[:2], np.uint8)
    for mode in ("img2img", "sketch", "inpaint"):
        prepared = pipe.prepare(jaxdiff.Sample(id="p", prompt="p", mode=mode, init_image=photo,
                                               mask=mask if mode == "inpaint" else None))
        w, h = prepared.width, prepared.height
        assert w % m == 0 and h % m == 0 and prepared.image.shape == (h, w, 3)
        assert abs(w / h - 2.5) <= 2.5 * m / h, "the photo's aspect ratio, to a multiple"
        assert 0.5 <= w * h / native ** 2 <= 1.5, "near the native pixel count"
    # One side given: the other from it at the photo's aspect ratio.
    given = pipe.prepare(jaxdiff.Sample(id="n", prompt="p", mode="img2img", init_image=photo, height=2 * m))
    assert (given.width, given.height) == (5 * m, 2 * m)
    # A panorama's long side stops at four native sides.
    panorama = pipe.prepare(jaxdiff.Sample(id="w", prompt="p", mode="img2img", init_image=photo[:2]))
    assert (panorama.width, panorama.height) == (4 * native, m)
    square = pipe.prepare(jaxdiff.Sample(id="s", prompt="p", mode="img2img", init_image=photo[:3, :3]))
    assert (square.width, square.height) == (native, native)
    assert (pipe.prepare(jaxdiff.Sample(id="x", prompt="p")).width, pipe.native_size) == (native, native)


def test_a_photos_render_width_given_alone_sets_its_height_by_the_photos_shape(pipe):
    """Given only a width, an image mode renders at the photo's aspect ratio: a wide photo
    is not made tall (the height is the given width times the photo's height / width)."""
    m = pipe.size_multiple
    photo = np.zeros((2 * m, 5 * m, 3), np.uint8)  # 5:2, wide
    prepared = pipe.prepare(jaxdiff.Sample(id="w", prompt="p", mode="img2img", init_image=photo, width=10 * m))
    assert (prepared.width, prepared.height) == (10 * m, 4 * m)
    assert prepared.image.shape == (4 * m, 10 * m, 3)


def test_a_photos_render_size_is_the_nearest_to_its_shape_not_each_side_rounded_alone():
    from jaxdiff.engine.images import size_at_aspect

    # Each side rounded alone gave 640x448 (1.43 for 1.5), 48x80 (0.6 for 0.75), 576x448.
    assert size_at_aspect(768, 512, 512, 64) == (576, 384)
    assert size_at_aspect(96, 128, 64, 16) == (48, 64)
    assert size_at_aspect(4032, 3024, 512, 64) == (512, 384)
    assert size_at_aspect(1920, 1080, 512, 64) == (704, 384)
    assert size_at_aspect(1000, 1000, 512, 64) == (512, 512)
    assert size_at_aspect(768, 512, 512, 64, given_height=512) == (768, 512)
    rng = np.random.default_rng(0)
    for width, height in rng.integers(64, 4096, (200, 2)):
        w, h = size_at_aspect(int(width), int(height), 512, 64)
        alone = 512 / np.sqrt(width * height)
        rounded = [min(2048, max(64, round(side * alone / 64) * 64)) for side in (width, height)]
        skew = lambda a, b: abs(np.log(a / b / (width / height)))
        assert w % 64 == 0 and h % 64 == 0 and max(w, h) <= 2048
        assert size_at_aspect(int(height), int(width), 512, 64) == (h, w), "its rotation, rotated"
        assert skew(w, h) <= skew(*rounded) + 1e-9, (width, height)
        if 1 / 4 <= width / height <= 4:  # past that, a side is at its shortest or longest
            assert 0.5 <= w * h / 512 ** 2 <= 1.5, (width, height)


@pytest.mark.faults
def test_outpaint_pixels_may_be_any_sequence_and_a_single_number_is_refused(pipe):
    photo = _rgb(4)
    for pads in ([8, 0, 0, 0], (8, 0, 0, 0), np.array([8, 0, 0, 0])):  # an array raised numpy's ValueError
        prepared = pipe.prepare(jaxdiff.Sample(id="o", prompt="p", mode="outpaint", init_image=photo, outpaint=pads))
        assert (prepared.width, prepared.height) == (24, 16)
    (refused,) = pipe.render_samples([jaxdiff.Sample(id="n", prompt="p", mode="outpaint", init_image=photo,
                                                     outpaint=8)])
    assert "needs `outpaint` pixels (left, top, right, bottom)" in refused.error
    m = pipe.size_multiple
    (odd,) = pipe.render_samples([jaxdiff.Sample(id="o", prompt="p", mode="outpaint", init_image=photo,
                                                 outpaint=(3, 0, 0, m))])
    assert odd.error == (f"the outpaint canvas is 19x{16 + m} (init_image 16x16 plus outpaint [3, 0, 0, {m}]): "
                         f"each side must be a multiple of {m}, e.g. outpaint [3, 0, {-19 % m}, {m}]")


@pytest.mark.faults
def test_outpaint_pixels_that_add_nothing_or_a_fraction_fail_their_sample(pipe):
    """Outpaint pixels of all zeros (nothing to paint) or fractions (8.5 pixels) fail their
    own sample, naming what to give, instead of rendering the photo unchanged or raising
    out of the whole call."""
    photo = _rgb(4)
    results = pipe.render_samples([
        jaxdiff.Sample(id=str(pads), prompt="p", mode="outpaint", init_image=photo, outpaint=pads)
        for pads in ((0, 0, 0, 0), (8.5, 0, 0, 0))])
    for result in results:
        assert ("mode outpaint needs `outpaint` pixels (left, top, right, bottom): whole numbers >= 0, not all 0; "
                f"got {result.id}") == result.error


def test_outpaint_repaints_the_photos_pixels_that_share_a_latent_cell_with_new_ones(pipe):
    """Pads that are not a multiple of the VAE's factor: the photo's edge pixels sharing a
    latent cell with new pixels are repainted too (a kept cell holds no new pixel), so no
    seam of stretched edge colour is kept."""
    f, m = pipe.vae_factor, pipe.size_multiple
    assert f > 1
    prepared = pipe.prepare(jaxdiff.Sample(id="o", prompt="p", mode="outpaint", init_image=_rgb(4),
                                           outpaint=(1, 0, m - 1, 0)))
    mask = prepared.mask[..., 0]
    assert mask.shape == (16, 16 + m)
    kept = np.zeros_like(mask, bool)
    kept[:, f:16 // f * f] = True  # the whole cells holding only the photo's columns 1 to 16
    np.testing.assert_array_equal(mask, np.where(kept, 0.0, 1.0))


def test_outpaint_pixels_given_as_whole_floats_are_taken_as_the_manifest_takes_them(pipe):
    """Outpaint pixels follow the rule of every other whole-number input: 8.0 (a float
    column, a computed pad) is 8 pixels, as a manifest's outpaint [8.0, 0, 0, 0] is, and
    True is not a pixel count."""
    photo = _rgb(4)
    for pads in ((8.0, 0, 0, 0), np.array([8.0, 0.0, 0.0, 0.0]), [np.float64(8), 0, 0, 0]):
        prepared = pipe.prepare(jaxdiff.Sample(id="o", prompt="p", mode="outpaint", init_image=photo, outpaint=pads))
        assert (prepared.width, prepared.height) == (24, 16)
    (bool_pads,) = pipe.render_samples([jaxdiff.Sample(id="b", prompt="p", mode="outpaint", init_image=photo,
                                                       outpaint=(True, 0, 0, 0))])
    assert "needs `outpaint` pixels (left, top, right, bottom): whole numbers >= 0" in bool_pads.error


def test_gpu_programs_take_cublas_gemms_and_cpu_ones_compile_at_level_1_unless_the_user_says_otherwise(
        monkeypatch):
    from jaxdiff.engine import programs

    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=2 --xla_gpu_enable_triton_gemm_int4=false")
    assert programs.compiler_options("gpu") == {"xla_gpu_enable_triton_gemm": False}
    assert programs.compiler_options("cpu") == {"xla_backend_optimization_level": 1}
    assert programs.compiler_options("tpu") is None
    for own in ("--xla_gpu_enable_triton_gemm=true", "--xla_gpu_enable_triton_gemm"):
        monkeypatch.setenv("XLA_FLAGS", f"--xla_gpu_autotune_level=2 {own}")
        assert programs.compiler_options("gpu") is None  # the user's own setting wins
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=2")
    assert programs.compiler_options("cpu") is None
    # Each kind of program is jitted with the options of the backend it runs on (built, not
    # traced: no model needed).
    jitted = []
    monkeypatch.setattr(programs, "compiler_options", lambda backend=None: {"for": backend})
    monkeypatch.setattr(programs.jax, "jit", lambda f, **kwargs: jitted.append(kwargs) or f)
    kw = dict(clip_skip=0, scaling_factor=1.0, tile_pixels=None, on_trace=lambda: None, backend="gpu")
    programs.make_base_program(None, None, programs.BaseSignature(1, 64, 64, 2, "ddim", False), **kw)
    programs.make_upscale_program(None, None, None, None, **kw)
    programs.make_encode_program(None, scaling_factor=1.0, on_trace=lambda: None, backend="gpu")
    assert jitted == [{"compiler_options": {"for": "gpu"}}] * 3


@pytest.mark.faults
def test_running_out_of_device_memory_names_the_stage_batch_size_and_the_fix(sd_folder, upscaler_folder,
                                                                             monkeypatch):
    import jax

    from jaxdiff.engine import DeviceMemoryError
    from jaxdiff.engine import pipeline as engine

    def failing(message):
        def make_program(*args, **kwargs):
            def program(*inputs):  # what XLA raises when a buffer does not fit
                raise jax.errors.JaxRuntimeError(message)
            return program
        return make_program

    up = jaxdiff.load_pipeline(sd_folder, upscaler=upscaler_folder, steps=2, sampler="ddim", upscale_steps=2,
                               batch_size=2)
    monkeypatch.setattr(engine, "make_upscale_program",
                        failing("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.21GiB.\nmore"))
    with pytest.raises(DeviceMemoryError) as info:
        up.render(["a red circle"], seeds=[1])
    message = str(info.value)
    side = up.native_size
    assert f"out of device memory in the upscale stage at batch 2, {side}x{side} (its low-res input" in message
    assert "(RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.21GiB.)" in message
    assert "lower the batch size (--batch-size, or batch_size= of load_pipeline; 2 now)" in message
    assert isinstance(info.value.__cause__, jax.errors.JaxRuntimeError)
    # Any other runtime error is XLA's own.
    monkeypatch.setattr(engine, "make_base_program", failing("INTERNAL: something else"))
    up._programs.clear()
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL: something else"):
        up.render(["a red circle"], seeds=[1])


def test_in_bfloat16_a_samples_image_is_bit_for_bit_the_same_whatever_its_neighbours_and_place(sd_folder):
    """At one batch size an image is its own, bit for bit, also in bfloat16, where another
    batch size's rounding would grow over the steps (README "Python API")."""
    pipe = jaxdiff.load_pipeline(sd_folder, upscaler="none", steps=3, sampler="dpmpp_2m", batch_size=4,
                                 dtype="bfloat16")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    target = jaxdiff.Sample(id="t", prompt="a red circle", seed=4)
    first = [target, jaxdiff.Sample(id="a", prompt="x", seed=5),
             jaxdiff.Sample(id="b", prompt="a blue square", seed=6, guidance=1.5)]
    second = [jaxdiff.Sample(id="c", prompt="two shapes", seed=7, mode="img2img", init_image=_rgb(8)),
              jaxdiff.Sample(id="d", prompt="y", seed=8, mode="inpaint", init_image=_rgb(9), mask=mask),
              jaxdiff.Sample(id="e", prompt="z", seed=9), target]
    alone = pipe.render_samples([target])[0].image  # padded with copies of itself
    assert np.array_equal(pipe.render_samples(first)[0].image, alone)
    assert np.array_equal(pipe.render_samples(second)[3].image, alone)


def _weights_only_gemms(jaxpr, derived=frozenset()) -> int:
    """GEMMs and convolutions in `jaxpr` (and the jaxprs it calls) whose operands all come
    from `derived` variables or literals: work that reads nothing but those."""
    from jax.extend.core import Literal, jaxprs_in_params

    count, derived = 0, set(derived)
    for eqn in jaxpr.eqns:
        inputs = [v for v in eqn.invars if not isinstance(v, Literal)]
        if not inputs or not all(v in derived for v in inputs):
            continue
        derived.update(eqn.outvars)
        count += eqn.primitive.name in ("dot_general", "conv_general_dilated")
        # Within a call whose inputs are all derived, its GEMMs are too.
        count += sum(_weights_only_gemms(sub, frozenset(sub.invars)) for sub in jaxprs_in_params(eqn.params))
    return count


def _loop_bodies(jaxpr):
    """(body, its loop-invariant inputs) of every scan in `jaxpr` and the jaxprs it calls."""
    from jax.extend.core import jaxprs_in_params

    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            body = eqn.params["jaxpr"].jaxpr
            yield body, body.invars[:eqn.params["num_consts"]]
        for sub in jaxprs_in_params(eqn.params):
            yield from _loop_bodies(sub)


def test_sampler_loop_computes_nothing_from_the_weights_and_text_alone(sd_folder, monkeypatch):
    """What depends on the weights and the text only (the cross attentions' keys and values,
    the upsamplers' phase kernels) runs once before the sampler's loop
    (`UNet2DConditionModel.prepare`): no GEMM or convolution in the loop reads only what
    the loop holds fixed. XLA would leave such work in every step (its loop-invariant code
    motion keeps an op whose output is larger than its input)."""
    from jaxdiff.engine import pipeline as engine
    from jaxdiff.models.unet import UNet2DConditionModel

    calls = []

    def recording(*args, **kwargs):
        program = make(*args, **kwargs)

        def run(*inputs):
            calls.append((program, inputs))
            return program(*inputs)
        return run

    make = engine.make_base_program
    monkeypatch.setattr(engine, "make_base_program", recording)

    def invariant_gemms():
        calls.clear()
        pipe = jaxdiff.load_pipeline(sd_folder, upscaler="none", steps=2, sampler="ddim", batch_size=1)
        pipe.render(["a red circle"], seeds=[1])
        (program, inputs), = calls
        bodies = list(_loop_bodies(program.trace(*inputs).jaxpr.jaxpr))
        assert len(bodies) == 1  # the sampler's scan
        return sum(_weights_only_gemms(body, frozenset(fixed)) for body, fixed in bodies)

    assert invariant_gemms() == 0
    # Without `prepare`, the same check finds them: the text's keys and values, the phases.
    monkeypatch.setattr(UNet2DConditionModel, "prepare", lambda self, context: context)
    assert invariant_gemms() > 0
