"""The trainer's step for a config, lowered and compiled for any devices (abstract TPU ones included).

Nothing executes: the step, its abstract train state and its batch come from training/setup.setup, the
function jclip-train itself starts with, called with the topology's devices; so what compiles here is what a
pod would run, by construction (tests/test_compile.py checks the two lowerings are the same program).
"""

from __future__ import annotations

import dataclasses
import time

import jax

from jclip_jax.training.setup import TrainSetup, setup


@dataclasses.dataclass
class CompiledStep:
    """A compiled step, or the compiler's refusal (`error`, e.g. RESOURCE_EXHAUSTED when it exceeds HBM)."""

    run: TrainSetup
    lowered: object
    compiled: object | None
    error: str | None
    lower_seconds: float
    compile_seconds: float


def compile_train_step(config, devices, num_slices: int = 1, *, compile: bool = True) -> CompiledStep:
    """Lower and compile the step `jclip-train` would run for `config` on `devices` (abstract or real, or a
    function returning them: called once the config has been validated).

    The config is validated first (a bad field fails before any tracing).
    """
    run = setup(config, devices=devices, num_slices=num_slices)
    t0 = time.perf_counter()
    lowered = run.lower()
    t1 = time.perf_counter()
    compiled = error = None
    if compile:
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:  # the compiler's own refusal, e.g. over HBM
            error = str(e)
    return CompiledStep(run, lowered, compiled, error, t1 - t0, time.perf_counter() - t1)
