"""The vessl backend, driven through a STAND-IN ``vesslctl`` (VESSL's cloud cannot run here).

``fanout_research.testing.fake_vesslctl`` is installed as an executable named ``vesslctl`` in a
temporary bin directory at the front of PATH; the backend runs it exactly as it would run VESSL's
binary. The stand-in really runs each job's command (clone of the pushed branch from a real bare
git remote, then the conformance job) as a detached local process, and imitates what the backend
must cope with: delayed listing, a slug printed only sometimes, the 1000-line log cap, transient
failures (``FAKE_VESSL_FLAKY``), refusals of unknown resource specs, a missing login.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fanout_research.backends.vessl import VesslBackend
from fanout_research.errors import FanoutError, JobSpecError
from fanout_research.models import CodeSource, JobSpec, Phase
from fanout_research.phases import Failure
from fanout_research.study import StudyDir
from fanout_research.testing import fake_vesslctl
from fanout_research.testing.conformance import BackendConformance, Harness
from fanout_research.testing.repo import commit_files, git, make_research_repo

FANOUT = str(Path(sys.executable).parent / "fanout")
VOLUME = "fanout-data"
ORG = "fanout-tests"
SECRET_KEY = "FANOUT_VESSL_TEST_SECRET_TOKEN"
SECRET_VALUE = "sk-vessl-do-not-leak-4f2a"
TERMINAL_FORCING = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "FANOUT_STUDY_DIR")


class Cloud:
    """The stand-in's world: its bin dir, its home (login, volumes, jobs), the git remote."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.home = root / "vessl-home"
        self.mount = root / "mnt" / "data"  # where jobs see the volume (a symlink, made per job)
        self.remote = root / "remote.git"
        self.bin.mkdir(parents=True)
        source = Path(fake_vesslctl.__file__).read_text().split("\n", 1)[1]
        vesslctl = self.bin / "vesslctl"
        vesslctl.write_text(f"#!{sys.executable}\n{source}")
        vesslctl.chmod(vesslctl.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        (self.home / "volumes" / VOLUME).mkdir(parents=True)
        (self.home / "volumes" / VOLUME / "hello.txt").write_text("hello from the volume\n")
        self.login()
        subprocess.run(["git", "init", "-q", "--bare", str(self.remote)], check=True)

    def login(self) -> None:
        (self.home / "login.json").write_text(json.dumps({"user": "tester@fanout.invalid",
                                                          "organization": ORG}))

    def logout(self) -> None:
        (self.home / "login.json").unlink()

    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}", "FAKE_VESSL_HOME": str(self.home)}

    def vesslctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env()}
        env.pop("FAKE_VESSL_FLAKY", None)  # the test's own look-ups must not flake
        return subprocess.run([str(self.bin / "vesslctl"), *args], env=env, capture_output=True,
                              text=True, timeout=30)

    def show(self, slug: str) -> dict[str, object]:
        done = self.vesslctl("job", "show", slug, "-o", "json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def job_files(self) -> list[Path]:
        return sorted((self.home / "jobs").glob("*/job.json"))

    def terminate_everything(self) -> None:
        """Teardown: no runner of a failed test outlives it."""
        for path in self.job_files():
            (path.parent / "terminate").touch()

    def options(self, **overrides: object) -> dict[str, object]:
        return {"resource_spec": "cpu-small", "image": "fanout-trainer:test", "volume": VOLUME,
                "mount_path": str(self.mount), "org": ORG, **overrides}


@pytest.fixture
def cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cloud]:
    world = Cloud(tmp_path / "cloud")
    for key, value in world.env().items():
        monkeypatch.setenv(key, value)
    for key in ("FAKE_VESSL_FLAKY", "FAKE_VESSL_STAY_PENDING", "VESSLCTL_ORG", "VESSLCTL_TEAM"):
        monkeypatch.delenv(key, raising=False)
    yield world
    world.terminate_everything()


@pytest.fixture
def remote_repo(research_repo: tuple[Path, str], cloud: Cloud) -> tuple[Path, str]:
    repo, commit = research_repo
    git(repo, "remote", "add", "origin", str(cloud.remote))
    return repo, commit


@pytest.fixture
def vessl(study: StudyDir, remote_repo: tuple[Path, str], cloud: Cloud) -> VesslBackend:
    return VesslBackend(study, **cloud.options())


def wait_final(backend: VesslBackend, slug: str, timeout: float = 60) -> Phase:
    deadline = time.monotonic() + timeout
    while not (phase := backend.status([slug])[slug].phase).final:
        assert time.monotonic() < deadline, f"{slug} never finished"
        time.sleep(0.1)
    return phase


# -- the contract --------------------------------------------------------------------------------
class TestVesslConformance(BackendConformance):
    @pytest.fixture
    def harness(self, remote_repo: tuple[Path, str], vessl: VesslBackend) -> Harness:
        repo, commit = remote_repo
        return Harness(backend=vessl, repo=repo, commit=commit, python=sys.executable)


class TestVesslConformanceFlaky(BackendConformance):
    """The same suite while every 4th vesslctl call fails with 'connection reset' (some creates
    after creating the job): retried, and never a job created twice."""

    @pytest.fixture
    def harness(self, remote_repo: tuple[Path, str], study: StudyDir, cloud: Cloud,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
        monkeypatch.setenv("FAKE_VESSL_FLAKY", "4")
        repo, commit = remote_repo
        # The stand-in lists a job 0.5 s after creating it: 2 s is ample to tell a lost answer.
        backend = VesslBackend(study, **cloud.options(create_recheck_s=2.0))
        yield Harness(backend=backend, repo=repo, commit=commit, python=sys.executable, time_scale=1.5)
        names = [json.loads(path.read_text())["name"] for path in cloud.job_files()]
        assert len(names) == len(set(names)), f"a job was created twice: {sorted(names)}"
        if len(names) > 1:
            assert (cloud.home / "flakes").exists(), "the stand-in never flaked"


# -- what only this backend promises -------------------------------------------------------------
def test_job_reads_the_mounted_volume_and_runs_the_pushed_commit(
    vessl: VesslBackend, remote_repo: tuple[Path, str], cloud: Cloud
) -> None:
    repo, commit = remote_repo
    script = ("import os; d = os.environ['FANOUT_DATA_DIR']; "
              "print('data', d, open(os.path.join(d, 'hello.txt')).read().strip()); "
              "print('---'); print('val_bpb: 0.5')")
    spec = JobSpec(name="volume-check", code=CodeSource(repo=str(repo), commit=commit),
                   command=(sys.executable, "-c", script))
    slug = vessl.submit(spec)
    assert wait_final(vessl, slug) is Phase.SUCCEEDED, vessl.logs(slug)
    assert f"data {cloud.mount} hello from the volume" in vessl.logs(slug)
    branch = "refs/heads/fanout/jobs/test/volume-check"
    assert git(cloud.remote, "rev-parse", branch) == commit
    shown = cloud.show(slug)
    assert shown["name"] == "volume-check" and "fanout-test" in shown["tags"]  # type: ignore[operator]


def test_a_1500_line_log_still_yields_its_metrics(
    vessl: VesslBackend, remote_repo: tuple[Path, str]
) -> None:
    repo, commit = remote_repo
    script = ("[print(f'step {i} loss 3.0') for i in range(1500)]; "
              "print('---'); print('val_bpb:          0.987654'); print('num_steps:        1500')")
    spec = JobSpec(name="long-log", code=CodeSource(repo=str(repo), commit=commit),
                   command=(sys.executable, "-c", script))
    slug = vessl.submit(spec)
    assert wait_final(vessl, slug) is Phase.SUCCEEDED
    result = vessl.result(slug)
    assert result.metrics.val_bpb == pytest.approx(0.987654) and result.metrics.num_steps == 1500
    lines = vessl.logs(slug).splitlines()
    assert len(lines) <= 1000, "the API serves the last 1000 lines at most"
    assert lines[-1].startswith("num_steps:") and "step 0 loss" not in lines


def test_a_job_nobody_polls_still_stops_at_its_time_limit(
    study: StudyDir, remote_repo: tuple[Path, str], cloud: Cloud
) -> None:
    repo, commit = remote_repo
    backend = VesslBackend(study, **cloud.options(self_stop_margin_s=0.5))
    spec = JobSpec(name="unwatched", code=CodeSource(repo=str(repo), commit=commit),
                   command=(sys.executable, "job.py"), env={"FANOUT_TEST_MODE": "hang"}, time_limit_s=1)
    slug = backend.submit(spec)
    deadline = time.monotonic() + 20
    while cloud.show(slug)["workloadState"] != "failed":  # no status() poll: no one terminates it
        assert time.monotonic() < deadline, "the job never stopped itself"
        time.sleep(0.2)
    result = backend.result(slug)
    assert result.phase is Phase.TIMED_OUT and result.failure is Failure.TIMED_OUT, result
    assert "job-start" in result.log_tail


def test_code_the_job_cannot_fetch_is_a_setup_failure(
    study: StudyDir, remote_repo: tuple[Path, str], cloud: Cloud, tmp_path: Path
) -> None:
    repo, commit = remote_repo
    backend = VesslBackend(study, **cloud.options(clone_url=str(tmp_path / "no-such-remote.git")))
    spec = JobSpec(name="no-code", code=CodeSource(repo=str(repo), commit=commit),
                   command=(sys.executable, "job.py"))
    slug = backend.submit(spec)
    assert wait_final(backend, slug) is Phase.FAILED
    result = backend.result(slug)
    assert result.failure is Failure.SETUP and result.exit_code == 64, result
    assert "cannot check out" in result.reason and "job-start" not in result.log_tail


def test_a_job_created_by_a_submitter_that_died_is_adopted_not_rerun(
    vessl: VesslBackend, remote_repo: tuple[Path, str], study: StudyDir, cloud: Cloud
) -> None:
    repo, commit = remote_repo
    spec = JobSpec(name="adopt-me", code=CodeSource(repo=str(repo), commit=commit),
                   command=(sys.executable, "job.py"), env={"FANOUT_TEST_SLEEP": "0.5"})
    slug = vessl.submit(spec)
    shutil.rmtree(study.root / "vessl")  # the name -> slug record never got written
    again = VesslBackend(study, **cloud.options())  # another process
    assert again.submit(spec) == slug
    assert len(cloud.job_files()) == 1
    assert wait_final(again, slug) is Phase.SUCCEEDED


def test_racing_submitters_of_one_spec_create_one_job(
    study: StudyDir, remote_repo: tuple[Path, str], cloud: Cloud
) -> None:
    repo, commit = remote_repo
    spec = JobSpec(name="raced", code=CodeSource(repo=str(repo), commit=commit),
                   command=(sys.executable, "job.py"))
    backends = [VesslBackend(study, **cloud.options()) for _ in range(3)]
    with ThreadPoolExecutor(len(backends)) as pool:
        slugs = list(pool.map(lambda backend: backend.submit(spec), backends))
    assert len(set(slugs)) == 1 and len(cloud.job_files()) == 1
    assert wait_final(backends[0], slugs[0]) is Phase.SUCCEEDED


def test_missing_settings_bad_slugs_and_refused_specs_change_nothing(
    study: StudyDir, remote_repo: tuple[Path, str], cloud: Cloud
) -> None:
    repo, commit = remote_repo
    spec = JobSpec(name="no-image", code=CodeSource(repo=str(repo), commit=commit), command=("true",))
    with pytest.raises(FanoutError, match="image"):
        VesslBackend(study, **cloud.options(image=None)).submit(spec)
    with pytest.raises(FanoutError, match="-rm"):
        VesslBackend(study, **cloud.options()).logs("-rm")
    with pytest.raises(JobSpecError, match='resource spec "gpu-nope" not found'):
        VesslBackend(study, **cloud.options(resource_spec="gpu-nope")).submit(spec)
    assert cloud.job_files() == []
    assert not (study.root / "vessl" / "jobs" / "no-image.json").exists()
    assert VesslBackend(study, **cloud.options()).submit(spec), "a refused name stays free"


def test_not_logged_in_is_one_error_and_changes_nothing(
    vessl: VesslBackend, remote_repo: tuple[Path, str], cloud: Cloud
) -> None:
    repo, commit = remote_repo
    cloud.logout()
    spec = JobSpec(name="logged-out", code=CodeSource(repo=str(repo), commit=commit), command=("true",))
    with pytest.raises(FanoutError, match="not logged in"):
        vessl.submit(spec)
    assert cloud.job_files() == []
    assert git(cloud.remote, "for-each-ref") == "", "nothing may be pushed for a refused job"


# -- through the real `fanout` script ------------------------------------------------------------
def cli_repo(tmp_path: Path, cloud: Cloud, **options: object) -> Path:
    repo, _ = make_research_repo(tmp_path / "cli-repo")
    settings = "\n".join(f"{k} = {json.dumps(v)}" for k, v in cloud.options(**options).items())
    commit_files(repo, {"fanout.toml": f'[job]\ncommand = "{sys.executable} job.py"\n'
                                       f"time_limit_s = 60\n[backend.vessl]\n{settings}\n"}, "settings")
    git(repo, "remote", "add", "origin", str(cloud.remote))
    return repo


@pytest.fixture
def plugin_path(tmp_path: Path) -> Path:
    """Registers the backend for the `fanout` subprocess the way a plugin package would (an entry
    point), in case the built-in registry does not list it yet; a built-in of the same name wins."""
    site = tmp_path / "plugins"
    info = site / "fanout_vessl_tests-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fanout-vessl-tests\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[fanout_research.backends]\nvessl = fanout_research.backends.vessl:VesslBackend\n")
    return site


def fanout(repo: Path, cloud: Cloud, plugins: Path, *args: str, path: str | None = None,
           **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in TERMINAL_FORCING}
    env.update(cloud.env(), PYTHONPATH=str(plugins), **extra)
    if path is not None:
        env["PATH"] = path
    return subprocess.run([FANOUT, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=90)


def one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, f"exit {done.returncode}: {done.stdout} {done.stderr}"
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


def ledger_text(repo: Path) -> str:
    path = repo / ".git" / "fanout" / "studies" / "default" / "jobs.jsonl"
    return path.read_text() if path.exists() else ""


def test_cli_submit_and_wait_with_no_secret_anywhere(
    tmp_path: Path, cloud: Cloud, plugin_path: Path
) -> None:
    repo = cli_repo(tmp_path, cloud)
    done = fanout(repo, cloud, plugin_path, "submit", "--backend", "vessl", "--env", "FANOUT_TEST_MODE=env",
                  **{SECRET_KEY: SECRET_VALUE})
    assert done.returncode == 0, done.stderr
    slug = done.stdout.strip()
    assert len(done.stdout.splitlines()) == 1 and slug.startswith("vj-")
    waited = fanout(repo, cloud, plugin_path, "wait", "--json", slug, **{SECRET_KEY: SECRET_VALUE})
    assert waited.returncode == 0, waited.stderr
    (record,) = json.loads(waited.stdout)
    assert record["phase"] == "succeeded" and record["metrics"]["val_bpb"] == pytest.approx(1.0)
    logs = fanout(repo, cloud, plugin_path, "logs", slug).stdout
    assert "secret-hidden" in logs
    job = json.loads(cloud.job_files()[0].read_text())
    assert job["env"]["FANOUT_DATA_DIR"] == str(cloud.mount)
    stored = [ledger_text(repo), logs, cloud.job_files()[0].read_text(),
              (cloud.job_files()[0].parent / "output.log").read_text()]
    stored += [p.read_text() for p in (repo / ".git" / "fanout").rglob("*.json")]
    for text in stored:
        assert SECRET_KEY not in text and SECRET_VALUE not in text


def test_cli_wait_timeout_terminates_a_job_stuck_pending(
    tmp_path: Path, cloud: Cloud, plugin_path: Path
) -> None:
    repo = cli_repo(tmp_path, cloud)
    done = fanout(repo, cloud, plugin_path, "submit", "--backend", "vessl", FAKE_VESSL_STAY_PENDING="1")
    assert done.returncode == 0, done.stderr
    slug = done.stdout.strip()
    waited = fanout(repo, cloud, plugin_path, "wait", "--timeout", "2", "--cancel-on-timeout", slug)
    assert waited.returncode == 124, waited.stderr
    assert "cancelled" in waited.stderr
    assert cloud.show(slug)["workloadState"] == "terminated"
    rows = json.loads(fanout(repo, cloud, plugin_path, "status", "--json", slug).stdout)
    assert rows[0]["phase"] == "cancelled"


def test_cli_bad_input_vesslctl_missing_logged_out_unknown_spec(
    tmp_path: Path, cloud: Cloud, plugin_path: Path
) -> None:
    repo = cli_repo(tmp_path, cloud)
    no_vesslctl = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                  if not (Path(p) / "vesslctl").exists())
    one_line_error(fanout(repo, cloud, plugin_path, "submit", "--backend", "vessl", path=no_vesslctl),
                   "vesslctl not found")

    cloud.logout()
    one_line_error(fanout(repo, cloud, plugin_path, "submit", "--backend", "vessl"), "not logged in")
    cloud.login()

    bad = cli_repo(tmp_path / "bad", cloud, resource_spec="gpu-b999-huge")
    one_line_error(fanout(bad, cloud, plugin_path, "submit", "--backend", "vessl"),
                   'resource spec "gpu-b999-huge" not found')
    for checked in (repo, bad):
        assert ledger_text(checked) == ""
        assert not list((checked / ".git" / "fanout").rglob("vessl/jobs/*.json"))
    assert cloud.job_files() == []
    assert git(cloud.remote, "for-each-ref") == "", "a refused job leaves no branch behind"
