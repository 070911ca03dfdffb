"""Loading diffusers pipeline folders: streaming safetensors, local and gs://, strict errors."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxdiff import storage
from jaxdiff.weights.convert import CheckpointError, to_nnx_layout
from jaxdiff.weights.family import InitKeys, load_component, load_family
from jaxdiff.weights.safetensors_stream import SafetensorsStream
from tools.random_family import write_char_tokenizer

UNET_WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")


def _tool(name: str):
    return importlib.import_module(f"tools.{name}")


# --- a tiny pipeline folder, saved by diffusers / transformers themselves ----------------

def _randomised(module, scale=0.2):
    import torch

    # Default inits (ones, zeros) could hide a wrong mapping: perturb everything.
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module.eval()


def _make_sd_folder(path: str):
    """Saves a tiny StableDiffusionPipeline; returns its torch modules."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    vocab_size = write_char_tokenizer(os.path.join(path, "tokenizer"))
    tokenizer = transformers.CLIPTokenizer(os.path.join(path, "tokenizer", "vocab.json"),
                                           os.path.join(path, "tokenizer", "merges.txt"))
    text_encoder = _randomised(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=12, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=11, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, projection_dim=12)))
    unet = _randomised(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 12),
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    vae = _randomised(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        block_out_channels=(8, 12), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(path, safe_serialization=True)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sd-tiny"))
    return path, _make_sd_folder(path)


@pytest.fixture(scope="module")
def sd_family(sd_folder):
    return load_family(sd_folder[0])


def _copy_component(src_folder: str, dst_folder: str, name: str = "unet") -> str:
    shutil.copytree(os.path.join(src_folder, name), os.path.join(dst_folder, name))
    return dst_folder


def _params(module) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _assert_params_equal_torch(module, torch_module, prefix: str = ""):
    """Every torch parameter equals the NNX leaf it maps to, and nothing is left over."""
    params = _params(module)
    seen = set()
    for key, tensor in torch_module.state_dict().items():
        if key.endswith("position_ids"):
            continue
        path = tuple(int(p) if p.isdigit() else p for p in (prefix + key).split("."))
        leaves = ("kernel", "scale", "embedding") if path[-1] == "weight" else (path[-1],)
        target = next(path[:-1] + (leaf,) for leaf in leaves if path[:-1] + (leaf,) in params)
        want = to_nnx_layout(target[-1], tensor.numpy(), params[target].shape)
        np.testing.assert_array_equal(params[target], want, err_msg=key)
        seen.add(target)
    assert seen == set(params)


# --- streaming safetensors ------------------------------------------------------------

def test_stream_reads_each_dtype_and_hashes_the_whole_file(tmp_path):
    import ml_dtypes

    tensors = {
        "b.f32": np.arange(35, dtype=np.float32).reshape(5, 7),
        "a.f16": np.linspace(-1, 1, 6, dtype=np.float16),
        "c.bf16": np.array([1.5, -2.0, 3.25], dtype=ml_dtypes.bfloat16),
        "d.i64": np.array([3, 1], dtype=np.int64),
        "e.empty": np.zeros((0, 3), np.float32),
    }
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    stream = SafetensorsStream(path)
    assert stream.sha256 is None  # known only once every byte was read
    got = dict(stream)
    assert set(got) == set(tensors)
    for key, value in tensors.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape
        np.testing.assert_array_equal(got[key].astype(np.float64), value.astype(np.float64))
    with open(path, "rb") as f:
        assert stream.sha256 == hashlib.sha256(f.read()).hexdigest()


def test_stream_hashes_a_file_whose_header_lists_tensors_out_of_data_order(tmp_path):
    """Writers other than safetensors' own may list tensors in any order: the file still
    reads whole and gets its sha256 (a weights file without one would drop out of the
    fingerprint a resumed run checks)."""
    path = str(tmp_path / "t.safetensors")
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32),
               "c": np.full(3, 7, np.float32)}
    save_file(tensors, path)
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    listed = dict(sorted(header.items(), key=lambda kv: -kv[1]["data_offsets"][0] if "data_offsets" in kv[1] else 1))
    assert list(listed) != list(header)
    text = json.dumps(listed, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    with open(path, "wb") as f:
        f.write(raw[:8] + text + raw[8 + n:])
    stream = SafetensorsStream(path)
    got = dict(stream)
    for key, value in tensors.items():
        np.testing.assert_array_equal(got[key], value)
    with open(path, "rb") as f:
        assert stream.sha256 == hashlib.sha256(f.read()).hexdigest()


@pytest.mark.faults
def test_a_header_whose_byte_span_does_not_fit_the_shape_names_the_tensor(tmp_path):
    """A corrupt safetensors header (a tensor's byte range too short for its shape) is a
    CheckpointError naming the file and tensor, before any tensor is read."""
    path = str(tmp_path / "t.safetensors")
    save_file({"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}, path)
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["a"]["shape"] = [2, 2]  # 16 bytes for a 24-byte span
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    with open(path, "wb") as f:
        f.write(raw[:8] + text + raw[8 + n:])
    with pytest.raises(CheckpointError, match=r"tensor 'a' spans bytes 0\.\.24, which does not fit its shape "
                                              r"\(2, 2\) and dtype F32") as info:
        SafetensorsStream(path)
    assert str(info.value).startswith(path)


# --- loading a pipeline folder -----------------------------------------------------------

def test_loaded_family_equals_the_torch_modules(sd_folder, sd_family):
    path, torch_modules = sd_folder
    family = sd_family
    assert family.kind == "text2image" and family.dtype == jnp.float32  # CPU default
    _assert_params_equal_torch(family.unet, torch_modules["unet"])
    _assert_params_equal_torch(family.vae, torch_modules["vae"])
    _assert_params_equal_torch(family.text_encoder, torch_modules["text_encoder"], prefix="text_model.")
    with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
        assert family.scheduler_config == json.load(f)
    assert family.low_res_scheduler_config is None and family.max_noise_level is None
    with open(os.path.join(path, "tokenizer", "vocab.json")) as f:
        vocab = json.load(f)
    assert family.tokenizer("cab")["input_ids"] == [vocab[t] for t in
                                                    ("<|startoftext|>", "c", "a", "b</w>", "<|endoftext|>")]
    # Every file read is fingerprinted, weights included.
    for rel in (UNET_WEIGHTS, "text_encoder/model.safetensors", "model_index.json",
                "vae/config.json", "tokenizer/vocab.json"):
        with open(os.path.join(path, rel), "rb") as f:
            assert family.sha256[rel] == hashlib.sha256(f.read()).hexdigest(), rel


def test_schedules_and_recommended_settings_are_fingerprinted(tmp_path):
    """The noise schedules and render_defaults.json decide the images as much as the weights:
    each is in the family's sha256 (what a resumed run compares), so editing one is seen."""
    from tiny_models import make_upscaler_folder

    folder = make_upscaler_folder(str(tmp_path / "x4"))
    with open(os.path.join(folder, "render_defaults.json"), "w") as f:
        json.dump({"guidance": 3.0}, f)
    family = load_family(folder)
    for rel in ("scheduler/scheduler_config.json", "low_res_scheduler/scheduler_config.json",
                "render_defaults.json", "unet/diffusion_pytorch_model.safetensors"):
        with open(os.path.join(folder, rel), "rb") as f:
            assert family.sha256.get(rel) == hashlib.sha256(f.read()).hexdigest(), rel


@pytest.mark.parity
def test_loaded_family_forward_matches_torch(sd_folder, sd_family):
    import torch

    _, torch_modules = sd_folder
    family = sd_family
    gen = torch.Generator().manual_seed(3)
    ids = torch.tensor([[0, 5, 9, 30, 1, 1, 1]])
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        context = torch_modules["text_encoder"](ids).last_hidden_state
        noise = torch_modules["unet"](sample, torch.tensor([417]), context).sample
        image = torch_modules["vae"].decode(sample).sample
    got_context = family.text_encoder(ids.numpy()).last_hidden_state
    got_noise = family.unet(sample.numpy().transpose(0, 2, 3, 1), jnp.array([417]), context.numpy())
    got_image = family.vae.decode(sample.numpy().transpose(0, 2, 3, 1))
    # fp32 on CPU: differences are summation order only.
    np.testing.assert_allclose(got_context, context.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_noise, noise.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_image, image.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)


def _upload(local_folder: str, url: str) -> None:
    bucket_name, _, prefix = url[len("gs://"):].partition("/")
    bucket = storage.gcs_client().bucket(bucket_name)
    for root, _, files in os.walk(local_folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local_folder)
            bucket.blob(f"{prefix}/{rel}").upload_from_filename(os.path.join(root, name))


def test_gcs_folder_loads_the_same_weights(sd_folder, sd_family, gcs_bucket):
    url = f"gs://{gcs_bucket}/weights-test/sd-tiny"
    _upload(sd_folder[0], url)
    family = load_family(url + "/")
    assert family.path == url and family.kind == "text2image"
    for name in ("unet", "vae", "text_encoder"):
        local, remote = _params(getattr(sd_family, name)), _params(getattr(family, name))
        assert local.keys() == remote.keys()
        for key in local:
            np.testing.assert_array_equal(local[key], remote[key])
    assert family.sha256 == sd_family.sha256
    assert family.tokenizer("cab")["input_ids"] == sd_family.tokenizer("cab")["input_ids"]


def test_sharded_checkpoint_bf16_and_explicit_sharding(sd_folder, tmp_path):
    folder = _copy_component(sd_folder[0], str(tmp_path))
    weights = os.path.join(folder, UNET_WEIGHTS)
    tensors = load_file(weights)
    os.remove(weights)
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, os.path.join(folder, "unet", name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)

    device = jax.devices()[0]
    loaded = load_component(folder, "unet", dtype=jnp.bfloat16,
                            sharding=jax.sharding.SingleDeviceSharding(device))
    reference = load_component(sd_folder[0], "unet", dtype=jnp.float32)
    got, want = _params(loaded.module), _params(reference.module)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == jnp.bfloat16
        np.testing.assert_array_equal(got[key], want[key].astype(jnp.bfloat16))
    assert all(x.sharding == jax.sharding.SingleDeviceSharding(device)
               for x in jax.tree.leaves(nnx.state(loaded.module, nnx.Param)))
    assert len([k for k in loaded.sha256 if k.endswith(".safetensors")]) == 2


@pytest.mark.faults
def test_a_shard_index_naming_files_outside_the_folder_is_refused(sd_folder, tmp_path):
    """A sharded index may only name shard files in its own component folder: a weight_map
    pointing elsewhere (`../`) is refused, naming the index, rather than loading some other
    file's tensors; an index with no tensors at all is named as such."""
    folder = _copy_component(sd_folder[0], str(tmp_path / "family"))
    weights = os.path.join(folder, UNET_WEIGHTS)
    outside = str(tmp_path / "outside.safetensors")
    shutil.move(weights, outside)  # a complete, loadable file: only the index's name is wrong
    index_path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors.index.json")
    with open(index_path, "w") as f:
        json.dump({"weight_map": {k: "../../outside.safetensors" for k in load_file(outside)}}, f)
    with pytest.raises(CheckpointError, match=r"shard name '\.\./\.\./outside\.safetensors' must be a plain "
                                              r"file name") as info:
        load_component(folder, "unet")
    assert str(info.value).startswith(index_path)
    with open(index_path, "w") as f:
        json.dump({"metadata": {}, "weight_map": {}}, f)
    with pytest.raises(CheckpointError, match=r"has no 'weight_map' of tensor name -> file") as info:
        load_component(folder, "unet")
    assert str(info.value).startswith(index_path)


def test_legacy_vae_attention_names_load(sd_folder, tmp_path):
    folder = _copy_component(sd_folder[0], str(tmp_path), "vae")
    weights = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for key, value in load_file(weights).items():
        for new, old in legacy.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        tensors[key] = value
    assert any(".query." in k for k in tensors)
    save_file(tensors, weights)
    _assert_params_equal_torch(load_component(folder, "vae").module, sd_folder[1]["vae"])


def test_a_text_encoder_file_with_its_position_ids_buffer_loads(sd_folder, tmp_path):
    """SD 1.x's published text_encoder/model.safetensors holds the `position_ids` buffer
    older transformers saved: it is not a parameter, and the file loads."""
    folder = _copy_component(sd_folder[0], str(tmp_path), "text_encoder")
    weights = os.path.join(folder, "text_encoder", "model.safetensors")
    tensors = load_file(weights)
    positions = sd_folder[1]["text_encoder"].config.max_position_embeddings
    tensors["text_model.embeddings.position_ids"] = np.arange(positions, dtype=np.int64)[None]
    save_file(tensors, weights, metadata={"format": "pt"})
    loaded = load_component(folder, "text_encoder")
    _assert_params_equal_torch(loaded.module, sd_folder[1]["text_encoder"], prefix="text_model.")


@pytest.mark.parametrize("in_channels,kind", [(9, "inpaint"), (7, "upscale")])
def test_kind_follows_unet_in_channels(sd_folder, tmp_path, in_channels, kind):
    folder = str(tmp_path / "family")
    shutil.copytree(sd_folder[0], folder)
    config_path = os.path.join(folder, "unet", "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["in_channels"] = in_channels
    with open(config_path, "w") as f:
        json.dump(config, f)
    weights = os.path.join(folder, UNET_WEIGHTS)
    tensors = load_file(weights)
    tensors["conv_in.weight"] = np.ones((8, in_channels, 3, 3), np.float32)
    save_file(tensors, weights)
    if kind == "upscale":
        with pytest.raises(CheckpointError, match="low_res_scheduler/scheduler_config.json"):
            load_family(folder)
        shutil.copytree(os.path.join(folder, "scheduler"), os.path.join(folder, "low_res_scheduler"))
        with pytest.raises(CheckpointError, match="max_noise_level"):
            load_family(folder)
        index_path = os.path.join(folder, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        with open(index_path, "w") as f:
            json.dump(dict(index, max_noise_level=350), f)
    family = load_family(folder)
    assert family.kind == kind
    assert family.unet.conv_in.kernel.shape == (3, 3, in_channels, 8)
    if kind == "upscale":
        assert family.max_noise_level == 350
        assert family.low_res_scheduler_config == family.scheduler_config


# --- the random full-size checkpoint tool and the memory measurement -----------------------

def test_random_checkpoint_tensor_names_match_diffusers():
    import torch
    from diffusers import UNet2DConditionModel

    tool = _tool("make_random_checkpoint")
    tiny = dict(block_out_channels=[8, 12], layers_per_block=1, cross_attention_dim=12,
                attention_head_dim=2, norm_num_groups=4, in_channels=4, out_channels=4,
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    variants = [
        {k: v for k, v in tool.SD15_UNET_CONFIG.items() if not k.startswith("_")},
        tiny,
        dict(tiny, use_linear_projection=True, transformer_layers_per_block=2, num_class_embeds=5,
             in_channels=7, only_cross_attention=[True, False], layers_per_block=[1, 2]),
    ]
    for config in variants:
        with torch.device("meta"):  # shapes only, no memory
            reference = UNet2DConditionModel(**config).state_dict()
        assert tool.unet_tensor_shapes(config) == {k: tuple(v.shape) for k, v in reference.items()}
    sd15 = tool.unet_tensor_shapes(tool.SD15_UNET_CONFIG)
    assert sum(math.prod(s) for s in sd15.values()) == 859_520_964


def test_random_checkpoint_loads_and_memory_is_measured(tmp_path):
    config = {"block_out_channels": [8, 12], "layers_per_block": 1, "cross_attention_dim": 12,
              "attention_head_dim": 2, "norm_num_groups": 4,
              "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    out = str(tmp_path / "ckpt")
    assert _tool("make_random_checkpoint").main(["--config", str(config_path), "--out", out]) == 0
    figures = _tool("measure_load_memory").measure(out, "unet")
    weights = os.path.join(out, UNET_WEIGHTS)
    assert figures["checkpoint_bytes"] == os.path.getsize(weights)
    assert figures["param_bytes"] == sum(v.nbytes for v in load_file(weights).values())
    assert figures["peak_rss"] >= figures["baseline_rss"] > 0


# --- bad checkpoints ----------------------------------------------------------------------

def _rewrite_unet(folder: str, change) -> str:
    weights = os.path.join(folder, UNET_WEIGHTS)
    tensors = load_file(weights)
    change(tensors)
    save_file(tensors, weights)
    return weights


@pytest.mark.faults
def test_missing_file_names_the_expected_file(sd_folder, tmp_path):
    folder = _copy_component(sd_folder[0], str(tmp_path))
    with pytest.raises(CheckpointError, match=r"missing file .*model_index\.json"):
        load_family(folder)
    os.remove(os.path.join(folder, UNET_WEIGHTS))
    with pytest.raises(CheckpointError, match=r"missing file .*unet.diffusion_pytorch_model\.safetensors"):
        load_component(folder, "unet")
    os.remove(os.path.join(folder, "unet", "config.json"))
    with pytest.raises(CheckpointError, match=r"missing file .*unet.config\.json"):
        load_component(folder, "unet")


def _save_variant(sd_path: str, out: str, variant: str, torch_dtype_name: str) -> dict:
    """Saves the tiny pipeline again as diffusers' `variant` files; returns its torch modules."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_path, safety_checker=None, requires_safety_checker=False)
    pipe.to(getattr(torch, torch_dtype_name))
    pipe.save_pretrained(out, variant=variant, safe_serialization=True)
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}


@pytest.mark.parity
def test_fp16_variant_files_load_as_diffusers_loads_them(sd_folder, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel

    only_fp16 = str(tmp_path / "only-fp16")
    _save_variant(sd_folder[0], only_fp16, "fp16", "float16")
    assert os.path.exists(os.path.join(only_fp16, "unet", "diffusion_pytorch_model.fp16.safetensors"))
    assert not os.path.exists(os.path.join(only_fp16, UNET_WEIGHTS))
    want = UNet2DConditionModel.from_pretrained(only_fp16, subfolder="unet", variant="fp16",
                                                torch_dtype=torch.float16)
    assert want.dtype == torch.float16
    # The only weights there are: loaded without being asked, and when asked.
    for family in (load_family(only_fp16), load_family(only_fp16, variant="fp16")):
        _assert_params_equal_torch(family.unet, want)
        assert "unet/diffusion_pytorch_model.fp16.safetensors" in family.sha256
        assert "text_encoder/model.fp16.safetensors" in family.sha256

    # Plain and fp16 files side by side: plain unless the variant is asked for.
    both = str(tmp_path / "both")
    shutil.copytree(sd_folder[0], both)
    _save_variant(sd_folder[0], both, "fp16", "float16")
    _assert_params_equal_torch(load_family(both).unet, sd_folder[1]["unet"])
    _assert_params_equal_torch(load_family(both, variant="fp16").unet, want)

    # A sharded variant, as diffusers writes it: its shards are not taken for variants.
    sharded = str(tmp_path / "sharded")
    want.save_pretrained(os.path.join(sharded, "unet"), variant="fp16", max_shard_size="20KB")
    names = os.listdir(os.path.join(sharded, "unet"))
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in names and len(names) > 3
    for variant in (None, "fp16"):
        _assert_params_equal_torch(load_component(sharded, "unet", variant=variant).module, want)


@pytest.mark.parity
def test_a_variant_some_components_lack_loads_their_plain_files_as_diffusers(sd_folder, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    # fp16 files for the UNet and VAE, only the plain file for the text encoder.
    partial = str(tmp_path / "partial")
    shutil.copytree(sd_folder[0], partial)
    _save_variant(sd_folder[0], partial, "fp16", "float16")
    os.remove(os.path.join(partial, "text_encoder", "model.fp16.safetensors"))
    theirs = StableDiffusionPipeline.from_pretrained(partial, variant="fp16", dtype=torch.float16,
                                                     safety_checker=None, requires_safety_checker=False)
    family = load_family(partial, variant="fp16")
    _assert_params_equal_torch(family.unet, theirs.unet)
    _assert_params_equal_torch(family.text_encoder, sd_folder[1]["text_encoder"], prefix="text_model.")
    # The files read are the ones recorded.
    assert {"unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/model.safetensors"} <= set(family.sha256)
    assert not {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.fp16.safetensors"} & set(family.sha256)

    # Neither the variant's files nor plain ones: the component's error names both.
    os.remove(os.path.join(partial, "text_encoder", "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"text_encoder.model\.safetensors .*none in variant 'fp16', "
                                              r"and no plain ones"):
        load_family(partial, variant="fp16")
    # No component has the variant: refused, unless the caller allows the plain files.
    with pytest.raises(CheckpointError, match=r"variant 'bf16'; variants here: none"):
        load_family(sd_folder[0], variant="bf16")
    _assert_params_equal_torch(load_family(sd_folder[0], variant="bf16", require_variant=False).unet,
                               sd_folder[1]["unet"])


def test_a_hub_id_loads_from_the_local_hugging_face_cache(sd_folder, sd_family, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from jaxdiff.checkpoints import default_model_path, resolve_model

    # The cache layout huggingface_hub writes: refs/main names the snapshot folder.
    repo = tmp_path / "hub" / "models--tiny--sd"
    snapshot = repo / "snapshots" / "0123abc"
    shutil.copytree(sd_folder[0], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    family = load_family("tiny/sd")
    assert family.path == str(snapshot)
    for key, value in _params(sd_family.unet).items():
        np.testing.assert_array_equal(_params(family.unet)[key], value)
    with pytest.raises(FileNotFoundError, match=r"'tiny/absent' is no folder here and not in the local "
                                                r"Hugging Face cache"):
        load_family("tiny/absent")
    assert resolve_model("default") == default_model_path()
    assert resolve_model(sd_folder[0]) == sd_folder[0]  # a folder is itself



def test_a_hub_id_is_looked_up_without_contacting_the_hub(sd_folder, tmp_path, monkeypatch):
    """A Hub id resolves from the local cache alone, also where the Hub could be reached:
    a render never talks to the Hub, let alone downloads a model."""
    import huggingface_hub
    from huggingface_hub import constants

    from jaxdiff.checkpoints import resolve_model

    repo = tmp_path / "hub" / "models--tiny--sd"
    shutil.copytree(sd_folder[0], repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # As if the network were up: any call to the Hub is recorded.
    contacted = []

    def repo_info(self, repo_id, *args, **kwargs):
        contacted.append(repo_id)
        raise AssertionError(f"the Hub was asked about {repo_id}")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_model("tiny/sd") == str(repo / "snapshots" / "0123abc")
    with pytest.raises(FileNotFoundError, match=r"not in the local Hugging Face cache .*: download it "
                                                r"there first \(`hf download tiny/absent`\)"):
        resolve_model("tiny/absent")
    assert contacted == []


def test_a_relative_path_that_is_no_hub_id_is_left_to_the_loader(tmp_path, monkeypatch):
    """A missing relative folder such as `models/sd15/base` is no `owner/name` Hub id: it is
    passed on as given, so the error names the missing folder instead of telling the user to
    download `models/sd15/base` from the Hub."""
    from jaxdiff.checkpoints import resolve_model

    monkeypatch.chdir(tmp_path)
    assert resolve_model("models/sd15/base") == "models/sd15/base"
    with pytest.raises(Exception) as info:
        load_family("models/sd15/base")
    assert "hf download" not in str(info.value) and "models/sd15/base" in str(info.value)

@pytest.mark.faults
def test_a_missing_or_ambiguous_variant_names_the_files(sd_folder, tmp_path):
    with pytest.raises(CheckpointError, match=r"unet.diffusion_pytorch_model\.bf16\.safetensors .*"
                                              r"variant 'bf16'; variants here: none"):
        load_family(sd_folder[0], variant="bf16")
    two = str(tmp_path / "two")
    _save_variant(sd_folder[0], two, "fp16", "float16")
    _save_variant(sd_folder[0], two, "ema", "float32")
    with pytest.raises(CheckpointError, match=r"no plain weights but variants ema, fp16; choose one"):
        load_family(two)
    assert load_family(two, variant="ema").unet is not None


@pytest.mark.faults
@pytest.mark.parametrize("keep,message", [(5, "truncated safetensors file"),
                                          (100, "truncated safetensors header"),
                                          (-7, "truncated safetensors data: tensor 'up_blocks")])
def test_truncated_safetensors_is_refused(sd_folder, tmp_path, keep, message):
    folder = _copy_component(sd_folder[0], str(tmp_path))
    weights = os.path.join(folder, UNET_WEIGHTS)
    size = os.path.getsize(weights)
    os.truncate(weights, keep if keep > 0 else size + keep)
    with pytest.raises(CheckpointError, match=message) as info:
        load_component(folder, "unet")
    assert weights in str(info.value)


@pytest.mark.faults
def test_wrong_shape_names_file_and_key(sd_folder, tmp_path):
    folder = _copy_component(sd_folder[0], str(tmp_path))
    weights = _rewrite_unet(folder, lambda t: t.update({"conv_in.bias": np.zeros(9, np.float32)}))
    with pytest.raises(CheckpointError, match=r"'conv_in\.bias' has shape \(9,\)") as info:
        load_component(folder, "unet")
    assert weights in str(info.value)
    # Kernels: the expected shape in the checkpoint's own (PyTorch) layout, as the key's is.
    out_ch, in_ch = load_file(weights)["conv_in.weight"].shape[:2]

    def nine_channel_conv_in(tensors):  # an inpainting UNet's weights under a 4-channel config
        tensors["conv_in.bias"] = np.zeros(out_ch, np.float32)
        tensors["conv_in.weight"] = np.zeros((out_ch, 9, 3, 3), np.float32)
    _rewrite_unet(folder, nine_channel_conv_in)
    expected = rf"'conv_in\.weight' has shape \({out_ch}, 9, 3, 3\), the model expects \({out_ch}, {in_ch}, 3, 3\)"
    with pytest.raises(CheckpointError, match=expected + r" \(in PyTorch layout\)"):
        load_component(folder, "unet")


@pytest.mark.faults
def test_a_conv_kernel_wider_than_1x1_for_a_linear_is_refused(sd_folder, tmp_path):
    folder = _copy_component(sd_folder[0], str(tmp_path))
    key = "down_blocks.0.attentions.0.proj_in.weight"
    weights = _rewrite_unet(folder, lambda t: t.update({key: np.tile(t[key], (1, 1, 3, 3))}))
    with pytest.raises(CheckpointError, match=r"proj_in\.weight' has shape \(\d+, \d+, 3, 3\)"):
        load_component(folder, "unet")
    assert os.path.exists(weights)


@pytest.mark.faults
def test_two_keys_for_one_parameter_are_refused(sd_folder, tmp_path):
    folder = _copy_component(sd_folder[0], str(tmp_path), "vae")
    weights = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
    tensors = load_file(weights)
    current = next(k for k in tensors if ".attentions.0.to_q.weight" in k)
    tensors[current.replace(".to_q.", ".query.")] = tensors[current]  # the legacy name too
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match="already filled; keep one of the two"):
        load_component(folder, "vae")


@pytest.mark.faults
def test_unknown_key_names_file_and_key(sd_folder, tmp_path):
    folder = _copy_component(sd_folder[0], str(tmp_path))
    weights = _rewrite_unet(folder, lambda t: t.update({"extra_head.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected key 'extra_head\.weight'") as info:
        load_component(folder, "unet")
    assert weights in str(info.value)


@pytest.mark.faults
def test_an_unknown_text_encoder_key_is_named_as_in_the_file(sd_folder, tmp_path):
    # A CLIPTextModelWithProjection's file: its projection has no place in a CLIPTextModel.
    folder = _copy_component(sd_folder[0], str(tmp_path), "text_encoder")
    weights = os.path.join(folder, "text_encoder", "model.safetensors")
    tensors = load_file(weights)
    tensors["text_projection.weight"] = np.zeros((12, 12), np.float32)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"unexpected key 'text_projection\.weight'") as info:
        load_component(folder, "text_encoder")
    assert weights in str(info.value) and "text_model.text_projection" not in str(info.value)


@pytest.mark.faults
def test_missing_key_names_file_and_key(sd_folder, tmp_path):
    folder = _copy_component(sd_folder[0], str(tmp_path))
    weights = _rewrite_unet(folder, lambda t: t.pop("conv_out.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys conv_out\.weight$") as info:
        load_component(folder, "unet")
    assert weights in str(info.value)


@pytest.mark.faults
def test_pickle_is_refused_unless_allowed(sd_folder, tmp_path):
    import torch

    folder = _copy_component(sd_folder[0], str(tmp_path))
    os.remove(os.path.join(folder, UNET_WEIGHTS))
    pickle_path = os.path.join(folder, "unet", "diffusion_pytorch_model.bin")
    torch.save(sd_folder[1]["unet"].state_dict(), pickle_path)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin: pickle .*safe_serialization=True"):
        load_component(folder, "unet")
    with pytest.raises(CheckpointError, match="pickle"):
        load_family(pickle_path)
    loaded = load_component(folder, "unet", allow_pickle=True)
    _assert_params_equal_torch(loaded.module, sd_folder[1]["unet"])
    with open(pickle_path, "rb") as f:
        assert loaded.sha256[pickle_path] == hashlib.sha256(f.read()).hexdigest()

    # Beside a lone safetensors variant (non-EMA weights, say) the plain pickle is still the
    # model's weights, as diffusers loads them: the variant does not stand in for them.
    other = {k: v.numpy() + 1 for k, v in sd_folder[1]["unet"].state_dict().items()}
    save_file(other, os.path.join(folder, "unet", "diffusion_pytorch_model.non_ema.safetensors"))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin: pickle .*variant='non_ema'"):
        load_component(folder, "unet")
    _assert_params_equal_torch(load_component(folder, "unet", allow_pickle=True).module, sd_folder[1]["unet"])
    as_variant = load_component(folder, "unet", variant="non_ema").module
    assert np.allclose(np.asarray(as_variant.conv_in.bias.get_value()), other["conv_in.bias"])
    # SD 1.5's own unet folder: .bin, .fp16.safetensors and .non_ema.safetensors.
    save_file(other, os.path.join(folder, "unet", "diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin: pickle .*variant= one of fp16, non_ema"):
        load_component(folder, "unet")
    _assert_params_equal_torch(load_component(folder, "unet", allow_pickle=True).module, sd_folder[1]["unet"])


def test_a_bfloat16_pickle_checkpoint_loads_its_values(sd_folder, tmp_path):
    """A trusted .bin saved in bfloat16 (as many fine-tunes are) loads the same numbers
    torch holds, not their bit patterns read as integers."""
    import torch

    folder = _copy_component(sd_folder[0], str(tmp_path))
    os.remove(os.path.join(folder, UNET_WEIGHTS))
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd_folder[1]["unet"].state_dict().items()}
    torch.save(bf16, os.path.join(folder, "unet", "diffusion_pytorch_model.bin"))
    loaded = _params(load_component(folder, "unet", allow_pickle=True).module)
    want = bf16["conv_in.weight"].float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(loaded[("conv_in", "kernel")], want)


def test_a_trainers_ckpt_wrapping_its_state_dict_loads(sd_folder, tmp_path):
    """A trusted .ckpt as training frameworks save it, {"state_dict": {...}}, loads the
    tensors inside the wrapper."""
    import torch

    folder = _copy_component(sd_folder[0], str(tmp_path))
    os.remove(os.path.join(folder, UNET_WEIGHTS))
    torch.save({"state_dict": sd_folder[1]["unet"].state_dict(), "global_step": 7},
               os.path.join(folder, "unet", "diffusion_pytorch_model.ckpt"))
    _assert_params_equal_torch(load_component(folder, "unet", allow_pickle=True).module, sd_folder[1]["unet"])


@pytest.mark.faults
def test_unsupported_config_names_the_config_file(sd_folder, tmp_path):
    folder = _copy_component(sd_folder[0], str(tmp_path))
    config_path = os.path.join(folder, "unet", "config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump(dict(config, mid_block_type="UNetMidBlock2DSimpleCrossAttn"), f)
    with pytest.raises(ValueError, match="mid_block_type") as info:
        load_component(folder, "unet")
    assert type(info.value).__name__ == "UnsupportedConfig"
    assert str(info.value).startswith(config_path)


@pytest.mark.faults
@pytest.mark.parametrize("content,message", [
    ('{"guidance": 4.0, "cfg": 2}', "unknown setting.*cfg.*may set steps, sampler, guidance"),
    ('{"sampler": "plms"}', "unknown sampler 'plms'"),
    ('{"steps": 0}', "steps is 0"),
    ('{"noise_level": 5}', "unknown setting.*noise_level"),  # a base model has no noise level
    ('{"guidance": 4.0', "not valid JSON"),
    ('{"guidance": NaN}', "guidance is nan; use a finite number"),  # else every sample fails unnamed
    ('{"steps": 5000}', r"steps is 5000; use 1 to 1000 \(the model's num_train_timesteps\)")])
def test_bad_render_defaults_name_the_file(sd_folder, tmp_path, content, message):
    folder = str(tmp_path / "family")
    shutil.copytree(sd_folder[0], folder)
    path = os.path.join(folder, "render_defaults.json")
    with open(path, "w") as f:
        f.write(content)
    with pytest.raises(CheckpointError, match=message) as info:
        load_family(folder)
    assert str(info.value).startswith(path)


@pytest.mark.faults
def test_an_upscalers_render_defaults_keep_under_its_max_noise_level(tmp_path):
    from tiny_models import make_upscaler_folder

    folder = make_upscaler_folder(str(tmp_path / "x4"))
    path = os.path.join(folder, "render_defaults.json")
    with open(path, "w") as f:
        json.dump({"guidance": 3.0, "noise_level": 20}, f)
    assert load_family(folder).render_defaults == {"guidance": 3.0, "noise_level": 20}
    with open(path, "w") as f:  # the highest level the model takes is one it may recommend
        json.dump({"noise_level": 350}, f)
    assert load_family(folder).render_defaults == {"noise_level": 350}
    with open(path, "w") as f:
        json.dump({"noise_level": 351}, f)
    with pytest.raises(CheckpointError, match="noise_level 351 is above the model's max_noise_level 350") as info:
        load_family(folder)
    assert str(info.value).startswith(path)


def _settings_folder(path, *, in_channels=4, scheduler="DDIMScheduler", time_cond_proj_dim=None, train_steps=1000,
                     defaults=None):
    """The files render_defaults.read looks at: the UNet and scheduler configs, and the
    folder's own render_defaults.json if `defaults` is given."""
    for rel, value in (("unet/config.json", {"in_channels": in_channels, "time_cond_proj_dim": time_cond_proj_dim}),
                       ("scheduler/scheduler_config.json", {"_class_name": scheduler, "num_train_timesteps": train_steps})):
        os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
        with open(os.path.join(path, rel), "w") as f:
            json.dump(value, f)
    if defaults is not None:
        with open(os.path.join(path, "render_defaults.json"), "w") as f:
            json.dump(defaults, f)
    return str(path)


def test_a_folders_own_settings_win_over_what_its_lcm_scheduler_implies(tmp_path):
    """An LCM folder's render_defaults.json is what its makers measured: its guidance or
    steps replace LCM's usual 8.5 and 4, which still fill what the file leaves out."""
    from jaxdiff import render_defaults

    folder = _settings_folder(tmp_path / "lcm", scheduler="LCMScheduler", time_cond_proj_dim=8,
                              defaults={"guidance": 2.0})
    assert render_defaults.read(folder) == {"sampler": "lcm", "steps": 4, "guidance": 2.0}
    _settings_folder(folder, scheduler="LCMScheduler", time_cond_proj_dim=8, defaults={"steps": 6})
    assert render_defaults.read(folder) == {"sampler": "lcm", "steps": 6, "guidance": 8.5}


def test_recommended_settings_at_their_limits_are_accepted(tmp_path):
    """The bounds are inclusive: steps up to the model's num_train_timesteps, guidance 0
    (the unconditional model)."""
    from jaxdiff import render_defaults

    folder = _settings_folder(tmp_path / "sd", defaults={"steps": 1000, "guidance": 0})
    assert render_defaults.read(folder) == {"steps": 1000, "guidance": 0.0}


@pytest.mark.faults
def test_an_upscalers_recommended_steps_keep_to_its_schedule(tmp_path):
    """An x4 folder recommending more steps than its schedule has is named, as a base
    folder's is, instead of failing in the sampler."""
    from jaxdiff import render_defaults

    folder = _settings_folder(tmp_path / "x4", in_channels=7, train_steps=500, defaults={"steps": 501})
    with pytest.raises(render_defaults.RenderDefaultsError, match=r"steps is 501; use 1 to 500") as info:
        render_defaults.read(folder, "upscale")
    assert str(info.value).startswith(os.path.join(folder, "render_defaults.json"))


def test_an_upscalers_recommended_steps_set_the_upscale_stage_only(tmp_path):
    """The x4 folder's "steps" and "guidance" are its own stage's (upscale_steps,
    upscale_guidance): they leave the base model's steps and guidance as they were."""
    from types import SimpleNamespace

    from jaxdiff import render_defaults
    from jaxdiff.engine.pipeline import RenderSettings, settings_for

    folder = _settings_folder(tmp_path / "x4", in_channels=7,
                              defaults={"steps": 7, "guidance": 3.5, "sampler": "ddim", "noise_level": 5})
    up = SimpleNamespace(render_defaults=render_defaults.read(folder, "upscale"))
    base = SimpleNamespace(render_defaults={"guidance": 2.5})
    settings = settings_for(base, up)
    assert (settings.upscale_steps, settings.upscale_guidance, settings.upscale_sampler, settings.noise_level) == \
        (7, 3.5, "ddim", 5)
    assert (settings.steps, settings.guidance, settings.sampler) == (RenderSettings().steps, 2.5,
                                                                     RenderSettings().sampler)


@pytest.mark.faults
def test_only_an_x4_upscaler_is_taken_as_the_upscaler(tmp_path):
    """An inpainting model (9 input channels) given as the upscaler is refused up front,
    as a text-to-image one is, not left to fail mid-render on tensor shapes."""
    from jaxdiff import render_defaults

    for in_channels in (4, 9):
        folder = _settings_folder(tmp_path / f"unet{in_channels}", in_channels=in_channels)
        with pytest.raises(ValueError, match=rf"is not an x4 upscaler \(its UNet takes {in_channels} input channels"):
            render_defaults.read(folder, "upscale")
        assert render_defaults.read(folder, "base") == {}


def _with_text_encoder(sd_folder, out: str, **changes) -> str:
    """A copy of the tiny folder whose text encoder has other config values (another model's)."""
    import transformers

    shutil.copytree(sd_folder[0], out)
    shutil.rmtree(os.path.join(out, "text_encoder"))
    config = transformers.CLIPTextConfig(**{**sd_folder[1]["text_encoder"].config.to_dict(), **changes})
    transformers.CLIPTextModel(config).save_pretrained(os.path.join(out, "text_encoder"))
    return out


@pytest.mark.faults
def test_a_text_encoder_another_models_unet_or_tokenizer_would_not_fit_is_refused(sd_folder, tmp_path):
    # Text states 16 wide for a UNet that attends to 12: every render failed, naming no file.
    folder = _with_text_encoder(sd_folder, str(tmp_path / "wide"), hidden_size=16)
    with pytest.raises(CheckpointError, match=r"text_encoder.config\.json and .*unet.config\.json do not match: "
                                              r"the text encoder's hidden_size=16, the UNet's cross_attention_dim=12"):
        load_family(folder)
    # Token ids past the embedding table: rendered NaN. One id past it is already too many.
    vocab = sd_folder[1]["text_encoder"].config.vocab_size
    folder = _with_text_encoder(sd_folder, str(tmp_path / "small"), vocab_size=vocab - 1)
    with pytest.raises(CheckpointError, match=rf"tokenizer.vocab\.json and .*text_encoder.config\.json do not "
                                              rf"match: the tokenizer gives token ids up to {vocab - 1} .*"
                                              rf"vocab_size={vocab - 1}"):
        load_family(folder)


@pytest.mark.faults
def test_an_sdxl_folder_is_named_unsupported(tmp_path):
    # SDXL's model_index.json, as diffusers writes it (its UNet config alone fails only on addition_embed_type).
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"StableDiffusionXLPipeline is not supported \(SDXL and later "
                                              r"models\); jaxdiff loads Stable Diffusion 1\.x / 2\.x") as info:
        load_family(str(tmp_path))
    assert str(info.value).startswith(str(tmp_path / "model_index.json"))


@pytest.mark.faults
def test_a_component_of_another_class_is_named(sd_folder, tmp_path):
    """model_index.json naming a component class jaxdiff does not implement (an SD 3 T5
    text encoder, say) is refused naming the file and the component, not loaded as if it
    were the class jaxdiff has."""
    folder = str(tmp_path / "family")
    shutil.copytree(sd_folder[0], folder)
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    with open(index_path, "w") as f:
        json.dump(dict(index, text_encoder=["transformers", "T5EncoderModel"]), f)
    with pytest.raises(CheckpointError, match=r"component 'text_encoder' is \['transformers', 'T5EncoderModel'\]; "
                                              r"jaxdiff loads CLIPTextModel here") as info:
        load_family(folder)
    assert str(info.value).startswith(index_path)


@pytest.mark.faults
@pytest.mark.parametrize("dtype", ["float8", "int8", "float8_e4m3fn"])
def test_a_dtype_the_models_cannot_compute_in_is_named(sd_folder, dtype):
    # Else a TypeError from numpy, or an error blaming unet/config.json.
    with pytest.raises(ValueError, match=f"dtype '{dtype}' is not one the models compute in: use bfloat16, "
                                         f"float16, float32"):
        load_family(sd_folder[0], dtype=dtype)
    with pytest.raises(ValueError, match=f"dtype '{dtype}'"):
        load_component(sd_folder[0], "unet", dtype=dtype)


def test_a_float16_family_keeps_a_vae_that_asks_for_it_in_float32(sd_folder, tmp_path):
    # As diffusers' pipelines upcast it (force_upcast: the x4 VAE's activations overflow
    # float16); bfloat16 has float32's range and is kept.
    folder = _copy_component(sd_folder[0], str(tmp_path), "vae")
    config_path = os.path.join(folder, "vae", "config.json")
    kernel_dtype = lambda dtype: load_component(folder, "vae", dtype=dtype).module.decoder.conv_in.kernel.get_value().dtype
    # The published SD 1.5, 2.1 and x4 VAE config.json files have no force_upcast key: as
    # in diffusers, that means True.
    for force_upcast, float16_as in ((True, jnp.float32), (False, jnp.float16), (None, jnp.float32)):
        with open(config_path) as f:
            config = json.load(f)
        config = {k: v for k, v in config.items() if k != "force_upcast"}
        with open(config_path, "w") as f:
            json.dump(config if force_upcast is None else dict(config, force_upcast=force_upcast), f)
        assert kernel_dtype("float16") == float16_as, (
            f"force_upcast: {'absent' if force_upcast is None else force_upcast}")
        assert kernel_dtype("bfloat16") == jnp.bfloat16
    from jaxdiff.models.vae import VAEConfig

    assert "force_upcast" not in config and VAEConfig.from_dict(config).force_upcast


def test_models_build_with_init_keys_as_with_nnx_rngs():
    """InitKeys (the loader's stand-in for nnx.Rngs, fast under eval_shape) builds the same
    variables, drawing a new key for each."""
    from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig

    cfg = UNetConfig.from_dict(dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                    cross_attention_dim=8, attention_head_dim=2,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    shapes = lambda model: jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(model))
    build = lambda rngs: UNet2DConditionModel(cfg, dtype=jnp.float32, rngs=rngs)
    assert shapes(nnx.eval_shape(lambda: build(InitKeys()))) == shapes(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
    keys = InitKeys(3)
    first, second = (np.asarray(jax.random.key_data(keys.params())) for _ in range(2))
    assert not np.array_equal(first, second)


def test_export_writes_the_dtype_asked_for(tmp_path):
    """save_safetensors(dtype=float16), as the trainer exports the shipped folders, writes
    float16 tensors holding the model's values: half the bytes, the same weights."""
    from jaxdiff.weights.export import save_safetensors, state_dict

    model = nnx.Sequential(nnx.Conv(3, 5, (3, 2), rngs=nnx.Rngs(0)), nnx.Linear(5, 4, rngs=nnx.Rngs(1)))
    path = str(tmp_path / "model.safetensors")
    save_safetensors(model, path, dtype=np.float16)
    written, full = load_file(path), state_dict(model)
    assert written.keys() == full.keys()
    for key, value in full.items():
        assert value.dtype == np.float32 and written[key].dtype == np.float16, key
        np.testing.assert_array_equal(written[key], value.astype(np.float16), err_msg=key)


def test_an_exported_file_has_the_metadata_and_key_prefix_pytorch_loaders_need(tmp_path):
    """transformers refuses a safetensors file whose metadata lacks {"format": "pt"}, so every
    exported file carries it; a key prefix asked for is on every key in the file."""
    from safetensors import safe_open

    from jaxdiff.weights.export import save_safetensors

    model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.LayerNorm(2, rngs=nnx.Rngs(1)))
    path = str(tmp_path / "text_encoder" / "model.safetensors")
    save_safetensors(model, path, prefix="text_model.")
    with safe_open(path, "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == ["text_model.layers.0.bias", "text_model.layers.0.weight",
                                    "text_model.layers.1.bias", "text_model.layers.1.weight"]


def test_a_norm_weight_stored_as_c_1_1_1_loads_as_the_norms_scale():
    """Older checkpoints store some norm weights as (C, 1, 1, 1) tensors: they load as the
    norm's (C,) scale with their values in order, not as a shape error."""
    weight = np.arange(6, dtype=np.float32)
    np.testing.assert_array_equal(to_nnx_layout("scale", weight.reshape(6, 1, 1, 1), (6,)), weight)


def test_each_parameter_is_placed_with_the_sharding_chosen_for_it():
    """A sharding callable is asked once per checkpoint key with the parameter's shape, and
    each parameter is placed with the sharding it returned (how a multi-chip load spreads
    the weights instead of copying them all onto one device)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxdiff.weights.convert import load_state_dict
    from jaxdiff.weights.export import state_dict

    model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.LayerNorm(2, rngs=nnx.Rngs(1)))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    asked = {}

    def sharding(key, shape):
        asked[key] = shape
        return NamedSharding(mesh, PartitionSpec())

    loaded = load_state_dict(nnx.eval_shape(lambda: nnx.Sequential(
        nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.LayerNorm(2, rngs=nnx.Rngs(1)))), state_dict(model), sharding=sharding)
    assert asked == {"layers.0.weight": (3, 2), "layers.0.bias": (2,), "layers.1.weight": (2,), "layers.1.bias": (2,)}
    for leaf in jax.tree.leaves(nnx.state(loaded, nnx.Param)):
        assert leaf.sharding == NamedSharding(mesh, PartitionSpec())



def test_load_state_dict_casts_to_the_dtype_asked_for():
    """`dtype=` sets the dtype every loaded parameter has, whatever the file's and the
    model's own dtype, with the file's values."""
    from jaxdiff.weights.convert import load_state_dict

    def build():
        return nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.LayerNorm(2, rngs=nnx.Rngs(1)))

    tensors = {"layers.0.weight": np.full((2, 3), 0.5, np.float32), "layers.0.bias": np.ones(2, np.float32),
               "layers.1.weight": np.full(2, 2.0, np.float32), "layers.1.bias": np.zeros(2, np.float32)}
    loaded = load_state_dict(nnx.eval_shape(build), tensors, dtype=jnp.bfloat16)
    params = _params(loaded)
    assert {str(v.dtype) for v in params.values()} == {"bfloat16"}
    np.testing.assert_array_equal(np.asarray(params[("layers", 0, "kernel")], np.float32), np.full((3, 2), 0.5))


def test_size_multiple_counts_the_vae_and_the_unet_downsampling(tmp_path):
    """A record's width and height must be multiples of the VAE's downsampling times the
    UNet's: a VAE that halves twice and a UNet that halves three times take multiples of 32,
    whichever of the two has more levels."""
    from jaxdiff.checkpoints import size_multiple

    def folder(name, vae_blocks, unet_blocks):
        for part, blocks in (("vae", vae_blocks), ("unet", unet_blocks)):
            os.makedirs(tmp_path / name / part)
            (tmp_path / name / part / "config.json").write_text(
                json.dumps({"block_out_channels": [8 * (i + 1) for i in range(blocks)]}))
        return str(tmp_path / name)

    assert size_multiple(folder("a", 3, 4)) == 32
    assert size_multiple(folder("b", 4, 3)) == 32
    assert size_multiple(folder("c", 2, 1)) == 2


@pytest.mark.faults
def test_many_missing_keys_are_named_five_and_counted():
    """A checkpoint missing many parameters names the first five and counts the rest, so the
    message says how much is missing without listing a whole model."""
    from jaxdiff.weights.convert import load_state_dict

    def build():
        return nnx.Sequential(*(nnx.Linear(2, 2, rngs=nnx.Rngs(i)) for i in range(4)))

    with pytest.raises(CheckpointError, match=r"^some\.safetensors: missing keys "
                                              r"(layers\.\d\.(bias|weight), ){4}layers\.\d\.(bias|weight) and 3 more$"):
        load_state_dict(nnx.eval_shape(build), {}, source="some.safetensors")
