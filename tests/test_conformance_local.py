"""The backend conformance suite against LocalBackend: real git worktrees, real processes."""

from __future__ import annotations

import sys

import pytest

from fanout_research.backends.local import LocalBackend
from fanout_research.testing.conformance import BackendConformance, Harness


class TestLocalBackendConformance(BackendConformance):
    @pytest.fixture
    def harness(self, research_repo, local_backend: LocalBackend) -> Harness:
        repo, commit = research_repo
        return Harness(backend=local_backend, repo=repo, commit=commit, python=sys.executable)
