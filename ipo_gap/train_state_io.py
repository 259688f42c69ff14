"""Save and restore a whole train state (arrays + JSON metadata) with orbax-checkpoint.

A train state is any equinox pytree; `TrainState` is the usual one. Only its array leaves are
written (`eqx.partition(state, eqx.is_array)`); everything else (static fields, the model's
config, optax's update functions) comes back from the template passed to `restore`, which
fixes the structure, shapes and dtypes and, optionally, the shardings of the restored arrays.

On disk, one step is a directory `<root>/<step>/` with two orbax items: `state` (a
PyTreeCheckpointHandler tree: nested dicts keyed by the pytree path, e.g.
`model/encoder/layers/sa/q`) and `metadata` (a JSON object: configs, tokenizer SHA, ...).

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>/` and only then
finalises it, by an atomic rename on local/POSIX file systems or by writing
`commit_success.txt` last on object stores (GCS). Step listings ignore unfinalised
directories, so a crash mid-save never leaves a checkpoint that looks valid; `rollback` also
removes such leftovers. Saves here are synchronous by default: when `save` returns, the step
is final. With `async_save=True` that holds after `wait_until_finished()` (or `close()`).

Typed PRNG keys (dtype key<impl>) cannot be saved; keep raw key data in the state
(`key_to_data`) and rewrap it when needed (`data_to_key`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath  # orbax's path library (a dependency of orbax-checkpoint)

from ipo_gap import hosts

_STATE = "state"
_METADATA = "metadata"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_MAX_LISTED = 20


class TrainState(eqx.Module):
    """A generic train state: every field is an array or a pytree of arrays.

    Attributes:
      model: any equinox module (e.g. a T5).
      opt_state: the optax state of `model`'s arrays.
      step: int32 scalar, optimizer steps taken.
      rng: raw uint32 key data of the base PRNG key (see `key_to_data`); per-step keys are
        `fold_in(data_to_key(rng), step)`.
      data_position: position in the data stream (an int array or a small pytree of arrays).
    """

    model: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    data_position: Any

    def key(self, impl: str | None = None) -> jax.Array:
        """The base PRNG key as a typed key."""
        return data_to_key(self.rng, impl)


def _refuse_python_numbers(state) -> None:
    """Only array leaves are saved: a Python number in a `TrainState` field (`step=7`) was
    dropped without a word, and a restore returned the template's value in its place."""
    if not isinstance(state, TrainState):
        return
    for field in ("step", "rng", "data_position"):
        flat, _ = jax.tree_util.tree_flatten_with_path(getattr(state, field))
        for path, leaf in flat:
            if isinstance(leaf, (bool, int, float, complex)) and not eqx.is_array(leaf):
                raise TypeError(
                    f"TrainState.{field}{jax.tree_util.keystr(path)} is the Python "
                    f"number {leaf!r}, which a checkpoint does not save (only arrays are): "
                    "pass an array (e.g. jnp.int32(...))"
                )


def key_to_data(key: jax.Array) -> jax.Array:
    """Raw uint32 key data of a typed key (raw uint32 keys are returned unchanged)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    if key.dtype != np.uint32:
        raise TypeError(f"expected a PRNG key or uint32 key data, got dtype {key.dtype}")
    return key


def data_to_key(data: jax.Array, impl: str | None = None) -> jax.Array:
    """A typed key from raw key data (the default implementation unless `impl` is given)."""
    return jax.random.wrap_key_data(data, impl=impl)


# --------------------------------------------------------------------------------------------
# Pytree <-> nested dict of arrays.


def _entry_name(entry) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    raise TypeError(f"unsupported pytree path entry {entry!r}")


def _is_template_leaf(x) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _array_leaves(tree, is_leaf_fn) -> tuple[list, Any, list[tuple[str, ...]], list[str]]:
    """(array leaves, rest of the tree, storage names, printable paths) of `tree`."""
    arrays, rest = eqx.partition(tree, is_leaf_fn)
    flat, _ = jax.tree_util.tree_flatten_with_path(arrays)
    names = [tuple(_entry_name(e) for e in path) for path, _ in flat]
    paths = [jax.tree_util.keystr(path) for path, _ in flat]
    if len(set(names)) != len(names):
        seen, dup = set(), None
        for n, p in zip(names, paths, strict=True):
            if n in seen:
                dup = p
            seen.add(n)
        raise ValueError(f"two array leaves map to the same checkpoint name (e.g. {dup})")
    for leaf, path in zip([x for _, x in flat], paths, strict=True):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"leaf {path} is a typed PRNG key, which cannot be checkpointed; store "
                "key_to_data(key) (raw uint32 key data) and rewrap it with data_to_key"
            )
    return [x for _, x in flat], rest, names, paths


def _nest(names: Sequence[tuple[str, ...]], values: Sequence[Any]) -> dict:
    out: dict = {}
    for name, value in zip(names, values, strict=True):
        node = out
        for part in name[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"checkpoint name {'/'.join(name)} collides with a leaf")
        if name[-1] in node:
            raise ValueError(f"checkpoint name {'/'.join(name)} collides with a subtree")
        node[name[-1]] = value
    return out


def _flatten_nested(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten_nested(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _listing(items: Sequence[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _json_default(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"metadata value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")


def _local_or_remote(directory) -> str:
    directory = os.fspath(directory)
    return directory if "://" in directory else os.path.abspath(directory)


# --------------------------------------------------------------------------------------------
# The manager.


class CheckpointManager:
    """Saves train states under `directory/<step>/`; a thin wrapper over orbax's manager.

    Args:
      directory: root directory (created if missing); local path or URL (gs://...).
      max_to_keep: keep only the newest this many steps (None: keep all).
      save_interval_steps: `save` writes only steps on this interval (and the first one),
        unless `force=True`.
      async_save: write in a background thread; the step is final only after
        `wait_until_finished()`, the next `save`, or `close()`. Default False: synchronous.
    """

    def __init__(
        self,
        directory,
        *,
        max_to_keep: int | None = None,
        save_interval_steps: int = 1,
        async_save: bool = False,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        self.directory = _local_or_remote(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
        )
        registry = ocp.handlers.create_default_handler_registry(
            **{_STATE: ocp.PyTreeCheckpointHandler(), _METADATA: ocp.JsonCheckpointHandler()}
        )
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )

    # ---- steps ---------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Finalised steps, ascending."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def reload(self):
        """Re-reads the step list from disk (after another process changed the directory)."""
        self._mngr.reload()

    def _require_step(self, step: int):
        if step not in self._mngr.all_steps():
            self._mngr.reload()
        if step not in self._mngr.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; "
                f"available steps: {self.all_steps() or 'none'}"
            )

    # ---- save ----------------------------------------------------------------------------

    def save(
        self, step: int, state, *, metadata: Mapping[str, Any] | None = None, force: bool = False
    ) -> bool:
        """Saves the array leaves of `state` and a JSON `metadata` object as `step`.

        Returns whether a checkpoint was written: False when `step` is off the save interval
        or older than the latest saved step, unless `force` (which writes it). Raises if
        `step` is saved already (orbax skipped that silently without `force`). Metadata values
        may be JSON types, numpy scalars, or objects with `to_dict()` (configs).
        """
        step = int(step)
        if step in self._mngr.all_steps():
            raise ValueError(
                f"{self.directory}: step {step} is saved already (steps {self.all_steps()}); "
                "a step is written once (`rollback` removes it and the steps after it)"
            )
        _refuse_python_numbers(state)
        leaves, _, names, _ = _array_leaves(state, eqx.is_array)
        if not leaves:
            raise ValueError("the state has no array leaves to save")
        # Serialise before orbax starts writing, so a bad value fails without side effects.
        meta = json.loads(json.dumps(dict(metadata or {}), default=_json_default))
        return self._mngr.save(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.PyTreeSave(_nest(names, leaves)),
                    _METADATA: ocp.args.JsonSave(meta),
                }
            ),
            force=force,
        )

    # ---- restore -------------------------------------------------------------------------

    def _saved_arrays(self, step: int) -> dict[tuple[str, ...], Any]:
        tree = self._mngr.metadata(step).item_metadata[_STATE]
        tree = getattr(tree, "tree", tree)  # orbax >= 0.11 wraps the tree in TreeMetadata
        return _flatten_nested(tree)

    def restore(self, step: int | None, like, *, shardings=None):
        """Restores `step` (None: the latest) onto the template `like`.

        Args:
          step: the step to restore, or None for the latest.
          like: a state of the saved structure; its array leaves (jax.Array, np.ndarray or
            jax.ShapeDtypeStruct, e.g. from `eqx.filter_eval_shape`) give the shapes and
            dtypes, which must equal the saved ones, and its other leaves are kept as they are.
          shardings: None, one `jax.sharding.Sharding` for every non-numpy leaf, or a pytree like
            `eqx.filter(like, eqx.is_array)` with a Sharding or None at every array leaf.
            A leaf with a Sharding is restored as a jax.Array on it; a leaf without one goes
            where the template's leaf is (its `.sharding`; numpy leaves stay numpy; leaves
            with no sharding go to the first device).

        Returns:
          A state like `like` with the saved arrays.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoints in {self.directory}")
        step = int(step)
        self._require_step(step)
        leaves, rest, names, paths = _array_leaves(like, _is_template_leaf)
        self._check_against_saved(step, leaves, names, paths)
        per_leaf = self._leaf_shardings(shardings, leaves, paths)
        items, restore_args = [], []
        for leaf, sharding in zip(leaves, per_leaf, strict=True):
            dtype = np.dtype(leaf.dtype)
            if sharding is None and isinstance(leaf, np.ndarray):
                items.append(leaf)  # restored as a host numpy array
                restore_args.append(ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype))
                continue
            if sharding is None:
                sharding = getattr(leaf, "sharding", None) or jax.sharding.SingleDeviceSharding(
                    jax.devices()[0]
                )
            items.append(jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=sharding))
            restore_args.append(
                ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=dtype)
            )
        restored = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.PyTreeRestore(
                        item=_nest(names, items), restore_args=_nest(names, restore_args)
                    )
                }
            ),
        )[_STATE]
        flat = _flatten_nested(restored)
        arrays_template, _ = eqx.partition(like, _is_template_leaf)
        treedef = jax.tree_util.tree_structure(arrays_template)
        arrays = jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])
        return eqx.combine(arrays, rest)

    def _check_against_saved(self, step, leaves, names, paths):
        saved = self._saved_arrays(step)
        path_of = dict(zip(names, paths, strict=True))
        missing = [path_of[n] for n in names if n not in saved]
        extra = ["/".join(n) for n in saved if n not in path_of]
        problems = []
        if missing:
            problems.append(f"arrays in the template but not the checkpoint: {_listing(missing)}")
        if extra:
            problems.append(f"arrays in the checkpoint but not the template: {_listing(extra)}")
        for leaf, name, path in zip(leaves, names, paths, strict=True):
            meta = saved.get(name)
            if meta is None:
                continue
            saved_shape, saved_dtype = tuple(meta.shape), np.dtype(meta.dtype)
            shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
            if saved_shape != shape or saved_dtype != dtype:
                problems.append(
                    f"parameter {path}: checkpoint has shape {saved_shape} dtype {saved_dtype}, "
                    f"template has shape {shape} dtype {dtype}"
                )
        if problems:
            if len(problems) > _MAX_LISTED:
                more = len(problems) - _MAX_LISTED
                problems = problems[:_MAX_LISTED] + [f"... ({more} more)"]
            raise ValueError(
                f"checkpoint step {step} in {self.directory} does not match the template:\n  "
                + "\n  ".join(problems)
            )

    @staticmethod
    def _leaf_shardings(shardings, leaves, paths) -> list:
        """One Sharding or None (default placement) per template array, in `paths` order."""
        if shardings is None:
            return [None] * len(paths)
        if isinstance(shardings, jax.sharding.Sharding):
            return [None if isinstance(x, np.ndarray) else shardings for x in leaves]
        flat, _ = jax.tree_util.tree_flatten_with_path(
            shardings, is_leaf=lambda x: x is None or isinstance(x, jax.sharding.Sharding)
        )
        given = {}
        for path, s in flat:
            if s is not None and not isinstance(s, jax.sharding.Sharding):
                raise TypeError(
                    f"shardings{jax.tree_util.keystr(path)} is a {type(s).__name__}, "
                    "not a jax.sharding.Sharding or None"
                )
            given[jax.tree_util.keystr(path)] = s
        wanted = set(paths)
        missing = [p for p in paths if p not in given]
        extra = sorted(p for p, s in given.items() if s is not None and p not in wanted)
        if missing or extra:
            raise ValueError(
                "shardings do not match the template's arrays; "
                f"arrays without an entry: {_listing(missing) or 'none'}; "
                f"shardings for non-arrays: {_listing(extra) or 'none'}"
            )
        return [given[p] for p in paths]

    def restore_metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata saved with `step` (None: the latest)."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoints in {self.directory}")
        step = int(step)
        self._require_step(step)
        out = self._mngr.restore(
            step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
        )
        return out[_METADATA]

    # ---- lifecycle -----------------------------------------------------------------------

    def wait_until_finished(self):
        """Blocks until an async save is final (a no-op for synchronous saves)."""
        self._mngr.wait_until_finished()

    def close(self):
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def rollback(directory, keep_up_to_step: int) -> list[int]:
    """Deletes every checkpoint newer than `keep_up_to_step` and unfinished (temporary) saves.

    Used on resume after a pre-emption: checkpoints written past the step the run resumes from
    would otherwise be mistaken for its own. Call it while nothing else writes to `directory`.
    Returns the deleted steps.
    """
    directory = _local_or_remote(directory)
    root = epath.Path(directory)
    if not root.exists():
        return []
    mngr = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=False, save_interval_steps=1)
    )
    try:
        doomed = sorted(s for s in mngr.all_steps() if s > keep_up_to_step)
        for s in doomed:
            mngr.delete(s)
    finally:
        mngr.close()
    unfinished = [c for c in root.iterdir() if _TMP_MARKER in c.name and c.is_dir()]
    for child in hosts.listed(unfinished):  # agreed before process 0 deletes any
        hosts.remove(child)
    return doomed
