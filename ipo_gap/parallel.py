"""Runs a graph of tasks on worker processes, each pinned to one CPU core.

Why: the study's models are small (d_model 64-256), and XLA's CPU runtime keeps two cores only
partly busy on them. Measured on the 2-core VM (toy-s IPO step, batch 16): one process on both
cores does 31.9 steps/s; one process pinned to one core 29.6; two processes pinned to one core
each 30.7 + 28.3 = 59 steps/s together (1.85x). A toy-m step: 6.2 steps/s on both cores, 4.5 + 4.4
on one core each (1.44x). Independent stages (the toy-m SFT beside the golden PM, the nine
offline runs of the sweep beside each other, ...) therefore run side by side in workers.

Bits. XLA's CPU matmuls split their work by the number of threads, so a toy-m model trained on
one core differs from one trained on two in the last bits (toy-s does not). Every worker gets
exactly one core, whatever `jobs` is: a study gives the same bits with --jobs=1, 2 or 16, and
which worker runs a task, or in which order, does not matter. It differs in the last bits from
an in-process run (jobs=0) on a multi-core machine.

Protocol: a worker is `python -m ipo_gap.parallel CORE MODULE:FACTORY ARG_JSON RESULT_FD`. Its
first act, before anything imports JAX, is to pin itself to CORE (so XLA sizes its thread pool
to one core) and to ask the kernel to kill it if the parent dies (PR_SET_PDEATHSIG).
`FACTORY(*ARGS)` returns a function of a task name. The worker reads task names from stdin, one
per line, runs them in order and writes one JSON line per task to RESULT_FD: {"task", "ok",
"seconds"}, or {"task", "ok": false, "error": traceback}. Its stdout and stderr are the
parent's (progress lines of two workers interleave line by line; each names its run).

A task's work must be idempotent and file-backed (the study's stages are): a failed or killed
run is resumed by running the graph again, and finished tasks then cost a directory check.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Task:
    """A unit of work: its name (unique), the names of the tasks it needs, and the function
    that does it (called in a worker, by name, through the factory; `fn` may be None in the
    parent's copy of the graph)."""

    name: str
    after: tuple[str, ...] = ()
    fn: Callable[[], object] | None = None


def check_graph(tasks: Sequence[Task]) -> None:
    """Unique names, known dependencies and no cycle; a ValueError names the offender."""
    names = [t.name for t in tasks]
    seen = set()
    for n in names:
        if n in seen:
            raise ValueError(f"task {n!r} is defined twice")
        seen.add(n)
    for t in tasks:
        for a in t.after:
            if a not in seen:
                raise ValueError(f"task {t.name!r} needs {a!r}, which is not a task")
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    by_name = {t.name: t for t in tasks}

    def visit(n: str, path: list[str]):
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise ValueError(f"tasks depend on each other in a cycle: {' -> '.join(path + [n])}")
        state[n] = 1
        for a in by_name[n].after:
            visit(a, path + [n])
        state[n] = 2

    for n in names:
        visit(n, [])


def cores() -> list[int]:
    """The CPU cores this process may run on."""
    return sorted(os.sched_getaffinity(0))


def _pin_and_tie(core: int) -> None:
    """Runs in the worker before anything imports JAX: one core, and death with the parent
    (a killed study leaves no orphan worker training on)."""
    os.sched_setaffinity(0, {core})
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class TaskFailed(RuntimeError):
    """A task raised in its worker (the worker's traceback is in the message)."""


@dataclasses.dataclass
class _Worker:
    core: int
    proc: subprocess.Popen
    results: int  # read end of the result pipe
    buffer: bytes = b""
    task: str | None = None


def run(
    tasks: Sequence[Task],
    factory: str,
    args: Sequence = (),
    *,
    jobs: int,
    log: Callable[[str], None] = lambda s: print(s, flush=True),
) -> dict[str, float]:
    """Runs every task after the tasks it needs, on `jobs` workers of one core each.

    `tasks` is in priority order: a free worker takes the first task whose dependencies are
    done. `factory` ("module:function") and `args` (JSON-serialisable) build each worker's task
    runner. Returns the seconds each task took. On the first failure the other workers are
    stopped (their tasks resume on the next run) and TaskFailed names the task and carries
    its traceback.
    """
    check_graph(tasks)
    avail = cores()
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if jobs > len(avail):
        raise ValueError(
            f"jobs={jobs} but this process may run on {len(avail)} cores ({avail}): each worker "
            f"takes one core of its own"
        )
    jobs = min(jobs, len(tasks)) or 1
    pending = list(tasks)
    done: dict[str, float] = {}
    workers: list[_Worker] = []
    start = time.perf_counter()
    try:
        for core in avail[:jobs]:
            r, w = os.pipe()
            cmd = [sys.executable, "-m", "ipo_gap.parallel", str(core), factory]
            cmd += [json.dumps(list(args)), str(w)]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, pass_fds=(w,))
            os.close(w)
            workers.append(_Worker(core, proc, r))
        while pending or any(wk.task for wk in workers):
            for wk in workers:
                if wk.task is None:
                    ready = next((t for t in pending if all(a in done for a in t.after)), None)
                    if ready is None:
                        continue
                    pending.remove(ready)
                    wk.task = ready.name
                    try:
                        wk.proc.stdin.write((ready.name + "\n").encode())
                        wk.proc.stdin.flush()
                    except BrokenPipeError:  # it died before its first task (see its stderr)
                        raise TaskFailed(
                            f"worker on core {wk.core} exited (code {wk.proc.wait()}) before "
                            f"task {wk.task!r} could start"
                        ) from None
            busy = [wk for wk in workers if wk.task]
            if not busy:
                stuck = ", ".join(t.name for t in pending)
                raise RuntimeError(f"no task can start (unmet dependencies): {stuck}")
            readable, _, _ = select.select([wk.results for wk in busy], [], [])
            for wk in busy:
                if wk.results not in readable:
                    continue
                chunk = os.read(wk.results, 1 << 16)
                if not chunk:
                    code = wk.proc.wait()
                    raise TaskFailed(
                        f"worker on core {wk.core} exited (code {code}) with task {wk.task!r} "
                        "handed to it: in that task, or before it began, if the worker died "
                        "while starting (its traceback, if any, is in the job's stderr above)"
                    )
                wk.buffer += chunk
                while b"\n" in wk.buffer:
                    line, wk.buffer = wk.buffer.split(b"\n", 1)
                    res = json.loads(line)
                    if not res["ok"]:
                        raise TaskFailed(
                            f"task {res['task']!r} failed on core {wk.core}:\n{res['error']}"
                        )
                    done[res["task"]] = res["seconds"]
                    wk.task = None
                    log(
                        f"[parallel] {len(done)}/{len(tasks)} tasks done: {res['task']} "
                        f"({res['seconds']:.0f}s on core {wk.core}); "
                        f"{time.perf_counter() - start:.0f}s elapsed"
                    )
        return done
    finally:
        for wk in workers:
            if wk.proc.poll() is None:
                if wk.task is None:
                    wk.proc.stdin.close()  # a clean exit at end of input
                else:
                    wk.proc.kill()
            wk.proc.wait()
            os.close(wk.results)


def _worker_main(core: str, factory: str, args_json: str, result_fd: str) -> None:
    _pin_and_tie(int(core))
    module, _, fn = factory.partition(":")
    runner = getattr(importlib.import_module(module), fn)(*json.loads(args_json))
    with os.fdopen(int(result_fd), "w") as out:
        for line in sys.stdin:
            name = line.strip()
            t = time.perf_counter()
            try:
                runner(name)
                res = {"task": name, "ok": True, "seconds": time.perf_counter() - t}
            except BaseException:  # reported to the parent, which stops the graph
                res = {"task": name, "ok": False, "error": traceback.format_exc()}
            out.write(json.dumps(res) + "\n")
            out.flush()
            if not res["ok"]:
                return


if __name__ == "__main__":
    _worker_main(*sys.argv[1:5])
