"""CLIP text encoder and tokenizer: parity with transformers (PyTorch, CPU, fp32)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxdiff.models import attention
from jaxdiff.models.clip import (CLIPTextConfig, CLIPTextModel, UnsupportedConfig, load_tokenizer,
                                 tokenize, with_text_model_prefix)
from jaxdiff.weights.convert import load_state_dict

# fp32 on CPU; differences come only from summation order over a few tiny layers.
ATOL = 3e-5
RTOL = 1e-4

VOCAB, BOS, EOS = 41, 39, 40


def tiny_config(**overrides) -> dict:
    # layer_norm_eps away from transformers' default 1e-5, so an eps that is not read shows:
    # the embeddings' variance (about 8e-4) is near it.
    config = dict(vocab_size=VOCAB, hidden_size=20, intermediate_size=37, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=13, hidden_act="quick_gelu",
                  layer_norm_eps=1e-3, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=1,
                  projection_dim=11, model_type="clip_text_model")
    config.update(overrides)
    return config


def torch_and_jax(config: dict, dtype=jnp.float32):
    """A random transformers CLIPTextModel and our model loaded from its weights (in
    `dtype`; the reference keeps float32, its weights rounded to `dtype`)."""
    torch.manual_seed(0)
    torch_config = transformers.CLIPTextConfig(**config)
    torch_config._attn_implementation = "eager"
    reference = transformers.CLIPTextModel(torch_config).eval()
    # LayerNorm starts at scale 1 / bias 0; randomise so a misplaced norm shows.
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        if dtype == jnp.bfloat16:
            for p in reference.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    # transformers 5 drops the `text_model.` prefix; a diffusers checkpoint file has it,
    # and often the `position_ids` buffer too.
    tensors = {"text_model." + k: v.numpy() for k, v in reference.state_dict().items()}
    tensors["text_model.embeddings.position_ids"] = np.arange(config["max_position_embeddings"])[None]
    abstract = nnx.eval_shape(lambda: CLIPTextModel(CLIPTextConfig.from_dict(config), dtype=dtype,
                                                    rngs=nnx.Rngs(0)))
    model = load_state_dict(abstract, tensors, dtype=dtype, ignore=("position_ids",))
    return reference, model


def prompt_ids(eos: int) -> np.ndarray:
    # Two prompts of different length, padded after EOS with pad id 1, like tokenize() gives.
    ids = np.full((2, 13), 1, np.int64)
    ids[0, :5] = [BOS, 5, 17, 23, eos]
    ids[1, :9] = [BOS, 3, 4, 30, 31, 8, 9, 2 if eos != 2 else 7, eos]
    return ids


def run_reference(reference, ids: np.ndarray):
    with torch.no_grad():
        return reference(torch.from_numpy(ids), output_hidden_states=True)


@pytest.mark.parity
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"])
def test_last_hidden_state_and_pooled_match_transformers(hidden_act):
    """Each activation a text encoder's config.json may name computes what transformers
    computes for it, so prompts condition the UNet as they do in diffusers."""
    reference, model = torch_and_jax(tiny_config(hidden_act=hidden_act))
    ids = prompt_ids(EOS)
    expected = run_reference(reference, ids)
    out = model(jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(out.last_hidden_state, expected.last_hidden_state.numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(out.pooled, expected.pooler_output.numpy(), atol=ATOL, rtol=RTOL)
    # Pooling must read the EOS position (4 and 8), not the last token.
    np.testing.assert_allclose(out.pooled[0], out.last_hidden_state[0, 4], atol=0)
    np.testing.assert_allclose(out.pooled[1], out.last_hidden_state[1, 8], atol=0)


@pytest.mark.parity
def test_legacy_eos_token_id_pools_at_highest_id():
    # SD 1.x / 2.x configs say eos_token_id=2; transformers then pools at argmax(ids), the
    # first EOS. SD's tokenizer pads with EOS, so each row holds it many times: the pooled
    # state must be the first one's (4 and 8), not a later padding position's.
    reference, model = torch_and_jax(tiny_config(eos_token_id=2, hidden_act="gelu"))
    ids = prompt_ids(EOS)  # EOS (40) is the highest id in each row
    ids[0, 5:], ids[1, 9:] = EOS, EOS
    expected = run_reference(reference, ids)
    out = model(jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(out.pooled, expected.pooler_output.numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(out.pooled[0], out.last_hidden_state[0, 4], atol=0)
    np.testing.assert_allclose(out.pooled[1], out.last_hidden_state[1, 8], atol=0)


@pytest.mark.parity
def test_clip_skip_one_is_normed_penultimate_layer():
    reference, model = torch_and_jax(tiny_config())
    ids = prompt_ids(EOS)
    expected = run_reference(reference, ids)
    assert len(expected.hidden_states) == 3 + 1  # embeddings, then each layer
    with torch.no_grad():
        penultimate = reference.final_layer_norm(expected.hidden_states[-2]).numpy()
    out = jax.jit(lambda i: model(i, clip_skip=1))(jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(out.last_hidden_state, penultimate, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(out.pooled, expected.pooler_output.numpy(), atol=ATOL, rtol=RTOL)
    assert not np.allclose(out.last_hidden_state, expected.last_hidden_state.numpy(), atol=1e-3)


@pytest.mark.parity
def test_clip_skip_of_every_layer_is_normed_embeddings():
    # diffusers takes hidden_states[-(clip_skip + 1)]: clip_skip = num_hidden_layers is
    # hidden_states[0], the embeddings.
    reference, model = torch_and_jax(tiny_config())
    ids = prompt_ids(EOS)
    expected = run_reference(reference, ids)
    with torch.no_grad():
        normed = reference.final_layer_norm(expected.hidden_states[-(3 + 1)]).numpy()
    out = model(jnp.asarray(ids, jnp.int32), clip_skip=3)
    np.testing.assert_allclose(out.last_hidden_state, normed, atol=ATOL, rtol=RTOL)


@pytest.mark.parity
def test_attention_mask_matches_transformers():
    # diffusers passes the tokenizer's attention_mask when the text encoder's config sets
    # use_attention_mask; causal attention then also skips the padding keys, which changes
    # the states at the padding positions.
    config = tiny_config(use_attention_mask=True)
    reference, model = torch_and_jax(config)
    assert CLIPTextConfig.from_dict(config).use_attention_mask
    ids = prompt_ids(EOS)
    mask = np.zeros_like(ids)
    mask[0, :5], mask[1, :9] = 1, 1
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    out = model(jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(out.last_hidden_state, expected.last_hidden_state.numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(out.pooled, expected.pooler_output.numpy(), atol=ATOL, rtol=RTOL)
    unmasked = run_reference(reference, ids).last_hidden_state.numpy()
    assert not np.allclose(out.last_hidden_state[0, 5:], unmasked[0, 5:], atol=1e-3)


@pytest.mark.parity
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "causal-and-padding-mask"])
def test_cudnn_path_of_causal_attention_matches_transformers(monkeypatch, masked):
    # On a GPU, bf16 CLIP attention at a head dim that is a multiple of 8 goes to cuDNN
    # (the tiny config's head dim 5 stays on XLA). Here XLA's attention stands in for cuDNN
    # (no GPU), taking the keywords the dispatch passes, so a call that drops is_causal or
    # the padding mask on its way shows against transformers.
    calls = []

    def fake_cudnn(q, k, v, **kwargs):
        calls.append(kwargs)
        return jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)

    monkeypatch.setattr(attention, "_cudnn", fake_cudnn)
    config = tiny_config(hidden_size=32, num_attention_heads=4, use_attention_mask=masked)
    reference, model = torch_and_jax(config, dtype=jnp.bfloat16)
    ids = prompt_ids(EOS)
    mask = np.zeros_like(ids)
    mask[0, :5], mask[1, :9] = 1, 1
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask) if masked else None)
    with attention.dispatch(backend="gpu"):
        out = model(jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask) if masked else None)
    # Every layer's attention went to cuDNN, told it is causal (and given the mask).
    assert [kwargs.get("is_causal") for kwargs in calls] == [True] * config["num_hidden_layers"]
    assert all((kwargs.get("mask") is not None) == masked for kwargs in calls)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    # bf16 activations against float32 ones (same bf16 weights): about 1% of the scale.
    for got, want in ((out.last_hidden_state, expected.last_hidden_state), (out.pooled, expected.pooler_output)):
        got, want = np.asarray(got, np.float32), want.numpy()
        err = np.max(np.abs(got - want)) / np.max(np.abs(want))
        assert err < 3e-2, f"bf16 cuDNN path: error {err:.2e} relative to output scale"


def test_bfloat16_stays_close_to_float32():
    config = CLIPTextConfig.from_dict(tiny_config())
    f32 = CLIPTextModel(config, rngs=nnx.Rngs(3))
    bf16 = CLIPTextModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
    nnx.update(bf16, jax.tree.map(lambda v: v.astype(jnp.bfloat16), nnx.state(f32, nnx.Param)))
    ids = jnp.asarray(prompt_ids(EOS), jnp.int32)
    low = bf16(ids).last_hidden_state
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), f32(ids).last_hidden_state, atol=0.1, rtol=0.05)


def test_with_text_model_prefix_adds_the_prefix_once():
    tensors = {"encoder.layers.0.mlp.fc1.weight": 1, "text_model.final_layer_norm.bias": 2}
    assert dict(with_text_model_prefix(tensors)) == {
        "text_model.encoder.layers.0.mlp.fc1.weight": 1, "text_model.final_layer_norm.bias": 2}


def test_unsupported_hidden_act_names_the_field():
    with pytest.raises(UnsupportedConfig, match=r"hidden_act='relu'"):
        CLIPTextConfig.from_dict(tiny_config(hidden_act="relu"))


@pytest.mark.faults
def test_bad_configs_and_inputs_name_the_problem():
    with pytest.raises(UnsupportedConfig, match="num_attention_heads"):
        CLIPTextConfig.from_dict(tiny_config(num_attention_heads=3))
    with pytest.raises(UnsupportedConfig, match="model_type='clip'"):
        CLIPTextConfig.from_dict(tiny_config(model_type="clip"))
    model = CLIPTextModel(CLIPTextConfig.from_dict(tiny_config()), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_position_embeddings=13"):
        model(jnp.ones((1, 14), jnp.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        model(jnp.ones((1, 5), jnp.float32))
    with pytest.raises(ValueError, match="clip_skip=4"):
        model(jnp.ones((1, 5), jnp.int32), clip_skip=4)
    with pytest.raises(ValueError, match="clip_skip=-1"):
        model(jnp.ones((1, 5), jnp.int32), clip_skip=-1)
    with pytest.raises(ValueError, match="attention_mask"):
        model(jnp.ones((1, 5), jnp.int32), attention_mask=jnp.ones((1, 4), jnp.int32))
    masked = CLIPTextModel(CLIPTextConfig.from_dict(tiny_config(use_attention_mask=True)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_attention_mask"):
        masked(jnp.ones((1, 5), jnp.int32))


def test_config_defaults_follow_transformers():
    # Older config.json files omit fields that equal transformers' defaults.
    ours = CLIPTextConfig.from_dict({})
    theirs = transformers.CLIPTextConfig()
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
                  "eos_token_id", "pad_token_id", "bos_token_id", "projection_dim"):
        assert getattr(ours, field) == getattr(theirs, field), field


# --- tokenizer -------------------------------------------------------------------------

TOKENS = ["!", "a", "c", "d", "e", "r", "t", "a</w>", "d</w>", "t</w>", "e</w>",
          "re", "red</w>", "ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"]
MERGES = [("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>")]
ID = {token: index for index, token in enumerate(TOKENS)}


def write_tokenizer(folder, pad_token=None):
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(ID))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    if pad_token is not None:  # SD 2.x sets its pad token in special_tokens_map.json
        added = lambda content: {"__type": "AddedToken", "content": content, "lstrip": False,
                                 "normalized": True, "rstrip": False, "single_word": False}
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
             "unk_token": added("<|endoftext|>"), "pad_token": "<|endoftext|>", "model_max_length": 77,
             "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}))
        (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_token}))
    return folder


@pytest.mark.parity
def test_tokenize_matches_clip_tokenizer_and_flags_truncation(tmp_path):
    tokenizer = load_tokenizer(write_tokenizer(tmp_path / "tokenizer"))
    direct = transformers.CLIPTokenizer(vocab=dict(ID), merges=list(MERGES))
    prompts = ["a red cat", "A  Red   CAT", "red cat red cat red"]
    ids, mask, truncated = tokenize(tokenizer, prompts, max_length=6)
    assert ids.dtype == np.int32 and ids.shape == (3, 6)
    expected = direct(prompts, padding="max_length", max_length=6, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ids, expected)
    bos, eos = ID["<|startoftext|>"], ID["<|endoftext|>"]
    a, red, cat = ID["a</w>"], ID["red</w>"], ID["cat</w>"]
    np.testing.assert_array_equal(ids[0], [bos, a, red, cat, eos, eos])
    np.testing.assert_array_equal(ids[2], [bos, red, cat, red, cat, eos])  # 7 tokens cut to 6
    assert truncated == [False, False, True]
    exact, _, flags = tokenize(tokenizer, ["red cat red cat"], max_length=6)  # exactly 6: not cut
    assert flags == [False] and exact[0, -1] == eos


@pytest.mark.parity
def test_tokenize_pads_to_the_tokenizers_model_max_length(tmp_path):
    # diffusers pads and truncates to tokenizer.model_max_length (tokenizer_config.json).
    folder = write_tokenizer(tmp_path / "tokenizer", pad_token="<|endoftext|>")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 5}))
    tokenizer = load_tokenizer(folder)
    prompts = ["a cat", "red cat red cat"]
    ids, mask, truncated = tokenize(tokenizer, prompts)
    expected = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True)["input_ids"]
    np.testing.assert_array_equal(ids, expected)
    assert ids.shape == (2, 5) and truncated == [False, True]


def test_tokenize_without_model_max_length_names_the_fix(tmp_path):
    tokenizer = load_tokenizer(write_tokenizer(tmp_path / "tokenizer"))  # no tokenizer_config.json
    with pytest.raises(ValueError, match="model_max_length"):
        tokenize(tokenizer, ["a cat"])
    assert tokenize(tokenizer, ["a cat"], max_length=7)[0].shape == (1, 7)


# Prompts where normalisation, byte-level BPE, special tokens or truncation could differ.
TRICKY_PROMPTS = ["a red cat", "", "   ", "Café crème brûlée", "e\u0301 combining", "東京の夜景 🌃",
                  "ＡＢＣ full width", "&amp; &lt;b&gt; Ã© mojibake", "tab\there\nnew  line", "UPPER Lower",
                  "a <|endoftext|> b", "<|startoftext|>x", "a,b.c!!!?", "word " * 100]


@pytest.mark.parity
def test_shipped_checkpoint_text_path_matches_transformers():
    # The shipped tokenizer and text encoder against transformers' CLIPTokenizer and
    # CLIPTextModel, called as diffusers' StableDiffusionPipeline.encode_prompt does.
    import pathlib

    from safetensors.numpy import load_file

    import jaxdiff

    root = pathlib.Path(jaxdiff.__file__).parent / "checkpoints" / "default"
    reference_tokenizer = transformers.CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    reference = transformers.CLIPTextModel.from_pretrained(root, subfolder="text_encoder").eval()
    config = CLIPTextConfig.from_dict(json.loads((root / "text_encoder" / "config.json").read_text()))
    abstract = nnx.eval_shape(lambda: CLIPTextModel(config, rngs=nnx.Rngs(0)))
    tensors = load_file(root / "text_encoder" / "model.safetensors")
    model = load_state_dict(abstract, dict(with_text_model_prefix(tensors)), ignore=("position_ids",))

    ids, mask, truncated = tokenize(load_tokenizer(root / "tokenizer"), TRICKY_PROMPTS)
    expected = reference_tokenizer(TRICKY_PROMPTS, padding="max_length", truncation=True,
                                   max_length=reference_tokenizer.model_max_length, return_tensors="pt")
    np.testing.assert_array_equal(ids, expected.input_ids.numpy())
    np.testing.assert_array_equal(mask, expected.attention_mask.numpy())
    assert truncated == [p.startswith("word") for p in TRICKY_PROMPTS]
    assert ids[-1, -1] == reference_tokenizer.eos_token_id
    with torch.no_grad():
        hidden_states = reference(expected.input_ids, output_hidden_states=True).hidden_states
        for clip_skip in range(config.num_hidden_layers + 1):
            embeds = reference.final_layer_norm(hidden_states[-(clip_skip + 1)]).numpy()
            out = model(jnp.asarray(ids), clip_skip=clip_skip).last_hidden_state
            np.testing.assert_allclose(out, embeds, atol=ATOL, rtol=RTOL, err_msg=f"clip_skip={clip_skip}")


def test_tokenize_pads_with_the_tokenizers_pad_token(tmp_path):
    tokenizer = load_tokenizer(write_tokenizer(tmp_path / "tokenizer", pad_token="!"))
    ids, mask, _ = tokenize(tokenizer, ["a cat"], max_length=7)
    np.testing.assert_array_equal(ids[0], [ID["<|startoftext|>"], ID["a</w>"], ID["cat</w>"],
                                           ID["<|endoftext|>"], 0, 0, 0])
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0, 0])


def test_tokenize_of_no_prompts_keeps_the_token_length(tmp_path):
    """An empty list of prompts tokenizes to zero rows of max_length tokens, so it stacks
    with other batches' ids and masks like any other."""
    tokenizer = load_tokenizer(write_tokenizer(tmp_path / "tokenizer"))
    ids, mask, truncated = tokenize(tokenizer, [], max_length=7)
    assert ids.shape == mask.shape == (0, 7) and ids.dtype == mask.dtype == np.int32
    assert truncated == []


@pytest.mark.faults
def test_tokenizer_bad_input_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer/"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(tmp_path / "empty")
    tokenizer = load_tokenizer(write_tokenizer(tmp_path / "tokenizer"))
    with pytest.raises(TypeError, match=r"\[prompt\]"):
        tokenize(tokenizer, "a cat")
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        tokenize(tokenizer, ["a cat", None])
