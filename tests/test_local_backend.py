"""What LocalBackend promises beyond the conformance suite: detached jobs, slots, clean kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fanout_research.backends import local as local_module
from fanout_research.backends.local import LocalBackend
from fanout_research.backends.local_files import STATE, process_start_time, read_json
from fanout_research.errors import JobSpecError
from fanout_research.models import CodeSource, JobSpec, Phase
from fanout_research.phases import Failure
from fanout_research.study import StudyDir
from fanout_research.testing.conformance import Harness
from fanout_research.testing.repo import commit_files, git

SPAWNER = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen(["sleep", "300"])                           # stays in the job's group
    escaped = subprocess.Popen(["sleep", "301"], start_new_session=True)  # leaves the group
    first = os.fork()
    if first == 0:                                                        # a classic daemon
        os.setsid()
        if os.fork() == 0:
            print(f"daemon={os.getpid()}", flush=True)
            time.sleep(302)
        os._exit(0)
    os.waitpid(first, 0)
    time.sleep(0.2)
    print(f"pids={child.pid},{escaped.pid}", flush=True)
    if os.environ.get("FINISH") == "1":
        print("---\\nval_bpb: 1.0")
        sys.exit(0)
    while True:
        time.sleep(0.1)
""")

PROBE = textwrap.dedent("""
    import os, time
    print("cuda=" + os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
    print("slot=" + os.environ["FANOUT_SLOT"])
    print("threads=" + os.environ.get("OMP_NUM_THREADS", "<unset>"), flush=True)
    time.sleep(float(os.environ.get("SLEEP", "0.6")))
    print("---\\nval_bpb: 1.0")
""")

GRACEFUL = textwrap.dedent("""
    import signal, sys, time
    def stop(*_):
        print("saving checkpoint before exit", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print("job-start", flush=True)
    while True:
        time.sleep(0.05)
""")


def _spec(repo: Path, commit: str, name: str, script: str, **fields: object) -> JobSpec:
    env = fields.pop("env", {})
    return JobSpec(name=name, code=CodeSource(repo=str(repo), commit=commit),
                   command=(sys.executable, script), env=env, **fields)  # type: ignore[arg-type]


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process_start_time(pid) is None:
            return True
        time.sleep(0.05)
    return False


def _pids(log: str) -> list[int]:
    found = []
    for line in log.splitlines():
        if line.startswith("pids="):
            found += [int(p) for p in line.removeprefix("pids=").split(",")]
        if line.startswith("daemon="):
            found.append(int(line.removeprefix("daemon=")))
    return found


@pytest.fixture
def harness(research_repo, local_backend: LocalBackend) -> Harness:
    repo, commit = research_repo
    return Harness(backend=local_backend, repo=repo, commit=commit, python=sys.executable)


@pytest.mark.parametrize("finish", ["timeout", "success"])
def test_nothing_the_job_started_outlives_it(harness: Harness, finish: str) -> None:
    commit = commit_files(harness.repo, {"spawner.py": SPAWNER}, "spawner")
    spec = _spec(harness.repo, commit, f"spawner-{finish}", "spawner.py", time_limit_s=3.0,
                 env={"FINISH": "1" if finish == "success" else "0"})
    slug = harness.backend.submit(spec)
    result = harness.wait([slug])[slug]
    assert result.phase is (Phase.TIMED_OUT if finish == "timeout" else Phase.SUCCEEDED)
    pids = _pids(harness.backend.logs(slug))
    assert len(pids) == 3, harness.backend.logs(slug)
    for pid in pids:
        assert _gone(pid), f"process {pid} outlived its job"


def test_time_limit_sends_sigterm_first_so_the_job_can_save_state(harness: Harness) -> None:
    commit = commit_files(harness.repo, {"graceful.py": GRACEFUL}, "graceful")
    slug = harness.backend.submit(_spec(harness.repo, commit, "graceful", "graceful.py", time_limit_s=1.0))
    result = harness.wait([slug])[slug]
    assert result.phase is Phase.TIMED_OUT
    assert "saving checkpoint before exit" in harness.backend.logs(slug)
    assert "exceeded its time limit of 1s" in result.reason


def test_job_survives_the_process_that_submitted_it(harness: Harness, study: StudyDir) -> None:
    spec = harness.spec("ok", sleep=1.5)
    submitter = textwrap.dedent(f"""
        import sys
        from fanout_research.backends.local import LocalBackend
        from fanout_research.models import JobSpec
        from fanout_research.study import StudyDir
        study = StudyDir(name={study.name!r}, root=__import__("pathlib").Path({str(study.root)!r}))
        backend = LocalBackend(study, slots=2, gpus=[])
        print(backend.submit(JobSpec.model_validate_json({spec.model_dump_json()!r})))
    """)
    done = subprocess.run([sys.executable, "-c", submitter], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    slug = done.stdout.strip()
    assert not harness.backend.status([slug])[slug].phase.final  # the submitter is gone; the job is not
    result = harness.wait([slug])[slug]
    assert result.phase is Phase.SUCCEEDED


def test_slots_bound_concurrency_and_pin_one_gpu_each(research_repo, study: StudyDir) -> None:
    repo, _ = research_repo
    commit = commit_files(repo, {"probe.py": PROBE}, "probe")
    backend = LocalBackend(study, slots=2, gpus=["0", "1"], kill_grace_s=1.0)
    harness = Harness(backend=backend, repo=repo, commit=commit, python=sys.executable)
    slugs = [backend.submit(_spec(repo, commit, f"probe-{i}", "probe.py")) for i in range(4)]
    results = harness.wait(slugs)
    spans = [(r.started_at, r.ended_at) for r in results.values()]
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most == 2, "two slots must run two jobs at once, never more"
    for slug in slugs:
        log = backend.logs(slug)
        slot = int(log.split("slot=")[1].split()[0])
        assert f"cuda={['0', '1'][slot]}" in log  # slot i sees only GPU i
        assert "threads=<unset>" in log  # GPU jobs keep their own threading


def test_cpu_slots_split_the_cores(research_repo, study: StudyDir) -> None:
    repo, _ = research_repo
    commit = commit_files(repo, {"probe.py": PROBE}, "probe")
    backend = LocalBackend(study, gpus=[])
    assert backend.slots == max(1, (os.cpu_count() or 2) // 2)
    slug = backend.submit(_spec(repo, commit, "cpu-probe", "probe.py", env={"SLEEP": "0"}))
    Harness(backend=backend, repo=repo, commit=commit).wait([slug])
    log = backend.logs(slug)
    assert "cuda=<unset>" in log
    assert f"threads={max(1, (os.cpu_count() or 1) // backend.slots)}" in log


def test_default_slots_follow_visible_gpus(study: StudyDir, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5,7")
    local_module.visible_gpus.cache_clear()
    try:
        backend = LocalBackend(study)
        assert backend.slots == 3 and backend.gpus == ("2", "5", "7")
    finally:
        local_module.visible_gpus.cache_clear()


def test_queued_jobs_start_in_submission_order(research_repo, study: StudyDir) -> None:
    repo, commit = research_repo
    backend = LocalBackend(study, slots=1, gpus=[])
    harness = Harness(backend=backend, repo=repo, commit=commit, python=sys.executable)
    slugs = [backend.submit(harness.spec("ok", sleep=0.2)) for _ in range(4)]
    results = harness.wait(slugs)
    starts = [results[s].started_at for s in slugs]
    assert starts == sorted(starts)


def test_cancel_while_queued_never_runs_the_job(research_repo, study: StudyDir) -> None:
    repo, commit = research_repo
    backend = LocalBackend(study, slots=1, gpus=[], kill_grace_s=1.0)
    harness = Harness(backend=backend, repo=repo, commit=commit, python=sys.executable)
    running = backend.submit(harness.spec("hang"))
    harness.wait_for_phase(running, Phase.RUNNING)
    queued = backend.submit(harness.spec("ok"))
    time.sleep(0.3)
    assert backend.status([queued])[queued].phase is Phase.PENDING
    backend.cancel(queued)
    result = backend.result(queued)
    assert result.phase is Phase.CANCELLED and result.started_at is None
    assert "job-start" not in backend.logs(queued)
    backend.cancel(running)
    assert harness.wait([running])[running].phase is Phase.CANCELLED


def test_killed_supervisor_makes_the_job_lost_and_kills_it(harness: Harness) -> None:
    slug = harness.backend.submit(harness.spec("hang"))
    harness.wait_for_phase(slug, Phase.RUNNING)
    state = read_json(harness.backend.jobs_dir / slug / STATE)
    job_pid = state["job"]["pid"]
    os.kill(state["supervisor"]["pid"], signal.SIGKILL)
    result = harness.wait([slug], timeout=10)[slug]
    assert result.phase is Phase.LOST and result.failure is Failure.LOST
    assert _gone(job_pid)


def test_racing_submitters_of_one_spec_start_one_job(harness: Harness) -> None:
    spec = harness.spec("ok", sleep=0.3)
    barrier = threading.Barrier(4)
    slugs: list[str] = []

    def submit() -> None:
        barrier.wait()
        slugs.append(harness.backend.submit(spec))

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert slugs == [spec.name] * 4
    harness.wait(slugs[:1])
    assert harness.backend.logs(spec.name).count("job-start") == 1


def test_the_users_checkout_is_never_touched(harness: Harness) -> None:
    repo = harness.repo
    (repo / "results.tsv").write_text("commit\tval_bpb\n")  # untracked, as autoresearch keeps it
    git(repo, "checkout", "-q", "-b", "experiments")
    before = [git(repo, *args) for args in (
        ["rev-parse", "HEAD"], ["branch", "--show-current"], ["status", "--porcelain"],
        ["for-each-ref", "refs/heads"],
    )]
    slugs = [harness.backend.submit(harness.spec(mode)) for mode in ("ok", "crash", "marker")]
    harness.wait(slugs)
    after = [git(repo, *args) for args in (
        ["rev-parse", "HEAD"], ["branch", "--show-current"], ["status", "--porcelain"],
        ["for-each-ref", "refs/heads"],
    )]
    assert after == before
    assert (repo / "results.tsv").read_text() == "commit\tval_bpb\n"
    assert git(repo, "worktree", "list").count("\n") == 0, "job worktrees must be removed"
    refs = git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/fanout")
    assert all(f"refs/fanout/test/{slug} {harness.commit}" in refs for slug in slugs)


def test_checkout_failure_is_a_setup_failure(harness: Harness) -> None:
    blocker = harness.backend.worktrees_dir
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the worktrees directory should be")
    slug = harness.backend.submit(harness.spec("ok"))
    result = harness.wait([slug])[slug]
    assert result.phase is Phase.FAILED and result.failure is Failure.SETUP
    assert result.reason.startswith("checkout failed")
    assert result.started_at is None


def test_a_round_submitted_at_once_gets_one_supervisor_per_job(research_repo, study: StudyDir) -> None:
    """Sixteen jobs checked out concurrently: regression test for a `git worktree prune` race."""
    repo, commit = research_repo
    backend = LocalBackend(study, slots=16, gpus=[], kill_grace_s=1.0)
    harness = Harness(backend=backend, repo=repo, commit=commit, python=sys.executable)
    specs = [harness.spec("ok") for _ in range(16)]
    slugs = backend.submit_many(specs)
    assert slugs == [s.name for s in specs]
    results = harness.wait(slugs)
    assert {r.phase for r in results.values()} == {Phase.SUCCEEDED}, {
        s: r.reason for s, r in results.items() if not r.succeeded}
    supervisors = {read_json(backend.jobs_dir / s / STATE)["supervisor"]["pid"] for s in slugs}
    assert len(supervisors) == 16
    assert git(repo, "worktree", "list").count("\n") == 0


def test_a_bad_spec_in_a_round_submits_none_of_it(research_repo, study: StudyDir) -> None:
    repo, commit = research_repo
    backend = LocalBackend(study, slots=2, gpus=[])
    harness = Harness(backend=backend, repo=repo, commit=commit, python=sys.executable)
    good = harness.spec("ok")
    bad = harness.spec("ok", command=("fanout-no-such-program-xyz",))
    with pytest.raises(JobSpecError, match="fanout-no-such-program-xyz"):
        backend.submit_many([good, bad])
    assert not backend.jobs_dir.exists() or not any(backend.jobs_dir.iterdir())


def test_registered_worktrees_are_real_git_worktrees(research_repo, study: StudyDir) -> None:
    """Worktrees are registered by writing git's documented admin files, not by `git worktree
    add`: git itself must agree that they are worktrees at the job's commit."""
    repo, commit = research_repo
    backend = LocalBackend(study, slots=2, gpus=[], keep_worktrees=True)
    harness = Harness(backend=backend, repo=repo, commit=commit, python=sys.executable)
    slugs = backend.submit_many([harness.spec("ok"), harness.spec("ok")])
    harness.wait(slugs)
    listing = git(repo, "worktree", "list", "--porcelain")
    for slug in slugs:
        worktree = backend.worktrees_dir / slug
        assert f"worktree {worktree}\nHEAD {commit}\ndetached" in listing
        assert git(worktree, "status", "--porcelain") == ""
        assert git(worktree, "rev-parse", "HEAD") == commit
    git(repo, "worktree", "prune")  # git's own clean-up keeps worktrees that exist
    assert all(f"worktree {backend.worktrees_dir / s}" in git(repo, "worktree", "list", "--porcelain")
               for s in slugs)
