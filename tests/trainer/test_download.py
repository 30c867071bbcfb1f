"""The online sources' downloader, against a real HTTP server on 127.0.0.1 (no internet here).

The server honours Range requests, can drop the connection half-way through a body, and can
answer 503 first, which is what resuming and retrying have to survive.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from trainer_helpers import prepare, run

pytest.importorskip("httpx")
pytest.importorskip("tenacity")


class Server(http.server.ThreadingHTTPServer):
    files: dict[str, bytes]
    requests: list[tuple[str, str | None]]
    drop_first: set[str]  # paths whose first GET sends half the body, then hangs up
    fail_first: set[str]  # paths whose first GET answers 503


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv, path = self.server, self.path.lstrip("/")
        srv.requests.append((path, self.headers.get("Range")))
        if path not in srv.files:
            self.send_error(404)
            return
        if path in srv.fail_first:
            srv.fail_first.discard(path)
            self.send_error(503)
            return
        body, start = srv.files[path], 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m:
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if path in srv.drop_first:
            srv.drop_first.discard(path)
            self.wfile.write(body[start : start + (len(body) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(("127.0.0.1", 0), Handler)
    srv.files, srv.requests, srv.drop_first, srv.fail_first = {}, [], set(), set()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def stories(n: int, seed: int) -> bytes:
    text = "\n<|endoftext|>\n".join(
        f"Story {seed}-{i}: a fox found {i % 7} red kites and shared them with a duck."
        for i in range(n))
    return text.encode()


def test_tinystories_download_resumes_a_dropped_transfer(server: Server, code_dir: Path,
                                                         tmp_path: Path) -> None:
    train, valid = stories(400, 1), stories(60, 2)
    server.files = {"TinyStoriesV2-GPT4-train.txt": train, "TinyStoriesV2-GPT4-valid.txt": valid}
    server.drop_first = {"TinyStoriesV2-GPT4-train.txt"}
    server.fail_first = {"TinyStoriesV2-GPT4-valid.txt"}
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    cache = tmp_path / "cache"
    proc = prepare(code_dir, tmp_path / "ts", "--source", "tinystories", "--base-url", base,
                   "--cache-dir", str(cache), "--vocab-size", "400")
    assert proc.returncode == 0, proc.stderr
    got = cache / "tinystories" / "train.txt"
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(train).digest()
    assert (cache / "tinystories" / "valid.txt").read_bytes() == valid
    train_requests = [r for p, r in server.requests if p.endswith("train.txt")]
    assert train_requests[0] is None
    assert train_requests[1] == f"bytes={(len(train)) // 2}-"  # resumed, not restarted
    assert len([p for p, _ in server.requests if p.endswith("valid.txt")]) == 2  # 503, retry
    manifest = json.loads((tmp_path / "ts" / "manifest.json").read_text())
    assert manifest["settings"]["source"] == "tinystories"
    assert manifest["counts"] == manifest["counts"] | {"train_docs": 400, "val_docs": 60}


def test_partial_file_from_an_earlier_run_is_continued(server: Server, code_dir: Path,
                                                       tmp_path: Path) -> None:
    train, valid = stories(200, 3), stories(30, 4)
    server.files = {"TinyStoriesV2-GPT4-train.txt": train, "TinyStoriesV2-GPT4-valid.txt": valid}
    cache = tmp_path / "cache" / "tinystories"
    cache.mkdir(parents=True)
    (cache / "train.txt.part").write_bytes(train[:1000])  # left by a killed job
    (cache / "valid.txt.part").write_bytes(valid)  # complete, only the rename was missed
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    proc = prepare(code_dir, tmp_path / "ts", "--source", "tinystories", "--base-url", base,
                   "--cache-dir", str(tmp_path / "cache"), "--vocab-size", "300")
    assert proc.returncode == 0, proc.stderr
    assert (cache / "train.txt").read_bytes() == train
    assert (cache / "valid.txt").read_bytes() == valid
    assert ("TinyStoriesV2-GPT4-train.txt", "bytes=1000-") in server.requests
    assert not list(cache.glob("*.part"))


def test_missing_remote_file_fails_without_retry_storm(server: Server, code_dir: Path,
                                                       tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    proc = run([sys.executable, "prepare.py", "--out", str(tmp_path / "ts"), "--source",
                "tinystories", "--base-url", base, "--cache-dir", str(tmp_path / "c")],
               cwd=code_dir)
    assert proc.returncode != 0 and "404" in proc.stderr
    assert len(server.requests) == 1
