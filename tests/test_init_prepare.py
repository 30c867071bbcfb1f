"""`fanout init` scaffolds the template into a repo; `fanout prepare` builds the data as a job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fanout_research.testing.repo import git

FANOUT = str(Path(sys.executable).parent / "fanout")
TEMPLATE_FILES = {"train.py", "prepare.py", "program.md", "fanout.toml", "README.md", ".gitignore"}


def fanout(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FANOUT, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def scaffolded(tmp_path: Path) -> Path:
    done = fanout(tmp_path, "init", "lab", "--tag", "lab")
    assert done.returncode == 0, done.stderr
    repo = tmp_path / "lab"
    assert done.stdout.strip() == str(repo.resolve())
    return repo


def test_init_makes_a_clean_repo_holding_the_template(scaffolded: Path) -> None:
    tracked = set(git(scaffolded, "ls-files").splitlines())
    assert tracked >= TEMPLATE_FILES
    assert not any("__pycache__" in path for path in tracked)
    assert git(scaffolded, "status", "--porcelain") == ""
    assert git(scaffolded, "branch", "--show-current") == "main"
    assert 'tag = "lab"' in (scaffolded / "fanout.toml").read_text()


def test_init_refuses_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    done = fanout(tmp_path, "init", "busy")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("fanout: error: ") and len(done.stderr.splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]


def test_prepare_runs_as_a_job_and_builds_the_data_directory(scaffolded: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = scaffolded / "fanout.toml"
    text = config.read_text().replace('data_dir = "~/.cache/fanout/data/synthetic"', f'data_dir = "{data}"')
    config.write_text(text.replace('vocab_size = 4096', 'vocab_size = 512\nargs = ["--docs", "800"]'))
    git(scaffolded, "commit", "-qam", "small data")

    done = fanout(scaffolded, "prepare")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(data.resolve())
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["settings"]["source"] == "synthetic"
    ledger = [json.loads(line) for line in
              (scaffolded / ".git/fanout/studies/lab/jobs.jsonl").read_text().splitlines()]
    submitted = [r for r in ledger if r["event"] == "submitted"]
    assert len(submitted) == 1 and submitted[0]["spec"]["requires_metric"] is False
    assert submitted[0]["spec"]["command"][:2] == ["python", "prepare.py"]
    assert [r["result"]["phase"] for r in ledger if r["event"] == "result"] == ["succeeded"]

    again = fanout(scaffolded, "prepare")  # same settings: the directory is accepted as it is
    assert again.returncode == 0, again.stderr


def test_prepare_needs_a_data_directory(scaffolded: Path) -> None:
    config = scaffolded / "fanout.toml"
    config.write_text(config.read_text().replace('data_dir = "~/.cache/fanout/data/synthetic"', ""))
    git(scaffolded, "commit", "-qam", "no data dir")
    done = fanout(scaffolded, "prepare")
    assert done.returncode == 2
    assert done.stderr == "fanout: error: no data directory: set [job] data_dir in fanout.toml\n"
    assert not (scaffolded / ".git/fanout/studies/lab/jobs.jsonl").exists()
