"""diffusers (PyTorch) on the same work as tools/bench.py, for a side-by-side ratio.

Mirrors the work of ../shared/bench/diffusers_baseline.py (DPM-Solver++, CFG, VAE decode
to uint8 on the host; with --compile, as diffusers_baseline_compiled.py: channels_last,
fused QKV, UNet and VAE decode compiled) for any architecture in configs/architectures.py,
with one addition: the text encoder runs on the uncond and cond token ids, as jaxdiff's
does (the baseline feeds random context). Prints a JSON line after each batch. Run by
`tools/bench.py --compare diffusers`, or directly:
    python -m tools.bench_diffusers --arch sd15 --batch-sizes 8,32 --steps 25 [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from configs.architectures import ARCHITECTURES


def _module_config(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def unet_gflop_b1(unet_cfg: dict, latent: int, context_dim: int) -> float:
    """GFLOP of one UNet forward at batch 1, as the shared baseline counts them (torch's
    FlopCounterMode: two per multiply-add of matmuls, convolutions and attention). On the
    meta device: no memory, and attention runs as matmuls the counter sees (it has no
    formula for the CPU's fused attention kernel)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_module_config(unet_cfg)).eval()
        extra = {"class_labels": torch.tensor([20])} if unet_cfg.get("num_class_embeds") else {}
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(torch.randn(1, unet_cfg["in_channels"], latent, latent), torch.tensor([500]),
                 encoder_hidden_states=torch.randn(1, 77, context_dim), **extra)
    return counter.get_total_flops() / 1e9


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="sd15")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--size", type=int, default=None, help="output side in pixels (base) / low-res side (x4)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--dtype", default=None, help="bfloat16 on a GPU, float32 on CPU by default")
    p.add_argument("--compile", action="store_true", help="torch.compile UNet and VAE decode, channels_last, fused QKV")
    args = p.parse_args(argv)

    import diffusers
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if dev == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    text_cfg, unet_cfg, vae_cfg, sched_cfg, low_res_cfg = ARCHITECTURES[args.arch]
    with torch.device(dev):
        unet = UNet2DConditionModel.from_config(_module_config(unet_cfg)).to(dt).eval()
        vae = AutoencoderKL.from_config(_module_config(vae_cfg)).to(dt).eval()
        text_encoder = CLIPTextModel(CLIPTextConfig(**_module_config(text_cfg))).to(dt).eval()
    unet_params = sum(p.numel() for p in unet.parameters())
    decode = vae.decode
    unet_fn = unet
    if args.compile:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
        unet.fuse_qkv_projections()
        # Static shapes, as the baseline ran: without dynamic=False the second batch size
        # would recompile both with a symbolic batch, other code than the baseline timed.
        unet_fn = torch.compile(unet, fullgraph=True, dynamic=False)
        decode = torch.compile(vae.decode, fullgraph=True, dynamic=False)

    upscaler = unet_cfg["in_channels"] == 7
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    side = args.size or (unet_cfg["sample_size"] if upscaler else unet_cfg["sample_size"] * vae_factor)
    latent = side if upscaler else side // vae_factor
    ctx_dim = unet_cfg["cross_attention_dim"]
    sched_kw = {k: v for k, v in sched_cfg.items() if not k.startswith("_")}

    @torch.no_grad()
    def render(B: int):
        sched = DPMSolverMultistepScheduler(**sched_kw, algorithm_type="dpmsolver++")
        sched.set_timesteps(args.steps, device=dev)
        ids = torch.randint(0, text_cfg["vocab_size"], (2 * B, 77), device=dev)
        ctx = text_encoder(ids).last_hidden_state
        lat = torch.randn(B, 4, latent, latent, device=dev, dtype=dt)
        extra = {}
        if upscaler:
            low = torch.randn(2 * B, 3, latent, latent, device=dev, dtype=dt)
            extra = {"class_labels": torch.full((2 * B,), 20, device=dev)}
        for t in sched.timesteps:
            inp = torch.cat([lat, lat])
            if upscaler:
                inp = torch.cat([inp, low], dim=1)
            out = unet_fn(inp, t, encoder_hidden_states=ctx, **extra).sample
            uncond, cond = out.chunk(2)
            lat = sched.step(uncond + args.guidance * (cond - uncond), t, lat).prev_sample
        img = decode(lat / vae_cfg["scaling_factor"]).sample
        return ((img.float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8).cpu()

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    result = {"system": "diffusers" + ("-compiled" if args.compile else "-eager"), "arch": args.arch,
              "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
              "diffusers": diffusers.__version__, "dtype": str(dt).removeprefix("torch."), "size": side,
              "steps": args.steps, "guidance": args.guidance, "unet_params": unet_params,
              "unet_gflop_per_forward_b1": float(f"{unet_gflop_b1(unet_cfg, latent, ctx_dim):.4g}"),
              "timing": f"median of {args.reps} after a warm-up call, device synchronised", "batches": {}}
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        t = time.perf_counter(); render(B); sync()
        first = time.perf_counter() - t
        times = []
        for _ in range(args.reps):
            t = time.perf_counter(); render(B); sync()
            times.append(time.perf_counter() - t)
        result["batches"][str(B)] = {"first_s": round(first, 3), "batch_s": float(f"{statistics.median(times):.5g}"),
                                     "images_per_s": round(B / statistics.median(times), 3)}
        # A line per batch: a run cut short keeps the batches it measured.
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
