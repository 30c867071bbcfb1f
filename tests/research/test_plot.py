"""The progress plot: a real PNG from realistic records, crashes included, and a clear refusal
when there is nothing to draw."""

from __future__ import annotations

import importlib.util
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from fanout_research.research.plot import plot_progress
from fanout_research.research.records import CandidateRecord

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is the optional plot extra: pip install matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(round: int, candidate: int, status: str, val_bpb: float | None, description: str = "x"
           ) -> CandidateRecord:
    return CandidateRecord(study="demo", round=round, candidate=candidate, name=f"r{round}c{candidate}",
                           status=status, description=description, parent="0" * 40, val_bpb=val_bpb)


def study_records(rounds: int = 6, k: int = 4, seed: int = 0) -> list[CandidateRecord]:
    """A plausible study: a baseline, then rounds of K where at most the best improver is kept,
    with some crashes and a validation rejection."""
    rng = random.Random(seed)
    best = 1.20
    records = [record(0, 0, "baseline", best, "baseline")]
    for r in range(1, rounds + 1):
        results: list[tuple[int, float | None]] = []
        for c in range(1, k + 1):
            roll = rng.random()
            results.append((c, None if roll < 0.12 else best + rng.gauss(0.01, 0.02)))
        improvers = [(v, c) for c, v in results if v is not None and v < best]
        kept = min(improvers)[1] if improvers else None
        for c, v in results:
            status = "crash" if v is None else ("keep" if c == kept else "discard")
            records.append(record(r, c, status, v, f"DEPTH {8 + c} -> {8 - c}, MATRIX_LR 0.04 -> 0.05"))
        if kept is not None:
            best = min(improvers)[0]
        if r == 2:
            records.append(record(r, k + 1, "reject", None, "edits PROFILES"))
    return records


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@needs_matplotlib
def test_writes_a_png_of_a_study(tmp_path: Path) -> None:
    records = study_records()
    assert {r.status for r in records} == {"baseline", "keep", "discard", "crash", "reject"}
    out = plot_progress(records, tmp_path / "plots" / "progress.png")
    assert out == tmp_path / "plots" / "progress.png"
    width, height = png_size(out)
    assert width > 800 and height > 400
    assert out.stat().st_size > 20_000  # a drawn chart, not an empty canvas


@needs_matplotlib
def test_more_experiments_draw_more(tmp_path: Path) -> None:
    """Points and labels really reach the image: a longer study gives a busier (bigger) PNG."""
    short = plot_progress(study_records(rounds=1, k=2), tmp_path / "short.png").stat().st_size
    long = plot_progress(study_records(rounds=12, k=6), tmp_path / "long.png").stat().st_size
    assert long > short * 1.2


@needs_matplotlib
def test_handles_crashes_and_a_crashed_baseline(tmp_path: Path) -> None:
    records = [
        record(0, 0, "baseline", None, "baseline crashed"),
        record(1, 1, "crash", None),
        record(1, 2, "keep", 1.1, "DEPTH 8 -> 6"),
        record(1, 3, "crash", None),
        record(2, 1, "discard", 1.15),
    ]
    out = plot_progress(records, tmp_path / "p.png", title="my study")
    png_size(out)
    only_one = plot_progress([record(0, 0, "baseline", 1.2)], tmp_path / "one.png")
    png_size(only_one)


def test_refuses_when_nothing_has_a_val_bpb(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_progress([], tmp_path / "empty.png")
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_progress([record(0, 0, "baseline", None), record(1, 1, "crash", None),
                       record(1, 2, "reject", None)], tmp_path / "crashes.png")
    assert not (tmp_path / "empty.png").exists()


def test_the_module_imports_without_importing_matplotlib() -> None:
    code = ("import sys, fanout_research.research.plot, fanout_research.research.knobs; "
            "assert 'matplotlib' not in sys.modules, 'imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)
