"""The v2 text tower (Jina-XLM-RoBERTa + LoRA) against transformers' `JinaEmbeddingsV3Model`, float32.

The oracle has no LoRA: as spec §5.3/§5.4 prescribe, the adapter of task 0 is merged into the base weights on
the torch side (W + (alpha/r) B[0] @ A[0] for Linear, E + (alpha/r) A[0] @ B[0] for Embedding) from the
exported jina-clip-v2 state dict, and the original names are renamed to transformers' by the map below
(transformers' conversion_mapping: emb_ln -> embeddings.LayerNorm, encoder.layers -> layers, Wqkv -> q/k/v
chunks along dim 0, out_proj -> self_attn.o_proj, norm1/norm2 -> post_attention/post_mlp_layernorm).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch_compat import import_transformers

from jclip_jax.convert import hf_layout, torch_layout
from jclip_jax.models import configs, lora
from jclip_jax.models.clip import JinaCLIP

transformers = import_transformers()

ROBERTA = "text_model.transformer.roberta."


def randomized_model(cfg, seed=0, std=0.05, lora_std=0.3):
    """A JinaCLIP with random values in every parameter (LoRA factors and LayerNorms included), built from
    numpy on the abstract model (no per-shape init compiles)."""
    abstract = hf_layout.abstract_model(JinaCLIP, cfg)
    rng = np.random.default_rng(seed)

    def value(key, shape):
        noise = rng.normal(size=shape).astype(np.float32)
        if key[-1] == "scale":
            return 1.0 + std * noise
        return noise * (lora_std if key[-1].startswith("lora") else std)

    return hf_layout.merge_params(abstract, {k: value(k, v.shape) for k, v in hf_layout.flax_params(abstract).items()})


def oracle_state_dict(sd, num_layers, scaling):
    """jina-clip-v2 text keys (LoRA parametrisations) -> JinaEmbeddingsV3Model keys, task-0 LoRA merged."""
    def linear(key):
        w = key + ".parametrizations.weight."
        return sd[w + "original"] + scaling * sd[w + "0.lora_B"][0] @ sd[w + "0.lora_A"][0]

    def embedding(key):
        w = key + ".parametrizations.weight."
        return sd[w + "original"] + scaling * sd[w + "0.lora_A"][0] @ sd[w + "0.lora_B"][0]

    p = ROBERTA
    out = {
        "embeddings.word_embeddings.weight": embedding(p + "embeddings.word_embeddings"),
        "embeddings.token_type_embeddings.weight": embedding(p + "embeddings.token_type_embeddings"),
        "embeddings.LayerNorm.weight": sd[p + "emb_ln.weight"], "embeddings.LayerNorm.bias": sd[p + "emb_ln.bias"],
    }
    for i in range(num_layers):
        src, dst = f"{p}encoder.layers.{i}.", f"layers.{i}."
        for j, name in enumerate(np.split(linear(src + "mixer.Wqkv"), 3, axis=0)):
            out[dst + f"self_attn.{'qkv'[j]}_proj.weight"] = name
        for j, bias in enumerate(np.split(sd[src + "mixer.Wqkv.bias"], 3)):
            out[dst + f"self_attn.{'qkv'[j]}_proj.bias"] = bias
        out[dst + "self_attn.o_proj.weight"] = linear(src + "mixer.out_proj")
        out[dst + "self_attn.o_proj.bias"] = sd[src + "mixer.out_proj.bias"]
        out[dst + "mlp.fc1.weight"], out[dst + "mlp.fc1.bias"] = linear(src + "mlp.fc1"), sd[src + "mlp.fc1.bias"]
        out[dst + "mlp.fc2.weight"], out[dst + "mlp.fc2.bias"] = linear(src + "mlp.fc2"), sd[src + "mlp.fc2.bias"]
        for a, b in (("norm1", "post_attention_layernorm"), ("norm2", "post_mlp_layernorm")):
            out[dst + b + ".weight"], out[dst + b + ".bias"] = sd[src + a + ".weight"], sd[src + a + ".bias"]
    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in out.items()}


def oracle_embeddings(model, ids):
    """Mean-pooled (over ids != pad) last hidden states of JinaEmbeddingsV3Model with our weights, numpy."""
    t = model.cfg.text
    params = {k: np.asarray(v) for k, v in hf_layout.flax_params(model).items()}
    sd = torch_layout.to_torch(model.cfg, params)
    config = transformers.JinaEmbeddingsV3Config(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size, hidden_act="gelu",
        layer_norm_eps=t.layer_norm_eps, pad_token_id=t.pad_token_id, type_vocab_size=t.type_vocab_size,
        rope_parameters={"rope_theta": t.rotary_emb_base, "rope_type": "default"}, attn_implementation="eager")
    oracle = transformers.JinaEmbeddingsV3Model(config, add_pooling_layer=False).eval()
    oracle.load_state_dict(oracle_state_dict(sd, t.num_hidden_layers, t.lora_alpha / t.lora_rank), strict=True)
    mask = torch.from_numpy(ids != t.pad_token_id)
    with torch.no_grad():
        h = oracle(input_ids=torch.from_numpy(ids).long(), attention_mask=mask.long()).last_hidden_state
    m = mask[..., None].float()
    return ((h * m).sum(1) / m.sum(1)).numpy()


def padded_ids(rng, lengths, vocab, pad=1, length=None):
    """<s> tokens </s> then pad, one row per length (XLM-R ids: bos 0, pad 1, eos 2)."""
    length = length or max(lengths)
    ids = np.full((len(lengths), length), pad, np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = np.concatenate([[0], rng.integers(3, vocab, n - 2), [2]])
    return ids


@nnx.jit
def text_features(model, ids):
    return model.text_features(ids)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("scan_layers,remat,base", [(True, False, 20000.0), (False, True, 500.0)])
def test_text_tower_matches_transformers_jina_embeddings_v3(scan_layers, remat, base):
    cfg = configs.tiny_v2(scan_layers=scan_layers, remat=remat)
    cfg.text.rotary_emb_base = base  # read from the config on both sides (20000 = jina-embeddings-v3's)
    model = randomized_model(cfg)
    ids = padded_ids(np.random.default_rng(1), [24, 9, 3, 17], cfg.text.vocab_size)  # padded batch
    ours = np.asarray(text_features(model, ids))
    ref = oracle_embeddings(model, ids)
    err = np.abs(_unit(ours) - _unit(ref)).max()
    print(f"text parity vs JinaEmbeddingsV3Model (base {base}): max |diff| {err:.2e}")
    assert err <= 1e-4, err
    # The LoRA delta is not negligible, so the merged oracle really checks it.
    params = hf_layout.flax_params(model)
    no_lora = {k: (np.zeros_like(v) if k[-1] == "lora_b" else np.asarray(v)) for k, v in params.items()}
    nnx.update(model, hf_layout.with_values(nnx.state(model, nnx.Param), no_lora))
    assert np.abs(_unit(np.asarray(text_features(model, ids))) - _unit(ref)).max() > 1e-2


def test_unmerged_lora_forward_equals_merged_forward():
    cfg = configs.tiny_v2()
    model = randomized_model(cfg, seed=3)
    ids = padded_ids(np.random.default_rng(3), [12, 5, 20], cfg.text.vocab_size)
    unmerged = np.asarray(text_features(model, ids))
    before = {k: np.asarray(v) for k, v in hf_layout.flax_params(model).items()}
    lora.merge_lora(model)
    after = {k: np.asarray(v) for k, v in hf_layout.flax_params(model).items()}
    assert not any(after[k].any() for k in after if k[-1] == "lora_b")  # the deltas now live in the base weights
    assert not np.array_equal(before[("text_model", "layers", "wqkv", "kernel")],
                              after[("text_model", "layers", "wqkv", "kernel")])
    merged = np.asarray(text_features(model, ids))
    np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)
    # the same merged weights in a tower with no LoRA at all
    plain_cfg = configs.tiny_v2()
    plain_cfg.text.lora_adaptations = ()
    plain = hf_layout.merge_params(hf_layout.abstract_model(JinaCLIP, plain_cfg),
                                   {k: v for k, v in after.items() if not k[-1].startswith("lora")})
    np.testing.assert_allclose(np.asarray(text_features(plain, ids)), unmerged, atol=1e-5, rtol=0)


def test_lora_param_shapes_follow_jina():
    """Per layer (stacked): Linear lora_a (n, in, r) / lora_b (n, r, *out); Embedding (n, num, r) / (n, r, dim)."""
    cfg = configs.tiny_v2()
    shapes = {k: tuple(v.shape) for k, v in hf_layout.flax_params(
        hf_layout.abstract_model(JinaCLIP, cfg)).items()}
    assert shapes[("text_model", "layers", "wqkv", "lora_a")] == (2, 1, 64, 4)
    assert shapes[("text_model", "layers", "wqkv", "lora_b")] == (2, 1, 4, 3, 4, 16)
    assert shapes[("text_model", "layers", "fc2", "lora_a")] == (2, 1, 128, 4)
    assert shapes[("text_model", "word_embeddings", "lora_a")] == (1, 512, 4)
    assert shapes[("text_model", "word_embeddings", "lora_b")] == (1, 4, 64)
    # Linear: A ~ U(+-1/sqrt(in)) (torch's Linear init), B = 0; Embedding: A = 0, B ~ N(0, 1): a no-op at init.
    kw = dict(adaptations=1, rank=4, alpha=4.0, task=0, dtype=jnp.float32, param_dtype=jnp.float32,
              rngs=nnx.Rngs(0))
    linear = lora.LoRALinear(64, (128,), ("embed", "mlp"), **kw)
    a = np.asarray(linear.lora_a[...])
    assert not np.asarray(linear.lora_b[...]).any() and 0.9 / 8 < np.abs(a).max() <= 1 / 8
    embed = lora.LoRAEmbed(512, 64, ("vocab", "embed"), **kw)
    assert not np.asarray(embed.lora_a[...]).any() and 0.8 < np.asarray(embed.lora_b[...]).std() < 1.2


def test_bad_lora_settings_fail_naming_the_field():
    cfg = configs.tiny_v2()
    cfg.text.default_lora_task = "separation"
    with pytest.raises(ValueError, match="text.default_lora_task='separation'"):
        JinaCLIP(cfg, rngs=nnx.Rngs(0))
