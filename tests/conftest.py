"""Shared test helpers: tiny model configs and a subprocess runner for multi-device tests."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from ipo_gap.configs import T5Config
from ipo_gap.t5 import model as t5

# One jitted forward shared by the tests (eager dispatch of a scanned model is slow).
FORWARD = jax.jit(t5.forward)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
    """Build matplotlib's font cache once, in the controlling process, before pytest-xdist
    starts its workers: on a fresh HOME every worker that draws a figure would otherwise
    build it at once and write it under one lock file."""
    if not hasattr(config, "workerinput"):
        import matplotlib.font_manager  # noqa: F401  (builds or loads the cache)


def tiny_config(**overrides) -> T5Config:
    """A tiny T5 v1.1 whose relative positions reach the log-spaced buckets."""
    base = {
        "vocab_size": 64,
        "d_model": 32,
        "d_ff": 48,
        "num_heads": 4,
        "d_kv": 8,
        "num_encoder_layers": 2,
        "num_decoder_layers": 2,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 20,
    }
    base.update(overrides)
    return T5Config(**base)


@pytest.fixture
def tiny_cfg() -> T5Config:
    return tiny_config()


def run_with_devices(code: str, num_devices: int = 8, timeout: int = 240) -> dict:
    """Runs `code` in a fresh interpreter with `num_devices` simulated CPU devices.

    The code must print one JSON object on its last stdout line; it is returned parsed.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise AssertionError(f"subprocess printed nothing; stderr:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])
