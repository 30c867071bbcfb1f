"""The backend conformance suite: what every Backend must do, checked through the real engine.

Use it from a test module of your backend::

    from fanout_research.testing.conformance import BackendConformance, Harness

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def harness(self, tmp_path) -> Harness:
            repo, commit = make_research_repo(tmp_path / "repo")
            return Harness(backend=MyBackend(...), repo=repo, commit=commit)

A backend is done when this suite passes unchanged. The tests talk to the backend only through the
five calls of the seam (plus its declared errors), so they hold for any engine; durations are
multiplied by ``Harness.time_scale`` for engines that schedule slowly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fanout_research.backends.base import Backend
from fanout_research.errors import JobSpecError, UnknownJobError
from fanout_research.models import CodeSource, JobResult, JobSpec, JobState, Phase
from fanout_research.phases import Failure
from fanout_research.testing.repo import commit_files

SECRET_NAME = "FANOUT_CONFORMANCE_SECRET"


@dataclass
class Harness:
    backend: Backend
    repo: Path
    commit: str
    python: str = "python3"
    time_scale: float = 1.0
    poll_s: float = 0.05
    names: Iterator[int] = field(default_factory=lambda: iter(range(10_000)))

    def spec(self, mode: str, *, sleep: float = 0.0, commit: str | None = None,
             time_limit: float = 60.0, **overrides: object) -> JobSpec:
        env = {"FANOUT_TEST_MODE": mode, "FANOUT_TEST_SLEEP": f"{sleep * self.time_scale:g}"}
        env.update(overrides.pop("env", {}))  # type: ignore[arg-type]
        fields: dict[str, object] = {
            "name": f"conf-{mode}-{os.getpid()}-{next(self.names)}",
            "code": CodeSource(repo=str(self.repo), commit=commit or self.commit),
            "command": (self.python, "job.py"),
            "env": env,
            "time_limit_s": time_limit * self.time_scale,
            "labels": {"suite": "conformance"},
        }
        fields.update(overrides)
        return JobSpec.model_validate(fields)

    def wait(self, slugs: Sequence[str], timeout: float = 60.0) -> dict[str, JobResult]:
        deadline = time.monotonic() + timeout * self.time_scale
        pending = list(slugs)
        while pending:
            states = self.backend.status(pending)
            pending = [s for s in pending if not states[s].phase.final]
            if not pending:
                break
            assert time.monotonic() < deadline, f"jobs never finished: {states}"
            time.sleep(self.poll_s)
        return {slug: self.backend.result(slug) for slug in slugs}

    def wait_for_phase(self, slug: str, phase: Phase, timeout: float = 30.0) -> JobState:
        deadline = time.monotonic() + timeout * self.time_scale
        while True:
            state = self.backend.status([slug])[slug]
            if state.phase is phase or state.phase.final:
                return state
            assert time.monotonic() < deadline, f"{slug} never reached {phase}: {state}"
            time.sleep(self.poll_s)


class BackendConformance:
    """Subclass and provide a ``harness`` fixture. Every test is independent."""

    def test_submit_returns_before_the_job_ends_and_the_job_succeeds(self, harness: Harness) -> None:
        slug = harness.backend.submit(harness.spec("ok", sleep=2.0))
        assert not harness.backend.status([slug])[slug].phase.final, "submit must not block"
        result = harness.wait([slug])[slug]
        assert result.phase is Phase.SUCCEEDED, result
        assert result.metrics.val_bpb == pytest.approx(1.234567)
        assert result.metrics.num_steps == 42 and isinstance(result.metrics.num_steps, int)
        assert result.metrics.training_seconds == pytest.approx(1.5)
        assert result.exit_code == 0 and result.failure is None
        assert result.started_at is not None and result.ended_at is not None
        assert result.ended_at >= result.started_at

    def test_result_line_wins_over_summary_block(self, harness: Harness) -> None:
        slug = harness.backend.submit(harness.spec("json"))
        result = harness.wait([slug])[slug]
        assert result.phase is Phase.SUCCEEDED
        assert result.metrics.val_bpb == pytest.approx(1.5)  # JSON beat the block's 2.0
        assert result.metrics.training_seconds == pytest.approx(1.5)  # the block fills gaps
        assert result.metrics.model_extra == {"profile": "conformance"}

    def test_status_is_batched_and_rejects_unknown_slugs(self, harness: Harness) -> None:
        slugs = [harness.backend.submit(harness.spec("ok", sleep=0.5)) for _ in range(3)]
        assert len(set(slugs)) == 3
        states = harness.backend.status(slugs)
        assert set(states) == set(slugs)
        assert all(isinstance(s, JobState) for s in states.values())
        with pytest.raises(UnknownJobError) as caught:
            harness.backend.status([slugs[0], "no-such-job-anywhere"])
        assert caught.value.slugs == ["no-such-job-anywhere"]
        harness.wait(slugs)

    def test_crash_is_a_failure_with_its_log_tail(self, harness: Harness) -> None:
        slug = harness.backend.submit(harness.spec("crash"))
        result = harness.wait([slug])[slug]
        assert result.phase is Phase.FAILED
        assert result.failure is Failure.CRASH
        assert result.exit_code == 3
        assert "boom: deliberate crash" in result.log_tail
        assert result.metrics.val_bpb is None

    def test_exit_zero_without_metric_is_a_failure(self, harness: Harness) -> None:
        slug = harness.backend.submit(harness.spec("nometric"))
        result = harness.wait([slug])[slug]
        assert result.phase is Phase.FAILED
        assert result.failure is Failure.NO_METRIC
        assert "no metric" in result.reason
        assert "finished without reporting" in result.log_tail

    def test_a_job_that_needs_no_metric_succeeds_on_exit_zero(self, harness: Harness) -> None:
        slug = harness.backend.submit(harness.spec("nometric", requires_metric=False))
        result = harness.wait([slug])[slug]
        assert result.phase is Phase.SUCCEEDED, result
        assert result.metrics.val_bpb is None

    def test_time_limit_stops_a_hanging_job(self, harness: Harness) -> None:
        slug = harness.backend.submit(harness.spec("hang", time_limit=1.5))
        result = harness.wait([slug], timeout=45)[slug]
        assert result.phase is Phase.TIMED_OUT
        assert result.failure is Failure.TIMED_OUT
        assert "job-start" in result.log_tail

    def test_logs_whole_and_tail(self, harness: Harness) -> None:
        slug = harness.backend.submit(harness.spec("ok"))
        harness.wait([slug])
        whole = harness.backend.logs(slug)
        assert whole.splitlines()[0].startswith("job-start")
        assert "val_bpb:" in whole
        assert harness.backend.logs(slug, tail=1).strip() == whole.strip().splitlines()[-1].strip()

    def test_cancel_stops_a_running_job(self, harness: Harness) -> None:
        slug = harness.backend.submit(harness.spec("hang", time_limit=120))
        harness.wait_for_phase(slug, Phase.RUNNING)
        harness.backend.cancel(slug)
        result = harness.wait([slug], timeout=30)[slug]
        assert result.phase is Phase.CANCELLED
        assert result.failure is Failure.CANCELLED

    def test_cancel_of_a_finished_job_changes_nothing(self, harness: Harness) -> None:
        slug = harness.backend.submit(harness.spec("ok"))
        before = harness.wait([slug])[slug]
        harness.backend.cancel(slug)
        after = harness.backend.result(slug)
        assert after.phase is Phase.SUCCEEDED
        assert after.metrics == before.metrics

    def test_resubmitting_the_same_spec_is_the_same_job(self, harness: Harness) -> None:
        spec = harness.spec("ok", sleep=0.5)
        first = harness.backend.submit(spec)
        again = harness.backend.submit(spec)
        assert again == first
        harness.wait([first])
        assert harness.backend.submit(spec) == first  # also once it has finished
        # Labels and the branch name describe a job; they don't make it another one.
        relabelled = spec.model_copy(update={
            "labels": {"note": "resubmitted"},
            "code": spec.code.model_copy(update={"branch": "some-other-checkout"}),
        })
        assert harness.backend.submit(relabelled) == first
        assert harness.backend.logs(first).count("job-start") == 1, "the job ran more than once"
        clash = spec.model_copy(update={"env": {**spec.env, "FANOUT_TEST_SLEEP": "9"}})
        with pytest.raises(JobSpecError):
            harness.backend.submit(clash)

    def test_job_gets_the_protocol_env_and_none_of_our_secrets(
        self, harness: Harness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv(SECRET_NAME, "sk-do-not-leak-0123456789")
        spec = harness.spec("env", time_budget_s=12.5, env={"FANOUT_TEST_EXTRA": "hello"})
        slug = harness.backend.submit(spec)
        result = harness.wait([slug])[slug]
        log = harness.backend.logs(slug)
        assert result.phase is Phase.SUCCEEDED, log
        assert f"env FANOUT_JOB_NAME={spec.name}" in log
        assert "env FANOUT_TIME_BUDGET_S=12.5" in log
        assert "env FANOUT_TEST_EXTRA=hello" in log
        assert "secret-hidden" in log
        assert "sk-do-not-leak" not in log

    def test_each_job_runs_its_own_commit(self, harness: Harness) -> None:
        second = commit_files(harness.repo, {"marker.txt": "second\n"}, "second marker")
        slugs = [
            harness.backend.submit(harness.spec("marker", commit=harness.commit)),
            harness.backend.submit(harness.spec("marker", commit=second)),
        ]
        harness.wait(slugs)
        assert "marker=first" in harness.backend.logs(slugs[0])
        assert "marker=second" in harness.backend.logs(slugs[1])

    def test_unknown_slug_is_refused_by_every_call(self, harness: Harness) -> None:
        for call in (harness.backend.result, harness.backend.logs, harness.backend.cancel):
            with pytest.raises(UnknownJobError):
                call("no-such-job-anywhere")

    def test_command_that_does_not_exist_never_succeeds(self, harness: Harness) -> None:
        spec = harness.spec("ok", command=("fanout-no-such-program-xyz", "job.py"))
        try:
            slug = harness.backend.submit(spec)
        except JobSpecError as refused:  # refusing up front is the better answer
            assert "fanout-no-such-program-xyz" in str(refused)
            return
        result = harness.wait([slug])[slug]
        assert result.phase is Phase.FAILED
        assert result.failure in (Failure.NOT_FOUND, Failure.CRASH)
