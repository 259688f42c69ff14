"""Device meshes, logical-axis sharding rules, shard helpers, and multi-host set-up.

A mesh is named by a string like "data:4,model:2" (`make_mesh`). Every parameter carries
logical axis names (`ipo_gap.t5.model.logical_axes`); one table, `LOGICAL_RULES`, maps them to
mesh axes the way t5x does (batch -> data; heads, mlp, vocab -> model; the rest replicated).

Two rules keep every mesh usable with every model, at the cost of replication:
  * a rule naming a mesh axis the mesh lacks (e.g. "model" on a "data:8" mesh) replicates;
  * a dimension whose size is not divisible by its mesh axis size is replicated along that
    dimension (e.g. 6 heads on model:4). These fallbacks are logged by `model_shardings` and
    listed by `sharding_fallbacks`, so that a silently replicated weight can be seen.
Batches are stricter: `shard_batch` raises when the batch does not divide over "data".

Meshes use `AxisType.Auto` axes (GSPMD propagation: shardings are given at the jit boundary
and the compiler places the rest). Note that `jax.make_mesh` defaults to `AxisType.Explicit`
since JAX 0.7, which makes sharding part of array types and rejects some ops on sharded
operands; we ask for Auto explicitly.

Multi-host: call `initialize_distributed(True)` first thing in a binary; each host loads
`process_batch_slice(...)` of the global batch and `shard_batch` assembles the global array.

The study's code (trainers, evaluation, data sources) takes its mesh from the context:
inside `with use_mesh(mesh):`, `init_model` creates a model sharded by `LOGICAL_RULES` and
`to_device` puts a host batch with its leading axis over "data"; outside, both are plain
single-device placements, so an unsharded run's bits do not depend on this module.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ipo_gap.t5 import model as t5
from ipo_gap.t5.model import Axes, DecodeCache, logical_axes

DEFAULT_MESH_SPEC = "data:1"
DATA_AXIS = "data"
MODEL_AXIS = "model"

# Logical axis name -> mesh axis name (or None: replicated). t5x's standard 1-D/2-D rules.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", DATA_AXIS),
    ("heads", MODEL_AXIS),
    ("mlp", MODEL_AXIS),
    ("vocab", MODEL_AXIS),
    ("kv", None),
    ("embed", None),
    ("layers", None),
    ("relpos_buckets", None),
    ("length", None),
)

# Logical axes of the decoder KV cache (fields of `DecodeCache`).
# K/V fields are tuples with one array per layer; each array has these axes.
CACHE_AXES = DecodeCache(
    self_k=Axes(("batch", "heads", "length", "kv")),
    self_v=Axes(("batch", "heads", "length", "kv")),
    cross_k=Axes(("batch", "heads", "length", "kv")),
    cross_v=Axes(("batch", "heads", "length", "kv")),
    src_mask=Axes(("batch", "length")),
    index=Axes(()),
)

Rules = Mapping[str, str | None] | Sequence[tuple[str, str | None]]

_AXIS_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):(-?\d+)$")


def _check_axes(axes: Mapping[str, int], spec: Any) -> dict[str, int]:
    axes = dict(axes)
    for name, size in axes.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"bad mesh axis name {name!r} in {spec!r}")
        if not isinstance(size, int) or size == 0 or size < -1:
            raise ValueError(f"mesh axis {name!r} has size {size!r} in {spec!r}; must be > 0 or -1")
    if not axes:
        raise ValueError(f"mesh spec {spec!r} has no axes")
    if sum(size == -1 for size in axes.values()) > 1:
        raise ValueError(f"at most one mesh axis may have size -1, got {spec!r}")
    return axes


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """Parses "data:4,model:2" into {"data": 4, "model": 2} (insertion-ordered).

    A size of -1 (at most one axis) means "all remaining devices" and is resolved by
    `make_mesh`. Whitespace around entries is ignored.

    Raises:
      ValueError: on an empty or malformed spec, a non-positive size other than -1, a
        duplicate axis name, or more than one -1.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"mesh spec must be a non-empty string like 'data:4,model:2', got {spec!r}"
        )
    axes: dict[str, int] = {}
    for entry in spec.split(","):
        match = _AXIS_RE.match(entry.strip())
        if match is None:
            raise ValueError(
                f"bad mesh spec entry {entry.strip()!r} in {spec!r}: expected NAME:SIZE, "
                "e.g. 'data:4,model:2' (SIZE a positive int, or -1 for the remaining devices)"
            )
        name, size = match.group(1), int(match.group(2))
        if name in axes:
            raise ValueError(f"duplicate mesh axis {name!r} in {spec!r}")
        axes[name] = size
    return _check_axes(axes, spec)


def _resolve_sizes(axes: dict[str, int], num_devices: int) -> dict[str, int]:
    fixed = math.prod(size for size in axes.values() if size != -1)
    if -1 in axes.values():
        if num_devices % fixed:
            raise ValueError(
                f"mesh {axes}: {num_devices} devices are not divisible by the fixed axes' "
                f"product {fixed}, so -1 cannot be resolved"
            )
        axes = {n: (num_devices // fixed if s == -1 else s) for n, s in axes.items()}
    if math.prod(axes.values()) != num_devices:
        raise ValueError(
            f"mesh {axes} needs {math.prod(axes.values())} devices but {num_devices} are given; "
            "use -1 for one axis (e.g. 'data:-1') or pass devices=jax.devices()[:n]"
        )
    return axes


def make_mesh(spec: str | Mapping[str, int] = DEFAULT_MESH_SPEC, devices=None) -> Mesh:
    """Builds a `Mesh` with Auto axes from a spec like "data:4,model:2".

    Args:
      spec: a mesh spec string (see `parse_mesh_spec`) or a {name: size} mapping. The default
        "data:1" is a one-device mesh (CPU runs, tests).
      devices: the devices to lay out; defaults to all devices of all processes
        (`jax.devices()`). Their number must equal the product of the axis sizes.

    Returns:
      The mesh, with devices ordered for the physical topology where JAX knows it (TPU).

    Raises:
      ValueError: for a bad spec or when the axis sizes do not multiply to the device count.
    """
    axes = parse_mesh_spec(spec) if isinstance(spec, str) else _check_axes(spec, spec)
    devices = list(jax.devices() if devices is None else devices)
    axes = _resolve_sizes(axes, len(devices))
    shape, names = tuple(axes.values()), tuple(axes)
    auto = (AxisType.Auto,) * len(names)
    try:
        return jax.make_mesh(shape, names, axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError) as e:
        # Topology-aware placement can fail for unusual shapes or device subsets; fall back
        # to the given order, which is always valid (if not always fastest).
        logging.warning("jax.make_mesh(%s) failed (%s); using plain device order", axes, e)
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), names, axis_types=auto)


def _rules_dict(rules: Rules) -> dict[str, str | None]:
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    table: dict[str, str | None] = {}
    for logical, mesh_axis in items:
        if logical in table:
            raise ValueError(f"logical axis {logical!r} appears twice in the sharding rules")
        table[logical] = mesh_axis
    return table


def _spec_and_fallbacks(
    names: Sequence[str | None], shape: Sequence[int] | None, rules: Rules, mesh
) -> tuple[PartitionSpec, list[str]]:
    """The PartitionSpec of one array, and the dimensions that fell back to replication."""
    table = _rules_dict(rules)
    if mesh is None:  # no mesh: keep every rule's axis, sizes unknown (taken as 1)
        mesh_sizes = {a: 1 for a in table.values() if a is not None}
    else:
        mesh_sizes = dict(mesh.shape)
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    out: list[str | None] = []
    fallbacks: list[str] = []
    used: set[str] = set()
    for dim, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; rules: {sorted(table)}")
        mesh_axis = table[name]
        if mesh_axis is None or mesh_axis not in mesh_sizes or mesh_axis in used:
            out.append(None)
            continue
        size = mesh_sizes[mesh_axis]
        if shape is not None and shape[dim] % size:
            fallbacks.append(
                f"dim {dim} ({name}={shape[dim]}) not divisible by {mesh_axis}={size}: replicated"
            )
            out.append(None)
            continue
        used.add(mesh_axis)
        out.append(mesh_axis)
    return PartitionSpec(*out), fallbacks


def logical_to_spec(
    names: Sequence[str | None], rules: Rules = LOGICAL_RULES, mesh=None, shape=None
) -> PartitionSpec:
    """Maps logical axis names to a `PartitionSpec` over the mesh's axes.

    Args:
      names: one logical name per dimension (None: replicated).
      rules: logical name -> mesh axis name or None (`LOGICAL_RULES` by default).
      mesh: a `Mesh` or `AbstractMesh`; rules naming an axis it lacks give None. When None,
        every rule's mesh axis is kept.
      shape: the array's shape; when given, a dimension not divisible by its mesh axis size
        is replicated (see the module docstring).

    Returns:
      A PartitionSpec with one entry per dimension. A mesh axis is used at most once: a later
      dimension mapping to an already used axis is replicated.

    Raises:
      KeyError: for a logical name without a rule.
    """
    return _spec_and_fallbacks(names, shape, rules, mesh)[0]


def _is_axes(x) -> bool:
    return isinstance(x, Axes)


def sharding_fallbacks(model, mesh, rules: Rules = LOGICAL_RULES) -> list[str]:
    """Lists the parameters that `model_shardings` replicates on a dimension it would shard.

    Works on concrete or abstract models (e.g. from `eqx.filter_eval_shape(t5.model.init, ...)`).
    Returns lines like "decoder.layers.sa.q: dim 2 (heads=6) not divisible by model=4: ...".
    """
    lines: list[str] = []

    def visit(path, axes: Axes, leaf):
        for msg in _spec_and_fallbacks(axes.names, leaf.shape, rules, mesh)[1]:
            lines.append(f"{jax.tree_util.keystr(path, simple=True, separator='.')}: {msg}")

    jax.tree_util.tree_map_with_path(visit, logical_axes(model), model, is_leaf=_is_axes)
    return lines


def model_shardings(model, mesh: Mesh, rules: Rules = LOGICAL_RULES):
    """A pytree like `model` whose leaves are the `NamedSharding` of each parameter.

    Usable as jit in/out shardings, and on abstract models to initialise directly sharded.
    Replication fallbacks (see `sharding_fallbacks`) are logged once per call.
    """
    for line in sharding_fallbacks(model, mesh, rules):
        logging.warning("sharding fallback: %s", line)
    return jax.tree.map(
        lambda axes, leaf: NamedSharding(
            mesh, logical_to_spec(axes.names, rules, mesh, leaf.shape)
        ),
        logical_axes(model),
        model,
        is_leaf=_is_axes,
    )


def shard_model(model, mesh: Mesh, rules: Rules = LOGICAL_RULES):
    """Returns `model` with every array placed on its `model_shardings` sharding.

    Static fields (the config, norms' eps) are untouched: only array leaves move.
    """
    shardings = model_shardings(model, mesh, rules)
    return jax.tree.map(place, model, shardings)


def place(x, sharding: NamedSharding) -> jax.Array:
    """`x` (a host or one-device array, the same on every process) placed on `sharding`.

    On several processes each builds only its own devices' shards from its copy of `x`
    (`make_array_from_callback`): `jax.device_put` onto a sharding that spans processes first
    checks that every process holds equal values, by an all-gather that puts the whole array,
    once per process, on every device (for an XXL model, gigabytes per parameter).
    """
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _data_size(mesh: Mesh) -> int:
    return dict(mesh.shape).get(DATA_AXIS, 1)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a rank-`ndim` batch array: leading axis over "data", others replicated.

    A scalar (ndim 0), or a mesh without a "data" axis, gives a replicated sharding.
    """
    if ndim == 0 or DATA_AXIS not in mesh.shape:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS, *([None] * (ndim - 1))))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree of host arrays on the mesh with their leading (batch) axis over "data".

    On one process `tree` is the global batch. On several, it is this process's rows
    (`process_batch_slice`) and the global arrays are assembled with
    `jax.make_array_from_process_local_data`.

    Raises:
      ValueError: when a leaf's global batch size is not divisible by the "data" axis size.
    """
    data = _data_size(mesh)
    nproc = jax.process_count()

    def put(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        sharding = batch_sharding(mesh, x.ndim)
        if x.ndim == 0:
            return jax.device_put(x, sharding)
        global_batch = x.shape[0] * nproc
        if global_batch % data:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path) or '(root)'} of shape {x.shape} "
                f"(global batch {global_batch}) is not divisible by the mesh's "
                f"'{DATA_AXIS}' axis of size {data}"
            )
        if nproc == 1:
            return jax.device_put(x, sharding)
        global_shape = (global_batch,) + tuple(x.shape[1:])
        local = sharding.addressable_devices_indices_map(global_shape).values()
        check_process_rows([index[0] for index in local], global_batch, mesh)
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree_util.tree_map_with_path(put, tree)


def cache_shardings(cache: DecodeCache, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> DecodeCache:
    """Shardings of a `DecodeCache` (concrete or abstract, e.g. from `jax.eval_shape`).

    K/V (one B x H x T x K array per layer): batch over data, heads over model; src_mask
    (B x S): batch over data; index: replicated. Indivisible dimensions are replicated as for
    parameters.
    """

    def one(axes, leaf):
        return NamedSharding(mesh, logical_to_spec(axes.names, rules, mesh, np.shape(leaf)))

    return DecodeCache(
        *(
            tuple(one(axes, x) for x in leaf) if isinstance(leaf, tuple) else one(axes, leaf)
            for axes, leaf in zip(CACHE_AXES, cache, strict=True)
        )
    )


def initialize_distributed(
    enabled: bool,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Connects the processes of a multi-host job (`jax.distributed.initialize`).

    Call it once, at the start of a binary and before any other JAX call. A no-op when
    `enabled` is False (single-host runs). On Cloud TPU VMs, and on GPU clusters launched by
    SLURM or Open MPI, all three arguments may be left None: JAX detects them from the
    environment. Elsewhere pass them all: the coordinator's "host:port" (process 0), the
    number of processes, and this process's id in [0, num_processes).
    """
    if not enabled:
        return
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def check_process_rows(
    row_slices, global_batch: int, mesh, process_index=None, process_count=None
) -> None:
    """Raises unless this process's devices hold exactly its `process_batch_slice` rows of a
    batch: the rows each process loads. Where the "model" axis spans hosts, two processes
    hold the same rows, and each loading its own would assemble a batch of mismatched
    halves, silently; that layout would need every process to load the whole batch."""
    want = process_batch_slice(
        global_batch, process_index=process_index, process_count=process_count
    )
    held = set()
    for rows in row_slices:
        start, stop, _ = rows.indices(global_batch)
        held.update(range(start, stop))
    if held != set(range(want.start, want.stop)):
        lo, hi = (min(held), max(held) + 1) if held else (0, 0)
        raise ValueError(
            f"on mesh {dict(mesh.shape)} this process's devices hold rows [{lo}, {hi}) of the "
            f"global batch of {global_batch}, not the rows [{want.start}, {want.stop}) it loads "
            "(process_batch_slice): the mesh's 'model' axis spans hosts, or it has no 'data' axis "
            "(keep 'model' within a host and split hosts over 'data')"
        )


def process_batch_slice(
    global_batch: int, *, process_index: int | None = None, process_count: int | None = None
) -> slice:
    """The rows of a global batch that this process loads for multi-host data loading.

    Process i of n gets rows [i * global_batch / n, (i + 1) * global_batch / n). This matches
    `shard_batch` when each process's devices hold a contiguous block of the "data" axis,
    which is the case when the "model" axis does not span hosts (the usual layout).

    Args:
      global_batch: the batch size summed over all processes.
      process_index: defaults to `jax.process_index()` (overridable for tests).
      process_count: defaults to `jax.process_count()`.

    Raises:
      ValueError: when global_batch is not divisible by the process count.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} not in [0, {count})")
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} not divisible by {count} processes")
    per = global_batch // count
    return slice(index * per, (index + 1) * per)


# ---- the ambient mesh of the study's code ------------------------------------------------

_MESHES: list[Mesh] = []  # a stack: `use_mesh` contexts nest


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
    """Within the block, `init_model` and `to_device` place onto `mesh` (None: no mesh)."""
    _MESHES.append(mesh)
    try:
        yield mesh
    finally:
        _MESHES.pop()


def active_mesh() -> Mesh | None:
    """The mesh of the innermost `use_mesh` block, or None."""
    return _MESHES[-1] if _MESHES else None


def init_model(cfg, *, key: jax.Array, mesh: Mesh | None = None, rules: Rules = LOGICAL_RULES):
    """`t5.init(cfg, key=key)` (the same values, bit for bit), each parameter created on its
    `model_shardings` placement over `mesh` (default: the active mesh; none: `t5.init`).

    With a mesh, the parameters are drawn by `t5.init_by_counters` inside one jit whose
    outputs are sharded, so every device computes only its own shards: no device ever holds
    the whole model (`t5.init` draws one vector as large as the model, with temporaries
    about four times that, on one device). Where the counters cannot reproduce `t5.init`
    (non-threefry keys, or jax_threefry_partitionable off), it falls back to `t5.init` on one
    device and then shards, with a warning.
    """
    mesh = active_mesh() if mesh is None else mesh
    if mesh is None:
        return t5.init(cfg, key=key)
    if not t5.counters_supported(key):
        logging.warning("init_model: counters unsupported for this key; init on one device")
        return shard_model(t5.init(cfg, key=key), mesh, rules)
    abstract = eqx.filter_eval_shape(t5.init_by_counters, cfg, key=key)
    static = eqx.filter(abstract, lambda x: not isinstance(x, jax.ShapeDtypeStruct))
    shardings = eqx.filter(
        model_shardings(abstract, mesh, rules), lambda x: isinstance(x, NamedSharding)
    )

    def draw(k):
        return eqx.filter(t5.init_by_counters(cfg, key=k), eqx.is_array)

    return eqx.combine(jax.jit(draw, out_shardings=shardings)(key), static)


def to_device(x) -> jax.Array:
    """A host batch array on the device(s): `jnp.asarray(x)` without an active mesh.

    With one, the leading (batch) axis goes over "data" when the mesh's "data" size divides
    it, and the array is replicated otherwise (a batch of 3 on data:4 still runs). Every
    process is expected to hold the same global `x` (the study computes its batches
    deterministically on each process), and each takes its own shards from it.
    """
    mesh = active_mesh()
    if mesh is None:
        return jnp.asarray(x)
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim)
    if x.ndim and x.shape[0] % _data_size(mesh):
        sharding = NamedSharding(mesh, PartitionSpec())
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_jit_arg(x):
    """A host batch array to pass to a jitted function: `x` itself without an active mesh (the
    jitted call transfers it; ~10x cheaper on the host than `jnp.asarray`'s eager dispatch,
    which costs ~0.1 ms per array and adds up in a loop of small steps), `to_device(x)` with
    one. The values, and so the computation's bits, are the same either way."""
    if active_mesh() is None:
        return np.asarray(x)
    return to_device(x)


def to_host(x) -> np.ndarray:
    """`np.asarray(x)` that also works for an array spread over several processes.

    On a multi-host mesh an array sharded over "data" (samples, per-example values) is not
    addressable from any one process; it is all-gathered (`process_allgather`, a collective:
    every process must call this in the same order, which the study's SPMD code does) so each
    process holds the global value. Replicated arrays and host arrays are read directly.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def restore_shardings(template):
    """Shardings for restoring a train state like `template` onto the active mesh, or None.

    Arrays the template already holds on the mesh keep their sharding; every other array
    (e.g. Adam's step count, which `optimizer.init` leaves on one device) is replicated, so
    a restored state never mixes one-device and mesh arrays in one jitted step.
    """
    mesh = active_mesh()
    if mesh is None:
        return None

    def one(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return s
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, eqx.filter(template, eqx.is_array))


def place_like(tree, model):
    """`tree` (an optimizer state) with its uncommitted arrays committed where `model` lives.

    `optimizer.init` derives Adam's moments from the parameters (so they sit where the
    parameters do) but draws its step count fresh, on the default device and uncommitted.
    A jitted step then compiles once for that mix and a second time from step 2 on, when every
    argument comes out of the first step committed: about 6 s per train step at toy sizes.
    Committing the count up front (onto the parameters' device, or replicated on their mesh)
    gives every step one signature. Values are unchanged; with uncommitted parameters (a
    fresh `t5.init`, whose steps stay uncommitted) `tree` is returned as is.
    """
    placed = [
        x.sharding
        for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))
        if isinstance(x, jax.Array) and x.committed
    ]
    if not placed:
        return tree
    target = placed[0]
    if isinstance(target, NamedSharding):
        target = NamedSharding(target.mesh, PartitionSpec())
    elif len(target.device_set) != 1:
        return tree  # some other multi-device sharding: leave the placement to jit

    def one(x):
        if not isinstance(x, jax.Array) or x.committed:
            return x
        if isinstance(target, NamedSharding):  # each process builds its shards (multi-host)
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, target, lambda index: host[index])
        return jax.device_put(x, target)

    return jax.tree.map(one, tree)
