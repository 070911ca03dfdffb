"""The attention dispatch: every path computes softmax(q k^T / sqrt(d)) v."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import attention


def _reference(q, k, v, causal):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def _qkv(dtype, tq=13, tk=7, heads=3, dim=40):
    rng = np.random.default_rng(0)
    shapes = [(2, tq, heads, dim), (2, tk, heads, dim), (2, tk, heads, dim)]
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def _paths():
    paths = ["xla"]
    if jax.default_backend() == "gpu":
        paths.append("cudnn")
    return paths


@pytest.mark.parametrize("implementation", _paths())
@pytest.mark.parametrize("causal", [False, True])
def test_each_path_matches_the_reference(implementation, causal):
    dtype = jnp.float32 if implementation == "xla" else jnp.bfloat16
    q, k, v = _qkv(dtype, tk=13 if causal else 7)
    attention.set_attention_implementation(implementation)
    try:
        out = attention.dot_product_attention(q, k, v, is_causal=causal)
    finally:
        attention.set_attention_implementation(None)
    ref = _reference(q, k, v, causal)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    assert err < tol, f"{implementation}: relative error {err:.2e}"


@pytest.mark.parametrize("max_scores", [2 * 3 * 13 * 7 // 2, 2 * 3 * 7])  # 2 chunks; 13 chunks of one query
def test_long_attention_goes_through_in_query_chunks_with_the_same_result(monkeypatch, max_scores):
    q, k, v = _qkv(jnp.float32)
    whole = attention.dot_product_attention(q, k, v)
    monkeypatch.setattr(attention, "MAX_SCORES", max_scores)
    traced = jax.make_jaxpr(attention.dot_product_attention)(q, k, v)
    assert "scan" in str(traced)  # the chunked path, not the whole one
    chunked = attention.dot_product_attention(q, k, v)
    assert chunked.shape == whole.shape
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-6, atol=1e-6)
    ref = _reference(q, k, v, False)
    assert np.linalg.norm(np.asarray(chunked, np.float64) - ref) / np.linalg.norm(ref) < 1e-5


def test_auto_picks_the_plain_path_off_gpu_and_for_fp32():
    q, _, _ = _qkv(jnp.float32)
    assert attention._choose(q) == "xla"
    if jax.default_backend() == "gpu":
        assert attention._choose(q.astype(jnp.bfloat16)) == "cudnn"


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        attention.set_attention_implementation("flash9000")


def test_unknown_attention_environment_variable_is_refused_naming_it(monkeypatch):
    """A mistyped JAXDIFF_ATTENTION (here in capitals) stops the run with an error that
    names the variable and its value, rather than running some other attention path."""
    monkeypatch.setenv("JAXDIFF_ATTENTION", "XLA")
    q, k, v = _qkv(jnp.float32)
    with pytest.raises(ValueError, match=r"JAXDIFF_ATTENTION='XLA' is not one of"):
        attention.dot_product_attention(q, k, v)
    monkeypatch.setenv("JAXDIFF_ATTENTION", "xla")
    assert attention._choose(q) == "xla"


def test_pallas_tpu_path_matches_the_reference_in_interpret_mode():
    """The TPU kernel path, run by Pallas' TPU interpreter: head_dim 40 and a 77-token
    context are padded to whole tiles, and padded keys must get no weight."""
    from jax.experimental.pallas import tpu as pltpu
    for tq, tk in [(200, 77), (128, 128)]:
        q, k, v = _qkv(jnp.float32, tq=tq, tk=tk)
        attention.set_attention_implementation("pallas")
        try:
            with pltpu.force_tpu_interpret_mode():
                out = attention.dot_product_attention(q, k, v)
        finally:
            attention.set_attention_implementation(None)
        ref = _reference(q, k, v, causal=False)
        err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
        assert out.shape == q.shape and err < 1e-5, f"{tq}x{tk}: relative error {err:.2e}"


def test_auto_picks_pallas_on_tpu_for_long_unmasked_sequences(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    long_q, _, _ = _qkv(jnp.bfloat16, tq=256)
    short_q, _, _ = _qkv(jnp.bfloat16, tq=77)
    assert attention._choose(long_q) == "pallas"
    assert attention._choose(short_q) == "xla"  # CLIP's 77 tokens
    # One tile of queries is long enough (a 16x8 latent's 128 tokens); one short of it is not.
    assert attention._choose(_qkv(jnp.bfloat16, tq=128)[0]) == "pallas"
    assert attention._choose(_qkv(jnp.bfloat16, tq=127)[0]) == "xla"
    assert attention._choose(long_q, plain_only=True) == "xla"  # masked or causal


def test_forced_pallas_leaves_masked_and_causal_attention_to_xla():
    q, _, _ = _qkv(jnp.float32, tq=128)
    attention.set_attention_implementation("pallas")
    try:
        assert attention._choose(q, plain_only=True) == "xla"
        out = attention.dot_product_attention(q, q, q, is_causal=True)  # no interpreter needed
    finally:
        attention.set_attention_implementation(None)
    ref = _reference(q, q, q, causal=True)
    assert np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref) < 1e-5


def test_auto_can_pick_for_another_backend_when_compiling_ahead_of_time():
    q, _, _ = _qkv(jnp.bfloat16)
    attention.set_attention_backend("gpu")
    try:
        assert attention._choose(q) == "cudnn"
    finally:
        attention.set_attention_backend(None)
    assert attention._choose(q) == ("cudnn" if jax.default_backend() == "gpu" else "xla")


def _shape(tokens, head_dim, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct((32, tokens, 8, head_dim), dtype)


def test_gpu_attention_goes_to_cudnn_wherever_it_takes_the_head_dim(monkeypatch):
    """Self and text attention alike, masked or not, as cuDNN takes them: head dims that
    are multiples of 8, up to 128 before Hopper and 256 from it on; past that, or in
    float32, XLA."""
    with attention.dispatch(backend="gpu"):
        assert attention._choose(_shape(4096, 40)) == "cudnn"
        assert attention._choose(_shape(1024, 80)) == "cudnn"
        assert attention._choose(_shape(77, 64), plain_only=True) == "cudnn"  # CLIP, causal
        assert attention._choose(_shape(4096, 40, jnp.float32)) == "xla"
        assert attention._choose(_shape(4096, 36)) == "xla"  # not a multiple of 8
        # A float16 model (--dtype float16) takes cuDNN as a bfloat16 one does.
        assert attention._choose(_shape(4096, 40, jnp.float16)) == "cudnn"
        monkeypatch.setattr(attention, "_cudnn_max_head_dim", lambda: 128)  # before Hopper
        assert attention._choose(_shape(256, 160)) == "xla"
        assert attention._choose(_shape(256, 128)) == "cudnn"
        monkeypatch.setattr(attention, "_cudnn_max_head_dim", lambda: 256)
        assert attention._choose(_shape(256, 160)) == "cudnn"  # SD 1.5's 16x16 level
        assert attention._choose(_shape(64, 160)) == "cudnn"  # and its 8x8 mid block
        assert attention._choose(_shape(4096, 256)) == "cudnn"
        assert attention._choose(_shape(4096, 512)) == "xla"  # the VAE's mid block


def test_forced_cudnn_leaves_the_head_dims_it_does_not_take_to_xla(monkeypatch):
    """JAXDIFF_ATTENTION=cudnn renders a whole SD model: the VAE's one-head attention at
    head dim 512 runs on XLA (cuDNN raises for it)."""
    monkeypatch.setenv("JAXDIFF_ATTENTION", "cudnn")
    monkeypatch.setattr(attention, "_cudnn_max_head_dim", lambda: 256)
    assert attention._choose(_shape(4096, 40)) == "cudnn"
    assert attention._choose(_shape(256, 160)) == "cudnn"
    assert attention._choose(jax.ShapeDtypeStruct((16, 4096, 1, 512), jnp.bfloat16)) == "xla"
    assert attention._choose(_shape(77, 36), plain_only=True) == "xla"
    monkeypatch.setattr(attention, "_cudnn_max_head_dim", lambda: 128)
    assert attention._choose(_shape(256, 160)) == "xla"


def test_forced_tokamax_takes_the_unets_attention_and_leaves_the_rest_as_auto_picks(monkeypatch):
    """JAXDIFF_ATTENTION=tokamax: the UNet's self and text attention in half precision go to
    tokamax's kernel; CLIP's causal calls, float32 and the VAE's head dim 512 go as "auto"
    picks them on that GPU."""
    monkeypatch.setenv("JAXDIFF_ATTENTION", "tokamax")
    with attention.dispatch(backend="gpu", cuda_capability=(9, 0)):
        assert attention._choose(_shape(4096, 40)) == "tokamax"
        assert attention._choose(_shape(77, 40)) == "tokamax"
        assert attention._choose(_shape(256, 160, jnp.float16)) == "tokamax"
        assert attention._choose(_shape(77, 64), plain_only=True) == "cudnn"  # CLIP, causal
        assert attention._choose(_shape(4096, 40, jnp.float32)) == "xla"
        assert attention._choose(jax.ShapeDtypeStruct((16, 4096, 1, 512), jnp.bfloat16)) == "xla"


def test_tokamax_path_without_tokamax_names_the_package_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokamax", None)  # not installed
    q, k, v = _qkv(jnp.bfloat16)
    with pytest.raises(ImportError, match=r"JAXDIFF_ATTENTION=tokamax needs the tokamax package: "
                                          r"pip install 'jaxdiff\[gpu\]'"):
        attention._tokamax(q, k, v)


def _tokamax_gpu() -> bool:
    try:
        import tokamax  # noqa: F401
        return any(float(d.compute_capability) >= 9.0 for d in jax.devices("gpu"))
    except (ImportError, RuntimeError, AttributeError, ValueError):
        return False


@pytest.mark.parity
@pytest.mark.skipif(not _tokamax_gpu(), reason="tokamax's kernel runs on Hopper and Blackwell GPUs "
                                               "(tools/gpu_bench.sh attention runs this test there)")
@pytest.mark.parametrize("tq, tk, heads, dim", [(4096, 4096, 8, 40), (4096, 77, 8, 40), (1024, 77, 8, 80),
                                                (256, 256, 8, 160)])
def test_tokamax_path_matches_the_reference_at_sd15_shapes(tq, tk, heads, dim):
    """tokamax's kernel in bfloat16 at SD 1.5's attention shapes (its head dim 40 padded to
    48, text attention's 77 keys to its blocks) against float64: as close as cuDNN."""
    q, k, v = (a[:1] for a in _qkv(jnp.bfloat16, tq=tq, tk=tk, heads=heads, dim=dim))
    ref = _reference(q, k, v, causal=False)
    errors = {}
    for implementation in ("tokamax", "cudnn"):
        with attention.dispatch(implementation):
            out = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v))(q, k, v)  # a fresh trace
        errors[implementation] = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    assert errors["tokamax"] < 2e-2 and errors["tokamax"] <= 1.5 * errors["cudnn"], errors


class _FakeGPU:
    def __init__(self, compute_capability):
        self.compute_capability = compute_capability


@pytest.mark.parametrize("capability, max_head_dim", [
    ("8.0", 128), ("8.9", 128), ("9.0", 256), ("10.0", 256),
    ("gfx942", 128),  # a ROCm GPU names its architecture: no cuDNN there
    (None, 128),      # no GPU in this process: compiling for one ahead of time
])
def test_cudnn_head_dim_limit_follows_the_held_gpu(monkeypatch, capability, max_head_dim):
    def devices(backend=None):
        if capability is None:
            raise RuntimeError("Unknown backend: 'gpu' requested, but no platforms are instances of gpu")
        return [_FakeGPU(capability)]

    monkeypatch.setattr(jax, "devices", devices)
    attention._cuda_capability.cache_clear()
    try:
        assert attention._cudnn_max_head_dim() == max_head_dim
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # as if the process held it
        expected = "xla" if capability in ("gfx942", None) else "cudnn"
        assert attention._choose(_shape(4096, 40)) == expected
    finally:
        attention._cuda_capability.cache_clear()


def test_dispatch_takes_the_target_gpus_compute_capability():
    """Compiling ahead of time for a GPU this process does not hold (tools/step_hlo.py),
    the head dims cuDNN takes are the target's: up to 256 on Hopper (9.0), 128 before, and
    128 where no capability is known."""
    if jax.default_backend() == "gpu":
        pytest.skip("the held GPU's own capability answers when none is named")
    with attention.dispatch(backend="gpu", cuda_capability=(9, 0)):
        assert attention._choose(_shape(256, 160)) == "cudnn"
    with attention.dispatch(backend="gpu", cuda_capability=(8, 0)):
        assert attention._choose(_shape(256, 160)) == "xla"
    with attention.dispatch(backend="gpu"):
        assert attention._choose(_shape(256, 160)) == "xla"
    assert attention._target_capability is None


def test_dispatch_block_restores_the_previous_choice():
    q, _, _ = _qkv(jnp.bfloat16)
    attention.set_attention_implementation("xla")
    try:
        with attention.dispatch(backend="gpu"):
            assert attention._choose(q) == "xla"  # a forced implementation still wins
        with attention.dispatch(implementation="auto", backend="gpu"):
            assert attention._choose(q) == "cudnn"
        assert attention._override == "xla" and attention._target_backend is None
    finally:
        attention.set_attention_implementation(None)
