"""train.py end to end on the CPU profile: it learns, reports, and fails loudly and clearly."""

from __future__ import annotations

import ast
import json
import re
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from trainer_helpers import copy_template, job_env, parse_job_output, prepare, run

pytest.importorskip("torch")


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()}


@pytest.fixture
def read_only_data(data_dir: Path) -> Iterator[Path]:
    """The shared data dir with every write bit removed, restored afterwards."""
    modes = {p: p.stat().st_mode for p in [data_dir, *data_dir.iterdir()]}
    for p in [*data_dir.iterdir(), data_dir]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    yield data_dir
    for p, mode in modes.items():
        p.chmod(mode)


def one_line_error(proc) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "fanout-result" not in proc.stdout
    return lines[0]


@pytest.mark.slow
def test_short_run_learns_on_read_only_data(code_dir: Path, read_only_data: Path) -> None:
    before = snapshot(read_only_data)
    proc = run([sys.executable, "train.py"], cwd=code_dir, env=job_env(read_only_data, 4.0))
    assert proc.returncode == 0, proc.stderr
    block, result = parse_job_output(proc.stdout)
    assert snapshot(read_only_data) == before  # nothing written, nothing touched
    for key, value in block.items():
        assert result[key] == pytest.approx(value, abs=0.051), key
    assert result["profile"] == "cpu" and result["dtype"] == "float32"
    assert result["attention"] in {"flash", "efficient", "math"}
    assert result["threads"] == 1 and result["job"] == "test"
    assert result["data_check"] == "sha256"
    # An untrained model (zero output head) predicts uniformly: log2(vocab) bits per token.
    assert result["val_bpb"] < 0.5 * result["uniform_bpb"], result
    assert 4.0 <= result["training_seconds"] < 8.0
    assert result["total_seconds"] < 40
    assert result["num_steps"] >= 5 and result["depth"] == 8
    assert result["peak_vram_mb"] == 0.0 and result["mfu_percent"] == 0.0


def test_knobs_are_plain_literals_a_proposer_can_rewrite(tmp_path: Path) -> None:
    code = copy_template(tmp_path / "repo")
    tree = ast.parse((code / "train.py").read_text())
    knobs = {t.id: ast.literal_eval(node.value) for node in tree.body
             if isinstance(node, ast.Assign) for t in node.targets
             if isinstance(t, ast.Name) and t.id.isupper() and isinstance(node.value, ast.Constant)}
    for name in ["DEPTH", "ASPECT_RATIO", "HEAD_DIM", "SEQ_LEN", "TOTAL_BATCH_SIZE", "MATRIX_LR",
                 "EMBEDDING_LR", "UNEMBEDDING_LR", "WEIGHT_DECAY", "WARMUP_RATIO",
                 "WARMDOWN_RATIO", "PROFILE", "SEED"]:
        assert name in knobs, name
    assert knobs["DEPTH"] == 8 and knobs["SEQ_LEN"] == 2048


def test_missing_and_unprepared_data_dirs(code_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    line = one_line_error(run([sys.executable, "train.py"], cwd=code_dir, env=job_env(missing)))
    assert "does not exist" in line and f"prepare.py --out {missing}" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(run([sys.executable, "train.py"], cwd=code_dir, env=job_env(empty)))
    assert "manifest.json" in line and f"prepare.py --out {empty}" in line


def test_corrupted_shard_is_caught_at_start_up(code_dir: Path, data_dir: Path, tmp_path: Path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    shard = copy / "train_000.bin"
    body = bytearray(shard.read_bytes())
    body[-3] ^= 0x5A
    shard.write_bytes(bytes(body))
    line = one_line_error(run([sys.executable, "train.py"], cwd=code_dir, env=job_env(copy)))
    assert "train_000.bin" in line and "sha256" in line and "--force" in line
    shard.write_bytes(bytes(body[:-100]))  # truncated: caught by size alone
    line = one_line_error(run([sys.executable, "train.py"], cwd=code_dir,
                              env=job_env(copy, FANOUT_VERIFY="sizes")))
    assert "train_000.bin" in line and "bytes" in line and "--force" in line


def test_tokenizer_from_another_preparation_is_refused(code_dir: Path, data_dir: Path,
                                                       tmp_path: Path) -> None:
    """A consistent-looking manifest does not hide shards made with another vocabulary."""
    other = tmp_path / "other"
    assert prepare(code_dir, other, "--docs", "300", "--vocab-size", "300").returncode == 0
    mixed = tmp_path / "mixed"
    shutil.copytree(data_dir, mixed)
    for name in ("tokenizer.json", "token_bytes.npy"):
        shutil.copy(other / name, mixed / name)
    ours = json.loads((mixed / "manifest.json").read_text())
    theirs = json.loads((other / "manifest.json").read_text())
    ours["vocab_size"], ours["tokenizer_id"] = theirs["vocab_size"], theirs["tokenizer_id"]
    for name in ("tokenizer.json", "token_bytes.npy"):
        ours["files"][name] = theirs["files"][name]
    (mixed / "manifest.json").write_text(json.dumps(ours))
    line = one_line_error(run([sys.executable, "train.py"], cwd=code_dir, env=job_env(mixed)))
    assert "vocabulary mismatch" in line and "--force" in line


def test_unknown_and_unavailable_profiles(code_dir: Path, data_dir: Path) -> None:
    env = job_env(data_dir, FANOUT_PROFILE="tpu")
    line = one_line_error(run([sys.executable, "train.py"], cwd=code_dir, env=env))
    assert "'tpu'" in line and "FANOUT_PROFILE" in line and "cpu" in line
    import torch

    if not torch.cuda.is_available():
        env = job_env(data_dir, FANOUT_PROFILE="h100")
        line = one_line_error(run([sys.executable, "train.py"], cwd=code_dir, env=env))
        assert "CUDA" in line and "FANOUT_PROFILE=cpu" in line


def test_divergence_exits_non_zero_with_advice(data_dir: Path, tmp_path: Path) -> None:
    code = copy_template(tmp_path / "repo")
    src = (code / "train.py").read_text()
    for knob in ("MATRIX_LR", "EMBEDDING_LR", "UNEMBEDDING_LR"):
        src, n = re.subn(rf"^{knob} = \S+", f"{knob} = 1e30", src, flags=re.M)
        assert n == 1
    (code / "train.py").write_text(src)
    proc = run([sys.executable, "train.py"], cwd=code, env=job_env(data_dir, 30.0))
    line = one_line_error(proc)
    assert proc.returncode == 3
    assert "diverged" in line and "MATRIX_LR" in line


@pytest.mark.slow
def test_fp16_grad_scaler_path_runs_on_cpu(data_dir: Path, tmp_path: Path) -> None:
    """The T4 recipe (fp16 autocast + GradScaler over both optimizers) can't meet a T4 here,
    so run it through the CPU profile with its dtype switched, on a tiny model."""
    code = copy_template(tmp_path / "repo")
    src = (code / "train.py").read_text()
    src, n = re.subn(r'"cpu": \{"dtype": "float32"', '"cpu": {"dtype": "float16"', src)
    assert n == 1
    src, n = re.subn(r"^DEPTH = \d+", "DEPTH = 2", src, flags=re.M)
    assert n == 1
    (code / "train.py").write_text(src)
    proc = run([sys.executable, "train.py"], cwd=code, env=job_env(data_dir, 1.0))
    assert proc.returncode == 0, proc.stderr
    _, result = parse_job_output(proc.stdout)
    assert result["dtype"] == "float16" and result["depth"] == 2
    assert result["val_bpb"] < result["uniform_bpb"]
