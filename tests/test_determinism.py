"""Run comparison: checkpoints and order logs compared bit for bit, naming where they part."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from ipo_gap import determinism
from ipo_gap.data.order_log import OrderLog
from ipo_gap.train_state_io import CheckpointManager

TOK = "0" * 64


def _state(**changes):
    state = {
        "model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)},
        "opt_state": {"mu": np.full((2, 3), 0.5, np.float32)},
        "step": np.int32(4),
    }
    for path, value in changes.items():
        node = state
        *parents, leaf = path.split("/")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return {k: jnp.asarray(v) if not isinstance(v, dict) else v for k, v in state.items()}


def _save(directory, state, step=4):
    with CheckpointManager(directory) as mngr:
        mngr.save(step, state, force=True)


def test_compare_checkpoints(tmp_path):
    a, b, c, d = (tmp_path / x for x in "abcd")
    _save(a, _state())
    _save(b, _state())
    assert determinism.compare_checkpoints(a, b, 4) == []
    changed = np.arange(6, dtype=np.float32).reshape(2, 3)
    changed[1, 2] += 0.25
    _save(c, _state(**{"model/w": changed}))
    diffs = determinism.compare_checkpoints(a, c, 4)
    assert len(diffs) == 1 and diffs[0].startswith("model/w: max abs diff 0.25 (1 of 6"), diffs
    # Bitwise: -0.0 differs from +0.0 although their difference is 0.
    _save(d, _state(**{"model/b": -np.zeros(3, np.float32), "step": np.int32(5)}))
    diffs = determinism.compare_checkpoints(a, d, 4)
    assert [x.split(":")[0] for x in diffs] == ["model/b", "step"], diffs
    assert "max abs diff 0 (3 of 3" in diffs[0] and "max abs diff 1 (1 of 1" in diffs[1]
    with pytest.raises(FileNotFoundError, match="step 7"):
        determinism.compare_checkpoints(a, b, 7)
    with pytest.raises(FileNotFoundError):
        determinism.compare_checkpoints(a, tmp_path / "missing", 4)
    assert not (tmp_path / "missing").exists()


def test_compare_arrays_structure():
    f = np.float32
    a = {"x": np.zeros(2, f), "y": np.zeros(2, f)}
    assert determinism.compare_arrays(a, {"x": np.zeros(3, f), "z": np.zeros(1, f)}) == [
        "x: a is float32[2], b is float32[3]",
        "y: only in a",
        "z: only in b",
    ]
    nan = {"x": np.array([np.nan, 1.0], f)}
    assert determinism.compare_arrays(nan, {"x": np.array([np.nan, 1.0], f)}) == []


def _log(directory, n, change_step=None, tok=TOK):
    schema = {"x": ("int32", (3,)), "p": ("float32", ())}
    log = OrderLog.create(directory, schema=schema, batch_size=2, meta={"tokenizer_sha256": tok})
    for s in range(n):
        x = np.arange(6, dtype=np.int32).reshape(2, 3) + s
        if s == change_step:
            x[1, 0] += 1
        log.append(s, {"x": x, "p": np.full(2, s / 10, np.float32)})
    return directory


def test_weights_checksum_sees_one_ulp_and_ignores_nothing():
    """The checksum a checkpoint records of its reference and judge: a pure function of the
    weights (two inits of one key agree), changed by one ulp of one element, by swapping two
    elements (the sums weight positions), by the dtype and by the config."""
    import equinox as eqx
    import jax
    from conftest import tiny_config

    from ipo_gap.t5 import model as t5

    cfg = tiny_config(num_encoder_layers=1, num_decoder_layers=1)
    model = t5.init(cfg, key=jax.random.key(0))
    base = determinism.weights_checksum(model)
    assert base == determinism.weights_checksum(t5.init(cfg, key=jax.random.key(0)))
    assert len(base) == 16
    leaves, tree = jax.tree.flatten(eqx.filter(model, eqx.is_array))

    def with_leaf(i, fn):
        new = list(leaves)
        a = np.array(new[i])
        fn(a)
        new[i] = jnp.asarray(a)
        return eqx.combine(jax.tree.unflatten(tree, new), model)

    def one_ulp(a):
        a.flat[5] = np.nextafter(a.flat[5], np.float32(np.inf))

    def swap(a):
        a.flat[[0, 1]] = a.flat[[1, 0]]

    variants = [with_leaf(i, f) for i in (0, len(leaves) - 1) for f in (one_ulp, swap)]
    variants.append(jax.tree.map(lambda x: x.astype(jnp.bfloat16) if eqx.is_array(x) else x, model))
    variants.append(
        t5.init(tiny_config(num_encoder_layers=1, num_decoder_layers=2), key=jax.random.key(0))
    )
    sums = [determinism.weights_checksum(v) for v in variants]
    assert base not in sums and len(set(sums)) == len(sums), sums
    # Leaves of other dtypes: typed keys, complex numbers, 4-bit integers, bools.
    odd = {
        "key": jax.random.key(1),
        "c": jnp.array([1 + 2j, 3 - 1j], jnp.complex64),
        "i4": jnp.array([1, -3, 7], jnp.int4),
        "b": jnp.array([True, False]),
    }
    base = determinism.weights_checksum(odd)
    changed = [
        {**odd, "key": jax.random.key(2)},
        {**odd, "c": odd["c"].at[1].set(3 - 2j)},
        {**odd, "i4": odd["i4"].at[0].set(-1)},
        {**odd, "b": ~odd["b"]},
    ]
    assert base not in {determinism.weights_checksum(t) for t in changed}


def test_compare_logs(tmp_path):
    a = _log(tmp_path / "a", 6)
    assert determinism.compare_logs(a, _log(tmp_path / "b", 6)) is None
    assert determinism.compare_logs(a, _log(tmp_path / "c", 6, change_step=3)) == 3
    assert determinism.compare_logs(a, _log(tmp_path / "d", 6, change_step=0)) == 0
    assert determinism.compare_logs(a, _log(tmp_path / "e", 6, change_step=5)) == 5
    assert determinism.compare_logs(a, _log(tmp_path / "f", 4)) == 4  # length mismatch
    assert determinism.compare_logs(_log(tmp_path / "g", 4), a) == 4
    assert determinism.compare_logs(a, _log(tmp_path / "h", 6, tok="1" * 64)) == 0
    assert determinism.compare_logs(_log(tmp_path / "i", 0), _log(tmp_path / "j", 0)) is None


@pytest.mark.slow  # four subprocess runs of a tiny stage each, each compiling: ~1 min a stage
@pytest.mark.parametrize("stage", ["online_ipo", "offline_ipo", "sft", "pm"])
def test_check_determinism_binary_passes(tmp_path, stage):
    proc = subprocess.run(
        [
            sys.executable,
            "experiments/check_determinism.py",
            f"--stage={stage}",
            f"--workdir={tmp_path}",
            "--steps=7",
            "--kill_after=4",
            "--checkpoint_every=3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, out
    assert "PASS" in proc.stdout.splitlines()[-1], out
    # the killed run really had a checkpoint to resume from (step 3 of every 3)
    assert "killed: its last checkpoint is step 3" in proc.stdout, out


@pytest.mark.slow  # three subprocess runs of a tiny stage: ~1 min
def test_check_determinism_refuses_a_kill_before_the_first_checkpoint(tmp_path):
    """Killed before its first checkpoint, the rerun would start over and the binary would
    print PASS "across a kill + resume" with no resume checked."""
    proc = subprocess.run(
        [
            sys.executable,
            "experiments/check_determinism.py",
            "--stage=offline_ipo",
            f"--workdir={tmp_path}",
            "--steps=7",
            "--kill_after=1",
            "--checkpoint_every=3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode != 0 and "PASS" not in proc.stdout
    assert "had saved no checkpoint (every 3 steps): nothing to resume from" in proc.stderr


def test_tree_comparisons_tell_signed_zeros_and_nans_apart():
    """A distance cannot see -0 against +0, and Python's max dropped a NaN after the first
    leaf; the bit comparison names each leaf whose bits differ, in key-path order."""
    a = {"w": jnp.array([0.0, 1.0]), "x": jnp.array([1.0, 2.0]), "y": jnp.array([3.0])}
    b = {"w": jnp.array([-0.0, 1.0]), "x": jnp.array([1.0, jnp.nan]), "y": jnp.array([3.0])}
    assert np.isnan(determinism.tree_max_abs_diff(a, b))
    assert determinism.tree_max_abs_diff(a, {**b, "x": a["x"]}) == 0.0  # -0 = +0 by value
    assert determinism.tree_bit_differences(a, b) == ["['w']", "['x']"]
    assert determinism.tree_bit_differences(b, b) == []  # NaN is its own bits
    assert determinism.tree_bit_differences(a, {**a, "y": jnp.array([3], jnp.int32)}) == ["['y']"]
