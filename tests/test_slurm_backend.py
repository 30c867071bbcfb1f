"""The slurm backend against a real single-node Slurm cluster (munged + slurmctld + slurmd).

The cluster is started once per session by ``backends/slurm/dev-cluster.sh`` in a temporary
directory on free ports, and stopped at the end. Without Slurm installed (or without root) every
test here skips with the reason, unless FANOUT_REQUIRE_SLURM=1 makes that a failure (CI sets it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fanout_research.backends.slurm import SlurmBackend
from fanout_research.errors import BackendError, FanoutError, JobSpecError, UnknownJobError
from fanout_research.models import Phase
from fanout_research.study import StudyDir
from fanout_research.testing.conformance import BackendConformance, Harness
from fanout_research.testing.repo import commit_files, make_research_repo
from slurm_cluster import DevCluster, missing_reason, start

FANOUT = str(Path(sys.executable).parent / "fanout")
TERMINAL_FORCING = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "FANOUT_STUDY_DIR")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    reason = missing_reason()
    if reason is not None:
        if os.environ.get("FANOUT_REQUIRE_SLURM") == "1":
            pytest.fail(f"FANOUT_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    started = start(tmp_path_factory.mktemp("slurm"))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def study(research_repo: tuple[Path, str]) -> StudyDir:
    return StudyDir.for_repo(research_repo[0], "slurmtest")


def make_backend(study: StudyDir, cluster: DevCluster, **options: object) -> SlurmBackend:
    # The dev cluster has no GPU GRES: gpus = false, as on any CPU-only cluster.
    settings: dict[str, object] = {"gpus": False, "slurm_conf": str(cluster.conf), "kill_grace_s": 1.0}
    settings.update(options)
    return SlurmBackend(study, **settings)


@pytest.fixture
def backend(study: StudyDir, cluster: DevCluster) -> SlurmBackend:
    return make_backend(study, cluster)


@pytest.fixture
def harness(research_repo: tuple[Path, str], backend: SlurmBackend) -> Harness:
    repo, commit = research_repo
    return Harness(backend=backend, repo=repo, commit=commit, python=sys.executable, poll_s=0.1)


class TestSlurmConformance(BackendConformance):
    """The unchanged backend contract, through sbatch/squeue/scancel on the real cluster."""


# -- the fanout CLI on the cluster ---------------------------------------------------------------
def cli_repo(path: Path, cluster: DevCluster, **slurm: object) -> Path:
    from fanout_research.registry import available_backends

    assert "slurm" in available_backends(), "add slurm to registry.BUILTIN_BACKENDS"
    options = {"gpus": False, "slurm_conf": str(cluster.conf), "kill_grace_s": 1.0, **slurm}
    lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in options.items())
    config = (f'[job]\ncommand = "{sys.executable} job.py"\ntime_limit_s = 60\n'
              f'[job.env]\nFANOUT_TEST_MODE = "ok"\n'
              f'[backend]\nname = "slurm"\n[backend.slurm]\n{lines}\n')
    repo, _ = make_research_repo(path)
    commit_files(repo, {"fanout.toml": config}, "fanout settings")
    return repo


def fanout(cwd: Path, *args: str, env: dict[str, str] | None = None,
           timeout: float = 90) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in TERMINAL_FORCING}
    full_env.update(env or {})
    return subprocess.run([FANOUT, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fanout: error: "), done.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def slurm_job_id(repo: Path, slug: str) -> str:
    """The Slurm job id behind a slug submitted from the CLI (via the backend's own record)."""
    study = StudyDir.for_repo(repo, "default")
    record = json.loads((study.root / "slurm" / "jobs" / slug / "job.json").read_text())
    return str(record["job_id"])


def test_fanout_submit_and_wait_run_a_job_on_the_cluster(tmp_path: Path, cluster: DevCluster) -> None:
    repo = cli_repo(tmp_path / "repo", cluster)
    done = fanout(repo, "submit", "--backend", "slurm", "--name", "cli-job")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cli-job"
    assert "on backend slurm" in done.stderr
    waited = fanout(repo, "wait", "cli-job", "--json")
    assert waited.returncode == 0, waited.stderr
    (record,) = json.loads(waited.stdout)
    assert record["phase"] == "succeeded"
    assert record["metrics"]["val_bpb"] == pytest.approx(1.234567)
    assert cluster.state_of(slurm_job_id(repo, "cli-job")) == "COMPLETED"
    logs = fanout(repo, "logs", "cli-job")
    assert logs.stdout.startswith("job-start")


def test_a_job_stuck_pending_is_cancelled_when_wait_times_out(tmp_path: Path, cluster: DevCluster) -> None:
    # --begin keeps it PENDING (reason BeginTime) for an hour: it can never start in this test.
    repo = cli_repo(tmp_path / "repo", cluster, sbatch_args=["--begin=now+1hour"])
    slug = fanout(repo, "submit", "--name", "stuck-job").stdout.strip()
    assert slug == "stuck-job"
    job_id = slurm_job_id(repo, slug)
    assert cluster.state_of(job_id) == "PENDING"
    started = time.monotonic()
    waited = fanout(repo, "wait", slug, "--timeout", "2", "--cancel-on-timeout")
    assert waited.returncode == 124, waited.stderr
    assert "cancelled" in waited.stderr
    assert time.monotonic() - started < 30
    assert cluster.state_of(job_id) == "CANCELLED"
    assert job_id not in cluster.live_job_ids()
    status = fanout(repo, "status", slug, "--json")
    assert json.loads(status.stdout)[0]["phase"] == "cancelled"


def test_missing_sbatch_is_one_line(tmp_path: Path, cluster: DevCluster) -> None:
    repo = cli_repo(tmp_path / "repo", cluster)
    bin_dir = tmp_path / "bin"  # git only: the research repo works, Slurm is "not installed"
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(subprocess.run(["which", "git"], capture_output=True, text=True)
                                 .stdout.strip())
    done = fanout(repo, "submit", "--name", "no-sbatch", env={"PATH": str(bin_dir)})
    assert_one_line_error(done, "slurm backend: sbatch not found; install slurm-wlm or use another backend")
    assert not (StudyDir.for_repo(repo, "default").root / "slurm" / "jobs" / "no-sbatch").exists()


# -- bad input through the backend ---------------------------------------------------------------
def test_a_controller_that_is_down_is_one_line(tmp_path: Path, harness: Harness, cluster: DevCluster,
                                               study: StudyDir) -> None:
    dead = make_backend(study, cluster, slurm_conf=str(cluster.dead_conf(tmp_path / "dead.conf")))
    with pytest.raises(BackendError) as refused:
        dead.submit(harness.spec("ok"))
    message = str(refused.value)
    assert message.startswith("cannot reach slurmctld: ") and "\n" not in message
    assert not list((dead.jobs_dir).iterdir())  # nothing left behind
    # A job the live cluster runs, looked at through the dead controller: the same one-line error.
    slug = harness.backend.submit(harness.spec("ok"))
    with pytest.raises(BackendError, match=r"^cannot reach slurmctld: [^\n]*$"):
        dead.status([slug])
    assert harness.wait([slug])[slug].phase is Phase.SUCCEEDED


def test_an_unknown_partition_is_refused_with_sbatchs_words(harness: Harness, cluster: DevCluster,
                                                            study: StudyDir) -> None:
    wrong = make_backend(study, cluster, partition="no-such-partition")
    spec = harness.spec("ok")
    with pytest.raises(JobSpecError) as refused:
        wrong.submit(spec)
    assert "Invalid partition name specified" in str(refused.value)
    assert "\n" not in str(refused.value)
    with pytest.raises(UnknownJobError):
        wrong.status([spec.name])
    assert not (wrong.worktrees_dir / spec.name).exists()
    assert harness.backend.submit(spec) == spec.name  # the name is still free for a good submit
    harness.wait([spec.name])


def test_sacct_without_accounting_storage_is_one_line(harness: Harness, cluster: DevCluster,
                                                      study: StudyDir) -> None:
    slug = harness.backend.submit(harness.spec("ok"))
    forced = make_backend(study, cluster, accounting="sacct")
    with pytest.raises(FanoutError, match=r"^sacct failed: Slurm accounting storage is disabled$"):
        forced.status([slug])
    harness.wait([slug])


def test_bad_options_are_refused_before_anything_runs(study: StudyDir) -> None:
    from fanout_research.errors import ConfigError
    from fanout_research.registry import create_backend

    with pytest.raises(ConfigError, match="accounting"):
        create_backend("slurm", study, {"accounting": "slurmdbd"})
    with pytest.raises(ConfigError, match="no_such_option"):
        create_backend("slurm", study, {"no_such_option": 1})


# -- what only this backend promises -------------------------------------------------------------
def test_status_is_one_slurm_command_per_poll_whatever_the_number_of_jobs(
    tmp_path: Path, harness: Harness, cluster: DevCluster, study: StudyDir,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = tmp_path / "calls.txt"
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    for program in ("squeue", "sacct"):  # real wrappers that exec the real commands
        real = subprocess.run(["which", program], capture_output=True, text=True).stdout.strip()
        wrapper = wrappers / program
        wrapper.write_text(f'#!/bin/sh\necho {program} >>"{calls}"\nexec "{real}" "$@"\n')
        wrapper.chmod(0o755)
    slugs = [harness.backend.submit(harness.spec("ok", sleep=1.5)) for _ in range(5)]
    monkeypatch.setenv("PATH", f"{wrappers}{os.pathsep}{os.environ['PATH']}")
    watcher = make_backend(study, cluster)  # a fresh process's view: accounting not yet probed
    watcher.status(slugs)  # the first poll may probe sacct before settling on squeue
    calls.write_text("")
    live_polls = 0
    deadline = time.monotonic() + 60
    while True:
        before = len(calls.read_text().splitlines())
        states = watcher.status(slugs)
        spent = len(calls.read_text().splitlines()) - before
        assert spent <= 1, f"one poll of {len(slugs)} jobs ran {spent} Slurm commands"
        live_polls += spent
        if all(state.phase.final for state in states.values()):
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.2)
    assert live_polls >= 2
    assert len(calls.read_text().splitlines()) == live_polls  # polls, not polls x jobs
    assert calls.read_text().split() == ["squeue"] * live_polls  # the dev cluster keeps no accounting
    before = len(calls.read_text().splitlines())
    assert all(watcher.result(s).phase is Phase.SUCCEEDED for s in slugs)
    assert len(calls.read_text().splitlines()) == before, "final results are read from disk"


def test_jobs_run_in_their_own_worktree_with_a_clean_environment(
    harness: Harness, backend: SlurmBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak-this")
    spec = harness.spec("ok", env={"FANOUT_TEST_EXTRA": "x"})
    slug = backend.submit(spec)
    worktree = backend.worktrees_dir / slug
    assert (worktree / "job.py").exists(), "the checkout is ready before the job starts"
    script = (backend.jobs_dir / slug / "job.sbatch").read_text()
    assert "do-not-leak-this" not in script
    assert f"timeout --signal=TERM --kill-after=1s {spec.time_limit_s:g}s" in script
    result = harness.wait([slug])[slug]
    assert result.phase is Phase.SUCCEEDED
    assert not worktree.exists(), "the worktree goes once the job is final"
    assert result.queue_seconds is not None and result.queue_seconds >= 0


def test_time_limit_is_exact_not_rounded_to_slurms_minutes(harness: Harness, backend: SlurmBackend) -> None:
    slug = backend.submit(harness.spec("hang", time_limit=2.0))
    result = harness.wait([slug], timeout=45)[slug]
    assert result.phase is Phase.TIMED_OUT
    assert result.run_seconds is not None and 1.9 <= result.run_seconds < 6.0, result.run_seconds
    assert "stopped at its time limit of 2s" in result.log_tail


def test_reap_cancels_every_job_of_the_study_and_only_those(
    tmp_path: Path, harness: Harness, cluster: DevCluster, study: StudyDir,
) -> None:
    later = make_backend(study, cluster, sbatch_args=["--begin=now+1hour"])
    mine = [later.submit(harness.spec("ok")) for _ in range(2)]
    other_repo, other_commit = make_research_repo(tmp_path / "other")
    other = make_backend(StudyDir.for_repo(other_repo, "slurmtest"), cluster,
                         sbatch_args=["--begin=now+1hour"])
    bystander = other.submit(Harness(backend=other, repo=other_repo, commit=other_commit,
                                     python=sys.executable).spec("ok"))
    reaped = later.reap()
    assert sorted(reaped) == sorted(later.job_id(s) for s in mine)
    states = later.status(mine)
    assert {state.phase for state in states.values()} == {Phase.CANCELLED}
    assert not set(reaped) & cluster.live_job_ids()
    assert other.status([bystander])[bystander].phase is Phase.PENDING  # same study name, other repo
    other.cancel(bystander)
    assert other.status([bystander])[bystander].phase is Phase.CANCELLED


def test_gpus_on_a_cluster_without_gres_say_what_to_change(harness: Harness, cluster: DevCluster,
                                                         study: StudyDir) -> None:
    asking = make_backend(study, cluster, gpus=True)
    with pytest.raises(JobSpecError) as refused:
        asking.submit(harness.spec("ok"))  # the spec asks for one GPU, the dev node has none
    assert "gpus = false" in str(refused.value) and "\n" not in str(refused.value)


def test_a_submitter_that_died_after_sbatch_answered_does_not_run_the_job_twice(
    harness: Harness, backend: SlurmBackend, cluster: DevCluster,
) -> None:
    spec = harness.spec("ok", sleep=1.0)
    slug = backend.submit(spec)
    job_id = backend.job_id(slug)
    # What such a death leaves: the job's directory and Slurm's job, but no record of the job id.
    (backend.jobs_dir / slug / "job.json").unlink()
    assert backend.submit(spec) == slug
    assert backend.job_id(slug) == job_id
    named = cluster.run("squeue", "--noheader", "--states=all", f"--name={slug}", "--format=%i|%k")
    ours = [line.split("|")[0] for line in named.stdout.splitlines() if line.endswith(f"|{backend.label}")]
    assert ours == [job_id], named.stdout  # (other tests' studies reuse job names)
    assert harness.wait([slug])[slug].phase is Phase.SUCCEEDED
    assert backend.logs(slug).count("job-start") == 1


def test_the_sacct_parser_reads_what_sacct_prints(harness: Harness, backend: SlurmBackend,
                                                  cluster: DevCluster) -> None:
    # No slurmdbd here, but `sacct --completion` prints the same --parsable2 columns from the
    # dev cluster's jobcomp log: real sacct output for the parser used in accounting mode.
    slug = backend.submit(harness.spec("crash"))
    result = harness.wait([slug])[slug]
    job_id = backend.job_id(slug)
    done = cluster.run("sacct", "--completion", "--noheader", "--parsable2", f"--jobs={job_id}",
                       "--format=JobID,State,ExitCode,Start,End")
    assert done.returncode == 0, done.stderr
    record = SlurmBackend._parse_sacct(done.stdout)[job_id]
    assert (record.state, record.exit_code) == ("FAILED", 3)
    assert record.start is not None and record.end is not None and record.end >= record.start
    # Slurm's Start is the allocation (whole seconds); the script starts after --export=NONE has
    # loaded the user's login environment, typically a second or two later.
    assert result.started_at is not None
    assert 0 <= (result.started_at - record.start).total_seconds() < 15
