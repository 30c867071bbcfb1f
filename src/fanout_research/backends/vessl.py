"""VesslBackend: jobs on VESSL's cloud, through its ``vesslctl`` command-line client.

Every call shells out to ``vesslctl`` (whichever is on PATH, or the configured path) and reads its
``-o json`` output; nothing here knows whether that is VESSL's binary or the test stand-in
(``fanout_research.testing.fake_vesslctl``). What the CLI does not give reliably, the backend works
around:

- ``job create`` does not always print the new job's slug, and a new job shows up in
  ``job list`` only after a delay: the slug is found by the job's unique name in the listing,
  polled with backoff. The same lookup makes ``submit`` idempotent.
- a non-zero exit that looks like a dropped connection is retried (bounded, with backoff);
- ``job logs`` returns at most the last 1000 lines, so metrics are read from the end of the log,
  and the job's exit code is printed by the job's own command as its last line;
- time limits are enforced here: a ``status`` poll that finds a job running past its limit
  terminates it and reports ``timed_out``.

The job clones the candidate's commit from the study's git remote (pushed there on submit to
``refs/heads/fanout/jobs/<study>/<name>``) and runs against the object volume mounted at
``mount_path``. It gets the job protocol's variables and the spec's env through ``--env``, and
nothing from the submitter's environment: ``vesslctl`` itself runs with our environment (it needs
its login), but only ``--env`` values reach the job.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from fanout_research.backends.local_files import write_json_atomic
from fanout_research.errors import BackendError, ConfigError, FanoutError, JobSpecError, UnknownJobError
from fanout_research.metrics import classify_exit, last_lines, parse_metrics
from fanout_research.models import DNS_LABEL, JobResult, JobSpec, JobState, Metrics, Phase
from fanout_research.phases import Failure
from fanout_research.study import StudyDir

# The API caps `job logs --limit` at this many lines.
LOG_LIMIT = 1000
LOG_TAIL_LINES = 40
# A job still running this long after we asked VESSL to terminate it is asked again.
RESTOP_AFTER_S = 30.0
# The job's command prints this as its last line; the backend reads and hides it.
EXIT_MARKER = "fanout-vessl-exit "
SETUP_EXIT = 64
SETUP_MARKER = "fanout-vessl: setup failed"
LIMIT_MARKER = "fanout-vessl: stopped at its time limit"
TERMINAL = {"succeeded": Phase.SUCCEEDED, "failed": Phase.FAILED, "terminated": Phase.CANCELLED,
            "cancelled": Phase.CANCELLED, "canceled": Phase.CANCELLED}
RUNNING_STATES = frozenset({"running", "initializing", "stopping", "terminating", "idle"})
# What a dropped or overloaded API connection looks like; anything else is a real answer.
TRANSIENT = re.compile(
    r"connection (reset|refused|aborted)|timed? ?out|temporar|unavailable|too many requests|"
    r"\b(429|500|502|503|504)\b|EOF|broken pipe|TLS handshake|try again",
    re.IGNORECASE,
)
NOT_FOUND = re.compile(r"not found|no such job|does not exist", re.IGNORECASE)


def _env_or(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


class VesslOptions(BaseModel):
    """``[backend.vessl]`` in fanout.toml; each falls back to an environment variable."""

    model_config = ConfigDict(extra="forbid")

    resource_spec: str | None = Field(
        default_factory=lambda: _env_or("FANOUT_VESSL_RESOURCE_SPEC"),
        description="VESSL resource spec (machine type), e.g. gpu-l4-small.")
    image: str | None = Field(default_factory=lambda: _env_or("FANOUT_VESSL_IMAGE"),
                              description="Container image with git, python and the trainer's deps.")
    volume: str | None = Field(default_factory=lambda: _env_or("FANOUT_VESSL_VOLUME"),
                               description="Object volume holding the prepared data.")
    mount_path: str = Field(default_factory=lambda: _env_or("FANOUT_VESSL_MOUNT_PATH", "/data") or "/data",
                            description="Where jobs see the volume; exported as FANOUT_DATA_DIR.")
    org: str | None = Field(default_factory=lambda: _env_or("VESSLCTL_ORG"))
    team: str | None = Field(default_factory=lambda: _env_or("VESSLCTL_TEAM"))
    remote: str = Field(default_factory=lambda: _env_or("FANOUT_VESSL_REMOTE", "origin") or "origin",
                        description="Git remote the candidate commits are pushed to.")
    clone_url: str | None = Field(None, description="URL jobs clone from (default: the remote's URL).")
    vesslctl: str = Field(default_factory=lambda: _env_or("FANOUT_VESSLCTL", "vesslctl") or "vesslctl",
                          description="The vesslctl executable (a name on PATH or a path).")
    retries: int = Field(5, ge=1, description="Attempts per vesslctl call on transient errors.")
    call_timeout_s: float = Field(120.0, gt=0, description="Limit for one vesslctl call.")
    list_timeout_s: float = Field(60.0, gt=0, description="How long a new job may take to be listed.")
    cancel_wait_s: float = Field(30.0, ge=0, description="How long cancel waits for 'terminated'.")
    create_recheck_s: float = Field(
        5.0, ge=0, description="After a failed `job create`, how long to look for the job in the "
        "listing (it may have been created) before creating it again.")
    self_stop_margin_s: float | None = Field(
        60.0, ge=0, description="A job stops itself this long after its time limit, in case nobody "
        "polls status to terminate it (None: never).")


class TransientError(BackendError):
    """vesslctl failed in a way worth retrying (a dropped connection, an overloaded API)."""


class VesslctlError(BackendError):
    """vesslctl answered with an error; ``message`` is its first meaningful line."""

    def __init__(self, argv: Sequence[str], code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"vesslctl {' '.join(argv[:2])} failed (exit {code}): {message}")


class _NotListedYet(Exception):
    pass


def _message(text: str) -> str:
    """The last non-empty line: where CLIs (vesslctl, git) put the error itself."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def _when(text: Any) -> datetime | None:
    if not text or not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _check_slug(slug: str) -> None:
    """A slug goes into vesslctl's argv: one that could read as an option is no slug of ours."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", slug):
        raise UnknownJobError(slug)


def _spec_hash(spec: JobSpec) -> str:
    return spec.digest()


def _jobs_of(payload: Any) -> list[dict[str, Any]]:
    """The job objects of a ``job list -o json`` answer: a bare array or a paged envelope."""
    if isinstance(payload, dict):
        for key in ("results", "items", "jobs", "data"):
            if isinstance(payload.get(key), list):
                payload = payload[key]
                break
    return [job for job in payload if isinstance(job, dict)] if isinstance(payload, list) else []


class VesslBackend:
    name: ClassVar[str] = "vessl"
    # Each poll is one `vesslctl job list` call, a round trip to VESSL's API.
    poll_interval_s: ClassVar[float] = 2.0

    def __init__(self, study: StudyDir, **options: Any) -> None:
        self.opts = VesslOptions.model_validate(options)
        self.study = study
        self.records_dir = study.root / self.name / "jobs"
        self.tag = f"fanout-{study.name}"
        self._checked_login = False
        self._final: dict[str, JobResult] = {}

    def options(self) -> dict[str, Any]:
        return self.opts.model_dump()

    # -- calling vesslctl ----------------------------------------------------------------------
    def _executable(self) -> str:
        found = shutil.which(self.opts.vesslctl)
        if not found:
            raise FanoutError(
                f"vesslctl not found ({self.opts.vesslctl!r} is not an executable on PATH); install "
                "VESSL's CLI or set [backend.vessl] vesslctl to its path"
            )
        return found

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)  # vesslctl needs its own login and config; jobs never see these
        if self.opts.org:
            env["VESSLCTL_ORG"] = self.opts.org
        if self.opts.team:
            env["VESSLCTL_TEAM"] = self.opts.team
        return env

    def _once(self, argv: Sequence[str]) -> str:
        try:
            done = subprocess.run(
                [self._executable(), *argv], env=self._env(), stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=self.opts.call_timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise TransientError(f"vesslctl {' '.join(argv[:2])} timed out") from None
        if done.returncode != 0:
            message = _message(done.stderr or done.stdout)
            if TRANSIENT.search(message):
                raise TransientError(message)
            raise VesslctlError(argv, done.returncode, message)
        return done.stdout

    def _call(self, *argv: str, check_login: bool = True) -> str:
        """Run vesslctl, retrying transient failures with backoff; return its stdout."""
        if check_login:
            self._ensure_login()
        retrying = Retrying(
            stop=stop_after_attempt(self.opts.retries),
            wait=wait_exponential(multiplier=0.2, max=5.0),
            retry=retry_if_exception_type(TransientError), reraise=True,
        )
        try:
            return retrying(self._once, argv)
        except TransientError as exc:
            raise BackendError(
                f"vesslctl {' '.join(argv[:2])} kept failing after {self.opts.retries} attempts: {exc}"
            ) from None

    def _json(self, *argv: str) -> Any:
        out = self._call(*argv, "-o", "json")
        try:
            return json.loads(out)
        except json.JSONDecodeError:
            raise BackendError(f"vesslctl {' '.join(argv[:2])} did not print JSON: {out[:200]!r}") from None

    def _ensure_login(self) -> None:
        """One ``whoami`` per backend: a missing login is a one-line error, not a failed job."""
        if self._checked_login:
            return
        try:
            self._call("whoami", check_login=False)
        except VesslctlError as exc:
            raise FanoutError(f"vesslctl is not logged in ({exc.message}); run `vesslctl login`") from None
        self._checked_login = True

    # -- records: name -> spec hash and slug, in the study directory -----------------------------
    def _record_path(self, name: str) -> Path:
        return self.records_dir / f"{name}.json"

    def _record(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._record_path(name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _save_record(self, name: str, record: dict[str, Any]) -> None:
        self.records_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._record_path(name), record)

    def _record_by_slug(self, slug: str) -> dict[str, Any] | None:
        if self.records_dir.is_dir():
            for path in self.records_dir.glob("*.json"):
                record = self._record(path.stem)
                if record and record.get("slug") == slug:
                    return record
        return None

    # -- submit --------------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> str:
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Sequence[JobSpec]) -> list[str]:
        """Push every commit, create the jobs that do not exist yet, then find all their slugs in
        one polled listing (a new job is listed only after a delay)."""
        slugs: dict[str, str] = {}
        fresh: list[JobSpec] = []
        to_find: list[str] = []  # created (by us or by a racing submitter) but slug not known yet
        unique: dict[str, JobSpec] = {}
        for spec in specs:
            unique.setdefault(spec.name, spec)
        for spec in unique.values():
            record = self._record(spec.name)
            if record is None:
                fresh.append(spec)
            elif self._same(spec, record).get("slug"):
                slugs[spec.name] = record["slug"]
            else:
                to_find.append(spec.name)
        if fresh:
            self._check_settings()
            listed = self._listing_by_name()
            url = self._clone_url(fresh[0])
            for spec in fresh:
                if spec.name in listed:  # created before, by a submitter that died before recording
                    slugs[spec.name] = listed[spec.name]["slug"]
                    self._save_record(spec.name, self._new_record(spec, listed[spec.name]["slug"]))
                elif not self._claim(spec):  # a racing submitter has it: find its job
                    to_find.append(self._same(spec, self._record(spec.name) or {})["name"])
                else:
                    pushed = False
                    try:
                        pushed = self._push(spec)
                        self._create(spec, url)
                    except JobSpecError:  # refused: leave nothing behind (other errors: see to_find)
                        self._record_path(spec.name).unlink(missing_ok=True)
                        if pushed:
                            self._unpush(spec)
                        raise
                    to_find.append(spec.name)
        if to_find:
            try:
                found = self._await_listing(to_find)
            except BackendError:
                for name in to_find:  # never created (its submitter died first): free the name
                    if (self._record(name) or {}).get("slug") is None:
                        self._record_path(name).unlink(missing_ok=True)
                raise
            for name, slug in found.items():
                self._save_record(name, {**(self._record(name) or {}), "slug": slug})
                slugs[name] = slug
        return [slugs[spec.name] for spec in specs]

    def _same(self, spec: JobSpec, record: dict[str, Any]) -> dict[str, Any]:
        if record.get("spec_hash") != _spec_hash(spec):
            raise JobSpecError(
                f"a different job named {spec.name!r} already exists in study {self.study.name!r}"
            )
        return record

    def _claim(self, spec: JobSpec) -> bool:
        """Write the name's record unless another submitter already did: of two, one creates."""
        self.records_dir.mkdir(parents=True, exist_ok=True)
        staged = self.records_dir / f".{spec.name}.{os.getpid()}.{secrets.token_hex(4)}.claim"
        staged.write_text(json.dumps(self._new_record(spec, None)))
        try:
            os.link(staged, self._record_path(spec.name))  # atomic, whole, and only if absent
        except FileExistsError:
            return False
        finally:
            staged.unlink()
        return True

    def _new_record(self, spec: JobSpec, slug: str | None) -> dict[str, Any]:
        return {"name": spec.name, "spec_hash": _spec_hash(spec), "slug": slug,
                "time_limit_s": spec.time_limit_s, "requires_metric": spec.requires_metric,
                "submitted_at": datetime.now(UTC).isoformat(), "stopped_by": None}

    def _check_settings(self) -> None:
        for option in ("resource_spec", "image"):
            if not getattr(self.opts, option):
                raise ConfigError(
                    f"set [backend.vessl] {option} in fanout.toml "
                    f"(or FANOUT_VESSL_{option.upper()}) to submit to VESSL"
                )
        if self.opts.volume is not None and not DNS_LABEL.match(self.opts.volume):
            raise ConfigError(f"[backend.vessl] volume {self.opts.volume!r} is not a valid volume name")
        if not self.opts.mount_path.startswith("/"):
            raise ConfigError(f"[backend.vessl] mount_path must be absolute, not {self.opts.mount_path!r}")

    def _listing_by_name(self) -> dict[str, dict[str, Any]]:
        """Our study's jobs (by tag) in one listing, keyed by name."""
        jobs = _jobs_of(self._json("job", "list"))
        return {job["name"]: job for job in jobs
                if self.tag in (job.get("tags") or []) and job.get("name") and job.get("slug")}

    def _await_listing(self, names: list[str]) -> dict[str, str]:
        def look() -> dict[str, str]:
            listed = self._listing_by_name()
            absent = [n for n in names if n not in listed]
            if absent:
                raise _NotListedYet(absent)
            return {n: listed[n]["slug"] for n in names}

        retrying = Retrying(
            stop=stop_after_delay(self.opts.list_timeout_s),
            wait=wait_exponential(multiplier=0.1, min=0.1, max=2.0),
            retry=retry_if_exception_type(_NotListedYet),
        )
        try:
            return retrying(look)
        except RetryError as exc:
            absent = exc.last_attempt.exception()
            raise BackendError(
                f"vesslctl created {absent} but the jobs never appeared in `vesslctl job list` "
                f"within {self.opts.list_timeout_s:g}s; submit again to adopt them"
            ) from None

    # -- git -----------------------------------------------------------------------------------
    def _git(self, repo: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=self.opts.call_timeout_s)

    def _branch(self, spec: JobSpec) -> str:
        return f"fanout/jobs/{self.study.name}/{spec.name}"

    def _clone_url(self, spec: JobSpec) -> str:
        if self.opts.clone_url:
            return self.opts.clone_url
        done = self._git(spec.code.repo, "remote", "get-url", self.opts.remote)
        if done.returncode != 0:
            raise JobSpecError(
                f"git remote {self.opts.remote!r} is not set in {spec.code.repo}; VESSL jobs clone the "
                "code from it (add one, or set [backend.vessl] remote)"
            )
        url = done.stdout.strip()
        if "://" not in url and not re.match(r"^[^/]+@[^:]+:", url):  # a local path: make it absolute
            base = Path(spec.code.repo)
            url = str((base / url).resolve()) if not Path(url).is_absolute() else url
        return url

    def _push(self, spec: JobSpec) -> bool:
        """Put the commit where the job can fetch it: a branch of its own on the remote. True if
        this call created the branch."""
        repo, ref = spec.code.repo, f"refs/heads/{self._branch(spec)}"
        if self._git(repo, "cat-file", "-e", f"{spec.code.commit}^{{commit}}").returncode != 0:
            raise JobSpecError(f"commit {spec.code.commit[:12]} is not in {repo}")
        remote = self._git(repo, "ls-remote", self.opts.remote, ref)
        if remote.returncode != 0:
            raise JobSpecError(f"cannot reach git remote {self.opts.remote!r}: {_message(remote.stderr)}")
        there = remote.stdout.split()[0] if remote.stdout.strip() else None
        if there == spec.code.commit:
            return False
        if there is not None:
            raise JobSpecError(f"{ref} on {self.opts.remote!r} already points at {there[:12]}, "
                               f"not {spec.code.commit[:12]}")
        pushed = self._git(repo, "push", "-q", self.opts.remote, f"{spec.code.commit}:{ref}")
        if pushed.returncode != 0:
            raise JobSpecError(f"cannot push {spec.code.commit[:12]} to {self.opts.remote!r}: "
                               f"{_message(pushed.stderr)}")
        return True

    def _unpush(self, spec: JobSpec) -> None:
        self._git(spec.code.repo, "push", "-q", self.opts.remote, f":refs/heads/{self._branch(spec)}")

    # -- the job's command ---------------------------------------------------------------------
    def _mount(self, spec: JobSpec) -> tuple[str, str] | None:
        """(volume, mount path): the configured volume, else the spec's data source as a volume."""
        if self.opts.volume:
            return self.opts.volume, self.opts.mount_path
        if spec.data is not None:
            return spec.data.source, spec.data.path
        return None

    def job_env(self, spec: JobSpec) -> dict[str, str]:
        """Everything the job sees beyond its image: the protocol, the spec's env. No secrets."""
        env = {"PYTHONUNBUFFERED": "1", **spec.protocol_env()}
        mount = self._mount(spec)
        if mount is not None:
            env["FANOUT_DATA_DIR"] = mount[1]
        env.update(spec.env)
        return env

    def job_command(self, spec: JobSpec, url: str) -> str:
        """The shell command the job runs: clone its branch, check out the exact commit (setup
        noise hidden unless it fails), run the spec's argv, and print the exit code last."""
        q = shlex.quote
        commit, branch = spec.code.commit, self._branch(spec)
        setup = (f"git clone -q --depth 1 --branch {q(branch)} {q(url)} \"$fanout_code\" && "
                 f"cd \"$fanout_code\" && git -c advice.detachedHead=false checkout -q {commit} && "
                 f"test \"$(git rev-parse HEAD)\" = {commit}")
        failed = q(f"{SETUP_MARKER}: cannot check out {commit[:12]} from {url} (branch {branch})")
        lines = [
            "fanout_code=$(mktemp -d) || exit 64",
            f"{{ {setup}; }} >\"$fanout_code.setup\" 2>&1 || "
            f"{{ cat \"$fanout_code.setup\" >&2; echo {failed} >&2; exit {SETUP_EXIT}; }}",
        ]
        argv = " ".join(q(arg) for arg in spec.command)
        if self.opts.self_stop_margin_s is None:
            lines += [argv, "fanout_rc=$?"]
        else:  # a backstop for when nobody polls: `timeout` (coreutils) if the image has it
            stop_after = f"{spec.time_limit_s + self.opts.self_stop_margin_s:g}"
            lines += [
                "fanout_limit=",
                f"command -v timeout >/dev/null 2>&1 && fanout_limit='timeout -k 10 {stop_after}'",
                f"$fanout_limit {argv}",
                "fanout_rc=$?",
                f"[ \"$fanout_rc\" = 124 ] && [ -n \"$fanout_limit\" ] && "
                f"echo {q(f'{LIMIT_MARKER} ({stop_after}s)')} >&2",
            ]
        return "\n".join([*lines, f"echo \"{EXIT_MARKER}$fanout_rc\"", "exit $fanout_rc"])

    def _create(self, spec: JobSpec, url: str) -> None:
        argv = ["job", "create", "-n", spec.name, "-r", str(self.opts.resource_spec),
                "-i", str(self.opts.image), "--cmd", self.job_command(spec, url)]
        mount = self._mount(spec)
        if mount is not None:
            argv += ["--object-volume", f"{mount[0]}:{mount[1]}"]
        for key, value in self.job_env(spec).items():
            argv += ["--env", f"{key}={value}"]
        argv += ["--tag", "fanout", "--tag", self.tag]
        try:
            self._create_once(spec.name, argv)
        except VesslctlError as exc:
            raise JobSpecError(f"VESSL refused job {spec.name!r}: {exc.message}") from None

    def _create_once(self, name: str, argv: list[str]) -> None:
        """``job create`` is not blindly retried: a dropped connection may have created the job.
        After a transient failure, the listing decides whether to create again."""
        self._ensure_login()
        for attempt in range(self.opts.retries):
            try:
                self._once(argv)
                return
            except TransientError as exc:
                if attempt + 1 == self.opts.retries:
                    raise BackendError(f"vesslctl job create kept failing: {exc}") from None
                try:
                    self._await_listing_briefly(name)
                    return  # it was created after all
                except _NotListedYet:
                    continue

    def _await_listing_briefly(self, name: str) -> None:
        deadline = time.monotonic() + min(self.opts.list_timeout_s, self.opts.create_recheck_s)
        while time.monotonic() < deadline:
            if name in self._listing_by_name():
                return
            time.sleep(0.25)
        raise _NotListedYet(name)

    # -- status --------------------------------------------------------------------------------
    def status(self, slugs: Sequence[str]) -> dict[str, JobState]:
        """One ``job list`` call for all the slugs (plus one ``logs`` call for each job seen
        finishing, to tell a success from a run that printed no metric)."""
        wanted = list(dict.fromkeys(slugs))
        listed = {job["slug"]: job for job in _jobs_of(self._json("job", "list")) if job.get("slug")}
        unknown = [s for s in wanted if s not in listed and s not in self._final]
        if unknown:
            raise UnknownJobError(unknown)
        out: dict[str, JobState] = {}
        for slug in wanted:
            if slug in self._final:
                final = self._final[slug]
                out[slug] = JobState(phase=final.phase, raw=final.reason or str(final.phase),
                                     started_at=final.started_at)
                continue
            out[slug] = self._state(listed[slug])
        return out

    def _state(self, job: dict[str, Any]) -> JobState:
        slug = job["slug"]
        raw = str(job.get("workloadState") or "").lower()
        started = _when(job.get("startedAt"))
        if raw in TERMINAL:
            final = self._result(job)
            return JobState(phase=final.phase, raw=raw, started_at=final.started_at)
        record = self._record_for(job)
        if raw in RUNNING_STATES:
            limit = record.get("time_limit_s")
            if limit and started and (datetime.now(UTC) - started).total_seconds() > limit:
                if time.time() - record.get("stopped_at", 0) > RESTOP_AFTER_S:  # not every poll
                    self._stop(slug, record, "timeout")
                return JobState(phase=Phase.RUNNING, raw=f"{raw}; terminating: over its time limit",
                                started_at=started)
            return JobState(phase=Phase.RUNNING, raw=raw, started_at=started)
        return JobState(phase=Phase.PENDING, raw=raw or "pending", started_at=started)

    def _record_for(self, job: dict[str, Any]) -> dict[str, Any]:
        """Our record of a listed job, if it is ours (same name in another study: not ours)."""
        name = str(job.get("name") or "")
        record = (self._record(name) if DNS_LABEL.match(name) else None) or {}
        return record if record.get("slug") in (None, job.get("slug")) else {}

    def _stop(self, slug: str, record: dict[str, Any], why: str) -> None:
        if record.get("name"):
            self._save_record(record["name"], {**record, "stopped_by": record.get("stopped_by") or why,
                                               "stopped_at": time.time()})
        try:
            self._call("job", "terminate", slug)
        except VesslctlError as exc:
            if NOT_FOUND.search(exc.message):
                raise UnknownJobError(slug) from None
            raise

    # -- result and logs -----------------------------------------------------------------------
    def _show(self, slug: str) -> dict[str, Any]:
        _check_slug(slug)
        try:
            job = self._json("job", "show", slug)
        except VesslctlError as exc:
            if NOT_FOUND.search(exc.message):
                raise UnknownJobError(slug) from None
            raise
        if not isinstance(job, dict):
            raise BackendError(f"vesslctl job show {slug} printed no job object")
        return job

    def result(self, slug: str) -> JobResult:
        if slug in self._final:
            return self._final[slug]
        return self._result(self._show(slug))

    def _result(self, job: dict[str, Any]) -> JobResult:
        slug = job["slug"]
        if slug in self._final:
            return self._final[slug]
        raw = str(job.get("workloadState") or "").lower()
        record = self._record_for(job) or self._record_by_slug(slug) or {}
        common = {
            "slug": slug, "name": job.get("name") or slug,
            "submitted_at": _when(job.get("createdAt")) or _when(record.get("submitted_at")),
            "started_at": _when(job.get("startedAt")), "ended_at": _when(job.get("finishedAt")),
        }
        if raw not in TERMINAL:
            state = self._state(job)
            return JobResult(phase=state.phase, reason=state.raw, **common)
        text, exit_code = self._read_log(slug)
        if exit_code is None and isinstance(job.get("exitCode"), int):
            exit_code = job["exitCode"]
        tail = last_lines(text, LOG_TAIL_LINES)
        metrics = parse_metrics(text)
        if raw == "succeeded":
            phase, failure, reason = classify_exit(0 if exit_code is None else exit_code, metrics, tail,
                                                   record.get("requires_metric", True))
            exit_code = 0 if exit_code is None else exit_code
        elif raw == "failed":
            if exit_code == SETUP_EXIT and SETUP_MARKER in text:
                phase, failure, reason = Phase.FAILED, Failure.SETUP, _message(
                    "\n".join(line for line in text.splitlines() if SETUP_MARKER in line))
            elif exit_code == 124 and LIMIT_MARKER in tail:
                phase, failure = Phase.TIMED_OUT, Failure.TIMED_OUT
                reason = f"timed out: stopped itself {self.opts.self_stop_margin_s or 0:g}s past its limit"
            else:
                phase, failure, reason = classify_exit(exit_code, metrics, tail)
        elif record.get("stopped_by") == "timeout":
            limit = record.get("time_limit_s") or 0
            phase, failure, reason = Phase.TIMED_OUT, Failure.TIMED_OUT, f"timed out after {limit:g}s"
        else:
            phase, failure, reason = Phase.CANCELLED, Failure.CANCELLED, f"cancelled ({raw})"
        result = JobResult(phase=phase, metrics=Metrics.lenient(metrics), exit_code=exit_code,
                           failure=failure, reason=reason, log_tail=tail, **common)
        self._final[slug] = result
        return result

    def _read_log(self, slug: str) -> tuple[str, int | None]:
        """The last 1000 lines (the API's cap), without our exit marker, and the exit code."""
        _check_slug(slug)
        try:
            text = self._call("job", "logs", "--limit", str(LOG_LIMIT), slug)
        except VesslctlError as exc:
            if NOT_FOUND.search(exc.message):
                raise UnknownJobError(slug) from None
            raise
        exit_code = None
        kept = []
        for line in text.splitlines():
            if line.startswith(EXIT_MARKER):
                code = line[len(EXIT_MARKER):].strip()
                exit_code = int(code) if re.fullmatch(r"-?\d+", code) else exit_code
                continue
            kept.append(line)
        return "\n".join(kept) + ("\n" if kept else ""), exit_code

    def logs(self, slug: str, tail: int | None = None) -> str:
        """At most the last 1000 lines: VESSL's API serves no more."""
        text, _ = self._read_log(slug)
        return last_lines(text, tail) if tail is not None else text

    # -- cancel --------------------------------------------------------------------------------
    def cancel(self, slug: str) -> None:
        """Terminate the job, so that it stops billing, and wait (briefly) for VESSL to agree."""
        job = self._show(slug)
        if str(job.get("workloadState") or "").lower() in TERMINAL:
            return
        self._stop(slug, self._record_for(job), "cancel")
        deadline = time.monotonic() + self.opts.cancel_wait_s
        while time.monotonic() < deadline:
            if str(self._show(slug).get("workloadState") or "").lower() in TERMINAL:
                return
            time.sleep(0.2)
