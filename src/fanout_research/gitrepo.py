"""The few questions the orchestrator asks of a research repo.

GitPython for the orchestrator side (its persistent ``cat-file`` process makes repeated commit
look-ups cheap); the job supervisor shells out to ``git`` directly because it must stay stdlib-only.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path

import git

from fanout_research.errors import DirtyTreeError, JobSpecError, NotAGitRepoError, UnknownRevisionError

# A cached Repo shares one persistent `git cat-file` pipe; two threads talking over it at once
# read each other's answers or deadlock, so every object-database look-up takes this lock.
_ODB_LOCK = threading.Lock()


@lru_cache(maxsize=32)
def _open(top: Path) -> git.Repo:
    return git.Repo(top)


def open_repo(path: str | Path) -> git.Repo:
    """The repository containing ``path`` (cached per top-level directory)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise NotAGitRepoError(f"not a git repository: {path} does not exist")
    try:
        probe = git.Repo(path, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise NotAGitRepoError(
            f"not a git repository: {path.resolve()} (run inside your research repo, or `git init`)"
        ) from None
    if probe.bare or probe.working_tree_dir is None:
        raise NotAGitRepoError(f"not a git repository with a working tree: {path.resolve()}")
    return _open(Path(probe.working_tree_dir).resolve())


def resolve_commit(repo: git.Repo, rev: str) -> str:
    """The full hash of ``rev``, which must name a commit that exists."""
    try:
        return repo.git.rev_parse("--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    except git.GitCommandError:
        raise UnknownRevisionError(
            f"unknown revision: {rev!r} names no commit in {repo.working_tree_dir}"
        ) from None


def has_commit(repo: git.Repo, sha: str) -> bool:
    """Whether the object database really holds commit ``sha`` (``repo.commit(sha)`` would not
    look: it builds an object for any well-formed hash, even forty zeros)."""
    try:
        with _ODB_LOCK:
            return repo.odb.info(bytes.fromhex(sha)).type == b"commit"
    except (ValueError, git.BadName, git.BadObject, git.GitCommandError):
        return False


def ensure_clean(repo: git.Repo) -> None:
    """Refuse uncommitted changes to tracked files: a job runs the commit, not the working tree.

    Untracked files are allowed on purpose: autoresearch keeps ``results.tsv`` untracked.
    """
    changed = [line[3:] for line in repo.git.status("--porcelain", "--untracked-files=no").splitlines()]
    if changed:
        shown = ", ".join(changed[:3]) + (" ..." if len(changed) > 3 else "")
        raise DirtyTreeError(
            f"working tree has uncommitted changes ({shown}); commit or stash them first"
        )


def common_dir(repo: git.Repo) -> Path:
    """The main ``.git`` directory, shared by every worktree of the repository."""
    return Path(repo.common_dir).resolve()


def branch_of(repo: git.Repo, sha: str) -> str | None:
    """The checked-out branch if it points at ``sha``: labels only, never trusted for code."""
    try:
        head = repo.head
        if not head.is_detached and head.commit.hexsha == sha:
            return head.ref.name
    except (TypeError, ValueError):
        pass
    return None


def path_exists_at(repo: git.Repo, sha: str, path: str) -> bool:
    try:
        with _ODB_LOCK:
            repo.commit(sha).tree / path
    except (KeyError, ValueError, git.BadName):
        return False
    return True


FALLBACK_IDENTITY = ("-c", "user.name=fanout-research", "-c", "user.email=fanout@localhost")


def identity_args(repo: git.Repo) -> tuple[str, ...]:
    """``-c`` options giving git an author where none is configured (a fresh machine or CI);
    the user's own identity always wins."""
    try:
        repo.git.config("user.email")
        repo.git.config("user.name")
    except git.GitCommandError:
        return FALLBACK_IDENTITY
    return ()


def repo_holding(path: str, commit: str, where: str) -> git.Repo:
    """The local repository a job's code comes from, which must hold its commit; ``where`` says
    what the backend needs instead (a local path, a shared path, a git_url)."""
    repo_path = Path(path).expanduser()
    if not repo_path.is_dir():
        raise JobSpecError(f"repository {path!r} is not a local directory; {where}")
    repo = open_repo(repo_path)
    if not has_commit(repo, commit):
        raise JobSpecError(f"commit {commit[:12]} is not in {repo_path}")
    return repo
