"""The job ledger: append-only JSONL, shared by processes, tolerant of a crash mid-write."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fanout_research.ledger import JobLedger
from fanout_research.models import CodeSource, JobResult, JobSpec, Metrics, Phase
from fanout_research.phases import Failure

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def spec(name: str, **changes: object) -> JobSpec:
    fields: dict[str, object] = {
        "name": name, "code": CodeSource(repo="/tmp/research", commit=COMMIT, branch="main"),
        "command": ("python", "train.py"), "env": {"SEED": "1"}, "time_limit_s": 60.0,
        "labels": {"study": "test"},
    }
    fields.update(changes)
    return JobSpec.model_validate(fields)


def result(name: str, slug: str, val_bpb: float = 0.99) -> JobResult:
    return JobResult(
        slug=slug, name=name, phase=Phase.SUCCEEDED, metrics=Metrics(val_bpb=val_bpb, num_steps=10),
        exit_code=0, log_tail="done",
        started_at=datetime(2025, 1, 1, 12, 0, tzinfo=UTC), ended_at=datetime(2025, 1, 1, 12, 5, tzinfo=UTC),
    )


@pytest.fixture
def ledger(tmp_path: Path) -> JobLedger:
    return JobLedger(tmp_path / "study" / "jobs.jsonl")


def test_empty_ledger(ledger: JobLedger):
    assert ledger.entries() == {}
    assert ledger.find("anything") is None
    assert not ledger.path.exists()


def test_records_survive_and_reread(ledger: JobLedger):
    first, second = spec("exp-one"), spec("exp-two", env={"SEED": "2"})
    ledger.record_submitted("slug-one", "local", {"slots": 4}, first)
    ledger.record_submitted("slug-two", "k8s", {"namespace": "ml"}, second)
    assert ledger.record_result(result("exp-one", "slug-one", 0.97))

    reread = JobLedger(ledger.path).entries()  # a different reader, as another process would be
    assert list(reread) == ["exp-one", "exp-two"]
    one, two = reread["exp-one"], reread["exp-two"]
    assert (one.slug, one.backend, one.backend_options) == ("slug-one", "local", {"slots": 4})
    assert (two.slug, two.backend, two.backend_options) == ("slug-two", "k8s", {"namespace": "ml"})
    assert (one.spec, two.spec) == (first, second)
    assert one.result == result("exp-one", "slug-one", 0.97)
    assert one.result is not None and one.result.metrics.val_bpb == 0.97
    assert two.result is None
    assert one.submitted_at  # an ISO timestamp
    datetime.fromisoformat(one.submitted_at)
    lines = ledger.path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["v"] == 1 for line in lines)


def test_submitting_a_name_twice_keeps_the_first(ledger: JobLedger):
    ledger.record_submitted("slug-a", "local", {}, spec("exp"))
    ledger.record_submitted("slug-b", "local", {}, spec("exp"))
    entries = ledger.entries()
    assert list(entries) == ["exp"] and entries["exp"].slug == "slug-a"
    assert len(ledger.path.read_text().splitlines()) == 1


def test_result_recorded_once(ledger: JobLedger):
    ledger.record_submitted("slug-a", "local", {}, spec("exp"))
    assert ledger.record_result(result("exp", "slug-a", 0.9)) is True
    assert ledger.record_result(result("exp", "slug-a", 0.5)) is False
    entry = ledger.entries()["exp"]
    assert entry.result is not None and entry.result.metrics.val_bpb == 0.9
    assert sum('"event":"result"' in line for line in ledger.path.read_text().splitlines()) == 1


def test_events_are_kept_and_results_of_unknown_jobs_ignored(ledger: JobLedger):
    ledger.record_submitted("slug-a", "local", {}, spec("exp"))
    ledger.record_event("exp", "cancel_requested", by="test")
    ledger.record_event("ghost", "cancel_requested")
    ledger.record_result(result("ghost", "slug-ghost"))
    entries = ledger.entries()
    assert list(entries) == ["exp"]
    assert entries["exp"].events == ["cancel_requested"]


def test_find_by_slug_and_by_name(ledger: JobLedger):
    ledger.record_submitted("k8s-x7f2", "k8s", {}, spec("exp-a"))
    ledger.record_submitted("k8s-q9z1", "k8s", {}, spec("exp-b", env={"SEED": "9"}))
    by_name, by_slug = ledger.find("exp-b"), ledger.find("k8s-q9z1")
    assert by_name is not None and by_slug is not None
    assert by_name.name == by_slug.name == "exp-b"
    assert by_name.slug == by_slug.slug == "k8s-q9z1"
    assert ledger.find("k8s-x7f2").name == "exp-a"  # type: ignore[union-attr]
    assert ledger.find("nope") is None


def test_torn_final_line_is_skipped_silently(ledger: JobLedger, capsys: pytest.CaptureFixture[str]):
    ledger.record_submitted("slug-a", "local", {}, spec("exp-a"))
    ledger.record_result(result("exp-a", "slug-a"))
    with open(ledger.path, "a") as handle:  # a writer that died in the middle of its line
        handle.write('{"v":1,"at":"2025-01-01T00:00:00+00:00","event":"submitted","name":"exp-b","sl')
    entries = ledger.entries()
    assert list(entries) == ["exp-a"]
    assert entries["exp-a"].result is not None
    assert capsys.readouterr().err == ""  # expected after a crash: no complaint


def test_a_bad_complete_line_is_skipped_with_a_warning(ledger: JobLedger, capsys: pytest.CaptureFixture[str]):
    ledger.record_submitted("slug-a", "local", {}, spec("exp-a"))
    with open(ledger.path, "a") as handle:
        handle.write("this is not json\n")
        handle.write('{"v":1,"event":"submitted","name":"exp-bad"}\n')  # a record missing fields
    ledger.record_submitted("slug-b", "local", {}, spec("exp-b", env={}))
    assert list(ledger.entries()) == ["exp-a", "exp-b"]
    err = capsys.readouterr().err
    assert "skipping bad line 2" in err
    assert "skipping bad record" in err


def test_a_record_appended_after_a_torn_line_is_not_lost(ledger: JobLedger):
    ledger.record_submitted("slug-a", "local", {}, spec("exp-a"))
    with open(ledger.path, "a") as handle:  # a writer crashed mid-line
        handle.write('{"v":1,"event":"submitted","name":"exp-x","sl')
    ledger.record_submitted("slug-b", "local", {}, spec("exp-b", env={}))  # the next writer
    assert list(ledger.entries()) == ["exp-a", "exp-b"]


APPENDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fanout_research.ledger import JobLedger
    from fanout_research.models import CodeSource, JobResult, JobSpec, Phase

    path, worker, count, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    ledger = JobLedger(path)
    Path(f"{go}.ready-{worker}").touch()
    while not go.exists():
        time.sleep(0.005)
    for i in range(count):
        spec = JobSpec(
            name=f"w{worker}-job-{i}", code=CodeSource(repo="/r", commit="COMMIT"),
            command=("python", "train.py"), env={"PAD": "x" * 300},
        )
        ledger.record_submitted(f"slug-{worker}-{i}", "local", {"worker": worker}, spec)
        # every worker races to record the same shared job and its result: one of each must win
        shared = JobSpec(name=f"shared-{i}", code=CodeSource(repo="/r", commit="COMMIT"), command=("x",))
        ledger.record_submitted(f"shared-slug-{i}", "local", {"worker": worker}, shared)
        ledger.record_result(JobResult(slug=f"shared-slug-{i}", name=f"shared-{i}", phase=Phase.LOST))
""").replace("COMMIT", COMMIT)


def test_concurrent_appenders_lose_nothing(ledger: JobLedger, tmp_path: Path):
    workers, count = 4, 50
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", APPENDER, str(ledger.path), str(w), str(count), str(go)],
                         stderr=subprocess.PIPE, text=True)
        for w in range(workers)
    ]
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"go.ready-{w}").exists() for w in range(workers)):
            assert time.monotonic() < deadline, "appenders did not start"
            assert all(p.poll() is None for p in procs), [p.communicate()[1] for p in procs]
            time.sleep(0.01)
        go.touch()  # all four start appending at the same moment
        errors = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * workers, errors
    assert errors == [""] * workers

    lines = ledger.path.read_text().splitlines(keepends=True)
    assert len(lines) == workers * count + 2 * count  # own records, plus one submit+result per shared
    assert all(line.endswith("\n") for line in lines)
    records = [json.loads(line) for line in lines]  # every line intact
    entries = ledger.entries()
    own = {n: e for n, e in entries.items() if not n.startswith("shared-")}
    assert len(own) == workers * count
    assert {(e.slug, e.backend_options["worker"]) for e in own.values()} == {
        (f"slug-{w}-{i}", w) for w in range(workers) for i in range(count)
    }
    shared = [e for n, e in entries.items() if n.startswith("shared-")]
    assert len(shared) == count
    assert all(e.result is not None and e.result.phase is Phase.LOST for e in shared)
    for i in range(count):
        assert sum(r["name"] == f"shared-{i}" for r in records) == 2, f"shared-{i} recorded twice"
    # each worker's own records stay in its order
    for w in range(workers):
        mine = [r["name"] for r in records if r["name"].startswith(f"w{w}-")]
        assert mine == [f"w{w}-job-{i}" for i in range(count)]


def test_failure_results_round_trip(ledger: JobLedger):
    ledger.record_submitted("slug-a", "local", {}, spec("exp"))
    failed = JobResult(slug="slug-a", name="exp", phase=Phase.FAILED, failure=Failure.OUT_OF_MEMORY,
                       exit_code=1, reason="out of memory (exit code 1)", log_tail="CUDA out of memory",
                       metrics=Metrics.lenient({"val_bpb": "bad", "extra": 1}))
    assert ledger.record_result(failed)
    entry = JobLedger(ledger.path).entries()["exp"]
    assert entry.result == failed
    assert entry.result is not None and not entry.result.succeeded
    assert entry.result.metrics.reported() == {"unparsed_val_bpb": "bad", "extra": 1}
