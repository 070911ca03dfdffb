"""The one place where attention is computed, so each backend can pick its kernel.

Layout is (batch, tokens, heads, head_dim), as in `jax.nn.dot_product_attention`.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp

from jaxdiff.models.kernel_paths import chosen
from jaxdiff.models.per_chip import per_chip

# "auto" picks per backend; the others force one path: plain XLA, cuDNN flash (GPU; head
# dims it does not take stay on XLA), Pallas' flash kernel (TPU, where there is no mask;
# the tests run it on the CPU in TPU interpret mode), or tokamax's flash kernel (Hopper
# and Blackwell GPUs, opt in: Mosaic GPU, warp-specialised, head dims padded to 16 where
# cuDNN's kernels take 64; the calls it does not cover go as "auto" picks).
_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas", "tokamax")
# The largest head dim the tokamax path takes: its blocks of queries, keys and values
# must fit in shared memory (the VAE's 512 does not).
_TOKAMAX_MAX_HEAD_DIM = 256
_override: str | None = None
# The backend whose kernels "auto" picks; None: jax.default_backend(). Set when compiling
# ahead of time for a chip this process does not hold (tools/step_hlo.py), with that GPU's
# compute capability (None: the held GPU's).
_target_backend: str | None = None
_target_capability: tuple[int, ...] | None = None

# The Pallas TPU kernel works on tiles of 128 tokens and 128 lanes of head_dim.
_TPU_TILE = 128
# XLA's attention holds the whole (batch, heads, queries, keys) score array: past this many
# entries (4 GiB in float32) the queries go through in chunks. The VAE's one-head mid-block
# attention is what gets there: 16,384 tokens for the x4 upscaler's 512 px decode, 2.1e9
# entries at batch 8.
MAX_SCORES = 2 ** 30


def set_attention_implementation(name: str | None) -> None:
    """Force one attention path for the whole process (None goes back to auto)."""
    if name is not None and name not in _IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r} is not one of {_IMPLEMENTATIONS}")
    global _override
    _override = name


def set_attention_backend(backend: str | None, cuda_capability: tuple[int, ...] | None = None) -> None:
    """Let "auto" pick kernels as on `backend` ("gpu", "tpu", "cpu"; None: the default one),
    on a GPU of `cuda_capability` (None: the held GPU's)."""
    global _target_backend, _target_capability
    _target_backend, _target_capability = backend, cuda_capability


@contextlib.contextmanager
def dispatch(implementation: str | None = None, backend: str | None = None,
             cuda_capability: tuple[int, ...] | None = None):
    """Within the block, force `implementation` and/or pick kernels as on `backend` (a GPU
    of `cuda_capability`); the previous choices come back after. What is traced inside
    keeps the choice: trace a fresh function (jit's trace cache does not see it)."""
    previous = (_override, _target_backend, _target_capability)
    set_attention_implementation(implementation if implementation is not None else previous[0])
    if backend is not None:
        set_attention_backend(backend, cuda_capability)
    try:
        yield
    finally:
        set_attention_implementation(previous[0])
        set_attention_backend(*previous[1:])


def target_backend() -> str:
    """The backend whose kernels are picked: the one `dispatch` names (compiling ahead of
    time for a chip this process does not hold), else jax's default."""
    return _target_backend or jax.default_backend()


@functools.cache
def _cuda_capability() -> tuple[int, ...] | None:
    """The compute capability of this process's first CUDA GPU; None where it holds none
    (a ROCm GPU names its architecture instead, "gfx942"; ahead-of-time compiles hold no
    GPU at all)."""
    try:
        return tuple(int(x) for x in jax.devices("gpu")[0].compute_capability.split("."))
    except (RuntimeError, AttributeError, ValueError):
        return None


def _cudnn_max_head_dim() -> int:
    """jax lets cuDNN take head dims up to 256 from compute capability 9.0 (Hopper) on, 128
    before, and where the capability is not known (no GPU held, none named to `dispatch`)."""
    capability = _target_capability or _cuda_capability()
    return 256 if capability is not None and capability >= (9, 0) else 128


def _cudnn_takes(head_dim: int) -> bool:
    return head_dim % 8 == 0 and head_dim <= _cudnn_max_head_dim()


def implementation() -> str:
    """The path asked for: forced, else JAXDIFF_ATTENTION, else "auto"."""
    return chosen("JAXDIFF_ATTENTION", _IMPLEMENTATIONS, _override)


def _choose(q: jax.Array, *, plain_only: bool = False) -> str:
    """The path for one call: an implementation name."""
    choice = implementation()
    if choice == "pallas" and plain_only:
        return "xla"  # the kernel takes no mask: masked or causal calls (CLIP) stay on XLA
    if choice == "cudnn" and not _cudnn_takes(q.shape[-1]):
        return "xla"  # a head dim cuDNN does not take (the VAE's 512)
    if choice == "tokamax":
        # The UNet's self and text attention in half precision; CLIP's masked, causal
        # calls, float32 and the VAE's head dim 512 go as "auto" picks.
        half = q.dtype in (jnp.bfloat16, jnp.float16)
        if plain_only or not half or q.shape[-1] > _TOKAMAX_MAX_HEAD_DIM:
            choice = "auto"
    if choice != "auto":
        return choice
    backend = target_backend()
    if backend == "gpu":
        # cuDNN flash attention wherever it takes the head dim; it needs CUDA and half
        # precision. SD 1.5 at batch 16 on an H200 rendered 9.68-9.75 img/s this way,
        # against 9.49-9.62 with text attention at head dims 40 and 160 on cuDNN zero-padded
        # to 64 and 192 and head dim 160's self attention on XLA (per-shape timings alone
        # had favoured those, but did not repeat from one run to the next).
        held_gpu_is_not_cuda = _target_backend is None and _cuda_capability() is None
        if q.dtype in (jnp.bfloat16, jnp.float16) and not held_gpu_is_not_cuda and _cudnn_takes(q.shape[-1]):
            return "cudnn"
    if backend == "tpu" and not plain_only and q.shape[1] >= _TPU_TILE:
        # Long sequences (the UNet's self and cross attention): the flash kernel never
        # materialises the tokens x tokens scores in HBM. Short ones (CLIP's 77 tokens,
        # causal) stay on XLA, where padding to a tile would cost more than it saves.
        return "pallas"
    return "xla"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pallas_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Pallas' TPU flash kernel, on each chip's own samples."""
    return per_chip(_pallas_tpu_kernel, (q, k, v), otherwise=_xla_attention)


def _pallas_tpu_kernel(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Non-causal, unmasked attention through Pallas' TPU flash kernel.

    The kernel wants (batch, heads, tokens, head_dim) with tokens and head_dim in whole
    tiles: head_dim is zero-padded (q.k and the kept columns of p.v are unchanged), query
    tokens are padded and cut off after, and padded key tokens are masked out with
    segment ids (real keys are segment 1, padding 0, every query 1).
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    batch, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    q_pad, kv_pad = _round_up(q_len, _TPU_TILE), _round_up(kv_len, _TPU_TILE)
    dim_pad = _round_up(head_dim, _TPU_TILE)

    def to_kernel_layout(x, tokens):
        x = jnp.pad(x, ((0, 0), (0, tokens - x.shape[1]), (0, 0), (0, dim_pad - head_dim)))
        return x.transpose(0, 2, 1, 3)

    segment_ids = None
    if kv_pad != kv_len:
        kv_ids = jnp.broadcast_to(jnp.arange(kv_pad) < kv_len, (batch, kv_pad)).astype(jnp.int32)
        segment_ids = tpu_flash.SegmentIds(q=jnp.ones((batch, q_pad), jnp.int32), kv=kv_ids)
    out = tpu_flash.flash_attention(
        to_kernel_layout(q, q_pad), to_kernel_layout(k, kv_pad), to_kernel_layout(v, kv_pad),
        segment_ids=segment_ids, sm_scale=1.0 / math.sqrt(head_dim))
    return out.transpose(0, 2, 1, 3)[:, :q_len, :, :head_dim]


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False,
                   mask: jax.Array | None = None) -> jax.Array:
    """XLA's attention, with at most MAX_SCORES scores alive when unmasked: each query's
    softmax needs only its own row of scores, so past that, chunks of queries (zero-padded
    to whole chunks, cut off after) go through one after another in a lax.map."""
    batch, q_len, heads, head_dim = q.shape
    chunks = -(-batch * heads * q_len * k.shape[1] // MAX_SCORES)
    if chunks == 1 or mask is not None or is_causal:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")
    chunk = -(-q_len // chunks)
    q = jnp.pad(q, ((0, 0), (0, chunk * chunks - q_len), (0, 0), (0, 0)))
    q = q.reshape(batch, chunks, chunk, heads, head_dim).swapaxes(0, 1)
    out = jax.lax.map(lambda q_chunk: jax.nn.dot_product_attention(q_chunk, k, v, implementation="xla"), q)
    return out.swapaxes(0, 1).reshape(batch, chunks * chunk, heads, v.shape[-1])[:, :q_len]


def _cudnn(q, k, v, **kwargs):
    """cuDNN flash attention: every cuDNN call of the dispatch goes through here."""
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)


def _tokamax(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """tokamax's flash attention on Mosaic GPU (Hopper, Blackwell), unmasked: it pads the
    head dim to 16 and the keys to its blocks itself, masking the padded keys."""
    try:
        import tokamax
    except ImportError as e:
        raise ImportError("JAXDIFF_ATTENTION=tokamax needs the tokamax package: pip install 'jaxdiff[gpu]'") from e
    return tokamax.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), implementation="mosaic_gpu")


def _auto(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The path "auto" picks for this unmasked call."""
    with dispatch("auto"):
        return dot_product_attention(q, k, v)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          is_causal: bool = False, mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention with scale 1/sqrt(head_dim); mask is True where attending is allowed."""
    implementation = _choose(q, plain_only=is_causal or mask is not None)
    if implementation == "pallas":
        return _pallas_tpu_attention(q, k, v)
    if implementation == "tokamax":
        return per_chip(_tokamax, (q, k, v), otherwise=_auto)
    if implementation == "xla":
        return _xla_attention(q, k, v, is_causal=is_causal, mask=mask)
    return _cudnn(q, k, v, mask=mask, is_causal=is_causal)
