"""jclip-train: the three-stage jina-clip recipe from a config file (big_vision-style, linear).

    jclip-train                                             # the demo: tiny model, synthetic data, CPU
    jclip-train --config configs/jina_clip_v1/stage1.py --workdir gs://bucket/run1 \
                --config.data.image_text_dir=... --config.total_steps=1000

distributed init -> config checks -> mesh -> data -> sharded init -> resume (workdir checkpoint, else
config.init, else scratch) -> jitted step -> loop with metrics, evaluation, checkpoints -> final eval.
SIGTERM (TPU preemption) saves a checkpoint and exits cleanly; a restart continues exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from jclip_jax import (
    checkpoints,
    distributed,
    flops,
    losses,
    optim,
    preflight,
    sharding,
    train_config,
    train_step,
    workdir_lock,
)
from jclip_jax.convert import hf_layout
from jclip_jax.data import pipeline
from jclip_jax.evals.train_eval import Evaluator
from jclip_jax.models.clip import JinaCLIP
from jclip_jax.train_metrics import MetricsWriter

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEMO_CONFIG = os.path.join(REPO_CONFIGS, "demo.py")

_CONFIG_OVERRIDE_ERRORS = (KeyError, AttributeError, TypeError, ValueError)
try:  # with the default config file, ml_collections applies --config.* overrides here, at import
    _CONFIG = config_flags.DEFINE_config_file("config", DEMO_CONFIG, "Training config file (file.py[:arg]).",
                                              lock_config=True)
    _CONFIG_ERROR = None
except _CONFIG_OVERRIDE_ERRORS as e:  # reported in one line by parse_flags
    _CONFIG, _CONFIG_ERROR = None, e
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Checkpoints, TensorBoard events and eval.json.")


def prepare_synthetic_if_absent(config) -> None:
    """The demo's embedded dataset: written once under config.data.synthetic_dir."""
    from jclip_jax.data import synthetic

    root = config.data.synthetic_dir
    if jax.process_index() == 0 and not os.path.exists(os.path.join(root, "tokenizer.json")):
        print(f"preparing the synthetic dataset in {root} ...", flush=True)
        synthetic.write_synthetic(root, image_size=config.model.vision.image_size)
    if jax.process_count() > 1:  # the other processes read it only once process 0 has written it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jclip-train: synthetic dataset written")


def with_synthetic_paths(config):
    """Fill the data and eval paths left unset from config.data.synthetic_dir's splits."""
    config = config.copy_and_resolve_references()
    root, d, e = config.data.synthetic_dir, config.data, config.evals
    d.image_text_dir = d.image_text_dir or os.path.join(root, "train")
    d.tokenizer_path = d.tokenizer_path or os.path.join(root, "tokenizer.json")
    text_split = "triplets" if config.loss.stage == 3 else "text_pairs"
    d.text_dir = d.text_dir or os.path.join(root, text_split)
    e.image_text_dir = e.image_text_dir or os.path.join(root, "eval")
    e.text_pairs_dir = e.text_pairs_dir or os.path.join(root, "eval_text_pairs")
    return config


def check_paths_exist(config) -> None:
    """Every input path the config names, checked at once before any compute (local paths only)."""
    named = {"data.image_text_dir": config.data.image_text_dir, "data.text_dir": config.data.text_dir,
             "data.tokenizer_path": config.data.tokenizer_path, "init.checkpoint": config.init.checkpoint,
             "init.eva02": config.init.eva02, "init.jina_bert": config.init.jina_bert,
             "init.jina_embeddings_v3": config.init.get("jina_embeddings_v3"),
             "evals.image_text_dir": config.evals.image_text_dir, "evals.text_pairs_dir": config.evals.text_pairs_dir,
             **{f"data.image_text[{i}]": d for i, (d, _) in enumerate(config.data.get("image_text", ()))}}
    missing = [f"config.{k}={v!r}" for k, v in named.items()
               if v and "://" not in v and not v.startswith("tfds:") and not os.path.exists(v)]
    if missing:
        raise FileNotFoundError("these paths do not exist: " + ", ".join(missing))


def check_tokenizer(config) -> None:
    from jclip_jax.tokenizer import TextTokenizer

    tok = TextTokenizer(config.data.tokenizer_path)
    if tok.vocab_size > config.model.text.vocab_size:
        raise ValueError(f"tokenizer {config.data.tokenizer_path!r} has {tok.vocab_size} tokens, more than "
                         f"config.model.text.vocab_size={config.model.text.vocab_size}")
    if tok.pad_id != config.model.text.pad_token_id:
        raise ValueError(f"tokenizer pad id {tok.pad_id} != config.model.text.pad_token_id="
                         f"{config.model.text.pad_token_id}")


def initial_params(config, abstract_params):
    """Params for a run with no checkpoint in its workdir, as a flat {path: array} dict, or None (scratch).

    config.init.checkpoint: a jina-clip HF directory (config.json) or a previous stage's workdir;
    config.init.eva02 / jina_bert: pretrained towers (stage 1).
    """
    from jclip_jax.convert import towers
    from jclip_jax.convert.cli import read_weights

    init = config.init
    if init.checkpoint:
        if os.path.exists(os.path.join(init.checkpoint, "config.json")):
            model = JinaCLIP.from_pretrained(init.checkpoint)
            return hf_layout.flax_params(model), f"jina-clip directory {init.checkpoint}"
        saved_model = checkpoints.restore_config(init.checkpoint).model
        saved_params = nnx.state(nnx.eval_shape(lambda: JinaCLIP(saved_model, rngs=nnx.Rngs(0))), nnx.Param)
        check_same_model(saved_params, abstract_params, saved_model, config.model,
                         f"config.init.checkpoint={init.checkpoint!r}")
        params, step = checkpoints.restore_params(init.checkpoint, saved_params)  # at its own image size
        return params, f"step {step} of {init.checkpoint}"
    v3 = init.get("jina_embeddings_v3")
    if init.eva02 or init.jina_bert or v3:
        model = JinaCLIP(config.model, rngs=nnx.Rngs(config.seed))
        if init.eva02:
            towers.import_timm_eva02(model, read_weights(init.eva02), what=init.eva02)
        if init.jina_bert:
            towers.import_jina_bert_v2(model, read_weights(init.jina_bert), what=init.jina_bert)
        if v3:
            towers.import_jina_embeddings_v3(model, read_weights(v3), what=v3)
        text = f"jina_embeddings_v3={v3}" if v3 else f"jina_bert={init.jina_bert}"
        return hf_layout.flax_params(model), f"towers eva02={init.eva02} {text}"
    return None, "scratch"


def check_same_model(saved_params, params, saved_model, model, what: str) -> None:
    """Fail in one line, before anything is read, when a previous run's params do not fit this model
    (vision_model/pos_embed excepted: it is resampled to this image size), naming the first parameter
    whose shape differs and the model config fields that differ."""
    shapes = lambda state: {hf_layout.path_key(p): tuple(v.shape) for p, v in nnx.to_flat_state(state)}  # noqa: E731
    theirs, ours = shapes(saved_params), shapes(params)
    theirs.pop(("vision_model", "pos_embed"), None), ours.pop(("vision_model", "pos_embed"), None)
    if theirs == ours:
        return
    key = next(k for k in sorted(theirs.keys() | ours.keys()) if theirs.get(k) != ours.get(k))
    # Through JSON, as the saved config was (tuples become lists).
    fields = lambda c: train_config.flat_dict(json.loads(c.to_json_best_effort()))  # noqa: E731
    a, b = fields(saved_model), fields(model)
    differ = "; ".join(f"model.{k} {a.get(k)} there, {b.get(k)} here" for k in sorted(a.keys() | b.keys())
                       if a.get(k) != b.get(k) and k != "vision.image_size")
    raise ValueError(f"{what} holds another model: parameter {'/'.join(key)} is {theirs.get(key, 'absent')} there, "
                     f"{ours.get(key, 'absent')} in config.model" + (f" ({differ})" if differ else ""))


def load_initial_params(state, shardings, params, tx):
    """A fresh train state (new optimizer, step 0) around `params` (an nnx.State or flat dict)."""
    if isinstance(params, nnx.State):
        params = hf_layout.flat_values(params)
    params = resample_image_positions(params, state["params"])
    params = hf_layout.with_values(state["params"], params,
                                   what="config.init (does config.model match the initial weights?)")
    params = jax.device_put(params, shardings["params"])
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    return {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.zeros((), jnp.int32),
                                                                           shardings["step"])}


def resample_image_positions(params: dict, target_params) -> dict:
    """Initial weights from a run at another image size (the next stage of a multi-resolution recipe): their
    `vision_model/pos_embed` resampled to this model's grid (eva02.resample_pos_embed); other params as given."""
    from jclip_jax.models.eva02 import resample_pos_embed

    key = ("vision_model", "pos_embed")
    target = target_params["vision_model"]["pos_embed"]
    if key not in params or tuple(np.shape(params[key])) == tuple(target.shape):
        return params
    grid = int(round((target.shape[1] - 1) ** 0.5))
    print(f"jclip-train: resampling vision_model/pos_embed {tuple(np.shape(params[key]))} -> {tuple(target.shape)} "
          "for this image size", flush=True)
    return {**params, key: resample_pos_embed(np.asarray(params[key]), grid)}


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


def merged_text_lora(graphdef, params):
    """params (nnx.State) with every text LoRA delta folded into its base weight and lora_b zeroed."""
    from jclip_jax.models import lora

    model = nnx.merge(graphdef, params)
    lora.merge_lora(model)
    return nnx.state(model, nnx.Param)


def step_batch(batch: dict, tasks) -> dict:
    """The pipeline's {'image_text': ..., 'text': ...} -> the step's flat batch keys (train_step.py)."""
    out = {}
    if "image_text" in tasks:
        out["image"], out["image_caption"] = batch["image_text"]["image"], batch["image_text"]["text"]
    if "text_pair" in tasks:
        out["text_query"], out["text_passage"] = batch["text"]["query"], batch["text"]["positive"]
    if "text_triplet" in tasks:
        out["triplet_query"], out["triplet_positive"] = batch["text"]["query"], batch["text"]["positive"]
        out["triplet_negatives"] = batch["text"]["negatives"]
    return out


def train(config, workdir: str) -> dict:
    """Runs (or resumes) the config's training in `workdir`; returns the final evaluation."""
    with contextlib.ExitStack() as cleanup:  # the workdir lock is released however the run ends
        return _train(config, workdir, cleanup)


def _train(config, workdir: str, cleanup: contextlib.ExitStack) -> dict:
    if config.data.synthetic_dir:
        config = with_synthetic_paths(config)
    train_config.validate(config)  # before any compute
    distributed.initialize()  # several processes (hosts): before any backend use
    cleanup.enter_context(workdir_lock.hold(workdir, jax.process_index()))
    if config.data.synthetic_dir:
        prepare_synthetic_if_absent(config)
    check_paths_exist(config)
    check_tokenizer(config)
    preflight.check_data_dirs(config)
    tasks = losses.check_loss_config(config.loss)
    if note := train_config.warmup_note(config):
        print(f"jclip-train: {note}", flush=True)

    mesh = sharding.make_mesh(config.mesh)
    preflight.check_batch_split(config, mesh)
    mngr = checkpoints.manager(workdir, config.keep_checkpoints)
    if mngr.all_steps() and (saved := checkpoints.saved_config(mngr)) is not None:
        for change in train_config.resume_changes(saved, config):  # refuses incompatible ones
            print(f"jclip-train: resuming with {change}", flush=True)
    batch_axes = sharding.batch_axes(mesh)
    data_config = train_config.data_config(config)
    data_iterator = pipeline.train_iterator(data_config)

    run_optim = train_config.optim_for_run(config)
    tx, schedule = optim.make_optimizer(run_optim), optim.learning_rate_schedule(run_optim)
    graphdef, state, shardings = train_step.create_train_state(
        lambda: JinaCLIP(config.model, rngs=nnx.Rngs(config.seed)), tx, mesh)
    abstract_state = jax.eval_shape(lambda: state)
    sharding.check_replicated_fraction(shardings["params"], state["params"], mesh, config.max_replicated_fraction)

    restored, start = checkpoints.restore_latest_good(mngr, abstract_state, shardings, data_iterator)
    if restored is not None:
        state = restored
        origin = f"checkpoint at step {start} in {workdir}"
    else:
        params, origin = initial_params(config, abstract_state["params"])
        if params is not None:
            state = load_initial_params(state, shardings, params, tx)
        start = 0
        if config.get("text_lora") == "merged":  # fold the LoRA into the base weights once, at the start
            state["params"] = jax.device_put(merged_text_lora(graphdef, state["params"]), shardings["params"])
            origin += ", text LoRA merged"
    logging.info("starting at step %d from %s", start, origin)
    if jax.process_index() == 0:
        print(f"jclip-train: {origin}; steps {start} -> {config.total_steps} on mesh {dict(mesh.shape)}"
              + (f" over {jax.process_count()} processes" if jax.process_count() > 1 else ""), flush=True)

    step_fn = train_step.make_train_step(graphdef, tx, config.loss, mesh, shardings,
                                         micro_batches=config.micro_batches, schedule=schedule)
    step_fn = distributed.CompiledTogether(step_fn, "train_step")  # several processes: compiled by all, then run
    evaluator = Evaluator(config, graphdef, mesh, batch_axes)
    pairs_per_step = config.data.image_batch_size + (config.data.text_batch_size if config.data.text_dir else 0)
    flops_per_step = flops.train_step_flops(
        config.model, config.data.image_batch_size,
        config.data.text_batch_size if config.data.text_dir else 0, config.data.text_max_length,
        negatives_per_query=7 if "text_triplet" in tasks else 0)
    peak, peak_source = flops.peak_flops_per_device(config.peak_flops_per_device)
    writer = MetricsWriter(workdir, config.total_steps, start, flops_per_step, pairs_per_step,
                           peak * jax.device_count(), peak_source)
    writer.mixture_names = pipeline.image_text_source_names(data_config)
    preemption = distributed.Preemption()
    base_rng = jax.random.key(config.seed)

    step = start
    skipped_updates = 0  # a device scalar: counted without waiting for each step
    while step < config.total_steps:
        local = next_batch(data_iterator, lambda: preemption.requested)
        if local is None:
            raise StopWaitingForData(f"SIGTERM while waiting for data after step {step}: exiting without saving; "
                                     f"the newest checkpoint is step {mngr.latest_step()}")
        writer.count_skipped(int(local["image_text"]["decode_failures"]))
        writer.count_mixture(local["image_text"].get("source_counts"))
        batch = pipeline.make_global_batch(step_batch(local, tasks), mesh, batch_axes)
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
                checkpoints.save(mngr, step, state, data_iterator, config, force=preempted)
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save step at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except StopWaitingForData as e:
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


def parse_flags(argv):
    """absl's flag parsing, with config overrides that name no field or do not fit it (which
    ml_collections raises as KeyError/AttributeError/TypeError deep in the parser) reported in one line."""
    try:
        if _CONFIG_ERROR is not None:
            raise _CONFIG_ERROR
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"jclip-train: {e}", file=sys.stderr)
    except _CONFIG_OVERRIDE_ERRORS as e:
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        detail = str(e).strip("'\"")
        print(f"jclip-train: config override {' '.join(bad)}: no such field or a value that does not fit it "
              f"({type(e).__name__}: {detail})", file=sys.stderr)
    sys.exit(2)


def run():
    """Console-script entry point (absl parses --config / --workdir / --config.key=value)."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
