"""Read a job's metrics from its output, and decide what its exit means.

Jobs speak two dialects: the autoresearch summary block (so an unmodified autoresearch
``train.py`` works) and one ``fanout-result {json}`` line. When both are present the JSON line
wins key by key; the block fills in whatever the JSON left out.

Stdlib only: the local job supervisor imports this and must start fast.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from fanout_research.phases import Failure, Phase

RESULT_PREFIX = "fanout-result "
INT_KEYS = frozenset({"num_steps", "depth"})
# Enough of a log's end to hold the summary block of any trainer we know, and cheap to read.
TAIL_BYTES = 64 * 1024
_BLOCK_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):\s+(\S+)\s*$")
_OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "MemoryError", "Killed process")


def _number(text: str) -> float | int | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_summary_block(text: str) -> dict[str, Any]:
    """The ``key: value`` lines after the last ``---`` line; parsing stops at the first other line."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    if not starts:
        return {}
    found: dict[str, Any] = {}
    for line in lines[starts[-1] + 1 :]:
        match = _BLOCK_LINE.match(line.strip())
        if not match:
            if line.strip():
                break
            continue
        key, raw = match.groups()
        value = _number(raw)
        if key in INT_KEYS and isinstance(value, float) and value.is_integer():
            value = int(value)
        found[key] = value
    return found


def parse_result_line(text: str) -> dict[str, Any] | None:
    """The last well-formed ``fanout-result {json}`` line, or None."""
    for line in reversed(text.splitlines()):
        stripped = line.strip()
        if not stripped.startswith(RESULT_PREFIX):
            continue
        try:
            payload = json.loads(stripped[len(RESULT_PREFIX) :])
        except json.JSONDecodeError:
            continue
        if isinstance(payload, dict):
            return payload
    return None


def parse_metrics(text: str) -> dict[str, Any]:
    """Merge both dialects, the JSON line taking precedence."""
    metrics = parse_summary_block(text)
    result = parse_result_line(text)
    if result:
        metrics.update(result)
    return metrics


def usable_val_bpb(metrics: dict[str, Any]) -> bool:
    value = metrics.get("val_bpb")
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def classify_exit(
    exit_code: int | None, metrics: dict[str, Any], log_tail: str, requires_metric: bool = True
) -> tuple[Phase, Failure | None, str]:
    """Turn a finished process into (phase, failure, reason). Success needs exit 0 AND a metric,
    unless the job is one that reports none (data preparation)."""
    if exit_code == 0:
        if usable_val_bpb(metrics) or not requires_metric:
            return Phase.SUCCEEDED, None, ""
        if "val_bpb" in metrics:
            return Phase.FAILED, Failure.NO_METRIC, f"no metric: val_bpb is {metrics['val_bpb']!r}"
        return Phase.FAILED, Failure.NO_METRIC, "no metric: exited 0 without reporting val_bpb"
    if exit_code == 127:
        return Phase.FAILED, Failure.NOT_FOUND, "command not found (exit code 127)"
    if any(marker in log_tail for marker in _OOM_MARKERS):
        return Phase.FAILED, Failure.OUT_OF_MEMORY, f"out of memory (exit code {exit_code})"
    if exit_code == -9:
        return Phase.FAILED, Failure.CRASH, "killed by SIGKILL (often the kernel's OOM killer)"
    if exit_code is not None and exit_code < 0:
        return Phase.FAILED, Failure.CRASH, f"killed by signal {-exit_code}"
    return Phase.FAILED, Failure.CRASH, f"exit code {exit_code}"


def last_lines(text: str, count: int) -> str:
    lines = text.splitlines()
    return "\n".join(lines[-count:]) if count > 0 else ""


def read_tail(path: str | Path) -> str:
    """The end of a job's output file (where the summary block is), or "" if it is unreadable."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - TAIL_BYTES))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
