"""`--coordinator_address`, `--num_processes`, `--process_id`: the multi-host flags shared by
reproduce.py and smoke.py (absl allows one definition of a flag name per process), and
`initialize`, which connects the processes or refuses the flags without `--distributed`.
"""

from absl import app, flags

from ipo_gap import sharding

COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "With --distributed: process 0's host:port."
)
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's id.")


def initialize(distributed: bool) -> None:
    """`sharding.initialize_distributed` with the flags; without --distributed they would do
    nothing, and every process would run alone: refused, naming them."""
    given = [f.name for f in (COORDINATOR, NUM_PROCESSES, PROCESS_ID) if f.value is not None]
    if given and not distributed:
        raise app.UsageError(
            f"--{', --'.join(given)} without --distributed: every process would run on its "
            "own (add --distributed)"
        )
    sharding.initialize_distributed(
        distributed, COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value
    )
