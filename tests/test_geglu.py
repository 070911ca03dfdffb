"""GEGLU's two paths: the fused kernel's inputs (bias folded into the GEMM, erf as a
rational function) against the XLA path, which tests/test_unet.py holds to diffusers.

The kernel itself (tokamax's, Hopper GPUs) runs in `tools/gpu_bench.sh geglu`, which
repeats the UNet's parity tests with JAXDIFF_GEGLU=tokamax on the card."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import geglu as geglu_module
from jaxdiff.models.blocks import gelu
from jaxdiff.models.geglu import erf_rational, fold_weights, folded_width, geglu, gelu_rational, with_ones


def test_erf_rational_matches_lax_erf_in_float32():
    x = jnp.linspace(-10.0, 10.0, 400_001, dtype=jnp.float32)
    assert float(jnp.max(jnp.abs(erf_rational(x) - jax.lax.erf(x)))) < 1e-6
    # Saturated to +-1 far out, odd, and zero at zero.
    np.testing.assert_array_equal(erf_rational(jnp.array([-30.0, 0.0, 30.0])), [-1.0, 0.0, 1.0])


def test_gelu_rational_matches_the_exact_gelu():
    x = jnp.linspace(-12.0, 12.0, 100_001, dtype=jnp.float32)
    np.testing.assert_allclose(gelu_rational(x), gelu(x), atol=2e-6, rtol=0)


def _gated_linear_unit(x, weights, activation):
    """tokamax's documented contract for fused weights (K, 2, N):
    activation(x @ weights[:, 0]) * (x @ weights[:, 1]), in float32."""
    dot = lambda w: jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)
    return activation(dot(weights[:, 0])) * dot(weights[:, 1])


@pytest.mark.parametrize("channels", [1, 63, 64, 70, 320])
def test_folded_bias_gives_the_biased_projection(channels):
    """The bias as a GEMM input: a channel of ones and the bias as its weight row, padded
    to the kernel's 64-channel steps. Gate from the projection's second half, hidden from
    its first, as diffusers splits it."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (2, 5, channels), jnp.float32)
    kernel = jax.random.normal(k2, (channels, 2 * 24), jnp.float32) / np.sqrt(channels)
    bias = jax.random.normal(k3, (2 * 24,), jnp.float32)

    x_folded, weights = with_ones(x, folded_width(channels)), fold_weights(kernel, bias)
    assert x_folded.shape[-1] % 64 == 0 and channels + 1 <= x_folded.shape[-1] < channels + 65
    assert weights.shape == (x_folded.shape[-1], 2, 24)
    projection = jnp.matmul(x, kernel, precision=jax.lax.Precision.HIGHEST) + bias
    hidden, gate = projection[..., :24], projection[..., 24:]
    np.testing.assert_allclose(_gated_linear_unit(x_folded, weights, gelu_rational),
                               hidden * gelu(gate), atol=2e-5, rtol=1e-5)


def test_folding_keeps_bfloat16_inputs_in_bfloat16():
    x = jnp.ones((4, 10), jnp.bfloat16)
    x_folded = with_ones(x, folded_width(10))
    weights = fold_weights(jnp.ones((10, 8), jnp.bfloat16), jnp.ones((8,), jnp.bfloat16))
    assert x_folded.dtype == weights.dtype == jnp.bfloat16


def test_an_unknown_geglu_path_stops_with_the_variable_named(monkeypatch):
    x, kernel, bias = jnp.ones((128, 8)), jnp.ones((8, 128)), jnp.zeros((128,))
    monkeypatch.setenv("JAXDIFF_GEGLU", "Tokamax")
    with pytest.raises(ValueError, match=r"JAXDIFF_GEGLU='Tokamax' is not one of \('xla', 'tokamax'\)"):
        geglu(x, kernel, bias)


@pytest.mark.parametrize("rows, width", [(100, 128), (128, 64)])
def test_shapes_the_kernel_does_not_tile_take_the_xla_path(monkeypatch, rows, width):
    """With the fused path asked for, rows or output columns that are not a multiple of
    the kernel's 128 are computed by XLA, as without it: no tokamax is needed."""
    monkeypatch.setenv("JAXDIFF_GEGLU", "tokamax")
    x = jax.random.normal(jax.random.key(1), (rows, 16))
    kernel, bias = jax.random.normal(jax.random.key(2), (16, 2 * width)), jnp.zeros((2 * width,))
    hidden, gate = jnp.split(x @ kernel + bias, 2, axis=-1)
    np.testing.assert_allclose(geglu(x, kernel, bias), hidden * gelu(gate), rtol=1e-6)


@pytest.mark.parametrize("path", ["xla", "tokamax"])
def test_input_with_its_channel_of_ones_gives_the_same_output(monkeypatch, path):
    """What the layer norm hands the fused path (`with_ones`) is taken on any path: a shape
    the kernel does not tile, or the XLA path, drops the channel again."""
    monkeypatch.setenv("JAXDIFF_GEGLU", path)
    x = jax.random.normal(jax.random.key(3), (100, 16))
    kernel, bias = jax.random.normal(jax.random.key(4), (16, 2 * 64)), jax.random.normal(jax.random.key(5), (128,))
    np.testing.assert_array_equal(geglu(with_ones(x, folded_width(16)), kernel, bias), geglu(x, kernel, bias))


def _hopper_gpu() -> bool:
    try:
        return any(float(d.compute_capability) >= 9.0 for d in jax.devices("gpu"))
    except (RuntimeError, AttributeError, ValueError):
        return False


@pytest.mark.parity
@pytest.mark.skipif(not _hopper_gpu(), reason="the fused kernel runs on Hopper and Blackwell GPUs "
                                              "(tools/gpu_bench.sh geglu runs this test there)")
def test_fused_kernel_matches_diffusers_geglu_on_the_gpu():
    """tokamax's kernel in bfloat16 against diffusers' GEGLU in float32, at SD 1.5's 64x64
    width: within 2% of the output scale, as close as the XLA path in bfloat16."""
    import torch
    from diffusers.models.activations import GEGLU as TorchGEGLU

    torch.manual_seed(0)
    theirs = TorchGEGLU(320, 1280).eval()
    x = torch.randn(2, 128, 320)
    with torch.no_grad():
        want = theirs(x).numpy()
    bf16 = lambda t: jnp.asarray(t.detach().numpy(), jnp.bfloat16)
    args = bf16(x), bf16(theirs.proj.weight.T), bf16(theirs.proj.bias)
    scale = np.abs(want).max()
    fused_inputs = jax.jit(lambda x, kernel, bias: (with_ones(x, folded_width(320)), fold_weights(kernel, bias)))
    fused = np.asarray(jax.jit(geglu_module.fused_geglu)(*fused_inputs(*args)), np.float32)
    with geglu_module.dispatch("xla"):
        xla = np.asarray(jax.jit(geglu)(*args), np.float32)
    assert np.abs(fused - want).max() / scale < 2e-2
    assert np.abs(fused - want).max() <= 1.5 * np.abs(xla - want).max()
