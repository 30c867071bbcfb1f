"""Candidate branches, made beside the user's checkout and never in it.

Every candidate is a commit on ``fanout/<tag>/r<NN>-c<i>``, made in a worktree of its own under
the study directory. The research branch only ever moves forward, by compare-and-swap, to a
candidate whose result beat the best so far. The user's HEAD, index, working files and other
branches are not touched: git is driven with plumbing and ``-C <candidate worktree>`` only.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from fanout_research import gitrepo
from fanout_research.backends.local_supervisor import register_worktree, unregister_worktree
from fanout_research.errors import ConfigError, FanoutError
from fanout_research.study import StudyDir


class Workspace:
    def __init__(self, repo: Path, study: StudyDir, tag: str) -> None:
        self.repo = Path(repo).resolve()
        self.study = study
        self.tag = tag
        self._git_repo = gitrepo.open_repo(self.repo)
        self._identity = gitrepo.identity_args(self._git_repo)
        self.worktrees = study.root / "candidates"

    def git(self, *args: str, cwd: Path | None = None, check: bool = True) -> str:
        done = subprocess.run(
            ["git", "-C", str(cwd or self.repo), "-c", "core.hooksPath=/dev/null", *self._identity, *args],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )
        if check and done.returncode != 0:
            raise FanoutError(f"git {args[0]} failed: {done.stderr.strip().splitlines()[-1:]}")
        return done.stdout.strip()

    # -- branches --------------------------------------------------------------------------------
    def branch_for(self, round_: int, candidate: int) -> str:
        return f"fanout/{self.tag}/r{round_:02d}-c{candidate}"

    def tip(self, branch: str) -> str | None:
        out = self.git("rev-parse", "--verify", "--quiet", f"refs/heads/{branch}^{{commit}}", check=False)
        return out or None

    def ensure_research_branch(self, branch: str, start: str = "HEAD") -> str:
        """The research branch's tip, creating it at ``start`` (the user's HEAD) the first time.

        Refused while the branch is checked out somewhere: moving it would change that checkout.
        """
        for block in self.git("worktree", "list", "--porcelain").split("\n\n"):
            lines = dict(line.split(" ", 1) for line in block.splitlines() if " " in line)
            if lines.get("branch") == f"refs/heads/{branch}":
                raise ConfigError(
                    f"the research branch {branch!r} is checked out in {lines.get('worktree')}; "
                    "switch that checkout to another branch (the study moves this one)"
                )
        tip = self.tip(branch)
        if tip is None:
            tip = gitrepo.resolve_commit(self._git_repo, start)
            self.git("update-ref", f"refs/heads/{branch}", tip, "")
        return tip

    def advance(self, branch: str, new: str, old: str) -> bool:
        """Fast-forward ``branch`` from ``old`` to ``new``; False if it is no longer at ``old``."""
        ancestor = subprocess.run(["git", "-C", str(self.repo), "merge-base", "--is-ancestor", old, new],
                                  capture_output=True).returncode == 0
        if not ancestor:
            raise FanoutError(f"refusing to move {branch}: {new[:12]} does not descend from {old[:12]}")
        done = subprocess.run(
            ["git", "-C", str(self.repo), "update-ref", "-m", "fanout: keep the round's best candidate",
             f"refs/heads/{branch}", new, old], capture_output=True, text=True,
        )
        return done.returncode == 0

    # -- candidates --------------------------------------------------------------------------------
    def _launch(self, name: str, commit: str) -> dict[str, str]:
        common = gitrepo.common_dir(self._git_repo)
        return {
            "repo": str(self.repo), "commit": commit, "worktree": str(self.worktrees / name),
            "worktree_lock": str(common / "fanout" / "worktrees.lock"), "git_dir": str(common),
        }

    def checkout(self, name: str, base: str, contents: dict[str, str]) -> Path:
        """A fresh worktree at ``base`` with ``contents`` written over it: where the candidate is
        dry-run and committed."""
        launch = self._launch(name, base)
        self.worktrees.mkdir(parents=True, exist_ok=True)
        try:
            register_worktree(launch)
        except OSError as exc:
            raise FanoutError(f"cannot make a worktree for {name}: {exc}") from None
        worktree = Path(launch["worktree"])
        self.git("reset", "--hard", "-q", cwd=worktree)
        for path, text in contents.items():
            target = worktree / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        return worktree

    def commit(self, worktree: Path, paths: list[str], branch: str, message: str) -> str:
        """Commit the candidate and point its branch at it (creating the branch, never moving one)."""
        self.git("add", "--", *paths, cwd=worktree)
        self.git("commit", "-q", "--no-verify", "-m", message, cwd=worktree)
        sha = self.git("rev-parse", "HEAD", cwd=worktree)
        self.git("update-ref", f"refs/heads/{branch}", sha, "")
        return sha

    def discard(self, name: str) -> None:
        unregister_worktree(self._launch(name, ""))

    def prune(self, keep: set[str]) -> list[str]:
        """Delete this study's candidate branches except ``keep``; returns what was deleted."""
        prefix = f"refs/heads/fanout/{self.tag}/"
        branches = [ref.removeprefix("refs/heads/")
                    for ref in self.git("for-each-ref", "--format=%(refname)", prefix).split()]
        gone = [branch for branch in branches if branch not in keep]
        for branch in gone:
            self.git("update-ref", "-d", f"refs/heads/{branch}")
        return gone
