"""The API proposers against a real HTTP server on loopback that speaks each API's wire format.

``fake_llm_server.FakeLLMServer`` is the stand-in for OpenAI-compatible servers and for
Anthropic's API: it checks requests as they would (path, headers, required fields, no streaming)
and replies with whatever a test scripts, including 429 with Retry-After, 5xx, truncated bodies,
malformed JSON and slow answers. Everything on our side is real: httpx, tenacity, the parser, and
for the end-to-end tests a whole study on the local backend (real git, real jobs).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fake_llm_server import FakeLLMServer, Received, Reply
from loop_helpers import candidate_records, events, make_repo, study_root, val_bpb

from fanout_research.errors import ConfigError
from fanout_research.research.llm import (
    CALL_LOG_FILE,
    AnthropicProposer,
    LLMProposer,
    OpenAIProposer,
    ProposerError,
    agent_proposer,
    build_prompt,
    parse_ideas,
    parse_retry_after,
)
from fanout_research.research.loop import Study
from fanout_research.research.proposals import Attempt, ResearchContext, SearchReplace
from fanout_research.testing.repo import git

KEY_ENV = "FANOUT_TEST_API_KEY"
KEY = "sk-secret-123"
APIS: dict[str, type[LLMProposer]] = {"openai": OpenAIProposer, "anthropic": AnthropicProposer}

TRAIN = """\
import os

# ---
LR = 0.1
WIDTH = 4
CRASH = 0
# ---


def main():
    print(LR * WIDTH)
"""


def idea(description: str, search: str, replace: str, path: str = "train.py") -> str:
    return (f"### Idea: {description}\n<<<<<<< SEARCH path={path}\n{search}=======\n{replace}"
            ">>>>>>> REPLACE\n")


RAISE_LR = idea("raise LR to 0.3: the baseline undertrains", "LR = 0.1\n", "LR = 0.3\n")
NARROW = idea("WIDTH 4 -> 2: more steps per second", "WIDTH = 4\n", "WIDTH = 2\n")
TWO_IDEAS = "Here are my ideas.\n\n" + RAISE_LR + "\n" + NARROW


def context(*, history: tuple[Attempt, ...] = (), round: int = 3, files: dict[str, str] | None = None,
            best: float | None = 1.04) -> ResearchContext:
    return ResearchContext(round=round, base_commit="ab" * 20, files=files or {"train.py": TRAIN},
                           allowed_files=("train.py",), best_val_bpb=best, history=history,
                           program="# Program\nLower val_bpb. Only edit train.py.\n")


def proposer(api: str, server: FakeLLMServer, **options: Any) -> LLMProposer:
    options = {"backoff_s": 0.01, "max_attempts": 5, **options}
    return APIS[api](model="fake-model", base_url=server.base_url, api_key_env=KEY_ENV, **options)


@pytest.fixture(params=sorted(APIS))
def api(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


# ----------------------------------------------------------------------------- the wire
def test_one_call_speaks_the_wire_format_and_returns_the_ideas(api: str) -> None:
    history = (
        Attempt(round=0, description="baseline (unmodified)", knobs={"LR": 0.1}, status="baseline",
                val_bpb=1.08),
        Attempt(round=1, description="LR 0.1 -> 0.05", knobs={"LR": 0.05}, status="discard", val_bpb=1.1,
                base_knobs={"LR": 0.1}),
        Attempt(round=1, description="deeper", knobs={}, status="crash", reason="exit 3: loss is NaN"),
        Attempt(round=2, description="LR 0.1 -> 0.3", knobs={"LR": 0.3}, status="keep", val_bpb=1.04,
                base_knobs={"LR": 0.1}),
        Attempt(round=2, description="bad import", knobs={}, status="reject",
                reason="imports: train.py:1: cannot import 'flash_attn'"),
    )
    with FakeLLMServer(api, key=KEY) as server:
        server.then(Reply.answer(TWO_IDEAS, usage=(2000, 500)))
        llm = proposer(api, server, price_input_per_mtok=3.0, price_output_per_mtok=15.0, max_tokens=4096)
        proposals = llm.propose(context(history=history), 2)

    (request,) = server.requests
    assert request.method == "POST"
    assert request.body["stream"] is False and request.body["model"] == "fake-model"
    assert request.body["max_tokens"] == 4096
    if api == "openai":
        assert request.path == "/v1/chat/completions"
        assert request.headers["authorization"] == f"Bearer {KEY}"
        assert [m["role"] for m in request.body["messages"]] == ["system", "user"]
    else:
        assert request.path == "/v1/messages"
        assert request.headers["x-api-key"] == KEY and request.headers["anthropic-version"] == "2023-06-01"
        assert request.body["system"] and [m["role"] for m in request.body["messages"]] == ["user"]

    prompt = request.prompt
    assert "Lower val_bpb. Only edit train.py." in prompt  # program.md
    assert TRAIN.rstrip("\n") in prompt  # the file, verbatim
    assert "Best val_bpb so far: 1.040000" in prompt
    assert "exactly 2 different ideas" in prompt and "<<<<<<< SEARCH path=" in prompt
    lines = [line for line in prompt.splitlines() if line.startswith("- round")]
    # Kept lineage first (baseline, the keep), then the rest most recent first, with the reasons.
    assert [line.split(":")[0] for line in lines] == [
        "- round 0 [baseline] val_bpb=1.080000", "- round 2 [keep] val_bpb=1.040000",
        "- round 2 [reject] no score", "- round 1 [discard] val_bpb=1.100000", "- round 1 [crash] no score"]
    assert "why: imports: train.py:1: cannot import 'flash_attn'" in lines[2]
    assert "why: exit 3: loss is NaN" in lines[4]

    assert [p.description for p in proposals] == ["raise LR to 0.3: the baseline undertrains",
                                                  "WIDTH 4 -> 2: more steps per second"]
    assert proposals[0].edits == (SearchReplace(path="train.py", search="LR = 0.1\n", replace="LR = 0.3\n"),)
    assert proposals[1].knobs == {"LR": 0.1, "WIDTH": 2, "CRASH": 0}
    assert {p.proposer for p in proposals} == {f"{api}:fake-model"}
    assert llm.last_rejections == []
    (usage,) = llm.usage_log
    assert (usage.api, usage.attempts, usage.input_tokens, usage.output_tokens) == (api, 1, 2000, 500)
    assert usage.cost_usd == pytest.approx((2000 * 3.0 + 500 * 15.0) / 1e6)
    assert usage.proposals == 2 and usage.error == ""


def test_429_is_retried_after_the_servers_retry_after(api: str) -> None:
    with FakeLLMServer(api, key=KEY) as server:
        server.then(Reply.error(429, "slow down", retry_after="1"), Reply.answer(TWO_IDEAS))
        llm = proposer(api, server, backoff_s=0.01)  # the 1 s can only come from Retry-After
        proposals = llm.propose(context(), 2)
    assert len(proposals) == 2
    first, second = server.requests
    assert 1.0 <= second.at - first.at < 5.0
    assert llm.usage_log[0].attempts == 2


@pytest.mark.parametrize("failure", ["http_500", "truncated_body", "malformed_json", "timeout"])
def test_transient_failures_are_retried(api: str, failure: str, caplog: pytest.LogCaptureFixture) -> None:
    first = {
        "http_500": Reply.error(500, "internal error"),
        "truncated_body": Reply.truncated(TWO_IDEAS),
        "malformed_json": Reply.bytes_(b'{"choices": [{"message": {"content": "### Idea'),
        "timeout": Reply.answer(TWO_IDEAS, delay_s=2.5),
    }[failure]
    with FakeLLMServer(api, key=KEY) as server:
        server.then(first, Reply.answer(TWO_IDEAS))
        llm = proposer(api, server, timeout_s=1.0)
        proposals = llm.propose(context(), 2)
    assert [p.description for p in proposals][:1] == ["raise LR to 0.3: the baseline undertrains"]
    assert len(server.requests) == 2 and llm.usage_log[0].attempts == 2
    cause = {"http_500": "HTTP 500: internal error", "truncated_body": "RemoteProtocolError",
             "malformed_json": "not valid JSON", "timeout": "no answer within timeout_s=1"}[failure]
    assert re.search(rf"attempt 1 failed \(.*{re.escape(cause)}", caplog.text), caplog.text


def test_bounded_retries_end_in_a_clear_error(api: str, tmp_path: Path) -> None:
    with FakeLLMServer(api, key=KEY) as server:
        server.then(*[Reply.error(503, "overloaded")] * 5)
        llm = proposer(api, server, max_attempts=3, state_dir=tmp_path)
        with pytest.raises(ProposerError) as caught:
            llm.propose(context(), 2)
    assert len(server.requests) == 3
    message = str(caught.value)
    assert message.startswith(f"{api} API at {server.base_url}: gave up after 3 attempts (max_attempts=3)")
    assert message.endswith("last: HTTP 503: overloaded")
    (record,) = [json.loads(line) for line in (tmp_path / CALL_LOG_FILE).read_text().splitlines()]
    assert record["error"] == message and record["attempts"] == 3  # a failed call still counts


def test_client_errors_and_overlong_retry_after_fail_at_once() -> None:
    with FakeLLMServer("openai", key=KEY) as server:
        server.then(Reply.error(400, "context length exceeded"),
                    Reply.error(429, "quota", retry_after="3600"))
        llm = proposer("openai", server)
        with pytest.raises(ProposerError, match=r"HTTP 400: context length exceeded$"):
            llm.propose(context(), 2)
        assert len(server.requests) == 1
        with pytest.raises(ProposerError, match=r"retry after 3600s, more than max_retry_after_s=120"):
            llm.propose(context(), 2)
        assert len(server.requests) == 2


def test_a_missing_key_is_named_and_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with FakeLLMServer("anthropic", key=KEY) as server:
        with pytest.raises(ProposerError, match=f"environment variable {KEY_ENV} is not set"):
            proposer("anthropic", server).propose(context(), 2)
        assert server.requests == []


def test_retry_after_reads_seconds_milliseconds_and_dates() -> None:
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, now=1445412500.0) == 10.0
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None


# ----------------------------------------------------------------------------- the answer
def test_each_idea_is_checked_and_the_rest_are_explained(api: str, caplog: pytest.LogCaptureFixture) -> None:
    answer = "\n".join([
        RAISE_LR,
        idea("lower LR", "LR = 0.01\n", "LR = 0.05\n"),  # not in the file
        "### Idea: no divider\n<<<<<<< SEARCH path=train.py\nWIDTH = 4\nWIDTH = 8\n>>>>>>> REPLACE\n",
        idea("same as the first", "LR = 0.1\n", "LR = 0.3\n"),  # duplicate
        idea("edit the evaluation", "VOCAB = 256\n", "VOCAB = 512\n", path="prepare.py"),
        idea("blank lines", "\n\n", "\n"),  # only whitespace
        idea("dashes", "# ---\n", "# ===\n"),  # occurs twice
        idea("a no-op", "CRASH = 0\n", "CRASH = 0\n"),
        NARROW,
        idea("one too many", "CRASH = 0\n", "CRASH = 1\n"),
        "### Idea: cut off\n<<<<<<< SEARCH path=train.py\nLR = 0.1\n=======\nLR = 0.",
    ])
    with FakeLLMServer(api, key=KEY) as server:
        server.then(Reply.answer(answer))
        llm = proposer(api, server)
        proposals = llm.propose(context(), 2)
    assert [p.description for p in proposals] == ["raise LR to 0.3: the baseline undertrains",
                                                  "WIDTH 4 -> 2: more steps per second"]
    assert [str(r) for r in llm.last_rejections] == [
        "idea 2 ('lower LR'): block 1: SEARCH text not found in train.py (starts 'LR = 0.01'); "
        "copy it exactly from the file",
        "idea 3 ('no divider'): block 1: no '=======' between SEARCH and REPLACE",
        "idea 4 ('same as the first'): duplicate of idea 1 (the same change)",
        "idea 5 ('edit the evaluation'): block 1 edits 'prepare.py', which is not an editable file "
        "(editable: train.py)",
        "idea 6 ('blank lines'): block 1: the SEARCH text is empty",
        "idea 7 ('dashes'): block 1: SEARCH text occurs 2 times in train.py, must be once; "
        "add surrounding lines (starts '# ---')",
        "idea 8 ('a no-op'): the edits change nothing",
        "idea 10 ('one too many'): beyond the 2 ideas asked for",
        "idea 11 ('cut off'): block 1 is not closed (no '>>>>>>> REPLACE'; the answer may have been cut off)",
    ]
    assert llm.usage_log[0].rejected == [str(r) for r in llm.last_rejections]
    assert caplog.text.count("dropped idea") == 9


def test_the_parser_tolerates_prose_fences_and_code_comments() -> None:
    files = {"train.py": TRAIN.rstrip("\n")}  # no newline at the end of the file
    answer = (
        "Sure! Two ideas:\n\n```\n### Idea 1: **print more**\n"
        "<<<<<<< SEARCH\n    print(LR * WIDTH)\n=======\n    # Idea: a comment, not a header\n"
        "    print(LR * WIDTH * 2)\n>>>>>>> REPLACE\n```\n\n"
        "## Idea 2 - lower LR\r\n<<<<<<< SEARCH path=\"train.py\"\r\nLR = 0.1\r\n=======\r\nLR = 0.05\r\n"
        ">>>>>>> REPLACE\r\nThat's all.\n"
    )
    parsed = parse_ideas(answer, files, 3, proposer="p")
    assert parsed.rejections == []
    assert [p.description for p in parsed.proposals] == ["print more", "lower LR"]
    first = parsed.proposals[0].edits[0]
    assert first.search == "    print(LR * WIDTH)"  # the file's unterminated last line
    assert first.replace == "    # Idea: a comment, not a header\n    print(LR * WIDTH * 2)"

    nothing = parse_ideas("I think you should lower the learning rate.", files, 2)
    assert nothing.proposals == [] and [str(r) for r in nothing.rejections] == [
        "the answer: no '### Idea: ...' header; nothing could be parsed"]
    two_files = parse_ideas("### Idea: x\n<<<<<<< SEARCH\nLR = 0.1\n=======\nLR = 1\n>>>>>>> REPLACE\n",
                            {"train.py": TRAIN, "model.py": "A = 1\n"}, 2)
    assert [r.reason for r in two_files.rejections] == [
        "block 1: '<<<<<<< SEARCH' names no file (write 'path=<file>')"]


def test_the_call_cap_holds_across_restarts_and_problems_are_fed_back(tmp_path: Path) -> None:
    bad_then_good = RAISE_LR + idea("typo", "LR = 0.11\n", "LR = 0.2\n")
    with FakeLLMServer("openai", key=KEY, responder=lambda _: TWO_IDEAS) as server:
        server.then(Reply.answer(bad_then_good))
        first = proposer("openai", server, max_calls=2, state_dir=tmp_path)
        assert len(first.propose(context(), 2)) == 1
        assert len(first.propose(context(), 2)) == 2
        assert "# Problems with your previous answer" not in server.requests[0].prompt
        assert ("- idea 2 ('typo'): block 1: SEARCH text not found in train.py (starts 'LR = 0.11')"
                in server.requests[1].prompt)
        restarted = proposer("openai", server, max_calls=2, state_dir=tmp_path)  # a new process, same study
        with pytest.raises(ProposerError, match=r"proposer cap is spent: max_calls = 2, 2 calls made"):
            restarted.propose(context(), 2)
        assert len(server.requests) == 2
        assert len(proposer("openai", server, max_calls=3, state_dir=tmp_path).propose(context(), 2)) == 2


def test_an_answer_with_no_usable_idea_is_asked_again_once(api: str) -> None:
    useless = idea("typo", "LR = 0.11\n", "LR = 0.2\n")
    with FakeLLMServer(api, key=KEY) as server:
        server.then(Reply.answer(useless), Reply.answer(TWO_IDEAS), Reply.answer(useless),
                    Reply.answer(useless))
        llm = proposer(api, server)
        assert len(llm.propose(context(), 2)) == 2
        assert "- idea 1 ('typo'): block 1: SEARCH text not found" in server.requests[1].prompt
        assert [r.description for r in llm.last_rejections] == ["typo"]
        assert llm.propose(context(), 2) == []  # twice useless: the loop is told there is no idea
        assert len(server.requests) == 4 and len(llm.last_rejections) == 2
        assert [u.proposals for u in llm.usage_log] == [0, 2, 0, 0]


def test_configuration_is_checked_and_factored() -> None:
    with pytest.raises(ConfigError, match=r"\[proposer.openai\] temprature: Extra inputs"):
        OpenAIProposer(model="m", temprature=0.2)
    with pytest.raises(ConfigError, match="NAME of an environment variable"):
        AnthropicProposer(model="m", api_key_env="sk-ant-abc123")
    with pytest.raises(ConfigError, match="extra_headers may not set Authorization"):
        OpenAIProposer(model="m", extra_headers={"Authorization": "Bearer x"})
    with pytest.raises(ConfigError, match="unknown proposer 'gpt'"):
        agent_proposer("gpt", {})
    built = agent_proposer("anthropic", {"model": "claude-x"})
    assert isinstance(built, AnthropicProposer)
    assert (built.settings.base_url, built.settings.api_key_env) == ("https://api.anthropic.com",
                                                                    "ANTHROPIC_API_KEY")
    _, user = build_prompt(context(history=()), 4)
    assert "Nothing yet: this is the first round" in user and "exactly 4 different ideas" in user


def test_the_prompt_leaves_out_program_mds_agent_driven_section() -> None:
    """How to submit jobs is for an agent driving the study, not for a proposer inside it."""
    template = Path(__file__).resolve().parents[2] / "src/fanout_research/template/program.md"
    program = template.read_text()
    assert "fanout submit" in program
    for mode in ("blocks", "edit"):
        _, user = build_prompt(replace(context(), program=program), 2, mode=mode)  # type: ignore[arg-type]
        assert "Only `train.py`." in user and "## The loop" in user
        assert "fanout submit" not in user and "agent-driven" not in user


# ----------------------------------------------------------------------------- a whole study
def knob(prompt: str, name: str) -> str:
    return re.search(rf"^{name} = (\S+)$", prompt, re.MULTILINE).group(1)  # type: ignore[union-attr]


def researcher(request: Received) -> str:
    """The stand-in model of the end-to-end tests: reads train.py's knobs from the prompt and
    proposes (a) LR to 0.3 (or 0.25 once it is 0.3), (b) one less WIDTH, (c) an edit of a line
    that does not exist."""
    prompt = request.prompt
    lr, width = knob(prompt, "LR"), int(knob(prompt, "WIDTH"))
    new_lr = "0.25" if lr == "0.3" else "0.3"
    return (idea(f"LR {lr} -> {new_lr}", f"LR = {lr}\n", f"LR = {new_lr}\n")
            + idea(f"WIDTH {width} -> {width - 1}", f"WIDTH = {width}\n", f"WIDTH = {width - 1}\n")
            + idea("use a cosine schedule", "SCHEDULE = 'linear'\n", "SCHEDULE = 'cosine'\n"))


def test_a_study_runs_end_to_end_with_the_llm_proposer(api: str, tmp_path: Path) -> None:
    repo = make_repo(tmp_path, k=2)
    with FakeLLMServer(api, key=KEY, responder=researcher) as server:
        llm = proposer(api, server, state_dir=study_root(repo))
        outcome = Study(repo, proposer=llm).run(rounds=2)
    assert outcome.stopped == ""
    records = candidate_records(repo)
    assert [(r["round"], r["candidate"], r["status"], r["val_bpb"]) for r in records] == [
        (0, 0, "baseline", val_bpb()),
        (1, 1, "keep", val_bpb(lr=0.3)), (1, 2, "discard", val_bpb(width=3)),
        (2, 1, "discard", val_bpb(lr=0.25)), (2, 2, "keep", val_bpb(lr=0.3, width=3)),
    ]
    assert {r["proposer"] for r in records if r["round"]} == {f"{api}:fake-model"}
    tip_train = git(repo, "show", "research:train.py")
    assert "LR = 0.3\n" in tip_train and "WIDTH = 3\n" in tip_train
    # Round 2's prompt showed round 1's outcome and the new base.
    second = server.requests[1].prompt
    assert "- round 1 [keep] val_bpb=1.040000: LR 0.1 -> 0.3" in second
    assert "- round 1 [discard] val_bpb=1.070000: WIDTH 4 -> 3" in second
    assert "Best val_bpb so far: 1.040000" in second and knob(second, "LR") == "0.3"
    assert [str(r) for r in llm.last_rejections] == [
        "idea 3 ('use a cosine schedule'): block 1: SEARCH text not found in train.py "
        "(starts \"SCHEDULE = 'linear'\"); copy it exactly from the file"]
    calls = (study_root(repo) / CALL_LOG_FILE).read_text().splitlines()
    assert [json.loads(c)["proposals"] for c in calls] == [2, 2]
    assert [e["round"] for e in events(repo) if e["event"] == "proposals"] == [1, 2]


def test_the_key_goes_only_into_the_request_header(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    repo = make_repo(tmp_path, k=2)
    config = repo / "fanout.toml"  # a job that prints its whole environment before training
    config.write_text(config.read_text().replace('command = "python train.py"',
                                                 'command = "sh -c \'env; exec python train.py\'"'))
    git(repo, "commit", "-q", "-am", "jobs print their environment")
    with FakeLLMServer("openai", key=KEY, responder=researcher) as server:
        server.then(Reply.error(500, "upstream hiccup"))  # a retry, logged
        llm = proposer("openai", server, state_dir=study_root(repo))
        Study(repo, proposer=llm).run(rounds=1)
        server.then(Reply.error(401, "Incorrect API key provided: {key}"))  # servers echo keys back
        with pytest.raises(ProposerError) as caught:
            llm.propose(context(), 2)

    # The server did get it, in the header, on every request.
    assert len(server.requests) == 3
    assert {r.headers["authorization"] for r in server.requests} == {f"Bearer {KEY}"}
    # Not in the exception (message, repr, traceback), which says the server's words otherwise.
    error = caught.value
    rendered = "".join(traceback.format_exception(error))
    assert "HTTP 401: Incorrect API key provided: [redacted]" in str(error)
    for text in (str(error), repr(error), rendered):
        assert KEY not in text
    # Not in the proposer's state, settings or usage.
    for text in (repr(llm), json.dumps(llm.options()), repr(vars(llm)), repr(llm.usage_log)):
        assert KEY not in text and KEY_ENV in json.dumps(llm.options())
    # Not in any file of the study: ledgers, results.tsv, the call log, job specs, job output.
    root = study_root(repo)
    files = [p for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"jobs.jsonl", "runs.jsonl", "results.tsv", CALL_LOG_FILE, "output.log"} <= names
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path
    outputs = [p.read_text() for p in root.rglob("output.log")]
    assert len(outputs) == 3 and all("FANOUT_JOB_NAME=" in out for out in outputs)  # env was printed
    # Not on any branch or ref, in any commit's content or message.
    history = subprocess.run(["git", "-C", str(repo), "log", "-p", "--all"], capture_output=True,
                             text=True, check=True).stdout
    assert "fanout t-r01-c1" in history and KEY not in history
    # Not in any log line or anything printed.
    printed = capfd.readouterr()
    assert "attempt 1 failed (HTTP 500: upstream hiccup)" in caplog.text
    for text in (caplog.text, printed.out, printed.err):
        assert KEY not in text


def test_fanout_toml_picks_the_llm_proposer_and_its_usage_is_logged(tmp_path: Path) -> None:
    """The wiring: `[proposer] name = "openai"` reaches make_proposer, and each round's
    proposals event carries the calls' token usage and the ideas that were dropped."""
    with FakeLLMServer("openai", key=KEY, responder=researcher) as server:
        extra = (f'[proposer]\nname = "openai"\n[proposer.openai]\nbase_url = "{server.base_url}"\n'
                 f'model = "fake-model"\napi_key_env = "{KEY_ENV}"\nbackoff_s = 0.01\n')
        repo = make_repo(tmp_path, k=2, extra=extra)
        outcome = Study(repo).run(rounds=1)
    assert outcome.stopped == "" and len(server.requests) == 1
    (event,) = [e for e in events(repo) if e["event"] == "proposals"]
    assert len(event["proposals"]) == 2 and event["dropped"]
    assert event["usage"] and event["usage"][0]["input_tokens"] > 0
    assert KEY not in (study_root(repo) / "runs.jsonl").read_text()
