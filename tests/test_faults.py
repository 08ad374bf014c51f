"""Fault tests of jclip-train: a corrupt or truncated latest checkpoint falls back to the newest good one,
a non-finite step never reaches a checkpoint, a changed config is refused or reported on resume, a second
run on a workdir is refused, an all-undecodable dataset stops (also under SIGTERM) instead of spinning, and
a failed save stops the run. One small training run (module fixture) provides the checkpoints; the other
cases restore from copies of it or call the loop's pieces directly."""

import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import load_config

from jclip_jax import distributed, sharding
from jclip_jax.data import records, synthetic
from jclip_jax.models import configs
from jclip_jax.models.clip import JinaCLIP
from jclip_jax.training import checkpoints, optim, workdir_lock
from jclip_jax.training import config as train_config
from jclip_jax.training import loop as train
from jclip_jax.training import step as train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config(synthetic_dir, **overrides):
    config = load_config("demo")
    config.data.synthetic_dir = synthetic_dir
    config.total_steps, config.checkpoint_every, config.log_every, config.eval_every = 4, 2, 2, 0
    config.data.image_batch_size = config.data.text_batch_size = 16
    config.optim.warmup_steps = 1
    config.peak_flops_per_device = 1e12  # no matmul measurement
    config.evals.batch_size = 32
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    return config


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.write_synthetic(root, num_train=128, num_eval=32, num_text_pairs=128, num_triplets=32, image_size=32)
    return str(root)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_dir):
    """A workdir with checkpoints at steps 2 and 4 (the tiny model, 4 steps)."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    train.train(demo_config(synthetic_dir), workdir)
    assert sorted(checkpoints.manager(workdir).all_steps()) == [2, 4]
    return workdir


@pytest.fixture(scope="module")
def restore_target(synthetic_dir):
    config = demo_config(synthetic_dir)
    tx = optim.make_optimizer(train_config.optim_for_run(config))
    mesh = sharding.make_mesh(config.mesh)
    _, state, shardings = train_step.create_train_state(lambda: JinaCLIP(config.model, rngs=nnx.Rngs(0)), tx, mesh)
    return jax.eval_shape(lambda: state), shardings


def copy_workdir(src, tmp_path):
    dst = str(tmp_path / "workdir")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("locks"))
    return dst


def largest_params_file(workdir, step):
    root = os.path.join(workdir, "checkpoints", str(step), "params")
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    return max(files, key=os.path.getsize)


def flip_bytes(path, count=64):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        data = bytearray(f.read(count))
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in data))


def truncate_half(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", [flip_bytes, truncate_half], ids=["corrupt", "truncated"])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_good_one(trained, restore_target, tmp_path, damage):
    workdir = copy_workdir(trained, tmp_path)
    damage(largest_params_file(workdir, 4))
    abstract, shardings = restore_target
    mngr = checkpoints.manager(workdir)
    lines = []
    state, step = checkpoints.restore_latest_good(mngr, abstract, shardings, None, report=lines.append)
    assert step == 2 and int(state["step"]) == 2
    assert len(lines) == 2 and all("\n" not in line and len(line) < 500 for line in lines), lines
    assert "checkpoint step 4" in lines[0] and "falling back to checkpoint step 2" in lines[1]
    # the bad step is moved aside, not deleted, and no longer counts for keep-N rotation
    assert mngr.all_steps() == [2]
    moved = os.listdir(os.path.join(workdir, "checkpoints.corrupt"))
    assert len(moved) == 1 and moved[0].startswith("4-")
    # the fallback state is the one saved at step 2, bit for bit
    good, _ = checkpoints.restore_params(trained, abstract["params"], step=2)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(good), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_every_checkpoint_damaged_refuses_to_start_over(trained, restore_target, tmp_path):
    workdir = copy_workdir(trained, tmp_path)
    for step in (2, 4):
        flip_bytes(largest_params_file(workdir, step))
    abstract, shardings = restore_target
    mngr = checkpoints.manager(workdir)
    with pytest.raises(checkpoints.CheckpointCorrupt, match=r"no checkpoint .* can be restored \(steps \[4, 2\]"):
        checkpoints.restore_latest_good(mngr, abstract, shardings, None, report=lambda line: None)
    assert sorted(mngr.all_steps()) == [2, 4]  # nothing moved


class FlakyStorage:
    """Makes the next `failures` checkpoint reads fail as a storage timeout would (TensorStore's status text),
    then read for real: a transient error that no real checkpoint damage produces."""

    def __init__(self, monkeypatch, failures: int):
        self.failures, self.calls = failures, 0
        real = ocp.CheckpointManager.restore

        def restore(mngr, *args, **kwargs):  # a plain function: bound to each manager like the real one
            self.calls += 1
            if self.calls <= self.failures:
                raise ValueError('DEADLINE_EXCEEDED: Error reading "params/manifest.ocdbt": timed out')
            return real(mngr, *args, **kwargs)

        monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
        monkeypatch.setattr(checkpoints, "READ_RETRY_SECONDS", (0.0, 0.0, 0.0))  # the backoff, without its waits


@pytest.mark.parametrize("failures", [2, 4])
def test_a_read_error_is_retried_and_never_moves_a_checkpoint(trained, restore_target, tmp_path, monkeypatch,
                                                             failures):
    """Could not read is not corrupt: 2 failed reads then a good one restore step 4; 4 failed reads (one more
    than the retries) stop with one line naming the step; nothing is moved either way."""
    workdir = copy_workdir(trained, tmp_path)
    abstract, shardings = restore_target
    mngr = checkpoints.manager(workdir)
    flaky, lines = FlakyStorage(monkeypatch, failures), []
    if failures < 1 + len(checkpoints.READ_RETRY_SECONDS):
        state, step = checkpoints.restore_latest_good(mngr, abstract, shardings, None, report=lines.append)
        assert step == 4 and int(state["step"]) == 4 and flaky.calls == failures + 1
    else:
        with pytest.raises(checkpoints.CheckpointUnreadable, match=r"^checkpoint step 4 in .* could not be read "
                           r"\(4 attempts: ValueError: DEADLINE_EXCEEDED.*nothing was moved") as e:
            checkpoints.restore_latest_good(mngr, abstract, shardings, None, report=lines.append)
        assert "\n" not in str(e.value)
    assert lines == [] and sorted(mngr.all_steps()) == [2, 4]
    assert not os.path.exists(os.path.join(workdir, "checkpoints.corrupt"))


def test_a_checkpoint_without_its_digest_is_refused_unless_accepted(trained, restore_target, tmp_path,
                                                                    monkeypatch):
    workdir = copy_workdir(trained, tmp_path)
    flip_bytes(largest_params_file(workdir, 4))  # damaged, and its digest deleted: would restore wrong values
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4", "digest"))
    abstract, shardings = restore_target
    mngr = checkpoints.manager(workdir)
    with pytest.raises(checkpoints.CheckpointUnverified, match=r"checkpoint step 4 in .* has no digest .*"
                       r"JCLIP_ACCEPT_UNVERIFIED_CHECKPOINTS=1"):
        checkpoints.restore_latest_good(mngr, abstract, shardings, None, report=lambda line: None)
    with pytest.raises(checkpoints.CheckpointUnverified):
        checkpoints.restore_params(workdir, abstract["params"], step=4)  # stage chaining, export, eval
    assert sorted(mngr.all_steps()) == [2, 4]
    # an intact checkpoint whose digest is missing (as written before digests) restores once accepted explicitly
    intact = copy_workdir(trained, tmp_path / "intact")
    shutil.rmtree(os.path.join(intact, "checkpoints", "4", "digest"))
    monkeypatch.setenv(checkpoints.ACCEPT_UNVERIFIED_ENV, "1")
    state, step = checkpoints.restore_latest_good(checkpoints.manager(intact), abstract, shardings, None,
                                                  report=lambda line: None)
    good, _ = checkpoints.restore_params(trained, abstract["params"], step=4)
    assert step == 4
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(good), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_unreadable_saved_config_refuses_the_resume(trained, synthetic_dir, tmp_path):
    workdir = copy_workdir(trained, tmp_path)
    with open(os.path.join(workdir, "checkpoints", "4", "config", "metadata"), "w") as f:
        f.write('{"model": {"dtype": "float32", ')  # cut short
    with pytest.raises(ValueError, match=r"^the config saved with checkpoint step 4 in .* cannot be read: .*"
                                         r"the resume cannot be checked against it, so it is refused"):
        train.train(demo_config(synthetic_dir), workdir)
    assert sorted(checkpoints.manager(workdir).all_steps()) == [2, 4]


def test_digest_is_the_bits_hash_not_the_sharding():
    """The digest of the same values laid out on different meshes agrees; one flipped bit changes it."""
    x = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    flipped = x.copy()
    flipped.view(np.uint32)[3, 5] ^= 1  # the lowest mantissa bit of one element
    mesh = sharding.make_mesh([("data", -1)])
    on_mesh = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    assert checkpoints.tree_digest({"x": x}) == checkpoints.tree_digest({"x": on_mesh})
    assert checkpoints.tree_digest({"x": x}) != checkpoints.tree_digest({"x": flipped})
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # same values, other positions
    assert checkpoints.tree_digest({"x": x}) != checkpoints.tree_digest({"x": swapped})
    with pytest.raises(checkpoints.CheckpointCorrupt, match=r"\['x'\] holds NaN"):
        checkpoints.verify({"x": np.float32([1.0, np.nan])}, None, "test")


def poison_batch(monkeypatch, which):
    """Make the `which`-th global batch of the next run's images NaN (a fault no real data produces)."""
    make_global_batch, calls = train.pipeline.make_global_batch, []

    def poisoned(batch, mesh, axes):
        calls.append(1)
        if len(calls) == which:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return make_global_batch(batch, mesh, axes)

    monkeypatch.setattr(train.pipeline, "make_global_batch", poisoned)


def saved_params(workdir, synthetic_dir, step):
    abstract = nnx.state(nnx.eval_shape(lambda: JinaCLIP(demo_config(synthetic_dir).model, rngs=nnx.Rngs(0))),
                         nnx.Param)
    params, _ = checkpoints.restore_params(workdir, abstract, step=step)  # verified against its digest
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_resume_after_corruption_and_a_nan_step_stops_before_saving(
        trained, synthetic_dir, tmp_path, monkeypatch, capsys):
    """End to end: the run falls back from a corrupt step 4 to step 2, reports the allowed config change,
    trains and saves step 3; a NaN batch at step 4 stops the run before step 4 is saved."""
    workdir = copy_workdir(trained, tmp_path)
    flip_bytes(largest_params_file(workdir, 4))
    poison_batch(monkeypatch, 2)  # the second batch after resuming at step 2: step 4
    with pytest.raises(train.StopTraining, match=r"non-finite loss or gradient norm at 1 step\(s\) up to step 4.*"
                                                 r"stopped before saving.*newest checkpoint is step 3"):
        train.train(demo_config(synthetic_dir, checkpoint_every=1, log_every=1), workdir)
    out = capsys.readouterr().out
    assert "falling back to checkpoint step 2" in out and "checkpoint at step 2" in out
    assert "resuming with config.checkpoint_every: 2 -> 1" in out
    assert sorted(checkpoints.manager(workdir).all_steps()) == [2, 3]  # step 4 never saved
    assert all(np.isfinite(x).all() for x in saved_params(workdir, synthetic_dir, 3))


def test_nan_step_is_skipped_and_counted_with_nonfinite_skip(synthetic_dir, tmp_path, monkeypatch):
    """config.nonfinite='skip': the NaN step 3 leaves the params as they were after step 2, the run goes on,
    and the final results count it."""
    poison_batch(monkeypatch, 3)
    results = train.train(demo_config(synthetic_dir, checkpoint_every=1, nonfinite="skip"), str(tmp_path))
    assert results["skipped_updates"] == 1 and results["step"] == 4
    p2, p3, p4 = (saved_params(str(tmp_path), synthetic_dir, step) for step in (2, 3, 4))
    for a, b in zip(p2, p3, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(p3, p4, strict=True))
    assert all(np.isfinite(x).all() for x in p4)
    # the count lives in the checkpoint: a resumed run goes on counting instead of restarting at 0
    assert checkpoints.restore_counters(checkpoints.manager(str(tmp_path)), 4) == {
        "skipped_records": 0, "mixture_counts": None, "skipped_updates": 1}
    resumed = train.train(demo_config(synthetic_dir, checkpoint_every=1, nonfinite="skip", total_steps=6),
                          str(tmp_path))
    assert resumed["step"] == 6 and resumed["skipped_updates"] == 1 and resumed["skipped_records"] == 0


def test_changed_config_on_resume(trained, synthetic_dir, tmp_path):
    workdir = copy_workdir(trained, tmp_path)
    changed = demo_config(synthetic_dir, **{"data.image_batch_size": 8, "model.vision.width": 32})
    with pytest.raises(ValueError) as e:
        train.train(changed, workdir)
    message = str(e.value)
    assert "\n" not in message
    assert "config.data.image_batch_size 16 -> 8" in message and "config.model.vision.width 64 -> 32" in message
    saved = checkpoints.saved_config(checkpoints.manager(workdir))
    current = train_config.with_synthetic_paths(
        demo_config(synthetic_dir, total_steps=10, log_every=1, **{"model.remat": True}))
    current.data.tokenizer_sha256 = train_config.tokenizer_sha256(current.data.tokenizer_path)  # as setup does
    allowed = train_config.resume_changes(saved, current)
    assert [line.split(":")[0] for line in allowed] == ["config.log_every", "config.model.remat",
                                                         "config.total_steps"]
    # the tokenizer is compared by content: the same file elsewhere is allowed, other content is refused
    same = str(tmp_path / "same_tokenizer.json")
    shutil.copy(current.data.tokenizer_path, same)
    other = str(tmp_path / "other_tokenizer.json")
    synthetic.write_tokenizer(other, synthetic.vocabulary_texts(), vocab_size=200)
    for path, refused in ((same, False), (other, True)):
        changed = demo_config(synthetic_dir, **{"data.tokenizer_path": path})
        if refused:
            with pytest.raises(ValueError, match=r"incompatible changes: config.data.tokenizer_sha256 '[0-9a-f]{64}' "
                                                 r"-> '[0-9a-f]{64}'"):
                train.train(changed, copy_workdir(trained, tmp_path / "other"))
        else:
            assert train.train(changed, copy_workdir(trained, tmp_path / "same"))["step"] == 4
    # the image-text mixture (other directories or weights) moves the data position: refused like a directory
    mixture = train_config.with_synthetic_paths(demo_config(synthetic_dir))
    mixture.data.image_text = ((os.path.join(synthetic_dir, "train"), 1.0),)
    with pytest.raises(ValueError, match=r"incompatible changes: config.data.image_text \[\] -> \[\["):
        train_config.resume_changes(saved, mixture)


HOLD_LOCK = """
import sys, time
from jclip_jax.training import workdir_lock

with workdir_lock.hold(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_run_on_a_workdir_is_refused(synthetic_dir, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir_lock.WorkdirInUse, match=rf"'{tmp_path}' is in use by another jclip-train "
                                                            rf"\(.*\"pid\": {holder.pid}"):
            train.train(demo_config(synthetic_dir), str(tmp_path))
        assert not os.path.exists(tmp_path / "checkpoints")
    finally:
        holder.kill()
        holder.wait()
    with workdir_lock.hold(str(tmp_path)):  # released when its holder dies
        with pytest.raises(workdir_lock.WorkdirInUse):
            with workdir_lock.hold(str(tmp_path)):
                pass


def write_undecodable(root, tokenizer_src, count=64):
    with records.RecordWriter(root / "train", "image_text") as writer:
        for i in range(count):
            writer.write({"key": str(i), "image": b"\x89PNG not an image %d" % i, "captions": ["a red circle"]})
    shutil.copy(tokenizer_src, root / "tokenizer.json")
    return root


def test_all_undecodable_data_stops_with_counts_instead_of_spinning(synthetic_dir, tmp_path):
    data = write_undecodable(tmp_path / "bad", os.path.join(synthetic_dir, "tokenizer.json"))
    config = demo_config(synthetic_dir, **{"data.image_text_dir": str(data / "train"),
                                           "data.tokenizer_path": str(data / "tokenizer.json")})
    finished = []
    timer = threading.Timer(120, lambda: finished or os.kill(os.getpid(), signal.SIGINT))  # a hang fails
    timer.start()
    try:
        with pytest.raises(ValueError) as e:
            train.train(config, str(tmp_path / "work"))
    finally:
        finished.append(1)
        timer.cancel()
    assert str(e.value).startswith(f"image_text data '{data / 'train'}': the last 1000 records all failed to "
                                   "decode (this batch: 0 of 16 filled, 1000 failed; last error: ")
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "work" / "checkpoints" / "1")


def test_sigterm_while_waiting_for_data_returns_within_seconds():
    """The loop's data wait sees the SIGTERM flag however long next() blocks (here: forever, as an
    all-undecodable dataset did before the bound above); the real handler, the real signal."""
    class Forever:
        def __next__(self):
            while True:
                time.sleep(0.05)

    preemption = distributed.Preemption()  # one process: the SIGTERM handler sets .requested
    try:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        start = time.monotonic()
        assert train.next_batch(Forever(), lambda: preemption.requested) is None
        assert time.monotonic() - start < 3
    finally:
        preemption.close()
    assert train.next_batch(iter([{"x": 1}]), lambda: False) == {"x": 1}
    with pytest.raises(ValueError, match="boom"):
        train.next_batch(map(lambda _: (_ for _ in ()).throw(ValueError("boom")), [0]), lambda: False)


def test_failed_save_stops_at_once(tmp_path):
    """A save that fails in orbax's background thread (here: a file-size limit, as on a full disk) is
    reported by the check the loop runs after every step, naming the last complete checkpoint."""
    def state(n, step):  # random values: zstd cannot shrink them under the limit
        w = jnp.asarray(np.random.default_rng(step).normal(size=(n, n)), jnp.float32)
        return {"params": {"w": w}, "opt_state": {"m": jnp.zeros((n, n))}, "step": jnp.int32(step)}

    mngr = checkpoints.manager(str(tmp_path))
    config = train_config.base_config(configs.tiny(), 1)
    checkpoints.save(mngr, 1, state(64, 1), None, config)
    mngr.wait_until_finished()
    train.check_saves(mngr, 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # writes past 64 KiB fail with EFBIG
    try:
        checkpoints.save(mngr, 2, state(512, 2), None, config)  # returns at once; the write fails later
        deadline = time.monotonic() + 30
        with pytest.raises(train.StopTraining, match=r"saving a checkpoint failed \(ValueError: .*File too large.*"
                                                     r"stopped at step 2; the newest complete checkpoint is step 1"):
            while time.monotonic() < deadline:  # the loop runs this check after every step
                train.check_saves(mngr, 2)
                time.sleep(0.05)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert mngr.latest_step() == 1
