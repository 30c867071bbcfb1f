#!/usr/bin/env python3
"""Build the study's data directory once, and hold the fixed evaluation.

This file is part of the research repo but proposals never edit it: ``train.py`` imports the
data loading and ``evaluate_bpb`` from here, so no candidate can change what val_bpb means.

    python prepare.py --out DIR [--source synthetic|tinystories|climbmix|PATH]
                      [--vocab-size N] [--force]
    python prepare.py --verify DIR [--level auto|sizes|full]

The directory it writes is used read-only afterwards (one copy, mounted into every job):

    manifest.json      format, settings, counts, and size + sha256 of every other file
    tokenizer.json     byte-level BPE: merges, split pattern, special tokens
    token_bytes.npy    int32[vocab]: UTF-8 bytes each token stands for (0 for specials)
    train_NNN.bin      64-byte header + uint16 tokens, documents start with <|endoftext|>
    val.bin            the fixed validation split, same format

Only numpy is needed to prepare; torch only for ``evaluate_bpb``; httpx + tenacity only for
the online sources; pyarrow only for parquet.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import math
import os
import random
import re
import shutil
import struct
import sys
import time
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "fanout-data/1"
DEFAULT_VOCAB_SIZE = 4096
EOT = "<|endoftext|>"
HEADER = struct.Struct("<8sIIQ16s")  # magic, version, vocab size, tokens, tokenizer id
HEADER_BYTES = 64
MAGIC = b"FANOUTTK"
SHARD_TOKENS = 1 << 24
# Validation tokens scored per profile: fixed here so that a proposal cannot shrink the eval.
EVAL_TOKENS = {"cpu": 1 << 15, "t4": 1 << 21, "ampere": 10 << 20, "h100": 10 << 20}
# Above this many bytes a start-up check hashes only the small files and compares sizes.
AUTO_HASH_LIMIT = 1 << 30
SPLIT = re.compile(r"'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+(?!\S)|\s+")
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/"
CLIMBMIX_VAL_SHARD = 6542


class DataError(Exception):
    """A problem with the data directory; the message is one line and names the fix."""


# --------------------------------------------------------------------------- synthetic corpus
NAMES = {"Lily": "she", "Tom": "he", "Mia": "she", "Ben": "he", "Sue": "she", "Max": "he",
         "Anna": "she", "Sam": "he", "Zoe": "she", "Leo": "he", "Ella": "she", "Jack": "he",
         "Ruby": "she", "Finn": "he", "Nora": "she", "Otto": "he"}
CREATURES = ["girl", "boy", "cat", "dog", "bunny", "bird", "fox", "bear", "duck", "frog"]
ADJECTIVES = ["little", "happy", "brave", "curious", "kind", "silly", "tiny", "shy", "clever"]
PLACES = ["the park", "the forest", "the garden", "the beach", "the farm", "the town"]
THINGS = ["ball", "kite", "box", "hat", "key", "shell", "drum", "boat", "cup", "book"]
COLORS = ["red", "blue", "green", "yellow", "shiny", "big", "small", "old"]
ACTIVITIES = {"play": "played", "run": "ran", "sing": "sang", "dance": "danced",
              "jump": "jumped", "read": "read", "swim": "swam", "draw": "drew"}
FOODS = ["an apple", "a cake", "some soup", "a cookie", "some bread", "a pear"]
WEATHER = ["the sun was warm", "it was raining", "the wind was cold", "the sky was blue"]
FEELINGS = ["happy", "excited", "surprised", "proud", "glad"]
TROUBLES = [("fell into the water", "pulled it out with a long stick", "to help each other"),
            ("got stuck in a tree", "climbed up and got it down", "to be brave"),
            ("broke into two pieces", "fixed it with some glue", "to be patient"),
            ("rolled far away", "ran fast and caught it", "to never give up"),
            ("was lost in the grass", "looked everywhere until they found it", "to be careful")]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def synthetic_story(rng: random.Random) -> str:
    """One short story from templates: names, pronouns and objects recur, so context helps."""
    name, friend = rng.sample(list(NAMES), 2)
    he, thing, color = NAMES[name], rng.choice(THINGS), rng.choice(COLORS)
    place, act = rng.choice(PLACES), rng.choice(list(ACTIVITIES))
    trouble, fix, moral = rng.choice(TROUBLES)
    s = [f"Once upon a time, there was a {rng.choice(ADJECTIVES)} {rng.choice(CREATURES)} "
         f"named {name}.", f"{name} liked to {act} in {place} every day."]
    if rng.random() < 0.5:
        s.append(f"{he.capitalize()} had a friend named {friend}.")
    if rng.random() < 0.3:
        s.append(f"{he.capitalize()} liked to eat {rng.choice(FOODS)} for lunch.")
    s.append(f"One day, {rng.choice(WEATHER)}, and {name} found a {color} {thing} in {place}.")
    s.append(f"{he.capitalize()} was very {rng.choice(FEELINGS)}.")
    s.append(f'"Look, {friend}! A {color} {thing}!" said {name}.')
    if rng.random() < 0.4:
        n = rng.randint(2, 9)
        s.append(f"{friend} counted: " + ", ".join(NUMBERS[:n]) + f". {NUMBERS[n - 1].capitalize()}"
                 f" {thing}s!")
    s.append(f"But then the {thing} {trouble}.")
    s.append(f"{name} and {friend} {fix}.")
    s.append(f"They played with the {color} {thing} all day and {ACTIVITIES[act]} together.")
    s.append(f"In the end, {name} learned {moral}.")
    return " ".join(s)


def synthetic_documents(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [synthetic_story(rng) for _ in range(n_docs)]


# --------------------------------------------------------------------------- BPE tokenizer
def train_bpe(pieces: Counter[bytes], n_merges: int) -> list[tuple[int, int]]:
    """Byte-level BPE over distinct pre-tokens, with incremental pair counts and a lazy heap.

    Only the words containing the merged pair are touched per merge, so the cost scales with
    the number of distinct pre-tokens, not the corpus size (a few MB trains in about a second).
    """
    words = [list(p) for p in pieces]
    freq = list(pieces.values())
    counts: Counter[tuple[int, int]] = Counter()
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for pair in pairwise(w):
            counts[pair] += freq[i]
            where[pair].add(i)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while heap and len(merges) < n_merges:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg:
            continue  # stale entry; the current count was pushed separately
        if -neg < 2:
            break
        new_id = 256 + len(merges)
        merges.append(pair)
        touched: set[tuple[int, int]] = set()
        for i in list(where.pop(pair, ())):
            w, f = words[i], freq[i]
            for p in pairwise(w):
                counts[p] -= f
                touched.add(p)
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
                    out.append(new_id)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for p in pairwise(out):
                counts[p] += f
                where[p].add(i)
                touched.add(p)
        counts.pop(pair, None)
        for p in touched - {pair}:
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
    return merges


class Tokenizer:
    """Encoder for the merges above; ids 0..255 are bytes, then merges, then <|endoftext|>."""

    def __init__(self, merges: list[tuple[int, int]]) -> None:
        self.merges = merges
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.eot = 256 + len(merges)
        self.vocab_size = self.eot + 1
        self._cache: dict[str, list[int]] = {}

    def _encode_piece(self, piece: str) -> list[int]:
        ids = list(piece.encode("utf-8"))
        while len(ids) > 1:
            rank, pair = min((self.ranks.get(p, 1 << 30), p) for p in pairwise(ids))
            if rank == 1 << 30:
                break
            out, j = [], 0
            while j < len(ids):
                if j + 1 < len(ids) and (ids[j], ids[j + 1]) == pair:
                    out.append(256 + rank)
                    j += 2
                else:
                    out.append(ids[j])
                    j += 1
            ids = out
        return ids

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        cache = self._cache
        for piece in SPLIT.findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = cache[piece] = self._encode_piece(piece)
            out.extend(ids)
        return out

    def token_bytes(self) -> np.ndarray:
        lengths = [1] * 256 + [0] * (len(self.merges) + 1)
        for i, (a, b) in enumerate(self.merges):
            lengths[256 + i] = lengths[a] + lengths[b]
        return np.asarray(lengths, dtype=np.int32)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "type": "byte-bpe", "pattern": SPLIT.pattern,
                           "vocab_size": self.vocab_size, "special": {EOT: self.eot},
                           "merges": self.merges}, separators=(",", ":"))

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        return cls([tuple(m) for m in json.loads(path.read_text())["merges"]])


# --------------------------------------------------------------------------- sources
def read_local(path: Path, text_field: str) -> list[str]:
    """Documents from a .txt (split on <|endoftext|> or blank lines), .jsonl or .parquet file."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    docs: list[str] = []
    for f in files:
        if f.suffix == ".txt":
            text = f.read_text(encoding="utf-8", errors="replace")
            parts = text.split(EOT) if EOT in text else re.split(r"\n\s*\n", text)
            docs += [p.strip() for p in parts if p.strip()]
        elif f.suffix in (".jsonl", ".json"):
            with f.open(encoding="utf-8") as fh:
                docs += [json.loads(line)[text_field] for line in fh if line.strip()]
        elif f.suffix == ".parquet":
            docs += read_parquet(f, text_field)
    if not docs:
        raise DataError(f"no documents found in {path}; give .txt, .jsonl or .parquet files")
    return docs


def read_parquet(path: Path, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path.name} is parquet but pyarrow is not installed; "
                        "run `pip install pyarrow`") from None
    return [t for t in pq.read_table(path, columns=[text_field]).column(0).to_pylist() if t]


def download(url: str, dest: Path, attempts: int = 6) -> Path:
    """Fetch url to dest, resuming a partial ``dest.part`` with a Range request; retried."""
    import httpx
    from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    def transient(exc: BaseException) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code in (408, 429) or exc.response.status_code >= 500
        return isinstance(exc, httpx.TransportError | IOError)

    @retry(retry=retry_if_exception(transient), stop=stop_after_attempt(attempts),
           wait=wait_exponential(multiplier=0.2, max=20), reraise=True)
    def attempt() -> None:
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with httpx.stream("GET", url, headers=headers, follow_redirects=True,
                          timeout=httpx.Timeout(30.0, read=120.0)) as r:
            if r.status_code == 416 and have:  # nothing left to send: the part is complete
                return
            r.raise_for_status()
            resumed = r.status_code == 206
            if resumed and not r.headers.get("content-range", "").startswith(f"bytes {have}-"):
                part.unlink()  # start over on the next attempt
                raise OSError(f"{url}: server resumed at the wrong offset")
            expected = int(r.headers.get("content-length", -1))
            with part.open("ab" if resumed else "wb") as fh:
                for chunk in r.iter_bytes():  # as received, so a drop keeps what came
                    fh.write(chunk)
            got = part.stat().st_size - (have if resumed else 0)
            if expected >= 0 and got != expected:
                raise OSError(f"short read from {url}: {got} of {expected} bytes")

    print(f"downloading {url}", file=sys.stderr)
    attempt()
    os.replace(part, dest)
    return dest


def online_documents(source: str, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(train docs, val docs) for tinystories / climbmix, downloading into --cache-dir."""
    cache = Path(args.cache_dir).expanduser() / source
    if source == "tinystories":
        base = args.base_url or TINYSTORIES_URL
        split = [download(base + f"TinyStoriesV2-GPT4-{s}.txt", cache / f"{s}.txt")
                 for s in ("train", "valid")]
        return read_local(split[0], "text"), read_local(split[1], "text")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise DataError("climbmix shards are parquet and pyarrow is not installed; "
                        "run `pip install pyarrow`") from None
    base = args.base_url or CLIMBMIX_URL
    shards = [*range(args.num_shards), CLIMBMIX_VAL_SHARD]
    paths = [download(base + f"shard_{i:05d}.parquet", cache / f"shard_{i:05d}.parquet")
             for i in shards]
    train = [d for p in paths[:-1] for d in read_parquet(p, "text")]
    return train, read_parquet(paths[-1], "text")


# --------------------------------------------------------------------------- writing
def write_shard(path: Path, tokens: np.ndarray, vocab_size: int, tok_id: str) -> None:
    with path.open("wb") as fh:
        fh.write(HEADER.pack(MAGIC, 1, vocab_size, len(tokens), tok_id.encode()).ljust(64, b"\0"))
        fh.write(tokens.astype(np.uint16).tobytes())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_table(directory: Path) -> dict[str, dict[str, Any]]:
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(directory.iterdir()) if p.name != "manifest.json"}


def settings_for(args: argparse.Namespace) -> dict[str, Any]:
    src = args.source
    if src not in ("synthetic", "tinystories", "climbmix"):
        src = str(Path(src).expanduser().resolve())
    out = {"format": FORMAT, "source": src, "vocab_size": args.vocab_size, "seed": args.seed,
           "val_fraction": args.val_fraction}
    if src == "synthetic":
        out["docs"] = args.docs
    if src == "climbmix":
        out["num_shards"] = args.num_shards
    return out


def build(args: argparse.Namespace) -> Path:
    """Write the directory next to its final place, then rename it in: no half-built dirs."""
    out = Path(args.out).expanduser().resolve()
    settings = settings_for(args)
    if (out / "manifest.json").exists():
        old = json.loads((out / "manifest.json").read_text()).get("settings")
        if old == settings and not args.force:
            verify(out, "sizes")
            print(f"{out} is already prepared with these settings; nothing to do")
            return out
        if not args.force:
            diff = sorted(k for k in settings.keys() | (old or {}).keys()
                          if settings.get(k) != (old or {}).get(k))
            raise DataError(f"{out} was prepared with other settings ({', '.join(diff)}); "
                            "pass --force to rebuild it or choose another --out")
    elif out.exists() and any(out.iterdir()) and not args.force:
        raise DataError(f"{out} exists, is not empty and has no manifest.json; "
                        "pass --force to replace it or choose another --out")
    if not 257 <= args.vocab_size <= 65536:
        raise DataError(f"--vocab-size {args.vocab_size} is out of range; use 257..65536")
    t0 = time.time()
    src = args.source
    if src == "synthetic":
        docs, val_docs = synthetic_documents(args.docs, args.seed), None
    elif src in ("tinystories", "climbmix"):
        docs, val_docs = online_documents(src, args)
    elif Path(src).expanduser().exists():
        docs, val_docs = read_local(Path(src).expanduser(), args.text_field), None
    else:
        raise DataError(f"source {src!r} is neither a file/directory nor one of "
                        "synthetic, tinystories, climbmix; fix --source")
    if val_docs is None:  # a fixed split: the last documents, never shuffled
        n_val = max(1, round(len(docs) * args.val_fraction))
        if len(docs) < 2:
            raise DataError(f"only {len(docs)} document(s) in {src}; need at least 2")
        docs, val_docs = docs[:-n_val], docs[-n_val:]

    pieces: Counter[bytes] = Counter()
    budget = args.tokenizer_bytes
    for d in docs:
        pieces.update(p.encode("utf-8") for p in SPLIT.findall(d))
        budget -= len(d)
        if budget <= 0:
            break
    tok = Tokenizer(train_bpe(pieces, args.vocab_size - 257))
    tok_json = tok.to_json()
    tok_id = hashlib.sha256(tok_json.encode()).hexdigest()[:16]
    t_tok = time.time() - t0

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "tokenizer.json").write_text(tok_json)
    np.save(tmp / "token_bytes.npy", tok.token_bytes())
    counts = {"train_docs": len(docs), "val_docs": len(val_docs), "train_tokens": 0}
    buf: list[int] = []
    n_shards = 0
    for i, d in enumerate(docs):
        buf.append(tok.eot)
        buf.extend(tok.encode(d))
        if len(buf) >= SHARD_TOKENS or i == len(docs) - 1:
            write_shard(tmp / f"train_{n_shards:03d}.bin", np.asarray(buf), tok.vocab_size, tok_id)
            counts["train_tokens"] += len(buf)
            n_shards, buf = n_shards + 1, []
    val = [t for d in val_docs for t in (tok.eot, *tok.encode(d))]
    write_shard(tmp / "val.bin", np.asarray(val), tok.vocab_size, tok_id)
    counts.update(val_tokens=len(val), train_shards=n_shards,
                  train_bytes=sum(len(d.encode()) for d in docs),
                  val_bytes=sum(len(d.encode()) for d in val_docs))
    manifest = {"format": FORMAT, "settings": settings, "vocab_size": tok.vocab_size,
                "tokenizer_id": tok_id, "counts": counts, "created_by": "prepare.py",
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": file_table(tmp)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"prepared {out}: vocab {tok.vocab_size}, {counts['train_tokens']:,} train / "
          f"{len(val):,} val tokens, {counts['train_bytes'] / counts['train_tokens']:.2f} "
          f"bytes/token; tokenizer {t_tok:.1f}s, total {time.time() - t0:.1f}s")
    return out


# --------------------------------------------------------------------------- reading (jobs)
def verify(directory: Path, level: str = "auto") -> dict[str, Any]:
    """Check the manifest against the files; sizes always, sha256 per ``level``.

    ``auto`` hashes everything up to AUTO_HASH_LIMIT bytes in total (sha256 runs at roughly
    1-2 GB/s, so that stays around a second) and above it only the small files plus sizes.
    """
    directory = Path(directory)
    prep = f"`python prepare.py --out {directory} --force`"
    if not directory.is_dir():
        raise DataError(f"data directory {directory} does not exist; create it with "
                        f"`python prepare.py --out {directory}` or set FANOUT_DATA_DIR")
    mpath = directory / "manifest.json"
    if not mpath.exists():
        raise DataError(f"{directory} is not a prepared data directory (no manifest.json); "
                        f"run `python prepare.py --out {directory}`")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError):
        raise DataError(f"{mpath} is unreadable; rebuild with {prep}") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{directory} has format {manifest.get('format')!r}, this prepare.py "
                        f"reads {FORMAT!r}; rebuild with {prep}")
    total = 0
    for name, meta in files.items():
        path = directory / name
        if not path.exists():
            raise DataError(f"{name} listed in the manifest is missing from {directory}; "
                            f"rebuild with {prep}")
        if path.stat().st_size != meta["bytes"]:
            raise DataError(f"{name} is {path.stat().st_size} bytes, the manifest says "
                            f"{meta['bytes']}: corrupted data directory; rebuild with {prep}")
        total += meta["bytes"]
    full = level == "full" or (level == "auto" and total <= AUTO_HASH_LIMIT)
    t0 = time.perf_counter()
    for name, meta in files.items():
        small = meta["bytes"] <= 64 << 20 or name == "val.bin"
        if (full or small) and sha256(directory / name) != meta["sha256"]:
            raise DataError(f"{name} fails its sha256 check: corrupted data directory; "
                                f"rebuild with {prep}")
    return {"manifest": manifest, "level": "sha256" if full else "sizes",
            "bytes": total, "seconds": time.perf_counter() - t0}


class Data:
    """A verified, read-only view of a prepared directory: memory-mapped shards."""

    def __init__(self, directory: str | os.PathLike[str], level: str = "auto") -> None:
        self.dir = Path(directory).expanduser()
        self.check = verify(self.dir, level)
        manifest = self.check["manifest"]
        prep = f"`python prepare.py --out {self.dir} --force`"
        tok = json.loads((self.dir / "tokenizer.json").read_text())
        self.vocab_size = int(tok["vocab_size"])
        self.token_bytes = np.load(self.dir / "token_bytes.npy")
        if self.vocab_size != manifest["vocab_size"] or len(self.token_bytes) != self.vocab_size:
            raise DataError(f"tokenizer.json has vocab {self.vocab_size}, the manifest "
                            f"{manifest['vocab_size']}: mixed-up data directory; rebuild with {prep}")
        names = sorted(n for n in manifest["files"] if n.startswith("train_"))
        self.train = [self._open(n, manifest["tokenizer_id"], prep) for n in names]
        self.val = self._open("val.bin", manifest["tokenizer_id"], prep)
        self.manifest = manifest

    def _open(self, name: str, tok_id: str, prep: str) -> np.memmap:
        path = self.dir / name
        with path.open("rb") as fh:
            magic, _, vocab, n, shard_tok = HEADER.unpack(fh.read(HEADER_BYTES)[: HEADER.size])
        if magic != MAGIC:
            raise DataError(f"{name} is not a token shard; rebuild with {prep}")
        if vocab != self.vocab_size or shard_tok.decode() != tok_id:
            raise DataError(f"{name} was tokenized with vocab {vocab} (tokenizer "
                            f"{shard_tok.decode()}) but tokenizer.json has {self.vocab_size} "
                            f"({tok_id}): vocabulary mismatch; rebuild with {prep}")
        return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n,))


def evaluate_bpb(model: Any, data: Data, seq_len: int, batch_size: int, device: Any,
                 autocast: Any, eval_tokens: int) -> tuple[float, int]:
    """Bits per byte of ``model(x) -> logits`` on the first ``eval_tokens`` validation tokens.

    bpb = sum of target-token nats / ln 2 / sum of target-token UTF-8 bytes; the zero-byte
    <|endoftext|> targets are left out of both sums. Returns (val_bpb, tokens scored).
    """
    import torch
    import torch.nn.functional as F

    n = min(eval_tokens, len(data.val) - 1) // seq_len
    if n < 1:
        raise DataError(f"validation split has {len(data.val)} tokens, fewer than SEQ_LEN "
                        f"{seq_len}; prepare more data or lower SEQ_LEN")
    val = np.asarray(data.val[: n * seq_len + 1], dtype=np.int64)
    x_all = torch.from_numpy(val[:-1].reshape(n, seq_len))
    y_all = torch.from_numpy(val[1:].reshape(n, seq_len))
    nbytes = torch.as_tensor(data.token_bytes, dtype=torch.int64, device=device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    total = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for i in range(0, n, batch_size):
            x = x_all[i : i + batch_size].to(device)
            y = y_all[i : i + batch_size].to(device).flatten()
            with autocast:
                logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y, reduction="none")
            b = nbytes[y]
            nats += (loss * (b > 0)).sum(dtype=torch.float64)
            total += b.sum()
    return float(nats / (math.log(2) * total.clamp(min=1))), n * seq_len


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="data directory to create "
                    "(default: $FANOUT_DATA_DIR or ~/.cache/fanout/data/SOURCE)")
    ap.add_argument("--source", default="synthetic",
                    help="synthetic (offline, default), tinystories, climbmix, or a local "
                    ".txt/.jsonl/.parquet file or directory")
    ap.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                    help="upper bound incl. <|endoftext|>; BPE stops early when no pair repeats")
    ap.add_argument("--force", action="store_true", help="rebuild an existing directory")
    ap.add_argument("--docs", type=int, default=20000, help="synthetic stories to generate")
    ap.add_argument("--seed", type=int, default=0, help="synthetic corpus seed")
    ap.add_argument("--val-fraction", type=float, default=0.05,
                    help="share of documents (the last ones) held out when the source has no split")
    ap.add_argument("--text-field", default="text", help="jsonl/parquet text column")
    ap.add_argument("--tokenizer-bytes", type=int, default=200 << 20,
                    help="train the BPE on at most this many bytes of text")
    ap.add_argument("--num-shards", type=int, default=2, help="climbmix train shards")
    ap.add_argument("--base-url", help="mirror to download tinystories/climbmix from")
    ap.add_argument("--cache-dir", default="~/.cache/fanout/downloads")
    ap.add_argument("--verify", metavar="DIR", help="check DIR against its manifest and exit")
    ap.add_argument("--level", default="full", choices=["auto", "sizes", "full"],
                    help="--verify depth (default full)")
    args = ap.parse_args(argv)
    try:
        if args.verify:
            info = verify(Path(args.verify).expanduser(), args.level)
            print(f"ok: {args.verify}: {len(info['manifest']['files'])} files, "
                  f"{info['bytes']:,} bytes, checked by {info['level']} "
                  f"in {info['seconds']:.2f}s")
            return 0
        if args.out is None:
            name = args.source if args.source in ("synthetic", "tinystories", "climbmix") \
                else Path(args.source).stem
            args.out = os.environ.get("FANOUT_DATA_DIR") or f"~/.cache/fanout/data/{name}"
        build(args)
    except DataError as exc:
        print(f"prepare.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
