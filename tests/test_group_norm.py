"""Group norm: the two kernels (in Pallas' interpreter here, and as Triton IR lowered for a
GPU) against torch's group norm, and the module's paths.

The kernels compiled for the card run in `tools/gpu_bench.sh norm`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import triton_ir
from jaxdiff.models.group_norm import _CHUNK_ELEMENTS, _INSTANCES, GroupNorm, fused_group_norm


def _torch_group_norm(x, groups, scale, bias, shift=None, silu=False):
    """torch's group norm on channels-last numpy x, the shift added first, SiLU after. x goes
    in contiguous, as diffusers' models hold it: on a channels-last tensor torch's CPU kernel
    takes E[x^2] - E[x]^2, which loses the variance of a group far from zero mean."""
    if shift is not None:
        x = x + shift.reshape(shift.shape[0], *(1,) * (x.ndim - 2), shift.shape[-1])
    y = torch.nn.functional.group_norm(torch.from_numpy(x).movedim(-1, 1).contiguous(), groups,
                                       torch.from_numpy(scale), torch.from_numpy(bias), eps=1e-5)
    return (torch.nn.functional.silu(y) if silu else y).movedim(1, -1).numpy()


@pytest.mark.parity
@pytest.mark.parametrize("shape, groups, shifted, silu", [
    ((2, 9, 7, 40), 4, True, True),      # pixels that fill no power of two
    ((3, 64, 320), 32, False, False),    # tokens, as the VAE's attention norms them
    ((1, 5, 5, 24), 3, True, False),     # a group count that is not a power of two
    ((2, 33, 1280), 32, False, True),    # 40 channels a group, padded to 64
])
@pytest.mark.parametrize("chunk_elements, instances, mean, deviation", [
    (_CHUNK_ELEMENTS, _INSTANCES, 20, 3),
    (256, 3, 20, 3),
    (256, 3, 1000, 1),  # several runs a sample, combined
])
def test_two_kernels_match_torch_group_norm(shape, groups, shifted, silu, chunk_elements, instances, mean,
                                            deviation):
    """At the default sizes and at small ones (several chunks an instance, several runs a
    sample), on groups far from zero mean: the sums are taken relative to each group's first
    element, so a mean 1000 times the deviation keeps its variance (E[x^2] - E[x]^2 of the
    plain sums returned values in the thousands there)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32) * deviation + mean
    scale, bias = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))
    shift = rng.standard_normal((shape[0], shape[-1])).astype(np.float32) if shifted else None
    want = _torch_group_norm(x, groups, scale, bias, shift, silu)
    got = fused_group_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), groups, 1e-5,
                           shift=None if shift is None else jnp.asarray(shift), silu=silu,
                           interpret=True, chunk_elements=chunk_elements, instances=instances)
    assert got.shape == x.shape and got.dtype == jnp.float32
    # float32 holds a mean near 1000 to 6e-5 of the unit deviation: that, normalised and
    # scaled, where the two round it differently.
    np.testing.assert_allclose(got, want, atol=2e-5 if mean < 100 else 6e-4, rtol=1e-5)


def test_two_kernels_keep_bfloat16_out_and_compute_in_float32():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 6, 64)), jnp.bfloat16)
    ones, zeros = jnp.ones((64,), jnp.bfloat16), jnp.zeros((64,), jnp.bfloat16)
    got = fused_group_norm(x, ones, zeros, 8, 1e-5, interpret=True)
    xf = x.astype(jnp.float32).reshape(2, 36, 8, 8)
    mean, var = xf.mean((1, 3), keepdims=True), xf.var((1, 3), keepdims=True)
    want = ((xf - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape)
    assert got.dtype == jnp.bfloat16
    # One rounding, at the end (the sums' order apart: at most one ulp).
    assert np.mean(np.asarray(got) == np.asarray(want.astype(jnp.bfloat16))) > 0.99
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=8e-3, atol=1e-6)


@pytest.mark.parametrize("shape, shifted", [((2, 64, 64, 320), True), ((2, 9, 7, 1280), False),
                                            ((3, 50, 24), False)])
def test_kernels_as_triton_runs_them_read_and_write_only_x(shape, shifted):
    """Lowered for a GPU here, no card needed. Triton checks no bounds, and a block is
    padded to powers of two past x's last pixel, group and channel: every load and store
    must carry a mask. The interpreter cannot show this: it pads the arrays themselves."""
    groups = 3 if shape[-1] == 24 else 32
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    vector = jax.ShapeDtypeStruct(shape[-1:], jnp.bfloat16)
    if shifted:
        args = (x, vector, vector, jax.ShapeDtypeStruct((shape[0], shape[-1]), jnp.bfloat16))
        fn = lambda x, s, b, t: fused_group_norm(x, s, b, groups, 1e-5, shift=t, silu=True)
    else:
        args, fn = (x, vector, vector), lambda x, s, b: fused_group_norm(x, s, b, groups, 1e-5)
    kernels = triton_ir.kernels(fn, *args)
    assert sorted(kernels) == ["group_norm", "group_norm_sums"]
    for name, ir in kernels.items():
        assert triton_ir.unmasked_memory_ops(ir) == [], name


@pytest.mark.parity
@pytest.mark.parametrize("mean", [0, 1000])
def test_module_has_nnx_group_norms_parameters_and_torchs_output(monkeypatch, mean):
    """The same parameters and names as nnx.GroupNorm (checkpoints load by name); on the
    default path torch's output, the shift added first and SiLU applied after, also for
    groups far from zero mean, where nnx.GroupNorm's E[x^2] - E[x]^2 loses the variance."""
    monkeypatch.delenv("JAXDIFF_GROUP_NORM", raising=False)
    ours = GroupNorm(32, num_groups=4, epsilon=1e-5, rngs=nnx.Rngs(0))
    theirs = nnx.GroupNorm(32, num_groups=4, epsilon=1e-5, rngs=nnx.Rngs(0))
    assert jax.tree.map(jnp.shape, nnx.state(ours)) == jax.tree.map(jnp.shape, nnx.state(theirs))
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 16, 16, 32)) + mean).astype(np.float32)
    shift = rng.standard_normal((3, 32)).astype(np.float32)
    ours.scale[...] = jnp.asarray(rng.standard_normal(32), jnp.float32)
    ours.bias[...] = jnp.asarray(rng.standard_normal(32), jnp.float32)
    scale, bias = np.asarray(ours.scale[...]), np.asarray(ours.bias[...])
    # float32 holds a mean near 1000 to 6e-5 of the unit deviation: that, normalised and scaled.
    tolerance = 2e-5 if mean == 0 else 6e-4
    np.testing.assert_allclose(ours(jnp.asarray(x)), _torch_group_norm(x, 4, scale, bias), atol=tolerance)
    np.testing.assert_allclose(ours(jnp.asarray(x), shift=jnp.asarray(shift), silu=True),
                               _torch_group_norm(x, 4, scale, bias, shift, silu=True), atol=tolerance)
    if mean == 0:  # where its variance holds, nnx.GroupNorm's output
        theirs.scale[...], theirs.bias[...] = ours.scale[...], ours.bias[...]
        np.testing.assert_allclose(ours(jnp.asarray(x)), theirs(jnp.asarray(x)), atol=1e-5)


def test_module_pallas_path_matches_its_xla_path(monkeypatch):
    model = GroupNorm(48, num_groups=6, epsilon=1e-6, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 7, 3, 48)) * 2 + 1
    shift = jax.random.normal(jax.random.key(1), (2, 48))
    monkeypatch.setenv("JAXDIFF_GROUP_NORM", "xla")
    want = model(x, shift=shift, silu=True)
    monkeypatch.setenv("JAXDIFF_GROUP_NORM", "pallas")
    np.testing.assert_allclose(model(x, shift=shift, silu=True), want, atol=2e-5, rtol=1e-5)


def test_an_unknown_group_norm_path_stops_with_the_variable_named(monkeypatch):
    monkeypatch.setenv("JAXDIFF_GROUP_NORM", "triton")
    with pytest.raises(ValueError, match=r"JAXDIFF_GROUP_NORM='triton' is not one of \('xla', 'pallas'\)"):
        GroupNorm(8, num_groups=2, rngs=nnx.Rngs(0))(jnp.ones((2, 3, 8)))


@pytest.mark.parity
@pytest.mark.skipif(not triton_ir.gpu_held(), reason="compiles the kernels for a GPU (tools/gpu_bench.sh norm runs this test there)")
@pytest.mark.parametrize("size, channels", [(64, 320), (32, 640), (16, 1280), (8, 1280), (17, 960)])
def test_compiled_kernels_match_torch_on_the_gpu(size, channels):
    """The kernels as Triton compiles them, in bfloat16 at SD 1.5's sizes (and an odd one),
    with the shift and SiLU, against torch's group norm in float32: within bfloat16's
    rounding of the output."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, size, size, channels)).astype(np.float32) * 2 + 5
    scale, bias = (rng.standard_normal(channels).astype(np.float32) for _ in range(2))
    shift = rng.standard_normal((4, channels)).astype(np.float32)
    bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
    got = jax.jit(lambda x, s, b, t: fused_group_norm(x, s, b, 32, 1e-5, shift=t, silu=True))(
        bf16(x), bf16(scale), bf16(bias), bf16(shift))
    # torch on the inputs rounded to bfloat16, as the kernels see them.
    x, scale, bias, shift = (np.asarray(bf16(a), np.float32) for a in (x, scale, bias, shift))
    want = _torch_group_norm(x, 32, scale, bias, shift, silu=True)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.04, rtol=0.008)
