"""Submit jobs and wait for them, with every step recorded in the study's job ledger.

This is the one place that ties a Backend to the ledger; the CLI, the benchmarks and the research
loop all go through it, so no path can start a job that the ledger does not know about.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fanout_research.backends.base import Backend
from fanout_research.errors import JobSpecError, UnknownJobError
from fanout_research.ledger import JobLedger, LedgerEntry
from fanout_research.models import JobResult, JobSpec, JobState
from fanout_research.registry import create_backend
from fanout_research.study import StudyDir

Observer = Callable[[Mapping[str, JobState]], None]


@dataclass
class WaitOutcome:
    results: dict[str, JobResult] = field(default_factory=dict)
    unfinished: dict[str, JobState] = field(default_factory=dict)

    @property
    def all_succeeded(self) -> bool:
        return not self.unfinished and all(r.succeeded for r in self.results.values())


class JobClient:
    def __init__(self, study: StudyDir) -> None:
        self.study = study
        self.ledger = JobLedger(study.ledger_path)
        self._backends: dict[str, Backend] = {}

    def backend(self, name: str, options: Mapping[str, Any] | None = None) -> Backend:
        key = f"{name}:{json.dumps(dict(options or {}), sort_keys=True)}"
        if key not in self._backends:
            self._backends[key] = create_backend(name, self.study, options)
        return self._backends[key]

    def adopt(self, backend: Backend) -> Backend:
        """Use an already-built backend for the jobs it submits (tests, embedding)."""
        key = f"{backend.name}:{json.dumps(backend.options(), sort_keys=True)}"
        self._backends[key] = backend
        return backend

    # -- submit --------------------------------------------------------------------------------
    def submit(self, backend: Backend, spec: JobSpec) -> str:
        return self.submit_many(backend, [spec])[0]

    def submit_many(self, backend: Backend, specs: list[JobSpec]) -> list[str]:
        """Submit a round's jobs back to back and record them in one durable ledger write."""
        for spec in specs:
            known = self.ledger.spec_of(spec.name)
            if known is not None and not JobSpec.model_validate(known).same_job(spec):
                raise JobSpecError(
                    f"a different job named {spec.name!r} is already in study {self.study.name!r}"
                )
        accepted: list[tuple[str, str, dict[str, Any], JobSpec]] = []
        options = backend.options()
        batch = getattr(backend, "submit_many", None)
        try:
            if batch is not None:  # optional: backends that can start a round more cheaply
                slugs = batch(specs)
                accepted = [(slug, backend.name, options, s) for slug, s in zip(slugs, specs, strict=True)]
            else:
                for spec in specs:
                    accepted.append((backend.submit(spec), backend.name, options, spec))
        finally:  # record whatever the backend accepted, even if a later spec was refused
            self.ledger.record_submitted_many(accepted)
        return [slug for slug, *_ in accepted]

    # -- look-ups ------------------------------------------------------------------------------
    def entries(self, refs: Iterable[str]) -> list[LedgerEntry]:
        """Ledger entries for slugs or names, in the order given; unknown ones raise together."""
        known = self.ledger.entries()
        by_slug = {e.slug: e for e in known.values() if e.slug}
        found, missing = [], []
        for ref in dict.fromkeys(refs):
            entry = by_slug.get(ref) or known.get(ref)
            if entry is None:
                missing.append(ref)
            else:
                found.append(entry)
        if missing:
            raise UnknownJobError(missing)
        return found

    def backend_for(self, entry: LedgerEntry) -> Backend:
        return self.backend(entry.backend, entry.backend_options)

    def status(self, entries: list[LedgerEntry]) -> dict[str, JobState]:
        """One batched status call per backend, whatever the number of jobs."""
        states: dict[str, JobState] = {}
        for backend, group in self.by_backend(entries):
            states.update(backend.status([e.slug for e in group]))
        return states

    def by_backend(self, entries: Iterable[LedgerEntry]) -> list[tuple[Backend, list[LedgerEntry]]]:
        groups: dict[int, tuple[Backend, list[LedgerEntry]]] = {}
        for entry in entries:
            backend = self.backend_for(entry)
            groups.setdefault(id(backend), (backend, []))[1].append(entry)
        return list(groups.values())

    def collect(self, entries: list[LedgerEntry]) -> list[JobResult]:
        """Final results, recorded in the ledger (in one write) the first time anyone sees them."""
        results = [e.result or self.backend_for(e).result(e.slug) for e in entries]
        fresh = [r for e, r in zip(entries, results, strict=True) if e.result is None and r.phase.final]
        self.ledger.record_results(fresh)
        for entry, result in zip(entries, results, strict=True):
            if result.phase.final:
                entry.result = result
        return results

    # -- wait ----------------------------------------------------------------------------------
    def wait(
        self,
        refs: Iterable[str],
        timeout_s: float | None = None,
        observer: Observer | None = None,
        poll_interval_s: float | None = None,
    ) -> WaitOutcome:
        """Poll until every job is final or the timeout passes; ``observer`` sees every poll."""
        pending = {e.slug: e for e in self.entries(refs)}
        outcome = WaitOutcome()
        for slug, entry in list(pending.items()):
            if entry.result is not None:  # already final in the ledger: no need to ask anyone
                outcome.results[slug] = pending.pop(slug).result  # type: ignore[assignment]
        interval = poll_interval_s or min(
            (self.backend_for(e).poll_interval_s for e in pending.values()), default=1.0
        )
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            states = self.status(list(pending.values()))
            done = [pending.pop(slug) for slug, state in states.items() if state.phase.final]
            for entry, result in zip(done, self.collect(done), strict=True):
                outcome.results[entry.slug] = result
            if observer:
                observer(states)
            if not pending:
                break
            if deadline is not None and time.monotonic() >= deadline:
                outcome.unfinished = {s: states[s] for s in pending}
                break
            pause = interval if deadline is None else min(interval, deadline - time.monotonic())
            time.sleep(max(0.0, pause))
        return outcome

    def reap(self) -> list[str]:
        """End every job of the study on every backend it used: a backend's own ``reap()`` where
        it has one (it finds the study's jobs by label, even ones the ledger never heard of),
        else a cancel of each unfinished job. Returns the names of the jobs it stopped."""
        stopped: list[str] = []
        entries = list(self.ledger.entries().values())
        for backend, group in self.by_backend(entries):
            reap = getattr(backend, "reap", None)
            if reap is not None:
                stopped += reap()
                continue
            live = [e for e in group if e.result is None]
            states = backend.status([e.slug for e in live]) if live else {}
            for entry in live:
                if not states[entry.slug].phase.final:
                    self.ledger.record_event(entry.name, "cancel_requested", by="reap")
                    backend.cancel(entry.slug)
                    stopped.append(entry.name)
        pending = [e for e in entries if e.result is None]
        if pending:  # record how they ended, now that they have
            final = self.status(pending)
            self.collect([e for e in pending if final[e.slug].phase.final])
        return sorted(set(stopped))

    def cancel(self, refs: Iterable[str]) -> dict[str, JobState]:
        entries = self.entries(refs)
        for entry in entries:
            self.ledger.record_event(entry.name, "cancel_requested")
            self.backend_for(entry).cancel(entry.slug)
        return self.status(entries)
