"""Append-only JSON Lines files that survive crashes and concurrent writers.

Writers take an exclusive flock, append whole lines and fsync once per batch; a writer that died
mid-line is repaired by the next one (a newline first, so the torn line stays alone and the new
record is not swallowed). Readers skip a torn last line silently and warn about any other bad line.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from fanout_research.models import utcnow

SCHEMA_VERSION = 1


class AppendLog:
    def __init__(self, path: str | Path, required: tuple[str, ...] = ("event",)) -> None:
        self.path = Path(path)
        self.required = required

    @contextmanager
    def locked(self) -> Iterator[IO[str]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield handle
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def write(handle: IO[str], records: list[dict[str, Any]]) -> None:
        """Append whole lines and make them durable: one fsync per batch, not per line."""
        if not records:
            return
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:  # a writer that died mid-line must not swallow our first record
            handle.seek(handle.tell() - 1)
            if handle.read(1) != "\n":
                handle.write("\n")
        at = utcnow().isoformat()
        handle.write("".join(
            json.dumps({"v": SCHEMA_VERSION, "at": at, **r}, separators=(",", ":")) + "\n"
            for r in records
        ))
        handle.flush()
        os.fsync(handle.fileno())

    def append(self, *records: dict[str, Any]) -> None:
        with self.locked() as handle:
            self.write(handle, list(records))

    def records(self, handle: IO[str] | None = None) -> Iterator[dict[str, Any]]:
        """Every well-formed record, in order (reads the file itself when no handle is given)."""
        if handle is None:
            if not self.path.exists():
                return
            with open(self.path) as own:
                yield from self.records(own)
            return
        handle.seek(0)
        for number, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or any(key not in record for key in self.required):
                    raise ValueError("not a record of this log")
            except ValueError as exc:
                if line.endswith("\n"):  # a torn final line is expected after a crash; others not
                    warn(f"fanout: skipping bad line {number} of {self.path}: {exc}")
                continue
            yield record


def warn(message: str, _print: Callable[..., None] = print) -> None:
    _print(message, file=sys.stderr)
