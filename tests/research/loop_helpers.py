"""A cheap research repo for the loop's end-to-end tests: real git, real jobs, a trivial trainer.

``train.py`` has module-level knobs (``LR``, ``WIDTH``, ``CRASH``) and turns them into a
deterministic val_bpb, ``1 + (LR - 0.3)**2 + 0.01 * WIDTH``, after a short sleep; it prints the
autoresearch summary block, exits 3 when ``CRASH`` is set, and speaks the validator's dry-run
protocol (``FANOUT_DRY_RUN=N``), where a non-positive ``WIDTH`` fails like a shape mismatch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fanout_research.research.proposals import Proposal, ResearchContext, SearchReplace, WriteFile
from fanout_research.testing.repo import git

FANOUT = str(Path(sys.executable).parent / "fanout")
# Settings that would make rich treat a pipe as a terminal; the tests want what an agent sees.
TERMINAL_FORCING = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "FANOUT_STUDY_DIR")

TRAIN = '''\
"""Tiny deterministic trainer for the loop tests."""
import os
import sys
import time

LR = 0.1
WIDTH = 4
CRASH = 0

sleep_s = {sleep}
dry_run_sleep_s = {dry_sleep}


def main():
    if WIDTH <= 0:
        raise ValueError(f"shape mismatch: WIDTH={{WIDTH}} must be positive")
    dry_run = os.environ.get("FANOUT_DRY_RUN")
    if dry_run:
        time.sleep(dry_run_sleep_s)
        print(f"fanout-dry-run loss={{1.0 + LR:.4f}} steps={{int(dry_run)}}", flush=True)
        return 0
    print(f"trainer start pid={{os.getpid()}}", flush=True)
    if CRASH:
        print("crashing on purpose", file=sys.stderr, flush=True)
        return 3
    time.sleep(sleep_s)
    val_bpb = 1.0 + (LR - 0.3) ** 2 + 0.01 * WIDTH
    print("---")
    print(f"val_bpb:          {{val_bpb:.6f}}")
    print(f"training_seconds: {{sleep_s:.1f}}")
    print("peak_vram_mb:     512.0")
    print(f"depth:            {{WIDTH}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''

PREPARE = '''\
"""Stand-in for the data preparation step; proposals may not edit it."""
VOCAB = 256
'''


def val_bpb(lr: float = 0.1, width: int = 4) -> float:
    """What the trainer reports for these knobs (rounded as it prints them)."""
    return round(1.0 + (lr - 0.3) ** 2 + 0.01 * width, 6)


BASELINE = val_bpb()


def config_toml(data_dir: Path, *, tag: str = "t", k: int = 3, threshold: float = 0.0,
                time_limit_s: float = 60, budget: float | None = None, extra: str = "") -> str:
    budget_line = f"budget_gpu_hours = {budget!r}\n" if budget is not None else ""
    return f"""\
[study]
tag = "{tag}"
k = {k}
branch = "research"
threshold = {threshold!r}
{budget_line}
[job]
command = "python train.py"
time_limit_s = {time_limit_s!r}
time_budget_s = 1
data_dir = "{data_dir}"

[validate]
allowed_files = ["train.py"]
dry_run_timeout_s = 30

[proposer.knobs]
exclude = ["CRASH"]

[backend.local]
slots = 4
kill_grace_s = 1
{extra}"""


def make_repo(root: Path, *, sleep: float = 0.2, dry_sleep: float = 0.0, **config: Any) -> Path:
    """A committed research repo at ``root/repo`` (clean tree, branch main) and its prepared data
    directory at ``root/data``."""
    data = root / "data"
    data.mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({"source": "test"}))
    repo = root / "repo"
    repo.mkdir()
    (repo / "train.py").write_text(TRAIN.format(sleep=sleep, dry_sleep=dry_sleep))
    (repo / "prepare.py").write_text(PREPARE)
    (repo / "program.md").write_text("Lower val_bpb.\n")
    (repo / "README.md").write_text("test research repo\n")
    (repo / "fanout.toml").write_text(config_toml(data, **config))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "research repo")
    return repo


# ----------------------------------------------------------------------------- proposals
def set_lr(old: float, new: float, description: str | None = None) -> Proposal:
    return Proposal(description=description or f"LR {old} -> {new}", knobs={"LR": new},
                    edits=(SearchReplace(path="train.py", search=f"LR = {old}\n", replace=f"LR = {new}\n"),),
                    proposer="scripted")


def set_width(old: int, new: int) -> Proposal:
    return Proposal(description=f"WIDTH {old} -> {new}", knobs={"WIDTH": new},
                    edits=(SearchReplace(path="train.py", search=f"WIDTH = {old}\n",
                                         replace=f"WIDTH = {new}\n"),), proposer="scripted")


def crash(lr_old: float, lr_new: float) -> Proposal:
    return Proposal(description=f"crash with LR {lr_new}", proposer="scripted", edits=(
        SearchReplace(path="train.py", search=f"LR = {lr_old}\n", replace=f"LR = {lr_new}\n"),
        SearchReplace(path="train.py", search="CRASH = 0\n", replace="CRASH = 1\n"),
    ))


def edit(description: str, *edits: SearchReplace | WriteFile) -> Proposal:
    return Proposal(description=description, edits=edits, proposer="scripted")


class ScriptedProposer:
    """Hands the loop the proposals given for each round, and remembers what it was shown."""

    name = "scripted"

    def __init__(self, rounds: dict[int, Sequence[Proposal]]) -> None:
        self.rounds = rounds
        self.contexts: list[ResearchContext] = []

    def propose(self, context: ResearchContext, k: int) -> list[Proposal]:
        self.contexts.append(context)
        return list(self.rounds[context.round])[:k]


# ----------------------------------------------------------------------------- reading a study
def study_root(repo: Path, name: str = "t") -> Path:
    return repo / ".git" / "fanout" / "studies" / name


def events(repo: Path, name: str = "t") -> list[dict[str, Any]]:
    path = study_root(repo, name) / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def candidate_records(repo: Path, name: str = "t") -> list[dict[str, Any]]:
    return [e["record"] for e in events(repo, name) if e["event"] == "candidate"]


def ledger(repo: Path, name: str = "t") -> list[dict[str, Any]]:
    path = study_root(repo, name) / "jobs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def submitted_names(repo: Path, name: str = "t") -> list[str]:
    return [e["name"] for e in ledger(repo, name) if e["event"] == "submitted"]


def job_dirs(repo: Path, name: str = "t") -> set[str]:
    jobs = study_root(repo, name) / "local" / "jobs"
    return {p.name for p in jobs.iterdir() if not p.name.startswith(".")} if jobs.exists() else set()


def job_state(repo: Path, job: str, name: str = "t") -> dict[str, Any] | None:
    path = study_root(repo, name) / "local" / "jobs" / job / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tsv_rows(repo: Path, name: str = "t") -> tuple[list[str], list[dict[str, str]]]:
    lines = (study_root(repo, name) / "results.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return header, [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


def tip(repo: Path, branch: str) -> str | None:
    done = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet",
                           f"refs/heads/{branch}"], capture_output=True, text=True)
    return done.stdout.strip() or None


def branches(repo: Path) -> dict[str, str]:
    out = git(repo, "for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads/")
    return dict(line.split(" ", 1) for line in out.splitlines())


# ----------------------------------------------------------------------------- the CLI
def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in TERMINAL_FORCING}


def fanout(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FANOUT, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    return done


def start_fanout(cwd: Path, *args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([FANOUT, *args], cwd=cwd, env=cli_env(), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_for(condition: Callable[[], Any], timeout: float, what: str,
             proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> Any:
    """Poll ``condition`` until it is truthy; fail early if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            detail = log.read_text() if log else ""
            raise AssertionError(f"fanout exited ({proc.returncode}) before {what}:\n{detail}")
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
