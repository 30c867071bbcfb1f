"""How jobs look to a person (stderr, live) and to a program (stdout, final)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from rich.console import Console
from rich.live import Live
from rich.table import Table

from fanout_research.models import JobResult, JobState, Phase

FAILURE_TAIL_LINES = 20
_STYLE = {
    Phase.PENDING: "dim", Phase.RUNNING: "cyan", Phase.SUCCEEDED: "green",
    Phase.FAILED: "red", Phase.TIMED_OUT: "red", Phase.CANCELLED: "yellow", Phase.LOST: "magenta",
}


class LiveOrLines:
    """A live rich display on a terminal; plain lines anywhere else (CI logs, agents, pipes)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream, stderr=self.stream is sys.stderr)
        self.live = Live(console=self.console, auto_refresh=False) if self.console.is_terminal else None

    def __enter__(self) -> Self:
        if self.live:
            self.live.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.live:
            self.live.stop()

    def line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class ProgressView(LiveOrLines):
    """Jobs being waited for: a live table, or one line per state change."""

    def __init__(self, names: Mapping[str, str], stream: Any = None) -> None:
        super().__init__(stream)
        self.names = dict(names)
        self.started = time.monotonic()
        self.states: dict[str, JobState] = {}

    def update(self, states: Mapping[str, JobState]) -> None:
        for slug, state in states.items():
            before = self.states.get(slug)
            self.states[slug] = state
            changed = before is None or (before.phase, before.raw) != (state.phase, state.raw)
            if self.live is None and changed:
                was = f"{before.phase} -> " if before else ""
                detail = f" ({state.raw})" if state.raw and state.raw != state.phase else ""
                self.line(f"[{time.monotonic() - self.started:7.1f}s] {slug}: {was}{state.phase}{detail}")
        if self.live:
            self.live.update(self._table(), refresh=True)

    def _table(self) -> Table:
        table = Table(title=f"{len(self.names)} jobs, {time.monotonic() - self.started:.0f}s",
                      title_justify="left", expand=False)
        for column in ("job", "state", "running for", "detail"):
            table.add_column(column)
        now = time.time()
        for slug in self.names:
            state = self.states.get(slug)
            if state is None:
                table.add_row(slug, "…", "", "")
                continue
            ran = f"{now - state.started_at.timestamp():.0f}s" \
                if state.started_at and not state.phase.final else ""
            table.add_row(slug, f"[{_STYLE[state.phase]}]{state.phase}[/]", ran, state.raw)
        return table


def summary_line(result: JobResult) -> str:
    parts = [result.slug, str(result.phase)]
    reported = result.metrics.reported()
    if result.succeeded:
        parts += [f"{k}={_fmt(v)}" for k, v in reported.items()]
    else:
        parts.append(f"{result.failure or 'failed'}: {result.reason}" if result.reason else "")
    if result.run_seconds is not None:
        parts.append(f"(ran {result.run_seconds:.1f}s)")
    return "  ".join(p for p in parts if p)


def _fmt(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def print_summaries(results: list[JobResult], unfinished: Mapping[str, JobState]) -> None:
    for result in results:
        print(summary_line(result))
        if not result.succeeded and result.log_tail:
            for line in result.log_tail.splitlines()[-FAILURE_TAIL_LINES:]:
                print(f"    | {line}")
    for slug, state in unfinished.items():
        print(f"{slug}  {state.phase}  unfinished: {state.raw}".rstrip())


def result_json(result: JobResult) -> dict[str, Any]:
    data = result.model_dump(mode="json")
    data["metrics"] = result.metrics.reported()
    data["run_seconds"] = result.run_seconds
    return data


def state_json(slug: str, state: JobState) -> dict[str, Any]:
    return {"slug": slug, "phase": str(state.phase), "raw": state.raw, "unfinished": True}


class RoundView(LiveOrLines):
    """A study's rounds: one row per candidate (state, time running, val_bpb)."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self.seen: dict[str, tuple[str, Any]] = {}
        self.round = 0

    def update(self, number: int, views: Any) -> None:
        if self.live is not None:
            if number != self.round:  # keep finished rounds on screen
                self.live.stop()
                self.live = Live(console=self.console, auto_refresh=False)
                self.live.start()
            self.round = number
            self.live.update(self._table(number, views), refresh=True)
            return
        self.round = number
        for view in views:
            key = (view.state, view.val_bpb)
            if self.seen.get(view.name) != key:
                self.seen[view.name] = key
                bpb = f" val_bpb={view.val_bpb:.6f}" if view.val_bpb is not None else ""
                detail = f" ({view.detail})" if view.detail and view.state in ("reject",) else ""
                self.line(f"round {number} {view.name}: {view.state}{bpb}{detail}  [{view.description}]")

    @staticmethod
    def _table(number: int, views: Any) -> Table:
        table = Table(title=f"round {number}", title_justify="left")
        for column in ("candidate", "idea", "state", "running for", "val_bpb"):
            table.add_column(column)
        now = time.time()
        for view in views:
            ran = f"{now - view.started_at.timestamp():.0f}s" \
                if view.started_at and view.state == "running" else ""
            bpb = f"{view.val_bpb:.6f}" if view.val_bpb is not None else ""
            style = {"keep": "green", "crash": "red", "reject": "red", "discard": "dim"}.get(view.state, "")
            state = f"[{style}]{view.state}[/]" if style else view.state
            table.add_row(view.name, view.description, state, ran, bpb)
        return table
