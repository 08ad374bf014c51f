"""One set-up (training/setup.py) for jclip-train, jclip-compile and the benches: the program jclip-compile
lowers for a config is, text for text, the program jclip-train runs on its real train state and the
pipeline's real batches, so the two cannot drift."""

import jax
import pytest
from helpers import load_config

from jclip_jax.compile import program
from jclip_jax.training import loop


class FirstStep(Exception):
    """Raised by the recorder once it has the trainer's first step: the test needs nothing more."""


def trainers_step_program(config, workdir, monkeypatch) -> str:
    """The StableHLO text of the step jclip-train calls first, lowered with the very arguments it passes
    (its train state, the pipeline's global batch, its dropout key)."""
    seen = {}

    class Recorder:  # stands in for distributed.CompiledTogether, which wraps the step in the loop
        def __init__(self, jitted, name):
            self.jitted = jitted

        def __call__(self, *args):
            seen["text"] = self.jitted.lower(*args).as_text()
            raise FirstStep

    monkeypatch.setattr(loop.distributed, "CompiledTogether", Recorder)
    with pytest.raises(FirstStep):
        loop.train(config, workdir)
    return seen["text"]


@pytest.mark.parametrize("stage", [1, 3])  # text pairs; hard-negative triplets (the (B, 7, L) negatives)
def test_jclip_compile_lowers_the_program_jclip_train_runs(small_synthetic_dir, tmp_path, monkeypatch, stage):
    config = load_config("demo")
    config.data.synthetic_dir = small_synthetic_dir
    config.loss.stage = stage
    config.data.image_batch_size = config.data.text_batch_size = 16
    config.data.image_max_length = config.data.text_max_length = 16
    trained = trainers_step_program(config, str(tmp_path / "work"), monkeypatch)
    compiled = program.compile_train_step(config, jax.devices(), compile=False).lowered.as_text()
    assert compiled == trained
    # the comparison does see a change of program: another batch layout, another step
    other = config.copy_and_resolve_references()
    other.micro_batches = 2
    assert program.compile_train_step(other, jax.devices(), compile=False).lowered.as_text() != trained
