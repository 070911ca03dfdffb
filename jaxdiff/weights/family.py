"""Loads a diffusers-format pipeline folder (local or gs://) into jaxdiff models.

A folder holds `model_index.json` and one sub-folder per component:

    unet/          config.json + diffusion_pytorch_model.safetensors (or a sharded *.index.json,
                   or variant files such as diffusion_pytorch_model.fp16.safetensors)
    vae/           config.json + diffusion_pytorch_model.safetensors
    text_encoder/  config.json + model.safetensors
    tokenizer/     vocab.json, merges.txt, ...
    scheduler/     scheduler_config.json
    low_res_scheduler/  (x4 upscaler only) scheduler_config.json

Each model is built abstractly with `nnx.eval_shape` (no random init, no memory) and
filled tensor by tensor from a streamed safetensors file, so the host never holds more
than one tensor beyond the model itself. Loading is strict: a missing file, a truncated
file, an unknown, missing or wrongly shaped tensor, or an unsupported config value is an
error naming the file (and key). Pickle checkpoints are refused unless allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import re
import tempfile
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff import render_defaults as recommended
from jaxdiff import samplers, storage
from jaxdiff.checkpoints import resolve_model
from jaxdiff.weights.convert import CheckpointError, load_state_dict
from jaxdiff.weights.safetensors_stream import SafetensorsStream


@dataclasses.dataclass(frozen=True)
class _ComponentSpec:
    module: str           # jaxdiff module that holds the classes
    config_class: str
    model_class: str
    pytorch_classes: tuple[str, ...]  # class names model_index.json may give for it
    weight_names: tuple[str, ...]     # file stems in the component folder


COMPONENTS = {
    "unet": _ComponentSpec("jaxdiff.models.unet", "UNetConfig", "UNet2DConditionModel",
                           ("UNet2DConditionModel",), ("diffusion_pytorch_model",)),
    "vae": _ComponentSpec("jaxdiff.models.vae", "VAEConfig", "AutoencoderKL",
                          ("AutoencoderKL",), ("diffusion_pytorch_model",)),
    "text_encoder": _ComponentSpec("jaxdiff.models.clip", "CLIPTextConfig", "CLIPTextModel",
                                   ("CLIPTextModel",), ("model", "pytorch_model")),
}
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# Checkpoint buffers that are not parameters of our modules.
_IGNORED_KEYS = ("position_ids",)
# unet in_channels -> what the family renders.
_KIND_BY_IN_CHANNELS = {4: "text2image", 9: "inpaint", 7: "upscale"}
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json")


def default_dtype():
    """bfloat16 on accelerators, float32 on CPU (where bf16 math is slow and emulated)."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


_MODEL_DTYPES = ("bfloat16", "float16", "float32")


def _model_dtype(dtype):
    """`dtype` as given (its spelling goes into run records), or the default; refused where the
    models cannot compute in it (an integer or float8 dtype would load, then fail or render noise)."""
    if dtype is None:
        return default_dtype()
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _MODEL_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one the models compute in: use {', '.join(_MODEL_DTYPES)} "
                         f"(--dtype / dtype=), or leave it out for the default")
    return dtype


@dataclasses.dataclass(frozen=True)
class LoadedComponent:
    module: nnx.Module
    config: Any                  # the jaxdiff config dataclass
    config_dict: dict            # config.json as read
    sha256: dict[str, str]       # file path -> hex digest, for every file read


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """Everything a diffusers pipeline folder defines, loaded and placed on devices."""

    path: str
    kind: str                    # "text2image", "inpaint" or "upscale"
    dtype: Any
    unet: nnx.Module
    vae: nnx.Module
    text_encoder: nnx.Module
    tokenizer: Any               # transformers CLIPTokenizer
    unet_config: Any
    vae_config: Any
    text_encoder_config: Any
    scheduler_config: dict
    low_res_scheduler_config: dict | None  # upscaler only
    max_noise_level: int | None            # upscaler only
    model_index: dict
    sha256: dict[str, str]       # path relative to `path` -> hex digest of each file read
    render_defaults: dict = dataclasses.field(default_factory=dict)  # render_defaults.json, if any


def _read_json(path: str, what: str, digests: dict) -> dict:
    """Reads a JSON object and records the file's sha256 in `digests`."""
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"missing file {path} ({what})") from e
    digests[path] = hashlib.sha256(raw).hexdigest()
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _file_digest(path: str) -> str:
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()


class InitKeys:
    """Stands in for nnx.Rngs(seed) when a model is built (its layers draw their init keys
    with `rngs.params()`), counting the keys in Python. nnx.Rngs counts them in an nnx
    Variable, and under nnx.eval_shape each update of that traced count costs jax 0.10 a
    scan of the whole trace: SD 1.5's UNet built abstractly in 7.0 s, with this in 0.5."""

    def __init__(self, seed: int = 0):
        self._key, self._drawn = jax.random.key(seed), 0

    def params(self) -> jax.Array:
        self._drawn += 1
        return jax.random.fold_in(self._key, np.uint32(self._drawn))


def abstract_model(model_class, config, dtype):
    """`model_class(config)` as shapes and dtypes only: no init, no memory."""
    return nnx.eval_shape(lambda: model_class(config, dtype=dtype, rngs=InitKeys()))


def _pickle_refusal(path: str, variants: list[str] = ()) -> CheckpointError:
    other = ""
    if variants:
        named = (f"variant={variants[0]!r} (--variant {variants[0]})" if len(variants) == 1
                 else f"variant= one of {', '.join(variants)}")
        other = f"; or load a safetensors variant beside it, other weights than these: {named}"
    return CheckpointError(
        f"{path}: pickle checkpoints can run code when loaded and are refused. Convert it to "
        f"safetensors once, e.g. in Python with diffusers: "
        f"`DiffusionPipeline.from_pretrained(folder).save_pretrained(out, safe_serialization=True)` "
        f"(or the component's class, e.g. UNet2DConditionModel), then load `out`; or, from Python "
        f"(the command has no such option), pass allow_pickle=True if you trust the file{other}")


def _safetensors_names(stem: str, variant: str | None) -> tuple[str, str]:
    """(single file, sharded index) names in diffusers' layout, with or without a variant."""
    if variant:
        return f"{stem}.{variant}.safetensors", f"{stem}.safetensors.index.{variant}.json"
    return f"{stem}.safetensors", f"{stem}.safetensors.index.json"


def _variants(names: set[str], spec: _ComponentSpec) -> list[str]:
    """Weight variants present (diffusers' `variant`: fp16, ema, ...)."""
    found = set()
    for stem in spec.weight_names:
        for name in names:
            m = (re.fullmatch(re.escape(stem) + r"\.([\w\-]+)\.safetensors", name)
                 or re.fullmatch(re.escape(stem) + r"\.safetensors\.index\.([\w\-]+)\.json", name))
            if m and not re.fullmatch(r"[\w\-]*\d{5}-of-\d{5}", m.group(1)):  # not a shard
                found.add(m.group(1))
    return sorted(found)


def _has_variant(names: set[str], spec: _ComponentSpec, variant: str) -> bool:
    """Whether a component folder holding `names` has safetensors weights in `variant`."""
    return any(name in names for stem in spec.weight_names for name in _safetensors_names(stem, variant))


def _list(folder: str) -> set[str]:
    try:
        return set(storage.list_dir(folder))
    except FileNotFoundError:
        return set()


def folder_has_variant(path: str, variant: str) -> bool:
    """Whether any model component of the pipeline folder `path` has weights in `variant`."""
    path = resolve_model(str(path).rstrip("/"))
    return any(_has_variant(_list(storage.join(path, name)), spec, variant) for name, spec in COMPONENTS.items())


def _weight_files(folder: str, spec: _ComponentSpec, allow_pickle: bool, digests: dict,
                  variant: str | None = None, plain_without_variant: bool = False) -> tuple[str, list[str]]:
    """("safetensors" | "pickle", [files]) for one component folder.

    Without a variant: the plain files, safetensors before pickle (as diffusers loads
    them), else the one variant there is (a folder saved with only fp16 files), else a
    pickle file. With one: that variant's files; where the component has none, its plain
    files if `plain_without_variant` (as diffusers loads a pipeline: another component of
    the folder has the variant), else an error.
    """
    names = _list(folder)
    variants = _variants(names, spec)
    plain_pickles = sorted(names & {stem + suffix for stem in spec.weight_names for suffix in _PICKLE_SUFFIXES})
    fallback = bool(variant) and plain_without_variant and not _has_variant(names, spec, variant)
    if fallback:
        candidates = [None]  # the plain files only: another variant does not stand in for them
    else:
        # A lone variant (non_ema, fp16) stands in for the plain weights only where there are none.
        candidates = [variant] if variant else [None] + (variants if len(variants) == 1 and not plain_pickles else [])
    for candidate in candidates:
        for stem in spec.weight_names:
            single, index_name = _safetensors_names(stem, candidate)
            if single in names:
                return "safetensors", [storage.join(folder, single)]
            if index_name in names:
                return "safetensors", _shard_files(folder, index_name, digests)
    expected = " or ".join(_safetensors_names(stem, None if fallback else variant)[0] for stem in spec.weight_names)
    found = ", ".join(sorted(names)) if names else "nothing"
    if variant and not fallback:
        raise CheckpointError(f"missing file {storage.join(folder, expected)} (the weights in variant "
                              f"{variant!r}; variants here: {', '.join(variants) or 'none'}; found {found})")
    if len(variants) > 1 and not plain_pickles and not fallback:
        raise CheckpointError(f"{folder}: no plain weights but variants {', '.join(variants)}; "
                              f"choose one with variant= (--variant)")
    pickles = plain_pickles or ([] if fallback else sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES)))
    if pickles:
        path = storage.join(folder, pickles[0])
        if not allow_pickle:
            raise _pickle_refusal(path, variants)
        return "pickle", [path]
    if fallback:
        raise CheckpointError(f"missing file {storage.join(folder, expected)} (the weights: this component has "
                              f"none in variant {variant!r}, and no plain ones; variants here: "
                              f"{', '.join(variants) or 'none'}; found {found})")
    raise CheckpointError(f"missing file {storage.join(folder, expected)} (the weights; found {found})")


def _shard_files(folder: str, index_name: str, digests: dict) -> list[str]:
    index_path = storage.join(folder, index_name)
    weight_map = _read_json(index_path, "sharded checkpoint index", digests).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: has no 'weight_map' of tensor name -> file")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if "/" in shard or shard.startswith("."):
            raise CheckpointError(f"{index_path}: shard name {shard!r} must be a plain file name")
    return [storage.join(folder, shard) for shard in shards]


def _torch_to_numpy(tensor) -> np.ndarray:
    import ml_dtypes
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; reinterpret the bits
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _pickle_tensors(path: str, digests: dict) -> Iterator[tuple[str, np.ndarray]]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path}: loading a pickle checkpoint needs torch (pip install torch), or convert "
            f"it to safetensors first") from e
    with tempfile.TemporaryDirectory() as tmp:
        local = path
        if storage.is_gcs(path):
            local = os.path.join(tmp, os.path.basename(path))
            storage.download(path, local)
        digest = hashlib.sha256()
        with open(local, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        digests[path] = digest.hexdigest()
        try:
            state = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: could not load as a weights-only torch checkpoint ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    for key in list(state):
        value = state.pop(key)  # drop each host tensor once it is converted
        if isinstance(value, torch.Tensor):
            yield key, _torch_to_numpy(value)


def _safetensors_tensors(files: list[str], digests: dict) -> Iterator[tuple[str, np.ndarray]]:
    streams = [SafetensorsStream(f) for f in files]  # every header checked before any data
    for stream in streams:
        yield from stream
        if stream.sha256 is not None:
            digests[stream.path] = stream.sha256


# Old SD VAE checkpoints name the mid-block attention projections differently.
_LEGACY_VAE_ATTENTION = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_VAE_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _legacy_vae_key(key: str) -> str:
    return _LEGACY_VAE_ATTENTION.sub(lambda m: m.group(1) + _LEGACY_VAE_NAMES[m.group(2)] + ".", key)


def with_config_file(error: ValueError, config_path: str) -> ValueError:
    """`error` (same type where it can be) with its message led by the config file it is about."""
    message = f"{config_path}: {error}"
    try:
        return type(error)(message)
    except Exception:
        return CheckpointError(message)


def component_config(path: str, name: str, digests: dict) -> tuple[dict, Any]:
    """(the config.json of component `name` of the pipeline folder `path`, as its model's
    config class reads it); errors name the file."""
    spec = COMPONENTS[name]
    config_path = storage.join(str(path).rstrip("/"), name, "config.json")
    config_dict = _read_json(config_path, f"the {name} config", digests)
    try:
        return config_dict, getattr(importlib.import_module(spec.module), spec.config_class).from_dict(config_dict)
    except ValueError as e:  # UnsupportedConfig and invalid values
        raise with_config_file(e, config_path) from e


def load_component(path: str, name: str, *, dtype=None, sharding=None, allow_pickle: bool = False,
                   variant: str | None = None, plain_without_variant: bool = False) -> LoadedComponent:
    """Loads one model component ("unet", "vae" or "text_encoder") of a pipeline folder.

    `path` is the pipeline folder (local or gs://); the component lives in `path/name/`.
    `sharding` is None (default device), a `jax.sharding.Sharding`, or a callable
    `(key, shape) -> Sharding`. `variant` picks diffusers' variant weight files
    (`diffusion_pytorch_model.fp16.safetensors` for "fp16"); a component without them is
    an error unless `plain_without_variant`, which loads its plain files instead.
    """
    if name not in COMPONENTS:
        raise ValueError(f"component {name!r} is not one of {sorted(COMPONENTS)}")
    spec = COMPONENTS[name]
    dtype = _model_dtype(dtype)
    folder = storage.join(str(path).rstrip("/"), name)
    digests: dict[str, str] = {}

    config_path = storage.join(folder, "config.json")
    config_dict, config = component_config(path, name, digests)
    models = importlib.import_module(spec.module)
    try:
        if name == "vae" and config.force_upcast and jnp.dtype(dtype) == jnp.float16:
            dtype = jnp.float32  # as diffusers upcasts it: float16 overflows its activations
        model_class = getattr(models, spec.model_class)
        abstract = abstract_model(model_class, config, dtype)
    except ValueError as e:  # UnsupportedConfig and invalid values
        raise with_config_file(e, config_path) from e

    kind, files = _weight_files(folder, spec, allow_pickle, digests, variant, plain_without_variant)
    if kind == "pickle":
        tensors = _pickle_tensors(files[0], digests)
    else:
        tensors = _safetensors_tensors(files, digests)
    # The model's name for a key the file names otherwise; errors name the file's key.
    rename = (_legacy_vae_key if name == "vae" else models.text_model_key if name == "text_encoder"
              else None)
    source = files[0] if len(files) == 1 else storage.join(folder, "*.safetensors.index*.json")
    module = load_state_dict(abstract, tensors, dtype=dtype, source=source,
                             ignore=_IGNORED_KEYS, sharding=sharding, rename=rename)
    _check_concrete(module, source)
    return LoadedComponent(module=module, config=config, config_dict=config_dict, sha256=digests)


def _check_concrete(module: nnx.Module, source: str) -> None:
    """Every variable must hold an array: eval_shape leaves non-parameters abstract."""
    abstract = [".".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(module))
                if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if abstract:
        raise CheckpointError(f"{source}: no values for model variables {', '.join(abstract[:5])}")


def _load_tokenizer(folder: str, digests: dict):
    from jaxdiff.models.clip import load_tokenizer

    if not storage.exists(folder):
        raise CheckpointError(f"missing folder {folder} (the tokenizer: vocab.json and merges.txt)")
    names = [n for n in storage.list_dir(folder) if n in _TOKENIZER_FILES]
    for n in names:
        digests[storage.join(folder, n)] = _file_digest(storage.join(folder, n))
    if not storage.is_gcs(folder):
        try:
            return load_tokenizer(folder)
        except FileNotFoundError as e:
            raise CheckpointError(str(e)) from e
    # transformers reads only local folders: copy the few small files to a temp dir.
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            storage.download(storage.join(folder, n), os.path.join(tmp, n))
        try:
            return load_tokenizer(tmp)
        except FileNotFoundError as e:
            raise CheckpointError(f"{folder}: {e}") from e


def load_family(path: str, *, dtype=None, allow_pickle: bool = False, sharding=None,
                variant: str | None = None, require_variant: bool = True) -> ModelFamily:
    """Loads a diffusers pipeline folder (local path, gs:// URL, or a Hub id already in the
    local Hugging Face cache: see `resolve_model`) into a ModelFamily.

    `dtype` defaults to bfloat16 on accelerators and float32 on CPU. Pickle weight files
    (.bin/.ckpt/.pt) are refused unless `allow_pickle=True`. `variant` (e.g. "fp16") loads
    diffusers' variant weight files, and as diffusers the plain files of a component that
    has none; it is an error where no component has them, unless `require_variant=False`
    (then the folder loads its plain files). Without a variant a component with no plain
    weights loads the one variant it has. `sha256` names every file loaded.
    """
    path = resolve_model(str(path).rstrip("/"))
    dtype = _model_dtype(dtype)
    digests: dict[str, str] = {}
    index_path = storage.join(path, "model_index.json")
    if not storage.is_gcs(path) and os.path.isfile(path):
        if path.endswith(_PICKLE_SUFFIXES):
            raise _pickle_refusal(path)
        raise CheckpointError(f"{path} is a file; pass the diffusers pipeline folder that holds model_index.json")
    model_index = _read_json(index_path, "a diffusers pipeline folder starts with model_index.json",
                             digests)
    pipeline_class = model_index.get("_class_name")
    # SDXL (and later models with a second text encoder) would fail deep in their UNet
    # config or pass the checks below: name the model instead.
    if "text_encoder_2" in model_index or "XL" in str(pipeline_class):
        raise CheckpointError(f"{index_path}: {pipeline_class} is not supported (SDXL and later models); "
                              f"jaxdiff loads Stable Diffusion 1.x / 2.x and x4 upscaler folders")
    for name, spec in COMPONENTS.items():
        entry = model_index.get(name)
        class_name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if class_name not in spec.pytorch_classes:
            raise CheckpointError(
                f"{index_path}: component {name!r} is {entry!r}; jaxdiff loads "
                f"{' or '.join(spec.pytorch_classes)} here")

    # As diffusers: a variant one component has, the others may lack (their plain files load);
    # where none has it, each component's error names the variant's file it lacks.
    plain_without_variant = bool(variant) and (not require_variant or folder_has_variant(path, variant))
    # Components from two models are refused before any weights load (gigabytes, maybe remote).
    tokenizer = _load_tokenizer(storage.join(path, "tokenizer"), digests)
    _check_components_match(path, component_config(path, "text_encoder", {})[1],
                            component_config(path, "unet", {})[1], tokenizer)
    loaded = {}
    for name in COMPONENTS:
        loaded[name] = load_component(path, name, dtype=dtype, sharding=sharding, allow_pickle=allow_pickle,
                                      variant=variant, plain_without_variant=plain_without_variant)
        digests.update(loaded[name].sha256)

    scheduler_path = storage.join(path, "scheduler", "scheduler_config.json")
    scheduler_config = _read_json(scheduler_path, "the noise schedule", digests)

    unet_config_path = storage.join(path, "unet", "config.json")
    in_channels = loaded["unet"].config_dict.get("in_channels", 4)
    kind = _KIND_BY_IN_CHANNELS.get(in_channels)
    if kind is None:
        raise CheckpointError(
            f"{unet_config_path}: in_channels={in_channels} matches no known family "
            f"(4: text-to-image, 9: inpainting, 7: x4 upscaler)")
    low_res_scheduler_config = max_noise_level = None
    if kind == "upscale":
        low_res_path = storage.join(path, "low_res_scheduler", "scheduler_config.json")
        low_res_scheduler_config = _read_json(low_res_path, "the upscaler's low-res noise schedule",
                                              digests)
        max_noise_level = model_index.get("max_noise_level")
        if isinstance(max_noise_level, bool) or not isinstance(max_noise_level, int) or max_noise_level < 0:
            raise CheckpointError(
                f"{index_path}: an upscaler needs an integer max_noise_level (SD x4 upscaler: 350), "
                f"got {max_noise_level!r}")

    defaults = _render_defaults(path, kind, max_noise_level, digests)

    prefix = path + "/"
    relative = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in digests.items()}
    return ModelFamily(
        path=path, kind=kind, dtype=dtype,
        unet=loaded["unet"].module, vae=loaded["vae"].module,
        text_encoder=loaded["text_encoder"].module, tokenizer=tokenizer,
        unet_config=loaded["unet"].config, vae_config=loaded["vae"].config,
        text_encoder_config=loaded["text_encoder"].config,
        scheduler_config=scheduler_config, low_res_scheduler_config=low_res_scheduler_config,
        max_noise_level=max_noise_level, model_index=model_index, sha256=relative,
        render_defaults=defaults)


def _check_components_match(path: str, text_encoder_config, unet_config, tokenizer) -> None:
    """The text encoder fits the UNet and the tokenizer: a mismatch (components from two
    models) would fail every render without naming a file, or render NaN."""
    te_config_path = storage.join(path, "text_encoder", "config.json")
    unet_config_path = storage.join(path, "unet", "config.json")
    hidden = text_encoder_config.hidden_size
    cross = sorted(set(unet_config.cross_attention_dim))
    if cross != [hidden]:
        shown = cross[0] if len(cross) == 1 else cross
        raise CheckpointError(
            f"{te_config_path} and {unet_config_path} do not match: the text encoder's hidden_size={hidden}, "
            f"the UNet's cross_attention_dim={shown} (the width of the text states it attends to); the "
            f"text encoder comes from another model than the UNet")
    vocab_size = text_encoder_config.vocab_size
    top = max(tokenizer.get_vocab().values(), default=-1)
    if top >= vocab_size:
        tokenizer_folder = storage.join(path, "tokenizer")
        vocab_file = next((storage.join(tokenizer_folder, n) for n in ("vocab.json", "tokenizer.json")
                           if storage.exists(storage.join(tokenizer_folder, n))), tokenizer_folder)
        raise CheckpointError(
            f"{vocab_file} and {te_config_path} do not match: the tokenizer gives token ids up to "
            f"{top} ({len(tokenizer)} tokens), the text encoder's vocab_size={vocab_size} has embeddings for "
            f"ids below {vocab_size}; the tokenizer comes from another model than the text encoder")


def _render_defaults(path: str, kind: str, max_noise_level: int | None, digests: dict) -> dict:
    """The folder's own render_defaults.json ({} without one), checked against this family."""
    file = storage.join(path, recommended.FILE)
    try:
        values = recommended.read(path, "upscale" if kind == "upscale" else "base", digests)
    except recommended.RenderDefaultsError as e:
        raise CheckpointError(str(e)) from e
    if values.get("sampler", samplers.SAMPLER_NAMES[0]) not in samplers.SAMPLER_NAMES:
        raise CheckpointError(f"{file}: unknown sampler {values['sampler']!r}; "
                              f"use one of {', '.join(samplers.SAMPLER_NAMES)}")
    if values.get("noise_level", 0) > (max_noise_level or 0):
        raise CheckpointError(f"{file}: noise_level {values['noise_level']} is above the model's "
                              f"max_noise_level {max_noise_level}")
    return values
