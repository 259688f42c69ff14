"""`--compute_dtype`, shared by the binaries that take it (reproduce.py, bench.py).

absl allows one definition of a flag name per process, and tests import several binaries
into one process, so the flag is defined here, once.
"""

from absl import flags

COMPUTE_DTYPE = flags.DEFINE_enum(
    "compute_dtype",
    None,
    ["float32", "bfloat16"],
    "What every model's matrix products read; they accumulate in float32, and parameters stay "
    "float32 (default: the presets', float32). bfloat16 is for accelerators and CPUs with "
    "bf16 matrix units (AMX); its numbers differ from float32's. reproduce.py records it in "
    "the study's config; bench.py then calibrates its peak on bf16 products and runs the peer "
    "under torch.autocast(bfloat16).",
)
