"""The Hugging Face / PyTorch layout: v1's key table from the spec (§4), exact round trips, clear errors."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jclip_jax import JinaCLIP
from jclip_jax.convert import hf_layout, torch_layout
from jclip_jax.convert.towers import import_jina_bert_v2
from jclip_jax.models import configs


def spec_v1_table():
    """jina-clip-v1's state dict, typed from the spec's §4 tables (not generated from our code)."""
    t, v = "text_model.transformer.", "vision_model."
    table = {
        "logit_scale": (),
        t + "embeddings.word_embeddings.weight": (30528, 768),
        t + "embeddings.token_type_embeddings.weight": (2, 768),
        t + "emb_ln.weight": (768,), t + "emb_ln.bias": (768,),
        v + "cls_token": (1, 1, 768), v + "pos_embed": (1, 197, 768),
        v + "patch_embed.proj.weight": (768, 3, 16, 16), v + "patch_embed.proj.bias": (768,),
        v + "norm.weight": (768,), v + "norm.bias": (768,),
    }
    for i in range(12):
        p = f"{t}encoder.layers.{i}."
        table.update({
            p + "mixer.Wqkv.weight": (2304, 768), p + "mixer.Wqkv.bias": (2304,),
            p + "mixer.out_proj.weight": (768, 768), p + "mixer.out_proj.bias": (768,),
            p + "norm1.weight": (768,), p + "norm1.bias": (768,),
            p + "mlp.gated_layers.weight": (6144, 768),
            p + "mlp.wo.weight": (768, 3072), p + "mlp.wo.bias": (768,),
            p + "norm2.weight": (768,), p + "norm2.bias": (768,),
        })
        p = f"{v}blocks.{i}."
        table.update({
            p + "norm1.weight": (768,), p + "norm1.bias": (768,),
            p + "attn.q_bias": (768,), p + "attn.v_bias": (768,),
            p + "attn.q_proj.weight": (768, 768), p + "attn.k_proj.weight": (768, 768),
            p + "attn.v_proj.weight": (768, 768),
            p + "attn.inner_attn_ln.weight": (768,), p + "attn.inner_attn_ln.bias": (768,),
            p + "attn.proj.weight": (768, 768), p + "attn.proj.bias": (768,),
            p + "norm2.weight": (768,), p + "norm2.bias": (768,),
            p + "mlp.w1.weight": (2048, 768), p + "mlp.w1.bias": (2048,),
            p + "mlp.w2.weight": (2048, 768), p + "mlp.w2.bias": (2048,),
            p + "mlp.ffn_ln.weight": (2048,), p + "mlp.ffn_ln.bias": (2048,),
            p + "mlp.w3.weight": (768, 2048), p + "mlp.w3.bias": (768,),
        })
    return table


def test_v1_key_set_shapes_and_parameter_count():
    cfg = configs.jina_clip_v1()
    abstract = hf_layout.abstract_model(JinaCLIP, cfg)  # nothing allocated
    params = hf_layout.flax_params(abstract)
    assert sum(int(np.prod(p.shape)) for p in params.values()) == 222_647_041
    shapes = jax.eval_shape(lambda p: torch_layout.to_torch(cfg, p), params)
    ours = {k: tuple(s.shape) for k, s in shapes.items()}
    expected = spec_v1_table()
    assert len(expected) == 395
    assert ours == expected


def test_v1_config_json_matches_the_spec():
    hf = hf_layout.config_to_hf(configs.jina_clip_v1())
    assert hf["add_projections"] is False and hf["logit_scale_init_value"] == 2.6592
    vc = hf["vision_config"]
    assert (vc["width"], vc["layers"], vc["head_width"], vc["image_size"], vc["patch_size"]) == (768, 12, 64, 224, 16)
    assert int(vc["width"] * vc["mlp_ratio"]) == 2048 and vc["pt_hw_seq_len"] == 14 and vc["intp_freq"] is False
    assert hf["text_config"]["hf_model_config_kwargs"] == {"use_flash_attn": False}  # all defaults
    back = hf_layout.config_from_hf(hf)
    assert back.text.to_dict() == configs.jina_clip_v1().text.to_dict()
    assert back.vision.to_dict() == configs.jina_clip_v1().vision.to_dict()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = JinaCLIP(configs.tiny(), rngs=nnx.Rngs(7))
    model.save_pretrained(d)
    return model, d


def test_save_load_round_trip_is_exact(saved, tmp_path):
    model, d = saved
    sd = load_file(d / "model.safetensors")
    assert sd["logit_scale"].shape == () and np.isclose(sd["logit_scale"], 2.6592)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["text_config"]["hf_model_config_kwargs"]["hidden_size"] == 64  # tiny sizes travel as overrides
    loaded = JinaCLIP.from_pretrained(d)
    a, b = hf_layout.flax_params(model), hf_layout.flax_params(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg="/".join(k))
    loaded.save_pretrained(tmp_path)
    sd2 = load_file(tmp_path / "model.safetensors")
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and sd[k].tobytes() == sd2[k].tobytes(), k


def test_persistent_rope_buffers_are_ignored_wherever_they_appear_and_only_they(saved, tmp_path):
    """Jina's EVA code saves rope.freqs_cos/_sin at the tower's top level and in every block's attention."""
    model, d = saved
    sd = load_file(d / "model.safetensors")
    table = np.full((16, 16), 7.0, np.float32)  # garbage: must not reach the model
    rope_keys = ["vision_model.rope.freqs_cos", "vision_model.rope.freqs_sin"]
    rope_keys += [f"vision_model.blocks.{i}.attn.rope.freqs_{f}" for i in range(2) for f in ("cos", "sin")]
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    save_file({**sd, **dict.fromkeys(rope_keys, table)}, tmp_path / "model.safetensors")
    loaded = JinaCLIP.from_pretrained(tmp_path)
    a, b = hf_layout.flax_params(model), hf_layout.flax_params(loaded)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg="/".join(k))
    # anything else under a rope module, or a freqs buffer of another name, is still an unexpected key
    for other in ("vision_model.blocks.0.attn.rope.freqs", "vision_model.rope.freqs_cos_extra",
                  "vision_model.blocks.1.attn.rope_scale", "vision_model.rope.inv_freq"):
        save_file({**sd, other: table}, tmp_path / "model.safetensors")
        with pytest.raises(ValueError, match="1 unexpected key"):
            JinaCLIP.from_pretrained(tmp_path)


def test_bad_checkpoints_name_the_offending_keys(saved, tmp_path):
    model, d = saved
    sd = load_file(d / "model.safetensors")
    del sd["vision_model.blocks.1.attn.q_bias"]
    sd["vision_model.blocks.0.attn.k_bias"] = np.zeros(64, np.float32)
    sd["text_model.transformer.emb_ln.weight"] = np.zeros(65, np.float32)
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        JinaCLIP.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "1 missing key(s): vision_model.blocks.1.attn.q_bias" in msg
    assert "1 unexpected key(s): vision_model.blocks.0.attn.k_bias" in msg
    assert "text_model.transformer.emb_ln.weight: expected [64], got [65]" in msg


def test_bad_config_names_the_field(tmp_path):
    hf = hf_layout.config_to_hf(configs.tiny())
    hf["vision_config"]["subln"] = False
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="vision_config.subln=False"):
        JinaCLIP.from_pretrained(tmp_path)
    del hf["vision_config"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="missing field vision_config"):
        JinaCLIP.from_pretrained(tmp_path)


def test_import_original_jina_bert_v2_layout(saved):
    """Build an original-layout (separate q/k/v, attention.output.*, mlp.layernorm) dict by hand."""
    model, d = saved
    sd = load_file(d / "model.safetensors")
    t, width = "text_model.transformer.", 64
    orig = {
        "bert.embeddings.word_embeddings.weight": sd[t + "embeddings.word_embeddings.weight"],
        "bert.embeddings.token_type_embeddings.weight": sd[t + "embeddings.token_type_embeddings.weight"],
        "bert.embeddings.LayerNorm.weight": sd[t + "emb_ln.weight"],
        "bert.embeddings.LayerNorm.bias": sd[t + "emb_ln.bias"],
        "bert.pooler.dense.weight": np.zeros((width, width), np.float32),
    }
    for i in range(2):
        p, q = f"{t}encoder.layers.{i}.", f"bert.encoder.layer.{i}."
        for j, name in enumerate(("query", "key", "value")):
            orig[q + f"attention.self.{name}.weight"] = sd[p + "mixer.Wqkv.weight"][j * width:(j + 1) * width]
            orig[q + f"attention.self.{name}.bias"] = sd[p + "mixer.Wqkv.bias"][j * width:(j + 1) * width]
        for a, b in (("attention.output.dense", "mixer.out_proj"), ("attention.output.LayerNorm", "norm1"),
                     ("mlp.wo", "mlp.wo"), ("mlp.layernorm", "norm2")):
            orig[q + a + ".weight"], orig[q + a + ".bias"] = sd[p + b + ".weight"], sd[p + b + ".bias"]
        orig[q + "mlp.gated_layers.weight"] = sd[p + "mlp.gated_layers.weight"]
    fresh = JinaCLIP(configs.tiny(), rngs=nnx.Rngs(99))
    ignored = import_jina_bert_v2(fresh, orig)
    assert ignored == ["pooler.dense.weight"]
    a, b = hf_layout.flax_params(model), hf_layout.flax_params(fresh)
    for k in a:
        if k[0] == "text_model":
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg="/".join(k))
        elif k[0] == "vision_model":
            assert not np.array_equal(np.asarray(a[k]), np.asarray(b[k])) or np.asarray(a[k]).std() == 0
