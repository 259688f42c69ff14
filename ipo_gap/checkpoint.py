"""Checkpoints: read Hugging Face T5 checkpoints (numpy only), and orbax train states.

`load_hf_t5(directory)` reads a Hugging Face T5 directory (config.json plus model.safetensors,
or a sharded model.safetensors.index.json) without torch, so public t5-v1_1-* and flan-t5-*
checkpoints start a run. Train-state save/restore lives in ipo_gap/train_state_io.py and is
re-exported here.
"""

from __future__ import annotations

import json
import math
import pathlib
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging

from ipo_gap import sharding
from ipo_gap.configs import UNROLL_MAX_LAYERS, T5Config
from ipo_gap.t5 import model as t5
from ipo_gap.train_state_io import (  # noqa: F401  (re-exported: the train-state half)
    CheckpointManager,
    TrainState,
    data_to_key,
    key_to_data,
    rollback,
)

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Reads every tensor of a .safetensors file into numpy arrays (memory-mapped)."""
    path = pathlib.Path(path)
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from e
    if raw.size < 8:
        raise CheckpointError(f"{path}: too short to be a safetensors file ({raw.size} bytes)")
    (header_len,) = struct.unpack("<Q", raw[:8].tobytes())
    if header_len > raw.size - 8:
        raise CheckpointError(
            f"{path}: header length {header_len} exceeds the file size "
            f"{raw.size} (truncated or not a safetensors file)"
        )
    try:
        header = json.loads(raw[8 : 8 + header_len].tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: malformed safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: malformed safetensors header: expected a JSON object, "
            f"got {type(header).__name__}"
        )
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end, shape = _header_entry(path, name, info)
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        if end - start != math.prod(shape) * dtype.itemsize or base + end > raw.size:
            raise CheckpointError(
                f"{path}: tensor {name} ({info['dtype']} {list(shape)}) has "
                f"inconsistent offsets {start}..{end} (file truncated?)"
            )
        tensors[name] = raw[base + start : base + end].view(dtype).reshape(shape)
    return tensors


def _header_entry(path: pathlib.Path, name: str, info) -> tuple[int, int, tuple[int, ...]]:
    """(start, end, shape) of a tensor's header entry {dtype, shape, data_offsets}, checked."""

    def ints(value, n=None) -> bool:
        return (
            isinstance(value, list)
            and (n is None or len(value) == n)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        )

    where = f"{path}: tensor {name}: malformed header entry"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(info).__name__}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise CheckpointError(f"{where} {info}: no {', '.join(map(repr, missing))}")
    if not isinstance(info["dtype"], str):
        raise CheckpointError(f"{where}: 'dtype' {info['dtype']!r} is not a string")
    if not ints(info["shape"]):
        raise CheckpointError(f"{where}: 'shape' {info['shape']!r} is not a list of sizes")
    if not ints(info["data_offsets"], 2) or info["data_offsets"][0] > info["data_offsets"][1]:
        raise CheckpointError(
            f"{where}: 'data_offsets' {info['data_offsets']!r} is not [start, end] with "
            "0 <= start <= end"
        )
    start, end = info["data_offsets"]
    return start, end, tuple(info["shape"])


def _read_index(index: pathlib.Path) -> dict[str, str]:
    """The weight map (tensor -> shard file) of a sharded checkpoint's index file."""
    try:
        blob = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: cannot read the safetensors index: {e}") from e
    if not isinstance(blob, dict) or "weight_map" not in blob:
        raise CheckpointError(
            f"{index}: not a safetensors index: no 'weight_map' (tensor name -> shard file)"
        )
    weight_map = blob["weight_map"]
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index}: 'weight_map' must map tensor names to shard file names, "
            f"got {str(weight_map)[:80]}"
        )
    return weight_map


def _read_hf_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists():
        weight_map = _read_index(index)
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(directory / shard))
        missing = set(weight_map) - set(tensors)
        if missing:
            raise CheckpointError(
                f"{index}: tensors listed but absent from shards: {sorted(missing)[:5]}"
            )
        return tensors
    if single.exists():
        return read_safetensors(single)
    bins = list(directory.glob("*.bin"))
    hint = " (only PyTorch .bin files found: convert them to safetensors)" if bins else ""
    raise CheckpointError(
        f"{directory}: no model.safetensors or model.safetensors.index.json{hint}"
    )


def _scaled_head(hf: dict) -> bool:
    """Whether an HF T5 config scales the decoder output by d_model**-0.5 (the original T5's
    tied head): transformers 5.x says so in scale_decoder_outputs, 4.x in tie_word_embeddings."""
    return hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))


def hf_config_to_t5(
    hf: dict, *, has_lm_head: bool, source: str = "config.json", **overrides
) -> T5Config:
    """Translates a Hugging Face T5Config dict into ours.

    Head tying follows transformers: the original T5 ties the LM head to the shared embedding
    and scales the decoder output by d_model**-0.5; T5 v1.1 has its own head, unscaled.
    transformers 4.x records this as tie_word_embeddings; 5.x always writes
    tie_word_embeddings=true and records the scaling in scale_decoder_outputs, untying when
    the file has its own lm_head.weight. So: scaled => tied (a stored lm_head.weight is a
    duplicate and ignored); unscaled => untied, and lm_head.weight must be present.
    """
    ff = hf.get("feed_forward_proj", "relu")
    if ff not in ("relu", "gated-gelu"):
        raise CheckpointError(
            f"{source}: feed_forward_proj={ff!r} is not supported (only 'relu' and 'gated-gelu')"
        )
    scaled = _scaled_head(hf)
    if not scaled and not has_lm_head:
        raise CheckpointError(
            f"{source}: the LM head is untied (no output scaling) but the "
            f"checkpoint has no lm_head.weight"
        )
    fields = {
        "vocab_size": hf["vocab_size"],
        "d_model": hf["d_model"],
        "d_ff": hf["d_ff"],
        "num_heads": hf["num_heads"],
        "d_kv": hf["d_kv"],
        "num_encoder_layers": hf["num_layers"],
        "num_decoder_layers": hf.get("num_decoder_layers") or hf["num_layers"],
        "relative_attention_num_buckets": hf.get("relative_attention_num_buckets", 32),
        "relative_attention_max_distance": hf.get("relative_attention_max_distance", 128),
        "feed_forward": ff,
        "tie_word_embeddings": bool(scaled),
        "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-6),
        "name": hf.get("_name_or_path", "") or "hf-t5",
    }
    # Execution, not weights: stacks of up to UNROLL_MAX_LAYERS layers run unrolled (faster on
    # CPU, as the presets of those depths), deeper ones with lax.scan (compile time), and so
    # does every stack under remat (it needs the scan: `T5Config.remat`); an override decides
    # otherwise.
    deep = max(fields["num_encoder_layers"], fields["num_decoder_layers"]) > UNROLL_MAX_LAYERS
    fields["scan_layers"] = deep or bool(overrides.get("remat"))
    fields.update(overrides)
    return T5Config(**fields)


def _hf_names(path_names: list[str], cfg: T5Config) -> tuple[list[str], str]:
    """HF tensor names (one per layer for stacked params) and how to convert each."""
    field = path_names[-1]
    if path_names == ["embedding"]:
        return ["shared.weight"], "copy"
    if path_names == ["lm_head"]:
        return ["lm_head.weight"], "transpose"
    stack = path_names[0]  # encoder | decoder
    if path_names[1] == "final_ln":
        return [f"{stack}.final_layer_norm.weight"], "copy"
    if path_names[1] == "rel":
        return [f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"], "copy"
    sub = path_names[2]  # ln_sa, sa, ln_ca, ca, ln_ff, mlp
    decoder = stack == "decoder"
    layer_idx = {
        "ln_sa": 0,
        "sa": 0,
        "ln_ca": 1,
        "ca": 1,
        "ln_ff": 2 if decoder else 1,
        "mlp": 2 if decoder else 1,
    }[sub]
    module = {"sa": "SelfAttention", "ca": "EncDecAttention", "mlp": "DenseReluDense"}.get(sub)
    suffix = "layer_norm.weight" if module is None else f"{module}.{field}.weight"
    L = cfg.num_decoder_layers if decoder else cfg.num_encoder_layers
    names = [f"{stack}.block.{i}.layer.{layer_idx}.{suffix}" for i in range(L)]
    kind = (
        "copy"
        if module is None
        else {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o"}.get(field, "transpose")
    )
    return names, kind


def _hf_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """The torch (HF) layout shape of one tensor that `_convert` turns into `shape`."""
    if kind == "copy":
        return tuple(shape)
    if kind == "transpose":
        return tuple(reversed(shape))
    if kind == "qkv":  # [D, H, K] <- [H*K, D]
        return (math.prod(shape[1:]), shape[0])
    if kind == "o":  # [H, K, D] <- [D, H*K]
        return (shape[-1], math.prod(shape[:-1]))
    raise AssertionError(kind)


def _convert(w: np.ndarray, kind: str, cfg: T5Config) -> np.ndarray:
    H, K = cfg.num_heads, cfg.d_kv
    if kind == "copy":
        return w
    if kind == "transpose":  # torch Linear [out, in] -> [in, out]
        return w.T
    if kind == "qkv":  # [H*K, D] -> [D, H, K]
        return w.T.reshape(w.shape[1], H, K)
    if kind == "o":  # [D, H*K] -> [H, K, D]
        return w.T.reshape(H, K, w.shape[0])
    raise AssertionError(kind)


_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _shared_embedding(tensors: dict, directory, check: bool = True) -> dict:
    """`tensors` with the one embedding the model has under "shared.weight".

    transformers ties both stacks' embed_tokens to `shared`, and files hold one, two or three
    copies (some, such as google/madlad400-3b-mt, only decoder.embed_tokens.weight). The model
    has one embedding: the first present in `_EMBEDDINGS` order; the other copies are not
    used. One that differs from it is named in a warning, when `check` (reading the copies:
    `load_hf_t5` does, `hf_t5_config` does not): transformers 5.x does not tie a copy that
    differs, it keeps it for its stack (5.25 checked), so its logits then differ from these.
    Public checkpoints store equal copies.
    """
    present = [n for n in _EMBEDDINGS if n in tensors]
    for other in present[1:] if check else ():
        _warn_if_differs(tensors, other, present[0], directory)
    out = {n: t for n, t in tensors.items() if n not in present[1:]}
    if present and present[0] != "shared.weight":
        out["shared.weight"] = out.pop(present[0])
    return out


def _warn_if_differs(tensors: dict, name: str, used: str, directory) -> None:
    a, b = tensors[name], tensors[used]
    if a.shape != b.shape or not np.array_equal(a, b):
        logging.warning(
            "%s: tensor %s is not used (the model has one, %s), and it differs from it "
            "(shape %s vs %s): transformers 5.x keeps such a copy, so its logits differ from "
            "this model's",
            directory,
            name,
            used,
            tuple(a.shape),
            tuple(b.shape),
        )


def _hf_config_and_tensors(directory: pathlib.Path, *, check: bool = True, **config_overrides):
    """(T5Config, memory-mapped tensors by HF name) of a Hugging Face T5 directory."""
    config_path = directory / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{directory}: no config.json")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON: {e}") from e
    tensors = _shared_embedding(_read_hf_tensors(directory), directory, check)
    if (
        not _scaled_head(hf)
        and hf.get("tie_word_embeddings", True)
        and "lm_head.weight" not in tensors
        and "shared.weight" in tensors
    ):
        # transformers 5.x: a head tied to the embedding without the d_model**-0.5 scaling
        # (a v1.1 model built from its config and saved tied). A T5 here ties only with the
        # scaling, so the head starts as a copy of the embedding: equal logits, but training
        # updates the two apart.
        log = logging.warning if check else logging.debug
        log(
            "%s: the LM head is tied to the embedding without output scaling; it is loaded "
            "as an untied copy of shared.weight (equal logits; trained separately)",
            directory,
        )
        tensors = {**tensors, "lm_head.weight": tensors["shared.weight"]}
    try:
        cfg = hf_config_to_t5(
            hf,
            has_lm_head="lm_head.weight" in tensors,
            source=str(config_path),
            **config_overrides,
        )
    except KeyError as e:
        raise CheckpointError(f"{config_path}: missing field {e}") from e
    return cfg, tensors


def hf_t5_config(directory, *, param_dtype: str = "float32", **config_overrides) -> T5Config:
    """The T5Config of a Hugging Face T5 directory, without reading its weights (the
    safetensors files are memory-mapped for their tensor names only)."""
    cfg, _ = _hf_config_and_tensors(
        pathlib.Path(directory), check=False, param_dtype=param_dtype, **config_overrides
    )
    return cfg


def load_hf_t5(directory, *, param_dtype: str = "float32", mesh=None, **config_overrides):
    """Loads a Hugging Face T5 checkpoint directory into (T5Config, T5 model).

    Args:
      directory: holds config.json and model.safetensors (or a sharded
        model.safetensors.index.json with its shards).
      param_dtype: dtype to store the parameters in.
      mesh: a `jax.sharding.Mesh`: each parameter goes straight from the (memory-mapped)
        file to its `sharding.model_shardings` placement, so no device ever holds more than
        its shards (an XXL checkpoint never lands whole on one device). None: default device.
      **config_overrides: other T5Config fields (compute_dtype, scan_layers, ...).

    Raises:
      CheckpointError: a missing file, an unsupported variant, a missing or unexpected tensor,
        or a shape mismatch (naming the parameter and both shapes).
    """
    directory = pathlib.Path(directory)
    cfg, tensors = _hf_config_and_tensors(directory, param_dtype=param_dtype, **config_overrides)
    abstract = jax.eval_shape(lambda: t5.init(cfg, key=jax.random.key(0)))
    used = set()
    placements = {}
    if mesh is not None:
        flat, _ = jax.tree_util.tree_flatten_with_path(sharding.model_shardings(abstract, mesh))
        placements = {jax.tree_util.keystr(path): s for path, s in flat}

    def fill(path, leaf):
        names = [p.name for p in path]
        hf_names, kind = _hf_names(names, cfg)
        missing = [n for n in hf_names if n not in tensors]
        if missing:
            raise CheckpointError(
                f"{directory}: tensor {missing[0]} (for parameter "
                f"{'.'.join(names)}) is missing from the checkpoint"
            )
        stacked = len(hf_names) > 1 or "layers" in names
        # Check each tensor in HF's own layout before any reshape or stack, so a config that
        # disagrees with the weights names the tensor, not a bare numpy reshape error.
        per_tensor = leaf.shape[1:] if stacked else leaf.shape
        expected = _hf_shape(per_tensor, kind)
        for n in hf_names:
            found = tuple(tensors[n].shape)
            if found != expected:
                raise CheckpointError(
                    f"{directory}: tensor {n} has shape {found} but the config implies "
                    f"{expected} (HF layout) for parameter {'.'.join(names)} of shape "
                    f"{tuple(leaf.shape)}"
                )
        arrays = [_convert(np.asarray(tensors[n]), kind, cfg) for n in hf_names]
        value = np.stack(arrays) if stacked else arrays[0]
        used.update(hf_names)
        value = np.asarray(value.astype(np.float32), dtype=leaf.dtype)  # one leaf on the host
        if mesh is None:
            return jnp.asarray(value)
        return sharding.place(value, placements[jax.tree_util.keystr(path)])

    model = jax.tree_util.tree_map_with_path(fill, abstract)
    # HF ignores this stray cross-attention bias table (only block 0 of self-attention has one).
    ignorable = {"decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}
    if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
        ignorable.add("lm_head.weight")  # the head is the scaled embedding
        _warn_if_differs(tensors, "lm_head.weight", "shared.weight", directory)
    unexpected = sorted(set(tensors) - used - ignorable)
    if unexpected:
        raise CheckpointError(
            f"{directory}: unexpected tensors not used by the model: "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    return cfg, model


def write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    """Writes numpy arrays as a .safetensors file (the format `read_safetensors` reads)."""
    names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in names:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {a.dtype}")
        data = a.tobytes()
        header[name] = {
            "dtype": names[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    path = pathlib.Path(path)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for c in chunks:
            f.write(c)
    tmp.replace(path)


def _unconvert(w: np.ndarray, kind: str) -> np.ndarray:
    """The inverse of `_convert`: our layout -> the torch (HF) layout."""
    if kind == "copy":
        return w
    if kind == "transpose":
        return w.T
    if kind == "qkv":  # [D, H, K] -> [H*K, D]
        return w.reshape(w.shape[0], -1).T
    if kind == "o":  # [H, K, D] -> [D, H*K]
        return w.reshape(-1, w.shape[-1]).T
    raise AssertionError(kind)


def save_hf_t5(directory, model, cfg: T5Config) -> None:
    """Writes `model` as a Hugging Face T5 directory (config.json + model.safetensors).

    The inverse of `load_hf_t5` (float32 tensors): a model saved here loads back equal, and
    transformers' T5ForConditionalGeneration reads the directory. Used to hand a model to
    other tools, and so the pretrained-checkpoint path of the study runs without downloads.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}

    def put(path, leaf):
        names = [p.name for p in path]
        hf_names, kind = _hf_names(names, cfg)
        value = np.asarray(jnp.asarray(leaf, jnp.float32))
        per_layer = list(value) if "layers" in names else [value]
        if len(per_layer) != len(hf_names):
            raise CheckpointError(f"{'.'.join(names)}: {len(per_layer)} arrays for {hf_names}")
        for name, w in zip(hf_names, per_layer, strict=True):
            tensors[name] = np.ascontiguousarray(_unconvert(w, kind))

    jax.tree_util.tree_map_with_path(put, model)
    hf = {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_ff": cfg.d_ff,
        "d_kv": cfg.d_kv,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_encoder_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "feed_forward_proj": cfg.feed_forward,
        "is_gated_act": cfg.feed_forward == "gated-gelu",
        "dense_act_fn": "gelu_new" if cfg.feed_forward == "gated-gelu" else "relu",
        # transformers 4.x reads tie_word_embeddings, 5.x scale_decoder_outputs (see
        # hf_config_to_t5); both say the same here.
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "scale_decoder_outputs": cfg.tie_word_embeddings,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "dropout_rate": 0.0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "_name_or_path": cfg.name,
    }
    write_safetensors(directory / "model.safetensors", tensors)
    (directory / "config.json").write_text(json.dumps(hf, indent=1) + "\n")
