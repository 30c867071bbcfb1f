"""jobimage/entrypoint.sh on CPU: mounted code, an exact git commit, and exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from trainer_helpers import copy_template, job_env, parse_job_output, run

ENTRYPOINT = Path(__file__).resolve().parents[2] / "jobimage" / "entrypoint.sh"

pytest.importorskip("torch")


@pytest.mark.slow
def test_mounted_code_runs_and_reports_to_the_termination_log(code_dir: Path, data_dir: Path,
                                                              tmp_path: Path) -> None:
    term = tmp_path / "termination-log"
    term.touch()  # Kubernetes creates it; the entrypoint only writes an existing one
    result_file = tmp_path / "result.json"
    env = job_env(data_dir, 1.0, FANOUT_CODE_DIR=str(code_dir),
                  FANOUT_TERMINATION_LOG=str(term), FANOUT_RESULT_FILE=str(result_file))
    proc = run(["bash", str(ENTRYPOINT)], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    _, result = parse_job_output(proc.stdout)
    assert result["data_check"] == "sizes"  # the entrypoint hashed; the trainer did not
    assert "ok:" in proc.stderr  # prepare.py --verify ran first
    for path in (term, result_file):
        line = path.read_text().strip()
        assert line.startswith("fanout-result ")
        assert json.loads(line.removeprefix("fanout-result "))["val_bpb"] == result["val_bpb"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_exact_commit_is_checked_out_from_a_git_url(data_dir: Path, tmp_path: Path) -> None:
    repo = copy_template(tmp_path / "origin")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c",
                               "user.email=t@example.invalid", *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "good")
    good = git("rev-parse", "HEAD")
    (repo / "train.py").write_text("import sys\nsys.exit('this commit must not run')\n")
    git("commit", "-qam", "later commit on the same branch")
    env = job_env(data_dir, 1.0, FANOUT_GIT_URL=f"file://{repo}", FANOUT_GIT_COMMIT=good,
                  FANOUT_WORK_DIR=str(tmp_path / "work"),
                  FANOUT_COMMAND="python train.py && git rev-parse HEAD")
    proc = run(["bash", str(ENTRYPOINT)], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == good
    unknown = job_env(data_dir, FANOUT_GIT_URL=f"file://{repo}", FANOUT_GIT_COMMIT="0" * 40,
                      FANOUT_WORK_DIR=str(tmp_path / "work2"))
    proc = run(["bash", str(ENTRYPOINT)], cwd=tmp_path, env=unknown)
    assert proc.returncode == 64 and "push it first" in proc.stderr


def test_exit_codes_propagate_and_bad_data_stops_early(code_dir: Path, data_dir: Path,
                                                       tmp_path: Path) -> None:
    term = tmp_path / "termination-log"
    term.touch()
    env = job_env(data_dir, FANOUT_CODE_DIR=str(code_dir), FANOUT_TERMINATION_LOG=str(term),
                  FANOUT_COMMAND="echo training; exit 7")
    proc = run(["bash", str(ENTRYPOINT)], cwd=tmp_path, env=env)
    assert proc.returncode == 7 and proc.stdout.startswith("training")
    assert term.read_text().strip() == "fanout-error exit 7"
    env = job_env(tmp_path / "missing", FANOUT_CODE_DIR=str(code_dir))
    proc = run(["bash", str(ENTRYPOINT)], cwd=tmp_path, env=env)
    assert proc.returncode == 65 and "does not exist" in proc.stderr
    proc = run(["bash", str(ENTRYPOINT)], cwd=tmp_path, env=job_env(data_dir))
    assert proc.returncode == 64 and "FANOUT_CODE_DIR" in proc.stderr
