"""Tests of the data-order log: bit-exact round trip, the documented hash, tamper detection,
crash safety (torn tails), truncation, multi-writer slices and the error messages."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts

from ipo_gap.data.order_log import (
    DeterminismError,
    OrderLog,
    OrderLogError,
    ReplayError,
    code_version,
    pair_schema,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHA = hashlib.sha256(b"tokenizer-a").hexdigest()
OTHER_SHA = hashlib.sha256(b"tokenizer-b").hexdigest()
B, S, T = 4, 5, 6
SCHEMA = pair_schema(S, T)


def make_batch(seed: int, rows: int = B) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = {}
    for name, (dtype, shape) in SCHEMA.items():
        if dtype == "int32":
            batch[name] = rng.integers(0, 100, size=(rows, *shape), dtype=np.int32)
        else:
            batch[name] = rng.standard_normal((rows, *shape)).astype(np.float32)
    return batch


def new_log(path, **kw) -> OrderLog:
    meta = {"tokenizer_sha256": kw.pop("sha", SHA), "seed": 0, "run": {"loss": "ipo"}}
    return OrderLog.create(path, schema=SCHEMA, batch_size=B, meta=meta, **kw)


def expected_hashes(batches, tokenizer_sha=SHA) -> list[bytes]:
    """The chain, computed from the module docstring's definition with hashlib alone."""
    prev = hashlib.sha256(b"ipo_gap.order_log.v1\0" + tokenizer_sha.encode()).digest()
    out = []
    for batch in batches:
        h = hashlib.sha256(prev)
        for name in sorted(batch):
            a = batch[name]
            n, d = name.encode(), a.dtype.name.encode()
            h.update(struct.pack("<I", len(n)) + n + struct.pack("<I", len(d)) + d)
            h.update(struct.pack("<I", a.ndim) + b"".join(struct.pack("<Q", x) for x in a.shape))
            h.update(a.tobytes(order="C"))
        prev = h.digest()
        out.append(prev)
    return out


def raw(path, *parts):
    """An array of the log opened with tensorstore directly, bypassing OrderLog."""
    kvstore = {"driver": "file", "path": os.path.join(str(path), *parts)}
    return ts.open({"driver": "zarr", "kvstore": kvstore}, open=True).result()


def test_round_trip_is_bit_exact(tmp_path):
    # The code that writes it: this checkout's commit (the tests run from a git clone), read
    # now: `code_version` caches its first answer, so a commit during a test run would
    # otherwise compare an older HEAD with a newer one.
    here = os.path.dirname(os.path.abspath(__file__))
    head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True)
    code_version.cache_clear()
    log = new_log(tmp_path)
    batches = [make_batch(i) for i in range(5)]
    for step, batch in enumerate(batches):
        log.append(step, batch)
    log = OrderLog.open(tmp_path)
    assert len(log) == 5 and log.batch_size == B
    assert log.meta["tokenizer_sha256"] == SHA and log.meta["run"] == {"loss": "ipo"}
    assert log.meta["schema"]["y_w"] == {"dtype": "int32", "shape": [T]}
    code = log.meta["code_version"]
    assert code["ipo_gap"] and code["git_commit"] == (head.stdout.strip() or None)
    for step, got in log.iter_steps():
        want = batches[step]
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes()
    assert log.read(3)["judge_prob"].tobytes() == batches[3]["judge_prob"].tobytes()
    assert [s for s, _ in log.iter_steps(2, 4)] == [2, 3]
    assert log.verify() is None


_SUBPROCESS = """
import json, sys
sys.path.insert(0, {tests!r})
from test_order_log import make_batch, new_log
log = new_log({path!r})
for step in range(3):
    batch = make_batch(step)
    log.append(step, dict(reversed(list(batch.items()))))  # Insertion order must not matter.
print(json.dumps([log.hash(s).hex() for s in range(3)]))
"""


def test_hashes_follow_the_documented_definition_across_processes(tmp_path):
    batches = [make_batch(i) for i in range(3)]
    log = new_log(tmp_path / "a")
    got = [log.append(step, batch) for step, batch in enumerate(batches)]
    assert got == [log.hash(s) for s in range(3)] == expected_hashes(batches)
    assert log.hash(-1) == hashlib.sha256(b"ipo_gap.order_log.v1\0" + SHA.encode()).digest()
    code = _SUBPROCESS.format(tests=os.path.join(REPO, "tests"), path=str(tmp_path / "b"))
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert json.loads(out.stdout.splitlines()[-1]) == [h.hex() for h in got]
    # Per-field hashes are sha256 of each field's record.
    fh = raw(tmp_path / "a", "field_hash")[1].read().result()
    assert fh.shape == (len(SCHEMA), 32)
    # Another tokenizer: same data, another chain.
    other = new_log(tmp_path / "c", sha=OTHER_SHA)
    assert other.append(0, batches[0]) == expected_hashes(batches[:1], OTHER_SHA)[0] != got[0]


@pytest.mark.parametrize("field", ["y_w", "judge_prob"])
def test_one_altered_byte_is_found_at_its_step_and_field(tmp_path, field):
    log = new_log(tmp_path)
    for step in range(4):
        log.append(step, make_batch(step))
    arr = raw(tmp_path, "fields", field)
    row = arr[2].read().result()
    flat = row.view(np.uint8).reshape(-1).copy()
    flat[3] ^= 1  # One bit of one byte.
    arr[2].write(flat.view(row.dtype).reshape(row.shape)).result()

    log = OrderLog.open(tmp_path)
    assert log.verify() == 2 and log.verify(upto=2) is None
    with pytest.raises(ReplayError, match=f"log altered at step 2: field '{field}'") as e:
        log.verify(raise_on_error=True)
    assert (e.value.step, e.value.field) == (2, field)
    seen = []
    with pytest.raises(ReplayError, match=f"step 2: field '{field}'"):
        for step, _ in log.iter_steps():
            seen.append(step)
    assert seen == [0, 1]  # Nothing unverified is yielded.
    with pytest.raises(ReplayError, match="step 2"):
        log.read_verified(2)
    assert log.read_verified(3)[1] == log.hash(3)  # Chained from the recorded hash of 2.
    assert [s for s, _ in log.iter_steps(2, verify=False)] == [2, 3]


def test_altered_hash_record_is_reported(tmp_path):
    log = new_log(tmp_path)
    for step in range(3):
        log.append(step, make_batch(step))
    h = raw(tmp_path, "hash")
    h[1].write(np.full(32, 7, np.uint8)).result()
    with pytest.raises(ReplayError, match="step 1: the data match their field hashes"):
        OrderLog.open(tmp_path).verify(raise_on_error=True)
    assert log.read_verified(0)[1] == log.hash(0)
    with pytest.raises(ReplayError, match="step 1"):
        log.read_verified(1, prev_hash=bytes(32))  # Wrong predecessor.


def test_other_schemas_round_trip(tmp_path):
    schema = {"ok": ("bool", ()), "ids": (np.uint8, (2, 3)), "score": ("float64", (1,))}
    meta = {"tokenizer_sha256": SHA}
    log = OrderLog.create(tmp_path, schema=schema, batch_size=3, meta=meta, batch_chunk=1)
    rng = np.random.default_rng(0)
    batch = {
        "ok": rng.random(3) < 0.5,
        "ids": rng.integers(0, 255, (3, 2, 3), dtype=np.uint8),
        "score": np.array([[np.nan], [-0.0], [1e300]]),
    }
    assert log.append(0, batch) == expected_hashes([batch])[0]
    got = OrderLog.open(tmp_path).read(0)
    assert all(
        got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes() for k, v in batch.items()
    )
    assert log.compare_step(0, batch) == log.hash(0)  # NaN compares equal bitwise.
    with pytest.raises(DeterminismError, match=r"'score' \(first at index \(1, 0\)"):
        log.compare_step(0, {**batch, "score": np.array([[np.nan], [0.0], [1e300]])})
    with pytest.raises(ValueError, match="step must be >= 0"):
        log.read(-1)


def test_missing_steps_are_named(tmp_path):
    log = new_log(tmp_path)
    for step in range(3):
        log.append(step, make_batch(step))
    with pytest.raises(ReplayError, match="has 3 steps; step 3 is missing") as e:
        log.iter_steps(0, 10)  # Raised at once, before anything is yielded.
    assert e.value.step == 3
    assert log.verify(upto=10) == 3
    with pytest.raises(ReplayError, match="step 3 is missing"):
        log.read(3)


def test_steps_must_follow_without_gaps_or_duplicates(tmp_path):
    log = new_log(tmp_path)
    with pytest.raises(ValueError, match="expected step 0 .* got step 1 \\(a gap\\)"):
        log.append(1, make_batch(0))
    log.append(0, make_batch(0))
    with pytest.raises(ValueError, match="expected step 1 .* got step 0 \\(already logged\\)"):
        log.append(0, make_batch(0))
    assert len(log) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.update(y_w=b["y_w"].astype(np.int64)), "field 'y_w': dtype int64, schema"),
        (
            lambda b: b.update(y_l=b["y_l"][:, :-1]),
            r"field 'y_l': shape \(4, 5\), schema .*\(4, 6\)",
        ),
        (lambda b: b.update(logp_w=b["logp_w"][:3]), r"field 'logp_w': shape \(3,\)"),
        (lambda b: b.pop("prompt_mask"), r"missing \['prompt_mask'\]"),
        (lambda b: b.update(extra=b["y_w"]), r"unexpected \['extra'\]"),
    ],
)
def test_schema_violations_name_the_field(tmp_path, change, message):
    log = new_log(tmp_path)
    batch = make_batch(0)
    change(batch)
    with pytest.raises(ValueError, match=message):
        log.append(0, batch)
    assert len(log) == 0


def test_truncate_then_reappend_gives_the_same_hashes(tmp_path):
    log = new_log(tmp_path, steps_per_chunk=4, batch_chunk=2)
    batches = [make_batch(i) for i in range(6)]
    hashes = [log.append(step, b) for step, b in enumerate(batches)]
    log.truncate(2)
    assert len(log) == 2 and len(OrderLog.open(tmp_path)) == 2
    assert raw(tmp_path, "fields", "y_w").shape[0] == 2 and raw(tmp_path, "hash").shape[0] == 2
    with pytest.raises(ValueError, match="cannot truncate to 3 steps"):
        log.truncate(3)
    # Growing again shows zeros, not the dropped rows (tensorstore keeps out-of-bounds data
    # of a partial chunk; truncate must have zeroed it).
    log.append_slice(2, make_batch(9, rows=2), 0, 2)
    assert not raw(tmp_path, "fields", "y_w")[2, 2:].read().result().any()
    assert not raw(tmp_path, "hash")[2].read().result().any()
    log.truncate(2)
    again = [log.append(step, batches[step]) for step in range(2, 6)]
    assert again == hashes[2:] and log.verify() is None
    log.truncate(0)
    assert len(OrderLog.open(tmp_path)) == 0 and log.append(0, batches[0]) == hashes[0]


def test_torn_tail_is_ignored_and_rewritten(tmp_path):
    log = new_log(tmp_path)
    batches = [make_batch(i) for i in range(4)]
    for step in range(3):
        log.append(step, batches[step])
    log.append_slice(3, batches[3], 0, B)  # Data written, crash before the hash.
    reopened = OrderLog.open(tmp_path)
    assert len(reopened) == 3 and reopened.verify() is None
    assert [s for s, _ in reopened.iter_steps()] == [0, 1, 2]
    with pytest.raises(ReplayError, match="step 3 is missing"):
        reopened.read(3)
    assert reopened.append(3, batches[3]) == expected_hashes(batches)[3]

    raw(tmp_path, "hash")[3].write(np.zeros(32, np.uint8)).result()  # Last hash lost.
    assert len(OrderLog.open(tmp_path)) == 3
    assert OrderLog.open(tmp_path).append(3, batches[3]) == expected_hashes(batches)[3]
    raw(tmp_path, "hash")[2].write(np.zeros(32, np.uint8)).result()  # A hole: 2 and 3 torn.
    reopened = OrderLog.open(tmp_path)
    assert len(reopened) == 2 and reopened.verify() is None
    with pytest.raises(OrderLogError, match=r"torn tail.*truncate\(2\)"):
        reopened.append_slice(2, batches[2], 0, B)
    # A single writer clears the torn tail itself (row 3's stale hash must not come back).
    assert reopened.append(2, batches[2]) == expected_hashes(batches)[2]
    reopened.append_slice(3, batches[0], 0, B)
    assert len(OrderLog.open(tmp_path)) == 3
    assert reopened.append(3, batches[3]) == expected_hashes(batches)[3]
    assert len(OrderLog.open(tmp_path)) == 4 and reopened.verify() is None


def test_tokenizer_mismatch_names_both_hashes(tmp_path):
    log = new_log(tmp_path)
    log.check_tokenizer(SHA)

    class Tok:
        sha256 = OTHER_SHA

    for other in (OTHER_SHA, Tok()):
        with pytest.raises(ReplayError, match=f"{SHA}.*{OTHER_SHA}"):
            log.check_tokenizer(other)


def test_meta_problems_name_the_file(tmp_path):
    path = str(tmp_path / "meta.json")
    with pytest.raises(OrderLogError, match=f"{path}: not found"):
        OrderLog.open(tmp_path)
    new_log(tmp_path)
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(OrderLogError, match=f"{path}: unreadable or malformed JSON"):
        OrderLog.open(tmp_path)
    with open(path, "w") as f:
        json.dump({"format": "ipo_gap.order_log", "format_version": 1}, f)
    with pytest.raises(OrderLogError, match=f"{path}: malformed meta.*tokenizer_sha256"):
        OrderLog.open(tmp_path)


def test_meta_json_is_checked_against_its_recorded_digest(tmp_path):
    """meta.json is outside the hash chain (the chain is the data stream's identity), so its
    own SHA-256 is recorded beside it: an edit of one value, or a missing digest, stops
    `open` with the file named; a format-1 log (written before the digest) still opens."""
    log = new_log(tmp_path)
    log.append(0, make_batch(0))
    path, digest = tmp_path / "meta.json", tmp_path / "meta.json.sha256"
    raw = path.read_bytes()
    assert digest.read_text().strip() == hashlib.sha256(raw).hexdigest()
    assert json.loads(raw)["format_version"] == 2
    assert OrderLog.open(tmp_path).meta == log.meta
    path.write_bytes(raw.replace(b'"loss": "ipo"', b'"loss": "dpo"'))
    with pytest.raises(OrderLogError, match=f"{path}: altered since the log was created") as e:
        OrderLog.open(tmp_path)
    assert hashlib.sha256(raw).hexdigest() in str(e.value)  # the recorded digest is named
    path.write_bytes(raw)
    assert len(OrderLog.open(tmp_path)) == 1  # the original bytes open again
    digest.unlink()
    with pytest.raises(OrderLogError, match=f"{digest}: not found"):
        OrderLog.open(tmp_path)
    meta = json.loads(raw)
    meta["format_version"] = 1  # what the code before the digest wrote
    path.write_text(json.dumps(meta))
    old = OrderLog.open(tmp_path)
    assert len(old) == 1 and old.verify() is None
    meta["format_version"] = 3
    path.write_text(json.dumps(meta))
    with pytest.raises(OrderLogError, match=r"format_version 3 is not one of \[1, 2\]"):
        OrderLog.open(tmp_path)


def test_overwrite_replaces_the_digest_too(tmp_path):
    new_log(tmp_path).append(0, make_batch(0))
    log = OrderLog.create(
        tmp_path, schema=SCHEMA, batch_size=B, meta={"tokenizer_sha256": OTHER_SHA}, overwrite=True
    )
    assert len(OrderLog.open(tmp_path)) == 0 and log.tokenizer_sha256 == OTHER_SHA


def test_meta_and_every_array_write_reach_the_disk(tmp_path):
    """Creating and appending sync what they write (fsync), so the commit order (data, field
    hashes, chain hash last) also holds across a power loss: traced with strace, where the
    machine has it."""
    import shutil

    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); import test_order_log as t\n"
        "from ipo_gap.data.order_log import OrderLog\n"
        "log = t.new_log(sys.argv[1])\n"
        "for s in range(3): log.append(s, t.make_batch(s))\n"
    )
    trace = tmp_path / "trace"
    proc = subprocess.run(
        [
            "strace",
            "-f",
            "-o",
            str(trace),
            "-e",
            "trace=fsync,fdatasync",
            sys.executable,
            "-c",
            code,
            str(tmp_path / "log"),
            os.path.join(REPO, "tests"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    syncs = sum(
        ("fsync(" in line or "fdatasync(" in line) for line in trace.read_text().splitlines()
    )
    # meta.json, its digest and the directory twice, then per step at least one sync for each
    # of the 9 fields, the field hashes and the chain hash.
    assert syncs >= 4 + 3 * 11, syncs


def test_create_syncs_the_parent_of_every_directory_it_makes(tmp_path, monkeypatch):
    """A new directory's entry lives in its parent: create() syncs each parent after making
    a directory, top down, so a power loss cannot drop a log whose files were synced."""
    from ipo_gap.data import order_log

    synced = []
    real = order_log._sync_dir
    monkeypatch.setattr(order_log, "_sync_dir", lambda d: (synced.append(d), real(d)))
    (tmp_path / "a").mkdir()
    log_dir = tmp_path / "a" / "b" / "c"
    new_log(log_dir)
    made = [str(tmp_path / "a"), str(tmp_path / "a" / "b")]
    assert synced[:2] == made, synced  # the parents of b and c, before anything else
    assert synced[2:] == [str(log_dir)] * 2  # then the digest, then meta.json
    synced.clear()
    new_log(log_dir, overwrite=True)  # nothing new to make: only the removals and the files
    assert synced == [str(log_dir)] * 3, synced


def test_create_requires_a_tokenizer_and_refuses_to_clobber(tmp_path):
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        OrderLog.create(tmp_path / "x", schema=SCHEMA, batch_size=B, meta={"seed": 1})
    with pytest.raises(ValueError, match="reserved"):
        meta = {"tokenizer_sha256": SHA, "schema": 1}
        OrderLog.create(tmp_path / "x", schema=SCHEMA, batch_size=B, meta=meta)
    log = new_log(tmp_path)
    log.append(0, make_batch(0))
    with pytest.raises(FileExistsError, match="already holds an order log"):
        new_log(tmp_path)
    assert len(new_log(tmp_path, overwrite=True)) == 0


def test_compare_step_detects_a_changed_batch(tmp_path):
    log = new_log(tmp_path)
    batches = [make_batch(i) for i in range(3)]
    for step, batch in enumerate(batches):
        log.append(step, batch)
    assert log.compare_step(1, make_batch(1)) == log.hash(1)
    changed = make_batch(1)
    changed["y_l"][2, 3] += 1
    with pytest.raises(DeterminismError, match=r"step 1: .* field 'y_l' \(first at index \(2, 3\)"):
        log.compare_step(1, changed)
    with pytest.raises(DeterminismError, match="step 2: .*'judge_prob'"):
        log.compare_step(2, {**batches[2], "judge_prob": -batches[2]["judge_prob"]})


def test_slices_from_two_writers_hash_like_one_append(tmp_path):
    batches = [make_batch(i) for i in range(2)]
    single = new_log(tmp_path / "single")
    want = [single.append(step, b) for step, b in enumerate(batches)]

    p0 = new_log(tmp_path / "multi", batch_chunk=2)
    p1 = OrderLog.open(tmp_path / "multi")
    with pytest.raises(ValueError, match="chunk-aligned"):
        p1.append_slice(0, make_batch(0, rows=2), 1, 3)
    rows = lambda b, lo, hi: {k: v[lo:hi] for k, v in b.items()}  # noqa: E731
    p0.append_slice(0, rows(batches[0], 0, 2), 0, 2)
    p1.append_slice(0, rows(batches[0], 2, 4), 2, 4)
    assert p0.commit_step(0) == want[0]
    p1.append_slice(1, rows(batches[1], 2, 4), 2, 4)  # Either order; p1 commits this time.
    p0.append_slice(1, rows(batches[1], 0, 2), 0, 2)
    assert p1.commit_step(1) == want[1]
    with pytest.raises(ValueError, match="expected step 2"):
        p0.commit_step(1)
    assert OrderLog.open(tmp_path / "multi").verify() is None
