"""The Backend seam: five calls that every engine (local, Kubernetes, vesslctl, Slurm) answers.

A backend may also offer ``submit_many(specs) -> list[str]``, with the same meaning as calling
``submit`` for each spec, when it can start a round more cheaply than job by job; ``JobClient``
uses it where present.

A backend is constructed as ``Backend(study, **options)``, where ``options`` are plain JSON values
(no secrets) that the job ledger records, so that ``fanout wait`` in another process can rebuild an
equivalent backend for the slugs it is asked about.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

from fanout_research.models import JobResult, JobSpec, JobState


@runtime_checkable
class Backend(Protocol):
    name: ClassVar[str]
    #: How often a waiter should poll ``status``; a hint, tuned to the engine's API costs.
    poll_interval_s: ClassVar[float]
    # Optional: ``shared_filesystem: ClassVar[bool]``, True where jobs see this machine's paths
    # (local, Slurm); data is then read (and prepared) in place instead of through a mount.

    def submit(self, spec: JobSpec) -> str:
        """Start the job and return its slug at once. The same spec twice returns the same slug
        without starting a second job; a different spec under a used name raises JobSpecError."""
        ...

    def status(self, slugs: Sequence[str]) -> dict[str, JobState]:
        """One batched look at many jobs. Raises UnknownJobError naming any slug it does not know."""
        ...

    def result(self, slug: str) -> JobResult:
        """Everything known about the job; final once ``status`` says its phase is final."""
        ...

    def logs(self, slug: str, tail: int | None = None) -> str:
        """The job's combined stdout and stderr (the last ``tail`` lines if given)."""
        ...

    def cancel(self, slug: str) -> None:
        """Stop the job (queued or running). Cancelling a finished job changes nothing."""
        ...

    def options(self) -> dict[str, Any]:
        """The non-secret settings needed to rebuild this backend in another process."""
        ...
