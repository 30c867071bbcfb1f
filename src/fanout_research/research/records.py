"""One line per candidate: the study's memory of what was tried and how it went.

``runs.jsonl`` keeps everything known about each candidate; ``results.tsv`` is the autoresearch
table (``commit  val_bpb  memory_gb  status  description``) plus round and candidate columns.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fanout_research.models import utcnow

Status = Literal["baseline", "keep", "discard", "crash", "reject"]


class CandidateRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    study: str
    round: int = Field(ge=0, description="0 for the baseline, then 1, 2, ...")
    candidate: int = Field(ge=0, description="0 for the baseline, then 1..K within the round")
    name: str = Field(description="The job name, also the suffix of the candidate branch.")
    status: Status
    description: str
    parent: str = Field(description="Commit the candidate was made from.")
    commit: str | None = None
    branch: str | None = None
    val_bpb: float | None = None
    memory_gb: float | None = None
    reason: str = ""
    knobs: dict[str, Any] = Field(default_factory=dict, description="Knob values of the candidate.")
    base_knobs: dict[str, Any] = Field(default_factory=dict, description="Knob values of its parent.")
    proposer: str = ""
    job_slug: str | None = None
    run_seconds: float | None = None
    gpu_hours: float = 0.0
    metrics: dict[str, Any] = Field(default_factory=dict)
    at: str = Field(default_factory=lambda: utcnow().isoformat())

    @property
    def tried(self) -> bool:
        """A candidate that reached a GPU (or should have): not a validation rejection."""
        return self.status != "reject"
