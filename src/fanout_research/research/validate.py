"""The gate between a proposer and the GPU: a proposal is checked in six steps, cheapest first.

A proposal is untrusted text (from an LLM, or a random perturbation of constants). Before it may
spend a job's GPU time it must:

1. ``apply``    apply cleanly to the base commit (each search text found exactly once),
2. ``files``    touch only allowed, well-formed paths inside the repo (no ``..``, no ``.git/``,
                no symlinks),
3. ``syntax``   compile,
4. ``secrets``  not start reading secrets (API keys) or the whole environment,
5. ``imports``  import only modules that exist, and
6. ``dry_run``  run a few optimizer steps on the CPU profile and print a finite loss.

Steps 1-4 (:meth:`Validator.check_static`) read only git objects and parse source: nothing from
the proposal is executed in this process. Steps 5-6 (:meth:`Validator.check_runtime`) run the
candidate's worktree in subprocesses with a minimal environment, in their own process group,
killed as a group on timeout. The first failing step raises :class:`Rejected`, whose ``step`` and
one-line message go into the study's records (status ``reject``) and back to the proposer.

The static secrets check is defence in depth, not a sandbox: the dry run and the jobs never see
the orchestrator's environment in the first place (see ``backends.local.ENV_PASSTHROUGH``).
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import posixpath
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fanout_research.research.proposals import Proposal, SearchReplace, WriteFile
from fanout_research.research.pysource import parse_python

STEPS = ("apply", "files", "syntax", "secrets", "imports", "dry_run")
DRY_RUN_LINE = re.compile(r"^fanout-dry-run loss=(\S+)(?:\s+steps=(\d+))?\s*$", re.MULTILINE)
# Environment variables the subprocesses inherit from the orchestrator (as in backends.local).
RUNTIME_ENV_KEEP = ("PATH", "HOME", "LANG", "LANGUAGE", "TMPDIR")
RUNTIME_ENV_PREFIXES = ("LC_",)
IMPORT_CHECK_TIMEOUT_S = 60.0
OUTPUT_TAIL_BYTES = 64 * 1024
_MODE_SYMLINK, _MODE_GITLINK = "120000", "160000"


class Rejected(Exception):
    """A proposal failed validation.

    ``step`` is one of :data:`STEPS`; ``str(exc)`` is a one-line reason meant for a human and
    for the proposer's next prompt, so it names the file and what to fix.
    """

    def __init__(self, step: str, reason: str) -> None:
        if step not in STEPS:
            raise ValueError(f"unknown validation step {step!r}")
        reason = " ".join(reason.split()) or "rejected"  # one line, whatever came in
        super().__init__(reason)
        self.step = step
        self.reason = reason

    def __repr__(self) -> str:
        return f"Rejected({self.step!r}, {self.reason!r})"

    def __reduce__(self) -> tuple[type[Rejected], tuple[str, str]]:  # survives a process pool
        return type(self), (self.step, self.reason)


# ----------------------------------------------------------------------------- base tree
@dataclass(frozen=True)
class BaseTree:
    """Files of the repo at one commit, read with git (``ls-tree`` / ``cat-file``).

    Never the working tree: the orchestrator's checkout may be dirty or mid-merge, and a path
    that is a symlink there could point anywhere. The listing is loaded once per instance; blob
    contents are cached as they are read.
    """

    repo: Path
    commit: str
    _entries: dict[str, tuple[str, str]] = field(init=False, repr=False, compare=False)
    _blobs: dict[str, str] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        out = _git(self.repo, "ls-tree", "-r", "-z", "--full-tree", self.commit).decode()
        entries: dict[str, tuple[str, str]] = {}
        for record in out.split("\0"):
            if record:
                meta, path = record.split("\t", 1)
                mode, _kind, sha = meta.split()
                entries[path] = (mode, sha)
        object.__setattr__(self, "_entries", entries)

    @classmethod
    def at(cls, repo: Path, commit: str) -> BaseTree:
        """The tree of ``commit`` (any revision git understands, pinned to its full hash)."""
        try:
            sha = _git(Path(repo), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
        except ValueError:
            raise ValueError(f"{commit!r} is not a commit of {repo}") from None
        return cls(Path(repo), sha.decode().strip())

    def paths(self) -> list[str]:
        return sorted(self._entries)

    def mode(self, path: str) -> str | None:
        entry = self._entries.get(path)
        return entry[0] if entry else None

    def read(self, path: str) -> str | None:
        """Content of a regular file, or None if absent (or a symlink / submodule, not a file).

        Raises ValueError for a file that is not UTF-8 text.
        """
        entry = self._entries.get(path)
        if entry is None or entry[0] in (_MODE_SYMLINK, _MODE_GITLINK):
            return None
        if path not in self._blobs:
            data = _git(self.repo, "cat-file", "blob", entry[1])
            try:
                self._blobs[path] = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path} is not UTF-8 text") from exc
        return self._blobs[path]

    def is_symlink(self, path: str) -> bool:
        """True if ``path`` or any of its parent directories is a symlink (mode 120000)."""
        return any(self.mode(p) == _MODE_SYMLINK for p in _self_and_parents(path))

    def in_submodule(self, path: str) -> bool:
        """True if a parent directory of ``path`` is a submodule (gitlink, mode 160000)."""
        return any(self.mode(p) == _MODE_GITLINK for p in _self_and_parents(path))


def _self_and_parents(path: str) -> Iterator[str]:
    parts = path.split("/")
    for i in range(len(parts), 0, -1):
        yield "/".join(parts[:i])


def _git(repo: Path, *args: str) -> bytes:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=False)
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip() or f"exit {proc.returncode}"
        raise ValueError(f"git {' '.join(args[:2])} in {repo} failed: {detail}")
    return proc.stdout


# ----------------------------------------------------------------------------- paths
def path_problem(path: str) -> str | None:
    """Why ``path`` is not a plain relative repo path, or None if it is one.

    Only the canonical spelling is accepted ("train.py", "pkg/mod.py"): no absolute paths,
    drive letters, backslashes, empty, '.' or '..' components, control characters, and nothing
    inside a ``.git`` directory (any case: some filesystems fold it). Every other spelling of
    a path is refused rather than normalised, so no two spellings can name one file.
    """
    if not path:
        return "empty path"
    if any(ord(c) < 32 or c == "\x7f" for c in path):
        return "path contains control characters"
    if "\\" in path:
        return "path contains a backslash"
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        return "absolute path"
    parts = path.split("/")
    if ".." in parts:
        return "path escapes the repository ('..')"
    if "" in parts or "." in parts or posixpath.normpath(path) != path:
        return "path is not normalised"
    if any(part.lower() == ".git" for part in parts):
        return "path is inside .git/"
    return None


# ----------------------------------------------------------------------------- secrets
SECRET_WORDS = frozenset({
    "KEY", "KEYS", "APIKEY", "TOKEN", "TOKENS", "SECRET", "SECRETS", "PASSWORD", "PASSWD",
    "CREDENTIAL", "CREDENTIALS", "AUTH", "AUTHORIZATION", "COOKIE",
})
ENV_OBJECTS = frozenset({"environ", "environb"})
ENV_GETTERS = frozenset({"getenv", "getenvb"})
ENV_KEY_METHODS = frozenset({"get", "pop", "setdefault"})  # first argument is the variable name
ENV_WRITE_METHODS = frozenset({"update", "clear"})  # writing the environment reads nothing
CREDENTIAL_PATHS = (".netrc", ".aws/", ".ssh/", ".git-credentials", ".docker/config.json",
                    ".config/gcloud", "huggingface/token", ".kube/config", ".pypirc", "/environ")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def looks_secret(name: str, *, any_case: bool = False) -> bool:
    """An environment-variable-shaped name with a secret word as one of its ``_`` parts.

    OPENAI_API_KEY, ANTHROPIC_API_KEY, AWS_SECRET_ACCESS_KEY, HF_TOKEN, DB_PASSWORD, GH_AUTH...
    Upper case only unless ``any_case`` (names passed straight to an environment lookup):
    string constants such as "tokens_per_step" in the result dict are not variable names.
    """
    if not _ENV_NAME.match(name) or (not any_case and name != name.upper()):
        return False
    parts = [p for p in name.upper().split("_") if p]
    return any(p in SECRET_WORDS or p.endswith("KEY") for p in parts)


def env_findings(tree: ast.AST) -> list[tuple[str, int, str]]:
    """Reads of secrets or of the whole environment in ``tree``: (key, line, message) each.

    ``key`` identifies the finding independently of its line (the unparsed expression), so a
    finding the base file already had is recognised wherever the proposal moved it.
    """
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    found: list[tuple[str, int, str]] = []

    def add(node: ast.AST, message: str) -> None:
        found.append((f"{message} | {ast.unparse(node)}", getattr(node, "lineno", 0), message))

    def literal(node: ast.AST | None) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
            value = node.value
            return value.decode(errors="replace") if isinstance(value, bytes) else value
        return None

    def check_name(node: ast.AST, arg: ast.AST | None, what: str) -> None:
        name = literal(arg)
        if name is None:
            add(node, f"{what} with a computed variable name")
        elif looks_secret(name, any_case=True):
            add(node, f"reads the secret-looking environment variable {name!r}")

    for node in ast.walk(tree):
        name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(
            node, ast.Name) else None
        parent = parents.get(node)
        if name in ENV_OBJECTS:
            if isinstance(parent, ast.Subscript) and parent.value is node:
                if isinstance(parent.ctx, ast.Load):
                    check_name(parent, parent.slice, "os.environ[...]")
                elif looks_secret(literal(parent.slice) or "", any_case=True):
                    add(parent, f"sets the secret-looking environment variable {literal(parent.slice)!r}")
            elif isinstance(parent, ast.Attribute) and parent.value is node:
                call = parents.get(parent)
                if parent.attr in ENV_WRITE_METHODS:
                    continue
                if parent.attr in ENV_KEY_METHODS and isinstance(call, ast.Call) and call.func is parent:
                    check_name(call, call.args[0] if call.args else None, f"os.environ.{parent.attr}()")
                else:
                    add(parent, f"reads the whole environment (os.environ.{parent.attr})")
            elif (isinstance(parent, ast.Compare) and node in parent.comparators
                  and all(isinstance(op, ast.In | ast.NotIn) for op in parent.ops)):
                if looks_secret(literal(parent.left) or "", any_case=True):
                    add(parent, f"probes the secret-looking environment variable {literal(parent.left)!r}")
            else:
                add(node, "uses the whole environment (os.environ passed, copied, iterated or printed)")
        elif name in ENV_GETTERS:
            if isinstance(parent, ast.Call) and parent.func is node:
                arg = parent.args[0] if parent.args else next(
                    (k.value for k in parent.keywords if k.arg == "key"), None)
                check_name(parent, arg, "os.getenv()")
            else:
                add(node, "passes os.getenv around instead of calling it with a literal name")
        elif (text := literal(node)) is not None:
            if looks_secret(text):
                add(node, f"mentions the secret-looking environment variable {text!r}")
            elif text in ENV_OBJECTS | ENV_GETTERS:
                add(node, f"names {text!r} in a string (indirect environment access)")
            elif any(p in text for p in CREDENTIAL_PATHS):
                add(node, f"mentions a credentials file ({text[:60]!r})")
    return found


def added_env_findings(path: str, new: str, old: str | None) -> list[str]:
    """Findings of ``new`` that ``old`` (the base content) did not already have. A new file that
    compiles but cannot be analysed is a finding: the check must never pass by failing."""
    def parse(source: str | None) -> ast.AST | None:
        try:
            return parse_python(source, path) if source is not None else None
        except (SyntaxError, ValueError, RecursionError, MemoryError, SystemError):
            return None

    new_tree, old_tree = parse(new), parse(old)
    if new_tree is None:
        return [f"{path}: cannot be analysed for environment reads (too deeply nested?)"]
    before = Counter(key for key, _, _ in (env_findings(old_tree) if old_tree else []))
    added = []
    for key, line, message in sorted(env_findings(new_tree), key=lambda f: f[1]):
        if before[key] > 0:
            before[key] -= 1
        else:
            added.append(f"{path}:{line}: {message}")
    return added


# ----------------------------------------------------------------------------- imports
GUARD_EXCEPTIONS = frozenset({"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})


def imported_modules(tree: ast.AST) -> dict[str, int]:
    """Top-level names of the absolute imports in ``tree`` -> first line, unguarded only.

    ``import a.b`` and ``from a.b import c`` give ``a``; ``importlib.import_module("a")`` and
    ``__import__("a")`` with a literal name count too. Relative imports are skipped, and so are
    imports inside ``try:`` blocks that catch ImportError (optional dependencies).
    """
    found: dict[str, int] = {}

    def guarded(node: ast.Try) -> bool:
        for handler in node.handlers:
            kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            if handler.type is None or any(
                    isinstance(k, ast.Name | ast.Attribute) and (k.id if isinstance(k, ast.Name)
                                                                 else k.attr) in GUARD_EXCEPTIONS
                    for k in kinds):
                return True
        return False

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Try | ast.TryStar) and guarded(node):
            for child in (*node.handlers, *node.orelse, *node.finalbody):
                visit(child)
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            value = node.args[0].value
            if fname in ("import_module", "__import__") and isinstance(value, str) and value[:1] != ".":
                names = [value]
        for name in names:
            found.setdefault(name.split(".")[0], getattr(node, "lineno", 0))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


_FIND_SPECS = """\
import importlib.util, json, sys
sys.path.insert(0, sys.argv[1])
missing = {}
for name in sys.argv[2:]:
    try:
        if importlib.util.find_spec(name) is None:
            missing[name] = "No module named " + repr(name)
    except Exception as exc:
        missing[name] = type(exc).__name__ + ": " + str(exc)
print(json.dumps(missing))
"""


# ----------------------------------------------------------------------------- subprocesses
@dataclass(frozen=True)
class Finished:
    """What a subprocess left behind: exit code (None = killed on timeout) and output tails."""

    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


def run_isolated(cmd: Sequence[str], cwd: Path, env: Mapping[str, str], timeout_s: float) -> Finished:
    """Run ``cmd`` in a new session; on timeout SIGKILL its whole process group.

    Output goes to temporary files, not pipes: a grandchild that outlives the kill cannot keep
    us waiting on a pipe, and a chatty process cannot fill our memory (only the tails are read).
    The group is killed after a normal exit too, so nothing the candidate started survives.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True)
        try:
            exited = _wait_unreaped(proc.pid, t0 + timeout_s)
        finally:
            # The leader is a zombie until reaped, so its pid (= the group id) cannot be reused
            # by an unrelated process before this kill.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
        seconds = time.monotonic() - t0
        return Finished(returncode if exited else None, _tail(out), _tail(err), seconds)


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait until ``pid`` exits or ``deadline`` (monotonic) passes, leaving it unreaped."""
    delay = 0.005
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _tail(fh: IO[bytes]) -> str:
    size = fh.seek(0, os.SEEK_END)
    fh.seek(max(0, size - OUTPUT_TAIL_BYTES))
    return fh.read().decode("utf-8", errors="replace")


def last_error_line(stderr: str, stdout: str = "") -> str:
    """The line that says what went wrong: the exception line of the last traceback, else the
    last non-empty line of stderr (e.g. ``train.py: error: ...``), else of stdout."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        for line in lines[starts[-1] + 1:]:
            if line.strip() and not line[0].isspace():
                return line.strip()
    for text in (stderr, stdout):
        rest = [line.strip() for line in text.splitlines() if line.strip()]
        if rest:
            return rest[-1]
    return ""


def last_frame_in(stderr: str, root: Path) -> str | None:
    """``path:line`` of the innermost frame of the last traceback that lies under ``root``:
    where in the candidate's own code it failed (not deep inside torch)."""
    start = stderr.rfind("Traceback (most recent call last)")
    where = None
    for m in re.finditer(r'^  File "(.+)", line (\d+)', stderr[max(start, 0):], re.MULTILINE):
        file = Path(m.group(1))
        if file.is_absolute() and file.is_relative_to(root):
            where = f"{file.relative_to(root).as_posix()}:{m.group(2)}"
    return where


@dataclass(frozen=True)
class DryRun:
    """A passed dry run: the loss it printed, its step count, and how long it took."""

    loss: float
    steps: int | None
    seconds: float
    stdout: str


# ----------------------------------------------------------------------------- validator
class Validator:
    """Checks proposals: :meth:`check_static` in-process, :meth:`check_runtime` in subprocesses.

    Stateless between calls, so the loop may validate K candidates concurrently with one
    instance (each candidate in its own worktree).
    """

    def __init__(self, *, allowed_files: Sequence[str] = ("train.py",), python: str = sys.executable,
                 dry_run_command: Sequence[str] = ("train.py",), dry_run_steps: int = 2,
                 dry_run_timeout_s: float = 120.0, data_dir: Path | None = None,
                 extra_env: Mapping[str, str] | None = None) -> None:
        for path in allowed_files:
            if (problem := path_problem(path)) is not None:
                raise ValueError(f"allowed_files entry {path!r}: {problem}")
        if dry_run_steps < 1:
            raise ValueError("dry_run_steps must be at least 1")
        self.allowed_files = tuple(allowed_files)
        self.python = python
        self.dry_run_command = tuple(dry_run_command)
        self.dry_run_steps = dry_run_steps
        self.dry_run_timeout_s = dry_run_timeout_s
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir is not None else None
        self.extra_env = dict(extra_env or {})

    # -- steps 1-4 ------------------------------------------------------------------------
    def check_static(self, proposal: Proposal, base: BaseTree) -> dict[str, str]:
        """Steps 1-4 in order; raises :class:`Rejected` at the first failure; returns
        ``{path: new full content}`` of the files the proposal changes.

        1 apply: edits apply in order to the base content (several may hit one file). A
          SearchReplace's search text must occur exactly once (overlapping occurrences count) in
          the file as the earlier edits left it; a SearchReplace on a missing file fails; so does
          a proposal that changes nothing.
        2 files: each path is canonical and relative (:func:`path_problem`), not inside .git/,
          not a symlink or under a symlinked directory or a submodule in the base tree, and
          listed in ``allowed_files``.
        3 syntax: ``compile()`` of each changed .py file. Compile only: nothing is executed.
        4 secrets: the changed .py files may not start reading secrets or the environment.
          Rule: parse the new and the base content and collect, from each, these findings:
          (a) an environment lookup (``os.environ[...]``, ``.get/.pop/.setdefault``,
          ``os.getenv``, ``x in os.environ``) whose literal name looks secret (an ``_``-separated
          part is KEY/TOKEN/SECRET/PASSWORD/PASSWD/CREDENTIAL(S)/AUTH..., or ends in KEY), or
          whose name is computed (indirect, could be anything); (b) any other use of
          ``os.environ``/``environ`` as a whole (copied, iterated, printed, passed, ``.items()``,
          ``dict(os.environ)``...) or ``os.getenv`` not called with a name; (c) an UPPER_CASE
          string constant that looks like a secret variable name (``key = "OPENAI_API_KEY"``),
          the strings "environ"/"getenv" (``getattr(os, "environ")``), and well-known
          credentials files (``~/.netrc``, ``~/.aws/``, ``/proc/self/environ``...). A finding
          rejects the proposal only if the base content did not already have it (matched by
          expression, not line), so a repo that legitimately reads WANDB_API_KEY can still be
          edited. Reading ordinary variables by literal name (``os.environ.get("FANOUT_X")``)
          and writing the environment are fine; the unmodified template has no findings.
          Non-Python files are not scanned. The runtime steps never see the orchestrator's
          environment anyway; this step stops a proposal that tries before it reaches a job.
        """
        changed = self._apply(proposal, base)
        for path in changed:
            problem = path_problem(path)
            if problem is None and base.is_symlink(path):
                problem = "is a symlink, or under a symlinked directory, in the base commit"
            if problem is None and base.in_submodule(path):
                problem = "is inside a submodule"
            if problem is None and path not in self.allowed_files:
                problem = "is not an editable file (allowed: " + ", ".join(self.allowed_files) + ")"
            if problem is not None:
                raise Rejected("files", f"{path!r}: {problem}")
        for path, source in changed.items():
            if path.endswith(".py"):
                try:
                    compile(source, path, "exec", dont_inherit=True)
                except SyntaxError as exc:
                    where = f"{path}:{exc.lineno}" if exc.lineno else path
                    text = f": {exc.text.strip()!r}" if exc.text and exc.text.strip() else ""
                    raise Rejected("syntax", f"{where}: {exc.msg}{text}") from None
                except (ValueError, RecursionError, MemoryError) as exc:
                    raise Rejected("syntax", f"{path}: does not compile ({type(exc).__name__}: "
                                             f"{str(exc)[:200]})") from None
        for path, source in changed.items():
            if path.endswith(".py") and (added := added_env_findings(path, source, base.read(path))):
                more = f" (and {len(added) - 1} more)" if len(added) > 1 else ""
                raise Rejected("secrets", added[0] + more)
        return changed

    def _apply(self, proposal: Proposal, base: BaseTree) -> dict[str, str]:
        content: dict[str, str | None] = {}
        original: dict[str, str | None] = {}
        for n, edit in enumerate(proposal.edits, 1):
            path = edit.path
            if path not in content:
                try:
                    original[path] = content[path] = base.read(path)
                except ValueError as exc:
                    raise Rejected("apply", f"edit {n}: {exc}") from None
            if isinstance(edit, WriteFile):
                content[path] = edit.content
                continue
            assert isinstance(edit, SearchReplace)
            current = content[path]
            if current is None:
                raise Rejected("apply", f"edit {n}: {path!r} does not exist in the base commit "
                                        "(search/replace needs an existing file)")
            first = current.find(edit.search)
            if first < 0:
                raise Rejected("apply", f"edit {n}: search text not found in {path} "
                                        f"(starts {_snippet(edit.search)})")
            if current.find(edit.search, first + 1) >= 0:
                count = max(2, current.count(edit.search))
                raise Rejected("apply", f"edit {n}: search text occurs {count} times in {path}, "
                                        f"must be exactly once; add context (starts {_snippet(edit.search)})")
            content[path] = current[:first] + edit.replace + current[first + len(edit.search):]
        changed = {p: c for p, c in content.items() if c is not None and c != original[p]}
        if not changed:
            raise Rejected("apply", "the proposal changes nothing")
        return changed

    # -- steps 5-6 ------------------------------------------------------------------------
    def _scratch_home(self) -> str:
        if getattr(self, "_home", None) is None:
            self._home = tempfile.mkdtemp(prefix="fanout-dry-run-home-")
        return self._home

    def runtime_env(self) -> dict[str, str]:
        """The whole environment of the runtime subprocesses: a few locale/path variables of
        ours, the dry-run protocol, ``extra_env``; nothing else (no API keys, no PYTHONPATH)."""
        env = {k: v for k, v in os.environ.items()
               if k in RUNTIME_ENV_KEEP or k.startswith(RUNTIME_ENV_PREFIXES)}
        env.update(FANOUT_PROFILE="cpu", OMP_NUM_THREADS="1", FANOUT_VERIFY="sizes",
                   PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        # An empty home: candidate code in a dry run finds no ~/.netrc, ~/.aws or ~/.config.
        env["HOME"] = self._scratch_home()
        if self.data_dir is not None:
            env["FANOUT_DATA_DIR"] = str(self.data_dir)
        env.update(self.extra_env)
        env["FANOUT_DRY_RUN"] = str(self.dry_run_steps)  # the protocol; extra_env cannot unset it
        return env

    def check_runtime(self, worktree: Path, changed: Iterable[str]) -> DryRun:
        """Steps 5-6 on a worktree that holds the candidate (base + ``changed`` files).

        Returns the dry run's result (callers may ignore it); raises :class:`Rejected`.
        """
        worktree = Path(worktree).resolve()
        self.check_imports(worktree, changed)
        return self.dry_run(worktree)

    def check_imports(self, worktree: Path, changed: Iterable[str]) -> None:
        """Step 5: every top-level module the changed .py files import resolves.

        ``importlib.util.find_spec`` in a subprocess (same interpreter and environment as the
        dry run, worktree first on sys.path so local modules such as ``prepare`` resolve). It
        locates modules without importing them, so this takes a fraction of a second.
        """
        worktree = Path(worktree).resolve()
        wanted: dict[str, str] = {}
        for path in changed:
            if not path.endswith(".py"):
                continue
            file = (worktree / path).resolve()
            if not file.is_relative_to(worktree) or not file.is_file():
                raise Rejected("files", f"{path!r} is not a file inside the worktree")
            try:
                tree = parse_python(file.read_text(encoding="utf-8"), path)
            except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, SystemError) as exc:
                raise Rejected("syntax", f"{path}: {exc}") from None
            for name, line in imported_modules(tree).items():
                wanted.setdefault(name, f"{path}:{line}")
        if not wanted:
            return
        done = run_isolated([self.python, "-c", _FIND_SPECS, str(worktree), *wanted], worktree,
                            self.runtime_env(), IMPORT_CHECK_TIMEOUT_S)
        if done.returncode != 0:
            raise Rejected("imports", "import check failed: " + (last_error_line(done.stderr, done.stdout)
                                                                 or f"exit {done.returncode}"))
        try:
            missing: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise Rejected("imports", "import check printed no result") from None
        if missing:
            name, why = next(iter(missing.items()))
            others = f" (also: {', '.join(list(missing)[1:])})" if len(missing) > 1 else ""
            raise Rejected("imports", f"{wanted[name]}: cannot import {name!r}: {why}{others}")

    def dry_run(self, worktree: Path) -> DryRun:
        """Step 6: ``[python, *dry_run_command]`` runs ``dry_run_steps`` steps and exits 0
        within ``dry_run_timeout_s``, printing ``fanout-dry-run loss=<finite float>``."""
        cmd = [self.python, *self.dry_run_command]
        done = run_isolated(cmd, Path(worktree), self.runtime_env(), self.dry_run_timeout_s)
        if done.returncode is None:
            raise Rejected("dry_run", f"did not finish within {self.dry_run_timeout_s:g}s "
                                      f"({self.dry_run_steps} steps on the CPU profile)")
        if done.returncode != 0:
            code = (f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0
                    else f"exit {done.returncode}")
            line = last_error_line(done.stderr, done.stdout)[:300]
            where = last_frame_in(done.stderr, Path(worktree).resolve())
            line = f"{line} (at {where})" if line and where else line
            raise Rejected("dry_run", f"{code}: {line}" if line else code)
        matches = DRY_RUN_LINE.findall(done.stdout)
        if not matches:
            raise Rejected("dry_run", "exited 0 but printed no 'fanout-dry-run loss=...' line")
        loss_text, steps = matches[-1]
        try:
            loss = float(loss_text)
        except ValueError:
            loss = math.nan
        if not math.isfinite(loss):
            raise Rejected("dry_run", f"dry-run loss is not a finite number: {loss_text[:40]}")
        return DryRun(loss, int(steps) if steps else None, done.seconds, done.stdout)


def _snippet(text: str, limit: int = 50) -> str:
    first = text.strip().splitlines()[0] if text.strip() else text
    return repr(first[:limit] + ("..." if len(first) > limit or "\n" in text.strip() else ""))
