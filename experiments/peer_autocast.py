"""The peer benchmark (../shared/bench/peer_hf_t5.py) in bf16 mixed precision, for bench.py.

Runs the peer script's `main` unchanged inside `torch.autocast("cpu", dtype=torch.bfloat16)`,
PyTorch's own mixed precision: linear layers and matrix products run in bf16 (torch 2.13 ran
1024^3 bf16 products at ~1.4 TFLOP/s on an Intel Xeon with AMX-BF16, fp32 at ~0.34), ops on
autocast's float32 list in float32, the rest in its inputs' dtype; parameters and optimizer
state stay float32, and the peer takes its log-softmax in float32 itself. Every line the peer
prints (set-up, calibrations, results) gets `"dtype": "bf16-autocast"` (its results otherwise
say "fp32"). experiments/bench.py runs the peer through this when ipo_gap's compute dtype is
bf16, so both sides run the same precision.
Usage (the peer's own flags follow the script's path):

  .peerenv/bin/python experiments/peer_autocast.py ../shared/bench/peer_hf_t5.py --config toy
"""

import importlib.util
import sys

import torch

DTYPE = "bf16-autocast"


def main() -> int:
    if len(sys.argv) < 2:
        sys.exit("usage: peer_autocast.py PEER_SCRIPT [peer flags...]")
    script = sys.argv[1]
    spec = importlib.util.spec_from_file_location("peer_hf_t5", script)
    if spec is None or spec.loader is None:
        sys.exit(f"peer_autocast.py: cannot load the peer script {script!r}")
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    emit = peer.emit

    def emit_bf16(obj):
        emit({**obj, "dtype": DTYPE} if "bench" in obj else obj)

    peer.emit = emit_bf16
    sys.argv = [script, *sys.argv[2:]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return peer.main() or 0


if __name__ == "__main__":
    sys.exit(main())
