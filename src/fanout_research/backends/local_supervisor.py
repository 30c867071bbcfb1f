"""The supervisor of one local job: ``python -m fanout_research.backends.local_supervisor JOB_DIR``.

LocalBackend.submit starts one of these, detached in its own session, and returns at once. The
supervisor checks the candidate commit out into its own worktree, waits its turn for a slot, runs
the command in a new process group, enforces the time limit, and records the outcome in
``state.json``. It outlives the process that submitted the job, which is what makes ``fanout
submit`` in one shell and ``fanout wait`` in another work.

Guarantees it keeps:
- Nothing the job started outlives the job. The supervisor is a child subreaper (Linux), so even
  processes that leave the job's process group come back to it, and are killed, at the end.
- If the supervisor itself is killed, its job dies with it (PR_SET_PDEATHSIG) and the next status
  poll reports the job ``lost`` and kills what is left of its process group.

Stdlib only, and few imports: it starts once per job, so its start-up time is overhead.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fanout_research.backends.local_files import (
    CANCEL_MARK,
    LAUNCH,
    STATE,
    SUPERVISOR_LOCK,
    identity,
    is_alive,
    kill_job_group,
    now,
    read_json,
    write_json_atomic,
)
from fanout_research.metrics import classify_exit, parse_metrics, read_tail
from fanout_research.phases import Failure, Phase

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
SLOT_POLL_S = 0.02
LIVENESS_EVERY = 50  # slot polls between checks that the waiters ahead of us are still alive
STALE_ENTRY_S = 30.0  # a queued job whose supervisor has not started by then never will


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class SetupError(Exception):
    pass


class Supervisor:
    def __init__(self, job_dir: Path) -> None:
        self.dir = job_dir
        launch = read_json(job_dir / LAUNCH)
        if launch is None:
            raise SetupError(f"{job_dir / LAUNCH} is missing")
        self.launch: dict[str, Any] = launch
        self.state: dict[str, Any] = read_json(job_dir / STATE) or {}
        self.cancelled = False
        self.outcome: dict[str, Any] | None = None
        self._wake_r, wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_cancel)

    # -- state ---------------------------------------------------------------------------------
    def _on_cancel(self, _signum: int, _frame: object) -> None:
        self.cancelled = True

    def write(self, **changes: Any) -> None:
        self.state.update(changes)
        write_json_atomic(self.dir / STATE, self.state)

    def note(self, message: str) -> None:
        """A line in the job's own log, so that its tail explains what happened to it."""
        with open(self.launch["log"], "a") as log:
            log.write(f"[fanout] {message}\n")

    def finish(self, phase: Phase, failure: Failure | None, reason: str, **extra: Any) -> None:
        """Decide the outcome. ``publish`` writes it once the job is cleaned up, so that a final
        state always means: nothing left running, slot free, worktree gone."""
        self.outcome = dict(
            phase=str(phase), failure=str(failure) if failure else None, reason=reason,
            raw=reason or str(phase), ended_at=extra.pop("ended_at", None) or now(), **extra,
        )

    def publish(self) -> None:
        if self.outcome is not None:
            self.write(**self.outcome)

    def wait_wakeup(self, timeout: float, *fds: int) -> None:
        """Sleep until a signal arrives, one of ``fds`` is readable, or ``timeout`` passes."""
        with contextlib.suppress(InterruptedError):
            select.select([self._wake_r, *fds], [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    # -- the job's life ------------------------------------------------------------------------
    def run(self) -> None:
        prior = self.state.get("phase")
        if prior and Phase(prior).final:
            return
        if prior == Phase.RUNNING:  # a predecessor died while the job ran: it is gone
            kill_job_group(self.state.get("job"))
            self.finish(Phase.LOST, Failure.LOST, "lost: its supervisor died while it ran")
            self.publish()
            return
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        self.write(
            phase=str(Phase.PENDING), raw="preparing worktree",
            supervisor=identity(os.getpid()), queued_at=self.state.get("queued_at") or now(),
        )
        if (self.dir / CANCEL_MARK).exists():
            self.cancelled = True
        slot_fd = None
        try:
            self.checkout()
            slot = self.acquire_slot()
            if slot is None:
                self.note("cancelled while queued")
                self.finish(Phase.CANCELLED, Failure.CANCELLED, "cancelled while queued")
                return
            index, slot_fd = slot
            self.run_job(index)
        except SetupError as exc:
            self.finish(Phase.FAILED, Failure.SETUP, str(exc))
        finally:
            if slot_fd is not None:
                os.close(slot_fd)  # frees the slot for the next queued job
            self.remove_worktree()
            self.publish()

    def git(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", self.launch["repo"], "-c", "core.hooksPath=/dev/null", *args],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )

    def checkout(self) -> None:
        """Fill the job's worktree with its commit. The submitter normally registered the worktree
        already (see LocalBackend.submit_many); a relaunched supervisor registers it itself."""
        worktree = Path(self.launch["worktree"])
        if not (worktree / ".git").exists():
            try:
                register_worktree(self.launch)
            except OSError as exc:
                raise SetupError(f"checkout failed: cannot register the worktree: {exc}") from None
        done = subprocess.run(
            ["git", "-C", str(worktree), "-c", "core.hooksPath=/dev/null", "reset", "--hard", "-q"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise SetupError(f"checkout failed: {_last_line(done.stderr, 'git reset failed')}")
        # Keep the commit reachable after the worktree is gone: results must stay reproducible.
        self.git("update-ref", self.launch["ref"], self.launch["commit"])

    def remove_worktree(self) -> None:
        if not self.launch.get("keep_worktree"):
            unregister_worktree(self.launch)

    def acquire_slot(self) -> tuple[int, int] | None:
        """Wait, first come first served, for one of the machine's slots; None if cancelled.

        A slot is an flock on ``slot-<i>.lock``: the kernel frees it if we die, so a crashed
        supervisor can never leak one. The submitter queued the job as a file named by its submit
        time; only the first ``n`` waiters try the locks, which keeps the order fair.
        """
        slots_dir = Path(self.launch["slots_dir"])
        me = Path(self.launch["queue_entry"])
        if not me.exists():  # a resubmit relaunched us after the entry was cleaned up
            me.parent.mkdir(parents=True, exist_ok=True)
            me.write_text(str(self.dir))
        count = int(self.launch["slots"])
        fds = [os.open(slots_dir / f"slot-{i}.lock", os.O_CREAT | os.O_RDWR, 0o644) for i in range(count)]
        self.write(raw="queued for a slot")
        try:
            for attempt in range(sys.maxsize):
                if self.cancelled:
                    return None
                if _my_turn(me, count, check_stale=attempt % LIVENESS_EVERY == LIVENESS_EVERY - 1):
                    for index, fd in enumerate(fds):
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        except BlockingIOError:
                            continue
                        fds.remove(fd)
                        return index, fd
                self.wait_wakeup(SLOT_POLL_S)
            return None
        finally:
            for fd in fds:
                os.close(fd)
            me.unlink(missing_ok=True)

    def child_env(self, slot: int) -> dict[str, str]:
        env = dict(self.launch["env"])
        env["FANOUT_SLOT"] = str(slot)
        devices = self.launch.get("slot_devices") or []
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
        threads = self.launch.get("threads_per_slot")
        if threads:
            for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env.setdefault(name, str(threads))
        return env

    def run_job(self, slot: int) -> None:
        parent = os.getpid()

        def die_with_parent() -> None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)

        started = now()
        try:
            with open(self.launch["log"], "ab") as log:
                proc = subprocess.Popen(
                    self.launch["argv"], cwd=self.launch["worktree"], env=self.child_env(slot),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, preexec_fn=die_with_parent,
                )
        except OSError as exc:
            reason = f"cannot start {self.launch['argv'][0]!r}: {exc.strerror or exc}"
            self.note(reason)
            self.finish(Phase.FAILED, Failure.NOT_FOUND, reason, started_at=started, slot=slot)
            return
        self.write(
            phase=str(Phase.RUNNING), raw=f"running on slot {slot}", slot=slot,
            started_at=started, job=identity(proc.pid),
        )
        outcome = self.watch(proc, deadline=started + float(self.launch["time_limit_s"]))
        ended = now()
        kill_job_group({"pid": proc.pid})
        self.reap_descendants()
        self.record(outcome, proc.returncode, started, ended)

    def watch(self, proc: subprocess.Popen[bytes], deadline: float) -> str | None:
        """Wait for the job to end by itself (None), or stop it: "cancelled" / "timed_out"."""
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pidfd = None
        try:
            outcome = None
            while proc.poll() is None:
                if self.cancelled:
                    outcome = "cancelled"
                elif now() >= deadline:
                    outcome = "timed_out"
                if outcome:
                    self.stop(proc, pidfd)
                    break
                step = deadline - now() if pidfd is not None else 0.05
                self.wait_wakeup(min(step, 5.0), *([pidfd] if pidfd is not None else []))
            return outcome
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def stop(self, proc: subprocess.Popen[bytes], pidfd: int | None) -> None:
        """SIGTERM to the whole group, a grace period to save state, then SIGKILL."""
        kill_job_group({"pid": proc.pid}, signal.SIGTERM)
        grace_end = now() + float(self.launch.get("kill_grace_s", 5.0))
        while proc.poll() is None and now() < grace_end:
            self.wait_wakeup(min(grace_end - now(), 0.05), *([pidfd] if pidfd is not None else []))
        kill_job_group({"pid": proc.pid})
        proc.wait()

    def reap_descendants(self) -> None:
        """Kill and reap whatever the job left behind, including processes that escaped its group."""
        me = os.getpid()
        for _ in range(200):
            children = _children_of(me)
            if not children:
                break
            for pid in children:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if os.getpgid(pid) != os.getpgid(me):
                        os.killpg(os.getpgid(pid), signal.SIGKILL)
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass

    def record(self, outcome: str | None, exit_code: int | None, started: float, ended: float) -> None:
        tail = read_tail(Path(self.launch["log"]))
        metrics = parse_metrics(tail)
        timing = {"started_at": started, "ended_at": ended, "exit_code": exit_code, "metrics": metrics}
        if outcome == "timed_out":
            limit = float(self.launch["time_limit_s"])
            reason = f"timed out: exceeded its time limit of {limit:g}s"
            self.note(reason + "; its process group was killed")
            self.finish(Phase.TIMED_OUT, Failure.TIMED_OUT, reason, **timing)
        elif outcome == "cancelled":
            self.note("cancelled; its process group was killed")
            self.finish(Phase.CANCELLED, Failure.CANCELLED, "cancelled", **timing)
        else:
            phase, failure, reason = classify_exit(
                exit_code, metrics, tail, self.launch.get("requires_metric", True)
            )
            self.finish(phase, failure, reason, **timing)


@contextlib.contextmanager
def worktree_lock(launch: dict[str, Any]) -> Iterator[None]:
    """Git's worktree commands are not safe to run at once: `worktree add` reads every other
    worktree's admin files and fails on one that a concurrent add has half written (and `prune`
    deletes it). They take milliseconds, so the jobs of one repository take turns."""
    fd = os.open(launch["worktree_lock"], os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def register_worktree(launch: dict[str, Any]) -> None:
    """Register the job's worktree at its commit, without checking any file out.

    Written by hand in git's documented layout (gitrepository-layout(5): ``worktrees/<id>/`` with
    ``HEAD``, ``commondir`` and ``gitdir``, and a ``.git`` file in the checkout pointing back),
    because ``git worktree add`` costs a process per job on the critical path of a round (~9 ms
    at K=16 on two cores) and cannot run concurrently. The admin directory is built aside and
    renamed into place, so a concurrent git command sees it whole or not at all.
    ``git reset --hard`` in the worktree then fills it, in parallel with the other jobs'.
    """
    worktree = Path(launch["worktree"])
    admin_root = Path(launch["git_dir"]) / "worktrees"
    with worktree_lock(launch):
        if worktree.exists():  # left by a supervisor that died while preparing
            _remove_worktree(worktree)
        admin_root.mkdir(exist_ok=True)
        name, n = worktree.name, 0
        while (admin_root / name).exists():  # the same name from another study: git's rule
            n += 1
            name = f"{worktree.name}{n}"
        staging = Path(launch["git_dir"]) / "fanout" / f".worktree-{os.getpid()}-{name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging / "HEAD").write_text(launch["commit"] + "\n")
        (staging / "commondir").write_text("../..\n")
        (staging / "gitdir").write_text(f"{worktree / '.git'}\n")
        worktree.mkdir(parents=True, exist_ok=True)
        (worktree / ".git").write_text(f"gitdir: {admin_root / name}\n")
        os.rename(staging, admin_root / name)


def unregister_worktree(launch: dict[str, Any]) -> None:
    """What ``git worktree remove --force`` does, without a git process per job. Under the lock,
    since a concurrent ``git worktree add`` reads every admin directory."""
    with worktree_lock(launch):
        _remove_worktree(Path(launch["worktree"]))


def _remove_worktree(worktree: Path) -> None:
    """Delete the checkout and the admin directory its ``.git`` file names (and nothing else)."""
    try:
        pointer = (worktree / ".git").read_text().strip()
    except OSError:
        pointer = ""
    admin = Path(pointer.removeprefix("gitdir:").strip()) if pointer.startswith("gitdir:") else None
    shutil.rmtree(worktree, ignore_errors=True)
    if admin is not None and admin.parent.name == "worktrees":
        shutil.rmtree(admin, ignore_errors=True)


def _last_line(text: str, default: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else default


def _my_turn(me: Path, count: int, check_stale: bool) -> bool:
    ahead = sorted(name for name in os.listdir(me.parent) if name < me.name)
    if len(ahead) < count:
        return True
    if check_stale:  # forget entries of jobs that will never claim a slot
        for name in ahead:
            with contextlib.suppress(OSError):
                if _stale((me.parent / name).read_text().strip()):
                    (me.parent / name).unlink(missing_ok=True)
    return False


def _stale(job_dir: str) -> bool:
    """True for a queue entry whose job ended, or whose supervisor died or never started."""
    state = read_json(Path(job_dir) / STATE)
    if state is None:
        launch = read_json(Path(job_dir) / LAUNCH)
        return launch is None or now() - float(launch["submitted_at"]) > STALE_ENTRY_S
    return Phase(state["phase"]).final or not is_alive(state.get("supervisor"))


def _children_of(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found.extend(int(child) for child in handle.read().split())
        return found
    except OSError:
        pass
    with contextlib.suppress(OSError):  # kernels without CONFIG_PROC_CHILDREN
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as handle:
                    stat = handle.read()
                    if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
                        found.append(int(entry))
    return found


def supervise(job_dir: Path) -> int:
    lock_fd = os.open(job_dir / SUPERVISOR_LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another supervisor already owns this job
    supervisor = None
    try:
        supervisor = Supervisor(job_dir)
        supervisor.run()
    except Exception as exc:
        import traceback

        traceback.print_exc()
        if supervisor is not None:
            kill_job_group(supervisor.state.get("job"))
            supervisor.finish(Phase.LOST, Failure.LOST, f"lost: supervisor error: {exc}")
            supervisor.publish()
        return 1
    return 0


def main(argv: list[str]) -> int:
    """One job: supervise it here. Several (a round): fork a supervisor for each and leave, so
    that K jobs share one interpreter start-up; each child is a job's own, independent supervisor.
    """
    job_dirs = [Path(arg) for arg in argv[1:]]
    if len(job_dirs) == 1:
        return supervise(job_dirs[0])
    for job_dir in job_dirs:
        if os.fork() == 0:
            os.setsid()
            code = 1
            try:
                code = supervise(job_dir)
            finally:
                os._exit(code)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
