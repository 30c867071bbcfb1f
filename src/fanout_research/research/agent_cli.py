"""The command proposer: an external coding agent's CLI (``claude -p``, ``codex exec``, aider...)
makes each candidate, in a private copy of the repository, and its diff becomes the proposal.

One agent run per candidate, K in parallel. Each run gets:

- a **private copy** of the base commit: ``git archive`` exported into a temporary directory and
  made a fresh one-commit git repository, so the agent can use git (diff, status, even commit)
  while the user's checkout, index, branches and object store stay out of its reach (a
  ``git worktree`` would share the user's refs: one ``git branch -f`` there would move theirs);
- the **prompt** built as for the API proposers (program.md, the editable files, the history),
  asking for one experiment made in place and steered towards one focus area so K agents differ;
  it is passed as ``{prompt}`` (an argument), ``{prompt_file}`` (a path) or, when the argv names
  neither, on stdin;
- a **time limit**: the agent runs in its own session; at the limit its whole process group gets
  SIGTERM, then SIGKILL after ``kill_grace_s``; leftovers are killed when it exits anyway;
- a **minimal environment**: PATH, locale, terminal and user names, an empty scratch ``HOME``,
  ``env`` from the config, and only the variables named in ``env_passthrough`` from ours: the
  agent CLI's own key is the one allowed exception, and it is named explicitly.

Afterwards the copy is compared with the base (``git add -A; git diff --cached <base>``):

- an allowed file added or modified -> a ``WriteFile`` edit;
- a tracked file the agent may not change, modified -> also a ``WriteFile`` edit, so the proposal
  is still returned and the validator rejects it *visibly* (``files`` step, recorded in the
  study) -- an agent that edits ``prepare.py`` should be seen doing it, not silently trimmed;
- a new file outside the allowed list (notes, scratch scripts) -> ignored, and logged;
- a deletion, a symlink, a non-UTF-8 file, no change at all, a non-zero exit or a timeout -> the
  candidate is dropped, with the reason on ``last_rejections`` (and in the call log);
- two candidates with the same resulting files -> the later one is dropped as a duplicate.

The agent is not sandboxed (no network or filesystem isolation): it runs with the user's
permissions, only away from their checkout and without their environment.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fanout_research.errors import ConfigError, first_problem
from fanout_research.research.knobs import read_knobs
from fanout_research.research.llm import (
    DEFAULT_FOCUS,
    DESCRIPTION_LIMIT,
    REASON_LIMIT,
    CallLog,
    CallUsage,
    IdeaRejection,
    ProposerError,
    _one_line,
    build_prompt,
    knobs_of,
)
from fanout_research.research.proposals import Proposal, ResearchContext, WriteFile

log = logging.getLogger(__name__)

PLACEHOLDERS = ("{prompt}", "{prompt_file}", "{workdir}", "{candidate}")
# What the agent inherits from our environment, besides env_passthrough.
AGENT_ENV_KEEP = ("PATH", "LANG", "LANGUAGE", "TZ", "TERM", "USER", "LOGNAME", "SHELL", "TMPDIR")
AGENT_ENV_PREFIXES = ("LC_",)
_IDEA_LINE = re.compile(r"^\W*Idea\W*:\s*(.+?)\s*\**\s*$", re.IGNORECASE)
_GIT_QUIET = ["-c", "user.name=fanout agent", "-c", "user.email=agent@fanout.invalid",
              "-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null"]


class CommandSettings(BaseModel):
    """``[proposer.command]`` options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    argv: list[str] = Field(min_length=1, description="The agent's command line, with placeholders.")
    timeout_s: float = Field(900.0, gt=0, description="Per agent run; then its process group is killed.")
    kill_grace_s: float = Field(5.0, ge=0)
    env_passthrough: list[str] = Field(default_factory=list, description="Variables the agent gets from us.")
    env: dict[str, str] = Field(default_factory=dict, description="Fixed, non-secret variables.")
    inherit_home: bool = Field(False, description="Give the agent the real HOME (for CLIs logged in there).")
    max_parallel: int = Field(0, ge=0, description="Agents at once; 0: all K.")
    max_calls: int | None = Field(None, ge=0, description="Per-study cap on agent runs.")
    max_history: int = Field(40, ge=0)
    focus: list[str] = Field(default_factory=lambda: list(DEFAULT_FOCUS))

    @field_validator("env_passthrough")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)]
        if bad:
            raise ValueError(f"env_passthrough holds variable NAMES, not values: {bad[0][:8]!r}...")
        return value


@dataclass
class _Outcome:
    """What one agent run produced."""

    candidate: int
    description: str = ""
    changed: dict[str, str] = field(default_factory=dict)  # path -> new content
    ignored: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0


class CommandProposer:
    """Runs ``argv`` once per candidate in a private copy of the base commit; see the module doc.

    ``repo`` is the research repository (``Study`` passes it); ``state_dir`` holds the study's
    call log, which ``max_calls`` counts (one call per agent run). ``last_rejections`` explains
    the candidates that did not become proposals; ``usage_log`` has one record per agent run.
    """

    name: ClassVar[str] = "command"

    def __init__(self, *, repo: str | Path | None = None, state_dir: str | Path | None = None,
                 **options: Any) -> None:
        try:
            self.settings = CommandSettings.model_validate(options)
        except ValidationError as exc:
            raise ConfigError(f"[proposer.command] {first_problem(exc)}") from None
        self.repo = Path(repo).resolve() if repo else None
        self.calls = CallLog(state_dir)
        self.usage_log: list[CallUsage] = []
        self.last_rejections: list[IdeaRejection] = []

    @property
    def label(self) -> str:
        return f"{self.name}:{Path(self.settings.argv[0]).name}"

    def options(self) -> dict[str, Any]:
        """The settings: pass-through variable names, never their values."""
        return self.settings.model_dump()

    def __repr__(self) -> str:
        return f"CommandProposer(argv={self.settings.argv!r}, repo={str(self.repo)!r})"

    # -- the seam ------------------------------------------------------------------------------
    def propose(self, context: ResearchContext, k: int) -> list[Proposal]:
        repo = self.repo or (Path(context.extra["repo"]) if context.extra.get("repo") else None)
        if repo is None:
            raise ProposerError("the command proposer needs the research repository (repo=...)")
        runs = self.calls.check(self.settings.max_calls, needed=k)
        root = Path(tempfile.mkdtemp(prefix="fanout-agent-"))
        try:
            workers = max(1, min(runs, self.settings.max_parallel or runs))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                outcomes = list(pool.map(lambda i: self._one(repo, context, k, i, root), range(1, runs + 1)))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return self._collect(context, outcomes)

    def _collect(self, context: ResearchContext, outcomes: list[_Outcome]) -> list[Proposal]:
        proposals: list[Proposal] = []
        rejections: list[IdeaRejection] = []
        seen: dict[tuple[tuple[str, str], ...], int] = {}
        for outcome in outcomes:
            usage = CallUsage(api=self.name, model=Path(self.settings.argv[0]).name, round=context.round,
                              attempts=1, seconds=round(outcome.seconds, 3))
            if outcome.ignored:
                log.info("%s: candidate %d: ignored new files outside the allowed list: %s", self.label,
                         outcome.candidate, ", ".join(outcome.ignored))
            key = tuple(sorted(outcome.changed.items()))
            error = outcome.error
            if not error and key in seen:
                error = f"duplicate of candidate {seen[key]} (the same change)"
            if error:
                rejection = IdeaRejection(outcome.candidate, outcome.description, error)
                rejections.append(rejection)
                usage.error, usage.rejected = error, [str(rejection)]
                log.warning("%s: round %d: dropped candidate %d: %s", self.label, context.round,
                            outcome.candidate, error)
            else:
                seen[key] = outcome.candidate
                # Parsing happens here, on the caller's thread, not in the agents' worker threads:
                # CPython 3.11's ast.parse is not safe in concurrent threads (gh-106905).
                proposals.append(Proposal(
                    description=outcome.description or _fallback_description(context, outcome.changed),
                    edits=tuple(WriteFile(path=p, content=c) for p, c in sorted(outcome.changed.items())),
                    knobs=knobs_of(outcome.changed), proposer=self.label))
                usage.proposals = 1
            self.usage_log.append(usage)
            self.calls.append(usage)
        self.last_rejections = rejections
        return proposals

    # -- one agent run ---------------------------------------------------------------------------
    def _one(self, repo: Path, context: ResearchContext, k: int, candidate: int, root: Path) -> _Outcome:
        s = self.settings
        secrets = [os.environ[n] for n in s.env_passthrough if len(os.environ.get(n, "")) >= 4]

        def scrub(text: str) -> str:
            for value in secrets:
                text = text.replace(value, "[redacted]")
            return text

        work, home = root / f"c{candidate}", root / f"c{candidate}.home"
        home.mkdir()
        base = _export(repo, context.base_commit, work)
        focus = s.focus[(candidate - 1) % len(s.focus)] if s.focus else ""
        system, user = build_prompt(context, k, mode="edit", max_history=s.max_history, focus=focus)
        prompt = f"{system}\n\n{user}"
        prompt_file = root / f"c{candidate}.prompt.md"
        prompt_file.write_text(prompt)
        values = {"{prompt}": prompt, "{prompt_file}": str(prompt_file), "{workdir}": str(work),
                  "{candidate}": str(candidate)}
        argv = [_substitute(arg, values) for arg in s.argv]
        on_stdin = not any(p in arg for arg in s.argv for p in ("{prompt}", "{prompt_file}"))
        out, err = root / f"c{candidate}.out", root / f"c{candidate}.err"
        env = self._env(home, candidate, context.round)
        started = time.monotonic()
        code = _run(argv, work, env, prompt_file if on_stdin else None, s.timeout_s, s.kill_grace_s, out, err)
        seconds = time.monotonic() - started
        stdout = scrub(out.read_text(errors="replace"))
        stderr = scrub(err.read_text(errors="replace"))
        description = _description(stdout)
        result = _Outcome(candidate, description, seconds=seconds)
        if code is None:
            result.error = f"timed out after timeout_s={s.timeout_s:g}s (its process group was killed)"
            return result
        if code != 0:
            tail = _last_line(stderr) or _last_line(stdout)
            how = f"killed by signal {-code}" if code < 0 else f"exited {code}"
            result.error = f"the agent {how}" + (f": {tail}" if tail else "")
            return result
        try:
            result.changed, result.ignored = _changes(work, base, context.allowed_files)
        except _Unusable as exc:
            result.error = str(exc)
            return result
        if not any(path in context.allowed_files for path in result.changed):
            result.error = f"the agent changed none of {', '.join(context.allowed_files)}"
        return result

    def _env(self, home: Path, candidate: int, number: int) -> dict[str, str]:
        s = self.settings
        env = {k: v for k, v in os.environ.items()
               if k in AGENT_ENV_KEEP or k.startswith(AGENT_ENV_PREFIXES)}
        env["HOME"] = os.environ.get("HOME", str(home)) if s.inherit_home else str(home)
        env.update(FANOUT_AGENT_CANDIDATE=str(candidate), FANOUT_AGENT_ROUND=str(number))
        env.update(s.env)
        for name in s.env_passthrough:
            if name in os.environ:
                env[name] = os.environ[name]
            else:
                log.warning("%s: env_passthrough names %s, which is not set", self.label, name)
        return env


class _Unusable(Exception):
    """The agent's result cannot become a proposal (the message says why)."""


def _substitute(arg: str, values: dict[str, str]) -> str:
    """Literal replacement, not ``str.format``: an argv may hold braces of its own (JSON)."""
    for placeholder, value in values.items():
        arg = arg.replace(placeholder, value)
    return arg


def _git(cwd: Path, *args: str, data: bytes | None = None) -> bytes:
    done = subprocess.run(["git", *_GIT_QUIET, *args], cwd=cwd, input=data, capture_output=True)
    if done.returncode != 0:
        raise _Unusable(f"git {args[0]} failed in the agent's copy: "
                        f"{done.stderr.decode(errors='replace').strip()[:200]}")
    return done.stdout


def _export(repo: Path, commit: str, dest: Path) -> str:
    """``commit``'s tree as a fresh one-commit repository at ``dest``; returns that commit.

    ``git archive`` reads the user's repository and writes nothing to it; the copy shares no refs,
    index or objects with it.
    """
    done = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", commit], capture_output=True)
    if done.returncode != 0:
        raise ProposerError(f"cannot export {commit[:12]} of {repo}: "
                            f"{done.stderr.decode(errors='replace').strip()[:200]}")
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        tar.extractall(dest, filter="data")
    try:
        _git(dest, "init", "-q", "-b", "main")
        _git(dest, "add", "-A")
        _git(dest, "commit", "-q", "--no-verify", "--allow-empty", "-m", f"fanout base {commit[:12]}")
        return _git(dest, "rev-parse", "HEAD").decode().strip()
    except _Unusable as exc:
        raise ProposerError(str(exc)) from None


def _run(argv: list[str], cwd: Path, env: dict[str, str], stdin: Path | None, timeout_s: float,
         grace_s: float, out: Path, err: Path) -> int | None:
    """Run the agent in its own session; None if it hit the time limit. Nothing it started
    outlives it: its process group is killed when it exits, as at the limit."""
    with open(out, "wb") as o, open(err, "wb") as e, open(stdin or os.devnull, "rb") as i:
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=i, stdout=o, stderr=e,
                                    start_new_session=True)
        except FileNotFoundError:
            raise ProposerError(f"the agent command {argv[0]!r} was not found on PATH") from None
        except PermissionError:
            raise ProposerError(f"the agent command {argv[0]!r} is not executable") from None
        code: int | None
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = None
        finally:
            _killpg(proc.pid, signal.SIGKILL)
    return code


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _changes(work: Path, base: str, allowed: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """The agent's changes against ``base``: (path -> new content, ignored new files)."""
    _git(work, "add", "-A")
    out = _git(work, "diff", "--cached", "--no-renames", "--name-status", "-z", base).decode()
    fields = [f for f in out.split("\0") if f]
    changed: dict[str, str] = {}
    ignored: list[str] = []
    for status, path in zip(fields[0::2], fields[1::2], strict=True):
        kind = status[:1]
        if kind == "D":
            raise _Unusable(f"the agent deleted {path} (a proposal cannot delete files)")
        if kind == "A" and path not in allowed:
            ignored.append(path)  # scratch: notes, test scripts
            continue
        file = work / path
        if any(p.is_symlink() for p in [file, *file.parents] if p.is_relative_to(work)):
            raise _Unusable(f"{path} is a symlink in the agent's copy")
        if not file.is_file():
            raise _Unusable(f"{path} is not a regular file in the agent's copy")
        try:
            changed[path] = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise _Unusable(f"{path} is not UTF-8 text after the agent's edit") from None
    return changed, ignored


def _description(stdout: str) -> str:
    """The last ``Idea: ...`` line the agent printed (the prompt asks it to end with one)."""
    for line in reversed(stdout.splitlines()):
        match = _IDEA_LINE.match(line)
        if match and match.group(1).strip("* "):
            return _one_line(match.group(1).strip("* "), DESCRIPTION_LIMIT)
    return ""


def _fallback_description(context: ResearchContext, changed: dict[str, str]) -> str:
    """Without an ``Idea:`` line: the knobs it moved, else the files it edited."""
    before = context.files.get("train.py")
    after = knobs_of(changed)
    if before is not None and after:
        try:
            base = read_knobs(before)
        except (SyntaxError, ValueError):
            base = {}
        moved = [f"{n} {base.get(n, '?')} -> {v}" for n, v in after.items() if base.get(n) != v]
        if moved:
            return _one_line("agent: " + ", ".join(moved), DESCRIPTION_LIMIT)
    return f"agent edit of {', '.join(sorted(changed))}"


def _last_line(text: str) -> str:
    line = next((x for x in reversed(text.splitlines()) if x.strip()), "")
    return _one_line(line, REASON_LIMIT)
