"""jina-clip-v2's Hugging Face layout: the key table typed from spec §5.2, the parameter count from §5.1, the
config.json schema of §5.4, and exact round trips."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jclip_jax import JinaCLIP
from jclip_jax.convert import hf_layout, torch_layout
from jclip_jax.models import configs


def spec_v2_table():
    """jina-clip-v2's state dict, typed from the spec's §5.2 table (not generated from our code)."""
    t, v = "text_model.transformer.roberta.", "vision_model."
    pw = ".parametrizations.weight."
    table = {
        "logit_scale": (),
        t + "embeddings.word_embeddings" + pw + "original": (250002, 1024),
        t + "embeddings.word_embeddings" + pw + "0.lora_A": (1, 250002, 4),
        t + "embeddings.word_embeddings" + pw + "0.lora_B": (1, 4, 1024),
        t + "embeddings.token_type_embeddings" + pw + "original": (1, 1024),
        t + "embeddings.token_type_embeddings" + pw + "0.lora_A": (1, 1, 4),
        t + "embeddings.token_type_embeddings" + pw + "0.lora_B": (1, 4, 1024),
        t + "emb_ln.weight": (1024,), t + "emb_ln.bias": (1024,),
        v + "cls_token": (1, 1, 1024), v + "pos_embed": (1, 1297, 1024),
        v + "patch_embed.proj.weight": (1024, 3, 14, 14), v + "patch_embed.proj.bias": (1024,),
        v + "norm.weight": (1024,), v + "norm.bias": (1024,),
    }
    for i in range(24):
        p = f"{t}encoder.layers.{i}."
        for name, out, inp in (("mixer.Wqkv", 3072, 1024), ("mixer.out_proj", 1024, 1024),
                               ("mlp.fc1", 4096, 1024), ("mlp.fc2", 1024, 4096)):
            table[p + name + pw + "original"] = (out, inp)
            table[p + name + pw + "0.lora_A"] = (1, 4, inp)
            table[p + name + pw + "0.lora_B"] = (1, out, 4)
            table[p + name + ".bias"] = (out,)
        for name in ("norm1", "norm2"):
            table[p + name + ".weight"], table[p + name + ".bias"] = (1024,), (1024,)
        p = f"{v}blocks.{i}."
        table.update({
            p + "norm1.weight": (1024,), p + "norm1.bias": (1024,),
            p + "attn.q_bias": (1024,), p + "attn.v_bias": (1024,),
            p + "attn.q_proj.weight": (1024, 1024), p + "attn.k_proj.weight": (1024, 1024),
            p + "attn.v_proj.weight": (1024, 1024),
            p + "attn.inner_attn_ln.weight": (1024,), p + "attn.inner_attn_ln.bias": (1024,),
            p + "attn.proj.weight": (1024, 1024), p + "attn.proj.bias": (1024,),
            p + "norm2.weight": (1024,), p + "norm2.bias": (1024,),
            p + "mlp.w1.weight": (2730, 1024), p + "mlp.w1.bias": (2730,),
            p + "mlp.w2.weight": (2730, 1024), p + "mlp.w2.bias": (2730,),
            p + "mlp.ffn_ln.weight": (2730,), p + "mlp.ffn_ln.bias": (2730,),
            p + "mlp.w3.weight": (1024, 2730), p + "mlp.w3.bias": (1024,),
        })
    return table


def test_v2_key_set_shapes_and_parameter_count():
    cfg = configs.jina_clip_v2()
    params = hf_layout.flax_params(hf_layout.abstract_model(JinaCLIP, cfg))  # nothing allocated
    # Spec §5.1: text base 558,314,496 = 250002*1024 (words) + 1024 (token type) + 2048 (emb_ln)
    #   + 24 * (3072*1024+3072 + 1024*1024+1024 + 4096*1024+4096 + 1024*4096+1024 + 2*2048);
    # one rank-4 LoRA, 2,581,068 = (250002*4 + 4*1024) + (1*4 + 4*1024) + 24 * 4*((1024+3072) + (1024+1024)
    #   + (1024+4096) + (4096+1024));  vision 304,382,912 (§5.1, = timm EVA02-L/14 at 512);  + logit_scale.
    text = 558_314_496 + 2_581_068
    assert sum(int(np.prod(p.shape)) for k, p in params.items() if k[0] == "text_model") == text  # "561M"
    assert sum(int(np.prod(p.shape)) for k, p in params.items() if k[0] == "vision_model") == 304_382_912
    assert sum(int(np.prod(p.shape)) for p in params.values()) == text + 304_382_912 + 1 == 865_278_477  # "865M"
    shapes = jax.eval_shape(lambda p: torch_layout.to_torch(cfg, p), params)
    expected = spec_v2_table()
    assert len(expected) == 999  # 8 + 24*20 text, 6 + 24*21 vision, logit_scale
    assert {k: tuple(s.shape) for k, s in shapes.items()} == expected


def test_v2_config_json_follows_jina_clip_v2s_schema():
    hf = hf_layout.config_to_hf(configs.jina_clip_v2())
    assert hf["matryoshka_dimensions"] == [32, 64, 128, 256, 512, 768, 1024]
    assert hf["projection_dim"] == 1024 and hf["add_projections"] is False
    tc = hf["text_config"]
    assert tc["hf_model_name_or_path"] == "jinaai/jina-embeddings-v3"
    assert tc["default_lora_task"] == "retrieval.query" and tc["default_instruction_task"] is None
    kw = tc["hf_model_config_kwargs"]
    assert kw["lora_adaptations"] == ["retrieval.query"] and kw["lora_rank"] == 4 and kw["lora_alpha"] == 4
    assert kw["task_instructions"] == {"retrieval.query": "Represent the query for retrieving evidence documents: "}
    assert "rotary_emb_base" not in kw and "hidden_size" not in kw  # jina-embeddings-v3's own values
    vc = hf["vision_config"]
    assert (vc["width"], vc["layers"], vc["image_size"], vc["patch_size"]) == (1024, 24, 512, 14)
    assert vc["pt_hw_seq_len"] == 16
    assert vc["intp_freq"] is True
    back = hf_layout.config_from_hf(json.loads(json.dumps(hf)))
    assert back.text.to_dict() == configs.jina_clip_v2().text.to_dict()
    assert back.vision.to_dict() == configs.jina_clip_v2().vision.to_dict()
    assert tuple(back.matryoshka_dimensions) == (32, 64, 128, 256, 512, 768, 1024)


def test_v2_config_reads_the_rotary_base_and_lora_settings_from_the_file():
    hf = hf_layout.config_to_hf(configs.tiny_v2())
    kw = hf["text_config"]["hf_model_config_kwargs"]
    kw.update(rotary_emb_base=10000.0, lora_alpha=1, lora_adaptations=["retrieval.query", "separation"])
    hf["text_config"]["default_lora_task"] = "separation"
    cfg = hf_layout.config_from_hf(hf)
    assert cfg.text.rotary_emb_base == 10000.0 and cfg.text.lora_alpha == 1.0
    assert cfg.text.default_lora_task == "separation" and tuple(cfg.text.lora_adaptations) == ("retrieval.query",
                                                                                              "separation")
    hf["text_config"]["default_lora_task"] = "classification"
    with pytest.raises(ValueError, match="default_lora_task='classification'"):
        hf_layout.config_from_hf(hf)


def test_v2_save_load_save_is_byte_identical(tmp_path):
    abstract = hf_layout.abstract_model(JinaCLIP, configs.tiny_v2())
    rng = np.random.default_rng(0)  # non-zero values everywhere (LoRA factors included)
    model = hf_layout.merge_params(abstract, {k: rng.normal(size=v.shape).astype(np.float32)
                                              for k, v in hf_layout.flax_params(abstract).items()})
    model.save_pretrained(tmp_path / "a")
    sd = load_file(tmp_path / "a" / "model.safetensors")
    assert len(sd) == 1 + (8 + 2 * 20) + (6 + 2 * 21)
    assert sd["logit_scale"].shape == ()
    loaded = JinaCLIP.from_pretrained(tmp_path / "a")
    a, b = hf_layout.flax_params(model), hf_layout.flax_params(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg="/".join(k))
    loaded.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()


def test_v2_checkpoint_with_missing_lora_names_the_key(tmp_path):
    abstract = hf_layout.abstract_model(JinaCLIP, configs.tiny_v2())
    model = hf_layout.merge_params(abstract, {k: np.zeros(v.shape, np.float32)
                                              for k, v in hf_layout.flax_params(abstract).items()})
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    key = "text_model.transformer.roberta.encoder.layers.1.mlp.fc1.parametrizations.weight.0.lora_B"
    del sd[key]
    from safetensors.numpy import save_file

    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"1 missing key\\(s\\): {key}"):
        JinaCLIP.from_pretrained(tmp_path)
