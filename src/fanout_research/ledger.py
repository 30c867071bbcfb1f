"""The job ledger: an append-only JSONL record of every job a study submitted and how it ended.

It is the study's memory across processes and crashes: ``fanout wait SLUG`` finds the backend of a
slug here, and a resumed study (the research loop) finds what it already submitted. One line per
event, written under an exclusive flock and fsynced, so a crash loses at most the line being
written, and a torn last line is skipped on read.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fanout_research.models import JobResult, JobSpec, utcnow

SCHEMA_VERSION = 1


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

    @contextmanager
    def _locked(self) -> Iterator[IO[str]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield handle
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _write(handle: IO[str], record: dict[str, Any]) -> None:
        record = {"v": SCHEMA_VERSION, "at": utcnow().isoformat(), **record}
        handle.write(json.dumps(record, separators=(",", ":")) + "\n")
        handle.flush()
        os.fsync(handle.fileno())

    def record_submitted(
        self, slug: str, backend: str, backend_options: dict[str, Any], spec: JobSpec
    ) -> None:
        """Recorded once the backend accepted the job. A crash just before this line loses no job:
        names are idempotent, so submitting the same spec again adopts the job already running."""
        with self._locked() as handle:
            if spec.name in self._scan(handle):
                return
            self._write(handle, {
                "event": "submitted", "name": spec.name, "slug": slug, "backend": backend,
                "backend_options": backend_options, "spec": spec.model_dump(mode="json"),
            })

    def record_result(self, result: JobResult) -> bool:
        """Record a final result once; True if this call was the one that wrote it."""
        with self._locked() as handle:
            if "result" in self._scan(handle).get(result.name, {}):
                return False
            self._write(handle, {
                "event": "result", "name": result.name, "result": result.model_dump(mode="json"),
            })
            return True

    def record_event(self, name: str, event: str, **details: Any) -> None:
        """Anything else worth keeping in the history, e.g. a cancellation request."""
        with self._locked() as handle:
            self._write(handle, {"event": event, "name": name, **details})

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

    def _records(self, handle: IO[str]) -> Iterator[dict[str, Any]]:
        handle.seek(0)
        for number, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "name" not in record or "event" not in record:
                    raise ValueError("not a ledger record")
            except ValueError as exc:
                if line.endswith("\n"):  # a torn final line is expected after a crash; others not
                    print(f"fanout: skipping bad line {number} of {self.path}: {exc}", file=sys.stderr)
                continue
            yield record

    def _scan(self, handle: IO[str]) -> dict[str, dict[str, Any]]:
        """name -> the events seen for it (event name -> record), with no model validation."""
        seen: dict[str, dict[str, Any]] = {}
        for record in self._records(handle):
            if record["event"] == "submitted" or record["name"] in seen:
                seen.setdefault(record["name"], {}).setdefault(record["event"], record)
        return seen

    def _read(self, handle: IO[str]) -> dict[str, LedgerEntry]:
        found: dict[str, LedgerEntry] = {}
        for record in self._records(handle):
            try:
                self._apply(found, record)
            except (KeyError, ValueError) as exc:
                print(f"fanout: skipping bad record in {self.path}: {exc}", file=sys.stderr)
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
