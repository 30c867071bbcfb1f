"""The study's own log: ``runs.jsonl`` (every event) and ``results.tsv`` (derived, for people).

Each round writes, in order: ``round_started`` (its base commit and the best val_bpb so far),
``proposals`` (what the proposer suggested, so a resumed round tests the same ideas), one
``candidate`` record per candidate as it is decided, and ``round_finished``. Replaying these
events is how a study killed at any point resumes exactly where it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fanout_research.jsonl import AppendLog
from fanout_research.research.proposals import Proposal
from fanout_research.research.records import CandidateRecord
from fanout_research.study import StudyDir

TSV_COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description", "round", "candidate")


@dataclass
class RoundState:
    number: int
    base: str
    best_before: float | None
    proposals: list[Proposal] | None = None
    records: dict[int, CandidateRecord] = field(default_factory=dict)
    finished: bool = False
    winner: str | None = None


@dataclass
class StudyState:
    rounds: dict[int, RoundState] = field(default_factory=dict)
    records: list[CandidateRecord] = field(default_factory=list)  # in the order decided
    decided: dict[tuple[int, int], CandidateRecord] = field(default_factory=dict)

    @property
    def baseline(self) -> CandidateRecord | None:
        return next((r for r in self.records if r.status == "baseline"), None)

    @property
    def best(self) -> CandidateRecord | None:
        """The record the research branch points at: the last kept candidate, else the baseline."""
        kept = [r for r in self.records if r.status == "keep"]
        return kept[-1] if kept else self.baseline

    @property
    def gpu_hours(self) -> float:
        return sum(r.gpu_hours for r in self.records)

    @property
    def rounds_finished(self) -> int:
        return sum(1 for r in self.rounds.values() if r.finished)


class StudyLog:
    def __init__(self, study: StudyDir) -> None:
        self.study = study
        self.log = AppendLog(study.root / "runs.jsonl")
        self.tsv_path = study.root / "results.tsv"

    def round_started(self, number: int, base: str, best: float | None) -> None:
        self.log.append({"event": "round_started", "round": number, "base": base, "best": best})

    def proposals(self, number: int, proposals: list[Proposal], *, dropped: list[str] | None = None,
                  usage: list[dict[str, Any]] | None = None) -> None:
        """``dropped``: ideas the proposer could not turn into proposals, with reasons; ``usage``:
        the proposer's API calls for this round (tokens, cost). Both are for people and agents."""
        self.log.append({"event": "proposals", "round": number,
                         "proposals": [p.model_dump(mode="json") for p in proposals],
                         "dropped": dropped or [], "usage": usage or []})

    def candidates(self, records: list[CandidateRecord]) -> None:
        self.log.append(*({"event": "candidate", "record": r.model_dump(mode="json")} for r in records))
        self.write_tsv()

    def round_finished(self, number: int, winner: str | None, best: float | None) -> None:
        self.log.append({"event": "round_finished", "round": number, "winner": winner, "best": best})

    def state(self) -> StudyState:
        state = StudyState()
        for event in self.log.records():
            self._apply(state, event)
        return state

    @staticmethod
    def _apply(state: StudyState, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "round_started":
            state.rounds.setdefault(event["round"], RoundState(event["round"], event["base"], event["best"]))
            return
        if kind == "candidate":  # decided once: a repeat (a resumed round) changes nothing
            record = CandidateRecord.model_validate(event["record"])
            key = (record.round, record.candidate)
            if key not in state.decided:
                state.decided[key] = record
                state.records.append(record)
                if record.round in state.rounds:
                    state.rounds[record.round].records[record.candidate] = record
            return
        round_state = state.rounds.get(event.get("round", -1))
        if round_state is None:
            return
        if kind == "proposals" and round_state.proposals is None:
            round_state.proposals = [Proposal.model_validate(p) for p in event["proposals"]]
        elif kind == "round_finished":
            round_state.finished, round_state.winner = True, event["winner"]

    def write_tsv(self) -> None:
        """Rewritten whole from the log each time: it is derived data, never the source of truth."""
        lines = ["\t".join(TSV_COLUMNS)]
        for r in self.state().records:
            lines.append("\t".join([
                (r.commit or r.parent)[:7],
                f"{r.val_bpb:.6f}" if r.val_bpb is not None else "0.000000",
                f"{r.memory_gb:.1f}" if r.memory_gb is not None else "0.0",
                r.status, r.description.replace("\t", " ").replace("\n", " "),
                str(r.round), str(r.candidate),
            ]))
        tmp = self.tsv_path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.tsv_path)
