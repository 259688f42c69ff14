"""Multi-host runs: every process computes the study's files, process 0 writes them.

A multi-host job (`sharding.initialize_distributed`) runs the same program on every process
(SPMD): every process holds the same host-side values (batches, judgements, summaries), so the
files they would write are identical. Process 0 writes them; the others skip the write and
wait at a barrier (`sync`) until it is done, so that a file written by one stage is there for
every process to read in the next. The work directory must therefore be a filesystem that all
hosts share (as orbax's multi-host checkpoints require too). Orbax checkpoints are written by
all processes together (each its own shards), not through this module.

If process 0 fails, the others are left at a barrier until JAX's coordination service notices
that a process of the job is gone and stops them: a multi-host job fails as a whole.

On one process (`jax.distributed` not initialised, or JAX not imported) `is_writer()` is True
and `sync` does nothing, so single-host runs and the parallel CPU workers
(`ipo_gap.parallel`, one process each) are unaffected.
"""

from __future__ import annotations

import sys


def _jax():
    return sys.modules.get("jax")  # None: JAX not imported, so not a multi-process job


def process_index() -> int:
    jax = _jax()
    return jax.process_index() if jax is not None else 0


def process_count() -> int:
    jax = _jax()
    return jax.process_count() if jax is not None else 1


def is_writer() -> bool:
    """True on the one process that writes the study's (non-orbax) files: process 0."""
    return process_index() == 0


def say(message: str, stream=None) -> None:
    """Prints a progress line, on process 0 only: every process runs the same program, so the
    others would print the same line once more each."""
    if is_writer():
        print(message, file=stream if stream is not None else sys.stdout, flush=True)


def open_on_writer(path, mode: str = "a"):
    """`open(path, mode)` on process 0; None on the others, and when `path` is None or "".
    Appended files (metrics, evaluations) have one writer per multi-host job."""
    if not path or not is_writer():
        return None
    return open(path, mode)  # noqa: SIM115 (the caller closes it)


def sync(name: str) -> None:
    """A barrier across all processes of a multi-host job (no-op on one process). Every process
    must reach the barriers in the same order with the same names: a process that took another
    path is reported by JAX as a mismatch, not left to deadlock silently."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def remove(path) -> None:
    """Deletes a file or a directory tree (process 0 only, then a barrier; see `sync`).

    `path`: a string, a `pathlib.Path`, or an `etils.epath.Path` (orbax's paths, which may be
    remote: they are deleted through their own `rmtree`/`unlink`)."""
    import pathlib
    import shutil

    if not hasattr(path, "is_dir"):
        path = pathlib.Path(path)
    if is_writer():
        if not path.is_dir():
            path.unlink()
        elif hasattr(path, "rmtree"):  # epath
            path.rmtree()
        else:
            shutil.rmtree(path)
    sync(f"remove {path}")


def listed(paths) -> list:
    """`sorted(paths)` (e.g. of a `Path.glob`), agreed by every process: each lists, then all
    meet at a barrier before anyone may delete one of them. Without it, process 0 could
    remove the first entry before another process has listed the directory, and the two
    would then disagree on which barriers follow."""
    out = sorted(paths, key=str)
    sync("listed " + " ".join(str(p) for p in out))
    return out


def exists(path) -> bool:
    """`os.path.exists(path)` as process 0 sees it, on every process: all meet at a barrier
    (so process 0 cannot create or delete `path` between one process's look and another's;
    only process 0 writes) and take process 0's answer, which a shared filesystem's
    attribute cache could otherwise make differ on another host, sending it down another
    branch to other barriers. Use it wherever a look decides whether to write."""
    import os

    found = os.path.exists(path)
    sync(f"exists {path}")
    if process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        found = bool(multihost_utils.broadcast_one_to_all(np.int32(found)))
    return found
