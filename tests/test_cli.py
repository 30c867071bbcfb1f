"""The ``fanout`` command end to end: the real console script, real git repos, real job processes.

Every command runs as a subprocess in a throwaway research repo holding the conformance job, so
submit and wait are always separate processes, as they are for an agent driving the CLI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fanout_research.jobs import JobClient
from fanout_research.study import StudyDir
from fanout_research.testing.repo import commit_files, git, make_research_repo

FANOUT = str(Path(sys.executable).parent / "fanout")
SECRET = "sk-test-secret-8c1f"
# Settings that would make rich treat a pipe as a terminal; the tests want what an agent sees.
TERMINAL_FORCING = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "FANOUT_STUDY_DIR")
CONFIG = f"""\
[job]
command = "{sys.executable} job.py"
time_limit_s = 30
[backend.local]
slots = 4
kill_grace_s = 1.0
"""
PROGRESS_LINE = r"^\[\s*\d+\.\ds\] {slug}: (\w+ -> )?{phase}\b"


def fanout(cwd: Path, *args: str, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in TERMINAL_FORCING}
    full_env.update(env or {})
    return subprocess.run([FANOUT, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    return done


def make_cli_repo(path: Path, config: str = CONFIG) -> Path:
    repo, _ = make_research_repo(path)
    commit_files(repo, {"fanout.toml": config}, "fanout settings")
    return repo


def submit(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = ok(fanout(repo, "submit", *args, env=env))
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    return lines[0]


def status_json(repo: Path, *slugs: str) -> dict[str, dict[str, Any]]:
    return {row["slug"]: row for row in json.loads(ok(fanout(repo, "status", "--json", *slugs)).stdout)}


def job_pid(repo: Path, slug: str, within_s: float = 15) -> int:
    """The job's own pid, from the line it prints first; waits for it to start."""
    deadline = time.monotonic() + within_s
    while True:
        match = re.search(r"^job-start pid=(\d+)", ok(fanout(repo, "logs", slug)).stdout, re.MULTILINE)
        if match:
            return int(match.group(1))
        assert time.monotonic() < deadline, f"{slug} never started"
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def study_dir(repo: Path, study: str = "default") -> Path:
    return repo / ".git" / "fanout" / "studies" / study


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_cli_repo(tmp_path / "repo")


@pytest.fixture
def hanging(repo: Path) -> Iterator[Callable[..., str]]:
    """Submit jobs that never end by themselves; whatever is left running is cancelled afterwards."""
    slugs: list[str] = []

    def start(*args: str) -> str:
        slug = submit(repo, "--env", "FANOUT_TEST_MODE=hang", *args)
        slugs.append(slug)
        return slug

    yield start
    if slugs:  # in-process: the same code as `fanout cancel`, without another interpreter start-up
        JobClient(StudyDir.for_repo(repo)).cancel(slugs)


# -- the happy path ------------------------------------------------------------------------------
def test_submit_wait_status(repo: Path):
    second = submit(repo, "--env", "FANOUT_TEST_MODE=json")
    first = fanout(repo, "submit", "--env", "FANOUT_TEST_SLEEP=1")
    ok(first)
    assert re.fullmatch(r"[a-z0-9][-a-z0-9]*[a-z0-9]\n", first.stdout), first.stdout  # the slug alone
    slug = first.stdout.strip()
    assert first.stderr.splitlines() == [
        f"submitted {slug}: commit {git(repo, 'rev-parse', 'HEAD')[:12]} on backend local (study default)"
    ]  # progress for humans only on stderr
    assert second != slug

    waited = ok(fanout(repo, "wait", slug, second))  # another process than the one that submitted
    lines = waited.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{slug}  succeeded  ")
    assert "val_bpb=1.234567" in lines[0] and "num_steps=42" in lines[0]
    assert lines[1].startswith(f"{second}  succeeded  ") and "val_bpb=1.500000" in lines[1]
    # not a TTY: one plain line per state change on stderr, and no terminal escapes
    assert "\x1b" not in waited.stderr
    assert re.search(PROGRESS_LINE.format(slug=re.escape(slug), phase="running"), waited.stderr, re.M)
    assert re.search(PROGRESS_LINE.format(slug=re.escape(slug), phase="succeeded"), waited.stderr, re.M)
    assert re.search(PROGRESS_LINE.format(slug=re.escape(second), phase="succeeded"), waited.stderr, re.M)

    listed = ok(fanout(repo, "status")).stdout.splitlines()
    assert [line.split()[:2] for line in listed] == [[second, "succeeded"], [slug, "succeeded"]]
    assert "val_bpb=1.234567" in listed[1]

    as_json = ok(fanout(repo, "wait", "--json", slug, second))
    records = json.loads(as_json.stdout)
    assert [r["slug"] for r in records] == [slug, second]
    assert [r["phase"] for r in records] == ["succeeded", "succeeded"]
    assert [r["exit_code"] for r in records] == [0, 0]
    assert records[0]["metrics"] == {
        "val_bpb": 1.234567, "training_seconds": 1.5, "peak_vram_mb": 0.0, "num_steps": 42, "depth": 2,
    }
    assert records[1]["metrics"]["val_bpb"] == 1.5 and records[1]["metrics"]["profile"] == "conformance"
    assert records[0]["run_seconds"] >= 0.9


def test_untracked_files_do_not_block_submit(repo: Path):
    (repo / "results.tsv").write_text("commit\tval_bpb\tstatus\n")
    slug = submit(repo)
    assert ok(fanout(repo, "wait", slug)).stdout.startswith(f"{slug}  succeeded")
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == "?? results.tsv"
    assert (repo / "results.tsv").read_text() == "commit\tval_bpb\tstatus\n"


def test_same_name_is_the_same_job(repo: Path):
    first = submit(repo, "--name", "exp-depth-8", "--env", "FANOUT_TEST_SLEEP=0.3")
    again = submit(repo, "--name", "exp-depth-8", "--env", "FANOUT_TEST_SLEEP=0.3")
    assert first == again == "exp-depth-8"
    ok(fanout(repo, "wait", "exp-depth-8"))
    assert ok(fanout(repo, "logs", first)).stdout.count("job-start") == 1  # it ran once
    ledger = (study_dir(repo) / "jobs.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["event"] == "submitted" for line in ledger) == 1


def test_backends_lists_local(tmp_path: Path):
    done = ok(fanout(tmp_path, "backends"))  # needs no repo
    assert "local\tfanout_research.backends.local:LocalBackend" in done.stdout.splitlines()


# -- failures and exit codes ---------------------------------------------------------------------
def test_wait_exit_codes_for_failed_jobs(repo: Path):
    good = submit(repo)
    crashed = submit(repo, "--env", "FANOUT_TEST_MODE=crash")
    silent = submit(repo, "--env", "FANOUT_TEST_MODE=nometric")

    mixed = fanout(repo, "wait", good, crashed, silent)
    assert mixed.returncode == 1, mixed.stderr
    lines = mixed.stdout.splitlines()
    assert lines[0].startswith(f"{good}  succeeded") and "val_bpb=1.234567" in lines[0]
    assert any(line.startswith(f"{crashed}  failed  crash: exit code 3") for line in lines)
    assert any(line.startswith(f"{silent}  failed  no_metric: no metric") for line in lines)

    alone = fanout(repo, "wait", crashed)
    assert alone.returncode == 1
    assert "    | boom: deliberate crash" in alone.stdout.splitlines()  # the log tail, on stdout
    assert "val_bpb" not in alone.stdout

    as_json = fanout(repo, "wait", "--json", good, crashed, silent)
    assert as_json.returncode == 1
    records = json.loads(as_json.stdout)
    assert [(r["phase"], r["failure"], r["exit_code"]) for r in records] == [
        ("succeeded", None, 0), ("failed", "crash", 3), ("failed", "no_metric", 0),
    ]
    assert "boom: deliberate crash" in records[1]["log_tail"]


def test_wait_timeout_leaves_the_job_running(repo: Path, hanging):
    slug = hanging()
    pid = job_pid(repo, slug)  # running for sure, whatever the machine's load
    started = time.monotonic()
    done = fanout(repo, "wait", "--timeout", "1", slug)
    assert done.returncode == 124
    assert 1 <= time.monotonic() - started < 15
    assert "timed out after 1s" in done.stderr and slug in done.stderr.splitlines()[-1]
    assert f"{slug}  running  unfinished" in done.stdout
    assert alive(pid)
    assert status_json(repo, slug)[slug]["phase"] == "running"


def test_wait_timeout_can_cancel(repo: Path, hanging):
    slug = hanging()
    done = fanout(repo, "wait", "--timeout", "1", "--cancel-on-timeout", "--json", slug)
    assert done.returncode == 124
    assert slug in done.stderr and "cancelled" in done.stderr
    (record,) = json.loads(done.stdout)
    assert (record["slug"], record["phase"], record["unfinished"]) == (slug, "cancelled", True)
    assert status_json(repo, slug)[slug]["phase"] == "cancelled"


def test_cancel(repo: Path, hanging):
    slug = hanging()
    pid = job_pid(repo, slug)
    assert alive(pid)
    done = ok(fanout(repo, "cancel", slug))
    assert done.stdout == f"{slug}  cancelled\n"
    assert not alive(pid)
    assert ok(fanout(repo, "status", slug)).stdout.split()[:2] == [slug, "cancelled"]
    events = [json.loads(line)["event"] for line in (study_dir(repo) / "jobs.jsonl").read_text().splitlines()]
    assert events == ["submitted", "cancel_requested", "result"]


def test_time_limit(repo: Path, hanging):
    slug = hanging("--time-limit", "1")
    done = fanout(repo, "wait", slug)
    assert done.returncode == 1
    assert done.stdout.startswith(f"{slug}  timed_out  ")
    assert "time limit of 1s" in done.stdout


# -- logs -------------------------------------------------------------------------------------------
def test_logs_follow_returns_when_the_job_ends(repo: Path):
    slug = submit(repo, "--env", "FANOUT_TEST_SLEEP=1")
    started = time.monotonic()
    followed = ok(fanout(repo, "logs", "--follow", slug))
    assert time.monotonic() - started > 0.8  # it really waited for the job
    out = followed.stdout
    assert out.count("job-start") == 1 and out.count("---") == 1  # everything, nothing twice
    assert out.endswith("depth:            2\n")
    assert status_json(repo, slug)[slug]["phase"] == "succeeded"


# -- secrets -------------------------------------------------------------------------------------
def test_job_does_not_see_the_submitters_secrets(repo: Path):
    secrets_env = {
        "OPENAI_API_KEY": SECRET, "FANOUT_CONFORMANCE_SECRET": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET,
    }
    slug = submit(repo, "--env", "FANOUT_TEST_MODE=env", env=secrets_env)
    ok(fanout(repo, "wait", slug, env=secrets_env))
    log = ok(fanout(repo, "logs", slug)).stdout
    assert "secret-hidden" in log and "secret-visible" not in log
    assert f"env FANOUT_JOB_NAME={slug}" in log  # the protocol's variables do get through

    ledger = study_dir(repo) / "jobs.jsonl"
    assert slug in ledger.read_text()
    assert SECRET not in ledger.read_text()
    files = [p for p in study_dir(repo).rglob("*") if p.is_file()]
    assert len(files) >= 4
    leaked = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert leaked == []


# -- bad input: exit 2, one line, nothing changed ------------------------------------------------
def snapshot(repo: Path) -> dict[str, Any]:
    def run_git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return f"{done.returncode}:{done.stdout}"

    fanout_dir = repo / ".git" / "fanout"
    ledgers = sorted(fanout_dir.glob("studies/*/jobs.jsonl"))
    return {
        "refs": run_git("for-each-ref"),
        "head": run_git("rev-parse", "HEAD"),
        "status": run_git("status", "--porcelain=v1", "--untracked-files=all"),
        "branch": run_git("branch", "--show-current"),
        "worktrees": run_git("worktree", "list", "--porcelain"),
        "ledgers": {str(p): p.read_bytes() for p in ledgers},
        "job_dirs": sorted(str(p.relative_to(repo)) for p in fanout_dir.glob("studies/*/*/jobs/*")),
        "fanout_files": sorted(str(p.relative_to(repo)) for p in fanout_dir.rglob("*")),
        "tree": sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if ".git" not in p.parts),
    }


def assert_bad_input(done: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fanout: error: ")
    for text in expected:
        assert text in lines[0], (text, lines[0])


@pytest.fixture(scope="module")
def settled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo with one finished job in its study and an untracked results.tsv."""
    base = tmp_path_factory.mktemp("settled")
    repo = make_cli_repo(base / "repo")
    env = {"FANOUT_SLOTS_DIR": str(base / "slots")}
    slug = submit(repo, "--name", "base-job", env=env)
    ok(fanout(repo, "wait", slug, env=env))
    (repo / "results.tsv").write_text("commit\tval_bpb\n")
    return repo


BAD_INPUT = [
    pytest.param(["submit", "no-such-rev"], ["unknown revision", "no-such-rev"], id="unknown-revision"),
    pytest.param(["submit", "1" * 40], ["unknown revision"], id="unknown-full-hash"),
    pytest.param(["wait", "no-such-slug"], ["unknown job: no-such-slug"], id="wait-unknown-slug"),
    pytest.param(["logs", "no-such-slug"], ["unknown job: no-such-slug"], id="logs-unknown-slug"),
    pytest.param(["cancel", "base-job", "no-such-slug"], ["unknown job: no-such-slug"],
                 id="cancel-known-and-unknown"),
    pytest.param(["status", "no-such-slug"], ["unknown job: no-such-slug"], id="status-unknown-slug"),
    pytest.param(["submit", "--backend", "no-such-backend"], ["unknown backend", "local"],
                 id="unknown-backend"),
    pytest.param(["submit", "--time-limit", "-5"], ["--time-limit", "positive"], id="negative-time-limit"),
    pytest.param(["submit", "--command", "no-such-cmd-xyz"], ["command not found", "no-such-cmd-xyz"],
                 id="command-not-found"),
    pytest.param(["submit", "--env", "NOEQUALS"], ["--env", "NOEQUALS"], id="env-without-equals"),
    pytest.param(["submit", "--env", "1BAD=x"], ["1BAD"], id="env-bad-name"),
    pytest.param(["submit", "--name", "Bad_Name"], ["Bad_Name"], id="invalid-name"),
    pytest.param(["submit", "--name", "base-job", "--env", "OTHER=1"], ["a different job named 'base-job'"],
                 id="same-name-other-spec"),
    pytest.param(["wait", "--timeout", "-1", "base-job"], ["--timeout"], id="negative-timeout"),
]


@pytest.mark.parametrize("args,expected", BAD_INPUT)
def test_bad_input_changes_nothing(settled: Path, args: list[str], expected: list[str]):
    before = snapshot(settled)
    assert before["job_dirs"] and before["ledgers"]  # there is something that could change
    assert_bad_input(fanout(settled, *args), *expected)
    assert snapshot(settled) == before


def test_dirty_tree_is_refused_and_left_alone(settled: Path):
    marker = settled / "marker.txt"
    original = marker.read_text()
    marker.write_text("edited but not committed\n")
    try:
        before = snapshot(settled)
        assert " M marker.txt" in before["status"]
        assert_bad_input(fanout(settled, "submit"), "uncommitted changes", "marker.txt")
        assert snapshot(settled) == before
        assert marker.read_text() == "edited but not committed\n"
    finally:
        marker.write_text(original)


@pytest.mark.parametrize("args", [["submit"], ["wait", "some-job"]])
def test_outside_a_git_repo(tmp_path: Path, args: list[str]):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "train.py").write_text("print('hi')\n")
    assert_bad_input(fanout(plain, *args), "not a git repository")
    assert sorted(p.name for p in plain.rglob("*")) == ["train.py"]


def test_badly_typed_backend_option_is_bad_input(tmp_path: Path):
    repo = make_cli_repo(tmp_path / "repo", CONFIG.replace("slots = 4", 'slots = "four"'))
    before = snapshot(repo)
    assert_bad_input(fanout(repo, "submit"), "slots")
    assert snapshot(repo) == before


def test_null_hash_is_an_unknown_revision(tmp_path: Path):
    repo = make_cli_repo(tmp_path / "repo")
    before = snapshot(repo)
    assert_bad_input(fanout(repo, "submit", "0" * 40), "unknown revision")
    assert snapshot(repo) == before


def test_logs(settled: Path):
    repo, slug = settled, "base-job"
    full = ok(fanout(repo, "logs", slug)).stdout
    assert re.match(r"job-start pid=\d+ mode=ok\n---\nval_bpb: +1\.234567\n", full)
    assert full.endswith("depth:            2\n")
    tail = ok(fanout(repo, "logs", "--tail", "1", slug)).stdout
    assert tail.splitlines() == ["depth:            2"]
    assert ok(fanout(repo, "logs", "--tail", "3", slug)).stdout.splitlines() == full.splitlines()[-3:]


def test_logs_tail_ends_with_a_newline(settled: Path):
    assert ok(fanout(settled, "logs", "--tail", "1", "base-job")).stdout == "depth:            2\n"


def test_results_and_best_read_the_job_ledger_when_an_agent_drives_the_study(repo: Path) -> None:
    """No `fanout run`, so no study log: an agent that drives jobs with submit/wait still gets a
    results table and the best job without parsing logs, including for jobs it never waited on."""
    good = submit(repo, "--name", "agent-r01-c1")
    bad = submit(repo, "--name", "agent-r01-c2", "--env", "FANOUT_TEST_MODE=crash")
    ok(fanout(repo, "wait", good))  # `bad` is never waited for
    deadline = time.monotonic() + 30
    while True:
        rows = {row["name"]: row for row in json.loads(ok(fanout(repo, "results", "--json")).stdout)}
        if rows[bad]["phase"] != "unfinished" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rows[good]["phase"] == "succeeded" and rows[good]["val_bpb"] == pytest.approx(1.234567)
    assert rows[bad]["phase"] == "failed" and rows[bad]["val_bpb"] is None
    assert "exit code 3" in rows[bad]["reason"]
    best = json.loads(ok(fanout(repo, "best", "--json")).stdout)
    assert best["name"] == good and best["commit"] == rows[good]["commit"]
    table = ok(fanout(repo, "results")).stdout
    assert "agent-r01-c1" in table and "1.234567" in table and "failed" in table


def test_reap_stops_every_unfinished_job_of_the_study(repo: Path, hanging) -> None:
    first, second = hanging(), hanging()
    done_slug = submit(repo)
    ok(fanout(repo, "wait", done_slug))
    for slug in (first, second):
        job_pid(repo, slug)  # both running
    reaped = ok(fanout(repo, "reap"))
    assert sorted(reaped.stdout.split()) == sorted([first, second])
    states = status_json(repo)
    assert (states[first]["phase"], states[second]["phase"], states[done_slug]["phase"]) == (
        "cancelled", "cancelled", "succeeded")
    assert ok(fanout(repo, "reap")).stdout == ""  # nothing left to stop
