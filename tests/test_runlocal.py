"""Every recipe's `runlocal` (configs/: jina-clip-v1 and v2 stages 1-3, fine-tuning) runs on the embedded data
with no other argument, keeps its recipe, says so in its first line, and chains through the stages as on the
pod (v2's image size growing between stages, its position embeddings resampled at each load)."""

import contextlib
import io
import json
import os

import pytest
from helpers import load_config

from jclip_jax.data import synthetic
from jclip_jax.tokenizer import TextTokenizer
from jclip_jax.training import checkpoints, loop
from jclip_jax.training import config as train_config

# name: (config file, argument, the run it starts from (its workdir: config.init.checkpoint))
RUNS = {
    "v1_stage1": ("jina_clip_v1", "stage=1,runlocal", None),
    "v1_stage2": ("jina_clip_v1", "stage=2,runlocal", "v1_stage1"),
    "v1_stage3": ("jina_clip_v1", "stage=3,runlocal", "v1_stage2"),
    "v2_stage1": ("jina_clip_v2", "stage=1,runlocal", None),
    "v2_stage2": ("jina_clip_v2", "stage=2,runlocal", "v2_stage1"),
    "v2_stage3": ("jina_clip_v2", "stage=3,runlocal", "v2_stage2"),
    "finetune": ("finetune", "{parent},runlocal", "v1_stage3"),  # PATH,runlocal: from v1 stage 3's workdir
}
STEPS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each runlocal trained for a few steps in chain order, with what it printed and its pod recipe."""
    root = tmp_path_factory.mktemp("runlocal")
    data = str(root / "synthetic")  # a small copy of the embedded dataset, written once for all runs
    synthetic.write_synthetic(data, num_train=64, num_eval=16, num_text_pairs=32, num_triplets=16, image_size=32)
    out = {}
    for name, (file, arg, parent) in RUNS.items():
        parent_dir = out[parent]["workdir"] if parent else None
        config = load_config(file, arg.format(parent=parent_dir))
        recipe = load_config(file, arg.format(parent=parent_dir).replace(",runlocal", ""))
        config.data.synthetic_dir = data
        config.total_steps = config.checkpoint_every = STEPS
        if parent and file != "finetune":  # chained as on the pod; finetune's PATH is its init already
            config.init.checkpoint = parent_dir
        workdir = str(root / name)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            results = loop.train(config, workdir)
        out[name] = dict(config=config, recipe=recipe, workdir=workdir, results=results, printed=printed.getvalue())
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_runlocal_trains_on_the_embedded_data_and_says_so_first(runs, name):
    run = runs[name]
    file, _, parent = RUNS[name]
    first = run["printed"].splitlines()[0]
    assert first.startswith(f"runlocal: a local smoke run of configs/{file}.py:"), first
    assert run["results"]["step"] == STEPS and run["results"]["skipped_updates"] == 0
    assert checkpoints.latest_step(run["workdir"]) == STEPS
    with open(os.path.join(run["workdir"], "eval.json")) as f:  # the final evaluation on the synthetic eval splits
        assert json.load(f)["chance_r1"] == pytest.approx(1 / 16)
    if parent:  # started from the previous stage's last step
        assert f"jclip-train: step {STEPS} of {runs[parent]['workdir']};" in run["printed"]


@pytest.mark.parametrize("name", list(RUNS))
def test_runlocal_keeps_its_recipe(runs, name):
    local, recipe = runs[name]["config"], runs[name]["recipe"].copy_and_resolve_references()
    recipe.data.image_text_dir = recipe.data.image_text_dir or "data/mine"  # fine-tuning: the user's data
    checked, pod = train_config.validate(local), train_config.validate(recipe)
    assert checked.tasks == pod.tasks  # the losses and task mix
    ours, theirs = train_config.flat_dict(local.to_dict()), train_config.flat_dict(recipe.to_dict())
    for key in ("loss.stage", "loss.implementation", "loss.precision", "loss.text_temperature", "text_lora",
                "optim.peak_lr", "optim.b1", "optim.b2", "optim.weight_decay", "optim.end_lr_ratio", "mesh",
                "micro_batches", "model.dtype", "model.remat", "model.scan_layers", "model.attention",
                "model.text.model_type"):
        assert ours.get(key) == theirs.get(key), key
    assert bool(local.loss.matryoshka_dims) == bool(recipe.loss.matryoshka_dims)
    assert tuple(local.loss.matryoshka_dims) == tuple(local.model.get("matryoshka_dimensions", ()))[:len(
        local.loss.matryoshka_dims)]
    tokenizer = TextTokenizer(checked.config.data.tokenizer_path)
    assert tokenizer.pad_id == local.model.text.pad_token_id  # v2: the XLM-R-style tokenizer (pad 1)


def test_v2_image_size_grows_between_stages_and_positions_are_resampled(runs):
    sizes = [runs[f"v2_stage{s}"]["config"].model.vision.image_size for s in (1, 2, 3)]
    pod = [runs[f"v2_stage{s}"]["recipe"].model.vision.image_size for s in (1, 2, 3)]
    assert sizes == [32, 48, 64] and pod == [224, 384, 512]
    assert "resampling vision_model/pos_embed (1, 17, 64) -> (1, 37, 64)" in runs["v2_stage2"]["printed"]
    assert "resampling vision_model/pos_embed (1, 37, 64) -> (1, 65, 64)" in runs["v2_stage3"]["printed"]
