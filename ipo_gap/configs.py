"""Frozen configuration dataclasses and named model presets.

A `T5Config` fully determines a model's shapes and numerics. Presets cover the public
T5 v1.1 shapes (small .. xxl), the two configurations of the peer benchmark in
../shared/bench (`toy`, and `small` which is T5 v1.1 small), and three CPU presets for the
study's scaling experiments (`toy-s`, `toy-m`, `toy-l`) whose parameter counts grow about 4x per
step, like T5 Large -> XL -> XXL in the paper.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

_FEED_FORWARD = ("gated-gelu", "relu")
_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Shapes and numerics of a T5 encoder-decoder.

    Attributes:
      vocab_size: V, rows of the shared embedding (and columns of the LM head).
      d_model: D, width of the residual stream.
      d_ff: F, hidden width of the feed-forward block.
      num_heads: H, attention heads.
      d_kv: K, width of one head (H * K need not equal D in T5).
      num_encoder_layers: encoder blocks.
      num_decoder_layers: decoder blocks.
      relative_attention_num_buckets: buckets of the relative position bias.
      relative_attention_max_distance: distance beyond which all positions share a bucket.
      feed_forward: "gated-gelu" (T5 v1.1: wo(gelu_tanh(wi_0 x) * wi_1 x)) or "relu" (original
        T5: wo(relu(wi x))).
      tie_word_embeddings: the original T5 ties the LM head to the shared embedding and scales
        the decoder output by d_model**-0.5; T5 v1.1 has an untied head and no scaling.
      layer_norm_epsilon: RMSNorm epsilon.
      param_dtype: dtype parameters are stored in ("float32" or "bfloat16").
      compute_dtype: dtype of matmul inputs. Norms, softmax and logits are always float32.
      scan_layers: run the blocks of a stack with lax.scan (fast compiles for deep models)
        or unrolled in Python (sometimes faster at run time for shallow models on CPU).
      name: preset name, for logs.
      remat: recompute each block's activations in the backward pass (`jax.checkpoint` per
        encoder and decoder block), keeping only the blocks' inputs: what makes long
        sequences at the paper's sizes fit on an accelerator (T5 XXL's IPO step at batch 32,
        1024 + 128 tokens, 8-way model parallel: 227 -> 30 GiB of temporaries per device,
        `experiments/memory_plan.py`), for about a third more compute. Needs `scan_layers`.
        The same values as without to rounding, not the same bits (tests/test_t5.py); left
        out of `to_dict` when off.
      pm_ids: the two token ids a preference model on this T5 ends y1 and y2 with and reads
        its score from (`ipo_gap.preference`); ids no text encodes to: 3 and 4, which a
        trained tokenizer reserves, or embedding rows past a loaded tokenizer's pieces. Left
        out of `to_dict` at its default (3, 4), so configs of older code hash the same.
    """

    vocab_size: int
    d_model: int
    d_ff: int
    num_heads: int
    d_kv: int
    num_encoder_layers: int
    num_decoder_layers: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward: str = "gated-gelu"
    tie_word_embeddings: bool = False
    layer_norm_epsilon: float = 1e-6
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    scan_layers: bool = True
    name: str = ""
    pm_ids: tuple[int, int] = (3, 4)
    remat: bool = False

    def __post_init__(self):
        ids = tuple(self.pm_ids)
        object.__setattr__(self, "pm_ids", ids)  # a JSON list in, a hashable tuple kept
        if len(ids) != 2 or len(set(ids)) != 2 or not all(type(i) is int for i in ids):
            raise ValueError(f"T5Config.pm_ids must be two different ints, got {self.pm_ids!r}")
        if min(ids) < 3:
            raise ValueError(f"T5Config.pm_ids {ids}: 0, 1, 2 are pad, eos and unk")
        if not isinstance(self.remat, bool):
            raise ValueError(f"T5Config.remat must be a bool, got {self.remat!r}")
        if self.remat and not self.scan_layers:
            raise ValueError(
                "T5Config.remat needs scan_layers=True: in unrolled layers XLA may schedule the "
                "recomputation into the forward pass and keep the memory (T5 Large's IPO step: "
                "42 -> 35 GiB unrolled, 42 -> 3.8 GiB scanned, measured on XLA's CPU compiler)"
            )
        for field in (
            "vocab_size",
            "d_model",
            "d_ff",
            "num_heads",
            "d_kv",
            "num_encoder_layers",
            "num_decoder_layers",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"T5Config.{field} must be a positive int, got {value!r}")
        if self.feed_forward not in _FEED_FORWARD:
            raise ValueError(
                f"T5Config.feed_forward must be one of {_FEED_FORWARD}, got {self.feed_forward!r}"
            )
        for field in ("param_dtype", "compute_dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ValueError(
                    f"T5Config.{field} must be one of {_DTYPES}, got {getattr(self, field)!r}"
                )
        if self.relative_attention_num_buckets < 4:
            raise ValueError("T5Config.relative_attention_num_buckets must be >= 4")

    @property
    def param_jnp_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def compute_jnp_dtype(self):
        return jnp.dtype(self.compute_dtype)

    def replace(self, **changes: Any) -> T5Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["pm_ids"] == T5Config.pm_ids:  # the field's default
            del out["pm_ids"]
        else:
            out["pm_ids"] = list(out["pm_ids"])
        if not out["remat"]:  # the field's default: configs of older code hash the same
            del out["remat"]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> T5Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown T5Config fields: {sorted(unknown)}")
        return cls(**d)

    def num_params(self) -> int:
        """Parameter count implied by the shapes (equals the initialised model's)."""
        D, F, H, K, V = self.d_model, self.d_ff, self.num_heads, self.d_kv, self.vocab_size
        attn = 4 * D * H * K
        mlp = (3 if self.feed_forward == "gated-gelu" else 2) * D * F
        enc_layer = attn + mlp + 2 * D
        dec_layer = 2 * attn + mlp + 3 * D
        bias = 2 * self.relative_attention_num_buckets * H
        head = 0 if self.tie_word_embeddings else D * V
        return (
            V * D
            + head
            + bias
            + 2 * D
            + self.num_encoder_layers * enc_layer
            + self.num_decoder_layers * dec_layer
        )


# Stacks of at most this many layers run unrolled, deeper ones with lax.scan (the presets
# below, and `checkpoint.load_hf_t5`): unrolled layers run faster on CPU, at a longer compile.
# Measured on 2 cores of an AMD EPYC Zen 4 (2026-12-07, two rounds each): T5 v1.1 small's
# forward+backward 2.83 s unrolled against 3.02 s scanned, its IPO step 5.37-5.45 against
# 5.63-5.81 s, sampling the same, the exact KL 1.67-1.73 against 1.62 s; compile of the
# forward+backward 4.0 against 2.5 s. Deeper stacks (base's 12 layers, large's 24) keep the scan
# for compile time, and so does every stack under remat (`T5Config.remat` needs it).
UNROLL_MAX_LAYERS = 8


def _v11(name, d_model, d_ff, num_heads, layers, vocab_size=32128):
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=d_ff,
        num_heads=num_heads,
        d_kv=64,
        num_encoder_layers=layers,
        num_decoder_layers=layers,
        scan_layers=layers > UNROLL_MAX_LAYERS,
        name=name,
    )


# Public T5 v1.1 shapes (google/t5-v1_1-*). flan-t5-* share them.
MODEL_PRESETS: dict[str, T5Config] = {
    "small": _v11("small", 512, 1024, 6, 8),
    "base": _v11("base", 768, 2048, 12, 12),
    "large": _v11("large", 1024, 2816, 16, 24),
    "xl": _v11("xl", 2048, 5120, 32, 24),
    "xxl": _v11("xxl", 4096, 10240, 64, 24),
    # The peer benchmark's `toy` configuration (../shared/bench/peer-results.md); its 2 layers
    # run unrolled (bench on 2 CPU cores: fwd+bwd 1.56x, IPO step 1.29x the lax.scan speed).
    "toy": T5Config(
        vocab_size=1024,
        d_model=256,
        d_ff=1024,
        num_heads=4,
        d_kv=64,
        num_encoder_layers=2,
        num_decoder_layers=2,
        scan_layers=False,
        name="toy",
    ),
    # CPU presets for the study. Parameter counts (vocab 2048): toy-s 0.46M, toy-m 1.71M,
    # toy-l 7.35M: about 4x per step, as T5 Large (0.77B) -> XL (3B) -> XXL (11B). Their 2-4
    # layers run unrolled: measured on the 2-core CPU, a toy-m PM train step takes 293 ms
    # unrolled against 381 ms with lax.scan, a toy-s IPO step about 15% less, same compile time.
    "toy-s": T5Config(
        vocab_size=2048,
        d_model=64,
        d_ff=128,
        num_heads=4,
        d_kv=16,
        num_encoder_layers=2,
        num_decoder_layers=2,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        scan_layers=False,
        name="toy-s",
    ),
    "toy-m": T5Config(
        vocab_size=2048,
        d_model=128,
        d_ff=256,
        num_heads=4,
        d_kv=32,
        num_encoder_layers=3,
        num_decoder_layers=3,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        scan_layers=False,
        name="toy-m",
    ),
    "toy-l": T5Config(
        vocab_size=2048,
        d_model=256,
        d_ff=512,
        num_heads=8,
        d_kv=32,
        num_encoder_layers=4,
        num_decoder_layers=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        scan_layers=False,
        name="toy-l",
    ),
}


def model_preset(name: str, **overrides: Any) -> T5Config:
    """Returns the named preset, optionally with fields replaced (e.g. vocab_size)."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[name].replace(**overrides)
