"""UNet2DConditionModel parity with diffusers (PyTorch, CPU, fp32) on tiny random configs."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxdiff.models.blocks import Attention, Upsample2D, upsample_phases
from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig, UnsupportedConfig
from jaxdiff.weights.convert import load_state_dict

diffusers = pytest.importorskip("diffusers")

# Tiny configs: small, uneven channel counts (multiples of the 8 norm groups), 3 levels.
SD1_STYLE = dict(
    sample_size=12, in_channels=4, out_channels=4, block_out_channels=(16, 24, 40),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1, norm_num_groups=8, cross_attention_dim=20, attention_head_dim=2,
)
SD2_STYLE = dict(
    sample_size=12, in_channels=4, out_channels=4, block_out_channels=(24, 40),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1, norm_num_groups=8, cross_attention_dim=28, attention_head_dim=[3, 5],
    use_linear_projection=True, upcast_attention=True, transformer_layers_per_block=2,
)
UPSCALER_STYLE = dict(
    sample_size=12, in_channels=7, out_channels=4, block_out_channels=(16, 24, 40),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1, norm_num_groups=8, cross_attention_dim=20, attention_head_dim=2,
    num_class_embeds=23, only_cross_attention=[True, True, False], use_linear_projection=True,
)


def _randomised_torch_unet(config: dict):
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        # Perturb every parameter (norm scales and biases included) so no default
        # initial value (ones, zeros) can hide a wrong mapping.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _jax_unet(torch_model, config: dict) -> UNet2DConditionModel:
    cfg = UNetConfig.from_dict(dict(torch_model.config))
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    return load_state_dict(nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))), state)


@nnx.jit
def _forward(model, sample, timesteps, context, class_labels):
    return model(sample, timesteps, context, class_labels)


def _compare(config: dict, *, height: int, width: int, timesteps, class_labels=None, tol: float,
             forward=_forward):
    torch_model = _randomised_torch_unet(config)
    model = _jax_unet(torch_model, config)
    gen = torch.Generator().manual_seed(1)
    batch = len(timesteps)
    sample = torch.randn(batch, config["in_channels"], height, width, generator=gen)
    context = torch.randn(batch, 5, config["cross_attention_dim"], generator=gen)
    t = torch.tensor(timesteps)
    labels = None if class_labels is None else torch.tensor(class_labels)
    with torch.no_grad():
        want = torch_model(sample, t, context, class_labels=labels).sample.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(forward(model, sample.numpy().transpose(0, 2, 3, 1), t.numpy(), context.numpy(),
                              None if labels is None else labels.numpy()))
    assert got.shape == want.shape
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err < tol, f"max abs error relative to output scale {err:.2e} >= {tol:.0e}"


@pytest.mark.parity
def test_gelu_is_torchs_exact_gelu():
    """GEGLU's gate (and OpenCLIP's "gelu"): torch's, in float32 to 1e-6 (the negative tail
    past -5, where GELU is under 1e-6, rounds to 0 in the erf form), and in bfloat16 within
    an ulp of torch's."""
    from jaxdiff.models.blocks import gelu

    x = np.concatenate([np.linspace(-12, 12, 2001), np.random.default_rng(0).standard_normal(4000) * 3])
    x32 = x.astype(np.float32)
    ref = torch.nn.functional.gelu(torch.from_numpy(x32)).numpy()
    np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x32))), ref, rtol=1e-6, atol=1e-6)
    x16 = torch.from_numpy(x32).to(torch.bfloat16)
    ref16 = torch.nn.functional.gelu(x16).float().numpy()
    out16 = gelu(jnp.asarray(x32, jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16
    out16 = np.asarray(out16.astype(jnp.float32))
    np.testing.assert_allclose(out16, ref16, rtol=2 ** -7, atol=1e-6)  # a bfloat16 ulp
    # Rounded once from float32, as torch does: equal on 95% of these values (jax.nn.gelu,
    # rounding each step in bfloat16, on 57%, and up to 11 ulps off).
    assert np.mean(out16 == ref16) > 0.9


@pytest.mark.parity
def test_sd1_style_matches_diffusers():
    # 1x1-conv projections, one head count for all blocks; integer and fractional timesteps.
    _compare(SD1_STYLE, height=12, width=12, timesteps=[999.0, 17.25], tol=1e-5)


@pytest.mark.parity
def test_one_pass_layer_norm_path_matches_diffusers(monkeypatch):
    """JAXDIFF_LAYER_NORM=pallas: every transformer block's three layer norms through the
    one-pass kernel (in Pallas' interpreter on the CPU; compiled on a GPU), to the same
    tolerance as the default path."""
    monkeypatch.setenv("JAXDIFF_LAYER_NORM", "pallas")
    _compare(SD1_STYLE, height=12, width=12, timesteps=[999.0, 17.25], tol=1e-5,
             forward=nnx.jit(lambda model, *args: model(*args)))


@pytest.mark.parity
def test_two_kernel_group_norm_path_matches_diffusers(monkeypatch):
    """JAXDIFF_GROUP_NORM=pallas: every group norm through the two kernels (the resnets'
    with the time embedding and SiLU inside, the transformers' and the output's), in
    Pallas' interpreter on the CPU, to the same tolerance as the default path."""
    monkeypatch.setenv("JAXDIFF_GROUP_NORM", "pallas")
    _compare(SD1_STYLE, height=12, width=12, timesteps=[999.0, 17.25], tol=1e-5,
             forward=nnx.jit(lambda model, *args: model(*args)))


@pytest.mark.parity
@pytest.mark.parametrize("config", [SD1_STYLE, UPSCALER_STYLE], ids=["sd1", "upscaler"])
def test_prepared_context_matches_diffusers(config):
    """`prepare`: the cross attentions' keys and values (the upscaler's first attentions
    attend to the context too) and the upsamplers' phase kernels computed once give
    diffusers' output, and a forward on the prepared context computes neither: two GEMMs
    fewer per cross attention, and no phase kernel."""
    labels = [3, 17] if config.get("num_class_embeds") else None

    def forward(model, sample, t, context, class_labels):
        return model(sample, t, model.prepare(context), class_labels)

    _compare(config, height=12, width=12, timesteps=[999.0, 17.25], class_labels=labels, tol=1e-5,
             forward=nnx.jit(forward))
    model = _jax_unet(_randomised_torch_unet(config), config)
    sample = jnp.zeros((2, 12, 12, config["in_channels"]))
    context, t = jnp.zeros((2, 5, config["cross_attention_dim"])), jnp.zeros((2,))
    labels = None if labels is None else jnp.asarray(labels)
    prepared = model.prepare(context)

    def dots(fn, *args):
        return sum(eqn.primitive.name == "dot_general" for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns)

    crosses = sum(isinstance(m, Attention) and m.cross for _, m in nnx.iter_graph(model))
    upsamplers = [m for _, m in nnx.iter_graph(model) if isinstance(m, Upsample2D)]
    assert crosses > 0 and upsamplers
    phase_dots = dots(lambda k: upsample_phases(k, None)[0], upsamplers[0].conv.kernel.get_value())
    assert phase_dots > 0
    assert (dots(lambda x: model(x, t, context, labels), sample) - dots(lambda x: model(x, t, prepared, labels), sample)
            == 2 * crosses + phase_dots * len(upsamplers))
    other = _jax_unet(_randomised_torch_unet(config), config)
    with pytest.raises(ValueError, match="made by another model's prepare"):
        other(sample, t, prepared, labels)


@pytest.mark.parity
def test_prepared_context_on_the_fused_geglu_path_matches_diffusers(monkeypatch):
    """JAXDIFF_GEGLU=tokamax: `prepare` folds each GEGLU's weights and the layer norms write
    its input with the channel of ones; these tiny shapes do not tile the kernel, so the
    XLA path takes that input and drops the channel again: diffusers' output, no tokamax."""
    monkeypatch.setenv("JAXDIFF_GEGLU", "tokamax")
    _compare(SD1_STYLE, height=12, width=12, timesteps=[999.0, 17.25], tol=1e-5,
             forward=nnx.jit(lambda model, sample, t, context, *rest: model(sample, t, model.prepare(context), *rest)))


@pytest.mark.parity
def test_guidance_distilled_unet_matches_diffusers():
    # LCM-distilled SD 1.5 (time_cond_proj_dim 256 there): the guidance scale enters as an
    # embedding added to the timestep's, built as diffusers' LCM pipeline builds it.
    from diffusers import LatentConsistencyModelPipeline

    from jaxdiff.models.unet import guidance_embedding

    config = dict(SD1_STYLE, time_cond_proj_dim=12)
    torch_model = _randomised_torch_unet(config)
    model = _jax_unet(torch_model, config)
    guidance = torch.tensor([8.0, 1.5])
    cond = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, guidance - 1, embedding_dim=12)
    # Angles up to 7000 rad in float32: the two frequency formulas round apart by ~1e-5.
    np.testing.assert_allclose(np.asarray(guidance_embedding(guidance.numpy(), 12)), cond.numpy(), atol=5e-5)
    gen = torch.Generator().manual_seed(1)
    sample, context = torch.randn(2, 4, 12, 12, generator=gen), torch.randn(2, 5, 20, generator=gen)
    t = torch.tensor([999.0, 259.0])
    with torch.no_grad():
        want = torch_model(sample, t, context, timestep_cond=cond).sample.numpy().transpose(0, 2, 3, 1)
        without = torch_model(sample, t, context).sample.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(nnx.jit(lambda m, *a: m(*a[:3], timestep_cond=a[3]))(
        model, sample.numpy().transpose(0, 2, 3, 1), t.numpy(), context.numpy(), cond.numpy()))
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5
    assert np.max(np.abs(want - without)) > 1e-2  # the embedding matters


@pytest.mark.parity
def test_resnet_out_scale_factor_changes_nothing_in_sd_blocks_as_in_diffusers():
    # diffusers hands it only to block types jaxdiff does not build.
    _compare(dict(SD1_STYLE, resnet_out_scale_factor=2.0), height=12, width=12, timesteps=[999.0, 17.25], tol=1e-5)


@pytest.mark.parity
@pytest.mark.parametrize("extra", [
    dict(center_input_sample=True, flip_sin_to_cos=False, freq_shift=1),
    dict(downsample_padding=0, mid_block_scale_factor=2.0, norm_eps=1e-2),
    dict(time_embedding_dim=48, timestep_post_act="silu", conv_in_kernel=5, conv_out_kernel=1),
    # Not a palindrome: the up path must take the lists reversed.
    dict(layers_per_block=[2, 1, 1], transformer_layers_per_block=[1, 2, 3], attention_head_dim=[2, 4, 5]),
    # A single bool also sets mid_block_only_cross_attention, which the SD mid block ignores.
    dict(only_cross_attention=True),
], ids=["input-and-time-features", "padding-scale-eps", "time-dim-post-act-kernels", "per-block-lists",
        "only-cross-bool"])
def test_config_fields_match_diffusers(extra):
    # Fields no published SD config varies, each set away from its default.
    _compare(dict(SD1_STYLE, **extra), height=12, width=12, timesteps=[999.0, 17.25], tol=1e-5)


@pytest.mark.parity
def test_sd2_style_matches_diffusers_on_uneven_size():
    # Per-block head counts, linear projections, two transformer layers per block; a
    # 10x13 latent is not divisible by 2, so the up path resizes to the skip's size.
    _compare(SD2_STYLE, height=10, width=13, timesteps=[500.5, 3.0], tol=1e-5)


@pytest.mark.parity
def test_upscaler_style_matches_diffusers():
    # 7 input channels (latent + low-res image), noise level as class label, the first
    # two levels' transformers attend only to the context, and no attention up top.
    _compare(UPSCALER_STYLE, height=12, width=12, timesteps=[20.0, 871.5],
             class_labels=[20, 3], tol=1e-5)


@pytest.mark.parity
def test_downsample_padding_reaches_levels_without_attention():
    """downsample_padding=0 (the asymmetric bottom-right padding) applies to every level's
    downsampler as in diffusers, also to a level without attention (as the x4 upscaler's
    first level is), so such a checkpoint renders as it was trained."""
    config = dict(SD1_STYLE, block_out_channels=(16, 24), down_block_types=("DownBlock2D",) * 2,
                  up_block_types=("UpBlock2D",) * 2, downsample_padding=0)
    _compare(config, height=12, width=12, timesteps=[999.0, 17.25], tol=1e-5)


@pytest.mark.parity
@pytest.mark.parametrize("config", [SD1_STYLE, SD2_STYLE, UPSCALER_STYLE], ids=["sd1", "sd2", "upscaler"])
def test_samples_shared_by_two_contexts_match_diffusers_cfg_batch(config):
    # CFG as diffusers runs it, each sample twice (here each beside its copy, against its
    # uncond and cond contexts). jaxdiff takes the samples once and runs the UNet's part
    # before the context once per sample: a resnet and a self attention (sd1, sd2), a whole
    # level (upscaler).
    torch_model = _randomised_torch_unet(config)
    model = _jax_unet(torch_model, config)
    gen = torch.Generator().manual_seed(2)
    sample = torch.randn(2, config["in_channels"], 10, 13, generator=gen)
    contexts = torch.randn(4, 5, config["cross_attention_dim"], generator=gen)
    t, labels = torch.tensor([999.0, 17.25]), torch.tensor([20, 3])
    kwargs = {"class_labels": labels} if "num_class_embeds" in config else {}
    with torch.no_grad():
        twice = lambda a: a.repeat_interleave(2, dim=0)
        want = torch_model(twice(sample), twice(t), contexts, **{k: twice(v) for k, v in kwargs.items()}).sample
    want = want.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(_forward(model, sample.numpy().transpose(0, 2, 3, 1), t.numpy(), contexts.numpy(),
                              labels.numpy() if kwargs else None))
    assert got.shape == want.shape == (4, 10, 13, 4)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5
    assert np.max(np.abs(got[0::2] - got[1::2])) > 1e-2  # the two contexts give two answers


def _forward_flops(model, *args) -> float:
    # As tools/bench.py counts them: XLA's attention, whole, in a lowering.
    import jax

    from tools.bench import countable_kernels
    from tools.hlo_ops import program_flops

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))
    with countable_kernels():
        return program_flops(forward.lower(state, *args).as_text(dialect="hlo"))


@pytest.mark.parametrize("config, most", [(SD1_STYLE, 0.99), (UPSCALER_STYLE, 0.95)], ids=["sd1", "upscaler"])
def test_the_part_before_the_context_runs_once_per_sample(config, most):
    # The same outputs (test above) for less work: conv_in, a resnet and a self attention
    # (sd1), or a whole level and the next one's first resnet (upscaler) run at the
    # sample batch.
    cfg = UNetConfig.from_dict(config)
    model = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 12, 12, cfg.in_channels)).astype(np.float32)
    contexts = rng.standard_normal((4, 5, 20)).astype(np.float32)
    extra = (np.array([20, 3]),) if cfg.num_class_embeds else ()
    shared = _forward_flops(model, sample, np.array([999.0, 17.0]), contexts, *extra)
    twice = lambda a: np.repeat(a, 2, axis=0)
    stacked = _forward_flops(model, twice(sample), twice(np.array([999.0, 17.0])), contexts,
                             *map(twice, extra))
    assert shared < most * stacked, (shared, stacked)


def test_three_contexts_per_sample_match_the_sample_repeated():
    # Any k, and a guidance-distilled model's embedding (per sample, like the timestep).
    cfg = UNetConfig.from_dict(dict(SD2_STYLE, time_cond_proj_dim=6))
    model = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((2, 9, 13, 4)).astype(np.float32)
    contexts = rng.standard_normal((6, 5, 28)).astype(np.float32)
    t, cond = np.array([999.0, 17.0]), rng.standard_normal((2, 6)).astype(np.float32)
    call = nnx.jit(lambda m, x, t, c, e: m(x, t, c, timestep_cond=e))
    thrice = lambda a: np.repeat(a, 3, axis=0)
    got = np.asarray(call(model, sample, t, contexts, cond))
    want = np.asarray(call(model, thrice(sample), thrice(t), contexts, thrice(cond)))
    assert got.shape == want.shape == (6, 9, 13, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parity
def test_tpu_attention_kernel_path_matches_diffusers():
    # Every attention call through Pallas' TPU flash kernel, run by its TPU interpreter
    # on the CPU; a fresh jit so no trace of the XLA path is reused.
    from jax.experimental.pallas import tpu as pltpu

    from jaxdiff.models import attention

    attention.set_attention_implementation("pallas")
    try:
        with pltpu.force_tpu_interpret_mode():
            _compare(SD1_STYLE, height=12, width=12, timesteps=[999.0, 17.25], tol=1e-5,
                     forward=nnx.jit(lambda model, *args: model(*args)))
    finally:
        attention.set_attention_implementation(None)


def test_bfloat16_model_stays_close_to_float32():
    # bf16 parameters and activations, float32 norm statistics and softmax: the output
    # must stay near the fp32 one (bf16 has ~3 significant digits; 5% of the scale).
    torch_model = _randomised_torch_unet(SD2_STYLE)
    cfg = UNetConfig.from_dict(SD2_STYLE)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    fp32 = _jax_unet(torch_model, SD2_STYLE)
    bf16 = load_state_dict(nnx.eval_shape(
        lambda: UNet2DConditionModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))), state,
        dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, 8, 8, 4), np.float32)
    context = rng.standard_normal((1, 5, 28), np.float32)
    t = np.array([321.0], np.float32)
    want = np.asarray(_forward(fp32, sample, t, context, None))
    got = _forward(bf16, sample, t, context, None)
    assert got.dtype == jnp.bfloat16
    err = np.max(np.abs(np.asarray(got, np.float32) - want)) / np.max(np.abs(want))
    assert err < 5e-2, f"bf16 error {err:.2e} relative to output scale"


# SD 1.5's attention head dims (40, 80, 160; two heads where it has eight) on a 16x16
# latent: 256, 64 and 16 tokens, and 77 text tokens. On a GPU, bfloat16 runs them on the
# kernels the engine picks there (cuDNN, head dim 160 from Hopper on).
SD15_HEAD_DIMS = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(80, 160, 320),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2,
)


@pytest.mark.parity
def test_bfloat16_at_sd15_head_dims_matches_diffusers_float32():
    """The engine's dtype on accelerators against diffusers in float32, at the head dims
    SD 1.5 attends with: within 5% of the output scale (bfloat16 through the whole UNet:
    1.9% on the CPU), with CFG's two contexts per sample as the engine passes them."""
    from jaxdiff.models import attention

    torch_model = _randomised_torch_unet(SD15_HEAD_DIMS)
    cfg = UNetConfig.from_dict(dict(torch_model.config))
    bf16 = load_state_dict(nnx.eval_shape(
        lambda: UNet2DConditionModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))),
        {k: v.numpy() for k, v in torch_model.state_dict().items()}, dtype=jnp.bfloat16)
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(4, 77, 32, generator=gen)  # each sample's two contexts, adjacent
    t = torch.tensor([999.0, 17.25])
    with torch.no_grad():
        want = torch_model(sample.repeat_interleave(2, 0), t.repeat_interleave(2), context).sample
    want = want.numpy().transpose(0, 2, 3, 1)
    paths = {attention._choose(jax.ShapeDtypeStruct((4, tokens, 2, dim), jnp.bfloat16))
             for tokens, dim in ((256, 40), (64, 80), (16, 160))}
    got = np.asarray(_forward(bf16, sample.numpy().transpose(0, 2, 3, 1), t.numpy(), context.numpy(), None),
                     np.float32)
    assert got.shape == want.shape
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err < 5e-2, f"bf16 error {err:.2e} relative to output scale on {sorted(paths)}"


def test_bfloat16_model_embeds_timesteps_in_float32():
    # bf16 holds integers in [512, 1024) only to multiples of 4: timesteps 995 and 997 are
    # both 996 there. Their sinusoids differ (the fastest turns a radian a step), so the
    # two rows must too. One level, random weights: compiled in about a second.
    import jax

    cfg = UNetConfig.from_dict(dict(block_out_channels=(8,), down_block_types=("DownBlock2D",),
                                    up_block_types=("UpBlock2D",), layers_per_block=1, norm_num_groups=4,
                                    cross_attention_dim=8, attention_head_dim=2))
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: UNet2DConditionModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.5, x.dtype),
                                             state))
    sample = np.repeat(rng.standard_normal((1, 8, 8, 4), np.float32), 2, axis=0)
    context = np.repeat(rng.standard_normal((1, 5, 8), np.float32), 2, axis=0)
    out = np.asarray(_forward(model, sample, np.array([995.0, 997.0], np.float32), context, None), np.float32)
    assert np.max(np.abs(out[0] - out[1])) > 1e-2 * np.max(np.abs(out))  # bf16 rounds to ~0.4%


def test_config_keeps_per_block_fields():
    cfg = UNetConfig.from_dict({**SD2_STYLE, "_class_name": "UNet2DConditionModel",
                                "_diffusers_version": "0.42.1", "dropout": 0.0})
    assert cfg.attention_head_dim == (3, 5)
    assert cfg.cross_attention_dim == (28, 28)
    assert cfg.only_cross_attention == (False, False)
    assert cfg.transformer_layers_per_block == (2, 2)


@pytest.mark.faults
@pytest.mark.parametrize("key, value", [
    ("down_block_types", ("CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D")),
    ("attention_head_dim", [2, 3]),
    ("mid_block_type", None),
    ("norm_num_groups", None),
    ("transformer_layers_per_block", [[1], [1], [1]]),
    ("not_a_unet_field", 1),
    ("timestep_post_act", "gelu"),  # diffusers builds it; jaxdiff has only SiLU there
    ("timestep_post_act", "mish"),
    ("conv_in_kernel", 4),
    ("conv_out_kernel", 2),
])
def test_unsupported_config_names_the_field(key, value):
    """A UNet config.json that asks for what jaxdiff does not compute (another block type,
    a time-embedding activation other than SiLU, an even conv kernel) is refused naming the
    field, not loaded and rendered with the field ignored."""
    with pytest.raises(UnsupportedConfig, match=key):
        UNetConfig.from_dict({**SD1_STYLE, key: value})


def test_swish_reads_as_silu_as_in_diffusers():
    """diffusers builds SiLU for an activation named "swish": such a config loads as the
    same model, not refused."""
    from diffusers.models.activations import get_activation

    assert isinstance(get_activation("swish"), torch.nn.SiLU)
    swish = UNetConfig.from_dict({**SD1_STYLE, "act_fn": "swish", "timestep_post_act": "swish"})
    assert swish == UNetConfig.from_dict({**SD1_STYLE, "act_fn": "silu", "timestep_post_act": "silu"})
    assert swish.timestep_post_act == "silu"


# A value other than diffusers' default for each key that selects a variant jaxdiff does
# not build (SDXL's added embeddings, fourier time, spatial norms, ...). Written out, not
# read from the UNet's table, so a key dropped from the table fails here.
VARIANT_VALUES = {
    "act_fn": "gelu",
    "num_attention_heads": 4,
    "dual_cross_attention": True,
    "class_embed_type": "timestep",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "encoder_hid_dim": 768,
    "encoder_hid_dim_type": "text_proj",
    "projection_class_embeddings_input_dim": 2816,
    "class_embeddings_concat": True,
    "resnet_time_scale_shift": "scale_shift",
    "resnet_skip_time_act": True,
    "time_embedding_type": "fourier",
    "time_embedding_act_fn": "silu",
    "attention_type": "gated",
    "cross_attention_norm": "group_norm",
    "reverse_transformer_layers_per_block": [[1], [1], [1]],
}


@pytest.mark.faults
@pytest.mark.parametrize("key, value", VARIANT_VALUES.items(), ids=list(VARIANT_VALUES))
def test_each_variant_value_is_refused_naming_the_field(key, value):
    # Refused as a value jaxdiff does not support: not ignored, nor an unknown field.
    with pytest.raises(UnsupportedConfig, match=re.escape(f"UNet config: {key}={value!r} is not supported")):
        UNetConfig.from_dict({**SD1_STYLE, key: value})


def test_every_key_the_unet_accepts_at_one_value_is_checked_above():
    from jaxdiff.models.unet import _REQUIRED_VALUES

    assert sorted(VARIANT_VALUES) == sorted(_REQUIRED_VALUES)


@pytest.mark.faults
@pytest.mark.parametrize("samples, context_shape, message", [
    (1, (1, 3, 21), "encoder_hidden_states has shape"),  # width: not the config's 20
    (2, (3, 5, 20), "3 rows for 2 samples"),             # rows: not k per sample
], ids=["width", "rows"])
def test_context_of_wrong_shape_is_an_error(samples, context_shape, message):
    cfg = UNetConfig.from_dict(SD1_STYLE)
    model = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=message):
        model(np.zeros((samples, 8, 8, 4), np.float32), np.zeros((samples,)), np.zeros(context_shape, np.float32))


@pytest.mark.faults
def test_channels_first_sample_is_an_error_naming_the_layout():
    """A sample passed channels-first, as diffusers takes it, is refused with the layout
    jaxdiff expects, not run into a convolution that fails without saying why."""
    cfg = UNetConfig.from_dict(SD1_STYLE)
    model = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"sample has shape \(1, 4, 8, 8\); expected NHWC"):
        model(np.zeros((1, 4, 8, 8), np.float32), np.zeros((1,)), np.zeros((1, 3, 20), np.float32))


@pytest.mark.faults
def test_timestep_cond_for_a_model_without_a_guidance_embedding_is_an_error():
    """A guidance embedding given to a UNet that has none (not guidance-distilled) is an
    error, not dropped without a word while the caller believes it steers the render."""
    cfg = UNetConfig.from_dict(SD1_STYLE)
    model = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        model(np.zeros((1, 8, 8, 4), np.float32), np.zeros((1,)), np.zeros((1, 3, 20), np.float32),
              timestep_cond=np.zeros((1, 12), np.float32))


@pytest.mark.faults
def test_missing_class_labels_is_an_error():
    cfg = UNetConfig.from_dict(UPSCALER_STYLE)
    model = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="class_labels"):
        model(np.zeros((1, 8, 8, 7), np.float32), np.zeros((1,)), np.zeros((1, 3, 20), np.float32))


# config.json files as published (Stable Diffusion 1.5, 2.1, and the x4 upscaler).
SD15_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_CONFIG = {
    **SD15_CONFIG, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
    "only_cross_attention": False, "sample_size": 96, "upcast_attention": True,
    "use_linear_projection": True,
}
UPSCALER_CONFIG = {
    **SD15_CONFIG, "_diffusers_version": "0.8.0", "block_out_channels": [256, 512, 512, 1024],
    "cross_attention_dim": 1024,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "dual_cross_attention": False, "in_channels": 7, "num_class_embeds": 1000,
    "only_cross_attention": [True, True, True, False], "sample_size": 128,
    "use_linear_projection": True,
}


@pytest.mark.parametrize("config", [SD15_CONFIG, SD21_CONFIG, UPSCALER_CONFIG],
                         ids=["sd15", "sd21", "x4-upscaler"])
def test_published_configs_parse(config):
    cfg = UNetConfig.from_dict(config)
    assert len(cfg.attention_head_dim) == len(cfg.block_out_channels) == 4


@pytest.mark.parity
@pytest.mark.parametrize("config", [SD15_CONFIG, SD21_CONFIG, UPSCALER_CONFIG],
                         ids=["sd15", "sd21", "x4-upscaler"])
def test_published_configs_read_as_diffusers_reads_them(config):
    # These files leave out most keys (timestep_post_act, time_embedding_dim, the conv
    # kernels, ...): every field jaxdiff derives must be what diffusers' model takes from
    # the same file, defaults included (built on torch's "meta" device: no memory).
    import dataclasses

    from jaxdiff.models.unet import _REQUIRED_VALUES

    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel.from_config(config).config
    ours = UNetConfig.from_dict(config)
    blocks = len(ours.block_out_channels)
    for field in dataclasses.fields(UNetConfig):
        value = theirs[field.name]
        if isinstance(getattr(ours, field.name), tuple):  # per-block: one value for all, or a list
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,) * blocks
        assert getattr(ours, field.name) == value, f"{field.name}: {getattr(ours, field.name)!r} != {value!r}"
    # A key jaxdiff accepts at one value only means, when absent, diffusers' default.
    for key, value in _REQUIRED_VALUES.items():
        assert theirs[key] == value, key


@pytest.mark.parity
def test_full_size_upscaler_has_diffusers_parameter_count():
    # Built without memory on both sides (torch "meta" device, nnx.eval_shape); the
    # tensor count and total size must match exactly.
    with torch.device("meta"):
        torch_model = diffusers.UNet2DConditionModel(
            **{k: v for k, v in UPSCALER_CONFIG.items() if not k.startswith("_")})
    cfg = UNetConfig.from_dict(UPSCALER_CONFIG)
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    sizes = [v.get_value().size for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
    torch_sizes = [p.numel() for p in torch_model.parameters()]
    assert (len(sizes), sum(sizes)) == (len(torch_sizes), sum(torch_sizes))
