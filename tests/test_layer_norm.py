"""The transformer blocks' layer norm: the one-pass kernel (in Pallas' interpreter here)
against torch's layer norm, and the module's paths.

The kernel compiled for the card runs in `tools/gpu_bench.sh norm`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import triton_ir
from jaxdiff.models.geglu import folded_width, with_ones
from jaxdiff.models.layer_norm import LayerNorm, fused_layer_norm


@pytest.mark.parity
@pytest.mark.parametrize("shape", [(2, 50, 320), (3, 7, 64), (5, 1280), (1, 1, 24)])
def test_one_pass_kernel_matches_torch_layer_norm(shape):
    """Rows that do not fill the kernel's last block, channel counts that are and are not a
    power of two; tokens far from zero mean, where E[x^2] - E[x]^2 loses digits."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 40
    scale, bias = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))
    want = torch.nn.functional.layer_norm(torch.from_numpy(x), (shape[-1],), torch.from_numpy(scale),
                                          torch.from_numpy(bias), eps=1e-5).numpy()
    got = fused_layer_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), 1e-5, interpret=True)
    assert got.shape == x.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_one_pass_kernel_keeps_bfloat16_out_and_computes_in_float32():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 96)), jnp.bfloat16)
    ones, zeros = jnp.ones((96,), jnp.bfloat16), jnp.zeros((96,), jnp.bfloat16)
    got = fused_layer_norm(x, ones, zeros, 1e-5, interpret=True)
    xf = x.astype(jnp.float32)
    want = (xf - xf.mean(-1, keepdims=True)) / jnp.sqrt(xf.var(-1, keepdims=True) + 1e-5)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, want.astype(jnp.bfloat16))  # one rounding, at the end


@pytest.mark.parametrize("channels", [320, 64, 24])
def test_kernel_writes_the_fused_geglus_channel_of_ones(channels):
    """`ones_to`: the output as wide as the fused GEGLU's input, the normalised channels,
    one of ones, zeros: exactly `with_ones` of the plain output (a power-of-two width, 64,
    needs a block twice as wide)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((37, channels)), jnp.bfloat16)
    scale, bias = (jnp.asarray(rng.standard_normal(channels), jnp.bfloat16) for _ in range(2))
    width = folded_width(channels)
    got = fused_layer_norm(x, scale, bias, 1e-5, ones_to=width, interpret=True)
    assert got.shape == (37, width)
    np.testing.assert_array_equal(got, with_ones(fused_layer_norm(x, scale, bias, 1e-5, interpret=True), width))


@pytest.mark.parametrize("path", ["xla", "pallas"])
def test_module_writes_the_channel_of_ones_on_either_path(monkeypatch, path):
    monkeypatch.setenv("JAXDIFF_LAYER_NORM", path)
    norm = LayerNorm(24, epsilon=1e-5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (2, 5, 24))
    np.testing.assert_allclose(norm(x, ones_to=64), with_ones(norm(x), 64), atol=1e-6)


@pytest.mark.parametrize("rows, channels", [(100, 320), (7, 24), (64, 1280)])
def test_kernel_as_triton_runs_it_reads_and_writes_only_x(rows, channels):
    """Lowered for a GPU here, no card needed. Triton checks no bounds, and a block is padded
    to powers of two past x's last row and column: every load and store must carry a mask
    (unmasked, a 512-wide block over 320 channels writes into the next row). The
    interpreter cannot show this: it pads the arrays themselves."""
    vector = jax.ShapeDtypeStruct((channels,), jnp.bfloat16)
    for ones_to in (None, folded_width(channels)):  # also as the fused GEGLU's input, wider
        kernels = triton_ir.kernels(lambda x, s, b: fused_layer_norm(x, s, b, 1e-5, ones_to=ones_to),
                                    jax.ShapeDtypeStruct((rows, channels), jnp.bfloat16), vector, vector)
        assert list(kernels) == ["layer_norm"]
        assert triton_ir.unmasked_memory_ops(kernels["layer_norm"]) == []


@pytest.mark.parity
@pytest.mark.parametrize("mean", [0, 1000])
def test_module_has_nnx_layer_norms_parameters_and_torchs_output(monkeypatch, mean):
    """The same parameters and names as nnx.LayerNorm (checkpoints load by name); on the
    default path torch's output, also for tokens far from zero mean, where nnx.LayerNorm's
    E[x^2] - E[x]^2 loses the variance."""
    monkeypatch.delenv("JAXDIFF_LAYER_NORM", raising=False)
    ours = LayerNorm(32, epsilon=1e-5, rngs=nnx.Rngs(0))
    theirs = nnx.LayerNorm(32, epsilon=1e-5, rngs=nnx.Rngs(0))
    assert jax.tree.map(jnp.shape, nnx.state(ours)) == jax.tree.map(jnp.shape, nnx.state(theirs))
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 50, 32)) + mean).astype(np.float32)
    ours.scale[...] = theirs.scale[...] = jnp.asarray(rng.standard_normal(32), jnp.float32)
    ours.bias[...] = theirs.bias[...] = jnp.asarray(rng.standard_normal(32), jnp.float32)
    want = torch.nn.functional.layer_norm(torch.from_numpy(x), (32,), torch.from_numpy(np.asarray(ours.scale[...])),
                                          torch.from_numpy(np.asarray(ours.bias[...])), eps=1e-5).numpy()
    # float32 holds a mean near 1000 to 6e-5 of the unit deviation: that, normalised and scaled.
    np.testing.assert_allclose(ours(jnp.asarray(x)), want, atol=2e-5 if mean == 0 else 6e-4)
    if mean == 0:  # where its variance holds, nnx.LayerNorm's output
        np.testing.assert_allclose(ours(jnp.asarray(x)), theirs(jnp.asarray(x)), atol=1e-5)


def test_an_unknown_layer_norm_path_stops_with_the_variable_named(monkeypatch):
    monkeypatch.setenv("JAXDIFF_LAYER_NORM", "triton")
    with pytest.raises(ValueError, match=r"JAXDIFF_LAYER_NORM='triton' is not one of \('xla', 'pallas'\)"):
        LayerNorm(8, rngs=nnx.Rngs(0))(jnp.ones((2, 8)))


@pytest.mark.parity
@pytest.mark.skipif(not triton_ir.gpu_held(), reason="compiles the kernel for a GPU (tools/gpu_bench.sh norm runs this test there)")
@pytest.mark.parametrize("channels", [320, 640, 1280])
def test_compiled_kernel_matches_torch_on_the_gpu(channels):
    """The kernel as Triton compiles it, in bfloat16 at SD 1.5's widths, against torch's
    layer norm in float32: within bfloat16's rounding of the output (one ulp at |y| < 8)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4096 + 3, channels)).astype(np.float32) * 2 + 5
    scale, bias = (rng.standard_normal(channels).astype(np.float32) for _ in range(2))
    bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
    got = jax.jit(fused_layer_norm, static_argnums=3)(bf16(x), bf16(scale), bf16(bias), 1e-5)
    # torch on the inputs rounded to bfloat16, as the kernel sees them.
    x, scale, bias = (torch.from_numpy(np.asarray(bf16(a), np.float32)) for a in (x, scale, bias))
    want = torch.nn.functional.layer_norm(x, (channels,), scale, bias, eps=1e-5).numpy()
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.04, rtol=0.008)
    # As the fused GEGLU's input: the same channels, then ones and zeros.
    wide = jax.jit(fused_layer_norm, static_argnums=3, static_argnames="ones_to")(
        bf16(x.numpy()), bf16(scale.numpy()), bf16(bias.numpy()), 1e-5, ones_to=folded_width(channels))
    np.testing.assert_array_equal(wide, with_ones(got, folded_width(channels)))
