"""Throwaway research repos for tests: real git, real commits."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

JOB_SCRIPT = Path(__file__).with_name("conformance_job.py")

_GIT_IDENTITY = ["-c", "user.name=fanout tests", "-c", "user.email=tests@fanout.invalid"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *_GIT_IDENTITY, *args],
        check=True, capture_output=True, text=True,
    ).stdout.strip()


def commit_files(repo: Path, files: dict[str, str], message: str = "update") -> str:
    """Write ``files`` into the repo, commit them, and return the new commit's hash."""
    for name, content in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        git(repo, "add", name)
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def make_research_repo(path: Path, extra: dict[str, str] | None = None) -> tuple[Path, str]:
    """A git repo holding the conformance job (and ``extra`` files); returns (repo, commit)."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    shutil.copy(JOB_SCRIPT, path / "job.py")
    git(path, "add", "job.py")
    files = {"marker.txt": "first\n", **(extra or {})}
    return path, commit_files(path, files, "research repo for tests")
