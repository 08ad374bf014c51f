"""jclip-train: train jina-clip from a config file (big_vision style).

    jclip-train                                             # the demo: tiny model, synthetic data, CPU
    jclip-train --config configs/jina_clip_v1.py:stage=1 --workdir gs://bucket/run1 \
                --config.data.image_text_dir=... --config.total_steps=1000

--config takes file.py[:arg] and --config.<field>=value overrides; --workdir holds the checkpoints,
TensorBoard events and eval.json. Bad flags, configs and inputs exit 2 with one line (JCLIP_DEBUG=1 shows the
traceback); SIGTERM saves a checkpoint and exits 0 (training/loop.py).
"""

from __future__ import annotations

import os
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jclip_jax import distributed
from jclip_jax.training import loop, workdir_lock

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "configs")
DEMO_CONFIG = os.path.join(REPO_CONFIGS, "demo.py")

_CONFIG_OVERRIDE_ERRORS = (KeyError, AttributeError, TypeError, ValueError)
try:  # with the default config file, ml_collections applies --config.* overrides here, at import
    _CONFIG = config_flags.DEFINE_config_file("config", DEMO_CONFIG, "Training config file (file.py[:arg]).",
                                              lock_config=True)
    _CONFIG_ERROR = None
except _CONFIG_OVERRIDE_ERRORS as e:  # reported in one line by parse_flags
    _CONFIG, _CONFIG_ERROR = None, e
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Checkpoints, TensorBoard events and eval.json.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save step at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        loop.train(_CONFIG.value, _WORKDIR.value)
    except loop.StopWaitingForData as e:
        print(f"jclip-train: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + signal.SIGTERM)  # the data thread may be stuck in a read: do not wait for it
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() > 1:  # most often a dead peer: let the distributed runtime name it
            distributed.exit_after_lost_peer(e)
        raise
    except (ValueError, FileNotFoundError, workdir_lock.WorkdirInUse) as e:
        if os.environ.get("JCLIP_DEBUG"):
            raise
        print(f"jclip-train: {e}  (JCLIP_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)


def parse_flags(argv, prog: str = "jclip-train"):
    """absl's flag parsing, with config overrides that name no field or do not fit it (which
    ml_collections raises as KeyError/AttributeError/TypeError deep in the parser) reported in one line.
    jclip-compile parses its flags here too (prog names it)."""
    try:
        if _CONFIG_ERROR is not None:
            raise _CONFIG_ERROR
        return flags.FLAGS(argv)
    except flags.Error as e:
        message, _, trace = str(e).partition("Traceback (most recent call last):")
        if trace:  # ml_collections puts the config file's traceback in the message: keep its last line
            message = f"{message.strip()} {trace.strip().splitlines()[-1]}"
        print(f"{prog}: {message}", file=sys.stderr)
    except _CONFIG_OVERRIDE_ERRORS as e:
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        detail = str(e).strip("'\"")
        print(f"{prog}: config override {' '.join(bad)}: no such field or a value that does not fit it "
              f"({type(e).__name__}: {detail})", file=sys.stderr)
    sys.exit(2)


def run():
    """Console-script entry point (absl parses --config / --workdir / --config.key=value)."""
    distributed.cpu_only_unless_accelerated()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
