"""Bit-for-bit comparison of two runs: their checkpoints and their data-order logs.

The determinism contract (DESIGN.md) says that on CPU the same seed and config give the same
bits. `compare_checkpoints` and `compare_logs` are how a check (experiments/
check_determinism.py) holds two runs to it and names where they part:

  * `compare_checkpoints(dir_a, dir_b, step)` restores every saved array of `step` from both
    checkpoint roots as raw numpy arrays (no template, so any train state works) and lists
    the arrays whose bits differ, with their max abs difference;
  * `compare_logs(dir_a, dir_b)` returns the first step whose chain hash differs (or where
    one log ends first).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ipo_gap.data.order_log import OrderLog
from ipo_gap.sharding import to_host
from ipo_gap.train_state_io import CheckpointManager


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        out.update(_flatten(v, name) if isinstance(v, Mapping) else {name: v})
    return out


def _restore_args(tree: Mapping) -> dict:
    return {
        k: _restore_args(v) if isinstance(v, Mapping) else ocp.RestoreArgs(restore_type=np.ndarray)
        for k, v in tree.items()
    }


def restore_raw(directory: str | os.PathLike, step: int) -> dict[str, np.ndarray]:
    """All arrays saved at `step` under checkpoint root `directory`, keyed 'model/encoder/...'.

    Raises:
      FileNotFoundError: the directory or the step does not exist.
    """
    directory = os.fspath(directory)
    if "://" not in directory and not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    mngr = CheckpointManager(directory)
    try:
        if step not in mngr.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {directory}; "
                f"available steps: {mngr.all_steps() or 'none'}"
            )
        # train_state_io keeps no public raw restore; use its orbax manager directly.
        meta = mngr._mngr.item_metadata(step)["state"]
        meta = getattr(meta, "tree", meta)  # orbax >= 0.11 wraps the tree in TreeMetadata
        restored = mngr._mngr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=_restore_args(meta))),
        )["state"]
    finally:
        mngr.close()
    return {k: np.asarray(v) for k, v in _flatten(restored).items()}


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality: NaN == NaN (same payload), -0 != +0."""
    return a.tobytes() == b.tobytes()


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return 0.0
    if a.dtype.kind in "biu":
        return float(np.max(np.abs(a.astype(np.int64) - b.astype(np.int64))))
    with np.errstate(invalid="ignore", over="ignore"):
        return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def compare_arrays(arrays_a: Mapping[str, np.ndarray], arrays_b: Mapping[str, np.ndarray]):
    """The differences of two {path: array} dicts, one line each, in sorted path order."""
    out = []
    for path in sorted(set(arrays_a) | set(arrays_b)):
        if path not in arrays_b:
            out.append(f"{path}: only in a")
            continue
        if path not in arrays_a:
            out.append(f"{path}: only in b")
            continue
        a, b = np.asarray(arrays_a[path]), np.asarray(arrays_b[path])
        if a.shape != b.shape or a.dtype != b.dtype:
            out.append(f"{path}: a is {a.dtype}{list(a.shape)}, b is {b.dtype}{list(b.shape)}")
            continue
        if _bits_equal(np.ascontiguousarray(a), np.ascontiguousarray(b)):
            continue
        n = int(
            np.sum(a.reshape(-1).view(f"u{a.itemsize}") != b.reshape(-1).view(f"u{b.itemsize}"))
        )
        out.append(f"{path}: max abs diff {_max_abs_diff(a, b):.6g} ({n} of {a.size} elements)")
    return out


def compare_checkpoints(dir_a, dir_b, step: int) -> list[str]:
    """Differences between the arrays saved at `step` in two checkpoint roots.

    Returns one line per differing array, 'path: max abs diff X (n of N elements)' (or a
    missing / shape-or-dtype line), in sorted path order; empty if every array is
    bit-identical. Bitwise: NaN equals NaN, -0 differs from +0 (max abs diff 0 then).
    """
    return compare_arrays(restore_raw(dir_a, step), restore_raw(dir_b, step))


def compare_logs(dir_a, dir_b) -> int | None:
    """The first step at which two order logs differ, or None if they are identical.

    Compares committed chain hashes. Since hash_t commits to steps 0..t and to the
    tokenizer, equal hashes at t mean equal logs up to t, so the first differing step is found
    by bisection. If one log is a prefix of the other, returns the shorter length (the first
    step one of them lacks). Does not re-hash the stored data: use `OrderLog.verify` for that.
    """
    a, b = OrderLog.open(dir_a), OrderLog.open(dir_b)
    n = min(len(a), len(b))
    if n == 0 or a.hash(n - 1) == b.hash(n - 1):
        return None if len(a) == len(b) else n
    lo, hi = 0, n - 1  # the answer is in [lo, hi]; hashes differ at hi
    while lo < hi:
        mid = (lo + hi) // 2
        if a.hash(mid) == b.hash(mid):
            lo = mid + 1
        else:
            hi = mid
    return lo


def tree_max_abs_diff(a, b) -> float:
    """Max |a - b| over the array leaves of two pytrees of the same structure (models); NaN
    where any leaf's difference is NaN (Python's max would drop it after the first leaf).
    A distance: -0 and +0 count as equal; `tree_bit_differences` tells bits apart."""
    la = jax.tree.leaves(eqx.filter(a, eqx.is_array))
    lb = jax.tree.leaves(eqx.filter(b, eqx.is_array))
    diffs = [float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb, strict=True)]
    return float("nan") if any(d != d for d in diffs) else max(diffs)


def tree_bit_differences(a, b) -> list[str]:
    """The key paths of the array leaves of two pytrees (models) whose bits differ (NaN equal
    to itself with the same payload, -0 unequal to +0); empty: the same bits. Compared on
    the devices, as `tree_max_abs_diff` is, so sharded models need no transfer."""
    la = jax.tree_util.tree_leaves_with_path(eqx.filter(a, eqx.is_array))
    lb = jax.tree.leaves(eqx.filter(b, eqx.is_array))
    return [
        jax.tree_util.keystr(path)
        for (path, x), y in zip(la, lb, strict=True)
        if x.shape != y.shape or x.dtype != y.dtype or not bool(jnp.all(_words(x) == _words(y)))
    ]


_MIX = (np.uint32(0x9E3779B1), np.uint32(0x85EBCA77))  # odd multipliers (golden ratio, murmur3)


def _words(x: jax.Array) -> jax.Array:
    """`x`'s raw bit patterns as uint32 words: one per element of 1-, 2- and 4-byte dtypes (the
    narrow ones zero-extended), two (a trailing axis) for 8-byte ones; typed PRNG keys as
    their key data, complex numbers as (real, imaginary), sub-byte types widened exactly."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.iscomplexobj(x):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    try:
        words = jax.lax.bitcast_convert_type(x, width)
    except (TypeError, ValueError):  # a sub-byte type (int4, float4): widen, values exact
        wide = jnp.int32 if jnp.issubdtype(x.dtype, jnp.integer) else jnp.float32
        words = jax.lax.bitcast_convert_type(x.astype(wide), jnp.uint32)
    return words.astype(jnp.uint32)


def _word_sums(x: jax.Array) -> jax.Array:
    """Two position-weighted sums of `x`'s raw bit patterns (`_words`), uint32 [2], modulo
    2**32."""
    words = _words(x)
    # The element's row-major index, built per axis (no reshape: a sharded leaf stays put).
    index = jnp.zeros(words.shape, jnp.uint32)
    for axis, size in enumerate(words.shape):
        index = index * np.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
    out = []
    for mix in _MIX:
        weight = (index * mix + np.uint32(0x7F4A7C15)) | np.uint32(1)
        out.append(jnp.sum(words * weight, dtype=jnp.uint32))  # wraps: the order is immaterial
    return jnp.stack(out)


@jax.jit
def _leaf_sums(leaves):
    return jnp.stack([_word_sums(x) for x in leaves])  # [leaves, 2]


def weights_checksum(model) -> str:
    """A cheap fingerprint of a model's weights, for checkpoints to record what they trained
    against (the reference policy, the judging preference model) without fetching the weights
    to the host (`ref_cache.model_fingerprint` does that, and is exact).

    Per array leaf, two sums of its raw bit patterns weighted by odd functions of the element's
    index, modulo 2**32, on the device; then a SHA-256 (16 hex digits kept) over each leaf's path,
    dtype, shape and sums. Integer sums modulo 2**32 do not depend on the reduction's order, so
    the value is the same on any device count, sharding or backend. It detects changed weights
    (a change of any one 32-bit word, e.g. one float32 element, changes both sums; several
    changes could cancel only by a coincidence of the weights), not a crafted collision.
    The config (`cfg.to_json()`) is hashed too, its compute dtype included."""
    flat, _ = jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_array))
    sums = to_host(_leaf_sums([leaf for _, leaf in flat]))  # replicated: read on every host
    h = hashlib.sha256(b"ipo_gap.weights_checksum.v1\0")
    cfg = getattr(model, "cfg", None)
    h.update((cfg.to_json() if hasattr(cfg, "to_json") else "null").encode() + b"\0")
    for (path, leaf), s in zip(flat, sums, strict=True):
        h.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|{s[0]}|{s[1]}\0".encode())
    return h.hexdigest()[:16]
