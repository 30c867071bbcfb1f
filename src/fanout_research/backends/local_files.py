"""The on-disk contract between LocalBackend (in the orchestrator) and a job's supervisor process.

One directory per job::

    spec.json        the JobSpec as submitted (compared on resubmit)
    launch.json      what the supervisor needs: argv, filtered env, limits, slots
    state.json       written only by the supervisor (or by a reaper once it is gone), atomically
    output.log       the job's stdout and stderr, written by the job itself
    supervisor.lock  held by the live supervisor for its whole life
    supervisor.log   the supervisor's own complaints, for debugging
    cancel-requested present once someone asked to cancel the job

Stdlib only: the supervisor imports this.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing costs milliseconds at start-up, paid once per job
    from typing import Any

SPEC = "spec.json"
LAUNCH = "launch.json"
STATE = "state.json"
LOG = "output.log"
SUPERVISOR_LOCK = "supervisor.lock"
SUPERVISOR_LOG = "supervisor.log"
CANCEL_MARK = "cancel-requested"  # survives a signal sent before the supervisor could catch it


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never half of either."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as handle:
            json.dump(data, handle, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot): guards against pid reuse."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None if _proc_available() else _alive_without_proc(pid)
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has finished; it only waits to be reaped
        return None
    return fields[19]


def _proc_available() -> bool:
    return os.path.isdir("/proc/self")


def _alive_without_proc(pid: int) -> str | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "?"


def identity(pid: int) -> dict[str, Any]:
    return {"pid": pid, "start": process_start_time(pid)}


def is_alive(ident: dict[str, Any] | None) -> bool:
    if not ident or not ident.get("pid"):
        return False
    now = process_start_time(int(ident["pid"]))
    return now is not None and (ident.get("start") in (None, "?") or now == ident["start"])


def kill_job_group(leader: dict[str, Any] | None, sig: int = signal.SIGKILL) -> bool:
    """Signal the job's process group (its id is the leader's pid); False if nothing was there.

    A pid is never reused while a group still carries it as its id, so the group is ours unless
    its leader's pid now belongs to a different process, which the start time reveals.
    """
    if not leader or not leader.get("pid") or int(leader["pid"]) <= 1:
        return False
    pgid = int(leader["pid"])
    current = process_start_time(pgid)
    if current is not None and leader.get("start") not in (None, "?", current):
        return False
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def now() -> float:
    return time.time()
