"""LocalBackend: this machine as a small batch cluster, the embedded default.

Each job is a detached supervisor process (see ``local_supervisor``) that runs the candidate commit
in its own git worktree. Slots bound how many jobs train at once: by default one per visible GPU
(slot ``i`` sees only GPU ``i`` through ``CUDA_VISIBLE_DEVICES``), else one per two CPU cores.
Slots are flocks in a machine-wide directory, so two studies on one machine share the GPUs rather
than fight over them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from fanout_research import gitrepo
from fanout_research.backends import local_files as files
from fanout_research.backends.local_supervisor import register_worktree
from fanout_research.errors import JobSpecError, UnknownJobError
from fanout_research.metrics import last_lines
from fanout_research.models import JobResult, JobSpec, JobState, Metrics, Phase
from fanout_research.phases import Failure
from fanout_research.study import StudyDir

# What a job inherits from the submitter's environment. Everything else (API keys, cloud
# credentials, tokens) stays behind: a proposal's code must never see the orchestrator's secrets.
ENV_PASSTHROUGH = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM", "SHELL",
    "LD_LIBRARY_PATH", "VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH", "CUDA_HOME", "CUDA_PATH",
    "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
})
ENV_PASSTHROUGH_PREFIXES = ("LC_",)
# A supervisor that has not written its first state this long after submit never started.
SUPERVISOR_START_GRACE_S = 30.0
LOG_TAIL_LINES = 40


@lru_cache(maxsize=1)
def visible_gpus() -> tuple[str, ...]:
    """GPU ids this process may use, without importing torch: CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    declared = os.environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None:
        return tuple(d.strip() for d in declared.split(",") if d.strip() and d.strip() != "-1")
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ()
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(line.strip() for line in out.splitlines() if line.strip())


def job_env(
    spec: JobSpec, passthrough: Sequence[str] = (), skip: frozenset[str] = frozenset()
) -> dict[str, str]:
    """The environment of a job that runs on a filesystem we share (this machine, a Slurm node):
    the allow-listed part of ours, the job protocol, the spec's own variables."""
    env = {
        key: value for key, value in os.environ.items()
        if (key in ENV_PASSTHROUGH or key in passthrough or key.startswith(ENV_PASSTHROUGH_PREFIXES))
        and key not in skip
    }
    env["PYTHONUNBUFFERED"] = "1"
    # `python` in such a job means the interpreter running fanout (its venv has the trainer's
    # packages), even when that venv is not activated in the submitting shell.
    here = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != here:
        env["PATH"] = os.pathsep.join(filter(None, [here, env.get("PATH")]))
    env.update(spec.protocol_env())
    if spec.data is not None:  # no mounts: the job reads the prepared directory in place
        data = Path(spec.data.source).expanduser()
        if not data.is_dir():
            raise JobSpecError(f"data directory {data} does not exist (prepare it first)")
        env["FANOUT_DATA_DIR"] = str(data.resolve())
    env.update(spec.env)
    return env


def default_slots_dir() -> Path:
    override = os.environ.get("FANOUT_SLOTS_DIR")
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fanout" / "slots"


class LocalOptions(BaseModel):
    """``[backend.local]`` in fanout.toml."""

    model_config = ConfigDict(extra="forbid")

    slots: int | None = Field(None, ge=1, description="Jobs at once (default: GPUs, else cores/2).")
    slots_dir: str | None = Field(None, description="Machine-wide slot locks (FANOUT_SLOTS_DIR).")
    gpus: list[str] | None = Field(None, description="GPU ids to use (default: all visible).")
    kill_grace_s: float = Field(5.0, ge=0, description="SIGTERM-to-SIGKILL grace on stop.")
    keep_worktrees: bool = Field(False, description="Keep each job's checkout after it ends.")
    env_passthrough: list[str] = Field(default_factory=list, description="Extra variables to pass.")


def _when(epoch: float | None) -> datetime | None:
    return datetime.fromtimestamp(epoch, UTC) if epoch else None


class LocalBackend:
    name: ClassVar[str] = "local"
    poll_interval_s: ClassVar[float] = 0.02  # a poll reads one small file per job
    shared_filesystem: ClassVar[bool] = True  # jobs see our paths: data is used in place

    def __init__(self, study: StudyDir, **options: Any) -> None:
        opts = LocalOptions.model_validate(options)
        self.study = study
        self.gpus = tuple(visible_gpus() if opts.gpus is None else opts.gpus)
        cpu_slots = max(1, (os.cpu_count() or 2) // 2)
        self.slots = opts.slots or len(self.gpus) or cpu_slots
        self.slots_dir = Path(opts.slots_dir) if opts.slots_dir else default_slots_dir()
        self.kill_grace_s = opts.kill_grace_s
        self.keep_worktrees = opts.keep_worktrees
        self.env_passthrough = tuple(opts.env_passthrough)
        self.jobs_dir = study.root / self.name / "jobs"
        self.worktrees_dir = study.root / self.name / "worktrees"

    def options(self) -> dict[str, Any]:
        return {
            "slots": self.slots, "slots_dir": str(self.slots_dir), "gpus": list(self.gpus),
            "kill_grace_s": self.kill_grace_s, "keep_worktrees": self.keep_worktrees,
            "env_passthrough": list(self.env_passthrough),
        }

    # -- submit --------------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> str:
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Sequence[JobSpec]) -> list[str]:
        """Submit a round at once: every spec is checked before anything is written, and one
        supervisor process forks a supervisor per job, so K jobs pay one interpreter start-up."""
        plans = {spec.name: self._launch_plan(spec) for spec in specs
                 if not (self.jobs_dir / spec.name).exists()}
        fresh: list[Path] = []
        for spec in specs:
            if spec.name in plans and self._create(spec, plans.pop(spec.name)):
                fresh.append(self.jobs_dir / spec.name)
            else:
                self._resubmit(spec)
        if fresh:
            # Register the worktrees here (a fraction of a millisecond each); each supervisor then
            # fills its own in parallel.
            for job_dir in fresh:
                # A failure here is the job's, not the submitter's: its supervisor tries again
                # and reports a setup failure with the reason.
                with contextlib.suppress(OSError):
                    register_worktree(files.read_json(job_dir / files.LAUNCH))
            self._spawn_supervisors(fresh)
        return [spec.name for spec in specs]

    def _create(self, spec: JobSpec, launch: dict[str, Any]) -> bool:
        """Make the job's directory and queue entry; False if a racing submitter made it first."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        job_dir = self.jobs_dir / spec.name
        staging = Path(tempfile.mkdtemp(dir=self.jobs_dir, prefix=f".new-{spec.name}-"))
        (staging / files.SPEC).write_text(spec.model_dump_json())
        files.write_json_atomic(staging / files.LAUNCH, launch)
        (staging / files.LOG).touch()
        try:
            os.rename(staging, job_dir)  # atomic: of two racing submitters, exactly one wins
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            return False
        # Queue it now, not when the supervisor gets going: start-up times vary, and the order of
        # the queue is the order of submission.
        queue_entry = Path(launch["queue_entry"])
        queue_entry.parent.mkdir(parents=True, exist_ok=True)
        queue_entry.write_text(str(job_dir))
        return True

    def _resubmit(self, spec: JobSpec) -> str:
        job_dir = self.jobs_dir / spec.name
        existing = files.read_json(job_dir / files.SPEC)
        if existing is None or not JobSpec.model_validate(existing).same_job(spec):
            raise JobSpecError(
                f"a different job named {spec.name!r} already exists in study {self.study.name!r}"
            )
        state = files.read_json(job_dir / files.STATE)
        if state is None or (not Phase(state["phase"]).final
                             and not files.is_alive(state.get("supervisor"))):
            self._spawn_supervisors([job_dir])  # the first submitter died before its supervisor ran
        return spec.name

    def _launch_plan(self, spec: JobSpec) -> dict[str, Any]:
        repo = gitrepo.repo_holding(spec.code.repo, spec.code.commit, "the local backend runs local code")
        env = self._job_env(spec)
        self._check_command(repo, spec, env.get("PATH", os.defpath))
        submitted = files.now()
        return {
            "slug": spec.name,
            "repo": str(Path(repo.working_tree_dir).resolve()),
            "commit": spec.code.commit,
            "ref": f"refs/fanout/{self.study.name}/{spec.name}",
            "argv": list(spec.command),
            "env": env,
            "time_limit_s": spec.time_limit_s,
            "requires_metric": spec.requires_metric,
            "kill_grace_s": self.kill_grace_s,
            "worktree": str(self.worktrees_dir / spec.name),
            "worktree_lock": str(gitrepo.common_dir(repo) / "fanout" / "worktrees.lock"),
            "git_dir": str(gitrepo.common_dir(repo)),
            "keep_worktree": self.keep_worktrees,
            "log": str(self.jobs_dir / spec.name / files.LOG),
            "slots": self.slots,
            "slots_dir": str(self.slots_dir),
            "slot_devices": list(self.gpus),
            "threads_per_slot": None if self.gpus else max(1, (os.cpu_count() or 1) // self.slots),
            "submitted_at": submitted,
            "queue_entry": str(self.slots_dir / "queue" / f"{int(submitted * 1e9):020d}-{spec.name}"),
        }

    def _job_env(self, spec: JobSpec) -> dict[str, str]:
        return job_env(spec, self.env_passthrough)

    @staticmethod
    def _check_command(repo: Any, spec: JobSpec, path: str) -> None:
        program = spec.command[0]
        if os.path.isabs(program):
            found = os.access(program, os.X_OK)
        elif "/" in program:
            found = gitrepo.path_exists_at(repo, spec.code.commit, program)
        else:
            found = shutil.which(program, path=path) is not None
        if not found:
            raise JobSpecError(f"command not found: {program!r} (not on the job's PATH or in the commit)")

    def _spawn_supervisors(self, job_dirs: list[Path]) -> None:
        # The supervisors get the jobs' filtered environment: no secrets there either.
        env = dict(files.read_json(job_dirs[0] / files.LAUNCH)["env"])
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        # -S: the supervisor is stdlib-only and finds this package through PYTHONPATH, so it
        # skips site-packages and its .pth files; it starts once per round, on the critical path.
        argv = [sys.executable, "-S", "-m", "fanout_research.backends.local_supervisor",
                *map(str, job_dirs)]
        with open(job_dirs[0] / files.SUPERVISOR_LOG, "ab") as log:
            setsid = _setsid()
            if setsid:  # double fork: the supervisor is nobody's child, so never a zombie of ours
                subprocess.run([setsid, "-f", *argv], env=env, stdin=subprocess.DEVNULL,
                               stdout=log, stderr=log, check=True)
            else:
                _DETACHED.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                                  stdout=log, stderr=log, start_new_session=True))

    # -- status, result, logs ------------------------------------------------------------------
    def _job_dir(self, slug: str) -> Path:
        job_dir = self.jobs_dir / slug
        if "/" in slug or slug.startswith(".") or not (job_dir / files.SPEC).exists():
            raise UnknownJobError(slug)
        return job_dir

    def status(self, slugs: Sequence[str]) -> dict[str, JobState]:
        unknown = [s for s in dict.fromkeys(slugs) if not self._known(s)]
        if unknown:
            raise UnknownJobError(unknown)
        out: dict[str, JobState] = {}
        for slug in dict.fromkeys(slugs):
            state = self._state(self.jobs_dir / slug)
            out[slug] = JobState(
                phase=Phase(state["phase"]), raw=state.get("raw", ""),
                started_at=_when(state.get("started_at")),
            )
        return out

    def _known(self, slug: str) -> bool:
        try:
            self._job_dir(slug)
        except UnknownJobError:
            return False
        return True

    def _state(self, job_dir: Path) -> dict[str, Any]:
        """The supervisor's last word, reconciled with reality when the supervisor is gone."""
        state = files.read_json(job_dir / files.STATE)
        if state is not None and Phase(state["phase"]).final:
            return state
        if state is not None and files.is_alive(state.get("supervisor")):
            return state
        if state is None:
            launch = files.read_json(job_dir / files.LAUNCH) or {}
            if files.now() - launch.get("submitted_at", 0) < SUPERVISOR_START_GRACE_S:
                return {"phase": str(Phase.PENDING), "raw": "starting"}
        return self._declare_lost(job_dir) or state or {"phase": str(Phase.PENDING), "raw": "starting"}

    def _declare_lost(self, job_dir: Path) -> dict[str, Any] | None:
        """Record that nobody supervises the job any more, unless a supervisor still does."""
        fd = os.open(job_dir / files.SUPERVISOR_LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # a (new) supervisor holds it: trust its next write
            state = files.read_json(job_dir / files.STATE) or {}
            if state.get("phase") and Phase(state["phase"]).final:
                return state
            files.kill_job_group(state.get("job"))
            if (job_dir / files.CANCEL_MARK).exists():
                phase, failure, reason = Phase.CANCELLED, Failure.CANCELLED, "cancelled"
            else:
                phase, failure = Phase.LOST, Failure.LOST
                reason = "lost: its supervisor process died" if state else "lost: it never started"
            state.update(phase=str(phase), failure=str(failure), reason=reason, raw=reason,
                         ended_at=state.get("ended_at") or files.now())
            files.write_json_atomic(job_dir / files.STATE, state)
            return state
        finally:
            os.close(fd)

    def result(self, slug: str) -> JobResult:
        job_dir = self._job_dir(slug)
        state = self._state(job_dir)
        launch = files.read_json(job_dir / files.LAUNCH) or {}
        return JobResult(
            slug=slug, name=slug, phase=Phase(state["phase"]),
            metrics=Metrics.lenient(state.get("metrics") or {}),
            exit_code=state.get("exit_code"), failure=state.get("failure"),
            reason=state.get("reason") or "", log_tail=self.logs(slug, tail=LOG_TAIL_LINES),
            submitted_at=_when(launch.get("submitted_at")),
            started_at=_when(state.get("started_at")), ended_at=_when(state.get("ended_at")),
        )

    def logs(self, slug: str, tail: int | None = None) -> str:
        path = self._job_dir(slug) / files.LOG
        with open(path, "rb") as handle:
            if tail is not None:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - max(65536, tail * 400)))
            text = handle.read().decode("utf-8", errors="replace")
        return last_lines(text, tail) if tail is not None else text

    # -- cancel --------------------------------------------------------------------------------
    def cancel(self, slug: str) -> None:
        job_dir = self._job_dir(slug)
        state = self._state(job_dir)
        if Phase(state["phase"]).final:
            return
        (job_dir / files.CANCEL_MARK).touch()
        deadline = time.monotonic() + self.kill_grace_s + 10.0
        while time.monotonic() < deadline:
            state = self._state(job_dir)
            if Phase(state["phase"]).final:
                return
            supervisor = state.get("supervisor")
            if files.is_alive(supervisor):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(supervisor["pid"]), signal.SIGTERM)
            time.sleep(0.05)


_DETACHED: list[subprocess.Popen[bytes]] = []


@lru_cache(maxsize=1)
def _setsid() -> str | None:
    """util-linux ``setsid`` with ``--fork`` support, if present."""
    path = shutil.which("setsid")
    if not path:
        return None
    try:
        probe = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "--fork" in probe.stdout + probe.stderr else None
