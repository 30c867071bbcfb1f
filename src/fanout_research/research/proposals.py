"""What a proposer hands the loop: a description and edits to allowed files, nothing else.

Edits are data, never code the orchestrator runs: they are checked (``validate.py``) and applied
to a candidate's own worktree (``workspace.py``) before anything executes them, and then only in
a subprocess.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from fanout_research.errors import FanoutError


class ProposerError(FanoutError):
    """The proposer cannot produce proposals: the model's API kept failing, the key is missing,
    the agent command does not exist, or the study's ``max_calls`` is spent. The message says
    which, and never contains a key."""


class SearchReplace(BaseModel):
    """Replace the one occurrence of ``search`` in ``path`` by ``replace``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["search_replace"] = "search_replace"
    path: str
    search: str = Field(min_length=1)
    replace: str


class WriteFile(BaseModel):
    """Replace the whole content of ``path`` (or create it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["write"] = "write"
    path: str
    content: str


Edit = Annotated[SearchReplace | WriteFile, Field(discriminator="kind")]


class Proposal(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    description: str = Field(min_length=1, description="One line: the hypothesis being tested.")
    edits: tuple[Edit, ...] = Field(min_length=1)
    knobs: dict[str, Any] = Field(
        default_factory=dict, description="Constants this proposal sets, for the ledger and dedup."
    )
    proposer: str = ""


@dataclass(frozen=True)
class Attempt:
    """One earlier candidate, as a proposer sees it: what was tried and how it went."""

    round: int
    description: str
    knobs: dict[str, Any]
    status: str  # keep | discard | crash | reject | baseline
    val_bpb: float | None = None
    reason: str = ""
    base_knobs: dict[str, Any] = field(default_factory=dict)  # knobs of its parent: the direction


@dataclass(frozen=True)
class ResearchContext:
    """Everything a proposer may look at. Proposers never touch the repository themselves."""

    round: int
    base_commit: str
    files: dict[str, str]  # path -> content at base_commit, for the files proposals may edit
    allowed_files: tuple[str, ...]
    best_val_bpb: float | None
    history: tuple[Attempt, ...] = ()
    program: str = ""  # program.md, for agent proposers
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Proposer(Protocol):
    name: str

    def propose(self, context: ResearchContext, k: int) -> list[Proposal]:
        """Up to ``k`` distinct proposals. Fewer is allowed when ideas run out."""
        ...
