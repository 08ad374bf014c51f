"""Training checkpoints with orbax: params, optimizer state + step, data-iterator state, and the config.

    WORKDIR/checkpoints/<step>/{params, train, data, config}

Saves are asynchronous (orbax copies device arrays to host, then writes in the background), keep the
newest `keep` steps, and restore into any mesh: the abstract target carries the shardings.
`params` is its own item so that a later stage (or `jclip-convert to-torch`) can take the params alone.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp


def manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(_checkpoint_dir(workdir), options=options)


def _checkpoint_dir(workdir: str) -> str:
    path = os.path.join(workdir, "checkpoints")
    return path if "://" in path else os.path.abspath(path)


def abstract_with_shardings(abstract_tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def save(mngr: ocp.CheckpointManager, step: int, state: dict, data_iterator, config, force: bool = False) -> bool:
    import grain

    items = dict(
        params=ocp.args.StandardSave(state["params"]),
        train=ocp.args.StandardSave({"opt_state": state["opt_state"], "step": state["step"]}),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
    )
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: dict, shardings: dict, data_iterator) -> dict:
    """Restore the full train state (and the data iterator, in place) at `step`."""
    import grain

    items = dict(
        params=ocp.args.StandardRestore(abstract_with_shardings(abstract_state["params"], shardings["params"])),
        train=ocp.args.StandardRestore(abstract_with_shardings(
            {"opt_state": abstract_state["opt_state"], "step": abstract_state["step"]},
            {"opt_state": shardings["opt_state"], "step": shardings["step"]})),
    )
    if data_iterator is not None:
        check_data_state_processes(mngr, step)
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    out = mngr.restore(step, args=ocp.args.Composite(**items))
    return {"params": out["params"], "opt_state": out["train"]["opt_state"], "step": out["train"]["step"]}


def check_data_state_processes(mngr: ocp.CheckpointManager, step: int) -> None:
    """A one-line error unless `step`'s data-iterator state was saved by as many processes as this run has.

    grain saves one iterator state per process (data/process_<i>-of-<n>.json): positions in that process's
    rows, which drift apart once a process replaces undecodable records, so they are not re-split here.
    Params and optimizer state restore into any process count and mesh.
    """
    import re

    from etils import epath

    names = [p.name for p in (epath.Path(mngr.directory) / str(step) / "data").glob("process_*-of-*.json")]
    counts = {int(m.group(1)) for m in (re.fullmatch(r"process_\d+-of-(\d+)\.json", n) for n in names) if m}
    if counts and counts != {jax.process_count()}:
        saved = ", ".join(map(str, sorted(counts)))
        raise ValueError(
            f"checkpoint {step} in {mngr.directory} holds the data-iterator state of {saved} process(es); this "
            f"run has {jax.process_count()}: resuming with another process count is not supported (grain's "
            f"per-process iterator state cannot be re-split). Resume with {saved} process(es), or start a new "
            f"workdir from its weights with --config.init.checkpoint")


def latest_step(workdir: str) -> int | None:
    path = _checkpoint_dir(workdir)
    if "://" not in path and not os.path.isdir(path):
        return None
    with ocp.CheckpointManager(path) as mngr:
        return mngr.latest_step()


def restore_params(workdir: str, abstract_params, shardings=None, step: int | None = None):
    """The params of a workdir's latest (or given) checkpoint (stage chaining and export)."""
    step = latest_step(workdir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')!r}")
    if shardings is None:  # the saved shardings name the saving run's devices, absent under another process count
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_params)
    target = abstract_with_shardings(abstract_params, shardings)
    with ocp.CheckpointManager(_checkpoint_dir(workdir)) as mngr:
        out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    return out["params"], step


def restore_config(workdir: str) -> ml_collections.ConfigDict:
    """The training config saved with a workdir's latest checkpoint."""
    step = latest_step(workdir)
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')!r}")
    with ocp.CheckpointManager(_checkpoint_dir(workdir)) as mngr:
        out = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(out["config"])
