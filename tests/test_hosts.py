"""ipo_gap.hosts: one writer per multi-host job, the same barriers on every process.

The multi-process behaviour end to end is tests/test_multihost.py (slow, two real processes).
These tests pin the contract that keeps such a job from deadlocking: a process that does not
write still meets the writer at a barrier of the same name, and reading a file's existence
is agreed before anyone may change it. `process_index`/`process_count` are replaced to play
process 1 of 2; `sync` records the barrier names instead of calling JAX.
"""

import pytest

from ipo_gap import hosts, jsonl


@pytest.fixture
def barriers(monkeypatch):
    names = []
    monkeypatch.setattr(hosts, "sync", names.append)
    return names


def play(monkeypatch, index, count=2):
    monkeypatch.setattr(hosts, "process_index", lambda: index)
    monkeypatch.setattr(hosts, "process_count", lambda: count)


def test_one_process_writes_and_needs_no_barrier(tmp_path):
    assert hosts.process_count() == 1 and hosts.is_writer()
    hosts.sync("a no-op on one process")
    path = tmp_path / "a.json"
    jsonl.write_atomic(path, "{}")
    assert path.read_text() == "{}" and hosts.exists(path)
    hosts.remove(path)
    assert not path.exists()


@pytest.mark.parametrize("index", [0, 1])
def test_writer_and_reader_meet_at_the_same_barriers(tmp_path, monkeypatch, barriers, index):
    play(monkeypatch, index)
    path, tree = tmp_path / "done.json", tmp_path / "state"
    tree.mkdir()
    snaps = [tree / "step_2", tree / "step_10"]
    for s in snaps:
        s.mkdir()
    assert hosts.exists(tree)
    jsonl.write_atomic(path, '{"step": 3}')
    for snap in hosts.listed(tree.glob("step_*")):  # listed by all before any is deleted
        hosts.remove(snap)
    hosts.remove(tree)
    # Process 0 writes and deletes; process 1 leaves the disk alone. Both pass the same
    # barriers in the same order, so neither waits for a barrier the other never reaches.
    assert path.exists() == (index == 0)
    assert tree.exists() == (index != 0)
    listing = f"listed {snaps[1]} {snaps[0]}"  # sorted by name: step_10 < step_2
    assert barriers == [
        f"exists {tree}",
        f"write {path}",
        listing,
        f"remove {snaps[1]}",
        f"remove {snaps[0]}",
        f"remove {tree}",
    ]
    assert list(tmp_path.glob("*.tmp")) == []


def test_a_failed_write_leaves_no_temporary_and_passes_no_barrier(tmp_path, barriers):
    def boom(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        jsonl.write_file_atomic(tmp_path / "x.npz", boom)
    assert list(tmp_path.iterdir()) == [] and barriers == []


def test_remove_takes_orbax_epath_paths(tmp_path):
    # orbax's directories are etils.epath paths (possibly remote); rollback deletes its
    # unfinished saves through hosts.remove, so remove must take them as they are.
    from etils import epath

    tree = epath.Path(tmp_path) / "ckpt.orbax-checkpoint-tmp-7"
    (tree / "inner").mkdir(parents=True)
    (tree / "inner" / "data").write_text("x")
    file = epath.Path(tmp_path) / "loose.json"
    file.write_text("{}")
    hosts.remove(tree)
    hosts.remove(file)
    hosts.remove(str(tmp_path))  # a plain string names a directory tree too
    assert not tmp_path.exists()


@pytest.mark.parametrize("index", [0, 1])
def test_progress_and_appended_files_on_the_writer_only(tmp_path, monkeypatch, capsys, index):
    from ipo_gap.train.loop import Progress

    play(monkeypatch, index)
    progress = Progress(3, "online_ipo")
    for step in range(3):
        progress.update(step, 0.5, force=True)
    hosts.say("[sft] done already: skipped")
    out = hosts.open_on_writer(tmp_path / "metrics.jsonl")
    if out is not None:
        with out:
            out.write("{}\n")
    printed = capsys.readouterr().out.splitlines()
    if index == 0:
        assert printed[0].startswith("[online_ipo] step 1/3  loss 0.5000  (first step")
        assert "steps/s  ETA" in printed[2] and printed[-1] == "[sft] done already: skipped"
        assert len(printed) == 4 and (tmp_path / "metrics.jsonl").read_text() == "{}\n"
    else:  # every process runs the same program: the others would print the same lines
        assert printed == [] and out is None and not (tmp_path / "metrics.jsonl").exists()
    assert hosts.open_on_writer(None) is None and hosts.open_on_writer("") is None


@pytest.mark.parametrize("index", [0, 1])
def test_append_row_writes_on_process_zero_only(tmp_path, monkeypatch, index):
    from ipo_gap import jsonl

    play(monkeypatch, index)
    path = tmp_path / "evals.jsonl"
    jsonl.append_row(path, {"step": 1, "win_rate": 0.5})
    jsonl.append_row(path, {"step": 2, "win_rate": 0.25})
    if index == 0:
        assert jsonl.read_rows(path) == [
            {"step": 1, "win_rate": 0.5},
            {"step": 2, "win_rate": 0.25},
        ]
    else:
        assert not path.exists()


def test_progress_reads_a_clock_that_has_not_moved(monkeypatch, capsys):
    """Two updates that read the same time (a coarse clock; the wall clock at today's epoch
    resolves only ~0.2 us): the rate and ETA are then unknown (?), not a ZeroDivisionError."""
    import types

    from ipo_gap.train import loop

    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: 12.0))
    progress = loop.Progress(3, "sft")
    progress.update(0, 0.5)
    progress.update(1, 0.5, force=True)
    out = capsys.readouterr().out
    assert out.splitlines()[-1].endswith("loss 0.5000  ? steps/s  ETA ?"), out
