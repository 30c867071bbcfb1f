"""Where a study keeps its state, so that one process can submit and another can wait."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from fanout_research.errors import ConfigError
from fanout_research.gitrepo import common_dir, open_repo

_STUDY_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?$")


def check_study_name(name: str) -> str:
    if not _STUDY_NAME.match(name):
        raise ConfigError(
            f"study name {name!r} must be lowercase letters, digits and '-' (at most 42)"
        )
    return name


@dataclass(frozen=True)
class StudyDir:
    """A study's directory: its job ledger plus each backend's private files.

    By default it lives under the repository's common ``.git`` directory: out of the working tree
    (so it never makes the tree dirty or gets picked up by tools), shared by all worktrees, and
    gone with the clone. ``FANOUT_STUDY_DIR`` moves it anywhere.
    """

    name: str
    root: Path
    repo: Path | None = None

    @classmethod
    def for_repo(cls, repo_path: str | Path, name: str = "default") -> StudyDir:
        check_study_name(name)
        repo = open_repo(repo_path)
        override = os.environ.get("FANOUT_STUDY_DIR")
        root = Path(override) if override else common_dir(repo) / "fanout" / "studies" / name
        return cls(name=name, root=root.resolve(), repo=Path(repo.working_tree_dir).resolve())

    @property
    def ledger_path(self) -> Path:
        return self.root / "jobs.jsonl"
