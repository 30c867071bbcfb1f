"""``fanout demo`` end to end with the real torch template: scaffold, prepare, one round, plot.

The smallest demo that still exercises everything (K=2, 2 training seconds per job, CPU profile);
about 25 s on two cores, most of it torch start-up and training.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from loop_helpers import FANOUT, cli_env

SUMMARY = re.compile(
    r"^wall (\d+)s \| baseline val_bpb (\d+\.\d+) \| best (\d+\.\d+) \(([+-]\d+\.\d)%\) \| "
    r"3 experiments, \d+/hour \| plot (\S+) \| results (\S+)$", re.MULTILINE)


@pytest.mark.slow
def test_demo_runs_one_round_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    done = subprocess.run([FANOUT, "demo", "--dir", str(root), "--rounds", "1", "--k", "2",
                           "--budget", "2"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert "Traceback" not in done.stderr

    match = SUMMARY.search(done.stdout)
    assert match, done.stdout
    baseline, best = float(match.group(2)), float(match.group(3))
    assert 0 < best <= baseline
    assert match.group(4) == f"{(best - baseline) / baseline * 100:+.1f}"
    plot, tsv = Path(match.group(5)), Path(match.group(6))
    assert plot == root / "progress.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tsv == root / "repo" / ".git" / "fanout" / "studies" / "demo" / "results.tsv"

    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t") == ["commit", "val_bpb", "memory_gb", "status", "description", "round",
                                    "candidate"]
    rows = [dict(zip(lines[0].split("\t"), line.split("\t"), strict=True)) for line in lines[1:]]
    assert len(rows) == 3
    assert [(r["round"], r["candidate"]) for r in rows] == [("0", "0"), ("1", "1"), ("1", "2")]
    assert rows[0]["status"] == "baseline" and float(rows[0]["val_bpb"]) == pytest.approx(baseline, abs=1e-6)
    assert {r["status"] for r in rows[1:]} <= {"keep", "discard"}, rows  # both trained and reported
    kept = [r for r in rows if r["status"] == "keep"]
    assert float(min(kept or rows[:1], key=lambda r: float(r["val_bpb"]))["val_bpb"]) == pytest.approx(best)

    repo = root / "repo"
    research = subprocess.run(["git", "-C", str(repo), "rev-parse", "research"], capture_output=True,
                              text=True, check=True).stdout.strip()
    expected = kept[0]["commit"] if kept else rows[0]["commit"]
    assert research.startswith(expected)
    assert (root / "data" / "manifest.json").exists()
