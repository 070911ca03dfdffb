"""AutoencoderKL parity with diffusers (PyTorch, CPU, fp32) on tiny random configs."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxdiff.models.unet import UnsupportedConfig
from jaxdiff.models.vae import AutoencoderKL, VAEConfig
from jaxdiff.weights.convert import load_state_dict

diffusers = pytest.importorskip("diffusers")


def _config(blocks: int) -> dict:
    # f = 2**(blocks - 1): 4 blocks is SD's f=8, 3 blocks the x4 upscaler's f=4.
    return dict(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                layers_per_block=1, block_out_channels=(8, 12, 20, 20)[:blocks],
                down_block_types=("DownEncoderBlock2D",) * blocks,
                up_block_types=("UpDecoderBlock2D",) * blocks, sample_size=32)


@functools.lru_cache(maxsize=None)
def _models(blocks: int, **overrides):
    torch.manual_seed(blocks)
    torch_model = diffusers.AutoencoderKL(**dict(_config(blocks), **overrides)).eval()
    with torch.no_grad():
        # Perturb every parameter (norm scales and biases included) so no default
        # initial value (ones, zeros) can hide a wrong mapping.
        for p in torch_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg = VAEConfig.from_dict(dict(torch_model.config))
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    model = load_state_dict(nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0))), state)
    return torch_model, model


@nnx.jit
def _encode(model, x):
    return model.encode(x)


@nnx.jit
def _decode(model, z):
    return model.decode(z)


@functools.partial(nnx.jit, static_argnames=("tile_latent", "overlap"))
def _tiled_decode(model, z, tile_latent, overlap):
    return model.tiled_decode(z, tile_latent=tile_latent, overlap=overlap)


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _relative_error(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parity
@pytest.mark.parametrize("blocks, height, width", [(4, 32, 24), (3, 20, 28)])
def test_encode_matches_diffusers(blocks, height, width):
    torch_model, model = _models(blocks)
    image = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = torch_model.encode(image).latent_dist
    mean, logvar = _encode(model, _nhwc(image))
    f = 2 ** (blocks - 1)
    assert mean.shape == (2, height // f, width // f, 4)
    tol = 1e-5  # max abs error relative to the output's scale, fp32 vs fp32
    assert _relative_error(mean, _nhwc(posterior.mean)) < tol
    assert _relative_error(logvar, _nhwc(posterior.logvar)) < tol


@pytest.mark.parity
@pytest.mark.parametrize("blocks, height, width", [(4, 4, 3), (3, 5, 7)])
def test_decode_matches_diffusers(blocks, height, width):
    torch_model, model = _models(blocks)
    z = torch.randn(2, 4, height, width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = torch_model.decode(z).sample
    got = _decode(model, _nhwc(z))
    f = 2 ** (blocks - 1)
    assert got.shape == (2, height * f, width * f, 3)
    assert _relative_error(got, _nhwc(want)) < 1e-5  # relative to the output's scale


@pytest.mark.parity
def test_vae_without_mid_attention_or_quant_convs_matches_diffusers():
    torch_model, model = _models(3, mid_block_add_attention=False, use_quant_conv=False,
                                 use_post_quant_conv=False)
    gen = torch.Generator().manual_seed(4)
    image = torch.rand(1, 3, 16, 12, generator=gen) * 2 - 1
    z = torch.randn(1, 4, 4, 3, generator=gen)
    with torch.no_grad():
        posterior = torch_model.encode(image).latent_dist
        want = torch_model.decode(z).sample
    mean, logvar = _encode(model, _nhwc(image))
    assert _relative_error(mean, _nhwc(posterior.mean)) < 1e-5
    assert _relative_error(logvar, _nhwc(posterior.logvar)) < 1e-5
    assert _relative_error(_decode(model, _nhwc(z)), _nhwc(want)) < 1e-5


@pytest.mark.parity
def test_tiled_decode_matches_diffusers_and_whole_decode():
    torch_model, model = _models(4)
    # 14x11 latents in 8-latent tiles with 2 latents of overlap (diffusers' factor 0.25):
    # full tiles plus narrower tiles at the bottom and right edges.
    z = torch.randn(1, 4, 14, 11, generator=torch.Generator().manual_seed(3))
    torch_model.enable_tiling()
    torch_model.tile_latent_min_size = 8
    torch_model.tile_sample_min_size = 8 * 8
    torch_model.tile_overlap_factor = 0.25
    with torch.no_grad():
        want_tiled = _nhwc(torch_model.decode(z).sample)
    got = _tiled_decode(model, _nhwc(z), 8, 2)
    assert got.shape == (1, 112, 88, 3)
    assert _relative_error(got, want_tiled) < 1e-5  # same tiles, same blend as diffusers

    # Against decoding at once, tiles differ by their missing context (with random weights
    # each tile's group norms see quite different statistics), so the bounds are looser:
    # mean error under 10% of the output scale, and a pixel correlation above 0.6 where a
    # misplaced tile or an unrelated image scores about 0.
    whole = np.asarray(_decode(model, _nhwc(z)))
    tiled = np.asarray(got)
    mean_error = np.mean(np.abs(tiled - whole)) / np.max(np.abs(whole))
    correlation = np.corrcoef(tiled.ravel(), whole.ravel())[0, 1]
    assert mean_error < 0.1, f"tiled vs whole decode: mean error {mean_error:.3f} of the output scale"
    assert correlation > 0.6, f"tiled vs whole decode: correlation {correlation:.2f}"


@pytest.mark.parity
def test_latents_past_a_tile_on_one_side_only_decode_in_tiles_as_diffusers_does():
    """A wide or tall image (latents longer than a tile on one side, within it on the
    other) is decoded in tiles, as diffusers' tiled decode does, not whole: whole, its
    decode would take the memory the tiles are there to save."""
    torch_model, model = _models(3)
    # 8x3 latents in 4-latent tiles: two rows of tiles, one column (no overlap, so that both
    # tiles have one shape and the decoder compiles once).
    z = torch.randn(1, 4, 8, 3, generator=torch.Generator().manual_seed(5))
    torch_model.enable_tiling()
    torch_model.tile_latent_min_size, torch_model.tile_sample_min_size = 4, 4 * 4
    torch_model.tile_overlap_factor = 0.0
    try:
        with torch.no_grad():
            want = _nhwc(torch_model.decode(z).sample)
    finally:
        torch_model.disable_tiling()
    # Tiles lack each other's context: decoded whole, the image differs by far more.
    assert _relative_error(_tiled_decode(model, _nhwc(z), 4, 0), want) < 1e-5


def test_tiled_decode_of_latents_within_one_tile_is_decode():
    _, model = _models(3)
    z = np.random.default_rng(0).standard_normal((1, 6, 5, 4)).astype(np.float32)
    got = _tiled_decode(model, z, 6, 2)
    assert _relative_error(got, _decode(model, z)) < 1e-6


@pytest.mark.parametrize("blocks, tiled", [(3, False), (4, True)])
def test_engine_tiles_decodes_by_output_pixels_whatever_the_vae_factor(blocks, tiled):
    from jaxdiff.engine.programs import decode_latents

    _, model = _models(blocks)
    z = np.random.default_rng(1).standard_normal((1, 6, 6, 4)).astype(np.float32)
    # 6 latents are 24 px at f=4 (within a 32 px tile: one decode, as diffusers' upscaler
    # pipeline does) and 48 px at f=8 (tiles of 32 px = 4 latents).
    got = nnx.jit(decode_latents, static_argnums=(2, 3))(model, z, 1.0, 32)
    want = _tiled_decode(model, z, 4, 1) if tiled else _decode(model, z)
    assert _relative_error(got, want) < 1e-6
    if tiled:
        assert _relative_error(got, _decode(model, z)) > 1e-4  # the tiles did change it


def test_a_vae_without_post_quant_conv_decodes_in_the_engine():
    from jaxdiff.engine.programs import decode_latents
    from jaxdiff.models.vae import AutoencoderKL, VAEConfig

    cfg = VAEConfig.from_dict(dict(_config(3), use_post_quant_conv=False, use_quant_conv=False))
    vae = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
    images = decode_latents(vae, np.zeros((1, 4, 4, 4), np.float32), 1.0, None)
    assert images.shape == (1, 16, 16, 3)


@pytest.mark.faults
@pytest.mark.parametrize("tile_latent, overlap, name", [(0, 0, "tile_latent"), (8, 8, "overlap"),
                                                         (8, -1, "overlap")])
def test_tiled_decode_rejects_bad_tiles(tile_latent, overlap, name):
    _, model = _models(3)
    with pytest.raises(ValueError, match=name):
        model.tiled_decode(np.zeros((1, 9, 9, 4), np.float32), tile_latent=tile_latent, overlap=overlap)


@pytest.mark.faults
@pytest.mark.parametrize("height, width", [(20, 16), (16, 20)], ids=["height", "width"])
def test_encode_rejects_size_not_multiple_of_factor(height, width):
    """An image whose height or width is not a multiple of the VAE's factor is refused with
    the fix, not encoded to latents that silently drop its last rows or columns."""
    _, model = _models(4)
    with pytest.raises(ValueError, match=f"image size {height}x{width} is not a multiple of 8"):
        model.encode(np.zeros((1, height, width, 3), np.float32))


@pytest.mark.faults
@pytest.mark.parametrize("key, value", [("down_block_types", ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")),
                                        ("act_fn", "gelu"), ("layers_per_block", [1, 2]),
                                        ("not_a_vae_field", 3),
                                        ("up_block_types", ("UpDecoderBlock2D",) * 3)])
def test_unsupported_config_names_the_field(key, value):
    """A VAE config.json jaxdiff cannot build as written (another block type or activation,
    block lists that disagree in length) is refused naming the field."""
    with pytest.raises(UnsupportedConfig, match=key):
        VAEConfig.from_dict({**_config(2), key: value})


def test_swish_reads_as_silu_as_in_diffusers():
    """diffusers' get_activation builds SiLU for "swish": such a VAE config loads."""
    assert VAEConfig.from_dict({**_config(2), "act_fn": "swish"}) == VAEConfig.from_dict(_config(2))


def test_config_keeps_scaling_factor():
    cfg = VAEConfig.from_dict({**_config(3), "scaling_factor": 0.08333, "force_upcast": True,
                               "_class_name": "AutoencoderKL"})
    assert cfg.scaling_factor == 0.08333
    assert cfg.downscale_factor == 4


# config.json of the Stable Diffusion 1.x / 2.x autoencoder as published.
SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


@pytest.mark.parity
def test_full_size_sd_vae_has_diffusers_parameter_count():
    # Built without memory on both sides (torch "meta" device, nnx.eval_shape).
    with torch.device("meta"):
        torch_model = diffusers.AutoencoderKL(
            **{k: v for k, v in SD_VAE_CONFIG.items() if not k.startswith("_")})
    cfg = VAEConfig.from_dict(SD_VAE_CONFIG)
    assert cfg.downscale_factor == 8 and cfg.scaling_factor == 0.18215
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    sizes = [v.get_value().size for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
    torch_sizes = [p.numel() for p in torch_model.parameters()]
    assert (len(sizes), sum(sizes)) == (len(torch_sizes), sum(torch_sizes))


@pytest.mark.parity
@pytest.mark.parametrize("height, width, output_size", [(5, 7, None), (4, 4, (8, 8)), (5, 7, (9, 13))],
                         ids=["odd-2x", "2x-asked", "other-size"])
def test_upsample_matches_diffusers_without_the_upsampled_image(height, width, output_size):
    # 2x: four 2x2 convolutions of the input (one per output phase), not a 3x3 one over
    # the image four times its size; any other size: nearest resize, then the conv.
    from diffusers.models.upsampling import Upsample2D as TorchUpsample2D

    from jaxdiff.models.blocks import Upsample2D

    torch.manual_seed(0)
    theirs = TorchUpsample2D(6, use_conv=True).eval()
    ours = Upsample2D(6, rngs=nnx.Rngs(0))
    ours.conv.kernel.set_value(jnp.asarray(theirs.conv.weight.detach().numpy().transpose(2, 3, 1, 0)))
    ours.conv.bias.set_value(jnp.asarray(theirs.conv.bias.detach().numpy()))
    x = torch.randn(2, 6, height, width)
    with torch.no_grad():
        want = theirs(x, output_size=output_size).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(ours(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), output_size))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_upsample_as_one_gemm_over_windows_is_the_same_convolution():
    """`as_gemm`: the 2x2 phase convolution as a GEMM over each output's 2x2 window gives
    the convolution's output (odd sizes, bias or none)."""
    import jax

    from jaxdiff.models.blocks import upsample_conv, upsample_phases

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (2, 5, 7, 6))
    kernel, bias = jax.random.normal(k2, (3, 3, 6, 4)), jax.random.normal(k3, (4,))
    for b in (bias, None):
        phases = upsample_phases(kernel, b)
        np.testing.assert_allclose(upsample_conv(x, *phases, as_gemm=True), upsample_conv(x, *phases),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [None, [32, 24]], ids=["none", "2x-as-a-list"])
def test_upsample_does_four_ninths_of_the_plain_convolution(size):
    import jax

    from jaxdiff.models.blocks import Upsample2D, upsample_nearest
    from tools.hlo_ops import program_flops

    up = Upsample2D(8, rngs=nnx.Rngs(0))
    x = jax.ShapeDtypeStruct((1, 16, 12, 8), jnp.float32)
    flops = lambda f: program_flops(jax.jit(f).lower(x).as_text(dialect="hlo"))
    fast, plain = flops(lambda x: up(x, size)), flops(lambda x: up.conv(upsample_nearest(x)))
    # 4 taps a pixel instead of 9, on a grid one row and column larger (17x13 vs 16x12);
    # plus summing the kernel's taps (2% here, once a call: a loop hoists it).
    assert fast == pytest.approx(plain * 4 / 9 * (17 * 13) / (16 * 12), rel=0.03)
