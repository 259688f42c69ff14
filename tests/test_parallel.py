"""ipo_gap.parallel: a task graph on one-core worker processes (fake tasks, no JAX)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import time

import pytest

from ipo_gap import parallel
from ipo_gap.parallel import Task

HERE = pathlib.Path(__file__).resolve().parent
TWO_CORES = pytest.mark.skipif(len(parallel.cores()) < 2, reason="needs 2 CPU cores")


def fake_tasks(outdir: str, together=()):
    """A worker's runner (the factory `test_parallel:fake_tasks`): each task records its
    process, affinity and time span; "boom" raises, "die" kills its worker. Each task named
    in `together` waits (up to 60 s) until all of them have started and records whether they
    all had: only tasks run at the same time can. (A fixed sleep made that a race of the
    workers' start-up times, which a loaded machine can draw apart by more than the sleep.)"""
    out = pathlib.Path(outdir)

    def run(name: str):
        start = time.monotonic()  # system-wide on Linux: comparable across the workers
        if name.startswith("boom"):
            raise ValueError(f"{name} went off")
        if name == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        met = None
        if name in together:
            (out / f"{name}.started").touch()
            deadline = time.monotonic() + 60
            while not (met := all((out / f"{t}.started").exists() for t in together)):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        time.sleep(0.4)
        rec = {
            "pid": os.getpid(),
            "cores": sorted(os.sched_getaffinity(0)),
            "start": start,
            "end": time.monotonic(),
            "met": met,
        }
        with open(out / f"{name}.json", "x") as f:  # "x": a task that ran twice fails here
            json.dump(rec, f)

    return run


@pytest.fixture
def on_path(monkeypatch):
    """Workers import this module by name."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))


def _records(d: pathlib.Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in d.glob("*.json")}


GRAPH = [
    Task("a"),
    Task("b"),
    Task("c", ("a",)),
    Task("d", ("a", "b")),
    Task("e", ("c", "d")),
    Task("f", ("b",)),
]


@TWO_CORES
def test_tasks_run_once_after_their_dependencies_on_one_core_each(tmp_path, on_path):
    seconds = parallel.run(GRAPH, "test_parallel:fake_tasks", [str(tmp_path), "ab"], jobs=2)
    recs = _records(tmp_path)
    assert set(recs) == set(seconds) == {t.name for t in GRAPH}
    for t in GRAPH:
        for a in t.after:
            assert recs[a]["end"] <= recs[t.name]["start"], (a, t.name)
    pids = {r["pid"] for r in recs.values()}
    assert len(pids) == 2  # two long-lived workers served all six tasks
    by_pid = {r["pid"]: r["cores"] for r in recs.values()}
    assert all(len(c) == 1 for c in by_pid.values())  # pinned to one core each
    assert len({c[0] for c in by_pid.values()}) == 2  # different cores
    # a and b need nothing: the two workers run them at the same time.
    assert recs["a"]["met"] and recs["b"]["met"]
    assert recs["a"]["pid"] != recs["b"]["pid"]


def test_one_worker_runs_the_graph_in_priority_order(tmp_path, on_path):
    parallel.run(GRAPH, "test_parallel:fake_tasks", [str(tmp_path)], jobs=1)
    recs = _records(tmp_path)
    order = sorted(recs, key=lambda n: recs[n]["start"])
    assert order == ["a", "b", "c", "d", "e", "f"]  # first ready task in list order
    assert len({r["pid"] for r in recs.values()}) == 1


def test_a_failing_task_stops_the_graph_and_names_itself(tmp_path, on_path):
    graph = [Task("a"), Task("boom", ("a",)), Task("after_boom", ("boom",))]
    with pytest.raises(parallel.TaskFailed, match="'boom' failed") as err:
        parallel.run(graph, "test_parallel:fake_tasks", [str(tmp_path)], jobs=1)
    assert "ValueError: boom went off" in str(err.value)  # the worker's traceback
    assert set(_records(tmp_path)) == {"a"}  # nothing that needs the failed task ran


def test_a_killed_worker_is_reported_with_its_task(tmp_path, on_path):
    with pytest.raises(
        parallel.TaskFailed, match=r"exited \(code -9\) with task 'die' handed to it"
    ):
        parallel.run([Task("die")], "test_parallel:fake_tasks", [str(tmp_path)], jobs=1)


def test_bad_graphs_and_job_counts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'x' is defined twice"):
        parallel.check_graph([Task("x"), Task("x")])
    with pytest.raises(ValueError, match="'y' needs 'z', which is not a task"):
        parallel.check_graph([Task("y", ("z",))])
    with pytest.raises(ValueError, match="cycle: p -> q -> p"):
        parallel.check_graph([Task("p", ("q",)), Task("q", ("p",))])
    n = len(parallel.cores())
    with pytest.raises(ValueError, match=f"jobs={n + 1} but this process may run on {n} cores"):
        parallel.run([Task("a")], "test_parallel:fake_tasks", [str(tmp_path)], jobs=n + 1)


def broken_factory(outdir: str):
    raise RuntimeError(f"no runner for {outdir}")


def test_a_worker_that_cannot_start_is_reported(tmp_path, on_path):
    with pytest.raises(parallel.TaskFailed, match=r"worker on core \d+ exited \(code 1\)"):
        parallel.run([Task("a")], "test_parallel:broken_factory", [str(tmp_path)], jobs=1)
