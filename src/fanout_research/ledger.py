"""The job ledger: an append-only JSONL record of every job a study submitted and how it ended.

It is the study's memory across processes and crashes: ``fanout wait SLUG`` finds the backend of a
slug here, and a resumed study (the research loop) finds what it already submitted. One line per
event, appended through ``jsonl.AppendLog`` (flock, fsync, torn-line repair).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fanout_research.jsonl import AppendLog, warn
from fanout_research.models import JobResult, JobSpec


@dataclass
class LedgerEntry:
    name: str
    slug: str
    backend: str
    backend_options: dict[str, Any]
    spec: JobSpec
    submitted_at: str
    result: JobResult | None = None
    events: list[str] = field(default_factory=list)


class JobLedger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._log = AppendLog(self.path, required=("name", "event"))

    def record_submitted(
        self, slug: str, backend: str, backend_options: dict[str, Any], spec: JobSpec
    ) -> None:
        self.record_submitted_many([(slug, backend, backend_options, spec)])

    def record_submitted_many(
        self, submitted: list[tuple[str, str, dict[str, Any], JobSpec]]
    ) -> None:
        """Record (slug, backend, options, spec) for jobs the backend accepted, once per name.

        Recorded after the backend accepted them: a crash just before this line loses no job,
        because names are idempotent and submitting the same spec again adopts the running job.
        """
        with self._log.locked() as handle:
            seen: set[str] = set(self._scan(handle))
            records = []
            for slug, backend, options, spec in submitted:
                if spec.name not in seen:
                    seen.add(spec.name)
                    records.append({
                        "event": "submitted", "name": spec.name, "slug": slug, "backend": backend,
                        "backend_options": options, "spec": spec.model_dump(mode="json"),
                    })
            self._log.write(handle, records)

    def record_result(self, result: JobResult) -> bool:
        """Record a final result once; True if this call was the one that wrote it."""
        return self.record_results([result])[0]

    def record_results(self, results: list[JobResult]) -> list[bool]:
        """Record final results once each; True for those this call was the one to write."""
        with self._log.locked() as handle:
            seen = self._scan(handle)
            fresh = [r for r in results if "result" not in seen.get(r.name, {})]
            self._log.write(handle, [
                {"event": "result", "name": r.name, "result": r.model_dump(mode="json")} for r in fresh
            ])
            return [r in fresh for r in results]

    def record_event(self, name: str, event: str, **details: Any) -> None:
        """Anything else worth keeping in the history, e.g. a cancellation request."""
        with self._log.locked() as handle:
            self._log.write(handle, [{"event": event, "name": name, **details}])

    def spec_of(self, name: str) -> dict[str, Any] | None:
        """The recorded spec (as JSON data) of a job name, without loading the whole ledger."""
        if not self.path.exists():
            return None
        with open(self.path) as handle:
            submitted = self._scan(handle).get(name, {}).get("submitted")
        return submitted["spec"] if submitted else None

    def entries(self) -> dict[str, LedgerEntry]:
        """Every job by name, in submission order, with its result where one was recorded."""
        if not self.path.exists():
            return {}
        with open(self.path) as handle:
            return self._read(handle)

    def find(self, ref: str) -> LedgerEntry | None:
        """A job by slug or by name."""
        entries = self.entries()
        if ref in entries:
            return entries[ref]
        return next((e for e in entries.values() if e.slug == ref), None)

    def _scan(self, handle: IO[str]) -> dict[str, dict[str, Any]]:
        """name -> the events seen for it (event name -> record), with no model validation."""
        seen: dict[str, dict[str, Any]] = {}
        for record in self._log.records(handle):
            if record["event"] == "submitted" or record["name"] in seen:
                seen.setdefault(record["name"], {}).setdefault(record["event"], record)
        return seen

    def _read(self, handle: IO[str]) -> dict[str, LedgerEntry]:
        found: dict[str, LedgerEntry] = {}
        for record in self._log.records(handle):
            try:
                self._apply(found, record)
            except (KeyError, ValueError) as exc:
                warn(f"fanout: skipping bad record in {self.path}: {exc}")
        return found

    @staticmethod
    def _apply(found: dict[str, LedgerEntry], record: dict[str, Any]) -> None:
        name, event = record["name"], record["event"]
        if event == "submitted":
            found.setdefault(name, LedgerEntry(
                name=name, slug=record["slug"], backend=record["backend"],
                backend_options=record.get("backend_options") or {},
                spec=JobSpec.model_validate(record["spec"]), submitted_at=record["at"],
            ))
            return
        entry = found.get(name)
        if entry is None:
            return
        if event == "result" and entry.result is None:
            entry.result = JobResult.model_validate(record["result"])
        entry.events.append(event)
