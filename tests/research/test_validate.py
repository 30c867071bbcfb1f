"""The validation layer against a corpus of bad proposals, on a real git repo made from the template.

Every proposal here is something a proposer (LLM or perturbation) could plausibly send. Each bad
one must be rejected at the right step with a reason a human (and the next prompt) can act on;
the good one must pass all six steps, the last of which really runs train.py for a few steps.
Static steps run in-process on git objects; runtime steps run real subprocesses on a worktree.
"""

from __future__ import annotations

import ast
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fanout_research.research.proposals import Proposal, SearchReplace, WriteFile
from fanout_research.research.validate import BaseTree, Rejected, Validator, env_findings
from fanout_research.testing.repo import commit_files, git

TEMPLATE = Path(__file__).resolve().parents[2] / "src" / "fanout_research" / "template"
DEPTH_LINE = "DEPTH = 8                 # transformer blocks\n"
SEED_LINE = "SEED = 1337\n"


# ----------------------------------------------------------------------------- fixtures
def init_repo(path: Path) -> tuple[Path, str]:
    """``path`` (already holding files) as a one-commit git repo; returns (repo, commit)."""
    git(path, "init", "-q", "-b", "main")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "research repo")
    return path, git(path, "rev-parse", "HEAD")


@pytest.fixture(scope="session")
def template_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The template committed to a fresh repo. Shared, so tests must not change it."""
    repo = tmp_path_factory.mktemp("validate") / "repo"
    shutil.copytree(TEMPLATE, repo, ignore=shutil.ignore_patterns("__pycache__"))
    return init_repo(repo)


@pytest.fixture(scope="session")
def base(template_repo: tuple[Path, str]) -> BaseTree:
    return BaseTree.at(*template_repo)


@pytest.fixture(scope="session")
def data_dir(template_repo: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic data dir (1,000 stories, ~0.2 s), built once with the template's prepare.py."""
    out = tmp_path_factory.mktemp("validate-data") / "synthetic"
    proc = subprocess.run([sys.executable, "prepare.py", "--out", str(out), "--docs", "1000"],
                          cwd=template_repo[0], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def validator(data_dir: Path) -> Validator:
    return Validator(data_dir=data_dir)


def sr(search: str, replace: str, path: str = "train.py") -> SearchReplace:
    return SearchReplace(path=path, search=search, replace=replace)


def proposal(*edits: SearchReplace | WriteFile) -> Proposal:
    return Proposal(description="test proposal", edits=edits)


def rejected_static(validator: Validator, prop: Proposal, base: BaseTree) -> Rejected:
    with pytest.raises(Rejected) as info:
        validator.check_static(prop, base)
    assert "\n" not in str(info.value)
    return info.value


def make_worktree(repo: Path, dest: Path, changed: dict[str, str]) -> Path:
    """What workspace.py will hand us: the base files plus the candidate's changed files."""
    shutil.copytree(repo, dest, ignore=shutil.ignore_patterns(".git"))
    for path, content in changed.items():
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        (dest / path).write_text(content)
    return dest


def rejected_runtime(validator: Validator, worktree: Path, changed: list[str]) -> Rejected:
    with pytest.raises(Rejected) as info:
        validator.check_runtime(worktree, changed)
    assert "\n" not in str(info.value)
    return info.value


# ----------------------------------------------------------------------------- BaseTree
def test_base_tree_reads_commits_not_the_working_tree(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    first = commit_files(repo, {"train.py": "A = 1\n", "sub/mod.py": "B = 2\n"}, "first")
    second = commit_files(repo, {"train.py": "A = 2\n"}, "second")
    (repo / "train.py").write_text("A = 3  # uncommitted\n")
    (repo / "untracked.py").write_text("C = 1\n")

    old, new = BaseTree.at(repo, first), BaseTree.at(repo, "HEAD")
    assert new.commit == second  # a revision name is pinned to its full hash
    assert old.read("train.py") == "A = 1\n" and new.read("train.py") == "A = 2\n"
    assert new.read("sub/mod.py") == "B = 2\n"
    assert new.read("untracked.py") is None and new.read("missing.py") is None
    assert new.read("sub") is None  # a directory is not a file
    assert new.read("./train.py") is None and new.read("sub/../train.py") is None  # exact paths only
    with pytest.raises(ValueError, match="no-such-rev"):
        BaseTree.at(repo, "no-such-rev")


def test_base_tree_is_symlink_covers_parents(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.py").write_text("A = 1\n")
    (repo / "real").mkdir()
    (repo / "real" / "x.py").write_text("X = 1\n")
    (repo / "link.py").symlink_to(outside / "x.py")
    (repo / "lib").symlink_to(outside, target_is_directory=True)
    tree = BaseTree.at(*init_repo(repo))

    assert tree.is_symlink("link.py") and tree.is_symlink("lib") and tree.is_symlink("lib/mod.py")
    assert tree.is_symlink("lib/deeper/mod.py")
    assert not tree.is_symlink("train.py") and not tree.is_symlink("real/x.py")
    assert not tree.is_symlink("absent.py")
    assert tree.read("link.py") is None  # a symlink is not a regular file: never read through it
    assert tree.read("real/x.py") == "X = 1\n"


# ----------------------------------------------------------------------------- the good proposal
def test_constant_change_passes_all_six_steps(template_repo: tuple[Path, str], base: BaseTree,
                                              data_dir: Path, tmp_path: Path) -> None:
    validator = Validator(data_dir=data_dir, dry_run_steps=3)
    changed = validator.check_static(proposal(sr(DEPTH_LINE, DEPTH_LINE.replace("8", "6"))), base)
    assert list(changed) == ["train.py"]
    assert changed["train.py"] == base.read("train.py").replace(DEPTH_LINE, DEPTH_LINE.replace("8", "6"))

    worktree = make_worktree(template_repo[0], tmp_path / "wt", changed)
    result = validator.check_runtime(worktree, changed)
    # The line was parsed from a real run of the candidate: its depth, our step count, the CPU profile.
    assert result.steps == 3
    assert math.isfinite(result.loss) and 0 < result.loss < 7  # ln(689) = 6.54 for the untrained model
    assert "profile cpu" in result.stdout and "depth 6 " in result.stdout
    assert not list(worktree.rglob("__pycache__"))  # the dry run leaves the worktree as it found it


# ----------------------------------------------------------------------------- static corpus
SECRET_ATTEMPTS = [
    ('KEY = os.environ["OPENAI_API_KEY"]', "'OPENAI_API_KEY'"),
    ('KEY = os.getenv("ANTHROPIC_API_KEY")', "'ANTHROPIC_API_KEY'"),
    ('KEY = os.environ.get("HF_TOKEN", "")', "'HF_TOKEN'"),
    ('KEY = os.getenv("openai_api_key")', "'openai_api_key'"),
    ('HAS = "AWS_SECRET_ACCESS_KEY" in os.environ', "'AWS_SECRET_ACCESS_KEY'"),
    ('NAME = "GITHUB_TOKEN"', "'GITHUB_TOKEN'"),
    ("ENV = dict(os.environ)", "whole environment"),
    ("ENV = list(os.environ.items())", "whole environment (os.environ.items)"),
    ("print(os.environ)", "whole environment"),
    ("from os import environ\nENV = environ.copy()", "whole environment (os.environ.copy)"),
    ('NAME = "X"\nVALUE = os.getenv(NAME)', "computed variable name"),
    ('VALUE = os.environ[f"OPENAI_{SEED}"]', "computed variable name"),
    ('ENV = getattr(os, "environ")', "'environ'"),
    ('NETRC = open(os.path.expanduser("~/.netrc")).read()', "credentials file"),
]


@pytest.mark.parametrize(("code", "reason"), SECRET_ATTEMPTS, ids=[c for c, _ in SECRET_ATTEMPTS])
def test_reading_secrets_or_the_environment_is_rejected(validator: Validator, base: BaseTree,
                                                        code: str, reason: str) -> None:
    exc = rejected_static(validator, proposal(sr(SEED_LINE, f"{SEED_LINE}{code}\n")), base)
    assert exc.step == "secrets"
    assert reason in str(exc) and str(exc).startswith("train.py:")


ORDINARY_EDITS = [
    "SEED = 42",
    'EXTRA = os.environ.get("FANOUT_EXTRA", "1")',
    'os.environ["OMP_NUM_THREADS"] = "1"',
    'os.environ.update({"OMP_NUM_THREADS": "2"})',
    'HAS_PROFILE = "FANOUT_PROFILE" in os.environ',
    'LABELS = {"tokens_seen": 0, "max_tokens": 1, "key": 2}',
    "KEY_SIZE = 4",
    "ORDER = sorted([3, 1], key=abs)",
]


@pytest.mark.parametrize("code", ORDINARY_EDITS)
def test_ordinary_edits_pass_the_static_steps(validator: Validator, base: BaseTree, code: str) -> None:
    changed = validator.check_static(proposal(sr(SEED_LINE, f"{code}\n")), base)
    assert f"{code}\n" in changed["train.py"]


def test_the_template_itself_has_no_secret_findings() -> None:
    for name in ("train.py", "prepare.py"):
        assert env_findings(ast.parse((TEMPLATE / name).read_text())) == []


REJECTED_STATIC = [
    # (id, edits, step, reason fragments)
    ("syntax-error", [sr(DEPTH_LINE, "DEPTH = = 6\n")], "syntax", ["train.py:", "DEPTH = = 6"]),
    ("search-not-found", [sr("DEPTH = 12\n", "DEPTH = 6\n")], "apply",
     ["edit 1", "search text not found in train.py", "DEPTH = 12"]),
    ("search-twice", [sr("import torch.nn", "import torch.nn  # again")], "apply",
     ["edit 1", "occurs 2 times in train.py", "exactly once"]),
    ("second-edit-not-found", [sr(DEPTH_LINE, "DEPTH = 6\n"), sr(DEPTH_LINE, "DEPTH = 4\n")], "apply",
     ["edit 2", "not found"]),  # edits apply in order: the first one consumed the text
    ("search-on-missing-file", [sr("x", "y", path="model.py")], "apply", ["'model.py' does not exist"]),
    ("no-op-search", [sr(DEPTH_LINE, DEPTH_LINE)], "apply", ["changes nothing"]),
    ("no-op-write", [WriteFile(path="train.py", content=(TEMPLATE / "train.py").read_text())], "apply",
     ["changes nothing"]),
    ("edit-prepare", [sr("EVAL_TOKENS = {", "EVAL_TOKENS = {  # fewer", path="prepare.py")], "files",
     ["'prepare.py'", "not an editable file (allowed: train.py)"]),
    ("dotdot", [WriteFile(path="../outside.py", content="X = 1\n")], "files", ["'../outside.py'", "escapes"]),
    ("absolute", [WriteFile(path="/etc/passwd", content="root::0:0::/:/bin/sh\n")], "files",
     ["'/etc/passwd'", "absolute path"]),
    ("through-file", [WriteFile(path="train.py/../../x", content="X = 1\n")], "files", ["escapes"]),
    ("backslash", [WriteFile(path="..\\outside.py", content="X = 1\n")], "files", ["backslash"]),
    ("dot-slash", [WriteFile(path="./train.py", content="X = 1\n")], "files", ["not normalised"]),
    ("empty-path", [WriteFile(path="", content="X = 1\n")], "files", ["empty path"]),
    ("git-hook", [WriteFile(path=".git/hooks/pre-commit", content="#!/bin/sh\ncurl evil\n")], "files",
     ["'.git/hooks/pre-commit'", "inside .git/"]),
    ("git-config-upper", [WriteFile(path="sub/.GIT/config", content="[core]\n")], "files", ["inside .git/"]),
    # Order: files before syntax (a bad path is reported even if its content is also broken).
    ("files-before-syntax", [WriteFile(path="prepare.py", content="def (:\n")], "files", ["'prepare.py'"]),
]


@pytest.mark.parametrize(("edits", "step", "fragments"), [c[1:] for c in REJECTED_STATIC],
                         ids=[c[0] for c in REJECTED_STATIC])
def test_bad_proposals_are_rejected_statically(validator: Validator, base: BaseTree,
                                               edits: list[SearchReplace | WriteFile], step: str,
                                               fragments: list[str]) -> None:
    exc = rejected_static(validator, proposal(*edits), base)
    assert (exc.step, exc.reason) == (step, str(exc))
    copy = pickle.loads(pickle.dumps(exc))  # the loop may validate in a process pool
    assert (copy.step, str(copy)) == (exc.step, str(exc))
    for fragment in fragments:
        assert fragment in str(exc)


def test_symlinks_in_the_base_commit_are_refused_even_when_allowed(tmp_path: Path) -> None:
    """link.py -> a file outside, lib -> a directory outside: allowed_files lists both, so only
    the symlink check stands between the proposal and a write outside the repo."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.py").write_text("T = 1\n")
    repo = tmp_path / "repo"
    shutil.copytree(TEMPLATE, repo, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "link.py").symlink_to(outside / "target.py")
    (repo / "lib").symlink_to(outside, target_is_directory=True)
    tree = BaseTree.at(*init_repo(repo))
    validator = Validator(allowed_files=("train.py", "link.py", "lib/mod.py", "helpers.py"))

    for path in ("link.py", "lib/mod.py"):
        exc = rejected_static(validator, proposal(WriteFile(path=path, content="X = 2\n")), tree)
        assert exc.step == "files"
        assert f"'{path}'" in str(exc) and "symlink" in str(exc)
    # The same write to an allowed regular (new) file passes: it was the symlink that was refused.
    assert validator.check_static(proposal(WriteFile(path="helpers.py", content="X = 2\n")), tree) == {
        "helpers.py": "X = 2\n"}
    assert (outside / "target.py").read_text() == "T = 1\n"


def test_a_secret_the_base_already_reads_is_not_held_against_a_proposal(tmp_path: Path) -> None:
    """Only code the proposal adds is judged: a repo that logs to W&B can still be edited."""
    repo = tmp_path / "repo"
    shutil.copytree(TEMPLATE, repo, ignore=shutil.ignore_patterns("__pycache__"))
    wandb = 'WANDB_KEY = os.environ.get("WANDB_API_KEY")\n'
    (repo / "train.py").write_text((repo / "train.py").read_text().replace(SEED_LINE, SEED_LINE + wandb))
    tree = BaseTree.at(*init_repo(repo))
    validator = Validator()

    moved = proposal(sr(SEED_LINE + wandb, SEED_LINE), sr(DEPTH_LINE, wandb + "DEPTH = 6\n"))
    assert "DEPTH = 6" in validator.check_static(moved, tree)["train.py"]
    another = proposal(sr(SEED_LINE, SEED_LINE + 'HF = os.environ.get("HF_TOKEN")\n'))
    exc = rejected_static(validator, another, tree)
    assert exc.step == "secrets" and "'HF_TOKEN'" in str(exc) and "WANDB" not in str(exc)


# ----------------------------------------------------------------------------- runtime steps
def test_missing_import_is_rejected_before_the_dry_run(template_repo: tuple[Path, str], base: BaseTree,
                                                      validator: Validator, tmp_path: Path) -> None:
    changed = validator.check_static(proposal(sr("import numpy as np", "import numpyy as np")), base)
    worktree = make_worktree(template_repo[0], tmp_path / "wt", changed)
    exc = rejected_runtime(validator, worktree, list(changed))
    assert exc.step == "imports"
    assert "'numpyy'" in str(exc) and str(exc).startswith("train.py:27:")


def test_import_check_resolves_local_modules_and_skips_guarded_imports(
        template_repo: tuple[Path, str], validator: Validator, tmp_path: Path) -> None:
    fine = ("try:\n    import not_installed_xyz\nexcept ImportError:\n    not_installed_xyz = None\n"
            "import numpy.linalg\nfrom prepare import Data\nfrom . import sibling\n")
    worktree = make_worktree(template_repo[0], tmp_path / "wt", {"helpers.py": fine, "other.py": (
        'import importlib\nmod = importlib.import_module("not_installed_abc")\n')})
    validator.check_imports(worktree, ["helpers.py"])  # must not raise
    exc = rejected_runtime(validator, worktree, ["helpers.py", "other.py"])
    assert exc.step == "imports" and "other.py:2: cannot import 'not_installed_abc'" in str(exc)


def test_shape_mismatch_is_caught_only_by_the_dry_run(template_repo: tuple[Path, str], base: BaseTree,
                                                     validator: Validator, tmp_path: Path) -> None:
    wider = proposal(sr("self.proj = nn.Linear(dim, dim, bias=False)",
                        "self.proj = nn.Linear(dim, 2 * dim, bias=False)"))
    changed = validator.check_static(wider, base)  # compiles, imports fine...
    worktree = make_worktree(template_repo[0], tmp_path / "wt", changed)
    validator.check_imports(worktree, changed)
    exc = rejected_runtime(validator, worktree, list(changed))  # ...and crashes in the first step
    assert exc.step == "dry_run"
    assert str(exc).startswith("exit 1: RuntimeError: The size of tensor a (64) must match")
    assert "(at train.py:" in str(exc)  # where in the candidate's own code, not inside torch


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie is dead, waiting only for its parent to reap it


def _processes_in(directory: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if Path(os.readlink(proc / "cwd")) == directory:
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_infinite_loop_is_killed_with_its_whole_process_group(
        template_repo: tuple[Path, str], base: BaseTree, data_dir: Path, tmp_path: Path) -> None:
    """The candidate starts a child and then spins: after the timeout neither may survive."""
    hang = ("T_START = time.time()\nimport os\nimport subprocess\n"
            'child = subprocess.Popen(["sleep", "300"])\n'
            'open("pids.txt", "w").write(f"{os.getpid()} {child.pid}")\n'
            "while True:\n    pass\n")
    validator = Validator(data_dir=data_dir, dry_run_timeout_s=5)
    changed = validator.check_static(proposal(sr("T_START = time.time()\n", hang)), base)
    worktree = make_worktree(template_repo[0], tmp_path / "wt", changed).resolve()

    t0 = time.monotonic()
    exc = rejected_runtime(validator, worktree, list(changed))
    assert exc.step == "dry_run" and str(exc).startswith("did not finish within 5s")
    assert time.monotonic() - t0 < 15
    pids = [int(p) for p in (worktree / "pids.txt").read_text().split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 5  # the orphaned sleep is reaped by init, asynchronously
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if _alive(pid)]
    assert _processes_in(worktree) == []


def test_runtime_sees_a_minimal_environment_never_ours(tmp_path: Path, data_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in dry-run command reports what it was given; no keys of ours may reach it."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    monkeypatch.setenv("PYTHONPATH", "/must/not/leak")
    monkeypatch.setenv("FANOUT_TIME_BUDGET_S", "999")
    worktree = tmp_path / "wt"
    worktree.mkdir()
    (worktree / "report.py").write_text(
        "import json, os, sys\n"
        'json.dump({"env": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv[1:],\n'
        '           "leader": os.getsid(0) == os.getpid()}, open("seen.json", "w"))\n'
        'print("fanout-dry-run loss=1.25 steps=2")\n')
    validator = Validator(dry_run_command=("report.py", "--x"), data_dir=data_dir,
                          extra_env={"FANOUT_EXTRA": "yes", "FANOUT_DRY_RUN": "99"})

    result = validator.check_runtime(worktree, ["report.py"])
    assert (result.loss, result.steps) == (1.25, 2)
    seen = json.loads((worktree / "seen.json").read_text())
    env = seen["env"]
    assert "OPENAI_API_KEY" not in env and "PYTHONPATH" not in env and "FANOUT_TIME_BUDGET_S" not in env
    assert env["FANOUT_PROFILE"] == "cpu" and env["OMP_NUM_THREADS"] == "1"
    assert env["FANOUT_DRY_RUN"] == "2"  # the protocol wins over extra_env
    assert env["FANOUT_DATA_DIR"] == str(data_dir.resolve()) and env["FANOUT_EXTRA"] == "yes"
    home = Path(env["HOME"])  # an empty scratch home: no ~/.netrc, ~/.aws of ours to read
    assert home != Path.home() and home.is_dir() and not any(home.iterdir())
    allowed = {"PATH", "HOME", "LANG", "LANGUAGE", "TMPDIR", "FANOUT_PROFILE", "OMP_NUM_THREADS",
               "FANOUT_DRY_RUN", "FANOUT_DATA_DIR", "FANOUT_EXTRA", "FANOUT_VERIFY",
               "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}
    assert {k for k in env if not k.startswith("LC_")} <= allowed
    assert seen["cwd"] == str(worktree.resolve()) and seen["argv"] == ["--x"]
    assert seen["leader"]  # its own session, so its process group can be killed as one


DRY_RUN_FAILURES = [
    ("no-line", 'print("step 1 | loss 6.5")\n', "exited 0 but printed no 'fanout-dry-run loss=...' line"),
    ("nan-loss", 'print("fanout-dry-run loss=nan steps=2")\n', "dry-run loss is not a finite number: nan"),
    ("diverged", 'import sys\nprint("train.py: error: training diverged at step 1", file=sys.stderr)\n'
                 "sys.exit(3)\n", "exit 3: train.py: error: training diverged at step 1"),
    ("chained", 'def f():\n    raise KeyError("x")\ntry:\n    f()\nexcept KeyError as exc:\n'
                '    raise ValueError("bad width 7\\nsecond line") from exc\n',
     "exit 1: ValueError: bad width 7 (at stub.py:6)"),
    ("signal", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", "killed by SIGKILL"),
]


@pytest.mark.parametrize(("script", "reason"), [c[1:] for c in DRY_RUN_FAILURES],
                         ids=[c[0] for c in DRY_RUN_FAILURES])
def test_dry_run_failures_are_reported_in_one_line(tmp_path: Path, script: str, reason: str) -> None:
    worktree = tmp_path / "wt"
    worktree.mkdir()
    (worktree / "stub.py").write_text(script)
    exc = rejected_runtime(Validator(dry_run_command=("stub.py",)), worktree, ["stub.py"])
    assert exc.step == "dry_run" and str(exc) == reason
