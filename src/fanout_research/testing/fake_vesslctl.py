#!/usr/bin/env python3
"""STAND-IN for VESSL's ``vesslctl`` CLI, for tests only. It is not VESSL and talks to no cloud.

The ``vessl`` backend shells out to whatever ``vesslctl`` is on PATH (or configured). The real one
needs VESSL's cloud and a login, which tests do not have, so the tests install this script as an
executable named ``vesslctl`` in a temporary bin directory and put it first on PATH. The backend's
code path is then exactly the production one: same argv, same JSON parsing, same retries.

The stand-in imitates the behaviour the backend has to cope with, as documented for vesslctl:

- ``whoami`` fails when not logged in (here: no ``login.json`` in ``$FAKE_VESSL_HOME``), and so
  does every other command;
- ``job create`` prints the new job's slug only sometimes (every other call), so callers must look
  it up by name; a new job appears in ``job list`` only after a delay (``FAKE_VESSL_LIST_DELAY``,
  default 0.5 s); unknown resource specs and object volumes are refused with an error message;
- jobs go ``pending -> running -> succeeded | failed``, and ``terminate`` makes them
  ``terminated``; ``FAKE_VESSL_STAY_PENDING=1`` at create time keeps a job pending for good (no
  capacity), until it is terminated;
- ``job logs`` returns at most the last 1000 lines, whatever ``--limit`` asks for;
- ``FAKE_VESSL_FLAKY=N`` makes every Nth call fail with exit 1 and a "connection reset" message,
  like a dropped API connection: before doing anything, except that every other such
  ``job create`` creates the job first and then fails (the response was lost). Each flake is
  noted in ``$FAKE_VESSL_HOME/flakes``.

Each job really runs: a detached runner process executes ``--cmd`` with ``/bin/sh -c``, with a
fresh environment holding only a container-like base (PATH, HOME, TMPDIR, LANG) plus the ``--env``
values, never the caller's environment. ``--object-volume VOLUME:PATH`` maps
``$FAKE_VESSL_HOME/volumes/VOLUME`` (which must exist) to PATH by a symlink, so PATH must be
writable here (tests use a temporary directory; ``/data`` would need root).

State lives under ``$FAKE_VESSL_HOME``::

    login.json                 {"user": ..., "organization": ...}; absent means logged out
    volumes/<volume>/          object volumes
    jobs/<slug>/job.json       what was created (name, cmd, env, tags, ...)
               /state.json     workloadState, startedAt, finishedAt, exitCode
               /output.log     the job's stdout and stderr
               /terminate      present once a terminate was asked for
    calls                      call counter (for FAKE_VESSL_FLAKY and the sometimes-printed slug)
    flakes                     one line per call failed on purpose

Standard library only: it is copied next to nothing and run by whichever python3 is at hand.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

LOG_LIMIT_CAP = 1000
DEFAULT_LOG_LIMIT = 100
TERMINAL = ("succeeded", "failed", "terminated")
# An invented catalogue: VESSL's real names depend on the organization's clusters.
RESOURCE_SPECS = ("cpu-small", "cpu-medium", "gpu-l4-small", "gpu-a100-80g-small", "gpu-h100-80g-small")
LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
KILL_GRACE_S = 2.0


def die(message: str, code: int = 1) -> NoReturn:
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(code)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def home() -> Path:
    root = os.environ.get("FAKE_VESSL_HOME")
    if not root:
        die("FAKE_VESSL_HOME is not set (this vesslctl is the fanout test stand-in)")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(root: Path):  # noqa: ANN201 - a context manager; the stand-in keeps to the stdlib
    with open(root / "lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def count_call(root: Path) -> int:
    """The number of this call, counted across every vesslctl process sharing the home."""
    with locked(root):
        counter = root / "calls"
        number = int(counter.read_text() or 0) + 1 if counter.exists() else 1
        counter.write_text(str(number))
    return number


def flaky_every() -> int:
    return int(os.environ.get("FAKE_VESSL_FLAKY") or 0)


def flaky_call(number: int) -> bool:
    every = flaky_every()
    return every > 0 and number % every == 0


def create_flakes(root: Path) -> int:
    try:
        return sum(line.startswith("job create") for line in (root / "flakes").read_text().splitlines())
    except FileNotFoundError:
        return 0


def flake(root: Path, what: str) -> NoReturn:
    """Fail like a dropped connection, and note it (tests check that flakes really happened)."""
    with open(root / "flakes", "a") as handle:
        handle.write(what + "\n")
    die("request failed: read tcp 10.0.0.2:443: connection reset by peer")


def require_login(root: Path) -> dict[str, Any]:
    login = read_json(root / "login.json")
    if not login:
        die("not logged in. Run `vesslctl login` first (or set VESSL_ACCESS_TOKEN)")
    return login


def scope(login: dict[str, Any]) -> tuple[str, str]:
    org = os.environ.get("VESSLCTL_ORG") or login.get("organization") or ""
    if not org:
        die("no organization selected: set VESSLCTL_ORG or run `vesslctl login`")
    return org, os.environ.get("VESSLCTL_TEAM") or login.get("team") or ""


# -- job records -----------------------------------------------------------------------------------
def job_dir(root: Path, slug: str) -> Path:
    return root / "jobs" / slug


def load_job(root: Path, slug: str, org: str, team: str) -> dict[str, Any]:
    if not re.fullmatch(r"[a-z0-9-]+", slug):
        die(f'job "{slug}" not found')
    job = read_json(job_dir(root, slug) / "job.json")
    if not job or job["organization"] != org or job["team"] != team:
        die(f'job "{slug}" not found in organization "{org}"')
    return job


def view(root: Path, job: dict[str, Any], with_env: bool = True) -> dict[str, Any]:
    state = read_json(job_dir(root, job["slug"]) / "state.json") or {}
    shown = {
        "slug": job["slug"], "name": job["name"], "organization": job["organization"],
        "team": job["team"], "resourceSpec": job["resourceSpec"], "image": job["image"],
        "tags": job["tags"], "createdAt": job["createdAt"],
        "workloadState": state.get("workloadState", "pending"),
        "startedAt": state.get("startedAt"), "finishedAt": state.get("finishedAt"),
        "exitCode": state.get("exitCode"),
    }
    if with_env:
        shown["env"] = job["env"]
        shown["cmd"] = job["cmd"]
    return shown


def all_jobs(root: Path, org: str, team: str) -> list[dict[str, Any]]:
    jobs = []
    for path in sorted((root / "jobs").glob("*/job.json")):
        job = read_json(path)
        if job and job["organization"] == org and job["team"] == team:
            jobs.append(job)
    return sorted(jobs, key=lambda j: j["createdAt"])


# -- commands --------------------------------------------------------------------------------------
def cmd_whoami(root: Path, args: argparse.Namespace) -> None:
    login = require_login(root)
    org, team = scope(login)
    print(f"{login.get('user', 'unknown')} (organization: {org}{', team: ' + team if team else ''})")


def cmd_create(root: Path, args: argparse.Namespace, number: int) -> None:
    org, team = scope(require_login(root))
    if not LABEL.match(args.name or ""):
        die(f'invalid job name "{args.name}": use lowercase letters, digits and "-" (at most 63)')
    for tag in args.tag:
        if not LABEL.match(tag):
            die(f'invalid tag "{tag}": use lowercase letters, digits and "-"')
    if args.resource_spec not in RESOURCE_SPECS:
        die(f'resource spec "{args.resource_spec}" not found in organization "{org}" '
            f"(available: {', '.join(RESOURCE_SPECS)})")
    if not args.image:
        die("an image is required (-i/--image)")
    env: dict[str, str] = {}
    for pair in args.env:
        key, sep, value = pair.partition("=")
        if not sep or not ENV_NAME.match(key):
            die(f'invalid environment variable "{pair}": use KEY=VALUE')
        env[key] = value
    volumes = []
    for mount in args.object_volume:
        volume, sep, path = mount.partition(":")
        if not sep or not volume or not path.startswith("/"):
            die(f'invalid object volume "{mount}": use VOLUME:/absolute/mount/path')
        if not (root / "volumes" / volume).is_dir():
            die(f'object volume "{volume}" not found in organization "{org}"')
        volumes.append({"volume": volume, "path": path})
    slug = "vj-" + secrets.token_hex(5)
    job = {
        "slug": slug, "name": args.name, "organization": org, "team": team,
        "resourceSpec": args.resource_spec, "image": args.image, "cmd": args.cmd, "env": env,
        "volumes": volumes, "tags": list(args.tag), "createdAt": now_iso(),
        "stayPending": os.environ.get("FAKE_VESSL_STAY_PENDING") == "1",
    }
    directory = job_dir(root, slug)
    directory.mkdir(parents=True)
    write_json(directory / "state.json", {"workloadState": "pending"})
    write_json(directory / "job.json", job)
    (directory / "output.log").touch()
    # The runner must not hold our stdout/stderr open: the caller waits for them to close.
    subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "__run", slug],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True, env={**os.environ, "FAKE_VESSL_HOME": str(root)},
    )
    if number % 2 == 0:  # like the real CLI, the slug is printed only sometimes
        print(f"Created job {slug}")
    else:
        print("Job created.")


def cmd_list(root: Path, args: argparse.Namespace) -> None:
    org, team = scope(require_login(root))
    delay = float(os.environ.get("FAKE_VESSL_LIST_DELAY", "0.5"))
    cutoff = time.time() - delay
    jobs = [view(root, j, with_env=False) for j in all_jobs(root, org, team)
            if parse_iso(j["createdAt"]) <= cutoff]
    if args.output == "json":
        print(json.dumps({"results": jobs}, indent=1))
        return
    print(f"{'SLUG':<16} {'NAME':<40} {'STATE':<12} CREATED")
    for job in jobs:
        print(f"{job['slug']:<16} {job['name']:<40} {job['workloadState']:<12} {job['createdAt']}")


def cmd_show(root: Path, args: argparse.Namespace) -> None:
    org, team = scope(require_login(root))
    shown = view(root, load_job(root, args.slug, org, team))
    if args.output == "json":
        print(json.dumps(shown, indent=1))
        return
    for key, value in shown.items():
        if key != "env":
            print(f"{key}: {value}")


def cmd_logs(root: Path, args: argparse.Namespace) -> None:
    org, team = scope(require_login(root))
    if args.follow:
        die("--follow is not offered by this stand-in (the backend polls instead)", 2)
    job = load_job(root, args.slug, org, team)
    limit = min(max(1, args.limit), LOG_LIMIT_CAP)  # the API caps it, silently
    with open(job_dir(root, job["slug"]) / "output.log", "rb") as handle:
        text = handle.read().decode("utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    sys.stdout.write("".join(lines[-limit:]))


def cmd_terminate(root: Path, args: argparse.Namespace) -> None:
    org, team = scope(require_login(root))
    job = load_job(root, args.slug, org, team)
    directory = job_dir(root, job["slug"])
    state = read_json(directory / "state.json") or {}
    if state.get("workloadState") in TERMINAL:
        print(f"Job {job['slug']} has already finished ({state['workloadState']}).")
        return
    (directory / "terminate").touch()
    print(f"Terminating job {job['slug']}.")


# -- the runner: one detached process per job, standing in for the cloud's scheduler -----------
def set_state(directory: Path, **changes: Any) -> dict[str, Any]:
    state = read_json(directory / "state.json") or {}
    state.update(changes)
    write_json(directory / "state.json", state)
    return state


def run_job(root: Path, slug: str) -> None:
    directory = job_dir(root, slug)
    job = read_json(directory / "job.json")
    terminate = directory / "terminate"
    start_at = time.time() + float(os.environ.get("FAKE_VESSL_START_DELAY", "0.2"))
    while job["stayPending"] or time.time() < start_at:
        if terminate.exists():
            set_state(directory, workloadState="terminated", finishedAt=now_iso())
            return
        time.sleep(0.05)
    sandbox = directory / "container"
    (sandbox / "home").mkdir(parents=True, exist_ok=True)
    (sandbox / "tmp").mkdir(exist_ok=True)
    log = open(directory / "output.log", "ab")  # noqa: SIM115 - kept open for the job's life
    for mount in job["volumes"]:  # the "mount": a symlink from the mount path to the volume
        target, link = root / "volumes" / mount["volume"], Path(mount["path"])
        try:
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() and os.readlink(link) != str(target):
                link.unlink()
            if not link.is_symlink():
                link.symlink_to(target, target_is_directory=True)
        except OSError as exc:
            log.write(f"vessl: cannot mount volume {mount['volume']} at {link}: {exc}\n".encode())
            log.close()
            set_state(directory, workloadState="failed", finishedAt=now_iso(), exitCode=None)
            return
    env = {  # what a container starts with: the image's basics, then --env. Never our environment.
        "PATH": os.environ.get("FAKE_VESSL_IMAGE_PATH") or os.environ.get("PATH", os.defpath),
        "HOME": str(sandbox / "home"), "TMPDIR": str(sandbox / "tmp"), "LANG": "C.UTF-8",
        **job["env"],
    }
    proc = subprocess.Popen(["/bin/sh", "-c", job["cmd"]], cwd=sandbox / "home", env=env,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    set_state(directory, workloadState="running", startedAt=now_iso(), pgid=proc.pid)
    killed_at: float | None = None
    while proc.poll() is None:
        if terminate.exists():
            if killed_at is None:
                killed_at = time.time()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            elif time.time() - killed_at > KILL_GRACE_S:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):  # the container goes, and everything in it
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    if terminate.exists():
        set_state(directory, workloadState="terminated", finishedAt=now_iso(), exitCode=proc.returncode)
    else:
        final = "succeeded" if proc.returncode == 0 else "failed"
        set_state(directory, workloadState=final, finishedAt=now_iso(), exitCode=proc.returncode)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vesslctl", description="fanout's test stand-in for vesslctl")
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("whoami")
    job = commands.add_parser("job").add_subparsers(dest="job_command", required=True)
    create = job.add_parser("create")
    create.add_argument("-n", "--name", required=True)
    create.add_argument("-r", "--resource-spec", required=True)
    create.add_argument("-i", "--image", required=True)
    create.add_argument("--cmd", required=True)
    create.add_argument("--object-volume", action="append", default=[])
    create.add_argument("--env", action="append", default=[])
    create.add_argument("--tag", action="append", default=[])
    listing = job.add_parser("list")
    listing.add_argument("-o", "--output", choices=("json", "table"), default="table")
    show = job.add_parser("show")
    show.add_argument("slug")
    show.add_argument("-o", "--output", choices=("json", "table"), default="table")
    logs = job.add_parser("logs")
    logs.add_argument("slug")
    logs.add_argument("--limit", type=int, default=DEFAULT_LOG_LIMIT)
    logs.add_argument("--follow", "-f", action="store_true")
    terminate = job.add_parser("terminate")
    terminate.add_argument("slug")
    return top


def main(argv: list[str]) -> None:
    root = home()
    if argv[:1] == ["__run"]:  # internal: the per-job runner
        run_job(root, argv[1])
        return
    args = parser().parse_args(argv)
    number = count_call(root)
    flaky = flaky_call(number)
    creating = args.command == "job" and args.job_command == "create"
    # A flaky call fails before doing anything, except every other flaky create, which does its
    # work and then loses the response: the job exists although the caller saw an error.
    if flaky and not (creating and create_flakes(root) % 2 == 0):
        flake(root, " ".join(argv[:2]))
    if args.command == "whoami":
        cmd_whoami(root, args)
        return
    handlers = {"list": cmd_list, "show": cmd_show, "logs": cmd_logs, "terminate": cmd_terminate}
    if creating:
        cmd_create(root, args, number)
        if flaky:
            flake(root, "job create (after creating it)")
    else:
        handlers[args.job_command](root, args)


if __name__ == "__main__":
    main(sys.argv[1:])
