"""Reference log-probs of an offline dataset, computed once and cached beside it.

Every run of an offline sweep (lr, beta, loss, ...) over one dataset uses the same reference
(SFT) policy, so log pi_ref(y_w|x) and log pi_ref(y_l|x) of every row are computed once here
and reused: the policy step then takes them from `PairBatch.ref_w/ref_l` instead of running
the reference model each step.

A cache is two files in `cache_dir`:

    <name>.npz     ref_w, ref_l (float32 [N]) and `key`, a copy of the sidecar's key JSON
    <name>.json    the sidecar: the key below plus informational fields

The key is what the values are a function of: the reference model's fingerprint
(`model_fingerprint`), the tokenizer's SHA-256, `normalize` ("sum" or "mean"), the number of
rows, and a SHA-256 of the dataset's token arrays (`data_fingerprint`). A cache whose key
differs from the current one is STALE: `load_or_compute` logs a warning naming each differing
entry, recomputes and overwrites it; a stale cache is never used. The evaluation batch size,
JAX version and backend are recorded too but are not part of the key (they move values by at
most float32 rounding).

Writes are atomic: each file is written to a temporary name in `cache_dir` and renamed into
place; the old sidecar is removed before the new arrays land and the new sidecar is written
last, and the arrays carry their own copy of the key, so a crash or a concurrent writer never
leaves a sidecar that vouches for arrays computed under another key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

import equinox as eqx
import jax
import numpy as np
from absl import logging

from ipo_gap import hosts, jsonl
from ipo_gap.data import sources
from ipo_gap.data.order_log import hash_batch
from ipo_gap.data.sources import PAIR_FIELDS
from ipo_gap.sharding import to_device, to_host
from ipo_gap.train import steps

FORMAT = "ipo_gap.ref_cache"
FORMAT_VERSION = 1
KEY_FIELDS = ("reference_fingerprint", "tokenizer_sha256", "normalize", "num_rows", "data_sha256")
_DATA_TAG = b"ipo_gap.ref_cache.data.v1\0"
_NORMALIZE_MODES = ("sum", "mean")


def model_fingerprint(model) -> str:
    """SHA-256 hex of a model's config JSON and all its arrays, in tree-path order.

    For each array leaf (in `jax.tree_util` flattening order, which is fixed by the model's
    structure) the digest takes its path, dtype, shape and raw bytes. Arrays are fetched to the
    host (all-gathered across the processes of a multi-host job: call it on every process).
    """
    h = hashlib.sha256(b"ipo_gap.model_fingerprint.v1\0")
    cfg = getattr(model, "cfg", None)
    cfg_json = cfg.to_json() if hasattr(cfg, "to_json") else json.dumps(None)
    h.update(cfg_json.encode("utf-8") + b"\0")
    flat, _ = jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_array))
    for path, leaf in flat:
        a = np.ascontiguousarray(to_host(leaf))
        header = f"{jax.tree_util.keystr(path)}|{a.dtype.name}|{a.shape}\0"
        h.update(header.encode("utf-8"))
        h.update(a.tobytes())
    return h.hexdigest()


def _check_data(data: Mapping[str, np.ndarray]) -> int:
    missing = [f for f in PAIR_FIELDS if f not in data]
    if missing:
        raise ValueError(f"the dataset lacks fields {missing}")
    rows = {f: np.shape(data[f])[0] if np.ndim(data[f]) else None for f in PAIR_FIELDS}
    if len(set(rows.values())) != 1 or None in rows.values():
        raise ValueError(f"dataset fields disagree on the number of rows: {rows}")
    return int(rows["prompt"])


def data_fingerprint(data: Mapping[str, np.ndarray]) -> str:
    """SHA-256 hex of the dataset's token arrays and masks (`PAIR_FIELDS`), as given.

    Uses the order log's canonical record (name, dtype, shape, bytes per field, fields in
    sorted name order), so the same arrays in another dtype hash differently.
    """
    _check_data(data)
    digest, _ = hash_batch(_DATA_TAG, {f: np.asarray(data[f]) for f in PAIR_FIELDS})
    return digest.hex()


def compute_reference_logprobs(
    ref_model, data: Mapping[str, np.ndarray], *, batch_size: int, normalize: str = "sum"
) -> tuple[np.ndarray, np.ndarray]:
    """(log pi_ref(y_w|x), log pi_ref(y_l|x)), float32 [N] each, for every row of `data`.

    Any model's log-probs of the pairs, in fact: the evaluator also measures the policy
    with it (`eval.margins_and_drift`).

    Runs `steps.reference_pair_logprobs` (jitted) over fixed-size batches of `batch_size` rows (one
    compilation); the last batch is padded by repeating the final row and the padding rows
    are dropped from the result.
    """
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {_NORMALIZE_MODES}, got {normalize!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = _check_data(data)
    arrays = [np.asarray(data[f]) for f in PAIR_FIELDS]
    out_w, out_l = [], []
    for idx, keep in sources.padded_batches(n, batch_size):
        batch = steps.PairBatch(*(to_device(a[idx]) for a in arrays))
        ref_w, ref_l = steps.reference_pair_logprobs(ref_model, batch, normalize=normalize)
        out_w.append(to_host(ref_w).astype(np.float32)[:keep])
        out_l.append(to_host(ref_l).astype(np.float32)[:keep])
    if n == 0:
        return np.zeros((0,), np.float32), np.zeros((0,), np.float32)
    return np.concatenate(out_w), np.concatenate(out_l)


def cache_paths(cache_dir: str | os.PathLike, name: str = "ref_logprobs") -> tuple[str, str]:
    """(arrays .npz path, sidecar .json path) of the cache `name` in `cache_dir`."""
    base = os.path.join(os.fspath(cache_dir), name)
    return base + ".npz", base + ".json"


def _key_json(key: Mapping) -> str:
    return json.dumps({k: key[k] for k in KEY_FIELDS}, sort_keys=True)


def _read_cache(npz_path: str, json_path: str, key: dict):
    """Returns (ref_w, ref_l) if a valid cache for `key` is there, else (None, reason)."""
    if not os.path.exists(json_path):
        return None, ("no sidecar" if os.path.exists(npz_path) else None)
    try:
        with open(json_path) as f:
            sidecar = json.load(f)
        if sidecar.get("format") != FORMAT or sidecar.get("format_version") != FORMAT_VERSION:
            return None, f"{json_path}: not a version-{FORMAT_VERSION} {FORMAT} sidecar"
    except (OSError, ValueError, AttributeError) as e:
        return None, f"{json_path}: unreadable ({e})"
    differ = [
        f"{k}: cached {sidecar.get(k)!r}, now {key[k]!r}"
        for k in KEY_FIELDS
        if sidecar.get(k) != key[k]
    ]
    if differ:
        return None, "; ".join(differ)
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            stored_key, ref_w, ref_l = str(z["key"]), z["ref_w"], z["ref_l"]
    except (OSError, ValueError, KeyError) as e:
        return None, f"{npz_path}: unreadable ({e})"
    n = key["num_rows"]
    if stored_key != _key_json(key):
        return None, f"{npz_path}: its arrays were computed under another key than the sidecar's"
    if ref_w.shape != (n,) or ref_l.shape != (n,) or ref_w.dtype != np.float32:
        return None, f"{npz_path}: arrays {ref_w.shape}/{ref_l.shape} {ref_w.dtype}, want ({n},)"
    return (ref_w, ref_l), None


def load_or_compute(
    cache_dir: str | os.PathLike,
    ref_model,
    data: Mapping[str, np.ndarray],
    *,
    tokenizer_sha256: str,
    normalize: str = "sum",
    batch_size: int = 64,
    name: str = "ref_logprobs",
    reference_fingerprint: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The reference log-probs of `data`, from the cache in `cache_dir` if it is current.

    Args:
      cache_dir: directory of the cache (created if missing), e.g. the dataset's directory.
      ref_model: the reference policy; hashed (`model_fingerprint`) to key the cache, and
        run only when the cache is missing or stale.
      data: the dataset's arrays (at least `PAIR_FIELDS`, [N, ...] each).
      tokenizer_sha256: identity of the tokenizer the token ids belong to.
      normalize: "sum" (the paper's sequence log-prob) or "mean" (per token).
      batch_size: rows per reference forward pass when computing.
      name: file name stem, so one directory can hold several caches.
      reference_fingerprint: `model_fingerprint(ref_model)` if already known (skips hashing).

    Returns:
      (ref_w, ref_l), float32 numpy arrays [N].
    """
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {_NORMALIZE_MODES}, got {normalize!r}")
    key = {
        "reference_fingerprint": reference_fingerprint or model_fingerprint(ref_model),
        "tokenizer_sha256": str(getattr(tokenizer_sha256, "sha256", tokenizer_sha256)),
        "normalize": normalize,
        "num_rows": _check_data(data),
        "data_sha256": data_fingerprint(data),
    }
    os.makedirs(cache_dir, exist_ok=True)
    npz_path, json_path = cache_paths(cache_dir, name)
    cached, reason = _read_cache(npz_path, json_path, key)
    if cached is not None:
        logging.info("reference log-probs: using the cache %s", npz_path)
        return cached
    if reason:
        logging.warning("reference log-probs cache %s is STALE (%s); recomputing", npz_path, reason)
    ref_w, ref_l = compute_reference_logprobs(
        ref_model, data, batch_size=batch_size, normalize=normalize
    )
    if hosts.exists(json_path):  # From here no sidecar vouches for the old arrays.
        hosts.remove(json_path)
    key_json = _key_json(key)
    jsonl.write_file_atomic(npz_path, lambda f: np.savez(f, ref_w=ref_w, ref_l=ref_l, key=key_json))
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **key,
        "arrays": os.path.basename(npz_path),
        "batch_size": batch_size,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
    }
    text = json.dumps(sidecar, indent=1, sort_keys=True) + "\n"
    jsonl.write_atomic(json_path, text)
    logging.info("reference log-probs: computed %d rows into %s", key["num_rows"], npz_path)
    return ref_w, ref_l


def with_refs(
    data: Mapping[str, np.ndarray], ref_w, ref_l, normalize: str = "sum"
) -> dict[str, np.ndarray]:
    """A copy of `data` with `ref_w`/`ref_l` columns, which sources then slice with the rest,
    and a `ref_per_token` column (True where `normalize` was "mean"), so that a loop whose
    loss normalises otherwise refuses the batch (`loop.check_pair_batch`) instead of mixing
    a per-token reference with sequence log-probs."""
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {_NORMALIZE_MODES}, got {normalize!r}")
    n = _check_data(data)
    if np.shape(ref_w) != (n,) or np.shape(ref_l) != (n,):
        raise ValueError(f"ref_w {np.shape(ref_w)} / ref_l {np.shape(ref_l)} for {n} rows")
    return {
        **data,
        "ref_w": np.asarray(ref_w, np.float32),
        "ref_l": np.asarray(ref_l, np.float32),
        "ref_per_token": np.full(n, normalize == "mean"),
    }


def pair_batch(batch: Mapping[str, np.ndarray]) -> steps.PairBatch:
    """A `PairBatch` of a source's batch, carrying ref_w/ref_l when the batch has them."""
    fields = [to_device(batch[f]) for f in PAIR_FIELDS]
    if "ref_w" in batch:
        return steps.PairBatch(*fields, to_device(batch["ref_w"]), to_device(batch["ref_l"]))
    return steps.PairBatch(*fields)
