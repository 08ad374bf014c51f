"""jina-clip-v2 training: LoRA-only steps leave the base weights bit-identical and hold no optimizer state for
them; tiny-v2 trains on the synthetic data with the Matryoshka loss and a truncated embedding still retrieves."""

import io
import os

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import load_config, write_xlmr_style_tokenizer
from PIL import Image

from jclip_jax import JinaCLIP, sharding
from jclip_jax.convert import cli
from jclip_jax.data import synthetic
from jclip_jax.models import configs, lora
from jclip_jax.tokenizer import TextTokenizer
from jclip_jax.training import config as train_config
from jclip_jax.training import initial_weights, optim
from jclip_jax.training import loop as train
from jclip_jax.training import step as train_step


def loss_config(**overrides):
    c = dict(stage=1, tasks=(), implementation="plain", tile_size=None, text_temperature=0.05,
             matryoshka_dims=(), matryoshka_weights=(), batch_axes=())
    c.update(overrides)
    return c


def tiny_v2_batch(rng, b, length=10):
    def tokens(*shape):
        ids = rng.integers(3, 512, size=shape).astype(np.int32)
        ids[..., 0], ids[..., -1] = 0, 2
        ids[: b // 2, -3:] = 1  # some padding
        return ids

    return {"text_query": tokens(b, length), "text_passage": tokens(b, length), "image_caption": tokens(b, length),
            "image": rng.normal(size=(b, 36, 36, 3)).astype(np.float32)}


def test_lora_only_steps_keep_every_base_weight_bit_identical():
    mesh = sharding.make_mesh([("data", -1)])
    config = optim.default_config(1, peak_lr=1e-2, warmup_steps=0, total_steps=10,
                                  frozen=lora.frozen_patterns("lora_only"))
    tx = optim.make_optimizer(config)
    graphdef, state, shardings = train_step.create_train_state(
        lambda: JinaCLIP(configs.tiny_v2(), rngs=nnx.Rngs(0)), tx, mesh)
    held = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state["opt_state"])]
    text_held = [p for p in held if "text_model" in p]
    assert text_held and all("lora_a" in p or "lora_b" in p for p in text_held)  # no moments for base weights
    assert any("vision_model" in p for p in held)

    before = jax.tree.map(np.asarray, nnx.to_pure_dict(state["params"]))
    step = train_step.make_train_step(graphdef, tx, loss_config(matryoshka_dims=(16, 64),
                                                                matryoshka_weights=(1.0, 1.0)), mesh, shardings)
    for i in range(2):  # Linear lora_b starts at zero: lora_a only moves from the second step on
        state, _ = step(state, tiny_v2_batch(np.random.default_rng(i), 16), jax.random.key(i))
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(state["params"]))
    flat_before = dict(jax.tree_util.tree_leaves_with_path(before["text_model"]))
    flat_after = dict(jax.tree_util.tree_leaves_with_path(after["text_model"]))
    lora_keys = [k for k in flat_before if "lora_" in jax.tree_util.keystr(k)]
    base_keys = [k for k in flat_before if k not in lora_keys]
    assert len(lora_keys) == 12 and len(base_keys) == 16
    for k in base_keys:
        assert flat_before[k].tobytes() == flat_after[k].tobytes(), jax.tree_util.keystr(k)
    for k in lora_keys:
        assert np.any(flat_before[k] != flat_after[k]), jax.tree_util.keystr(k)


def test_text_lora_mode_needs_a_lora_tower():
    config = train_config.base_config(configs.tiny(), stage=1)
    config.text_lora = "lora_only"
    with pytest.raises(ValueError, match="config.text_lora='lora_only' needs a text tower with LoRA"):
        train_config.optim_for_run(config)
    config = train_config.base_config(configs.tiny_v2(), stage=1)
    config.text_lora = "base_only"
    assert train_config.optim_for_run(config).frozen == (r"^text_model/.*/lora_[ab]$",)


@pytest.fixture(scope="module")
def synthetic_v2(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_v2")
    synthetic.write_synthetic(root, num_train=256, num_eval=32, num_text_pairs=256, num_triplets=16, image_size=36)
    write_xlmr_style_tokenizer(str(root / "xlmr_tokenizer.json"), synthetic.vocabulary_texts(0), vocab_size=300)
    return root


def test_tiny_v2_trains_with_matryoshka_and_a_truncated_embedding_retrieves(synthetic_v2, tmp_path, capfd):
    config = train_config.base_config(configs.tiny_v2(), stage=1)
    config.mesh = (("data", -1),)
    config.data.synthetic_dir = str(synthetic_v2)
    config.data.tokenizer_path = str(synthetic_v2 / "xlmr_tokenizer.json")  # pad 1 / bos 0 / eos 2
    config.data.image_batch_size = config.data.text_batch_size = 32
    config.data.image_max_length = config.data.text_max_length = 32
    config.loss.matryoshka_dims = (16, 32, 64)
    config.loss.matryoshka_weights = (1.0, 1.0, 1.0)
    config.total_steps, config.log_every, config.checkpoint_every, config.eval_every = 60, 10, 60, 0
    config.optim.peak_lr, config.optim.warmup_steps = 2e-3, 5
    config.evals.batch_size = 32
    train.train(config, str(tmp_path / "run"))
    losses = [float(line.split("loss=")[1].split()[0]) for line in capfd.readouterr().out.splitlines()
              if line.startswith("step ") and " loss=" in line]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses

    # export to jina-clip-v2's layout, load it back, embed the held-out pairs at 16 of 64 dims
    out = tmp_path / "hf"
    assert cli.main(["to-torch", "--checkpoint", str(tmp_path / "run"), "--output", str(out)]) == 0
    model = JinaCLIP.from_pretrained(out)
    assert model.tokenizer.pad_id == 1 and isinstance(model.tokenizer, TextTokenizer)
    pairs = list(synthetic.image_text_eval(32, 36, 0))
    images = [Image.open(io.BytesIO(p["image"])) for p in pairs]
    captions = [p["captions"][0] for p in pairs]
    text = model.encode_text(captions, truncate_dim=16)
    image = model.encode_image(images, truncate_dim=16)
    assert text.shape == (32, 16) and np.allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    r1 = float(np.mean(np.argmax(text @ image.T, axis=1) == np.arange(32)))
    assert r1 > 4 / 32, r1  # chance is 1/32
    assert os.path.exists(out / "tokenizer.json")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_v2_stage_configs_validate(stage):
    config = load_config("jina_clip_v2", f"stage={stage}")
    train_config.validate(config)
    assert config.model.vision.image_size == {1: 224, 2: 384, 3: 512}[stage]  # the paper's per-stage resolution
    assert config.data.text_max_length == {1: 77, 2: 512, 3: 512}[stage]
    assert tuple(config.loss.matryoshka_dims) == (32, 64, 128, 256, 512, 768, 1024)
    local = load_config("jina_clip_v2", f"stage={stage},runlocal")
    train_config.validate(local)
    assert local.model.text.hidden_size == 64 and tuple(local.loss.matryoshka_dims) == (16, 32, 64)


def test_merged_mode_folds_the_lora_and_keeps_the_forward():
    cfg = configs.tiny_v2()
    abstract = nnx.eval_shape(lambda: JinaCLIP(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jax.numpy.asarray(rng.normal(size=x.shape).astype(np.float32) * 0.1), params)
    ids = tiny_v2_batch(np.random.default_rng(1), 4)["text_query"]
    before = np.asarray(nnx.merge(graphdef, params).text_features(ids))
    merged = initial_weights.merged_text_lora(graphdef, params)
    assert not np.asarray(merged["text_model"]["layers"]["wqkv"]["lora_b"][...]).any()
    np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, merged).text_features(ids)), before, atol=1e-5)
    config = train_config.base_config(cfg, stage=1)
    config.text_lora = "merged"  # the factors are then held fixed
    assert train_config.optim_for_run(config).frozen == (r"^text_model/.*/lora_[ab]$",)
