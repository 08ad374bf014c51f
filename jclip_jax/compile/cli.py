"""jclip-compile: compile the training step of a config for a named TPU topology, on this host, and report.

    jclip-compile --config configs/jina_clip_v1.py:stage=1 --topology v5p:4x4x4
    jclip-compile --config configs/demo.py --topology v5e:2x2 --config.micro_batches=2 --json report.json
    jclip-compile ... --topology v5e:16x16 --num_slices 2        # two slices over the data-centre network
    jclip-compile ... --config.activation_constraints=False      # the towers' activations left to GSPMD

The step comes from training/setup.setup, as jclip-train's does: the compiled program is the trained one.

Needs libtpu (`pip install -e '.[tpu]'`); no TPU, network or metadata server is touched. Exit status:
0 fits, 1 does not fit (the largest buffers and the knobs to try are printed), 2 bad config or topology.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from jclip_jax.training import cli as train_cli  # --config: jclip-train's own flag and its one-line errors

_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology <chip>:<grid>, e.g. v5e:2x2, v5p:4x4x4, v6e:8x8.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of that topology (multi-slice over DCN).")
_JSON = flags.DEFINE_string("json", None, "Also write the report to this JSON file.")
_HLO = flags.DEFINE_string("hlo", None, "Also write the compiled HLO text to this file (hlo.analyze reads it).")


def compile_and_report(config, topology_name: str, num_slices: int = 1, hlo_path: str | None = None) -> dict:
    """Compile config's step for the topology; the report dict (report.build_report)."""
    from jclip_jax.compile import program, report, topology

    devices = lambda: topology.topology_devices(topology_name, num_slices)  # after the config's validation
    step = program.compile_train_step(config, devices, num_slices)
    if hlo_path and step.compiled is not None:
        with open(hlo_path, "w") as f:
            f.write(step.compiled.as_text())
    return report.build_report(step, topology_name, num_slices)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _TOPOLOGY.value:
        raise app.UsageError("--topology is required, e.g. --topology v5e:2x2")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from jclip_jax.compile import report

    try:
        result = compile_and_report(flags.FLAGS.config, _TOPOLOGY.value, _NUM_SLICES.value, _HLO.value)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("JCLIP_DEBUG"):
            raise
        print(f"jclip-compile: {e}  (JCLIP_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)
    print(report.format_report(result), flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(result, f, indent=2, default=float)
    sys.exit(0 if result["fits"] else 1)


def run():
    """Console-script entry point."""
    # The host runs nothing (TPU devices are compile-only): the CPU backend, without probing for a TPU. jax is
    # already imported here, so its config, not the JAX_PLATFORMS variable, is what takes effect.
    if not os.environ.get("JAX_PLATFORMS"):
        import jax

        jax.config.update("jax_platforms", "cpu")
    app.run(main, flags_parser=lambda argv: train_cli.parse_flags(argv, prog="jclip-compile"))


if __name__ == "__main__":
    run()
