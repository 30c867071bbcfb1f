"""The command proposer: an external agent CLI makes each candidate in a private copy of the repo.

The agent here is a **stand-in agent CLI** (``STANDIN`` below, written to a file and run with this
interpreter): a small script that reads the prompt the way a real one would (a file, an argument
or stdin), records what it saw (prompt, environment, working directory) for the test, and edits
``train.py`` deterministically (LR += 0.1 * candidate) -- or misbehaves on purpose: fails, hangs
with a child process, deletes or symlinks files, edits prepare.py, commits and branches. Everything
else is real: git, the subprocesses, process-group kills, the validator and the local backend.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from loop_helpers import BASELINE, branches, candidate_records, cli_env, make_repo, study_root, val_bpb

from fanout_research.errors import ConfigError
from fanout_research.research.agent_cli import CommandProposer
from fanout_research.research.llm import CALL_LOG_FILE, DEFAULT_FOCUS, ProposerError, agent_proposer
from fanout_research.research.loop import Study
from fanout_research.research.proposals import ResearchContext, WriteFile
from fanout_research.research.validate import BaseTree, Rejected, Validator
from fanout_research.testing.repo import git

AGENT_KEY_ENV = "FANOUT_TEST_AGENT_KEY"
AGENT_KEY = "sk-agent-456"

STANDIN = r'''
"""Stand-in agent CLI for fanout's tests: edits train.py deterministically. Not a real agent."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

candidate, source = int(sys.argv[1]), sys.argv[2]
if source.startswith("file:"):
    prompt = Path(source[5:]).read_text()
elif source.startswith("arg:"):
    prompt = source[4:]
else:
    prompt = sys.stdin.read()
report = Path(os.environ["STANDIN_REPORT"])
(report / f"c{candidate}.json").write_text(json.dumps(
    {"prompt": prompt, "env": dict(os.environ), "cwd": os.getcwd(), "home": os.listdir(os.environ["HOME"])}))
modes = os.environ.get("STANDIN_MODE", "knob").split(",")
mode = modes[(candidate - 1) % len(modes)]

train = Path("train.py")
lr = re.search(r"^LR = (\S+)$", train.read_text(), re.MULTILINE).group(1)
new = "0.3" if mode == "same" else repr(round(float(lr) + 0.1 * candidate, 4))


def set_lr():
    train.write_text(train.read_text().replace(f"LR = {lr}\n", f"LR = {new}\n"))


print("reading train.py ... thinking ...")
if mode == "fail":
    print("boom: model not found", file=sys.stderr)
    sys.exit(2)
if mode == "leak":
    print("my key is " + os.environ.get("FANOUT_TEST_AGENT_KEY", "?"), file=sys.stderr)
    sys.exit(1)
if mode == "hang":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL will do
    child = subprocess.Popen(["sleep", "300"])
    (report / "child.pid").write_text(str(child.pid))
    time.sleep(300)
if mode == "delete":
    train.unlink()
elif mode == "symlink":
    train.unlink()
    train.symlink_to("/etc/hostname")
elif mode != "nothing":
    set_lr()
if mode == "scratch":
    Path("notes.txt").write_text("tried LR\n")
if mode == "prepare":
    Path("prepare.py").write_text(Path("prepare.py").read_text() + "VOCAB = 512\n")
if mode == "commit":
    git = ["git", "-c", "user.name=a", "-c", "user.email=a@b.c"]
    subprocess.run([*git, "commit", "-qam", "agent commit"], check=True)
    subprocess.run([*git, "branch", "research"], check=True)
    subprocess.run([*git, "tag", "evil"], check=True)
    subprocess.run([*git, "checkout", "-qb", "fanout/t/r01-c1"], check=True)
if mode not in ("nothing", "quiet"):
    print(f"Idea: LR {lr} -> {new}: candidate {candidate}")
'''


@pytest.fixture
def agent(tmp_path: Path) -> Path:
    path = tmp_path / "standin_agent.py"
    path.write_text(STANDIN)
    return path


@pytest.fixture
def report(tmp_path: Path) -> Path:
    path = tmp_path / "report"
    path.mkdir()
    return path


def command(agent: Path, report: Path, modes: str, source: str = "file:{prompt_file}",
            **options: Any) -> dict[str, Any]:
    argv = [sys.executable, str(agent), "{candidate}"] + ([source] if source else ["stdin"])
    return {"argv": argv, "env": {"STANDIN_MODE": modes, "STANDIN_REPORT": str(report)},
            "timeout_s": 60, **options}


def context_of(repo: Path, round: int = 1) -> ResearchContext:
    head = git(repo, "rev-parse", "HEAD")
    return ResearchContext(round=round, base_commit=head, files={"train.py": (repo / "train.py").read_text()},
                           allowed_files=("train.py",), best_val_bpb=None, program="Lower val_bpb.\n")


def seen(report: Path, candidate: int) -> dict[str, Any]:
    return json.loads((report / f"c{candidate}.json").read_text())


def repo_snapshot(repo: Path) -> dict[str, Any]:
    """Everything about the user's checkout the agent must not change."""
    return {"head": git(repo, "rev-parse", "HEAD"), "status": git(repo, "status", "--porcelain"),
            "refs": git(repo, "for-each-ref"), "worktrees": git(repo, "worktree", "list", "--porcelain"),
            "train": (repo / "train.py").read_text()}


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a container's init may not reap at once)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# ----------------------------------------------------------------------------- candidates
def test_each_candidate_is_made_in_a_private_copy(tmp_path: Path, agent: Path, report: Path) -> None:
    repo = make_repo(tmp_path)
    before = repo_snapshot(repo)
    proposer = CommandProposer(repo=repo, state_dir=tmp_path / "state",
                               **command(agent, report, "knob,scratch,prepare"))
    proposals = proposer.propose(context_of(repo), 3)

    assert repo_snapshot(repo) == before  # the user's checkout, refs and worktrees: untouched
    assert [p.description for p in proposals] == [f"LR 0.1 -> {lr}: candidate {i}"
                                                  for i, lr in ((1, 0.2), (2, 0.3), (3, 0.4))]
    assert [[e.path for e in p.edits] for p in proposals] == [["train.py"], ["train.py"],
                                                              ["prepare.py", "train.py"]]
    assert all(isinstance(e, WriteFile) for p in proposals for e in p.edits)
    assert "LR = 0.2\n" in proposals[0].edits[0].content and proposals[0].knobs["LR"] == 0.2
    assert {p.proposer for p in proposals} == {"command:" + Path(sys.executable).name}
    assert proposer.last_rejections == []

    runs = [seen(report, i) for i in (1, 2, 3)]
    cwds = {Path(r["cwd"]) for r in runs}
    assert len(cwds) == 3 and not any(c.is_relative_to(repo) or c.exists() for c in cwds)  # gone again
    for i, r in enumerate(runs, 1):
        assert "Lower val_bpb." in r["prompt"] and "LR = 0.1\n" in r["prompt"]
        assert "You are one of 3 agents" in r["prompt"] and "Idea: <one line" in r["prompt"]
        assert f"yours should be about: {DEFAULT_FOCUS[i - 1]}." in r["prompt"]

    # The scratch file was dropped; the edit of prepare.py was kept so the validator rejects it visibly.
    validator = Validator(allowed_files=["train.py"])
    base = BaseTree.at(repo, before["head"])
    assert list(validator.check_static(proposals[1], base)) == ["train.py"]
    with pytest.raises(Rejected) as rejected:
        validator.check_static(proposals[2], base)
    assert (rejected.value.step, str(rejected.value)) == (
        "files", "'prepare.py': is not an editable file (allowed: train.py)")
    calls = (tmp_path / "state" / CALL_LOG_FILE).read_text().splitlines()
    assert [json.loads(c)["proposals"] for c in calls] == [1, 1, 1]


def test_the_prompt_can_go_as_an_argument_or_on_stdin(tmp_path: Path, agent: Path, report: Path) -> None:
    repo = make_repo(tmp_path)
    for source in ("arg:{prompt}", ""):
        proposals = CommandProposer(repo=repo, **command(agent, report, "knob", source=source)).propose(
            context_of(repo), 1)
        assert [p.description for p in proposals] == ["LR 0.1 -> 0.2: candidate 1"]
        prompt = seen(report, 1)["prompt"]
        assert prompt.startswith("You are an ML research engineer") and "LR = 0.1\n" in prompt


def test_the_agent_gets_a_minimal_environment_and_its_own_key_only(
        tmp_path: Path, agent: Path, report: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AGENT_KEY_ENV, AGENT_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-the-agent")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-not-for-the-agent")
    repo = make_repo(tmp_path)
    proposer = CommandProposer(repo=repo, **command(agent, report, "knob,leak",
                                                    env_passthrough=[AGENT_KEY_ENV]))
    proposals = proposer.propose(context_of(repo), 2)

    env, home = seen(report, 1)["env"], seen(report, 1)["home"]
    assert env[AGENT_KEY_ENV] == AGENT_KEY  # the one configured exception
    assert "OPENAI_API_KEY" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert set(env) <= {"PATH", "LANG", "LANGUAGE", "TZ", "TERM", "USER", "LOGNAME", "SHELL", "TMPDIR",
                        "HOME",
                        AGENT_KEY_ENV, "FANOUT_AGENT_CANDIDATE", "FANOUT_AGENT_ROUND", "STANDIN_MODE",
                        "STANDIN_REPORT"} | {k for k in env if k.startswith("LC_")}
    assert env["HOME"] != os.environ["HOME"] and home == []  # an empty scratch home
    assert (env["FANOUT_AGENT_CANDIDATE"], env["FANOUT_AGENT_ROUND"]) == ("1", "1")

    assert len(proposals) == 1
    (leak,) = proposer.last_rejections
    assert str(leak) == "idea 2: the agent exited 1: my key is [redacted]"
    for text in (repr(proposals), repr(proposer.usage_log), json.dumps(proposer.options()), repr(proposer)):
        assert AGENT_KEY not in text


def test_a_hung_agent_is_killed_with_its_process_group(tmp_path: Path, agent: Path, report: Path) -> None:
    repo = make_repo(tmp_path)
    proposer = CommandProposer(repo=repo, **command(agent, report, "hang", timeout_s=1.0, kill_grace_s=0.5))
    started = time.monotonic()
    assert proposer.propose(context_of(repo), 1) == []
    assert time.monotonic() - started < 6
    assert [r.reason for r in proposer.last_rejections] == [
        "timed out after timeout_s=1s (its process group was killed)"]
    child = int((report / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)


def test_unusable_results_are_dropped_with_a_reason(tmp_path: Path, agent: Path, report: Path) -> None:
    repo = make_repo(tmp_path)
    before = repo_snapshot(repo)
    modes = "fail,nothing,same,same,delete,symlink,quiet"
    proposer = CommandProposer(repo=repo, **command(agent, report, modes))
    proposals = proposer.propose(context_of(repo), 7)
    # Without an 'Idea:' line the description says what moved.
    assert [p.description for p in proposals] == ["LR 0.1 -> 0.3: candidate 3", "agent: LR 0.1 -> 0.8"]
    assert [str(r) for r in proposer.last_rejections] == [
        "idea 1: the agent exited 2: boom: model not found",
        "idea 2: the agent changed none of train.py",
        "idea 4 ('LR 0.1 -> 0.3: candidate 4'): duplicate of candidate 3 (the same change)",
        "idea 5 ('LR 0.1 -> 0.6: candidate 5'): the agent deleted train.py (a proposal cannot delete files)",
        "idea 6 ('LR 0.1 -> 0.7: candidate 6'): train.py is a symlink in the agent's copy",
    ]
    assert [u.error != "" for u in proposer.usage_log] == [True, True, False, True, True, True, False]
    assert repo_snapshot(repo) == before


def test_an_agent_that_commits_and_moves_branches_touches_only_its_copy(
        tmp_path: Path, agent: Path, report: Path) -> None:
    repo = make_repo(tmp_path)
    before = repo_snapshot(repo)
    (proposal,) = CommandProposer(repo=repo, **command(agent, report, "commit")).propose(context_of(repo), 1)
    assert "LR = 0.2\n" in proposal.edits[0].content  # its committed change is still the diff
    assert repo_snapshot(repo) == before and set(branches(repo)) == {"main"}
    assert git(repo, "tag") == ""


def test_cap_missing_command_and_bad_options(tmp_path: Path, agent: Path, report: Path) -> None:
    repo = make_repo(tmp_path)
    options = command(agent, report, "knob", max_calls=3)
    assert len(CommandProposer(repo=repo, state_dir=tmp_path, **options).propose(context_of(repo), 2)) == 2
    # A restart with the same state directory has one agent run left, then none.
    again = CommandProposer(repo=repo, state_dir=tmp_path, **options)
    assert len(again.propose(context_of(repo), 2)) == 1
    with pytest.raises(ProposerError, match=r"max_calls = 3, 3 calls made"):
        again.propose(context_of(repo), 2)

    missing = CommandProposer(repo=repo, argv=["no-such-agent-cli", "-p", "{prompt}"])
    with pytest.raises(ProposerError, match="'no-such-agent-cli' was not found on PATH"):
        missing.propose(context_of(repo), 1)
    with pytest.raises(ConfigError, match=r"\[proposer.command\] argv: List should have at least 1 item"):
        CommandProposer(argv=[])
    with pytest.raises(ConfigError, match="env_passthrough holds variable NAMES"):
        CommandProposer(argv=["x"], env_passthrough=["sk-agent-456"])
    with pytest.raises(ProposerError, match="needs the research repository"):
        CommandProposer(argv=["x"]).propose(context_of(repo), 1)


def test_a_study_round_with_the_command_proposer(tmp_path: Path, agent: Path, report: Path) -> None:
    repo = make_repo(tmp_path, k=2)
    proposer = agent_proposer("command", command(agent, report, "knob,prepare"), repo=repo,
                              state_dir=study_root(repo))
    outcome = Study(repo, proposer=proposer).run(rounds=1)
    assert outcome.stopped == ""
    records = sorted(candidate_records(repo), key=lambda r: (r["round"], r["candidate"]))
    assert [(r["candidate"], r["status"], r["val_bpb"]) for r in records] == [
        (0, "baseline", BASELINE), (1, "keep", val_bpb(lr=0.2)), (2, "reject", None)]
    assert records[2]["reason"] == "files: 'prepare.py': is not an editable file (allowed: train.py)"
    assert records[1]["description"] == "LR 0.1 -> 0.2: candidate 1"
    assert "LR = 0.2\n" in git(repo, "show", "research:train.py")
    assert git(repo, "status", "--porcelain") == ""
    rejected_branch = "refs/heads/fanout/t/r01-c2"  # a rejected candidate gets no branch
    assert subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "-q", rejected_branch],
                          capture_output=True).returncode != 0


# ----------------------------------------------------------------------------- agent-driven mode
TEMPLATE_PROGRAM = Path(__file__).resolve().parents[2] / "src" / "fanout_research" / "template" / "program.md"


def driver_blocks() -> list[str]:
    """The bash blocks of program.md's agent-driven section, as an agent would copy them."""
    text = TEMPLATE_PROGRAM.read_text()
    section = text[text.index("<!-- fanout:agent-driven -->"):text.index("<!-- /fanout:agent-driven -->")]
    return [block for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)]


def shell(repo: Path, script: str) -> subprocess.CompletedProcess[str]:
    env = cli_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)


def test_program_md_drives_a_round_through_the_real_cli(tmp_path: Path) -> None:
    """Run the agent-driven section's commands as written (TAG, NN and i filled in, the edit made
    by sed), then the lookups it promises: everything it tells an agent must work."""
    repo = make_repo(tmp_path, k=2)
    setup, round_ = driver_blocks()
    done = shell(repo, "set -e\n" + setup.replace("TAG", "t"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()  # prepare's data directory, submit's name, wait's JSON
    assert lines[1] == "t-agent-r00-c0"
    (baseline,) = json.loads("\n".join(lines[2:]))
    assert baseline["phase"] == "succeeded" and baseline["metrics"]["val_bpb"] == BASELINE

    edits = {1: "sed -i 's/^LR = 0.1$/LR = 0.3/' train.py", 2: "sed -i 's/^CRASH = 0$/CRASH = 1/' train.py"}
    for i, edit in edits.items():
        script = round_.replace("TAG", "t").replace("rNN-ci", f"r01-c{i}").replace(
            "# edit train.py, then check that it still parses:", edit).replace(
            "<one line: the hypothesis>", f"idea {i}")
        done = shell(repo, "set -e\n" + script)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == f"t-agent-r01-c{i}"
    waited = shell(repo, "fanout wait t-agent-r01-c1 t-agent-r01-c2 --json")
    assert waited.returncode == 1  # one of them failed
    results = {r["slug"]: r for r in json.loads(waited.stdout)}
    assert results["t-agent-r01-c1"]["metrics"]["val_bpb"] == val_bpb(lr=0.3)
    assert (results["t-agent-r01-c2"]["phase"], results["t-agent-r01-c2"]["failure"]) == ("failed", "crash")

    keep = shell(repo, "git checkout -q agent-research && git merge -q --ff-only agent/t/r01-c1")
    assert keep.returncode == 0, keep.stderr
    assert "LR = 0.3\n" in git(repo, "show", "agent-research:train.py")
    status = json.loads(shell(repo, "fanout status --json").stdout)
    assert {(s["slug"], s["phase"], s["val_bpb"]) for s in status if "-agent-" in s["slug"]} == {
        ("t-agent-r00-c0", "succeeded", BASELINE), ("t-agent-r01-c1", "succeeded", val_bpb(lr=0.3)),
        ("t-agent-r01-c2", "failed", None)}
    tail = shell(repo, "fanout logs t-agent-r01-c2 --tail 5")
    assert "crashing on purpose" in tail.stdout
    assert (repo / "results.tsv").read_text().startswith("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n")
    # As the section says: results/best read the job ledger when no `fanout run` log exists.
    rows = {r["name"]: r for r in json.loads(shell(repo, "fanout results --json").stdout)}
    assert (rows["t-agent-r01-c1"]["val_bpb"], rows["t-agent-r01-c2"]["phase"]) == (val_bpb(lr=0.3), "failed")
    best = json.loads(shell(repo, "fanout best --json").stdout)
    assert best["name"] == "t-agent-r01-c1" and best["val_bpb"] == val_bpb(lr=0.3)
