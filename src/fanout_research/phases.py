"""Job phases and failure kinds.

Kept free of third-party imports because the local backend's job supervisor, a separate short-lived
process per job, uses them and must start in a few milliseconds.
"""

from enum import StrEnum


class Phase(StrEnum):
    """Where a job is in its life. The last five are final: a job never leaves them."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    LOST = "lost"

    @property
    def final(self) -> bool:
        return self not in (Phase.PENDING, Phase.RUNNING)


class Failure(StrEnum):
    """Why a job did not succeed, coarse enough to act on (retry, discard, blame the code)."""

    CRASH = "crash"  # non-zero exit of the job's command
    NO_METRIC = "no_metric"  # exited 0 but printed no usable val_bpb
    OUT_OF_MEMORY = "out_of_memory"
    NOT_FOUND = "not_found"  # the command could not be started
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    LOST = "lost"  # the backend lost track of it (node gone, supervisor killed)
    SETUP = "setup"  # the code could not be fetched or checked out
