"""Sharding over 4 forced CPU devices and the persistent compilation cache, each in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tiny_models import make_sd_folder

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    import jaxdiff
    folder, mode = sys.argv[1], sys.argv[2]
    prompts = ["a red circle", "a blue square", "two shapes", "a"]
    if mode == "devices":
        assert jax.device_count() == 4, jax.devices()
        pipe4 = jaxdiff.load_pipeline(folder, upscaler="none", steps=2, sampler="dpmpp_2m", batch_size=4)
        pipe1 = jaxdiff.load_pipeline(folder, upscaler="none", steps=2, sampler="dpmpp_2m", batch_size=4,
                                      devices=jax.devices()[:1])
        a = np.stack([r.image for r in pipe4.render(prompts, seeds=[1, 2, 3, 4])]).astype(int)
        b = np.stack([r.image for r in pipe1.render(prompts, seeds=[1, 2, 3, 4])]).astype(int)
        # A batch size rounds up to whole samples per chip: 3 on 4 chips renders 4, one a chip.
        rounded = [jaxdiff.engine.Pipeline(pipe4.base, batch_size=n, settings=pipe4.settings).batch_size
                   for n in (1, 3, 5)]
        print(json.dumps({"mesh": list(pipe4.mesh.devices.shape), "max_diff": int(np.abs(a - b).max()),
                          "rounded": rounded}))
    elif mode == "mixed":
        # Modes, guidance on and off and a padded short batch, in two orders, on 4 devices
        # at batch 4 against one device at batch 3: each sample's image must not change.
        from jaxdiff import Sample
        rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        mask = np.zeros((16, 16), np.uint8)
        mask[4:12, 2:10] = 255
        samples = [
            Sample(id="t", prompt=prompts[0], seed=1),
            Sample(id="off", prompt=prompts[1], negative_prompt="blurry", seed=2, guidance=1.0),
            Sample(id="i", prompt=prompts[2], mode="img2img", init_image=rgb, strength=0.6, seed=3),
            Sample(id="p", prompt=prompts[3], mode="inpaint", init_image=rgb, mask=mask, strength=0.7, seed=4),
            Sample(id="s", prompt=prompts[0], mode="sketch", init_image=255 - rgb, seed=5, guidance=0.0),
            Sample(id="o", prompt=prompts[1], mode="outpaint", init_image=rgb[:8], outpaint=(0, 0, 0, 8), seed=6),
            Sample(id="d", prompt=prompts[2], guidance=3.0),  # seed derived from the id
        ]
        images, counts = {}, []
        for devices, batch in ((jax.devices(), 4), (jax.devices()[:1], 3)):
            pipe = jaxdiff.load_pipeline(folder, upscaler="none", steps=2, sampler="euler_a", batch_size=batch,
                                         devices=devices)
            for order in (samples, samples[::-1]):
                for s, r in zip(order, pipe.render_samples(order)):
                    assert r.id == s.id and r.error is None, (s.id, r.id, r.error)
                    images.setdefault(s.id, []).append(r.image.astype(int))
            counts.append(pipe.compile_count)
        diffs = {k: max(int(np.abs(v - vs[0]).max()) for v in vs) for k, vs in images.items()}
        print(json.dumps({"max_diff": diffs, "compile_counts": counts}))
    elif mode == "pallas":
        # The TPU attention path inside the engine's batch-sharded programs: each device's
        # kernel call must see only its own samples, and the images must not change. The
        # kernel is stood in for by XLA's attention: Pallas' TPU interpreter does not run
        # under shard_map on CPU devices (its own parity: tests/test_attention.py,
        # tests/test_unet.py).
        from jaxdiff.models import attention
        seen = []
        def kernel(q, k, v):
            seen.append(q.shape[0])
            return jax.nn.dot_product_attention(q, k, v)
        pipe1 = jaxdiff.load_pipeline(folder, upscaler="none", steps=2, sampler="ddim", batch_size=4,
                                      devices=jax.devices()[:1])
        a = np.stack([r.image for r in pipe1.render(prompts, seeds=[1, 2, 3, 4])]).astype(int)
        attention._pallas_tpu_kernel = kernel
        attention.set_attention_implementation("pallas")
        pipe4 = jaxdiff.load_pipeline(folder, upscaler="none", steps=2, sampler="ddim", batch_size=4)
        b = np.stack([r.image for r in pipe4.render(prompts, seeds=[1, 2, 3, 4])]).astype(int)
        kernel_batches, seen[:] = sorted(set(seen)), []
        # A batch of 6 does not split over 4 devices: XLA's attention, not the kernel.
        q = np.random.default_rng(0).standard_normal((6, 128, 2, 8)).astype(np.float32)
        with jax.set_mesh(pipe4.mesh):
            uneven = jax.jit(attention.dot_product_attention)(q, q, q)
        uneven_err = float(np.abs(np.asarray(uneven) - np.asarray(jax.nn.dot_product_attention(q, q, q))).max())
        print(json.dumps({"kernel_batches": kernel_batches, "max_diff": int(np.abs(a - b).max()),
                          "uneven_kernel_calls": len(seen), "uneven_err": uneven_err}))
    elif mode == "cudnn":
        # The GPU dispatch inside the engine's batch-sharded programs, cuDNN stood in for by
        # XLA's attention (no GPU here): its calls must partition over the devices (XLA
        # splits them; the stand-in sees the whole batch's shapes) and change no image.
        from jaxdiff.models import attention
        seen = set()
        def fake_cudnn(q, k, v, **kwargs):
            seen.add((q.shape[0], k.shape[1], q.shape[-1]))
            return jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)
        render = lambda pipe: np.stack([r.image for r in pipe.render(prompts, seeds=[1, 2, 3, 4])]).astype(int)
        load = lambda devices: jaxdiff.load_pipeline(folder, upscaler="none", steps=2, sampler="ddim", batch_size=4,
                                                     dtype="bfloat16", devices=devices)
        plain = render(load(jax.devices()[:1]))
        attention._cudnn = fake_cudnn
        attention.set_attention_backend("gpu")
        one, four = render(load(jax.devices()[:1])), render(load(jax.devices()))
        # JAXDIFF_ATTENTION=tokamax: XLA cannot partition its Mosaic kernel, so each device's
        # call must see only its own samples (stood in for by XLA's attention).
        tokamax_batches = set()
        def fake_tokamax(q, k, v):
            tokamax_batches.add(q.shape[0])
            return jax.nn.dot_product_attention(q, k, v, implementation="xla")
        attention._tokamax = fake_tokamax
        attention.set_attention_implementation("tokamax")
        four_tokamax = render(load(jax.devices()))
        print(json.dumps({"calls": sorted(seen), "four_vs_one": int(np.abs(four - one).max()),
                          "cudnn_vs_plain": int(np.abs(one - plain).max()),
                          "tokamax_batches": sorted(tokamax_batches),
                          "tokamax_vs_one": int(np.abs(four_tokamax - one).max())}))
    elif mode == "fused":
        # The fused GEGLU, layer norm and group norm inside the engine's batch-sharded
        # programs: each device's kernel call must see only its own samples, and the images
        # must not change. The norms are the real kernels, in Pallas' interpreter; tokamax's
        # GEGLU kernel (Hopper GPUs) is stood in for by its formula, every shape sent to it.
        import os
        from jaxdiff.models import geglu, group_norm, layer_norm
        from jaxdiff.models.blocks import gelu
        seen = {"geglu": set(), "layer_norm": set(), "group_norm": set()}
        def recorded(name, kernel):
            def call(x, *args, **kwargs):
                seen[name].add(x.shape[0])
                return kernel(x, *args, **kwargs)
            return call
        render = lambda pipe: np.stack([r.image for r in pipe.render(prompts, seeds=[1, 2, 3, 4])]).astype(int)
        load = lambda devices: jaxdiff.load_pipeline(folder, upscaler="none", steps=2, sampler="ddim", batch_size=4,
                                                     devices=devices)
        plain = render(load(jax.devices()[:1]))
        # Its contract on the folded inputs (the channel of ones from the layer norm kernel).
        glu = lambda x, weights: gelu(x @ weights[:, 0]) * (x @ weights[:, 1])
        geglu.fused_geglu = recorded("geglu", glu)
        layer_norm.fused_layer_norm = recorded("layer_norm", layer_norm.fused_layer_norm)
        group_norm.fused_group_norm = recorded("group_norm", group_norm.fused_group_norm)
        geglu._M_TILE = geglu._N_TILE = 1
        os.environ.update(JAXDIFF_GEGLU="tokamax", JAXDIFF_LAYER_NORM="pallas", JAXDIFF_GROUP_NORM="pallas")
        four = render(load(jax.devices()))
        print(json.dumps({"batches": {k: sorted(v) for k, v in seen.items()},
                          "four_vs_plain": int(np.abs(four - plain).max())}))
    else:
        import time
        t = time.perf_counter()
        pipe = jaxdiff.load_pipeline(folder, upscaler="none", steps=2, sampler="ddim", batch_size=1)
        pipe.render(prompts[:1], seeds=[1])
        print(json.dumps({"seconds": time.perf_counter() - t}))
""")


def _run(args, env):
    out = subprocess.run([sys.executable, "-c", SCRIPT, *args], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_sd_folder(str(tmp_path_factory.mktemp("sd") / "sd"))


def test_batch_sharded_over_four_devices_matches_one_device(folder, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAXDIFF_CACHE_DIR=str(tmp_path / "cache"))
    result = _run([folder, "devices"], env)
    assert result["mesh"] == [4]
    assert result["max_diff"] <= 1
    assert result["rounded"] == [4, 4, 8], result  # batch sizes 1, 3, 5 on 4 devices


def test_mixed_modes_render_the_same_on_four_devices_and_on_one_at_another_batch_size(folder, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAXDIFF_CACHE_DIR=str(tmp_path / "cache"))
    result = _run([folder, "mixed"], env)
    # Other per-device batches may reorder float sums: at most one uint8 level.
    assert max(result["max_diff"].values()) <= 1, result
    # Base with CFG, base without (guidance <= 1) and the VAE encoder, however many batches.
    assert result["compile_counts"] == [3, 3], result


def test_tpu_attention_runs_per_device_inside_sharded_programs(folder, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAXDIFF_CACHE_DIR=str(tmp_path / "cache"))
    result = _run([folder, "pallas"], env)
    # CFG doubles the 4 prompts to 8 for the UNet (2 per device); the VAE decodes the
    # 4 images (1 per device). Never the whole batch on one device.
    assert result["kernel_batches"] == [1, 2], result
    assert result["max_diff"] <= 1
    assert result["uneven_kernel_calls"] == 0 and result["uneven_err"] < 1e-5, result


def test_gpu_attention_dispatch_runs_per_device_inside_sharded_programs(folder, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAXDIFF_CACHE_DIR=str(tmp_path / "cache"))
    result = _run([folder, "cudnn"], env)
    # (UNet batch with CFG, keys, head dim as cuDNN got it): the UNet's text attention
    # at head dim 8.
    assert [8, 77, 8] in result["calls"], result
    assert result["four_vs_one"] <= 1 and result["cudnn_vs_plain"] <= 1, result
    # CFG's 8 UNet rows, 2 per device; the part before the context (and the VAE) 1 per device.
    assert result["tokamax_batches"] == [1, 2] and result["tokamax_vs_one"] <= 1, result


def test_fused_kernels_run_per_device_inside_sharded_programs(folder, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAXDIFF_CACHE_DIR=str(tmp_path / "cache"))
    result = _run([folder, "fused"], env)
    # CFG doubles the 4 prompts to 8 UNet rows, 2 per device; the first transformer's
    # self attention (and its layer norm) runs once per sample, 1 per device, as do the
    # resnets before it and the VAE's group norms. Never the whole batch on one device.
    assert result["batches"] == {"geglu": [2], "layer_norm": [1, 2], "group_norm": [1, 2]}, result
    assert result["four_vs_plain"] <= 1, result


def test_second_process_reuses_compiled_programs(folder, tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXDIFF_CACHE_DIR=str(cache))
    _run([folder, "cache"], env)
    entries = set(os.listdir(cache))
    assert entries, "the first process wrote no compiled programs to the cache"
    _run([folder, "cache"], env)
    assert set(os.listdir(cache)) == entries, "the second process compiled again"
