"""CLIP text encoder (the conditioning model of SD 1.x / 2.x) and its tokenizer.

Module and attribute names mirror transformers' PyTorch `CLIPTextModel` as stored in
diffusers checkpoints, so `text_model.encoder.layers.3.self_attn.q_proj.weight` is the NNX
path `('text_model', 'encoder', 'layers', 3, 'self_attn', 'q_proj', 'kernel')` and
`jaxdiff.weights.convert.load_state_dict(model, tensors, ignore=("position_ids",))` fills it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.models.attention import dot_product_attention
from jaxdiff.models.blocks import UnsupportedConfig, gelu
from jaxdiff.models.layer_norm import LayerNorm


def _quick_gelu(x: jax.Array) -> jax.Array:
    # OpenAI CLIP's sigmoid approximation of GELU; SD 1.x's CLIP-L was trained with it.
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' `hidden_act` names -> functions. "gelu" is the exact (erf) form.
_ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": gelu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text encoder; field names and defaults as in transformers.

    Defaults matter: older config.json files omit fields equal to transformers' defaults.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    pad_token_id: int = 1
    bos_token_id: int = 49406
    projection_dim: int = 512
    # Not a transformers field: a few config.json files set it, and diffusers then passes
    # the tokenizer's attention_mask to the text encoder.
    use_attention_mask: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings", "projection_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UnsupportedConfig(f"CLIP text config: {name}={value!r} must be a positive integer")
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UnsupportedConfig(f"CLIP text config: {name}={value!r} must be an integer token id")
        if not isinstance(self.use_attention_mask, bool):
            raise UnsupportedConfig(
                f"CLIP text config: use_attention_mask={self.use_attention_mask!r} must be true or false")
        if self.hidden_act not in _ACTIVATIONS:
            raise UnsupportedConfig(
                f"CLIP text config: hidden_act={self.hidden_act!r} is not supported; "
                f"use one of {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedConfig(
                f"CLIP text config: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise UnsupportedConfig(
                f"CLIP text config: layer_norm_eps={self.layer_norm_eps!r} must be a positive number")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
        """Reads a text encoder's config.json (as a dict); unrelated keys are ignored."""
        model_type = config.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise UnsupportedConfig(
                f"CLIP text config: model_type={model_type!r} is not 'clip_text_model'; "
                f"pass the text encoder's own config.json (e.g. <checkpoint>/text_encoder/config.json)")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # (B, T, hidden_size)
    pooled: jax.Array             # (B, hidden_size): the state at each prompt's EOS token


def _embedding_init():
    # CLIP initialises both embedding tables with std 0.02.
    return nnx.initializers.normal(stddev=0.02)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype,
            embedding_init=_embedding_init(), rngs=rngs)
        self.position_embedding = nnx.Embed(
            config.max_position_embeddings, config.hidden_size, dtype=dtype, param_dtype=dtype,
            embedding_init=_embedding_init(), rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[1])[None, :]
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPAttention(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        width = config.hidden_size
        linear = functools.partial(nnx.Linear, width, width, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.q_proj = linear()
        self.k_proj = linear()
        self.v_proj = linear()
        self.out_proj = linear()

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        batch, tokens, width = x.shape
        split = lambda t: t.reshape(batch, tokens, self.num_heads, self.head_dim)
        # The attention kernel keeps logits and softmax in float32 for bf16 inputs.
        out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                    split(self.v_proj(x)), is_causal=True, mask=mask)
        return self.out_proj(out.reshape(batch, tokens, width))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nnx.Linear(config.hidden_size, config.intermediate_size,
                              dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(config.intermediate_size, config.hidden_size,
                              dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x)))


def _layer_norm(config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs) -> LayerNorm:
    # Mean and variance in float32 whatever `dtype` is, the variance of the centred values
    # as torch computes it (jaxdiff/models/norm_statistics.py).
    return LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                     dtype=dtype, param_dtype=dtype, rngs=rngs)


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.layer_norm1 = _layer_norm(config, dtype=dtype, rngs=rngs)
        self.self_attn = CLIPAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = _layer_norm(config, dtype=dtype, rngs=rngs)
        self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])


class CLIPTextTransformer(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.final_layer_norm = _layer_norm(config, dtype=dtype, rngs=rngs)


class CLIPTextModel(nnx.Module):
    """CLIP text encoder; `dtype` is used for the parameters and the activations."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.text_model = CLIPTextTransformer(config, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
                 clip_skip: int = 0) -> CLIPTextOutput:
        """Encodes token ids (B, T) with a causal mask.

        `attention_mask` (B, T), the tokenizer's (1 for tokens, 0 for padding), also hides
        the padding from every token; diffusers passes it only when the config sets
        `use_attention_mask`, and then it is required here.
        `clip_skip=k` returns the hidden state after layer `num_hidden_layers - k` (k =
        num_hidden_layers: the embeddings), passed through the final layer norm (diffusers'
        SD pipelines do the same); `pooled` always comes from the last layer, as
        transformers' `pooler_output` does.
        """
        config = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"input_ids must be integer token ids of shape (batch, tokens), got "
                f"{input_ids.dtype} {input_ids.shape}; use tokenize(...) to make them")
        if input_ids.shape[1] > config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens, more than this text encoder's "
                f"max_position_embeddings={config.max_position_embeddings}; tokenize with "
                f"max_length={config.max_position_embeddings}")
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not (
                0 <= clip_skip <= config.num_hidden_layers):
            raise ValueError(
                f"clip_skip={clip_skip!r} must be an integer from 0 to "
                f"{config.num_hidden_layers} (this text encoder has "
                f"{config.num_hidden_layers} layers)")
        mask = None
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask has shape {attention_mask.shape}, input_ids "
                                 f"{input_ids.shape}: pass the tokenizer's mask for these ids")
            # (B, heads, queries, keys) at full size: every query sees only the prompt's keys,
            # and cuDNN (which takes masked calls on GPU) wants no broadcast dimensions.
            batch, tokens = input_ids.shape
            mask = jnp.broadcast_to((attention_mask != 0)[:, None, None, :], (batch, 1, tokens, tokens))
        elif config.use_attention_mask:
            raise ValueError("this text encoder's config sets use_attention_mask: pass the "
                             "tokenizer's attention_mask, as diffusers does")

        text_model = self.text_model
        hidden = text_model.embeddings(input_ids)
        skipped_from = config.num_hidden_layers - clip_skip
        kept = hidden
        for index, layer in enumerate(text_model.encoder.layers):
            hidden = layer(hidden, mask)
            if index + 1 == skipped_from:
                kept = hidden
        final = text_model.final_layer_norm(hidden)
        last_hidden_state = final if clip_skip == 0 else text_model.final_layer_norm(kept)

        if config.eos_token_id == 2:
            # Legacy configs (SD 1.x / 2.x) carry a wrong eos_token_id; there the EOS token
            # is the highest id in each prompt, as transformers assumes.
            eos_position = jnp.argmax(input_ids, axis=-1)
        else:
            eos_position = jnp.argmax((input_ids == config.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = final[jnp.arange(final.shape[0]), eos_position]
        return CLIPTextOutput(last_hidden_state=last_hidden_state, pooled=pooled)


def with_text_model_prefix(tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]
                           ) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, array) with keys under `text_model.`.

    diffusers checkpoints store `text_model.encoder...`; transformers 5 saves a
    CLIPTextModel without that prefix. Both then load with `load_state_dict`.
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for key, array in items:
        yield text_model_key(key), array


def text_model_key(key: str) -> str:
    """A checkpoint key under `text_model.` (see `with_text_model_prefix`)."""
    return key if key.startswith("text_model.") else "text_model." + key


# --- tokenizer -------------------------------------------------------------------------

_TOKENIZER_FILE_SETS = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def load_tokenizer(folder: str | os.PathLike):
    """Loads a checkpoint's CLIP tokenizer from a local folder (e.g. `<checkpoint>/tokenizer`).

    Always builds transformers' `CLIPTokenizer` class, whatever the folder names, and never
    downloads anything.
    """
    from transformers import CLIPTokenizer

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"tokenizer folder {folder!r} does not exist; pass the checkpoint's tokenizer/ "
            f"directory (a local path holding vocab.json and merges.txt)")
    if not any(all(os.path.isfile(os.path.join(folder, name)) for name in names)
               for names in _TOKENIZER_FILE_SETS):
        raise FileNotFoundError(
            f"tokenizer folder {folder!r} has neither vocab.json + merges.txt nor tokenizer.json; "
            f"pass the checkpoint's tokenizer/ directory")
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


# transformers' model_max_length when tokenizer_config.json sets none is about 1e30.
_UNSET_MAX_LENGTH = 10 ** 6


class Tokens(NamedTuple):
    ids: np.ndarray        # (B, max_length) int32
    mask: np.ndarray       # (B, max_length) int32: 1 for the prompt's tokens, 0 for padding
    truncated: list[bool]  # which prompts were cut to fit


def tokenize(tokenizer, prompts: Sequence[str], max_length: int | None = None) -> Tokens:
    """Token ids padded like SD pipelines, their attention mask, and which prompts were cut.

    max_length defaults to the tokenizer's model_max_length, as in diffusers. Padding uses
    the tokenizer's own pad token (SD 1.x: <|endoftext|>, SD 2.x: "!"), and a prompt longer
    than max_length keeps its first max_length - 1 tokens plus EOS.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got one string; wrap it: [prompt]")
    prompts = list(prompts)
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{index}] is {type(prompt).__name__}, not a string")
    if max_length is None:
        max_length = tokenizer.model_max_length
        if max_length >= _UNSET_MAX_LENGTH:
            raise ValueError("the tokenizer has no model_max_length; its tokenizer_config.json must set "
                             "it (77 for SD), or pass max_length")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r} must be an integer >= 2 (BOS and EOS need room)")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; its tokenizer_config.json must name pad_token")
    if not prompts:
        return Tokens(np.zeros((0, max_length), np.int32), np.zeros((0, max_length), np.int32), [])
    padded = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True)
    # Only to measure lengths; verbose=False silences the "longer than maximum" warning,
    # since the ids above are truncated and the flag reports it.
    full = tokenizer(prompts, padding=False, truncation=False, verbose=False)
    truncated = [len(row) > max_length for row in full["input_ids"]]
    return Tokens(np.asarray(padded["input_ids"], np.int32), np.asarray(padded["attention_mask"], np.int32),
                  truncated)
