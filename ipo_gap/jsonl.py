"""Files the study rewrites or resumes from: atomic writes, and JSON-lines reads that know
a kill can cut the last line of a file being appended to."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import BinaryIO

from ipo_gap import hosts


def write_file_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Calls `write` on a fresh temporary file beside `path`, syncs it and renames it over
    `path`: a reader (or a kill) sees the old file or the new one, never part of either. The
    temporary name is unique, so two processes writing one path never mix their bytes.

    In a multi-host job only process 0 writes, and every process waits until the file is
    there (`hosts`): all of them may read it next.
    """
    path = os.fspath(path)
    if hosts.is_writer():
        replace_file(path, write)
    hosts.sync(f"write {path}")


def replace_file(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """`write_file_atomic` in this process alone (no multi-host barrier): `write` fills a
    fresh, uniquely named temporary file beside `path`, which is synced and renamed over
    `path`; on an error the temporary file is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically (`write_file_atomic`)."""
    write_file_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rewrites a JSON-lines file atomically (one JSON object per line)."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_row(path: str | os.PathLike, row: dict) -> None:
    """Appends one JSON line to `path` (process 0 only: `hosts.open_on_writer`). A kill can
    cut the line; `read_rows(..., cut_tail_ok=True)` drops a cut last line."""
    out = hosts.open_on_writer(path, "a")
    if out is not None:
        with out:
            out.write(json.dumps(row) + "\n")
            out.flush()
            os.fsync(out.fileno())  # durable before the checkpoint that follows it


def read_rows(path: str | os.PathLike, *, cut_tail_ok: bool = False) -> list[dict]:
    """The rows of a JSON-lines file ([] when it does not exist).

    cut_tail_ok: a last line that is not valid JSON was cut by a kill during an append, and
    is dropped (its step is redone on resume). Any other bad line is an error naming the
    file and line: the file was damaged, and nothing should resume from it.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if cut_tail_ok and i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line ({e.msg}): {line[:80]!r}") from e
    return rows
