"""README's "fine-tune jina-clip-v1 on your own data" end to end on generated data and the tiny model:
prepare a CSV of image files -> jclip-train with configs/finetune.py (LiT-style frozen image tower, lr
multipliers and layer decay on the text tower, resumed from its checkpoint, whose optimizer state holds
optax MaskedNodes for the frozen tower) -> export -> load: the image tower is bit-identical."""


import numpy as np
import pytest
from flax import nnx
from helpers import load_config

from jclip_jax import JinaCLIP
from jclip_jax.convert import cli, hf_layout
from jclip_jax.data import prepare, synthetic
from jclip_jax.models import configs
from jclip_jax.tokenizer import TextTokenizer
from jclip_jax.training import checkpoints
from jclip_jax.training import loop as train


def finetune_config(arg):
    return load_config("finetune", arg)


def write_user_data(root, n=48, image_size=32):
    """A folder of PNGs and a CSV of (file, caption), as a user would have."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = ["file,caption"]
    for i in range(n):
        objects = [synthetic.OBJECTS[int(rng.integers(len(synthetic.OBJECTS)))]]
        synthetic.render(objects, image_size, rng).save(root / "images" / f"{i}.png")
        rows.append(f'{i}.png,"{synthetic.caption(objects)}"')
    (root / "captions.csv").write_text("\n".join(rows) + "\n")


def test_finetune_three_commands(tmp_path, capsys):
    # a "released" jina-clip directory: the tiny model with a tokenizer
    synthetic.write_tokenizer(tmp_path / "tokenizer.json", synthetic.vocabulary_texts())
    released = JinaCLIP(configs.tiny(), rngs=nnx.Rngs(3), tokenizer=TextTokenizer(str(tmp_path / "tokenizer.json")))
    released.save_pretrained(tmp_path / "jina-clip")
    before = {k: np.asarray(v) for k, v in hf_layout.flax_params(released).items()}
    write_user_data(tmp_path / "mine")

    # 1. prepare
    prepare.run(["image-text", "--format", "folder", "--input", str(tmp_path / "mine" / "captions.csv"),
                 "--image-root", str(tmp_path / "mine" / "images"), "--output", str(tmp_path / "data")])
    assert '"written": 48' in capsys.readouterr().out

    # 2. train (and resume: the optimizer state holds no entries for the frozen tower)
    config = finetune_config(str(tmp_path / "jina-clip"))
    assert config.data.tokenizer_path == str(tmp_path / "jina-clip" / "tokenizer.json")
    with pytest.raises(ValueError, match="needs the model to start from"):
        finetune_config(None)
    config.data.image_text_dir = str(tmp_path / "data")
    config.total_steps, config.checkpoint_every, config.log_every = 2, 2, 1
    config.peak_flops_per_device = 1e12  # skip the CPU matmul measurement (MFU only)
    config.data.image_batch_size = 16
    config.optim.warmup_steps, config.optim.peak_lr = 1, 1e-3
    config.optim.frozen = ("^vision_model/",)
    config.optim.lr_mults = (("^text_model/word_embeddings/", 0.5),)
    config.optim.layer_decay.text = 0.8
    workdir = str(tmp_path / "workdir")
    train.train(config, workdir)
    config.total_steps = 3
    train.train(config, workdir)
    assert checkpoints.latest_step(workdir) == 3

    # 3. export and load
    assert cli.main(["to-torch", "--checkpoint", workdir, "--output", str(tmp_path / "mine-model")]) == 0
    model = JinaCLIP.from_pretrained(tmp_path / "mine-model")
    after = hf_layout.flax_params(model)
    assert before.keys() == after.keys()
    for key in before:
        if key[0] == "vision_model":
            np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(before[key]), err_msg=str(key))
        elif key[0] == "text_model":
            assert np.any(np.asarray(after[key]) != np.asarray(before[key])), key
    assert model.tokenizer is not None
