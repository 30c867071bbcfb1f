"""Fixtures: the template copied into a tmp dir and a prepared synthetic data directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_helpers import copy_template, prepare


@pytest.fixture(scope="session")
def code_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_template(tmp_path_factory.mktemp("code") / "repo")


@pytest.fixture(scope="session")
def data_dir(code_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic data dir shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("data") / "synthetic"
    proc = prepare(code_dir, out, "--docs", "4000")
    assert proc.returncode == 0, proc.stderr
    return out
