"""Every bad config fails in one line naming the key and value, before the model is built or data is read;
short runs work; bad weight directories (config.json types, truncated safetensors, NaN / int64 tensors)
are named by `from_pretrained` and `jclip-convert check`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from helpers import load_config
from safetensors.numpy import load_file, save_file

from jclip_jax import JinaCLIP
from jclip_jax.convert import cli
from jclip_jax.data import records
from jclip_jax.models import configs
from jclip_jax.training import config as train_config
from jclip_jax.training import loop as train
from jclip_jax.training import optim
from jclip_jax.training.setup import TrainSetup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")
V1 = os.path.join(REPO, "configs", "jina_clip_v1.py")


@pytest.fixture(scope="module")
def synthetic_dir(small_synthetic_dir):
    return small_synthetic_dir


def demo_config(synthetic_dir):
    config = load_config("demo")
    config.data.synthetic_dir = synthetic_dir
    return config


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if training gets as far as building the model or reading a batch."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was built / data was read before the config error")

    monkeypatch.setattr(TrainSetup, "init_state", forbidden)
    monkeypatch.setattr(train.pipeline, "train_iterator", forbidden)


def test_unknown_key_and_bad_override_are_one_line(tmp_path):
    base = [sys.executable, "-m", "jclip_jax.training.cli", f"--workdir={tmp_path}"]
    for args, wanted in ((["--config.foo=1"], "config override --config.foo=1: no such field"),  # default config
                         ([f"--config={DEMO}", "--config.data.fooo=2"], "--config.data.fooo=2: no such field"),
                         ([f"--config={DEMO}", "--config.total_steps=abc"], "--config.total_steps=abc"),
                         ([f"--config={V1}:stage=4"], "configs/jina_clip_v1.py: stage=4; the recipe has stages"),
                         ([f"--config={V1}:stage=2,fast"], "config argument 'fast': unknown name 'fast'")):
        out = subprocess.run(base + args, capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 2, out.stderr[-2000:]
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and wanted in lines[0], out.stderr[-2000:]


def test_a_bad_config_on_a_cpu_host_is_one_stderr_line_with_libtpu_installed(synthetic_dir, tmp_path):
    """No JAX_PLATFORMS, libtpu installed (the test extra), no TPU: the error is the only stderr line; without
    distributed.cpu_only_unless_accelerated libtpu's TPU probe printed 6 lines before it."""
    import importlib.util

    assert importlib.util.find_spec("libtpu") is not None, "the test extra installs libtpu"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-m", "jclip_jax.training.cli", f"--config={DEMO}",
                          f"--workdir={tmp_path}", f"--config.data.synthetic_dir={synthetic_dir}",
                          "--config.loss.stage=3", f"--config.data.text_dir={synthetic_dir}/text_pairs"],
                         capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [out.stderr.strip()] and "holds 'text_pair' records" in out.stderr, out.stderr
    # jclip-compile: the config is validated before libtpu is loaded for the topology
    out = subprocess.run([sys.executable, "-m", "jclip_jax.compile.cli", f"--config={DEMO}", "--topology=v5e:2x2",
                          "--config.total_steps=-5"], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 2 and out.stderr.splitlines() == [out.stderr.strip()], out.stderr
    assert "config.total_steps=-5 must be a positive integer" in out.stderr


def test_stage3_on_a_text_pairs_directory(synthetic_dir, tmp_path, no_compute):
    config = demo_config(synthetic_dir)
    config.loss.stage = 3
    config.data.text_dir = os.path.join(synthetic_dir, "text_pairs")
    with pytest.raises(ValueError, match=r"config.data.text_dir='.*text_pairs' holds 'text_pair' records; this run "
                                         r"needs 'triplet' records there \(config.loss.stage=3\)"):
        train.train(config, str(tmp_path))


def test_batch_not_divisible_by_the_batch_devices(synthetic_dir, tmp_path, no_compute):
    config = demo_config(synthetic_dir)
    config.data.image_batch_size = 12  # the demo mesh splits the batch over 8 devices
    with pytest.raises(ValueError, match=r"config.data.image_batch_size=12 is not divisible by 8: the batch is split "
                                         r"over the mesh axes data=8 and config.micro_batches=1"):
        train.train(config, str(tmp_path))
    config.data.image_batch_size, config.data.text_batch_size, config.micro_batches = 16, 24, 2
    with pytest.raises(ValueError, match=r"config.data.text_batch_size=24 is not divisible by 16"):
        train.train(config, str(tmp_path))


def test_prepared_dataset_with_no_records(synthetic_dir, tmp_path, no_compute):
    with records.RecordWriter(tmp_path / "empty", "image_text"):
        pass
    config = demo_config(synthetic_dir)
    config.data.image_text_dir = str(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"config.data.image_text_dir='.*empty' holds no records"):
        train.train(config, str(tmp_path / "work"))


def test_unweighted_text_dataset_and_a_mixture_of_the_wrong_kind_fail_before_compute(synthetic_dir, tmp_path,
                                                                                    no_compute):
    config = demo_config(synthetic_dir)
    config.data.text_weights = {"paraphrase": 1.0}  # 'attributes' would silently never be sampled
    with pytest.raises(ValueError, match=r"config.data.text_weights gives no weight to \['attributes'\] of "):
        train.train(config, str(tmp_path / "work"))
    config = demo_config(synthetic_dir)
    config.data.image_text = ((os.path.join(synthetic_dir, "train"), 0.5),
                              (os.path.join(synthetic_dir, "text_pairs"), 0.5))  # text pairs in an image mixture
    with pytest.raises(ValueError, match=r"config.data.image_text\[1\]='.*text_pairs' holds 'text_pair' records; "
                                         r"this run needs 'image_text' records there"):
        train.train(config, str(tmp_path / "work"))


def test_short_runs_clip_the_warmup(synthetic_dir):
    for steps in (1, 7, 40, 51):
        config = train_config.with_synthetic_paths(demo_config(synthetic_dir))
        config.total_steps = steps
        train_config.validate(config)  # the demo's warmup (50) no longer rejects short runs
        run = train_config.optim_for_run(config)
        assert run.total_steps == steps and run.warmup_steps == (steps // 10 if steps <= 50 else 50)
        note = train_config.warmup_note(config)
        assert (note is None) == (steps > 50)
        schedule = optim.learning_rate_schedule(run)
        lrs = [float(schedule(s)) for s in range(steps)]
        assert all(np.isfinite(lrs)) and max(lrs) <= config.optim.peak_lr * (1 + 1e-6)
        if steps == 40:
            assert note == ("config.optim.warmup_steps=50 is not below config.total_steps=40: warming up for 4 "
                            "steps instead")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "model"
    JinaCLIP(configs.tiny(), rngs=nnx.Rngs(0)).save_pretrained(path)
    return path


def copy_hf(hf_dir, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    for name in os.listdir(hf_dir):
        (out / name).write_bytes((hf_dir / name).read_bytes())
    return out


def test_config_json_with_a_wrong_type(hf_dir, tmp_path):
    path = copy_hf(hf_dir, tmp_path)
    hf = json.loads((path / "config.json").read_text())
    hf["vision_config"]["width"] = "64"
    (path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"config.json: vision_config.width='64' must be a JSON int"):
        JinaCLIP.from_pretrained(path)
    hf["vision_config"]["width"] = 64
    hf["text_config"]["hf_model_config_kwargs"]["layer_norm_eps"] = None
    (path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"hf_model_config_kwargs.layer_norm_eps=None must be a JSON float"):
        JinaCLIP.from_pretrained(path)


def test_truncated_safetensors_names_the_file(hf_dir, tmp_path):
    path = copy_hf(hf_dir, tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{weights}: not a readable safetensors file"):
        JinaCLIP.from_pretrained(path)
    with pytest.raises(ValueError, match=r"takes a directory .* not the file"):
        JinaCLIP.from_pretrained(weights)


def test_convert_check_reports_nan_and_integer_tensors(hf_dir, tmp_path, capsys):
    assert cli.main(["check", str(hf_dir)]) == 0
    path = copy_hf(hf_dir, tmp_path)
    sd = load_file(path / "model.safetensors")
    nan_key, int_key = "logit_scale", sorted(k for k in sd if k.endswith("weight"))[0]
    sd[nan_key] = np.full(sd[nan_key].shape, np.nan, np.float32)
    sd[int_key] = np.ones(sd[int_key].shape, np.int64)
    save_file(sd, path / "model.safetensors")
    capsys.readouterr()
    assert cli.main(["check", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "2 bad tensor(s)" in err
    assert f"{nan_key} holds 1 NaN/Inf of 1 values" in err and f"{int_key} is int64 where the model has a float" in err
