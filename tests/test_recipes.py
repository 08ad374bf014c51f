"""The recipes in configs/: jina-clip-v1's stages are the paper's Table 2, and a config file's argument
("stage=2,runlocal") is parsed the way big_vision's configs read theirs."""

import pytest
from helpers import load_config

from jclip_jax.training import config as train_config


# The paper's Table 2, copied from the paper (§4): peak lr, image-text batch, text batch, steps, max length.
@pytest.mark.parametrize("stage, lr, image_batch, text_batch, steps, length", [
    (1, 1e-4, 32_768, 32_768, 60_000, 77),
    (2, 5e-6, 8_192, 8_192, 1_500, 512),
    (3, 1e-6, 1_024, 1_024, 7_000, 512),
])
def test_v1_recipe_is_table_2(stage, lr, image_batch, text_batch, steps, length):
    c = load_config("jina_clip_v1", f"stage={stage}")
    checked = train_config.validate(c)
    assert (c.optim.peak_lr, c.data.image_batch_size, c.data.text_batch_size, c.total_steps) == (
        lr, image_batch, text_batch, steps)
    assert c.data.image_max_length == c.data.text_max_length == length
    assert checked.optim.total_steps == steps and checked.optim.peak_lr == lr
    assert checked.tasks == (("text_triplet", "image_text") if stage == 3 else ("text_pair", "image_text"))
    assert c.model.vision.image_size == 224 and c.model.dtype == "bfloat16"
    if stage == 1:
        assert c.init.eva02 and c.init.jina_bert and not c.init.checkpoint
    else:
        assert c.init.checkpoint == f"workdirs/jina_clip_v1_stage{stage - 1}"
    local = load_config("jina_clip_v1", f"stage={stage},runlocal")  # the same recipe, small (tests/test_runlocal.py)
    train_config.validate(local)
    assert (local.total_steps, local.data.image_batch_size, local.data.text_batch_size) == (10, 8, 8)
    assert local.optim.peak_lr == lr and local.loss.stage == stage
    assert local.data.text_max_length == (32 if length == 77 else 64)  # short and long-text stages, scaled down


def test_config_argument_parsing():
    parse = train_config.parse_arg
    assert parse(None, stage=1, runlocal=False).to_dict() == {"stage": 1, "runlocal": False}
    assert parse("stage=3,runlocal", stage=1, runlocal=False).to_dict() == {"stage": 3, "runlocal": True}
    assert parse("runlocal=false", stage=1, runlocal=True).runlocal is False
    with pytest.raises(ValueError, match=r"argument 'size=2': unknown name 'size'; known: \['runlocal', 'stage'\]"):
        parse("size=2", stage=1, runlocal=False)
    with pytest.raises(ValueError, match=r"config argument 'stage=two': 'two' is not of type int"):
        parse("stage=two", stage=1, runlocal=False)
    with pytest.raises(ValueError, match=r"configs/jina_clip_v2.py: stage=0; the recipe has stages \[1, 2, 3\]"):
        load_config("jina_clip_v2", "stage=0")
