"""Writes a diffusers-layout UNet checkpoint with random values, without torch.

    python -m tools.make_random_checkpoint --arch sd15 --out /tmp/sd15-random
    python -m tools.make_random_checkpoint --config my_unet_config.json --out DIR

gives DIR/unet/config.json and DIR/unet/diffusion_pytorch_model.safetensors (fp32).
The full SD 1.5 UNet has 859.5M parameters (3.4 GB); values are generated and
written in chunks, so the writer itself stays small in memory. Speed and memory
measurements do not depend on the values, so random ones serve them.

The tensor names and shapes are derived here from the diffusers config keys
(UNet2DConditionModel); tests check them against diffusers' own module.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from configs.architectures import SD15_UNET

SD15_UNET_CONFIG = {**SD15_UNET, "_diffusers_version": "0.42.1", "mid_block_type": "UNetMidBlock2DCrossAttn"}
ARCHS = {"sd15": SD15_UNET_CONFIG}
# diffusers' UNet2DConditionModel defaults for the keys that shape the tensors.
_DIFFUSERS_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2, "cross_attention_dim": 1280,
    "down_block_types": SD15_UNET_CONFIG["down_block_types"],
    "up_block_types": SD15_UNET_CONFIG["up_block_types"],
}

# Config values that change the set of tensors and that this writer does not model.
_UNSUPPORTED = {
    "addition_embed_type": None, "class_embed_type": None, "encoder_hid_dim": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "time_embedding_type": "positional",
    "time_embedding_dim": None, "dual_cross_attention": False, "attention_type": "default",
}


def _per_block(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """PyTorch state-dict names and shapes of a diffusers UNet2DConditionModel."""
    config = {**_DIFFUSERS_DEFAULTS, **config}
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) != default:
            raise ValueError(f"unet config {key}={config[key]!r} is not supported by this writer")
    ch = list(config["block_out_channels"])
    n = len(ch)
    cross = config["cross_attention_dim"]
    temb = 4 * ch[0]
    linear_proj = bool(config.get("use_linear_projection", False))
    only_cross = _per_block(config.get("only_cross_attention", False), n)
    depth = _per_block(config.get("transformer_layers_per_block", 1), n)
    scale_shift = config.get("resnet_time_scale_shift", "default") == "scale_shift"
    layers = _per_block(config["layers_per_block"], n)
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name, out_f, in_f, bias=True):
        shapes[f"{name}.weight"] = (out_f, in_f)
        if bias:
            shapes[f"{name}.bias"] = (out_f,)

    def conv(name, out_c, in_c, k):
        shapes[f"{name}.weight"] = (out_c, in_c, k, k)
        shapes[f"{name}.bias"] = (out_c,)

    def norm(name, c):
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def resnet(name, in_c, out_c):
        norm(f"{name}.norm1", in_c)
        conv(f"{name}.conv1", out_c, in_c, 3)
        linear(f"{name}.time_emb_proj", 2 * out_c if scale_shift else out_c, temb)
        norm(f"{name}.norm2", out_c)
        conv(f"{name}.conv2", out_c, out_c, 3)
        if in_c != out_c:
            conv(f"{name}.conv_shortcut", out_c, in_c, 1)

    def attention(name, c, context, n_blocks, cross_only):
        norm(f"{name}.norm", c)
        proj = (lambda p: linear(p, c, c)) if linear_proj else (lambda p: conv(p, c, c, 1))
        proj(f"{name}.proj_in")
        for b in range(n_blocks):
            block = f"{name}.transformer_blocks.{b}"
            for i, kv_dim in ((1, context if cross_only else c), (2, context)):
                norm(f"{block}.norm{i}", c)
                linear(f"{block}.attn{i}.to_q", c, c, bias=False)
                linear(f"{block}.attn{i}.to_k", c, kv_dim, bias=False)
                linear(f"{block}.attn{i}.to_v", c, kv_dim, bias=False)
                linear(f"{block}.attn{i}.to_out.0", c, c)
            norm(f"{block}.norm3", c)
            linear(f"{block}.ff.net.0.proj", 8 * c, c)  # GEGLU: value and gate
            linear(f"{block}.ff.net.2", c, 4 * c)
        proj(f"{name}.proj_out")

    conv("conv_in", ch[0], config["in_channels"], 3)
    linear("time_embedding.linear_1", temb, ch[0])
    linear("time_embedding.linear_2", temb, temb)
    if config.get("num_class_embeds"):
        shapes["class_embedding.weight"] = (config["num_class_embeds"], temb)

    out_c = ch[0]
    for i, block_type in enumerate(config["down_block_types"]):
        in_c, out_c = out_c, ch[i]
        for j in range(layers[i]):
            resnet(f"down_blocks.{i}.resnets.{j}", in_c if j == 0 else out_c, out_c)
            if block_type == "CrossAttnDownBlock2D":
                attention(f"down_blocks.{i}.attentions.{j}", out_c, cross, depth[i], only_cross[i])
            elif block_type != "DownBlock2D":
                raise ValueError(f"unet down block type {block_type!r} is not supported by this writer")
        if i < n - 1:
            conv(f"down_blocks.{i}.downsamplers.0.conv", out_c, out_c, 3)

    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"unet mid block type {config['mid_block_type']!r} is not supported")
    resnet("mid_block.resnets.0", ch[-1], ch[-1])
    attention("mid_block.attentions.0", ch[-1], cross, depth[-1], False)
    resnet("mid_block.resnets.1", ch[-1], ch[-1])

    rev = ch[::-1]
    rev_depth = depth[::-1]
    rev_only_cross = only_cross[::-1]
    out_c = rev[0]
    for i, block_type in enumerate(config["up_block_types"]):
        prev_c, out_c = out_c, rev[i]
        skip_in = rev[min(i + 1, n - 1)]
        up_layers = layers[::-1][i] + 1
        for j in range(up_layers):
            skip = skip_in if j == up_layers - 1 else out_c
            resnet(f"up_blocks.{i}.resnets.{j}", (prev_c if j == 0 else out_c) + skip, out_c)
            if block_type == "CrossAttnUpBlock2D":
                attention(f"up_blocks.{i}.attentions.{j}", out_c, cross, rev_depth[i], rev_only_cross[i])
            elif block_type != "UpBlock2D":
                raise ValueError(f"unet up block type {block_type!r} is not supported by this writer")
        if i < n - 1:
            conv(f"up_blocks.{i}.upsamplers.0.conv", out_c, out_c, 3)

    norm("conv_norm_out", ch[0])
    conv("conv_out", config["out_channels"], ch[0], 3)
    return shapes


def _fill(name: str, shape: tuple[int, ...]) -> tuple[str, float]:
    """How a tensor is filled: ("normal", std), ("const", value)."""
    if name.endswith(".bias"):
        return "const", 0.0
    if len(shape) == 1:  # norm scales
        return "const", 1.0
    if name == "class_embedding.weight":
        return "normal", 1.0
    return "normal", 1.0 / math.sqrt(math.prod(shape[1:]))


def write_random_safetensors(path: str, shapes: dict[str, tuple[int, ...]], *, seed: int = 0,
                             chunk_elements: int = 1 << 22) -> int:
    """Writes fp32 random tensors to `path` in chunks; returns the file size in bytes."""
    header, offset = {}, 0
    for name in sorted(shapes):
        nbytes = 4 * math.prod(shapes[name])
        header[name] = {"dtype": "F32", "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data buffer 8-byte aligned
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in sorted(shapes):
            kind, value = _fill(name, shapes[name])
            remaining = math.prod(shapes[name])
            while remaining:
                count = min(remaining, chunk_elements)
                if kind == "normal":
                    chunk = rng.standard_normal(count, dtype=np.float32)
                    chunk *= value
                else:
                    chunk = np.full(count, value, dtype=np.float32)
                f.write(chunk.astype("<f4", copy=False).tobytes())
                remaining -= count
    return os.path.getsize(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--arch", choices=sorted(ARCHS), help="a named UNet architecture")
    which.add_argument("--config", help="a diffusers UNet config.json to follow instead")
    parser.add_argument("--out", required=True, help="folder to write; gets unet/ inside")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.arch:
        config = dict(ARCHS[args.arch])
    else:
        with open(args.config) as f:
            config = json.load(f)
    shapes = unet_tensor_shapes(config)
    folder = os.path.join(args.out, "unet")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    size = write_random_safetensors(path, shapes, seed=args.seed)
    params = sum(math.prod(s) for s in shapes.values())
    print(f"wrote {path}: {len(shapes)} tensors, {params:,} parameters, {size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
