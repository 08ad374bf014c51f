"""jclip-train as several real JAX processes on this machine (jax.distributed over localhost, gloo CPU
collectives), the pod/SLURM path: 2 processes x 4 devices train like 1 process x 8 devices; outputs from
process 0 only; a dead peer stops the survivor in bounded time naming it; both killed, then SIGTERM to one
of two (both save the same step, exit 0), then a restart finishes bit-identical to the uninterrupted run;
a checkpoint of 2 processes refuses to resume in 1 with a one-line message. Launch scripts' --dry-run.

Every process is started like launch/local_hosts.sh starts it and killed at the end. No persistent
compilation cache: a process that loads a program from it while its peer compiles can miss gloo's fixed 30 s
window to join the program's first collective.
"""

import glob
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jclip_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")
STEPS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """N jclip-train processes on one workdir, process i as JAX process i of N with 8 / N CPU devices."""

    started: list = []  # every process of the module, killed at its end

    def __init__(self, workdir, n, overrides, env=None):
        self.workdir, self.logs, self.procs = str(workdir), [], []
        port = free_port()
        for i in range(n):
            child_env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "JCLIP_"))}
            child_env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // n}", JAX_PLATFORMS="cpu",
                             **(env or {}))
            if n > 1:
                child_env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
                                 JAX_PROCESS_ID=str(i))
            log = f"{self.workdir}.run{len(Run.started)}.process{i}.log"
            os.makedirs(os.path.dirname(log), exist_ok=True)
            with open(log, "w") as f:
                proc = subprocess.Popen([sys.executable, "-m", "jclip_jax.training.cli", f"--config={DEMO}",
                                         f"--workdir={self.workdir}", *overrides],
                                        stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=child_env)
            self.logs.append(log)
            self.procs.append(proc)
            Run.started.append(proc)

    def output(self, i: int) -> str:
        with open(self.logs[i]) as f:
            return f.read()

    def wait(self, timeout=900) -> list[int]:
        deadline = time.time() + timeout
        for proc in self.procs:
            proc.wait(timeout=max(1, deadline - time.time()))
        return [proc.returncode for proc in self.procs]

    def wait_ok(self, timeout=900) -> None:
        codes = self.wait(timeout)
        assert codes == [0] * len(codes), "\n".join(self.output(i)[-3000:] for i in range(len(codes)))

    def wait_for(self, pattern: str, i: int = 0, timeout=900) -> None:
        start = time.time()
        while not re.search(pattern, self.output(i), re.M):
            assert all(p.poll() is None for p in self.procs), self.output(i)[-3000:]
            assert time.time() - start < timeout, f"no {pattern!r} in process {i}'s output"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    synthetic.write_synthetic(root / "synthetic", num_train=256, num_eval=64, num_text_pairs=256, num_triplets=64,
                              image_size=32)
    overrides = [f"--config.data.synthetic_dir={root / 'synthetic'}", f"--config.total_steps={STEPS}",
                 "--config.checkpoint_every=4", "--config.log_every=2", "--config.eval_every=0",
                 "--config.data.image_batch_size=16", "--config.data.text_batch_size=16",
                 "--config.optim.warmup_steps=2", "--config.evals.batch_size=32"]
    yield root, overrides
    for proc in Run.started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def reference(setup):
    """Uninterrupted runs: 1 process x 8 devices and 2 processes x 4 devices, side by side."""
    root, overrides = setup
    one = Run(root / "one", 1, overrides)
    two = Run(root / "two", 2, overrides)
    one.wait_ok()
    two.wait_ok()
    return one, two


def step_metrics(output: str) -> dict:
    """{step: {metric: value}} from the 'step N: k=v ...' lines."""
    return {int(m.group(1)): {k: float(v) for k, v in re.findall(r"(\S+)=(\S+)", m.group(2))}
            for m in re.finditer(r"^step (\d+): (.*)$", output, re.M)}


def final_params(workdir, step=STEPS) -> dict:
    import jax
    from flax import nnx

    from jclip_jax import JinaCLIP
    from jclip_jax.training import checkpoints

    abstract = nnx.eval_shape(lambda: JinaCLIP(checkpoints.restore_config(workdir).model, rngs=nnx.Rngs(0)))
    params, got = checkpoints.restore_params(workdir, nnx.state(abstract, nnx.Param), step=step)
    assert got == step
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def read_json(path):
    import json

    with open(path) as f:
        return json.load(f)


def test_two_processes_train_like_one(reference):
    one, two = reference
    # step by step: the same losses (so the same global batches: tests/test_data_pipeline.py shows the
    # stacked per-process rows are the 1-process batch), to the 4 digits printed
    a, b = step_metrics(one.output(0)), step_metrics(two.output(0))
    assert sorted(a) == sorted(b) == list(range(2, STEPS + 1, 2))
    for step in a:
        for key in ("loss", "loss/image_text", "loss/text_pair", "grad_norm", "lr", "logit_scale"):
            np.testing.assert_allclose(b[step][key], a[step][key], rtol=2e-3, err_msg=f"step {step} {key}")
    # final params to float tolerance, not bit-identity: the 2-process gradient all-reduce and loss gathers
    # run over gloo between processes, in another summation order than the 8 devices of one process
    pa, pb = final_params(one.workdir), final_params(two.workdir)  # a 2-process checkpoint, read in 1 process
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_allclose(pb[k], pa[k], rtol=1e-4, atol=2e-6, err_msg=k)
    # the same evaluation, written once
    ea, eb = read_json(os.path.join(one.workdir, "eval.json")), read_json(os.path.join(two.workdir, "eval.json"))
    for key in ea:
        if key.endswith(("_r1", "_r5", "_r10")):
            assert eb[key] == ea[key], key


def test_outputs_from_process_zero_only(reference):
    _, two = reference
    main, other = two.output(0), two.output(1)
    assert "over 2 processes" in main and re.search(r"^step 12:", main, re.M) and "final evaluation" in main
    assert not re.search(r"^step \d+:|final evaluation|jclip-train:", other, re.M), other[-2000:]
    assert len(glob.glob(os.path.join(two.workdir, "tensorboard", "events.out.tfevents.*"))) == 1
    # every process saved its own data-iterator state in each checkpoint
    assert sorted(os.listdir(os.path.join(two.workdir, "checkpoints", "12", "data"))) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]


def test_two_process_checkpoint_does_not_resume_in_one(setup, reference):
    root, overrides = setup
    _, two = reference
    run = Run(two.workdir, 1, [*overrides, f"--config.total_steps={STEPS + 4}"])
    assert run.wait() == [2]
    lines = [line for line in run.output(0).splitlines() if line.startswith("jclip-train:")]
    refusals = [line for line in lines if "not supported" in line]  # other lines: e.g. "resuming with ..."
    assert len(refusals) == 1 and "2 process(es); this run has 1" in refusals[0] and lines[-1] == refusals[0], lines


def test_dead_peer_then_preemption_of_one_process_then_exact_resume(setup, reference):
    root, overrides = setup
    _, two = reference
    workdir = root / "interrupted"
    # 1. SIGKILL to process 1: process 0 exits non-zero in bounded time, naming the lost process
    run = Run(workdir, 2, overrides, env={"JCLIP_HEARTBEAT_TIMEOUT_S": "15"})
    run.wait_for(r"^step 6:")  # past the step-4 checkpoint
    run.procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    code = run.wait(timeout=15 + 60)[0]
    assert code != 0
    assert time.time() - killed < 15 + 60
    assert re.search(r"unhealthy \(stopped sending heartbeats\):\s*1\b", run.output(0)), run.output(0)[-3000:]

    # 2. both dead; restarted, SIGTERM reaches process 1 only: both save the same step and exit 0
    run = Run(workdir, 2, overrides)
    # mid-training here; distributed.Preemption also covers a notice that arrives before the first step
    run.wait_for(r"^step 6:")
    run.procs[1].send_signal(signal.SIGTERM)
    run.wait_ok()
    saved = [re.findall(r"preempted; checkpoint saved at step (\d+)", run.output(i)) for i in range(2)]
    assert saved[0] == saved[1] and len(saved[0]) == 1, saved
    step = int(saved[0][0])
    assert step < STEPS and os.path.isdir(workdir / "checkpoints" / str(step))

    # 3. restarted: continues from that step and ends bit-identical to the uninterrupted 2-process run
    run = Run(workdir, 2, overrides)
    run.wait_ok()
    assert f"checkpoint at step {step}" in run.output(0)
    a, b = final_params(two.workdir), final_params(workdir)
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    assert os.path.exists(workdir / "eval.json")


# ------------------------------------------------------------------------------------------- launch scripts


def dry_run(script, *args, env=None) -> list[list[str]]:
    """The commands a launch script would run, each split back into its words."""
    out = subprocess.run(["bash", os.path.join(REPO, "launch", script), "--dry-run", *args], check=True,
                         capture_output=True, text=True, env={**os.environ, **(env or {})}).stdout
    return [shlex.split(line) for line in out.splitlines()]


TRICKY = ['--config.mesh=(("data", -1),)', "--config.name=it's a \"test\" $HOME `x`"]


def remote_train_argv(remote: str) -> tuple[dict, list[str]]:
    """'cd ... && . ... && env K=V ... jclip-train ARGS' -> ({K: V}, ARGS) as the remote bash splits it."""
    words = shlex.split(remote.split(" && ")[-1])
    assert words[0] == "env"
    i = words.index("jclip-train")
    return dict(w.split("=", 1) for w in words[1:i]), words[i + 1:]


def test_tpu_pod_dry_run_selects_workers_passes_env_and_quotes_overrides():
    env = {"JCLIP_HEARTBEAT_TIMEOUT_S": "30", "XLA_FLAGS": "--xla_a=1 --xla_b=2", "UNRELATED_VAR": "no"}
    (cmd,) = dry_run("tpu_pod.sh", "--worker=0,3", "my-tpu", "us-central2-b", "configs/x.py", "gs://b/run", *TRICKY,
                     env=env)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=0,3" in cmd and cmd[cmd.index("--zone") + 1] == "us-central2-b"
    remote = cmd[cmd.index("--command") + 1]
    assert remote.startswith("cd ~/jclip-jax && . .venv/bin/activate && ")
    passed, argv = remote_train_argv(remote)
    assert passed["JCLIP_HEARTBEAT_TIMEOUT_S"] == "30" and passed["XLA_FLAGS"] == "--xla_a=1 --xla_b=2"
    assert "UNRELATED_VAR" not in passed
    assert argv == ["--config", "configs/x.py", "--workdir", "gs://b/run", *TRICKY]
    (default,) = dry_run("tpu_pod.sh", "t", "z", "c.py", "w")
    assert "--worker=all" in default


def test_gpu_hosts_dry_run_one_command_per_host():
    env = {"HOSTS": "gpu-a,gpu-b,gpu-c", "PORT": "9999", "NCCL_DEBUG": "INFO"}
    cmds = dry_run("gpu_hosts.sh", "configs/x.py", "/runs/a b", *TRICKY, env=env)
    assert [c[:2] for c in cmds] == [["ssh", "gpu-a"], ["ssh", "gpu-b"], ["ssh", "gpu-c"]]
    for i, cmd in enumerate(cmds):
        passed, argv = remote_train_argv(cmd[2])
        assert passed["JAX_COORDINATOR_ADDRESS"] == "gpu-a:9999" and passed["JAX_NUM_PROCESSES"] == "3"
        assert passed["JAX_PROCESS_ID"] == str(i) and passed["NCCL_DEBUG"] == "INFO"
        assert argv == ["--config", "configs/x.py", "--workdir", "/runs/a b", *TRICKY]
    # SLURM: srun hands the words to bash as arguments ("$@"), so they are never re-split
    (srun,) = dry_run("gpu_hosts.sh", "configs/x.py", "w", *TRICKY, env={"HOSTS": ""})
    assert srun[:3] == ["srun", "bash", "-c"] and srun[3].endswith('exec jclip-train "$@"')
    out = subprocess.run(["bash", "-c", srun[3].replace(". .venv/bin/activate && exec jclip-train", "printf '%s\\n'"),
                          *srun[4:]], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["--config", "configs/x.py", "--workdir", "w", *TRICKY]


def test_local_hosts_dry_run_starts_n_processes_like_the_tests():
    cmds = dry_run("local_hosts.sh", "3", *TRICKY, env={"PORT": "12345", "DEVICES_PER_PROCESS": "2"})
    assert len(cmds) == 3
    for i, cmd in enumerate(cmds):
        assert cmd[0] == "env"
        j = cmd.index("jclip-train")
        passed = dict(w.split("=", 1) for w in cmd[1:j])
        assert passed["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:12345" and passed["JAX_NUM_PROCESSES"] == "3"
        assert passed["JAX_PROCESS_ID"] == str(i) and passed["JAX_PLATFORMS"] == "cpu"
        assert passed["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=2")
        assert cmd[j + 1:] == TRICKY
