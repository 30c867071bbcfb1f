"""Fan-out speedup and orchestration overhead of the local backend.

For each K, one round of K jobs of a fixed duration runs twice, side by side in this one process:
with K slots (fanned out) and with 1 slot (one after another, the sequential autoresearch loop).
A round is timed the way a study sees it: from the first submit until ``JobClient.wait`` has every
result in the ledger.

    speedup  = wall(1 slot) / wall(K slots)            target: >= 0.97 * K
    overhead = wall(K slots) - longest job's run time   target: < 0.5 s per round

Run:  python bench/bench_fanout.py [--duration 15] [--ks 1,4,16] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fanout_research.backends.local import LocalBackend
from fanout_research.jobs import JobClient
from fanout_research.models import CodeSource, JobSpec
from fanout_research.study import StudyDir
from fanout_research.testing.repo import make_research_repo


@dataclass
class Round:
    k: int
    slots: int
    wall_s: float
    submit_s: float
    longest_job_s: float
    total_job_s: float
    overhead_s: float
    all_succeeded: bool


def run_round(repo: Path, commit: str, k: int, slots: int, duration: float, tag: str) -> Round:
    study = StudyDir.for_repo(repo, tag)
    backend = LocalBackend(study, slots=slots, gpus=[], slots_dir=str(study.root / "slots"))
    client = JobClient(study)
    client.adopt(backend)
    specs = [
        JobSpec(
            name=f"{tag}-job-{i}", code=CodeSource(repo=str(repo), commit=commit),
            command=(sys.executable, "job.py"),
            env={"FANOUT_TEST_MODE": "ok", "FANOUT_TEST_SLEEP": f"{duration:g}"},
            time_limit_s=duration * k + 60,
        )
        for i in range(k)
    ]
    start = time.perf_counter()
    slugs = client.submit_many(backend, specs)
    submitted = time.perf_counter()
    outcome = client.wait(slugs)
    wall = time.perf_counter() - start
    runs = [r.run_seconds or 0.0 for r in outcome.results.values()]
    longest, total = max(runs), sum(runs)
    # With one slot the jobs are serial, so the honest "work" is their sum, not the longest.
    busy = longest if slots >= k else total
    return Round(k=k, slots=slots, wall_s=wall, submit_s=submitted - start, longest_job_s=longest,
                 total_job_s=total, overhead_s=wall - busy, all_succeeded=outcome.all_succeeded)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds each job runs")
    parser.add_argument("--ks", default="1,4,16", help="comma-separated round sizes")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--json", type=Path, help="also write raw figures here")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]

    rows = []
    with tempfile.TemporaryDirectory(prefix="fanout-bench-") as tmp:
        repo, commit = make_research_repo(Path(tmp) / "repo")
        for k in ks:
            fanned = run_round(repo, commit, k, slots=k, duration=args.duration, tag=f"k{k}-fan")
            serial = run_round(repo, commit, k, slots=1, duration=args.duration, tag=f"k{k}-one")
            rows.append({"fanned": asdict(fanned), "serial": asdict(serial),
                         "speedup": serial.wall_s / fanned.wall_s})
            print(f"K={k:<3} fanned {fanned.wall_s:7.2f}s (overhead {fanned.overhead_s:.3f}s) | "
                  f"1 slot {serial.wall_s:7.2f}s | speedup {serial.wall_s / fanned.wall_s:6.2f} "
                  f"(target {0.97 * k:.2f})", file=sys.stderr, flush=True)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if args.markdown:
        print(f"Job duration {args.duration:g} s; {machine}.\n")
        print("| K | wall, K slots (s) | wall, 1 slot (s) | speedup | target 0.97·K "
              "| overhead per round (s) | submit K jobs (s) | serial hand-off per job (s) |")
        print("|---|---|---|---|---|---|---|---|")
        for row in rows:
            fan, one, k = row["fanned"], row["serial"], row["fanned"]["k"]
            print(f"| {k} | {fan['wall_s']:.2f} | {one['wall_s']:.2f} | {row['speedup']:.2f} "
                  f"| {0.97 * k:.2f} | {fan['overhead_s']:.3f} | {fan['submit_s']:.3f} "
                  f"| {one['overhead_s'] / k:.3f} |")
    ok = all(r["speedup"] >= 0.97 * r["fanned"]["k"] and r["fanned"]["overhead_s"] < 0.5
             and r["fanned"]["all_succeeded"] and r["serial"]["all_succeeded"] for r in rows)
    summary = {"duration_s": args.duration, "machine": machine, "rounds": rows, "targets_met": ok,
               "mean_overhead_s": statistics.mean(r["fanned"]["overhead_s"] for r in rows)}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(f"targets met: {ok}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
