"""Model families with random weights at full size, for benchmarks (speed does not depend on values)."""

from __future__ import annotations

import json
import os
import tempfile

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


def random_family(arch: str, dtype, seed: int = 0):
    """A ModelFamily of the named architecture (configs.architectures) with random weights."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxdiff.models.clip import CLIPTextConfig, CLIPTextModel, load_tokenizer
    from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig
    from jaxdiff.models.vae import AutoencoderKL, VAEConfig
    from jaxdiff.weights.family import ModelFamily

    text_cfg, unet_cfg, vae_cfg, scheduler, low_res = ARCHITECTURES[arch]
    with tempfile.TemporaryDirectory(prefix="jaxdiff-tokenizer-") as tok_dir:  # read whole when loaded
        write_char_tokenizer(tok_dir)
        tokenizer = load_tokenizer(tok_dir)
    rngs = nnx.Rngs(seed)
    dtype = jnp.dtype(dtype)
    configs = (CLIPTextConfig.from_dict(text_cfg), UNetConfig.from_dict(unet_cfg), VAEConfig.from_dict(vae_cfg))
    kind = {4: "text2image", 9: "inpaint", 7: "upscale"}[unet_cfg["in_channels"]]
    return ModelFamily(
        path=f"random:{arch}", kind=kind, dtype=dtype,
        unet=UNet2DConditionModel(configs[1], dtype=dtype, rngs=rngs),
        vae=AutoencoderKL(configs[2], dtype=dtype, rngs=rngs),
        text_encoder=CLIPTextModel(configs[0], dtype=dtype, rngs=rngs),
        tokenizer=tokenizer, unet_config=configs[1], vae_config=configs[2],
        text_encoder_config=configs[0], scheduler_config=dict(scheduler),
        low_res_scheduler_config=None if low_res is None else dict(low_res),
        max_noise_level=350 if low_res is not None else None,
        model_index={"_class_name": "random", "arch": arch}, sha256={})
