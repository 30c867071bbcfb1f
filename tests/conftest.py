"""Fixtures shared by the test suite: real git repos, an isolated study and slot directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from fanout_research.backends.local import LocalBackend
from fanout_research.study import StudyDir
from fanout_research.testing.repo import make_research_repo


@pytest.fixture(autouse=True)
def isolated_slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Slots are machine-wide by design; tests must not queue behind each other's (or yours)."""
    slots = tmp_path / "slots"
    monkeypatch.setenv("FANOUT_SLOTS_DIR", str(slots))
    monkeypatch.delenv("FANOUT_STUDY_DIR", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return slots


@pytest.fixture
def research_repo(tmp_path: Path) -> tuple[Path, str]:
    return make_research_repo(tmp_path / "repo")


@pytest.fixture
def study(research_repo: tuple[Path, str]) -> StudyDir:
    return StudyDir.for_repo(research_repo[0], "test")


@pytest.fixture
def local_backend(study: StudyDir) -> LocalBackend:
    return LocalBackend(study, slots=4, gpus=[], kill_grace_s=1.0)
