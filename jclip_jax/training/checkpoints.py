"""Training checkpoints with orbax: params, optimizer state + step, data-iterator state, and the config.

    WORKDIR/checkpoints/<step>/{params, train, data, config, digest}

Saves are asynchronous (orbax copies device arrays to host, then writes in the background), keep the
newest `keep` steps, and restore into any mesh: the abstract target carries the shardings.
`params` is its own item so that a later stage (or `jclip-convert to-torch`) can take the params alone.

Integrity: orbax 0.12.8 / TensorStore checksum only the zarr3 shard index (crc32c), not the chunk data, so
a flipped byte in a params file restores silently as a wrong value. Each save therefore also writes
`digest`: a 32-bit hash of every array's bits (computed on device, independent of sharding) and whether it
is finite. `restore` recomputes it and raises CheckpointCorrupt on a mismatch; `restore_latest_good` then
falls back to the newest checkpoint that verifies and moves the bad ones to WORKDIR/checkpoints.corrupt/.

Could not read is not corrupt: a read that fails for a reason outside the checkpoint (a storage timeout, a
permission or network error, anything not recognised as damage) is retried with backoff (READ_RETRY_SECONDS)
and then stops the run with CheckpointUnreadable, moving nothing. Only a digest mismatch or a structurally
invalid file (TensorStore's DATA_LOSS, OUT_OF_RANGE, ...; bad JSON or msgpack) is CheckpointCorrupt. A
checkpoint without a digest is refused (CheckpointUnverified) unless JCLIP_ACCEPT_UNVERIFIED_CHECKPOINTS=1.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


# Orbax's replica-parallel save splits each replicated array into one slice per replica (so that several
# hosts or chips share its device-to-host copy), and each slice is a jax op compiled for its shape: about 160
# small compiles, 12 s of a demo run's first save on a CPU host, for arrays where splitting gains nothing.
# Only arrays whose per-replica slice would reach 4 MiB are split.
def _register_array_handler() -> None:
    absl_logger = logging.getLogger("absl")  # orbax warns that it overrides its default handler: intended
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=4 << 20), override=True)
    finally:
        absl_logger.setLevel(level)


_register_array_handler()


class CheckpointCorrupt(ValueError):
    """A checkpoint that cannot be read back as it was written; the message names the step and item."""


class CheckpointUnreadable(ValueError):
    """A checkpoint whose reading failed for another reason than its content, after retries; nothing moved."""


class CheckpointUnverified(ValueError):
    """A checkpoint without the digest to verify it (written before digests, or its digest item lost)."""


READ_RETRY_SECONDS = (1.0, 2.0, 4.0)  # waits between the attempts to read a checkpoint item
ACCEPT_UNVERIFIED_ENV = "JCLIP_ACCEPT_UNVERIFIED_CHECKPOINTS"
# TensorStore / gRPC status codes: a storage that cannot be reached now, or a file that is damaged.
_TRANSIENT_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "ABORTED",
                     "CANCELLED", "UNAUTHENTICATED")
_DAMAGE_STATUS = ("DATA_LOSS", "OUT_OF_RANGE", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND")
_TRANSIENT_TYPES = (PermissionError, TimeoutError, ConnectionError, InterruptedError, BlockingIOError)
_DAMAGE_TYPES = (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError, EOFError)


def _causes(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_damage(e: BaseException) -> bool:
    """True when a failed read shows the checkpoint itself is damaged; False for read errors (storage,
    network, permissions) and for anything not recognised as damage, which must not move a checkpoint."""
    chain = list(_causes(e))
    if any(isinstance(x, _TRANSIENT_TYPES) or any(s in str(x) for s in _TRANSIENT_STATUS) for x in chain):
        return False
    return any(isinstance(x, _DAMAGE_TYPES) or type(x).__module__.startswith("msgpack")
               or any(f"{s}:" in str(x) for s in _DAMAGE_STATUS) for x in chain)


def read_checkpoint(read, where: str):
    """read(), retried with backoff while it fails with a read error; CheckpointCorrupt (damage) or
    CheckpointUnreadable (still failing after the retries) in one line naming `where`."""
    for attempt, wait in enumerate((*READ_RETRY_SECONDS, None)):
        try:
            return read()
        except Exception as e:
            if is_damage(e):
                raise CheckpointCorrupt(f"{where} cannot be read: {one_line(e)}") from e
            if wait is None:
                raise CheckpointUnreadable(
                    f"{where} could not be read ({attempt + 1} attempts: {one_line(e)}); nothing was moved: rerun "
                    "once the storage reads again, or move that step away to resume from an earlier one") from e
            logging.getLogger(__name__).warning("%s: read failed (%s); retrying in %.0f s", where, one_line(e), wait)
            time.sleep(wait)


def check_digest(directory, step: int, where: str) -> bool:
    """Whether `step` has its digest item; without one, CheckpointUnverified unless accepted explicitly."""
    if _has_item(directory, step, "digest"):
        return True
    if os.environ.get(ACCEPT_UNVERIFIED_ENV) == "1":
        return False
    raise CheckpointUnverified(f"{where} has no digest to verify it against (written before digests, or its digest "
                               f"item was lost); to restore it unverified, set {ACCEPT_UNVERIFIED_ENV}=1")


def manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(_checkpoint_dir(workdir), options=options)


def _checkpoint_dir(workdir: str) -> str:
    path = os.path.join(workdir, "checkpoints")
    return path if "://" in path else os.path.abspath(path)


def abstract_with_shardings(abstract_tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def save(mngr: ocp.CheckpointManager, step: int, state: dict, data_iterator, config, force: bool = False,
         counters: dict | None = None) -> bool:
    """Save `state`, the data iterator's position, the config and the run's counters (skipped updates and
    records, mixture counts: a JSON dict that `restore_counters` returns) at `step`."""
    import grain

    train = {"opt_state": state["opt_state"], "step": state["step"]}
    items = dict(
        params=ocp.args.StandardSave(state["params"]),
        train=ocp.args.StandardSave(train),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        digest=ocp.args.JsonSave({"params": tree_digest(state["params"]), "train": tree_digest(train)}),
    )
    if counters is not None:
        items["counters"] = ocp.args.JsonSave(counters)
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: dict, shardings: dict, data_iterator) -> dict:
    """Restore the full train state (and the data iterator, in place) at `step`, verified against its digest.

    Raises CheckpointCorrupt (one line) when the checkpoint is damaged or does not match its digest,
    CheckpointUnreadable when reading it kept failing for another reason, CheckpointUnverified without a digest."""
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
    where = f"checkpoint step {step} in {mngr.directory}"
    has_digest = check_digest(mngr.directory, step, where)
    if has_digest:
        items["digest"] = ocp.args.JsonRestore()
    out = read_checkpoint(lambda: mngr.restore(step, args=ocp.args.Composite(**items)), where)
    verify(out["params"], out["digest"]["params"] if has_digest else None, f"{where}, item params")
    verify(out["train"], out["digest"]["train"] if has_digest else None, f"{where}, item train")
    return {"params": out["params"], "opt_state": out["train"]["opt_state"], "step": out["train"]["step"]}


def restore_counters(mngr: ocp.CheckpointManager, step: int) -> dict:
    """The counters saved with `step` ({} for a checkpoint written before they were saved)."""
    if not _has_item(mngr.directory, step, "counters"):
        return {}
    where = f"the counters saved with checkpoint step {step} in {mngr.directory}"
    return read_checkpoint(lambda: mngr.restore(step, args=ocp.args.Composite(counters=ocp.args.JsonRestore())),
                           where)["counters"]


def restore_latest_good(mngr: ocp.CheckpointManager, abstract_state: dict, shardings: dict, data_iterator,
                        report=print) -> tuple[dict | None, int | None]:
    """(state, step) of the newest checkpoint that restores and verifies; (None, None) if there is none.

    Newer bad checkpoints are reported (one line each) and moved to WORKDIR/checkpoints.corrupt/<step>, so
    the run re-saves those steps and keep-N rotation never counts them; if every checkpoint is bad, nothing
    is moved and CheckpointCorrupt names them all (starting over silently would lose the run).
    """
    bad = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            state = restore(mngr, step, abstract_state, shardings, data_iterator)
        except CheckpointCorrupt as e:
            report(f"jclip-train: {e}")
            bad.append(step)
            continue
        if bad:
            moved = quarantine(mngr, bad)
            report(f"jclip-train: falling back to checkpoint step {step}; moved the bad ones to {moved}")
        return state, step
    if bad:
        raise CheckpointCorrupt(f"no checkpoint in {mngr.directory} can be restored (steps {bad}, all bad); "
                                "move them away to start over")
    return None, None


def quarantine(mngr: ocp.CheckpointManager, steps) -> str:
    """Move checkpoint steps out of the manager's directory (to <dir>.corrupt/<step>-<time>); never deletes."""
    directory = epath.Path(mngr.directory)
    target = directory.parent / (directory.name + ".corrupt")
    if jax.process_index() == 0:
        target.mkdir(parents=True, exist_ok=True)
        for step in steps:
            (directory / str(step)).rename(target / f"{step}-{int(time.time())}")
    if jax.process_count() > 1:  # every host reloads after the move
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jclip_quarantine_checkpoints")
    mngr.reload()
    return os.fspath(target)


def _has_item(directory, step: int, item: str) -> bool:
    return (epath.Path(directory) / str(step) / item).exists()


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line of at most ~`limit` characters: its start and its end (the OS error of a
    TensorStore failure is at the end)."""
    text = f"{type(e).__name__}: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]}"


# ------------------------------------------------------------------------------------------------ digests


def _mix32(x: jax.Array) -> jax.Array:
    """A bijective 32-bit integer hash (lowbias32): every input bit affects every output bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _bits32(x: jax.Array) -> jax.Array:
    """Any array -> uint32 words of its bits (8-byte elements give a trailing axis of 2)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size < 4:
        return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _leaf_digest(x: jax.Array) -> jax.Array:
    """uint32 (2,): [hash of the bits and positions, all finite (1) or not (0)] of one array.

    Wrapping uint32 sums are exact and order-free, so the value does not depend on the sharding or on
    how XLA splits the reduction; positions enter through broadcasted iotas (no reshape, no gathering).
    """
    bits = _bits32(jnp.asarray(x))
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    digest = jnp.sum(_mix32(bits ^ _mix32(index + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.stack([digest, finite.astype(jnp.uint32)])


# Jitted per array rather than over the whole tree: the compiled programs are shared by every array of the
# same shape, dtype and sharding (params, Adam's mu and nu, the check at restore), so the optimizer state
# adds no compiles; one program per tree was a separate multi-second compile for each tree on a CPU host.
_leaf_digest_jit = jax.jit(_leaf_digest)


def _scalar(x) -> np.ndarray:
    return np.asarray(x.addressable_shards[0].data if isinstance(x, jax.Array) else x)


def tree_digest(tree) -> dict[str, list]:
    """{keystr(path): [uint32 digest, finite]} of every array of a pytree (state, params)."""
    out = jax.tree_util.tree_leaves_with_path(jax.tree.map(_leaf_digest_jit, tree))
    return {jax.tree_util.keystr(path): [int(v[0]), bool(v[1])] for path, v in
            ((path, _scalar(x)) for path, x in out)}


def verify(tree, saved: dict | None, where: str) -> None:
    """Raise CheckpointCorrupt naming the first array whose digest differs from `saved` (or is not finite)."""
    got = tree_digest(tree)
    if saved is not None:
        if set(got) != set(saved):
            raise CheckpointCorrupt(f"{where}: arrays {sorted(set(got) ^ set(saved))[:3]} differ from its digest")
        for path, (digest, _) in got.items():
            if digest != saved[path][0]:
                raise CheckpointCorrupt(f"{where}: {path} does not match the digest written at save time")
    for path, (_, finite) in got.items():
        if not finite:
            raise CheckpointCorrupt(f"{where}: {path} holds NaN or Inf")
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
        items = dict(params=ocp.args.StandardRestore(target))
        where = f"checkpoint step {step} in {mngr.directory}"
        has_digest = check_digest(mngr.directory, step, where)
        if has_digest:
            items["digest"] = ocp.args.JsonRestore()

        def read():
            try:
                return mngr.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:
                if "shape" in str(e).lower() or "strict" in str(e):  # a model mismatch, not damage
                    raise ValueError(f"{where}: {one_line(e)}") from e
                raise

        out = read_checkpoint(read, where)
        verify(out["params"], out["digest"]["params"] if has_digest else None, f"{where}, item params")
    return out["params"], step


def restore_config(workdir: str) -> ml_collections.ConfigDict:
    """The training config saved with a workdir's latest checkpoint."""
    step = latest_step(workdir)
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')!r}")
    with ocp.CheckpointManager(_checkpoint_dir(workdir)) as mngr:
        out = read_checkpoint(lambda: mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())),
                              f"the config saved with checkpoint step {step} in {mngr.directory}")
    return ml_collections.ConfigDict(out["config"])


def saved_config(mngr: ocp.CheckpointManager) -> dict | None:
    """The config (a JSON dict) saved with the newest checkpoint; None without checkpoints. One that cannot be
    read refuses the resume (ValueError, one line): the run could not be checked against it."""
    steps = mngr.all_steps()
    if not steps:
        return None
    step = max(steps)
    where = f"the config saved with checkpoint step {step} in {mngr.directory}"
    try:
        return read_checkpoint(
            lambda: mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"], where)
    except (CheckpointCorrupt, CheckpointUnreadable) as e:
        raise ValueError(f"{e}; the resume cannot be checked against it, so it is refused (move that step "
                         "away to resume from an earlier one)") from e
