"""The data-order log: every training batch, in order, hash-chained, replayable bit-exactly.

The tandem identity (offline training on the online run's data stream = the online run) holds
only if the replay feeds exactly the logged bytes in exactly the logged order. `OrderLog`
records that stream and proves it on the way back: each step's batch is stored, hashed and
chained to the previous step, and every replay path re-hashes what it reads.

Layout of a log directory (zarr v2 arrays, file kvstore, axis 0 = step)::

    meta.json            tokenizer_sha256, schema, batch_size, chunking + the caller's meta
    meta.json.sha256     SHA-256 (hex) of meta.json's bytes, checked by `open`
    fields/<name>/       one array per field, [steps, batch_size, *per-example shape]
    field_hash/          uint8 [steps, n_fields, 32], SHA-256 of each field's record
    hash/                uint8 [steps, 32], the chain hash; all zeros = not committed

Canonical hash (chain version 1; directory format 2 keeps it). For a field `name` holding
array `a` (native little-endian, the schema's dtype, C order) the record is::

    rec(name, a) = u32(len(n)) n u32(len(d)) d u32(a.ndim) u64(a.shape[0]) ... a.tobytes("C")

with n = name as UTF-8, d = `a.dtype.name` as ASCII ("int32", "float32", "bool"), u32/u64
little-endian unsigned. The batch's bytes are the records of all fields in sorted name order
(Python string order), and with `||` for concatenation::

    field_hash[t, i] = sha256(rec(name_i, a_i))
    hash_t           = sha256(hash_{t-1} || rec(name_0, a_0) || rec(name_1, a_1) || ...)
    hash_{-1}        = sha256(b"ipo_gap.order_log.v1\\0" || tokenizer_sha256 as ASCII hex)

so the chain commits to the vocabulary too: the same ids under another tokenizer never verify.
The per-field hashes only locate damage; the chain hash is what is checked.

The chain covers the data stream and the tokenizer only, not the rest of meta.json (the
configs and seeds of the run that wrote it): two runs that logged the same batches have the
same chain hashes, which is how `ipo_gap.determinism.compare_logs` compares them. meta.json
is protected by its own checksum instead: `meta.json.sha256` holds the SHA-256 of its exact
bytes, and `open` refuses a log whose meta.json no longer matches it (an edit, a copy from
another run), naming both digests. Format 1 logs (before the checksum) open without one.

Crash safety. `append` grows the arrays to step+1, writes the data, then the field hashes,
and the chain hash LAST. The log's length is the number of leading steps with a non-zero
chain hash, so a step cut off before its hash landed (a torn tail) is not part of the log:
`open` ignores it and the next `append` at that step clears and rewrites it. `truncate` zeros
the first dropped hash row before anything else, so a crash mid-truncate never leaves a log
longer than the original. The order also holds across a power loss: tensorstore's file driver
syncs every write to disk before the write completes (the `file_io_sync` context resource,
set explicitly here), each write is waited for before the next is issued, and meta.json and its
checksum are written to a temporary file, synced, renamed into place and the directory synced.

Multi-host writing. Rows are chunked along the batch axis by `batch_chunk`, so processes can
write disjoint, chunk-aligned row ranges of one step at once::

    log.append_slice(t, my_rows, start, stop)   # every process, its own rows
    barrier()                                   # the caller's job (e.g. sync_global_devices)
    if process_index == 0: log.commit_step(t)   # hashes the stored rows, writes hash last
    barrier()                                   # before anyone appends step t+1

`commit_step` hashes whatever is stored: a row range nobody wrote reads as zeros, so the
first barrier is what guarantees completeness. After a restart, process 0 calls
`truncate(checkpoint_step)` (which also clears a torn tail) before the others write.
`append` (all rows + commit) is for a single writer and trusts its cached length;
`append_slice` and `commit_step` re-read the length from disk each call.

Hosts are assumed little-endian (every JAX platform is); dtypes are bool, ints and floats.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorstore as ts

from ipo_gap import jsonl

FORMAT = "ipo_gap.order_log"
FORMAT_VERSION = 2  # 2: meta.json.sha256 (the chain's bytes are those of format 1)
_READABLE_VERSIONS = (1, 2)
_GENESIS_TAG = b"ipo_gap.order_log.v1\0"
_RESERVED = (
    "format",
    "format_version",
    "schema",
    "batch_size",
    "batch_chunk",
    "steps_per_chunk",
    "code_version",
)


@functools.cache
def code_version() -> dict[str, Any]:
    """Which code wrote a log: the installed ipo_gap version and, when the package lies in a
    git checkout, its commit and whether the working tree had uncommitted changes (None
    where git or the checkout is absent)."""
    try:
        version = importlib.metadata.version("ipo_gap")
    except importlib.metadata.PackageNotFoundError:
        version = None
    root = pathlib.Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "ipo_gap": version,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
    }


_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

if sys.byteorder != "little":  # The canonical record is the in-memory bytes.
    raise ImportError("ipo_gap.data.order_log assumes a little-endian host")


class OrderLogError(Exception):
    """An order log cannot be created, opened, written or replayed as asked.

    Attributes:
        step: the step concerned (the first bad or missing one), when there is one.
        field: the field found altered or different, when one could be named.
    """

    def __init__(self, message: str, *, step: int | None = None, field: str | None = None):
        super().__init__(message)
        self.step, self.field = step, field


class ReplayError(OrderLogError):
    """A logged step does not match its recorded hash, is missing, or the tokenizer differs."""


class DeterminismError(OrderLogError):
    """A regenerated batch differs from the logged one (`compare_step`)."""


def pair_schema(prompt_len: int, target_len: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The preference-pair schema: prompt, y_w, y_l (+ masks), judge_prob, logp_w, logp_l."""
    schema = dict.fromkeys(("prompt", "prompt_mask"), ("int32", (prompt_len,)))
    schema.update(dict.fromkeys(("y_w", "y_w_mask", "y_l", "y_l_mask"), ("int32", (target_len,))))
    schema.update(dict.fromkeys(("judge_prob", "logp_w", "logp_l"), ("float32", ())))
    return schema


def genesis_hash(tokenizer_sha256: str) -> bytes:
    """hash_{-1}: the chain's start, bound to the tokenizer's identity."""
    return hashlib.sha256(_GENESIS_TAG + tokenizer_sha256.encode("ascii")).digest()


def _record_header(name: str, a: np.ndarray) -> bytes:
    n, d = name.encode("utf-8"), a.dtype.name.encode("ascii")
    return struct.pack(f"<I{len(n)}sI{len(d)}sI{a.ndim}Q", len(n), n, len(d), d, a.ndim, *a.shape)


def hash_batch(prev: bytes, batch: Mapping[str, np.ndarray]) -> tuple[bytes, list[bytes]]:
    """Returns (hash_t, per-field hashes in sorted name order) of `batch` chained to `prev`."""
    chain = hashlib.sha256(prev)
    fields = []
    for name in sorted(batch):
        a = np.ascontiguousarray(batch[name])
        header = _record_header(name, a)
        chain.update(header)
        chain.update(a)
        field = hashlib.sha256(header)
        field.update(a)
        fields.append(field.digest())
    return chain.digest(), fields


def _normalize_schema(schema: Mapping[str, Any]) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    out = {}
    for name in sorted(schema):
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"field name {name!r} must match {_NAME_RE.pattern}")
        dtype, shape = schema[name]
        dtype = np.dtype(dtype)
        if dtype.kind not in "biuf" or not dtype.isnative:
            raise ValueError(f"field {name!r}: unsupported dtype {dtype} (bool, int, float)")
        out[name] = (dtype, tuple(int(d) for d in shape))
    if not out:
        raise ValueError("the schema has no fields")
    return out


def _open_arrays(directory: str, schema: dict, batch_size: int, layout=None) -> dict:
    """Opens the log's arrays, keyed by path; with `layout` = (batch_chunk, steps_per_chunk)
    creates them empty instead. Checks dtypes and shapes against `schema`."""
    ctx = ts.Context({"file_io_sync": True})  # the default, stated: commits rely on it
    u8, n = np.dtype(np.uint8), len(schema)
    want = {"hash": (u8, (32,), (32,)), "field_hash": (u8, (n, 32), (n, 32))}
    for k, (dtype, shape) in schema.items():
        chunk = (layout[0] if layout else batch_size, *shape)
        want[f"fields/{k}"] = (dtype, (batch_size, *shape), chunk)
    futures = {}
    for path, (dtype, shape, chunks) in want.items():
        kvstore = {"driver": "file", "path": os.path.join(directory, path)}
        # Other handles (other processes) resize these arrays: always re-read the metadata.
        spec = {"driver": "zarr", "kvstore": kvstore, "recheck_cached_metadata": True}
        if layout:
            compressor = {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1}
            spec["metadata"] = {
                "shape": [0, *shape],
                "chunks": [layout[1], *chunks],
                "dtype": dtype.str,
                "fill_value": False if dtype.kind == "b" else 0,  # zarr wants a bool for bool.
                "dimension_separator": "/",
                "compressor": None if path.endswith("hash") else compressor,
            }
        futures[path] = ts.open(spec, create=bool(layout), open=not layout, context=ctx)
    try:
        arrays = {k: f.result() for k, f in futures.items()}
    except ValueError as e:
        raise OrderLogError(f"{directory}: order log arrays missing or unreadable ({e})") from e
    for path, (dtype, shape, _) in want.items():
        got = arrays[path]
        if got.dtype.numpy_dtype != dtype or tuple(got.shape[1:]) != shape:
            raise OrderLogError(
                f"{directory}/{path}: stored {got.dtype.numpy_dtype}{list(got.shape)} does not "
                f"match meta.json's {dtype}[*, {', '.join(map(str, shape))}]"
            )
    return arrays


def _wait(futures) -> list:
    return [f.result() for f in list(futures)]


def _write_durable(path: str, data: bytes) -> None:
    """Writes `path` so that a crash or power loss leaves the old file or the new one: a
    synced temporary file renamed into place (`jsonl.replace_file`: by this process alone,
    as `create` runs on one), then the directory synced."""
    jsonl.replace_file(path, lambda f: f.write(data))
    _sync_dir(os.path.dirname(path))


def _sync_dir(directory: str) -> None:
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(directory: str) -> None:
    """`os.makedirs(directory, exist_ok=True)`, with each directory it creates made durable:
    a new directory's entry lives in its parent, so the parent is synced after each one (from
    the top down). Without that, a power loss could lose a log's whole directory after its
    files were synced."""
    missing = []
    path = os.path.abspath(directory)
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:  # made meanwhile by another process: synced by it, or now
            if not os.path.isdir(path):
                raise
        _sync_dir(os.path.dirname(path))


def _meta_digest_path(directory: str) -> str:
    return os.path.join(directory, "meta.json.sha256")


def _check_meta_digest(directory: str, path: str, raw: bytes) -> None:
    """Raises OrderLogError unless meta.json's bytes match the digest recorded beside them."""
    digest_path = _meta_digest_path(directory)
    try:
        with open(digest_path) as f:
            recorded = f.read().strip()
    except FileNotFoundError:
        raise OrderLogError(
            f"{digest_path}: not found; a format-{FORMAT_VERSION} log records meta.json's "
            f"SHA-256 there, so {path} cannot be checked (the log is incomplete or was copied "
            "without it)"
        ) from None
    actual = hashlib.sha256(raw).hexdigest()
    if recorded != actual:
        raise OrderLogError(
            f"{path}: altered since the log was created: its SHA-256 is {actual}, "
            f"{digest_path} records {recorded} (the run configs and seeds it states are not "
            "those of the run that wrote the log)"
        )


class OrderLog:
    """A hash-chained, step-indexed log of batches in a directory. See the module docstring.

    Build one with `OrderLog.create` or `OrderLog.open`; the constructor is internal.
    """

    def __init__(self, directory: str, meta: dict, schema: dict, arrays: dict):
        self.directory = directory
        self.meta = meta
        self.schema = schema
        self.batch_size = int(meta["batch_size"])
        self.batch_chunk = int(meta["batch_chunk"])
        self.tokenizer_sha256 = meta["tokenizer_sha256"]
        self._genesis = genesis_hash(self.tokenizer_sha256)
        self._a = arrays
        self._length = 0
        self.refresh()

    @property
    def _hash(self):
        return self._a["hash"]

    @property
    def _field_hash(self):
        return self._a["field_hash"]

    def _field(self, name: str):
        return self._a[f"fields/{name}"]

    # ----------------------------------------------------------------- create / open
    @classmethod
    def create(
        cls,
        directory: str | os.PathLike,
        *,
        schema: Mapping[str, Any],
        batch_size: int,
        meta: Mapping[str, Any],
        batch_chunk: int | None = None,
        steps_per_chunk: int = 16,
        overwrite: bool = False,
    ) -> OrderLog:
        """Creates an empty log.

        Args:
            directory: where the log lives (created if needed).
            schema: field name -> (dtype, per-example shape).
            batch_size: rows per step (B).
            meta: JSON-serialisable; must hold "tokenizer_sha256" (64 lowercase hex). Put the
                model/run configs and seeds here; the code version (`code_version`) is added.
            batch_chunk: rows per chunk (default B); multi-host writers need slices aligned
                to it.
            steps_per_chunk: steps per chunk along axis 0.
            overwrite: replace an existing log in `directory` instead of raising.
        """
        directory = os.fspath(directory)
        schema = _normalize_schema(schema)
        batch_chunk = batch_size if batch_chunk is None else int(batch_chunk)
        if batch_size < 1 or not 1 <= batch_chunk <= batch_size or steps_per_chunk < 1:
            raise ValueError(
                f"need batch_size >= 1, 1 <= batch_chunk <= batch_size, steps_per_chunk >= 1; "
                f"got {batch_size}, {batch_chunk}, {steps_per_chunk}"
            )
        sha = meta.get("tokenizer_sha256")
        if not isinstance(sha, str) or not _SHA_RE.match(sha):
            raise ValueError(f"meta['tokenizer_sha256'] must be 64 lowercase hex, got {sha!r}")
        clash = sorted(set(meta) & set(_RESERVED))
        if clash:
            raise ValueError(f"meta keys {clash} are reserved by the order log")
        full = dict(meta)
        full.update(
            code_version=code_version(),
            format=FORMAT,
            format_version=FORMAT_VERSION,
            schema={k: {"dtype": d.name, "shape": list(s)} for k, (d, s) in schema.items()},
            batch_size=batch_size,
            batch_chunk=batch_chunk,
            steps_per_chunk=steps_per_chunk,
        )
        text = json.dumps(full, indent=2, sort_keys=True, allow_nan=False)  # Fail before I/O.
        meta_path = os.path.join(directory, "meta.json")
        digest_path = _meta_digest_path(directory)
        parts = [os.path.join(directory, p) for p in ("fields", "hash", "field_hash")]
        if any(os.path.exists(p) for p in [meta_path, digest_path, *parts]):
            if not overwrite:
                raise FileExistsError(
                    f"{directory} already holds an order log (or part of one); "
                    "pass overwrite=True to replace it"
                )
            if os.path.exists(meta_path):  # First, so a crash leaves nothing openable.
                os.remove(meta_path)
            if os.path.exists(digest_path):
                os.remove(digest_path)
            _sync_dir(directory)  # the removals reach the disk before the arrays go
            for p in parts:
                shutil.rmtree(p, ignore_errors=True)
        _makedirs_durable(directory)
        arrays = _open_arrays(directory, schema, batch_size, (batch_chunk, steps_per_chunk))
        raw = (text + "\n").encode("utf-8")
        _write_durable(digest_path, (hashlib.sha256(raw).hexdigest() + "\n").encode("ascii"))
        _write_durable(meta_path, raw)  # Last: meta.json marks a complete create.
        return cls(directory, json.loads(text), schema, arrays)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> OrderLog:
        """Opens an existing log; a torn tail (data without a chain hash) is ignored."""
        directory = os.fspath(directory)
        path = os.path.join(directory, "meta.json")
        try:
            with open(path, "rb") as f:
                raw = f.read()
            meta = json.loads(raw)
        except FileNotFoundError:
            raise OrderLogError(f"{path}: not found, so {directory} is not an order log") from None
        except (OSError, ValueError) as e:
            raise OrderLogError(f"{path}: unreadable or malformed JSON ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise OrderLogError(f"{path}: not an order log's meta (format != {FORMAT!r})")
        if meta.get("format_version") not in _READABLE_VERSIONS:
            raise OrderLogError(
                f"{path}: format_version {meta.get('format_version')!r} is not one of "
                f"{list(_READABLE_VERSIONS)} (this code writes {FORMAT_VERSION})"
            )
        if meta["format_version"] >= 2:
            _check_meta_digest(directory, path, raw)
        missing = [k for k in ("tokenizer_sha256", *_RESERVED) if k not in meta]
        try:
            if missing:
                raise KeyError(missing)
            schema = _normalize_schema(
                {k: (v["dtype"], v["shape"]) for k, v in meta["schema"].items()}
            )
            batch_size = int(meta["batch_size"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise OrderLogError(f"{path}: malformed meta ({type(e).__name__}: {e})") from e
        return cls(directory, meta, schema, _open_arrays(directory, schema, batch_size))

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return f"OrderLog({self.directory!r}, steps={self._length}, batch_size={self.batch_size})"

    def refresh(self) -> int:
        """Re-reads the length from disk (leading steps with a non-zero chain hash)."""
        self._a = dict(zip(self._a, _wait(a.resolve() for a in self._a.values()), strict=True))
        committed = self._hash.read().result().any(axis=1)
        n = int(committed.argmin()) if not committed.all() else len(committed)
        self._length = min([n] + [a.shape[0] for a in self._a.values()])
        return self._length

    # ----------------------------------------------------------------- writing
    def check_batch(self, batch: Mapping[str, Any], rows: int | None = None) -> dict:
        """Validates `batch` against the schema; returns it as numpy arrays in sorted order.

        Raises:
            ValueError: naming the field with a missing/extra name, wrong dtype or shape.
        """
        rows = self.batch_size if rows is None else rows
        extra = sorted(set(batch) - set(self.schema))
        missing = sorted(set(self.schema) - set(batch))
        if extra or missing:
            raise ValueError(
                f"batch fields do not match the schema: missing {missing}, unexpected {extra}"
            )
        out = {}
        for name, (dtype, shape) in self.schema.items():
            a = np.asarray(batch[name])
            want = (rows, *shape)
            if a.dtype != dtype:
                raise ValueError(f"field {name!r}: dtype {a.dtype}, schema says {dtype}")
            if a.shape != want:
                raise ValueError(f"field {name!r}: shape {a.shape}, schema expects {want}")
            out[name] = a
        return out

    def _check_next(self, step: int) -> None:
        if step != self._length:
            raise ValueError(
                f"order log {self.directory}: expected step {self._length} (the next step), "
                f"got step {step}" + (" (already logged)" if step < self._length else " (a gap)")
            )

    def _resize(self, n: int, *, expand_only: bool = False) -> None:
        futures = {
            k: a.resize(exclusive_max=[n] + [None] * (a.rank - 1), expand_only=expand_only)
            for k, a in self._a.items()
            if (a.shape[0] < n if expand_only else a.shape[0] != n)
        }
        self._a.update({k: f.result() for k, f in futures.items()})

    def append(self, step: int, batch: Mapping[str, Any]) -> bytes:
        """Logs all rows of `step` (= len(self)) and commits it; returns its chain hash."""
        batch = self.check_batch(batch)
        self._check_next(step)
        if any(a.shape[0] > step for a in self._a.values()):  # A torn tail: clear it first.
            self.truncate(step)
        self._resize(step + 1)
        _wait(self._field(k)[step].write(a) for k, a in batch.items())
        return self._commit(step, batch)

    def append_slice(self, step: int, batch_slice: Mapping[str, Any], start: int, stop: int):
        """Writes rows [start, stop) of `step` without committing it (multi-host writing).

        `start` and `stop` must be multiples of `batch_chunk` (or stop = batch_size), so that
        concurrent writers never share a chunk.
        """
        c, b = self.batch_chunk, self.batch_size
        if not (0 <= start < stop <= b and start % c == 0 and (stop % c == 0 or stop == b)):
            raise ValueError(
                f"rows [{start}, {stop}) are not a chunk-aligned range of "
                f"[0, {b}) with batch_chunk {c}"
            )
        batch_slice = self.check_batch(batch_slice, rows=stop - start)
        self.refresh()
        self._check_next(step)
        if any(a.shape[0] > step + 1 for a in self._a.values()):
            raise OrderLogError(
                f"order log {self.directory}: arrays extend past step {step} (a torn tail); "
                f"call truncate({step}) on one process before writing slices"
            )
        self._resize(step + 1, expand_only=True)
        _wait(self._field(k)[step, start:stop].write(a) for k, a in batch_slice.items())

    def commit_step(self, step: int) -> bytes:
        """Hashes the stored rows of `step` and commits it (hash written last); on process 0."""
        self.refresh()
        self._check_next(step)
        if any(self._field(k).shape[0] <= step for k in self.schema):
            raise OrderLogError(f"order log {self.directory}: step {step} has no data to commit")
        return self._commit(step, self._read(step, step + 1, squeeze=True))

    def _commit(self, step: int, batch: dict) -> bytes:
        prev = self._prev_hash(step)
        h, fields = hash_batch(prev, batch)
        fh = np.frombuffer(b"".join(fields), np.uint8).reshape(len(fields), 32)
        self._field_hash[step].write(fh).result()
        self._hash[step].write(np.frombuffer(h, np.uint8)).result()  # Last: commits the step.
        self._length = step + 1
        return h

    def truncate(self, num_steps: int) -> None:
        """Rolls back to the first `num_steps` steps (e.g. after restoring that checkpoint).

        Also clears a torn tail. The dropped rows of partial chunks are zeroed before the
        arrays shrink: tensorstore keeps out-of-bounds data in a partial chunk and would
        show it again when the array grows.
        """
        self.refresh()
        n = num_steps
        if not 0 <= n <= self._length:
            raise ValueError(f"cannot truncate to {n} steps: {self.directory} has {self._length}")
        if self._hash.shape[0] > n:  # Uncommit step n first: from here the log has n steps.
            self._hash[n].write(np.zeros(32, np.uint8)).result()
        for a in self._a.values():
            c = a.chunk_layout.write_chunk.shape[0]
            end = min(a.shape[0], -(-n // c) * c)  # The end of step n's chunk.
            if end > n:
                a[n:end].write(np.zeros((end - n, *a.shape[1:]), a.dtype.numpy_dtype)).result()
        self._resize(n)
        self._length = n

    # ----------------------------------------------------------------- reading
    def hash(self, step: int) -> bytes:
        """The recorded chain hash of committed `step`; step -1 gives hash_{-1}."""
        self._check_have(step + 1, step + 1)
        return self._prev_hash(step + 1)

    def _prev_hash(self, step: int) -> bytes:
        return self._genesis if step == 0 else self._hash[step - 1].read().result().tobytes()

    def _check_have(self, stop: int, step: int = 0) -> None:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if stop > self._length:
            self.refresh()
        if stop > self._length:
            raise ReplayError(
                f"order log {self.directory} has {self._length} steps; step {self._length} is "
                f"missing (steps up to {stop - 1} requested)",
                step=self._length,
            )

    def _read(self, lo: int, hi: int, squeeze: bool = False) -> dict:
        idx = lo if squeeze else slice(lo, hi)
        values = _wait(self._field(k)[idx].read() for k in self.schema)
        return dict(zip(self.schema, values, strict=True))

    def check_tokenizer(self, tokenizer_sha256) -> None:
        """Raises ReplayError naming both hashes unless the log's tokenizer is this one."""
        sha = getattr(tokenizer_sha256, "sha256", tokenizer_sha256)  # A Tokenizer works too.
        if sha != self.tokenizer_sha256:
            raise ReplayError(
                f"tokenizer mismatch: order log {self.directory} was recorded with "
                f"tokenizer sha256 {self.tokenizer_sha256}, got {sha}"
            )

    def read(self, step: int) -> dict[str, np.ndarray]:
        """The batch of committed `step`, unverified."""
        self._check_have(step + 1, step)
        return self._read(step, step + 1, squeeze=True)

    def _verify(self, step, batch, prev, stored_h, stored_fh) -> bytes:
        h, fields = hash_batch(prev, batch)
        if h == stored_h.tobytes():
            return h
        names = list(self.schema)
        bad = [n for n, f, s in zip(names, fields, stored_fh, strict=True) if f != s.tobytes()]
        if bad:
            raise ReplayError(
                f"order log {self.directory}: log altered at step {step}: field "
                f"{bad[0]!r} does not match its recorded hash"
                + (f" (also {bad[1:]})" if bad[1:] else ""),
                step=step,
                field=bad[0],
            )
        raise ReplayError(
            f"order log {self.directory}: log altered at step {step}: the data match their "
            "field hashes but not the chain hash (hash record altered, or the previous step's "
            "hash differs: steps reordered or skipped)",
            step=step,
        )

    def read_verified(self, step: int, prev_hash: bytes | None = None) -> tuple[dict, bytes]:
        """Reads `step` and checks sha256(prev_hash || batch) against its recorded hash.

        `prev_hash` defaults to the recorded hash of step-1 (hash_{-1} for step 0).
        Returns (batch, hash_step); raises ReplayError naming the step and field otherwise.
        """
        self._check_have(step + 1, step)
        prev = self._prev_hash(step) if prev_hash is None else bytes(prev_hash)
        batch = self._read(step, step + 1, squeeze=True)
        hs = _wait([self._hash[step].read(), self._field_hash[step].read()])
        return batch, self._verify(step, batch, prev, *hs)

    def iter_steps(
        self, start: int = 0, stop: int | None = None, *, verify: bool = True
    ) -> Iterator[tuple[int, dict]]:
        """Yields (step, batch) for steps [start, stop) in order, each verified before it is
        yielded (chained from the recorded hash of step start-1).

        Raises:
            ReplayError: at once if the log is shorter than `stop`; on reaching a bad step.
        """
        stop = len(self) if stop is None else stop
        if not 0 <= start <= stop:
            raise ValueError(f"bad step range [{start}, {stop})")
        self._check_have(stop)
        return self._iter(start, stop, verify)

    def _iter(self, start: int, stop: int, verify: bool):
        prev = self._prev_hash(start) if verify and start < stop else None
        block = self._hash.chunk_layout.write_chunk.shape[0]
        for lo in range(start, stop, block):
            hi = min(stop, lo + block)
            rows = self._read(lo, hi)
            if verify:
                hs, fhs = _wait([self._hash[lo:hi].read(), self._field_hash[lo:hi].read()])
            for i in range(hi - lo):
                batch = {k: v[i] for k, v in rows.items()}
                if verify:
                    prev = self._verify(lo + i, batch, prev, hs[i], fhs[i])
                yield lo + i, batch

    def verify(self, upto: int | None = None, *, raise_on_error: bool = False) -> int | None:
        """Checks the chain over steps [0, upto); returns the first bad step or None.

        A missing step (upto > len) counts as bad. With `raise_on_error`, raises the
        ReplayError naming the step and cause instead of returning it.
        """
        try:
            for _ in self.iter_steps(0, upto):
                pass
        except ReplayError as e:
            if raise_on_error:
                raise
            return e.step
        return None

    def compare_step(self, step: int, batch: Mapping[str, Any]) -> bytes:
        """Checks that a regenerated `batch` hash-equals logged `step`; returns the hash.

        Raises:
            DeterminismError: naming the step, the first differing field and element.
        """
        batch = self.check_batch(batch)
        self._check_have(step + 1, step)
        h, fields = hash_batch(self._prev_hash(step), batch)
        stored_h, stored_fh = _wait([self._hash[step].read(), self._field_hash[step].read()])
        if h == stored_h.tobytes():
            return h
        for name, f, s in zip(self.schema, fields, stored_fh, strict=True):
            if f != s.tobytes():
                logged = self._field(name)[step].read().result()
                u = f"u{logged.dtype.itemsize}"  # Bitwise, so NaN == NaN and -0 != 0.
                diff = np.argwhere(logged.view(u) != batch[name].view(u))
                where = ""
                if len(diff):
                    i = tuple(int(j) for j in diff[0])
                    where = f" (first at index {i}: logged {logged[i]}, now {batch[name][i]})"
                raise DeterminismError(
                    f"step {step}: regenerated batch differs from the log in field {name!r}{where}",
                    step=step,
                    field=name,
                )
        raise ReplayError(
            f"order log {self.directory}: log altered at step {step}: chain hash "
            "does not match its field hashes",
            step=step,
        )
