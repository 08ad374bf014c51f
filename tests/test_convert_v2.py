"""v2 conversions: `jclip-convert from-towers` with a jina-embeddings-v3 text state dict (original key names,
with or without LoRA parametrizations), and the model-card API on v2 (XLM-R tokenizer, task instructions,
Matryoshka truncation)."""

import json

import numpy as np
import pytest
from helpers import write_xlmr_style_tokenizer
from safetensors.numpy import load_file, save_file

from jclip_jax import JinaCLIP
from jclip_jax.convert import cli, hf_layout
from jclip_jax.models import configs
from jclip_jax.tokenizer import TextTokenizer


def random_tiny_v2(seed=0):
    abstract = hf_layout.abstract_model(JinaCLIP, configs.tiny_v2())
    rng = np.random.default_rng(seed)
    return hf_layout.merge_params(abstract, {k: rng.normal(size=v.shape).astype(np.float32) * 0.1
                                             for k, v in hf_layout.flax_params(abstract).items()})


def v3_state_dict(v2_sd, parametrized: bool):
    """A jina-embeddings-v3-shaped text state dict (prefix `roberta.`, five 4-rank adapters) from v2 weights."""
    out = {}
    for key, value in v2_sd.items():
        if not key.startswith("text_model.transformer."):
            continue
        k = key[len("text_model.transformer."):]
        if ".parametrizations.weight.0.lora_" in k:
            if parametrized:
                out[k] = np.repeat(value, 5, axis=0)  # five tasks in v3
            continue
        out[k if parametrized else k.replace(".parametrizations.weight.original", ".weight")] = value
    out["lm_head.bias"] = np.zeros(3, np.float32)
    return out


@pytest.mark.parametrize("parametrized", [True, False])
def test_from_towers_imports_jina_embeddings_v3_base_weights(tmp_path, parametrized):
    source = random_tiny_v2(seed=1)
    source.save_pretrained(tmp_path / "src")
    sd = load_file(tmp_path / "src" / "model.safetensors")
    save_file(v3_state_dict(sd, parametrized), tmp_path / "v3.safetensors")
    tok = write_xlmr_style_tokenizer(str(tmp_path / "tokenizer.json"))
    code = cli.main(["from-towers", "--model", "tiny-v2", "--jina-embeddings-v3", str(tmp_path / "v3.safetensors"),
                     "--tokenizer", tok, "--output", str(tmp_path / "out")])
    assert code == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got.keys() == sd.keys()
    for key in sd:
        if key.startswith("text_model.") and ".lora_" not in key:
            np.testing.assert_array_equal(got[key], sd[key], err_msg=key)
        elif ".lora_" in key:  # jina-clip-v2 does not load v3's adapters: they keep the fresh init
            assert not np.array_equal(got[key], sd[key]), key


def test_from_towers_rejects_a_v3_tower_for_a_v1_model(tmp_path, capsys):
    random_tiny_v2().save_pretrained(tmp_path / "src")
    save_file(v3_state_dict(load_file(tmp_path / "src" / "model.safetensors"), True), tmp_path / "v3.safetensors")
    assert cli.main(["from-towers", "--model", "tiny", "--jina-embeddings-v3", str(tmp_path / "v3.safetensors"),
                     "--output", str(tmp_path / "out")]) == 1
    assert "need a jina-clip-v2 model config" in capsys.readouterr().err


def test_v2_encode_text_with_task_instruction_and_truncation(tmp_path):
    model = random_tiny_v2(seed=2)
    model.tokenizer = TextTokenizer(write_xlmr_style_tokenizer(str(tmp_path / "tokenizer.json")))
    ids = model.tokenizer(["a red circle", "a photo of a dog on the left"], max_length=64)
    assert model.tokenizer.pad_id == 1 and (ids[:, 0] == 0).all()  # <s> ... </s> <pad>
    assert ids[0, list(ids[0]).index(2) + 1:].tolist() == [1] * (ids.shape[1] - list(ids[0]).index(2) - 1)
    texts = ["a red circle", "two green triangles at the top"]
    instruction = dict(configs.tiny_v2().text.task_instructions)["retrieval.query"]
    assert instruction == "Represent the query for retrieving evidence documents: "
    with_task = model.encode_text(texts, batch_size=4, task="retrieval.query")
    np.testing.assert_array_equal(with_task, model.encode_text([instruction + t for t in texts], batch_size=4))
    plain = model.encode_text(texts, batch_size=4)
    assert np.abs(with_task - plain).max() > 1e-3
    truncated = model.encode_text(texts, batch_size=4, truncate_dim=16)
    expected = plain[:, :16] / np.linalg.norm(plain[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(truncated, expected, atol=1e-6)
    with pytest.raises(ValueError, match="unknown task 'separation'"):
        model.encode_text(texts, task="separation")
    # the task instructions travel in config.json (hf_model_config_kwargs.task_instructions)
    model.save_pretrained(tmp_path / "saved")
    hf = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert hf["text_config"]["hf_model_config_kwargs"]["task_instructions"] == {"retrieval.query": instruction}
