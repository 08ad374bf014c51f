"""Multi-host runs: one JAX process per host, joined by jax.distributed, and preemption all processes agree on.

A run is multi-host when its environment says so; every process then runs the same `jclip-train` command:

    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 jclip-train ...   # explicit
    srun jclip-train ...               # SLURM (SLURM_NTASKS > 1): jax reads the SLURM environment
    (Cloud TPU pod slice)              # TPU_WORKER_HOSTNAMES lists 2+ hosts: jax asks the TPU metadata

JCLIP_HEARTBEAT_TIMEOUT_S (default 100, jax's default) bounds how long the survivors of a dead process
wait before the distributed runtime stops them with an error naming the lost task. On CPU the processes'
devices exchange data over gloo (TCP), so N processes on one machine form one N x local-device mesh
(`launch/local_hosts.sh`).

Preemption: a cluster scheduler sends SIGTERM to the hosts at different moments. With several processes the
distributed runtime's preemption sync manager (it installs its own SIGTERM handler) spreads the notice and
picks one step at which every process saves — orbax's `CheckpointManager.reached_preemption` and MaxText
use the same sync point — so no process waits in a collective save the others never reach. A single
process keeps a local SIGTERM flag.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import jax
from absl import logging

HEARTBEAT_TIMEOUT_ENV = "JCLIP_HEARTBEAT_TIMEOUT_S"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def has_accelerator() -> bool:
    """Whether this host has a TPU chip or a GPU, by jax's own PCI / device-file probe (the one jax uses to
    skip CUDA on a host without a GPU; a private module, so if it moves every host counts as accelerated)."""
    try:
        from jax._src import hardware_utils
    except ImportError:
        return True
    return (hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0 or hardware_utils.has_visible_nvidia_gpu()
            or os.path.exists("/dev/kfd"))  # /dev/kfd: AMD GPUs (ROCm)


def cpu_only_unless_accelerated() -> None:
    """On a host with no TPU chip and no GPU, run on the CPU backend without probing for a TPU. Why: with
    libtpu installed (the tpu and test extras) jax initialises its TPU plugin on every start, and on a CPU host
    libtpu prints six lines of TPU-detection errors to stderr before failing over to the CPU, burying every
    one-line message of ours. An explicit JAX_PLATFORMS wins; TPU and GPU hosts are left alone. Call it
    before anything touches a jax backend (the command-line tools do, first thing)."""
    if not os.environ.get("JAX_PLATFORMS") and not jax.config.jax_platforms and not has_accelerator():
        jax.config.update("jax_platforms", "cpu")


def is_multi_host() -> bool:
    """Whether the environment describes a run of several processes (explicit, SLURM or TPU pod)."""
    return (bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or (_env_int("SLURM_NTASKS") or 1) > 1
            or len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1)


def initialize() -> bool:
    """jax.distributed.initialize() when the environment describes a multi-host run; True if it did.

    Must run before anything touches a jax backend. Explicit settings (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID) win; unset ones are detected by jax (SLURM, Cloud TPU).
    """
    if not is_multi_host() or jax.distributed.is_initialized():
        return False
    heartbeat = _env_int(HEARTBEAT_TIMEOUT_ENV) or 100
    # CPU devices of different processes talk over gloo; without it a multi-process CPU mesh cannot run a
    # collective. Accelerator backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ.get("JAX_COORDINATOR_ADDRESS") or None,
        num_processes=_env_int("JAX_NUM_PROCESSES"), process_id=_env_int("JAX_PROCESS_ID"),
        heartbeat_timeout_seconds=heartbeat)
    logging.info("process %d of %d (%d local devices, %d in all)", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True


class Preemption:
    """SIGTERM -> save and exit at a step every process agrees on; `reached(step)` after every step.

    Several processes: jax's preemption sync point (all processes must call `reached` at every step,
    which the training loop does). One process: a local flag set by a SIGTERM handler.
    The sync point gets this run's call count (1, 2, ...), not the global step: the runtime agrees on
    (largest count reported after the notice) + 1, from 0 before the first call, so a notice that arrives
    while a resumed run compiles would name count 1, a step the run (at step 5, say) never calls with.
    """

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self._requested = False
        self._calls = 0
        self._previous = None
        if not self.multi_process:  # a Python handler would replace the sync manager's own
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and exiting")
        self._requested = True

    @property
    def requested(self) -> bool:
        """A SIGTERM this process has seen (one process; several processes learn of it in `reached`)."""
        return self._requested

    def reached(self, step: int) -> bool:
        """True at the step where this run must save and exit (the same step on every process)."""
        if self.multi_process:
            from jax.experimental import multihost_utils

            self._calls += 1
            return multihost_utils.reached_preemption_sync_point(self._calls)
        return self._requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def exit_after_lost_peer(error: Exception) -> None:
    """A collective failed in a multi-process run (a peer process died and its connections broke): wait for
    the distributed runtime's heartbeat check, which stops this process with an error naming the unhealthy
    (lost) process, and exit non-zero in any case once that time has passed. Never returns."""
    timeout = _env_int(HEARTBEAT_TIMEOUT_ENV) or 100
    print(f"jclip-train: process {jax.process_index()} of {jax.process_count()}: a collective failed "
          f"({str(error).splitlines()[0][:300]}); waiting up to {timeout} s for the distributed runtime to name "
          "the lost process", file=sys.stderr, flush=True)
    time.sleep(timeout + 10)
    print(f"jclip-train: process {jax.process_index()}: lost a peer process (the distributed runtime did not "
          "say which)", file=sys.stderr, flush=True)
    os._exit(1)  # other threads may be blocked in collectives; a clean interpreter exit would wait on them


class CompiledTogether:
    """A jitted function that, in a multi-process run, compiles for each new argument signature in every
    process and then waits at a barrier of the distributed runtime (key-value, no collective) before it runs.
    In one process it is the jitted function itself.

    Why: XLA's gloo CPU collectives give the processes 30 s (fixed) to join a program's first collective,
    and compile times of one program differ by more than that between processes on a loaded machine.
    """

    def __init__(self, jitted, name: str, timeout_s: int = 3600):
        self.jitted, self.name, self.timeout_s = jitted, name, timeout_s
        self._compiled = {}

    def __call__(self, *args):
        if jax.process_count() == 1:
            return self.jitted(*args)
        leaves, treedef = jax.tree.flatten(args)
        signature = (treedef, tuple((getattr(x, "shape", ()), str(getattr(x, "dtype", type(x)))) for x in leaves))
        compiled = self._compiled.get(signature)
        if compiled is None:
            compiled = self._compiled[signature] = self.jitted.lower(*args).compile()
            from jax._src import distributed as jax_distributed  # the client has no public handle (orbax does this)

            barrier = f"jclip:{self.name}:{len(self._compiled)}:compiled"
            jax_distributed.global_state.client.wait_at_barrier(barrier, self.timeout_s * 1000)
        return compiled(*args)
