"""Model families with random weights at full size, for benchmarks (speed does not depend on values)."""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np

from configs.architectures import ARCHITECTURES


def _byte_unicode() -> list[str]:
    # The printable stand-ins CLIP's byte-level BPE uses for the 256 byte values.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_char_tokenizer(path: str, model_max_length: int = 77) -> int:
    """A character-level CLIP BPE tokenizer folder (no merges); returns its vocabulary size."""
    from transformers import CLIPTokenizer

    os.makedirs(path, exist_ok=True)
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in _byte_unicode():
            vocab[c + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"),
                  model_max_length=model_max_length).save_pretrained(path)
    return len(vocab)


def random_weights(build, dtype, seed: int = 0):
    """The module `build()` makes, its parameters filled from the host without running its
    initialisers: normal values scaled by 1/sqrt(fan-in) for kernels, by 1/sqrt(width) for
    embeddings' rows (as flax's defaults draw them), ones for norm scales, zeros for biases.

    Eager random init compiles and runs every initialiser op by op, per parameter shape:
    30-40 s for SD 1.5's three models, on the CPU as on a GPU. Here the values are slices
    of one pool of 2**20 normals (a larger parameter repeats it), so building costs about a
    copy of the weights; speed does not depend on the values, only on their scale staying
    sane.
    """
    import jax
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(build))
    normals = np.random.default_rng(seed).standard_normal(1 << 20, dtype=np.float32)
    pools = {}  # fan-in -> the normals scaled and cast once (bfloat16 arithmetic in numpy is slow)
    for i, (path, variable) in enumerate(nnx.to_flat_state(state)):
        shape = variable.get_value().shape
        if path[-1] == "scale":
            values = np.ones(shape, dtype)
        elif path[-1] == "bias" or not shape:
            values = np.zeros(shape, dtype)
        else:  # kernels: fan-in is every axis but the last; embeddings: the row's width
            fan_in = shape[-1] if path[-1] == "embedding" else math.prod(shape[:-1])
            if fan_in not in pools:
                pools[fan_in] = (normals / np.float32(math.sqrt(fan_in))).astype(dtype)
            values = np.resize(np.roll(pools[fan_in], 7919 * i), shape)  # a different start per parameter
        variable.set_value(jax.device_put(values))
    return nnx.merge(graphdef, state)


def random_family(arch: str, dtype, seed: int = 0):
    """A ModelFamily of the named architecture (configs.architectures) with random weights."""
    import jax.numpy as jnp

    from jaxdiff.models.clip import CLIPTextConfig, CLIPTextModel, load_tokenizer
    from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig
    from jaxdiff.models.vae import AutoencoderKL, VAEConfig
    from jaxdiff.weights.family import InitKeys, ModelFamily

    text_cfg, unet_cfg, vae_cfg, scheduler, low_res = ARCHITECTURES[arch]
    with tempfile.TemporaryDirectory(prefix="jaxdiff-tokenizer-") as tok_dir:  # read whole when loaded
        write_char_tokenizer(tok_dir)
        tokenizer = load_tokenizer(tok_dir)
    dtype = jnp.dtype(dtype)
    configs = (CLIPTextConfig.from_dict(text_cfg), UNetConfig.from_dict(unet_cfg), VAEConfig.from_dict(vae_cfg))
    kind = {4: "text2image", 9: "inpaint", 7: "upscale"}[unet_cfg["in_channels"]]

    def build(model_class, config, offset):
        return random_weights(lambda: model_class(config, dtype=dtype, rngs=InitKeys()), dtype, seed + offset)

    return ModelFamily(
        path=f"random:{arch}", kind=kind, dtype=dtype,
        unet=build(UNet2DConditionModel, configs[1], 1),
        vae=build(AutoencoderKL, configs[2], 2),
        text_encoder=build(CLIPTextModel, configs[0], 0),
        tokenizer=tokenizer, unet_config=configs[1], vae_config=configs[2],
        text_encoder_config=configs[0], scheduler_config=dict(scheduler),
        low_res_scheduler_config=None if low_res is None else dict(low_res),
        max_noise_level=350 if low_res is not None else None,
        model_index={"_class_name": "random", "arch": arch}, sha256={})
