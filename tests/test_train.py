"""jclip-train end to end on the tiny model and a small synthetic dataset, on the 8-device CPU mesh:
exact resume after SIGKILL, SIGTERM saves and exits, stage chaining, export, early config errors."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import load_config

from jclip_jax import JinaCLIP
from jclip_jax.convert import cli, hf_layout
from jclip_jax.data import synthetic
from jclip_jax.evals import cli as eval_cli
from jclip_jax.training import checkpoints, initial_weights, setup
from jclip_jax.training import loop as train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.write_synthetic(root, num_train=256, num_eval=64, num_text_pairs=256, num_triplets=64, image_size=32)
    return str(root)


def small_overrides(synthetic_dir, steps=8, every=4):
    return [f"--config.data.synthetic_dir={synthetic_dir}", f"--config.total_steps={steps}",
            f"--config.checkpoint_every={every}", "--config.log_every=2", "--config.eval_every=0",
            "--config.data.image_batch_size=16", "--config.data.text_batch_size=16",
            "--config.optim.warmup_steps=2", "--config.evals.batch_size=32"]


def run_trainer(workdir, overrides, wait=True):
    cmd = [sys.executable, "-m", "jclip_jax.training.cli", f"--config={DEMO}", f"--workdir={workdir}", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        return out
    return proc


def final_params(workdir, step):
    abstract = nnx.eval_shape(lambda: JinaCLIP(checkpoints.restore_config(workdir).model, rngs=nnx.Rngs(0)))
    params, got = checkpoints.restore_params(workdir, nnx.state(abstract, nnx.Param), step=step)
    assert got == step
    return {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def wait_for_checkpoint(workdir, step, proc, timeout=300):
    path = os.path.join(workdir, "checkpoints", str(step))
    start = time.time()
    while not os.path.isdir(path):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - start < timeout
        time.sleep(0.05)


def test_sigkill_then_restart_is_bit_identical(tmp_path, synthetic_dir):
    overrides = small_overrides(synthetic_dir, steps=12, every=4)
    run_trainer(tmp_path / "straight", overrides)

    proc = run_trainer(tmp_path / "killed", overrides, wait=False)
    wait_for_checkpoint(tmp_path / "killed", 4, proc)
    proc.send_signal(signal.SIGKILL)  # at any moment: here, somewhere after the step-4 checkpoint
    proc.wait()
    out = run_trainer(tmp_path / "killed", overrides)
    assert "checkpoint at step" in out

    a, b = final_params(tmp_path / "straight", 12), final_params(tmp_path / "killed", 12)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    assert (tmp_path / "killed" / "eval.json").exists()


def test_sigterm_saves_and_exits_cleanly(tmp_path, synthetic_dir):
    proc = run_trainer(tmp_path, small_overrides(synthetic_dir, steps=10_000, every=10_000), wait=False)
    deadline = time.time() + 300
    out = ""
    while "step 2:" not in out:  # the first logged step: compiled and training
        line = proc.stdout.readline()
        assert line or proc.poll() is None, out[-3000:]
        out += line
        assert time.time() < deadline
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, rest[-3000:]
    assert "preempted; checkpoint saved at step" in rest
    assert checkpoints.latest_step(str(tmp_path)) >= 2


def test_stage_chaining_and_export(tmp_path, synthetic_dir):
    demo = load_config("demo")
    demo.data.synthetic_dir = synthetic_dir
    demo.total_steps, demo.checkpoint_every, demo.log_every, demo.eval_every = 4, 4, 2, 0
    demo.data.image_batch_size = demo.data.text_batch_size = 16
    demo.optim.warmup_steps = 1
    demo.evals.tasks.again = dict(type="image_text", data=os.path.join(synthetic_dir, "eval"))  # config.evals.tasks
    results = train.train(demo, str(tmp_path / "stage1"))
    assert results["chance_r1"] == pytest.approx(1 / 64)  # the retrieval figures: jclip-eval's, below
    assert results["again/text_to_image_r1"] == results["text_to_image_r1"]
    # jclip-eval on the workdir reproduces the trainer's final retrieval numbers
    report = eval_cli.run(["--checkpoint", str(tmp_path / "stage1"), "--task", "image_text", "--no-progress",
                           "--data", os.path.join(synthetic_dir, "eval")])["results"]["full"]
    for k in ("image_to_text_r1", "text_to_image_r1", "image_to_text_r10", "text_to_image_r10"):
        assert report[k] == results[k], k

    stage2 = demo.copy_and_resolve_references()
    stage2.loss.stage = 2
    stage2.total_steps = 3
    stage2.init.checkpoint = str(tmp_path / "stage1")
    stage1_params, _ = checkpoints.restore_params(
        str(tmp_path / "stage1"), nnx.state(nnx.eval_shape(lambda: JinaCLIP(demo.model, rngs=nnx.Rngs(0))),
                                            nnx.Param))
    abstract = nnx.state(nnx.eval_shape(lambda: JinaCLIP(stage2.model, rngs=nnx.Rngs(0))), nnx.Param)
    start_params, origin = initial_weights.initial_params(stage2, abstract)
    assert "step 4" in origin
    for a, b in zip(jax.tree.leaves(start_params), jax.tree.leaves(stage1_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = stage2.copy_and_resolve_references()  # another text tower: fails in one line, before any read
    other.model.text.num_hidden_layers = 3
    with pytest.raises(ValueError, match=r"config.init.checkpoint='.*stage1' holds another model: parameter "
                       r"text_model/.* is \(2, .* there, \(3, .* in config.model \(model.text.num_hidden_layers 2 "
                       r"there, 3 here\)$"):
        initial_weights.initial_params(other, nnx.state(nnx.eval_shape(lambda: JinaCLIP(other.model, rngs=nnx.Rngs(0))),
                                              nnx.Param))
    train.train(stage2, str(tmp_path / "stage2"))
    assert checkpoints.latest_step(str(tmp_path / "stage2")) == 3  # its own step counter
    mngr = checkpoints.manager(str(tmp_path / "stage2"))
    run = setup.setup(stage2)
    restored = checkpoints.restore(mngr, 3, run.abstract_state, run.shardings, None)
    counts = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(restored["opt_state"])
              if "count" in jax.tree_util.keystr(p)]
    assert counts and all(int(c) == 3 for c in counts)  # a fresh optimizer: 3 updates, not 4 + 3

    # export the stage-2 checkpoint to the HF layout and load it back
    assert cli.main(["to-torch", "--checkpoint", str(tmp_path / "stage2"), "--output", str(tmp_path / "hf")]) == 0
    model = JinaCLIP.from_pretrained(tmp_path / "hf")
    exported = hf_layout.flax_params(model)
    for path, value in nnx.to_flat_state(restored["params"]):
        np.testing.assert_array_equal(np.asarray(exported[tuple(str(p) for p in path)]), np.asarray(value[...]))
    emb = model.encode_text(["a small red circle in the top left"])
    assert emb.shape == (1, 64)


def test_bad_config_fails_before_compute(tmp_path):
    cmd = [sys.executable, "-m", "jclip_jax.training.cli", f"--config={DEMO}", f"--workdir={tmp_path}"]
    out = subprocess.run(cmd + ["--config.no_such_key=1"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0 and "no_such_key" in out.stderr
    out = subprocess.run(cmd + ["--config.total_steps=-5"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "config.total_steps=-5" in out.stderr
    out = subprocess.run(cmd + ["--config.data.crop_scale=(0.5,2.0)"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "crop_scale" in out.stderr
    stage1 = os.path.join(REPO, "configs", "jina_clip_v1.py") + ":stage=1"  # the pod recipe, on a laptop
    out = subprocess.run([*cmd[:3], f"--config={stage1}", f"--workdir={tmp_path}"],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 2 and "these paths do not exist" in out.stderr
    assert "config.data.image_text_dir='data/laion400m'" in out.stderr and "config.init.eva02=" in out.stderr
    assert not os.path.exists(tmp_path / "checkpoints")
