"""The data that crosses the Backend seam.

Every backend receives a :class:`JobSpec` and answers with :class:`JobState` (cheap, batched,
polled) and :class:`JobResult` (once, at the end). Keeping these three models small and
backend-neutral is what lets the research loop stay hardware-blind.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fanout_research.phases import Failure, Phase

__all__ = [
    "CodeSource", "DataMount", "Failure", "JobResult", "JobSpec", "JobState", "Metrics", "Phase",
    "Resources",
]

# RFC 1123 label: what Kubernetes, Slurm job names and vesslctl all accept.
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def utcnow() -> datetime:
    return datetime.now(UTC)


class FrozenModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CodeSource(FrozenModel):
    """Which code a job runs: a repository at one exact commit."""

    repo: str = Field(description="Path or URL of the git repository holding the commit.")
    commit: str = Field(pattern=r"^[0-9a-f]{40}$", description="Full commit hash.")
    branch: str | None = Field(None, description="Branch that pointed at the commit, if any.")


class DataMount(FrozenModel):
    """The prepared data volume. Jobs only ever read it."""

    source: str = Field(description="Where the data lives (a path, a PVC name, a volume id).")
    path: str = Field("/data", description="Where the job sees it; exported as FANOUT_DATA_DIR.")
    read_only: bool = True


class Resources(FrozenModel):
    gpus: int = Field(1, ge=0)
    gpu_type: str | None = None
    cpu: float | None = Field(None, gt=0)
    memory_gb: float | None = Field(None, gt=0)


class JobSpec(FrozenModel):
    """Everything a backend needs to run one experiment, and nothing about how it runs it."""

    name: str = Field(description="Unique DNS-safe name; submitting the same name twice is a no-op.")
    code: CodeSource
    command: tuple[str, ...] = Field(min_length=1, description="argv, run in the code's root.")
    env: dict[str, str] = Field(default_factory=dict)
    time_limit_s: float = Field(900.0, gt=0, description="Hard wall-clock limit once running.")
    time_budget_s: float | None = Field(
        None, gt=0, description="Training budget handed to the job as FANOUT_TIME_BUDGET_S."
    )
    resources: Resources = Field(default_factory=Resources)
    data: DataMount | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    requires_metric: bool = Field(
        True, description="Success needs a val_bpb; off for jobs like data preparation."
    )

    @field_validator("name")
    @classmethod
    def _dns_safe(cls, value: str) -> str:
        if not DNS_LABEL.match(value):
            raise ValueError(
                f"job name {value!r} must be 1-63 lowercase letters, digits or '-', "
                "starting and ending with a letter or digit"
            )
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"invalid environment variable name {key!r}")
        return value

    def identity(self) -> dict[str, Any]:
        """What makes two specs the same job: everything but the labels and the branch name,
        which describe the job without changing what runs (an agent resubmitting a job by name
        from another checkout must get the same job back, not a refusal)."""
        data = self.model_dump(mode="json", exclude={"labels"})
        data["code"].pop("branch", None)
        return data

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()

    def same_job(self, other: JobSpec) -> bool:
        return self.identity() == other.identity()

    def protocol_env(self) -> dict[str, str]:
        """The job protocol's variables, which every backend exports to every job."""
        env = {"FANOUT_JOB_NAME": self.name}
        if self.time_budget_s is not None:
            env["FANOUT_TIME_BUDGET_S"] = f"{self.time_budget_s:g}"
        if self.data is not None:
            env["FANOUT_DATA_DIR"] = self.data.path
        return env


class JobState(FrozenModel):
    """What a batched status poll returns for one job."""

    phase: Phase
    raw: str = Field("", description="The backend's own words for the state, for humans.")
    started_at: datetime | None = None


class Metrics(BaseModel):
    """The autoresearch summary block, plus whatever else a job reported."""

    model_config = ConfigDict(extra="allow")

    val_bpb: float | None = None
    training_seconds: float | None = None
    total_seconds: float | None = None
    peak_vram_mb: float | None = None
    mfu_percent: float | None = None
    total_tokens_M: float | None = None
    num_steps: int | None = None
    num_params_M: float | None = None
    depth: int | None = None

    @classmethod
    def lenient(cls, reported: dict[str, Any]) -> Metrics:
        """Accept whatever a job printed: a known key with a malformed value is kept as
        ``unparsed_<key>`` instead of sinking the whole result."""
        try:
            return cls.model_validate(reported)
        except ValidationError as exc:
            bad = {err["loc"][0] for err in exc.errors() if err["loc"]}
            return cls.model_validate(
                {(f"unparsed_{k}" if k in bad else k): v for k, v in reported.items()}
            )

    @property
    def has_val_bpb(self) -> bool:
        return self.val_bpb is not None and math.isfinite(self.val_bpb)

    def reported(self) -> dict[str, Any]:
        """Only what the job actually reported, in a stable order."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class JobResult(BaseModel):
    """The final word on a job. Only a success carries a trustworthy val_bpb."""

    model_config = ConfigDict(extra="forbid")

    slug: str
    name: str
    phase: Phase
    metrics: Metrics = Field(default_factory=Metrics)
    exit_code: int | None = None
    failure: Failure | None = None
    reason: str = ""
    log_tail: str = ""
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None

    @property
    def succeeded(self) -> bool:
        return self.phase is Phase.SUCCEEDED

    @property
    def run_seconds(self) -> float | None:
        if self.started_at and self.ended_at:
            return (self.ended_at - self.started_at).total_seconds()
        return None

    @property
    def queue_seconds(self) -> float | None:
        if self.submitted_at and self.started_at:
            return (self.started_at - self.submitted_at).total_seconds()
        return None
