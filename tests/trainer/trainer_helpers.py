"""Helpers for the trainer tests: run the template's scripts and parse their output.

train.py and prepare.py are the job's code, so the tests run them as subprocesses exactly as
a job would (cwd = a copy of the template), with one CPU thread like the demo's scheduler.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[2] / "src" / "fanout_research" / "template"
SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth"]

def copy_template(dest: Path) -> Path:
    shutil.copytree(TEMPLATE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def job_env(data_dir: Path | None, budget: float = 2.0, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    env.update(OMP_NUM_THREADS="1", FANOUT_TIME_BUDGET_S=str(budget), FANOUT_JOB_NAME="test")
    # Scripts that run plain `python` (the job entrypoint) must find this interpreter, whose
    # environment has torch, whether or not the virtualenv was activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    if data_dir is not None:
        env["FANOUT_DATA_DIR"] = str(data_dir)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def prepare(code: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "prepare.py", "--out", str(out), *args], cwd=code)


def parse_job_output(stdout: str) -> tuple[dict[str, float], dict]:
    """The summary block (after the last '---') and the fanout-result JSON line after it."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "---")
    block: dict[str, float] = {}
    rest = lines[start + 1 :]
    for line in rest[: len(SUMMARY_KEYS)]:
        m = re.fullmatch(r"([a-zA-Z_]+):\s+(\S+)", line)
        assert m, f"not a summary line: {line!r}"
        block[m.group(1)] = float(m.group(2))
    assert list(block) == SUMMARY_KEYS
    tail = rest[len(SUMMARY_KEYS) :]
    assert len(tail) == 1 and tail[0].startswith("fanout-result "), tail
    return block, json.loads(tail[0].removeprefix("fanout-result "))
