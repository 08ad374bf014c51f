"""jclip-convert end to end: timm EVA02 + Jina-BERT tower files -> a jina-clip directory -> from_pretrained."""

import json

import numpy as np
import torch
from flax import nnx
from helpers import write_wordpiece_tokenizer
from safetensors.numpy import load_file, save_file
from torch_compat import import_timm

from jclip_jax import JinaCLIP
from jclip_jax.convert import cli, hf_layout
from jclip_jax.models import configs


def test_from_towers_then_load(tmp_path, capsys):
    timm = import_timm()
    torch.manual_seed(0)
    eva = timm.create_model("eva02_base_patch16_clip_224", pretrained=False, num_classes=0, img_size=32,
                            patch_size=8, embed_dim=64, depth=2, num_heads=4, ref_feat_shape=(4, 4))
    torch.save(eva.state_dict(), tmp_path / "eva.pth")  # a torch pickle, read through torch
    donor = JinaCLIP(configs.tiny(), rngs=nnx.Rngs(3))
    donor.save_pretrained(tmp_path / "donor")
    sd = load_file(tmp_path / "donor" / "model.safetensors")
    prefix = "text_model.transformer."
    save_file({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, tmp_path / "bert.safetensors")
    tok = write_wordpiece_tokenizer(str(tmp_path / "tokenizer.json"))

    rc = cli.main(["from-towers", "--model", "tiny", "--eva02", str(tmp_path / "eva.pth"),
                   "--jina-bert", str(tmp_path / "bert.safetensors"), "--tokenizer", tok,
                   "--output", str(tmp_path / "out")])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["random_init"] == []

    model = JinaCLIP.from_pretrained(tmp_path / "out")
    assert model.tokenizer is not None
    ours, theirs = hf_layout.flax_params(model), hf_layout.flax_params(donor)
    for k in ours:
        if k[0] == "text_model":
            np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(theirs[k]))
    np.testing.assert_array_equal(np.asarray(model.vision_model.pos_embed[...]), eva.pos_embed.detach().numpy())
    assert cli.main(["check", str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["embed_dim"] == 64 and summary["image_size"] == 32


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    rc = cli.main(["check", str(tmp_path / "nowhere")])
    assert rc == 1
    assert "no config.json in" in capsys.readouterr().err
