"""The training loop: read a batch, step, log, evaluate, save; stop cleanly on SIGTERM (TPU preemption).

    results = train(config, workdir)   # what jclip-train runs (training/cli.py)

setup (training/setup.py) -> workdir lock -> resume check -> data iterator -> train state (the workdir's
newest good checkpoint, else config.init, else scratch) -> loop -> final evaluation -> eval.json.
One iteration: pipeline batch (data/pipeline.py) -> global arrays -> step (training/step.py) -> metrics
(training/metrics.py) -> [evaluation] -> [checkpoint]. A restart continues exactly where the run stopped.
"""

from __future__ import annotations

import json
import sys
import threading

import jax
from absl import logging

from jclip_jax import distributed
from jclip_jax.data import batch as batch_schema
from jclip_jax.data import pipeline
from jclip_jax.evals.train_eval import Evaluator
from jclip_jax.training import checkpoints, flops, workdir_lock
from jclip_jax.training import config as config_lib
from jclip_jax.training.initial_weights import initial_state
from jclip_jax.training.metrics import MetricsWriter
from jclip_jax.training.setup import TrainSetup, setup


class StopWaitingForData(Exception):
    """SIGTERM arrived while the loop was waiting for a batch: exit without a checkpoint of the partial batch."""


class StopTraining(ValueError):
    """A condition under which the run stops before saving (non-finite updates, a failed save)."""


def next_batch(data_iterator, stop_requested, poll_seconds: float = 0.25):
    """next(data_iterator), fetched in a daemon thread so that `stop_requested()` (SIGTERM) is seen within
    `poll_seconds` however long the data takes; None if a stop was requested first."""
    box, done = {}, threading.Event()

    def fetch():
        try:
            box["batch"] = next(data_iterator)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=fetch, daemon=True, name="jclip-next-batch").start()
    while not done.wait(poll_seconds):
        if stop_requested():
            return None
    if "error" in box:
        raise box["error"]
    return box["batch"]


def check_saves(mngr, step: int) -> None:
    """Stop at the first failed asynchronous save (e.g. a full disk), not several saves later.

    orbax reports a background failure only from wait_until_finished (check_for_errors stays silent), and
    that join is instant once no save is in progress (a local join, no cross-host barrier)."""
    try:
        if not mngr.is_saving_in_progress():
            mngr.wait_until_finished()
    except Exception as e:
        raise StopTraining(f"saving a checkpoint failed ({checkpoints.one_line(e)}); stopped at step {step}; "
                           f"the newest complete checkpoint is step {mngr.latest_step()}") from e


def train(config, workdir: str) -> dict:
    """Runs (or resumes) the config's training in `workdir`; returns the final evaluation."""
    run = setup(config, workdir)  # validation and every input check: before any compute
    with workdir_lock.hold(workdir, jax.process_index()):  # released however the run ends
        return _train(run, workdir)


def _train(run: TrainSetup, workdir: str) -> dict:
    config, mesh = run.config, run.mesh
    mngr = checkpoints.manager(workdir, config.keep_checkpoints)
    if mngr.all_steps() and (saved := checkpoints.saved_config(mngr)) is not None:
        for change in config_lib.resume_changes(saved, config):  # refuses incompatible ones
            print(f"jclip-train: resuming with {change}", flush=True)
    data_iterator = pipeline.train_iterator(run.data)

    state = run.init_state()
    restored, start = checkpoints.restore_latest_good(mngr, run.abstract_state, run.shardings, data_iterator)
    counters = {}
    if restored is not None:
        state, origin = restored, f"checkpoint at step {start} in {workdir}"
        counters = checkpoints.restore_counters(mngr, start)  # counting goes on where it stopped
    else:
        (state, origin), start = initial_state(run, state), 0
    logging.info("starting at step %d from %s", start, origin)
    if jax.process_index() == 0:
        print(f"jclip-train: {origin}; steps {start} -> {config.total_steps} on mesh {dict(mesh.shape)}"
              + (f" over {jax.process_count()} processes" if jax.process_count() > 1 else ""), flush=True)

    step_fn = distributed.CompiledTogether(run.step, "train_step")  # several processes: compiled by all, then run
    evaluator = Evaluator(config, run.graphdef, mesh, run.batch_axes, eval_tasks=run.eval_tasks)
    peak, peak_source = flops.peak_flops_per_device(config.peak_flops_per_device)
    writer = MetricsWriter(workdir, config.total_steps, start, run.model_flops(), run.pairs_per_step,
                           peak * jax.device_count(), peak_source)
    writer.mixture_names = pipeline.image_text_source_names(run.data)
    writer.load_counters(counters)
    preemption = distributed.Preemption()
    base_rng = jax.random.key(config.seed)

    step = start
    skipped_updates = counters.get("skipped_updates", 0)  # then a device scalar: no wait for each step
    while step < config.total_steps:
        local = next_batch(data_iterator, lambda: preemption.requested)
        if local is None:
            raise StopWaitingForData(f"SIGTERM while waiting for data after step {step}: exiting without saving; "
                                     f"the newest checkpoint is step {mngr.latest_step()}")
        stats = local.pop(batch_schema.STATS_KEY)
        writer.count_skipped(int(stats["decode_failures"]))
        writer.count_mixture(stats.get("source_counts"))
        batch = pipeline.make_global_batch(local, mesh, run.batch_axes)
        state, metrics = step_fn(state, batch, jax.random.fold_in(base_rng, step))
        step += 1
        check_saves(mngr, step)
        skipped_updates = skipped_updates + metrics["nonfinite"]
        metrics = dict(metrics, skipped_updates=skipped_updates)
        log = step % config.log_every == 0 or step == config.total_steps
        writer.step(step, metrics, log=log)
        if config.eval_every and step % config.eval_every == 0 and step < config.total_steps:
            writer.eval(step, evaluator(state["params"]))
        preempted = preemption.reached(step)  # every process, every step: the same answer on all
        save = step % config.checkpoint_every == 0 or step == config.total_steps or preempted
        if (log or save) and config.nonfinite == "stop" and int(skipped_updates):
            mngr.wait_until_finished()  # the earlier checkpoints are complete when we say so
            raise StopTraining(
                f"non-finite loss or gradient norm at {int(skipped_updates)} step(s) up to step {step} (updates "
                f"skipped); stopped before saving (config.nonfinite='stop'); the newest checkpoint is step "
                f"{mngr.latest_step()}; lower optim.peak_lr or set --config.nonfinite=skip to skip such updates")
        if save:
            try:
                counters = dict(writer.counters(), skipped_updates=int(skipped_updates))
                checkpoints.save(mngr, step, state, data_iterator, config, force=preempted, counters=counters)
            except Exception as e:  # e.g. a full disk when the save starts
                raise StopTraining(f"saving the checkpoint of step {step} failed ({checkpoints.one_line(e)}); "
                                   f"the newest complete checkpoint is step {mngr.latest_step()}") from e
        if preempted:
            mngr.wait_until_finished()
            writer.close()
            print(f"jclip-train: preempted; checkpoint saved at step {step}"
                  + (f" (process {jax.process_index()})" if jax.process_count() > 1 else ""), flush=True)
            sys.exit(0)

    mngr.wait_until_finished()
    check_saves(mngr, step)
    results = evaluator(state["params"])
    results.update(step=step, skipped_records=writer.skipped, skipped_updates=int(skipped_updates),
                   **writer.throughput(), **writer.mixture())
    writer.eval(step, results, final=True)
    if jax.process_index() == 0:
        from etils import epath

        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        (epath.Path(workdir) / "eval.json").write_text(json.dumps(results, indent=2))
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    preemption.close()
    if hasattr(data_iterator, "close"):
        data_iterator.close()
    return results
