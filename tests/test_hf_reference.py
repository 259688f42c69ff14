"""Our T5 against Hugging Face transformers' T5ForConditionalGeneration.

The committed fixtures (tests/fixtures/hf_t5_*, made by make_hf_t5_fixtures.py with torch and
transformers) hold a tiny random model in HF format and HF's logits for padded inputs: the
test loads them with `load_hf_t5` (numpy only) and compares. A second test repeats this live
when transformers is importable.
"""

import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, run_with_devices

from ipo_gap import checkpoint
from ipo_gap.t5 import model as t5
from ipo_gap.t5.layers import relative_position_bucket

FIXTURES = REPO / "tests" / "fixtures"


@pytest.mark.parametrize("variant,tied", [("hf_t5_v11", False), ("hf_t5_original", True)])
def test_logits_match_hf_fixture(variant, tied):
    cfg, model = checkpoint.load_hf_t5(FIXTURES / variant)
    assert cfg.tie_word_embeddings == tied and (model.lm_head is None) == tied
    assert cfg.feed_forward == ("relu" if tied else "gated-gelu")
    ref = np.load(FIXTURES / variant / "expected.npz")
    src, mask = jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"])
    assert (np.asarray(mask) == 0).any(), "fixture must contain padding"
    enc = jax.jit(t5.encode)(model, src, mask)
    np.testing.assert_allclose(enc, ref["encoder_last_hidden_state"], atol=1e-5, rtol=0)
    logits = jax.jit(t5.decode)(model, enc, mask, jnp.asarray(ref["decoder_input_ids"]))
    assert np.abs(ref["logits"]).max() > 1.0  # the comparison is not between near-zeros
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)


def test_relative_buckets_match_hf_tables():
    ref = np.load(FIXTURES / "hf_t5_v11" / "expected.npz")
    cfg = json.loads((FIXTURES / "hf_t5_v11" / "config.json").read_text())
    kw = {
        "num_buckets": cfg["relative_attention_num_buckets"],
        "max_distance": cfg["relative_attention_max_distance"],
    }
    rel = jnp.asarray(ref["relpos"])
    np.testing.assert_array_equal(
        relative_position_bucket(rel, bidirectional=True, **kw), ref["bucket_bidirectional"]
    )
    np.testing.assert_array_equal(
        relative_position_bucket(rel, bidirectional=False, **kw), ref["bucket_causal"]
    )


def test_loader_errors_name_the_problem(tmp_path):
    src = FIXTURES / "hf_t5_v11"
    with pytest.raises(checkpoint.CheckpointError, match="no config.json"):
        checkpoint.load_hf_t5(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    hf = json.loads((bad / "config.json").read_text())
    hf["d_ff"] = 40  # every MLP weight now disagrees
    (bad / "config.json").write_text(json.dumps(hf))
    with pytest.raises(checkpoint.CheckpointError, match=r"wi_0.*\(48, 32\).*\(40, 32\)"):
        checkpoint.load_hf_t5(bad)
    trunc = tmp_path / "trunc"
    shutil.copytree(src, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load_hf_t5(trunc)
    noisy = tmp_path / "silu"
    shutil.copytree(src, noisy)
    hf = json.loads((noisy / "config.json").read_text())
    hf["feed_forward_proj"] = "gated-silu"
    (noisy / "config.json").write_text(json.dumps(hf))
    with pytest.raises(checkpoint.CheckpointError, match="gated-silu"):
        checkpoint.load_hf_t5(noisy)


@pytest.mark.parametrize(
    "field,value,tensor,found,expected",
    [
        # q is [H*K, D] in HF: d_kv 8 -> 4 used to die in a bare numpy reshape.
        ("d_kv", 4, "encoder.block.0.layer.0.SelfAttention.q.weight", (32, 32), (16, 32)),
        ("num_heads", 2, "encoder.block.0.layer.0.SelfAttention.q.weight", (32, 32), (16, 32)),
        ("d_ff", 40, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", (48, 32), (40, 32)),
        ("d_model", 16, "shared.weight", (64, 32), (64, 16)),
    ],
)
def test_config_disagreeing_with_tensors_names_tensor_and_shapes(
    tmp_path, field, value, tensor, found, expected
):
    """A config.json whose dimensions disagree with the saved tensors raises CheckpointError
    naming the HF tensor and both of its shapes (HF layout), before any reshape or stack."""
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURES / "hf_t5_v11", bad)
    hf = json.loads((bad / "config.json").read_text())
    hf[field] = value
    (bad / "config.json").write_text(json.dumps(hf))
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_hf_t5(bad)
    msg = str(err.value)
    assert f"tensor {tensor} has shape {found}" in msg, msg
    assert f"implies {expected}" in msg, msg


@pytest.mark.parametrize(
    "tensor,shape,expected",
    [
        ("decoder.block.1.layer.2.DenseReluDense.wo.weight", (32, 40), (32, 48)),
        ("decoder.block.2.layer.1.EncDecAttention.k.weight", (16, 32), (32, 32)),
    ],
)
def test_one_layer_of_the_wrong_shape_is_named(tmp_path, tensor, shape, expected):
    """One layer's tensor shaped unlike its siblings (np.stack or reshape used to fail with a
    bare numpy error) is named with both shapes."""
    src = FIXTURES / "hf_t5_v11"
    tensors = dict(checkpoint.read_safetensors(src / "model.safetensors"))
    tensors[tensor] = np.ones(shape, np.float32)
    out = tmp_path / "odd_layer"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    _write_safetensors(out / "model.safetensors", tensors)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_hf_t5(out)
    msg = str(err.value)
    assert f"tensor {tensor} has shape {shape}" in msg, msg
    assert f"implies {expected}" in msg, msg


def test_sharded_index_and_missing_tensor(tmp_path):
    """A sharded checkpoint (index + 2 shards) loads identically; a missing tensor is named."""
    src = FIXTURES / "hf_t5_v11"
    tensors = checkpoint.read_safetensors(src / "model.safetensors")
    names = sorted(tensors)
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        _write_safetensors(out / fname, {n: tensors[n] for n in part})
        weight_map.update(dict.fromkeys(part, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, a = checkpoint.load_hf_t5(src)
    _, b = checkpoint.load_hf_t5(out)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # Drop one layer's tensor from a single-file copy.
    missing = tmp_path / "missing"
    missing.mkdir()
    shutil.copy(src / "config.json", missing / "config.json")
    drop = "decoder.block.2.layer.1.EncDecAttention.k.weight"
    _write_safetensors(
        missing / "model.safetensors", {n: t for n, t in tensors.items() if n != drop}
    )
    with pytest.raises(checkpoint.CheckpointError, match=drop.replace(".", r"\.")):
        checkpoint.load_hf_t5(missing)


def _single_file_copy(src: pathlib.Path, out: pathlib.Path, edit_header) -> pathlib.Path:
    """A copy of the checkpoint `src` whose safetensors header is `edit_header(header)` (the
    tensors' bytes unchanged: their offsets count from the header's end)."""
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    raw = (src / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit_header(header)
    head = json.dumps(header).encode()
    (out / "model.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + raw[8 + n :])
    return out


TENSOR = "decoder.block.1.layer.2.DenseReluDense.wo.weight"


@pytest.mark.parametrize(
    "edit,reason",
    [
        (lambda h: h[TENSOR].pop("dtype"), r"no 'dtype'"),
        (lambda h: h[TENSOR].pop("shape"), r"no 'shape'"),
        (lambda h: h[TENSOR].pop("data_offsets"), r"no 'data_offsets'"),
        (lambda h: h.update({TENSOR: [1, 2]}), "expected a JSON object, got list"),
        (
            lambda h: h[TENSOR].update(data_offsets=[0]),
            r"'data_offsets' \[0\] is not \[start, end\]",
        ),
        (lambda h: h[TENSOR].update(shape=[32, "48"]), r"'shape' \[32, '48'\] is not a list"),
    ],
)
def test_a_malformed_header_entry_names_the_file_and_tensor(tmp_path, edit, reason):
    """A safetensors header entry without dtype, shape or data_offsets, or with one of the
    wrong kind, raises CheckpointError naming the file and the tensor (a bare KeyError,
    TypeError or ValueError before)."""
    bad = _single_file_copy(FIXTURES / "hf_t5_v11", tmp_path / "bad", edit)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_hf_t5(bad)
    where = f"{bad / 'model.safetensors'}: tensor {TENSOR}: malformed header entry"
    assert str(err.value).startswith(where), err.value
    assert re.search(reason, str(err.value)), err.value
    unchanged = _single_file_copy(FIXTURES / "hf_t5_v11", tmp_path / "same", lambda h: None)
    checkpoint.load_hf_t5(unchanged)  # the copy itself reads


@pytest.mark.parametrize(
    "text,reason",
    [
        ('{"weight_map": {', "cannot read the safetensors index"),
        ('{"metadata": {"total_size": 1}}', "not a safetensors index: no 'weight_map'"),
        ('["model.safetensors"]', "not a safetensors index: no 'weight_map'"),
        ('{"weight_map": ["model.safetensors"]}', "'weight_map' must map tensor names"),
    ],
)
def test_a_malformed_index_names_the_file(tmp_path, text, reason):
    """A sharded checkpoint's index that is not JSON, has no weight_map, or whose weight_map
    is no tensor -> shard mapping raises CheckpointError naming the index file (a bare
    JSONDecodeError or KeyError before)."""
    out = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "hf_t5_v11", out)
    index = out / "model.safetensors.index.json"
    index.write_text(text)
    with pytest.raises(checkpoint.CheckpointError, match=f"^{re.escape(str(index))}: {reason}"):
        checkpoint.load_hf_t5(out)


def _write_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]):
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        blob = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def test_live_against_transformers(tmp_path):
    """Builds a random HF model now, saves it, and compares logits (needs torch+transformers)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.T5Config(
        vocab_size=40,
        d_model=24,
        d_ff=40,
        num_heads=3,
        d_kv=8,
        num_layers=2,
        num_decoder_layers=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
    )
    model = transformers.T5ForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
        model.lm_head.weight = torch.nn.Parameter(torch.randn(40, 24) * 0.3)
    model.save_pretrained(tmp_path, safe_serialization=True)
    ids = torch.randint(3, 40, (2, 10))
    attn = torch.ones_like(ids)
    attn[1, 6:] = 0
    dec = torch.randint(3, 40, (2, 7))
    dec[:, 0] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=attn, decoder_input_ids=dec).logits
    _, ours = checkpoint.load_hf_t5(tmp_path)
    logits = t5.forward(
        ours,
        jnp.asarray(ids.numpy(), jnp.int32),
        jnp.asarray(attn.numpy(), jnp.int32),
        jnp.asarray(dec.numpy(), jnp.int32),
    )
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["hf_t5_v11", "hf_t5_original"])
def test_save_hf_t5_writes_what_transformers_wrote(variant, tmp_path):
    """save_hf_t5 inverts load_hf_t5: the tensors transformers saved come back, name by name
    and bit for bit (HF's duplicated per-stack embeddings aside), and the config agrees."""
    cfg, model = checkpoint.load_hf_t5(FIXTURES / variant)
    checkpoint.save_hf_t5(tmp_path, model, cfg)
    theirs = checkpoint.read_safetensors(FIXTURES / variant / "model.safetensors")
    ours = checkpoint.read_safetensors(tmp_path / "model.safetensors")
    dup = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    if cfg.tie_word_embeddings:
        dup.add("lm_head.weight")
    assert set(ours) == set(theirs) - dup
    for name, value in ours.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)
    cfg2, model2 = checkpoint.load_hf_t5(tmp_path)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, model2, model)


def test_save_hf_t5_round_trip_of_a_preset(tmp_path):
    from ipo_gap.configs import model_preset

    cfg = model_preset("toy-s", vocab_size=100)
    model = t5.init(cfg, key=jax.random.key(3))
    checkpoint.save_hf_t5(tmp_path, model, cfg)
    cfg2, model2 = checkpoint.load_hf_t5(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, model2, model)
    assert cfg2.to_dict() == cfg.to_dict()
    assert checkpoint.hf_t5_config(tmp_path) == cfg2  # the config alone, weights unread


_SHARDED_LOAD = """
import json
import jax, numpy as np
from ipo_gap import checkpoint, sharding
mesh = sharding.make_mesh("data:2,model:4")
out = {}
for variant in ("hf_t5_v11", "hf_t5_original"):
    path = "tests/fixtures/" + variant
    _, plain = checkpoint.load_hf_t5(path)
    _, placed = checkpoint.load_hf_t5(path, mesh=mesh)
    want = jax.tree.leaves(sharding.model_shardings(placed, mesh))
    rows = []
    for a, b, s in zip(jax.tree.leaves(plain), jax.tree.leaves(placed), want):
        rows.append({
            "equal": bool(np.array_equal(np.asarray(a), np.asarray(b))),
            "placed": b.sharding == s,
            "devices": len(b.sharding.device_set),
            "split": b.addressable_shards[0].data.size < b.size,
        })
    out[variant] = rows
print(json.dumps(out))
"""


def test_load_onto_a_mesh_places_each_tensor_on_its_sharding():
    """With `mesh`, every parameter goes from the file to its own sharding (no device holds a
    whole split tensor) and the values equal a one-device load."""
    res = run_with_devices(_SHARDED_LOAD, num_devices=8)
    for variant, rows in res.items():
        assert rows and all(r["equal"] for r in rows), variant
        assert all(r["placed"] and r["devices"] == 8 for r in rows), variant
        assert sum(r["split"] for r in rows) >= len(rows) // 2, (variant, rows)


def _variant(tmp_path, name, edit, config_edit=None, src="hf_t5_v11"):
    tensors = dict(checkpoint.read_safetensors(FIXTURES / src / "model.safetensors"))
    edit(tensors)
    out = tmp_path / name
    out.mkdir()
    config = json.loads((FIXTURES / src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **(config_edit or {})}))
    _write_safetensors(out / "model.safetensors", tensors)
    return out


def _logits(model, ref):
    src, mask = jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"])
    return np.asarray(t5.forward(model, src, mask, jnp.asarray(ref["decoder_input_ids"])))


def test_embedding_copies_and_a_tied_unscaled_head_load_into_one_embedding(tmp_path, caplog):
    """The embedding stored only as decoder.embed_tokens.weight (google/madlad400-3b-mt) loads
    (it was refused as 'shared.weight missing'); an extra copy that differs is not used and a
    warning names it (it was dropped silently; transformers 5.x would use it for its stack);
    a transformers-5 head tied without scaling (no lm_head.weight, scale_decoder_outputs
    false) loads as a copy of the embedding (it was refused as untied). The first two give
    the fixture's logits."""
    ref = np.load(FIXTURES / "hf_t5_v11" / "expected.npz")

    def rename(t):
        t["decoder.embed_tokens.weight"] = t.pop("shared.weight")

    def extra(t):
        t["encoder.embed_tokens.weight"] = t["shared.weight"] + 1.0

    def tied(t):
        t["shared.weight"] = t.pop("lm_head.weight")  # the head's values (both V x D in HF)

    for name, edit in (("renamed", rename), ("extra", extra)):
        _, model = checkpoint.load_hf_t5(_variant(tmp_path, name, edit))
        np.testing.assert_allclose(_logits(model, ref), ref["logits"], atol=1e-4, rtol=0)
    assert "tensor encoder.embed_tokens.weight is not used" in caplog.text
    assert "renamed" not in caplog.text  # one copy: nothing to warn about
    caplog.clear()
    cfg, model = checkpoint.load_hf_t5(_variant(tmp_path, "tied", tied))
    assert not cfg.tie_word_embeddings and model.lm_head is not None
    np.testing.assert_array_equal(np.asarray(model.lm_head), np.asarray(model.embedding).T)
    assert "loaded as an untied copy of shared.weight" in caplog.text
    with pytest.raises(checkpoint.CheckpointError, match="untied .* has no lm_head.weight"):
        checkpoint.load_hf_t5(_variant(tmp_path, "untied", tied, {"tie_word_embeddings": False}))
