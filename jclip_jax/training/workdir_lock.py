"""One training run per workdir: an exclusive lock file, refused in one line to a second process.

    with workdir_lock.hold(workdir):       # WORKDIR/locks/process_<i>.lock, held for the whole run
        ...

The lock is `fcntl.flock` on a file in the workdir: the kernel drops it when the process ends (killed
included), so a crashed run never leaves a stale lock behind. It works on local disks and on NFS v4 (flock
is mapped to POSIX locks there). Object stores (`gs://`, `s3://`) have no locks: such workdirs are not
locked and a warning says so; there, keep one job per workdir in the scheduler. Each process of a
multi-host run locks its own file (`process_<index>`), so the hosts of one run never block each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time

from absl import logging


class WorkdirInUse(RuntimeError):
    """Another live process holds this workdir's lock."""


@contextlib.contextmanager
def hold(workdir: str, process_index: int = 0):
    """Hold WORKDIR/locks/process_<index>.lock for the duration of the block; WorkdirInUse if taken."""
    workdir = os.fspath(workdir)
    if "://" in workdir:
        logging.warning("workdir %s is on an object store: it cannot be locked against a second run", workdir)
        yield None
        return
    lock_dir = os.path.join(workdir, "locks")
    os.makedirs(lock_dir, exist_ok=True)
    path = os.path.join(lock_dir, f"process_{process_index}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            raise WorkdirInUse(f"workdir {workdir!r} is in use by another jclip-train ({holder}); "
                               "wait for it to finish or choose another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock
