"""The research loop end to end: real git repos, real LocalBackend jobs, real subprocesses.

The trainer is the cheap one of ``loop_helpers`` (a deterministic val_bpb from its knobs after a
short sleep), so a round takes well under a second and every outcome is known in advance:
baseline ``LR = 0.1, WIDTH = 4`` gives 1.08, ``LR = 0.3`` gives 1.04, ``WIDTH = 2`` takes 0.02 off.
Most tests drive ``Study`` in-process with a scripted proposer; the kill-and-resume tests and the
result commands go through the real ``fanout`` console script (which uses the KnobProposer).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from loop_helpers import (
    BASELINE,
    ScriptedProposer,
    branches,
    candidate_records,
    crash,
    edit,
    events,
    fanout,
    job_dirs,
    job_state,
    ledger,
    make_repo,
    ok,
    set_lr,
    set_width,
    start_fanout,
    study_root,
    submitted_names,
    tip,
    tsv_rows,
    val_bpb,
    wait_for,
)

from fanout_research.errors import ConfigError
from fanout_research.research.loop import Round, Study, StudyError
from fanout_research.research.proposals import SearchReplace, WriteFile
from fanout_research.testing.repo import git

TSV_HEADER = ["commit", "val_bpb", "memory_gb", "status", "description", "round", "candidate"]


def by_event(repo: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in events(repo) if e["event"] == kind]


def is_ancestor(repo: Path, old: str, new: str) -> bool:
    return subprocess.run(["git", "-C", str(repo), "merge-base", "--is-ancestor", old, new]).returncode == 0


# ----------------------------------------------------------------------------- 1. a winner
def test_a_round_with_a_winner_fast_forwards_the_research_branch(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, k=3)
    head = git(repo, "rev-parse", "HEAD")
    proposer = ScriptedProposer({
        1: [set_lr(0.1, 0.2), set_lr(0.1, 0.3), set_lr(0.1, 0.05)],  # 1.05, 1.04 (best), 1.1025
        2: [set_width(4, 2), set_lr(0.3, 0.35)],  # from the round-1 winner: 1.02 (best), 1.0425
    })
    study = Study(repo, proposer=proposer)

    first = study.run(rounds=1)
    assert first.stopped == "" and [r.number for r in first.rounds] == [1]
    outcome = first.rounds[0]
    assert outcome.base == head
    assert [(r.name, r.status) for r in outcome.records] == [
        ("t-r01-c1", "discard"), ("t-r01-c2", "keep"), ("t-r01-c3", "discard")]
    assert [r.val_bpb for r in outcome.records] == [val_bpb(0.2), val_bpb(0.3), val_bpb(0.05)]
    winner = outcome.winner
    assert winner is not None and winner.name == "t-r01-c2" and outcome.best_val_bpb == val_bpb(0.3)

    # The candidate branches exist, each one commit on top of the base; the research branch was
    # created at the user's HEAD and fast-forwarded to the winner's commit.
    heads = branches(repo)
    for i, record in enumerate(outcome.records, start=1):
        assert record.branch == f"fanout/t/r01-c{i}"
        assert heads[record.branch] == record.commit
        assert git(repo, "rev-parse", f"{record.commit}^") == head
    assert heads["research"] == winner.commit
    assert is_ancestor(repo, head, heads["research"])
    assert git(repo, "show", f"{winner.commit}:train.py").count("LR = 0.3\n") == 1
    assert heads["main"] == head

    # results.tsv: the autoresearch columns, the baseline, then one row per candidate.
    header, rows = tsv_rows(repo)
    assert header == TSV_HEADER
    assert [(r["status"], r["round"], r["candidate"]) for r in rows] == [
        ("baseline", "0", "0"), ("discard", "1", "1"), ("keep", "1", "2"), ("discard", "1", "3")]
    assert rows[0]["commit"] == head[:7] and float(rows[0]["val_bpb"]) == BASELINE
    assert rows[2]["commit"] == winner.commit[:7] and rows[2]["description"] == "LR 0.1 -> 0.3"
    assert float(rows[2]["memory_gb"]) == 0.5

    # runs.jsonl: every step of the round, in order.
    kinds = [e["event"] for e in events(repo)]
    assert kinds[:2] == ["round_started", "proposals"] and kinds[-1] == "round_finished"
    assert Counter(kinds) == {"round_started": 1, "proposals": 1, "candidate": 4, "round_finished": 1}
    started, finished = by_event(repo, "round_started")[0], by_event(repo, "round_finished")[0]
    assert started["base"] == head and started["best"] is None
    assert finished["winner"] == "t-r01-c2" and finished["best"] == val_bpb(0.3)
    proposals = by_event(repo, "proposals")[0]["proposals"]
    assert [p["description"] for p in proposals] == [r.description for r in outcome.records]

    # Round 2 starts from the winner, knows the best so far, and measures no second baseline.
    second = study.run(rounds=2)
    assert [r.number for r in second.rounds] == [2]
    context = proposer.contexts[-1]
    assert context.round == 2 and context.base_commit == winner.commit
    assert context.best_val_bpb == val_bpb(0.3)
    assert [a.status for a in context.history] == ["baseline", "discard", "keep", "discard"]
    assert "LR = 0.3\n" in context.files["train.py"]
    round2 = second.rounds[0]
    assert round2.base == winner.commit
    assert [(r.name, r.status, r.val_bpb) for r in round2.records] == [
        ("t-r02-c1", "keep", val_bpb(0.3, 2)), ("t-r02-c2", "discard", val_bpb(0.35))]
    assert tip(repo, "research") == round2.records[0].commit
    assert git(repo, "rev-parse", f"{round2.records[0].commit}^") == winner.commit

    records = candidate_records(repo)
    assert [r["status"] for r in records].count("baseline") == 1
    assert Counter(submitted_names(repo)) == Counter(
        ["t-r00-c0", "t-r01-c1", "t-r01-c2", "t-r01-c3", "t-r02-c1", "t-r02-c2"])
    assert len(tsv_rows(repo)[1]) == 6
    # A finished study asked for the same number of rounds does nothing more.
    assert study.run(rounds=2).rounds == []
    assert len(events(repo)) == 2 * 3 + 6


# ----------------------------------------------------------------------------- 2. no winner
def test_a_round_with_no_winner_moves_nothing(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, k=2, threshold=0.05)
    head = git(repo, "rev-parse", "HEAD")
    proposer = ScriptedProposer({
        1: [set_lr(0.1, 0.2), set_lr(0.1, 0.0)],  # 1.05 is better than 1.08, but by less than 0.05
        2: [set_lr(0.1, 0.0), set_lr(0.1, 0.65)],  # both worse than the baseline
    })
    outcome = Round(k=2, repo=repo, proposer=proposer).run()
    assert outcome.number == 1 and outcome.winner is None
    assert [(r.status, r.val_bpb) for r in outcome.records] == [
        ("discard", val_bpb(0.2)), ("discard", val_bpb(0.0))]
    assert tip(repo, "research") == head
    assert by_event(repo, "round_finished")[0]["winner"] is None
    assert by_event(repo, "round_finished")[0]["best"] == BASELINE

    outcome = Round(k=2, repo=repo, proposer=proposer).run()
    assert outcome.number == 2 and outcome.base == head and outcome.winner is None
    assert [r.status for r in outcome.records] == ["discard", "discard"]
    assert tip(repo, "research") == head
    assert [r["status"] for r in tsv_rows(repo)[1]] == ["baseline"] + ["discard"] * 4
    assert proposer.contexts[-1].best_val_bpb == BASELINE


# ----------------------------------------------------------------------------- 3. crashes
def test_a_round_where_every_candidate_crashes_keeps_nothing_and_the_study_goes_on(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, k=2)
    head = git(repo, "rev-parse", "HEAD")
    proposer = ScriptedProposer({
        1: [crash(0.1, 0.3), crash(0.1, 0.2)],  # would win, but they pass validation and crash
        2: [set_lr(0.1, 0.2), set_lr(0.1, 0.3)],
    })
    study = Study(repo, proposer=proposer)
    outcome = study.run(rounds=1).rounds[0]
    assert outcome.winner is None
    for record in outcome.records:
        assert record.status == "crash" and record.val_bpb is None
        assert record.reason == "exit code 3"
        assert tip(repo, record.branch) == record.commit  # it was committed and really ran
    assert tip(repo, "research") == head
    assert [r["status"] for r in tsv_rows(repo)[1]] == ["baseline", "crash", "crash"]
    for name in ("t-r01-c1", "t-r01-c2"):
        log = (study_root(repo) / "local" / "jobs" / name / "output.log").read_text()
        assert "crashing on purpose" in log

    outcome = study.run(rounds=2).rounds[0]
    assert outcome.number == 2 and outcome.base == head
    assert [r.status for r in outcome.records] == ["discard", "keep"]
    assert tip(repo, "research") == outcome.records[1].commit
    assert [a.status for a in proposer.contexts[-1].history] == ["baseline", "crash", "crash"]


def test_a_failing_baseline_stops_the_study(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, k=1)
    (repo / "train.py").write_text((repo / "train.py").read_text().replace("CRASH = 0\n", "CRASH = 1\n"))
    git(repo, "commit", "-q", "-am", "crash the baseline")
    study = Study(repo, proposer=ScriptedProposer({1: [set_lr(0.1, 0.3)]}))
    with pytest.raises(StudyError, match="baseline run t-r00-c0 failed"):
        study.run(rounds=1)
    assert [(r["round"], r["candidate"], r["status"]) for r in candidate_records(repo)] == [(0, 0, "crash")]
    assert not by_event(repo, "round_finished")
    # A rerun measures the baseline again, under the next attempt's name, and keeps nothing
    # (the research branch never moves without a baseline to beat).
    with pytest.raises(StudyError, match="baseline run t-r00-c1 failed"):
        Study(repo, proposer=ScriptedProposer({1: [set_lr(0.1, 0.3)]})).run(rounds=1)
    assert [(r["round"], r["candidate"], r["status"]) for r in candidate_records(repo)] == [
        (0, 0, "crash"), (0, 1, "crash")]
    assert git(repo, "rev-parse", "research") == git(repo, "rev-parse", "main")


# ----------------------------------------------------------------------------- 4. validation
BAD_PROPOSALS = {  # description -> (proposal, the step that must reject it, a word its reason names)
    "syntax error": (edit("syntax error", SearchReplace(path="train.py", search="WIDTH = 4\n",
                                                        replace="WIDTH = = 4\n")), "syntax", "train.py:7"),
    "missing import": (edit("missing import", SearchReplace(
        path="train.py", search="import time\n", replace="import time\nimport numpy_missing_xyz\n")),
        "imports", "numpy_missing_xyz"),
    "edit prepare.py": (edit("edit prepare.py", SearchReplace(path="prepare.py", search="VOCAB = 256",
                                                              replace="VOCAB = 512")), "files", "prepare.py"),
    "path traversal": (edit("path traversal", WriteFile(path="../evil.py", content="X = 1\n")),
                       "files", ".."),
    "read an API key": (edit("read an API key", SearchReplace(
        path="train.py", search="import time\n",
        replace='import time\nKEY = os.environ.get("OPENAI_API_KEY")\n')), "secrets", "OPENAI_API_KEY"),
    "search text not in file": (edit("search text not in file", SearchReplace(
        path="train.py", search="LR = 0.7\n", replace="LR = 0.3\n")), "apply", "not found"),
    "dry-run crash": (edit("dry-run crash", SearchReplace(path="train.py", search="WIDTH = 4\n",
                                                          replace="WIDTH = -1\n")),
                      "dry_run", "shape mismatch"),
}


def test_bad_proposals_are_rejected_by_the_loop_and_never_submitted(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, k=len(BAD_PROPOSALS) + 1)
    head = git(repo, "rev-parse", "HEAD")
    good = set_lr(0.1, 0.3)
    proposals = [proposal for proposal, _, _ in BAD_PROPOSALS.values()] + [good]
    outcome = Study(repo, proposer=ScriptedProposer({1: proposals})).run(rounds=1).rounds[0]

    bad_names = {f"t-r01-c{i}" for i in range(1, len(BAD_PROPOSALS) + 1)}
    good_name = f"t-r01-c{len(BAD_PROPOSALS) + 1}"
    records = {r.description: r for r in outcome.records}
    assert len(records) == len(proposals)
    for description, (_, step, word) in BAD_PROPOSALS.items():
        record = records[description]
        assert record.status == "reject", (description, record)
        assert record.reason.startswith(f"{step}: "), (description, record.reason)
        assert word in record.reason, (description, record.reason)
        assert record.commit is None and record.val_bpb is None and record.job_slug is None
        assert tip(repo, f"fanout/t/r01-c{record.candidate}") is None
    assert records[good.description].status == "keep" and records[good.description].name == good_name
    assert tip(repo, "research") == records[good.description].commit

    # In the study's own records too: runs.jsonl and results.tsv.
    logged = {r["description"]: r for r in candidate_records(repo)}
    for description, (_, step, _) in BAD_PROPOSALS.items():
        assert logged[description]["status"] == "reject"
        assert logged[description]["reason"].startswith(f"{step}: ")
    rows = {r["description"]: r for r in tsv_rows(repo)[1]}
    assert {d for d, r in rows.items() if r["status"] == "reject"} == set(BAD_PROPOSALS)
    assert all(rows[d]["commit"] == head[:7] for d in BAD_PROPOSALS)  # the parent: there is no commit

    # No job for any of them: not in the job ledger, no job directory, no candidate worktree left.
    assert sorted(submitted_names(repo)) == ["t-r00-c0", good_name]
    assert not bad_names & {e["name"] for e in ledger(repo)}
    assert job_dirs(repo) == {"t-r00-c0", good_name}
    candidates = study_root(repo) / "candidates"
    assert not candidates.exists() or not any(candidates.iterdir())
    assert "../evil.py" not in git(repo, "ls-tree", "-r", "--name-only", "research")
    assert not (tmp_path / "evil.py").exists()


# ----------------------------------------------------------------------------- 5. kill and resume
def check_resumed_study(repo: Path, head: str, k: int, rounds: int = 2) -> list[dict[str, Any]]:
    """What must hold after a study was killed and resumed: every job once, every result kept."""
    names = submitted_names(repo)
    assert len(names) == len(set(names)), Counter(names)  # no job submitted twice
    assert set(names) == job_dirs(repo)
    expected = {"t-r00-c0"} | {f"t-r{n:02d}-c{i}" for n in range(1, rounds + 1) for i in range(1, k + 1)}
    assert set(names) == expected
    results = {e["name"]: e["result"] for e in ledger(repo) if e["event"] == "result"}
    assert set(results) == expected  # every job's result was collected
    for name in names:  # and each job's trainer ran exactly once
        log = (study_root(repo) / "local" / "jobs" / name / "output.log").read_text()
        assert log.count("trainer start") == 1, (name, log)

    kinds = Counter((e["event"], e.get("round")) for e in events(repo) if e["event"] != "candidate")
    for n in range(1, rounds + 1):
        assert kinds[("round_started", n)] == kinds[("proposals", n)] == kinds[("round_finished", n)] == 1

    records = candidate_records(repo)
    keys = [(r["round"], r["candidate"]) for r in records]
    assert len(keys) == len(set(keys)) == 1 + rounds * k  # no lost and no duplicate result
    assert [r["status"] for r in records].count("baseline") == 1
    for r in records:
        assert r["status"] in ("baseline", "keep", "discard"), r
        assert r["val_bpb"] == results[r["name"]]["metrics"]["val_bpb"]
        assert r["val_bpb"] == val_bpb(r["knobs"]["LR"], r["knobs"]["WIDTH"])

    # The research branch: each round started from the previous one's result, and it ends at the
    # last kept candidate (or where it began if none was kept).
    base = head
    best = next(r["val_bpb"] for r in records if r["status"] == "baseline")
    for n in range(1, rounds + 1):
        started = next(e for e in events(repo) if e["event"] == "round_started" and e["round"] == n)
        assert started["base"] == base
        these = [r for r in records if r["round"] == n]
        kept = [r for r in these if r["status"] == "keep"]
        winner = min(these, key=lambda r: r["val_bpb"])
        if winner["val_bpb"] < best:
            assert kept == [winner]
            base, best = winner["commit"], winner["val_bpb"]
        else:
            assert kept == []
    assert tip(repo, "research") == base
    return records


@pytest.mark.slow
def test_killed_while_jobs_run_the_study_resumes_without_losing_or_repeating_a_job(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, k=2, sleep=3.0)
    head = git(repo, "rev-parse", "HEAD")
    log = tmp_path / "first.log"
    proc = start_fanout(repo, "run", "--rounds", "2", log=log)
    round1 = ["t-r00-c0", "t-r01-c1", "t-r01-c2"]

    def all_running() -> bool:
        return all((job_state(repo, n) or {}).get("phase") == "running" for n in round1)

    try:
        wait_for(all_running, 60, "the round-1 jobs to run", proc, log)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the orchestrator only: its jobs are detached
        proc.wait()
    assert not by_event(repo, "round_finished") and not candidate_records(repo)
    # The jobs carry on and finish while nobody is watching them.
    wait_for(lambda: all((job_state(repo, n) or {}).get("phase") == "succeeded" for n in round1),
             60, "the orphaned jobs to finish")
    assert not [e for e in ledger(repo) if e["event"] == "result"]

    done = ok(fanout(repo, "run", "--rounds", "2"))
    assert "Traceback" not in done.stderr
    records = check_resumed_study(repo, head, k=2)
    assert [r["proposer"] for r in records if r["round"]] == ["knobs"] * 4  # the default proposer
    assert len(done.stdout.strip().splitlines()) == 1 + 5  # the results table

    again = ok(fanout(repo, "run", "--rounds", "2"))  # nothing left to do: nothing submitted
    assert len(submitted_names(repo)) == 5 and len(candidate_records(repo)) == 5
    assert again.stdout == done.stdout


@pytest.mark.slow
def test_killed_during_validation_the_study_resumes_with_the_recorded_proposals(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, k=2, dry_sleep=1.5)
    head = git(repo, "rev-parse", "HEAD")
    log = tmp_path / "first.log"
    proc = start_fanout(repo, "run", "--rounds", "2", log=log)
    try:
        wait_for(lambda: study_root(repo).joinpath("runs.jsonl").exists() and by_event(repo, "proposals"),
                 60, "round 1's proposals", proc, log)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    recorded = by_event(repo, "proposals")[0]["proposals"]
    assert submitted_names(repo) == [] and job_dirs(repo) == set()  # killed before any job

    ok(fanout(repo, "run", "--rounds", "2"))
    records = check_resumed_study(repo, head, k=2)
    assert [r["description"] for r in records if r["round"] == 1] == [p["description"] for p in recorded]
    assert not git(repo, "worktree", "list", "--porcelain").count("candidates/")


# ----------------------------------------------------------------------------- 6. the user's checkout
def checkout_snapshot(repo: Path) -> dict[str, Any]:
    """Everything of the user's checkout a study must leave alone."""
    files = {str(p.relative_to(repo)): p.read_bytes() for p in repo.rglob("*")
             if p.is_file() and ".git" not in p.relative_to(repo).parts}
    return {
        "head": git(repo, "rev-parse", "HEAD"),
        "branch": git(repo, "symbolic-ref", "HEAD"),
        "status": subprocess.run(  # not git(): it strips the leading space of " M file"
            ["git", "-C", str(repo), "status", "--porcelain=v1", "--untracked-files=all"],
            capture_output=True, text=True, check=True).stdout,
        "index": git(repo, "ls-files", "--stage"),
        "staged": git(repo, "diff", "--cached"),
        "unstaged": git(repo, "diff"),
        "files": files,
        "branches": {b: c for b, c in branches(repo).items()
                     if b != "research" and not b.startswith("fanout/")},
        "stash": git(repo, "stash", "list"),
    }


def test_the_users_checkout_is_never_touched(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, k=2)
    head = git(repo, "rev-parse", "HEAD")
    git(repo, "branch", "experiment")
    # A dirty checkout: an uncommitted change to train.py (which would change the baseline if a job
    # ran it), a staged change, an untracked file.
    train = (repo / "train.py").read_text()
    (repo / "train.py").write_text(train.replace("LR = 0.1\n", "LR = 0.9\n") + "# my uncommitted work\n")
    (repo / "program.md").write_text("staged idea\n")
    git(repo, "add", "program.md")
    (repo / "notes.txt").write_text("untracked\n")

    snapshots: list[dict[str, Any]] = []
    lock = threading.Lock()

    def observer(number: int, views: Any) -> None:
        with lock:  # the first time the study shows anything, the user edits another tracked file
            if not snapshots:
                (repo / "README.md").write_text("edited while the study ran\n")
                snapshots.append(checkout_snapshot(repo))

    proposer = ScriptedProposer({1: [set_lr(0.1, 0.3), set_lr(0.1, 0.2)]})
    outcome = Study(repo, proposer=proposer, observer=observer).run(rounds=1).rounds[0]
    assert snapshots, "the observer was never called"
    assert outcome.winner is not None and tip(repo, "research") == outcome.winner.commit  # it did work
    baseline = next(r for r in candidate_records(repo) if r["status"] == "baseline")
    assert baseline["val_bpb"] == BASELINE and baseline["commit"] == head  # the commit, not my edit
    after = checkout_snapshot(repo)
    assert after == snapshots[0]
    assert after["branch"] == "refs/heads/main" and after["head"] == head
    assert after["branches"] == {"main": head, "experiment": head}
    assert " M README.md" in after["status"].splitlines() and " M train.py" in after["status"].splitlines()
    assert "M  program.md" in after["status"].splitlines()
    assert "?? notes.txt" in after["status"].splitlines()
    assert (repo / "README.md").read_text() == "edited while the study ran\n"


def test_refuses_to_run_when_the_research_branch_is_checked_out(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, k=2)
    git(repo, "checkout", "-q", "-b", "research")
    before = checkout_snapshot(repo)
    done = fanout(repo, "run", "--rounds", "1")
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fanout: error: the research branch 'research' is "
                                                   "checked out in "), done.stderr
    assert "Traceback" not in done.stderr
    assert checkout_snapshot(repo) == before
    assert submitted_names(repo) == [] and not (study_root(repo) / "runs.jsonl").exists()

    # The same from a linked worktree, in-process.
    git(repo, "checkout", "-q", "main")
    git(repo, "worktree", "add", "-q", str(tmp_path / "elsewhere"), "research")
    with pytest.raises(ConfigError, match="elsewhere"):
        Study(repo, proposer=ScriptedProposer({1: [set_lr(0.1, 0.3)]})).run(rounds=1)
    assert submitted_names(repo) == []


# ----------------------------------------------------------------------------- 7. budget
def test_the_study_stops_before_a_round_that_could_exceed_the_budget(tmp_path: Path) -> None:
    # Each job may take up to 3 s: round 1 (baseline + 2) could take 9 GPU-seconds, under the cap
    # of 9.5. It really takes >= 3 x 2 s, so round 2 could bring the total to >= 6 + 2 x 3 = 12.
    repo = make_repo(tmp_path / "a", k=2, sleep=2.0, time_limit_s=3, budget=9.5 / 3600)
    proposer = ScriptedProposer({1: [set_lr(0.1, 0.3), set_lr(0.1, 0.2)], 2: [set_width(4, 2)]})
    outcome = Study(repo, proposer=proposer).run(rounds=3)
    assert [r.number for r in outcome.rounds] == [1]
    assert outcome.stopped.startswith("budget: ") and "round 2" in outcome.stopped, outcome.stopped
    assert sorted(submitted_names(repo)) == ["t-r00-c0", "t-r01-c1", "t-r01-c2"]
    assert [e["round"] for e in by_event(repo, "round_started")] == [1]
    spent = sum(r["gpu_hours"] for r in candidate_records(repo))
    assert 6 / 3600 <= spent < 9 / 3600
    assert [c.round for c in proposer.contexts] == [1]

    # A cap below the first round's worst case: nothing starts at all.
    repo = make_repo(tmp_path / "b", k=2, time_limit_s=3, budget=8 / 3600)
    outcome = Study(repo, proposer=ScriptedProposer({})).run(rounds=1)
    assert outcome.rounds == [] and "round 1" in outcome.stopped
    assert submitted_names(repo) == [] and not (study_root(repo) / "runs.jsonl").exists()
    assert tip(repo, "research") is None


# ----------------------------------------------------------------------------- 8. result commands
def test_results_best_plot_and_prune_commands(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, k=3)
    head = git(repo, "rev-parse", "HEAD")
    proposer = ScriptedProposer({1: [set_lr(0.1, 0.2), set_lr(0.1, 0.3), crash(0.1, 0.25)]})
    winner = Study(repo, proposer=proposer).run(rounds=1).rounds[0].winner
    assert winner is not None and winner.name == "t-r01-c2"

    lines = ok(fanout(repo, "results")).stdout.strip().splitlines()
    assert lines[0].split() == ["round", "cand", "commit", "val_bpb", "status", "description"]
    assert [line.split()[:5] for line in lines[1:]] == [
        ["0", "0", head[:7], f"{BASELINE:.6f}", "baseline"],
        ["1", "1", tip(repo, "fanout/t/r01-c1")[:7], f"{val_bpb(0.2):.6f}", "discard"],
        ["1", "2", winner.commit[:7], f"{val_bpb(0.3):.6f}", "keep"],
        ["1", "3", tip(repo, "fanout/t/r01-c3")[:7], "-", "crash"],
    ]
    assert lines[4].endswith("crash with LR 0.25  (exit code 3)")
    as_json = json.loads(ok(fanout(repo, "results", "--json")).stdout)
    assert [(r["name"], r["status"]) for r in as_json] == [
        ("t-r00-c0", "baseline"), ("t-r01-c1", "discard"), ("t-r01-c2", "keep"), ("t-r01-c3", "crash")]

    best = ok(fanout(repo, "best")).stdout.strip()
    assert best == f"{winner.commit}  val_bpb={val_bpb(0.3):.6f}  keep  LR 0.1 -> 0.3"
    assert json.loads(ok(fanout(repo, "best", "--json")).stdout)["commit"] == winner.commit

    png = tmp_path / "out" / "progress.png"
    png.parent.mkdir()
    assert ok(fanout(repo, "plot", "--out", str(png))).stdout.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    default = Path(ok(fanout(repo, "plot")).stdout.strip())
    assert default == study_root(repo) / "progress.png" and default.read_bytes()[:4] == b"\x89PNG"

    before = branches(repo)
    pruned = ok(fanout(repo, "prune")).stdout.strip().splitlines()
    assert sorted(pruned) == ["deleted fanout/t/r01-c1", "deleted fanout/t/r01-c3"]
    after = branches(repo)
    assert after == {b: c for b, c in before.items() if b not in ("fanout/t/r01-c1", "fanout/t/r01-c3")}
    assert after["fanout/t/r01-c2"] == winner.commit == after["research"] and after["main"] == head
    assert ok(fanout(repo, "prune", "--all")).stdout.strip() == "deleted fanout/t/r01-c2"
    assert branches(repo) == {"main": head, "research": winner.commit}
    # The results survive the branches.
    assert len(json.loads(ok(fanout(repo, "results", "--json")).stdout)) == 4
