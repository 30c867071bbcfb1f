"""prepare.py builds a checked, reproducible data directory and refuses to clobber one."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from trainer_helpers import prepare, run


def shard_tokens(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16, offset=64)


def test_synthetic_directory_layout_and_manifest(data_dir: Path) -> None:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    names = {p.name for p in data_dir.iterdir()}
    assert {"manifest.json", "tokenizer.json", "token_bytes.npy", "val.bin"} <= names
    assert any(n.startswith("train_") for n in names)
    assert set(manifest["files"]) == names - {"manifest.json"}
    for name, meta in manifest["files"].items():
        body = (data_dir / name).read_bytes()
        assert meta["bytes"] == len(body)
        assert meta["sha256"] == hashlib.sha256(body).hexdigest()
    assert manifest["settings"]["source"] == "synthetic"
    assert manifest["settings"]["vocab_size"] == 4096  # the requested bound
    vocab = manifest["vocab_size"]  # what BPE reached: the toy corpus runs out of pairs
    assert 257 < vocab <= 4096
    assert json.loads((data_dir / "tokenizer.json").read_text())["vocab_size"] == vocab


def test_token_bytes_account_for_every_byte(data_dir: Path) -> None:
    """val_bpb divides by the bytes of the target tokens: they must add up to the text."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    token_bytes = np.load(data_dir / "token_bytes.npy")
    val = shard_tokens(data_dir / "val.bin")
    assert len(val) == manifest["counts"]["val_tokens"]
    assert int(token_bytes[val].sum()) == manifest["counts"]["val_bytes"]
    eot = manifest["vocab_size"] - 1
    assert token_bytes[eot] == 0 and val[0] == eot
    assert int(val.max()) < manifest["vocab_size"]


def test_same_settings_give_identical_files(code_dir: Path, data_dir: Path, tmp_path: Path):
    out = tmp_path / "again"
    t0 = time.perf_counter()
    proc = prepare(code_dir, out, "--docs", "4000")
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 20, f"prepare of a ~1 MB corpus took {elapsed:.1f}s"
    first = json.loads((data_dir / "manifest.json").read_text())["files"]
    second = json.loads((out / "manifest.json").read_text())["files"]
    assert first == second


def test_refuses_to_overwrite_different_settings_unless_forced(code_dir: Path, tmp_path: Path):
    out = tmp_path / "d"
    assert prepare(code_dir, out, "--docs", "300").returncode == 0
    again = prepare(code_dir, out, "--docs", "300")
    assert again.returncode == 0 and "already prepared" in again.stdout
    clash = prepare(code_dir, out, "--docs", "300", "--vocab-size", "300")
    assert clash.returncode != 0
    err = clash.stderr.strip()
    assert len(err.splitlines()) == 1 and "vocab_size" in err and "--force" in err
    forced = prepare(code_dir, out, "--docs", "300", "--vocab-size", "300", "--force")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((out / "manifest.json").read_text())["vocab_size"] == 300
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    refused = prepare(code_dir, stray, "--docs", "300")
    assert refused.returncode != 0 and "--force" in refused.stderr
    assert (stray / "notes.txt").read_text() == "mine"


def test_verify_reports_ok_then_names_the_corrupted_file(code_dir: Path, tmp_path: Path):
    out = tmp_path / "d"
    assert prepare(code_dir, out, "--docs", "300").returncode == 0
    ok = run([sys.executable, "prepare.py", "--verify", str(out)], cwd=code_dir)
    assert ok.returncode == 0 and ok.stdout.startswith("ok:")
    shard = out / "train_000.bin"
    body = bytearray(shard.read_bytes())
    body[len(body) // 2] ^= 0xFF  # same size, different content: only the hash can tell
    shard.write_bytes(bytes(body))
    bad = run([sys.executable, "prepare.py", "--verify", str(out)], cwd=code_dir)
    assert bad.returncode != 0
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "train_000.bin" in bad.stderr and "--force" in bad.stderr


def test_local_text_and_jsonl_sources(code_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n\n".join(f"Paragraph {i} is about cats." for i in range(40)))
    (corpus / "b.jsonl").write_text("\n".join(json.dumps({"text": f"Dogs bark {i} times."})
                                              for i in range(40)))
    out = tmp_path / "local"
    proc = prepare(code_dir, out, "--source", str(corpus), "--vocab-size", "300")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train_docs"] + manifest["counts"]["val_docs"] == 80
    assert manifest["settings"]["source"] == str(corpus.resolve())


def test_bad_sources_fail_with_one_line(code_dir: Path, tmp_path: Path) -> None:
    missing = prepare(code_dir, tmp_path / "x", "--source", str(tmp_path / "nope.txt"))
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
    assert "--source" in missing.stderr
    pq = tmp_path / "shard.parquet"
    pq.write_bytes(b"PAR1 not really")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        proc = prepare(code_dir, tmp_path / "y", "--source", str(pq))
        assert proc.returncode != 0 and "pip install pyarrow" in proc.stderr
