"""Proposers that ask a language model for ideas: OpenAI-compatible chat completions and the
Anthropic messages API, plus what every agent proposer shares (the prompt, the edit format and
its parser, the per-study call log and cap).

The model sees what a human researcher would: ``program.md``, the editable files as they are at
the round's base commit, and the study's history (what was tried, what it scored, what crashed or
was rejected and why). It answers with K ideas in a plain-text edit format (below) that needs no
tool-calling support, so the same proposer serves OpenAI, vLLM, Ollama, llama.cpp's server,
OpenRouter, Gemini's compatible endpoint and Anthropic. Its answer is untrusted text: ideas that
do not parse or do not apply are dropped *here*, each with a reason (``last_rejections``), and the
survivors still go through the whole validation layer in the loop.

The API key is read from the environment variable named in the config (``api_key_env``) at the
moment of each request and lives only in that request's headers: it is never an attribute of the
proposer, never in ``options()``, the call log, a log line or an exception message (any text that
came back from the server is scrubbed of it), and jobs never see it (the backends pass an
allow-list of the environment).

The edit format::

    ### Idea: halve DEPTH: more steps beat more layers at this budget
    <<<<<<< SEARCH path=train.py
    DEPTH = 8
    =======
    DEPTH = 4
    >>>>>>> REPLACE
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tenacity import RetryCallState, Retrying, retry_if_exception_type

from fanout_research.errors import ConfigError, first_problem
from fanout_research.jsonl import AppendLog
from fanout_research.models import utcnow
from fanout_research.research.knobs import read_knobs
from fanout_research.research.proposals import (
    Attempt,
    Proposal,
    ProposerError,
    ResearchContext,
    SearchReplace,
)

log = logging.getLogger(__name__)

AGENT_PROPOSERS = ("openai", "anthropic", "command")
CALL_LOG_FILE = "proposer-calls.jsonl"
DESCRIPTION_LIMIT = 200
REASON_LIMIT = 240
SNIPPET_LIMIT = 300
# Header names that would carry a credential: configure api_key_env instead, so it never sits in
# fanout.toml or in options().
_SECRET_HEADERS = frozenset({"authorization", "x-api-key", "api-key", "x-goog-api-key",
                             "proxy-authorization"})


# ----------------------------------------------------------------------------- the prompt
SYSTEM_PROMPT = """\
You are an ML research engineer running an automated study. Each experiment edits the training \
script, trains for a fixed wall-clock budget and is scored by val_bpb on held-out data (lower is \
better). Several experiments run in parallel; the best one is kept only if it beats the best so \
far. Follow the research program you are given. Prefer small, well-understood changes whose \
outcome teaches something; do not repeat what was already tried unless you change it materially."""

BLOCKS_TASK = """\
Propose exactly {k} different ideas for the next round. Write each idea as a header line followed \
by one or more edit blocks, and nothing else is needed:

### Idea: <one line: the change and the hypothesis behind it>
<<<<<<< SEARCH path=<file>
<lines copied exactly from the current file: enough to be unique, usually 1-5 lines>
=======
<the lines that replace them>
>>>>>>> REPLACE

Rules:
- The SEARCH text must occur exactly once in the current file, character for character \
(indentation and comments included). Copy it from the file above; never from memory.
- The blocks of one idea apply in order, to the file as shown above. Ideas are independent: each \
is applied on its own to the current file, never on top of another idea.
- Only these files may be edited: {files}.
- The {k} ideas must differ from each other and from what was already tried.
- Text outside the ideas' headers and blocks is ignored."""

EDIT_TASK = """\
You are one of {k} agents working in parallel, each on its own copy of the repository; the \
current directory is yours. Make exactly ONE experiment: edit the files in place (only {files}), \
then stop. {focus}
Do not run the training and do not run `fanout` (the study submits, scores and keeps the \
experiments itself; there is no GPU here); you may check that the script still parses, e.g. \
`python -c "import ast; ast.parse(open('train.py').read())"`. Do not commit, and do not create \
other files.
End your answer with one line of the form:
Idea: <one line: the change and the hypothesis behind it>"""

DEFAULT_FOCUS = (
    "the optimizer and the learning-rate schedule",
    "the model's shape (depth, width, heads, MLP size)",
    "batch size, sequence length and how the time budget is used",
    "initialisation, normalisation and regularisation",
    "throughput: more useful training steps within the budget",
)


DRIVER_SECTION = re.compile(r"<!--\s*fanout:agent-driven\s*-->.*?<!--\s*/fanout:agent-driven\s*-->\n?",
                            re.DOTALL)


def program_for_proposers(program: str) -> str:
    """program.md without its agent-driven section (between ``<!-- fanout:agent-driven -->`` and
    ``<!-- /fanout:agent-driven -->``): how to submit jobs and keep results is for an agent that
    drives the study itself; a proposer that did it would run jobs behind the study's back."""
    return DRIVER_SECTION.sub("", program)


def _fence(text: str) -> str:
    """A Markdown fence longer than any backtick run inside ``text``, so the file cannot end it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _one_line(text: str, limit: int) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _knob_changes(attempt: Attempt) -> str:
    """``LR 0.1 -> 0.3, WIDTH 4 -> 2``: what an attempt changed, relative to its parent."""
    if not attempt.base_knobs:
        return ""
    changed = [f"{name} {attempt.base_knobs.get(name, '?')} -> {value}"
               for name, value in attempt.knobs.items() if attempt.base_knobs.get(name) != value]
    return ", ".join(changed)


def order_history(history: Sequence[Attempt]) -> list[Attempt]:
    """Most informative first: the baseline and every kept result (the lineage the current code
    descends from, oldest first), then everything else, most recent round first."""
    lineage = [a for a in history if a.status in ("baseline", "keep")]
    rest = [a for a in history if a.status not in ("baseline", "keep")]
    rest = sorted(rest, key=lambda a: a.round, reverse=True)  # stable: decision order within a round
    return lineage + rest


def format_history(history: Sequence[Attempt], limit: int) -> str:
    """The study so far, one line per attempt, at most ``limit`` lines (bounded prompt size)."""
    if not history:
        return "Nothing yet: this is the first round (the unmodified baseline runs beside it)."
    ordered = order_history(history)
    lines = []
    for attempt in ordered[: max(0, limit)]:
        score = f"val_bpb={attempt.val_bpb:.6f}" if attempt.val_bpb is not None else "no score"
        changes = _knob_changes(attempt)
        line = f"- round {attempt.round} [{attempt.status}] {score}: {_one_line(attempt.description, 160)}"
        if changes and changes not in attempt.description:
            line += f" (knobs: {changes})"
        if attempt.reason and attempt.status in ("crash", "reject"):
            line += f" -- why: {_one_line(attempt.reason, REASON_LIMIT)}"
        lines.append(line)
    if len(ordered) > limit:
        lines.append(f"- ... and {len(ordered) - limit} older attempts not shown")
    return "\n".join(lines)


def build_prompt(
    context: ResearchContext,
    k: int,
    *,
    mode: Literal["blocks", "edit"] = "blocks",
    max_history: int = 40,
    notes: Sequence[str] = (),
    focus: str = "",
) -> tuple[str, str]:
    """``(system, user)`` messages for one proposer call.

    ``mode="blocks"`` asks for ``k`` ideas as SEARCH/REPLACE blocks (the API proposers);
    ``mode="edit"`` asks one coding agent, working in a copy of the repo, for one idea made in
    place (the command proposer), steered towards ``focus`` so K parallel agents differ.
    ``notes`` are problems with the previous answer, fed back so the model can fix its format.
    """
    files = ", ".join(context.allowed_files) or ", ".join(context.files)
    best = (f"{context.best_val_bpb:.6f}" if context.best_val_bpb is not None
            else "none yet (the unmodified baseline is measured this round)")
    program = program_for_proposers(context.program).strip()
    parts = ["# Research program (program.md)", program or "(no program.md)", "",
             "# Where the study stands", f"Round {context.round}. Best val_bpb so far: {best}. "
             f"Base commit: {context.base_commit[:12]}.", ""]
    parts.append("# The files you may edit, as they are now")
    for path, text in context.files.items():
        fence = _fence(text)
        parts += [f"## {path}", f"{fence}{'python' if path.endswith('.py') else ''}", text.rstrip("\n"),
                  fence, ""]
    parts += ["# What was tried so far (kept results first, then the most recent)",
              format_history(context.history, max_history), ""]
    if notes:
        parts += ["# Problems with your previous answer (those ideas were dropped)",
                  *(f"- {_one_line(note, REASON_LIMIT)}" for note in notes[:20]), ""]
    parts.append("# Your task")
    if mode == "blocks":
        parts.append(BLOCKS_TASK.format(k=k, files=files))
    else:
        hint = f"To keep the {k} experiments distinct, yours should be about: {focus}." if focus else ""
        parts.append(EDIT_TASK.format(k=k, files=files, focus=hint))
    return SYSTEM_PROMPT, "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- the parser
_HEADER = re.compile(r"^\s*#{1,6}\s*Idea\b\s*\d*\s*[:.)-]?\s*(.*?)\s*$", re.IGNORECASE)
_SEARCH = re.compile(r"^\s*<{5,9}\s*SEARCH\b(.*)$")
_DIVIDER = re.compile(r"^\s*={5,9}\s*$")
_REPLACE = re.compile(r"^\s*>{5,9}\s*REPLACE\b.*$")
_PATH = re.compile(r"""path\s*=\s*["']?([^\s"']+)["']?""")


@dataclass(frozen=True)
class IdeaRejection:
    """One idea of a model's answer that did not become a proposal, and why."""

    idea: int  # 1-based position in the answer; 0 for the answer as a whole
    description: str
    reason: str

    def __str__(self) -> str:
        what = f"idea {self.idea}" if self.idea else "the answer"
        about = f" ({_one_line(self.description, 80)!r})" if self.description else ""
        return f"{what}{about}: {self.reason}"


@dataclass
class ParsedIdeas:
    proposals: list[Proposal] = field(default_factory=list)
    rejections: list[IdeaRejection] = field(default_factory=list)


@dataclass
class _Block:
    path: str
    search: str
    replace: str


class _Malformed(Exception):
    pass


def _snippet(text: str, limit: int = 50) -> str:
    first = next((line for line in text.splitlines() if line.strip()), text)
    return repr(first.strip()[:limit] + ("..." if len(first.strip()) > limit else ""))


def _blocks(lines: list[str], files: Mapping[str, str]) -> list[_Block]:
    """The edit blocks in one idea's lines; raises :class:`_Malformed` with a precise reason."""
    blocks: list[_Block] = []
    state, path, search = "out", "", ""
    body: list[str] = []
    for line in lines:
        n = len(blocks) + 1
        if state == "out":
            if match := _SEARCH.match(line):
                found = _PATH.search(match.group(1))
                if found:
                    path = found.group(1)
                elif len(files) == 1:  # unambiguous: the one editable file
                    path = next(iter(files))
                else:
                    raise _Malformed(f"block {n}: '<<<<<<< SEARCH' names no file (write 'path=<file>')")
                state, body = "search", []
            elif _DIVIDER.match(line) or _REPLACE.match(line):
                raise _Malformed(f"block {n}: {line.strip()[:12]!r} outside a SEARCH block")
        elif state == "search":
            if _DIVIDER.match(line):
                search, body, state = "".join(f"{x}\n" for x in body), [], "replace"
            elif _SEARCH.match(line) or _REPLACE.match(line):
                raise _Malformed(f"block {n}: no '=======' between SEARCH and REPLACE")
            else:
                body.append(line)
        else:  # replace
            if _REPLACE.match(line):
                blocks.append(_Block(path, search, "".join(f"{x}\n" for x in body)))
                state = "out"
            elif _SEARCH.match(line) or _DIVIDER.match(line):
                raise _Malformed(f"block {n}: no '>>>>>>> REPLACE' closing it")
            else:
                body.append(line)
    if state != "out":
        raise _Malformed(f"block {len(blocks) + 1} is not closed (no '>>>>>>> REPLACE'; "
                         "the answer may have been cut off)")
    if not blocks:
        raise _Malformed("no '<<<<<<< SEARCH path=...' block")
    return blocks


def _apply(blocks: list[_Block], files: Mapping[str, str]) -> tuple[list[SearchReplace], dict[str, str]]:
    """Apply the blocks in order as the validator will; returns the edits and the changed files."""
    current = dict(files)
    edits: list[SearchReplace] = []
    for n, block in enumerate(blocks, 1):
        if block.path not in current:
            raise _Malformed(f"block {n} edits {block.path!r}, which is not an editable file "
                             f"(editable: {', '.join(files) or 'none'})")
        if not block.search.strip():
            raise _Malformed(f"block {n}: the SEARCH text is empty")
        text = current[block.path]
        search, replace = block.search, block.replace
        if text.count(search) == 0 and not text.endswith("\n") and text.endswith(search[:-1]):
            search, replace = search[:-1], replace.removesuffix("\n")  # the file's unterminated last line
        count = text.count(search)
        if count == 0:
            raise _Malformed(f"block {n}: SEARCH text not found in {block.path} "
                             f"(starts {_snippet(search)}); copy it exactly from the file")
        if count > 1:
            raise _Malformed(f"block {n}: SEARCH text occurs {count} times in {block.path}, must be "
                             f"once; add surrounding lines (starts {_snippet(search)})")
        current[block.path] = text.replace(search, replace, 1)
        edits.append(SearchReplace(path=block.path, search=search, replace=replace))
    changed = {path: text for path, text in current.items() if text != files[path]}
    if not changed:
        raise _Malformed("the edits change nothing")
    return edits, changed


def knobs_of(changed: Mapping[str, str], path: str = "train.py") -> dict[str, Any]:
    """The full knob setting of the changed ``train.py`` (as the knob proposer records it), or {}
    when it did not change or does not parse (the validator will say why)."""
    if path not in changed:
        return {}
    try:
        return dict(read_knobs(changed[path]))
    except (SyntaxError, ValueError, RecursionError):
        return {}


def parse_ideas(text: str, files: Mapping[str, str], k: int, *, proposer: str = "") -> ParsedIdeas:
    """Turn a model's answer into at most ``k`` proposals that apply cleanly to ``files``.

    Every idea that is malformed, edits a file it may not, has a SEARCH text that does not occur
    exactly once, changes nothing, duplicates an earlier idea of the same answer (same resulting
    files), or comes after the first ``k`` valid ones, becomes an :class:`IdeaRejection` with the
    reason instead. Syntax, imports and the dry run are the validator's job, not the parser's.
    """
    parsed = ParsedIdeas()
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    ideas: list[tuple[str, list[str]]] = []
    in_block = False  # a '# Idea' comment inside a block's code is code, not a header
    for line in lines:
        header = None if in_block else _HEADER.match(line)
        if _SEARCH.match(line):
            in_block = True
        elif _REPLACE.match(line):
            in_block = False
        if header:
            ideas.append((header.group(1), []))
        elif ideas:
            ideas[-1][1].append(line)
    if not ideas:
        reason = ("no '### Idea: ...' header" + (" (the answer is empty)" if not text.strip() else "")
                  + "; nothing could be parsed")
        parsed.rejections.append(IdeaRejection(0, "", reason))
        return parsed
    seen: dict[tuple[tuple[str, str], ...], int] = {}
    for n, (raw_description, body) in enumerate(ideas, 1):
        description = _one_line(raw_description.strip().strip("*").strip(), DESCRIPTION_LIMIT)
        try:
            if not description:
                raise _Malformed("no one-line description after '### Idea:'")
            edits, changed = _apply(_blocks(body, files), files)
        except _Malformed as exc:
            parsed.rejections.append(IdeaRejection(n, description, str(exc)))
            continue
        key = tuple(sorted(changed.items()))
        if key in seen:
            parsed.rejections.append(IdeaRejection(n, description, f"duplicate of idea {seen[key]} "
                                                                   "(the same change)"))
            continue
        seen[key] = n
        if len(parsed.proposals) >= k:
            parsed.rejections.append(IdeaRejection(n, description, f"beyond the {k} ideas asked for"))
            continue
        parsed.proposals.append(Proposal(description=description, edits=tuple(edits),
                                         knobs=knobs_of(changed), proposer=proposer))
    return parsed


# ----------------------------------------------------------------------------- the call log (cap)
@dataclass
class CallUsage:
    """One proposer call: a model request (with its retries) or one agent run."""

    api: str
    model: str
    round: int
    attempts: int = 0
    seconds: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    proposals: int = 0
    rejected: list[str] = field(default_factory=list)
    error: str = ""
    at: str = field(default_factory=lambda: utcnow().isoformat())


class CallLog:
    """``<state_dir>/proposer-calls.jsonl``: one line per proposer call, for every proposer of
    the study. It is what ``max_calls`` counts, so the cap holds across restarts (a resumed round
    reuses its logged proposals and makes no new call). Without a state directory the count is
    this process's only."""

    def __init__(self, state_dir: str | Path | None) -> None:
        self.path = Path(state_dir) / CALL_LOG_FILE if state_dir else None
        self._memory: list[dict[str, Any]] = []

    def records(self) -> list[dict[str, Any]]:
        if self.path is None:
            return list(self._memory)
        if not self.path.exists():
            return []
        return list(AppendLog(self.path).records())

    def count(self) -> int:
        return len(self.records())

    def append(self, usage: CallUsage) -> None:
        record = {"event": "proposer_call", **asdict(usage)}
        if self.path is None:
            self._memory.append(record)
        else:
            AppendLog(self.path).append(record)

    def remaining(self, max_calls: int | None) -> int | None:
        return None if max_calls is None else max(0, max_calls - self.count())

    def check(self, max_calls: int | None, needed: int = 1) -> int:
        """How many calls may be made now (up to ``needed``); raises once the cap is spent."""
        left = self.remaining(max_calls)
        if left is None:
            return needed
        if left <= 0:
            where = f" (counted in {self.path})" if self.path else ""
            raise ProposerError(f"the study's proposer cap is spent: max_calls = {max_calls}, "
                                f"{self.count()} calls made{where}; raise max_calls to go on")
        return min(needed, left)


# ----------------------------------------------------------------------------- HTTP with retries
class _Retryable(Exception):
    """A failure worth another attempt (429, 5xx, timeout, dropped or garbled response)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(Exception):
    """A failure no retry will fix (4xx other than 408/429, an answer of the wrong shape)."""


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or an HTTP date) or ``retry-after-ms``."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_text(response: httpx.Response) -> str:
    """The message of an error body in either API's format (``{"error": {"message": ...}}``),
    else the body's text."""
    try:
        data = response.json()
        message = data["error"]["message"] if isinstance(data["error"], dict) else data["error"]
        return str(message)
    except (ValueError, KeyError, TypeError):
        return response.text


@dataclass(frozen=True)
class Completion:
    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    finish: str = ""


class LLMSettings(BaseModel):
    """``[proposer.openai]`` / ``[proposer.anthropic]`` options. The key is never one of them:
    ``api_key_env`` names the environment variable that holds it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    base_url: str = Field(min_length=1)
    api_key_env: str = Field("", description="Name of the variable holding the key; '' for no key.")
    temperature: float = Field(0.7, description="Negative: leave it to the server's default.")
    max_tokens: int = Field(8192, ge=0, description="0: not sent (the server's default).")
    timeout_s: float = Field(300.0, gt=0)
    max_attempts: int = Field(5, ge=1, le=20)
    backoff_s: float = Field(2.0, ge=0, description="First backoff; doubles per attempt, jittered.")
    max_backoff_s: float = Field(60.0, ge=0)
    max_retry_after_s: float = Field(120.0, ge=0, description="Give up if the server asks for longer.")
    max_calls: int | None = Field(None, ge=0, description="Per-study cap on proposer calls.")
    price_input_per_mtok: float = Field(0.0, ge=0)
    price_output_per_mtok: float = Field(0.0, ge=0)
    max_history: int = Field(40, ge=0, description="Attempts shown in the prompt.")
    max_repairs: int = Field(1, ge=0, description="Ask again when an answer has no usable idea.")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="Merged into the request body.")
    extra_headers: dict[str, str] = Field(default_factory=dict)
    anthropic_version: str = "2023-06-01"

    @field_validator("api_key_env")
    @classmethod
    def _a_name(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("api_key_env is the NAME of an environment variable (e.g. OPENAI_API_KEY), "
                             "not the key itself")
        return value

    @field_validator("extra_headers")
    @classmethod
    def _no_credentials(cls, value: dict[str, str]) -> dict[str, str]:
        bad = sorted(name for name in value if name.lower() in _SECRET_HEADERS)
        if bad:
            raise ValueError(f"extra_headers may not set {', '.join(bad)}: put the key in an environment "
                             "variable and name it in api_key_env")
        return value


class LLMProposer:
    """The shared machinery of the two API proposers; subclasses say how to ask and how to read.

    ``propose`` makes one call per round (bounded retries inside it; one more, showing the
    problems, if no idea of the answer was usable) and returns the valid proposals; the other
    ideas are on ``last_rejections`` (also logged at WARNING, and kept in the call log so the next
    prompt can say what went wrong). ``usage_log`` holds every call's
    :class:`CallUsage` (tokens, cost estimate, attempts, time) from this process; the call log file
    under ``state_dir`` holds them across restarts and is what ``max_calls`` counts.
    """

    name: ClassVar[str] = "llm"
    api: ClassVar[str] = "llm"
    default_base_url: ClassVar[str] = ""
    default_key_env: ClassVar[str] = ""

    def __init__(self, *, state_dir: str | Path | None = None, **options: Any) -> None:
        options = {"base_url": self.default_base_url, "api_key_env": self.default_key_env, **options}
        try:
            self.settings = LLMSettings.model_validate(options)
        except ValidationError as exc:
            raise ConfigError(f"[proposer.{self.name}] {first_problem(exc)}") from None
        self.calls = CallLog(state_dir)
        self.usage_log: list[CallUsage] = []
        self.last_rejections: list[IdeaRejection] = []

    @property
    def label(self) -> str:
        return f"{self.name}:{self.settings.model}"

    def options(self) -> dict[str, Any]:
        """The settings (for display and records): the key variable's name, never its value."""
        return self.settings.model_dump()

    def __repr__(self) -> str:
        s = self.settings
        return (f"{type(self).__name__}(model={s.model!r}, base_url={s.base_url!r}, "
                f"api_key_env={s.api_key_env!r})")

    # -- the seam ------------------------------------------------------------------------------
    def propose(self, context: ResearchContext, k: int) -> list[Proposal]:
        """One call, or ``1 + max_repairs`` when an answer has no usable idea at all (each
        repair call shows the model what was wrong with its previous answer)."""
        self.calls.check(self.settings.max_calls)
        notes = self._previous_notes()
        self.last_rejections = []
        for ask in range(1 + self.settings.max_repairs):
            if ask and self.calls.remaining(self.settings.max_calls) == 0:
                break
            parsed = self._ask(context, k, notes)
            self.last_rejections += parsed.rejections
            if parsed.proposals or not parsed.rejections:
                return parsed.proposals
            notes = [str(r) for r in parsed.rejections]
        return []

    def _ask(self, context: ResearchContext, k: int, notes: Sequence[str]) -> ParsedIdeas:
        system, user = build_prompt(context, k, mode="blocks", max_history=self.settings.max_history,
                                    notes=notes)
        usage = CallUsage(api=self.api, model=self.settings.model, round=context.round)
        started = time.monotonic()
        try:
            completion = self._complete(system, user, usage)
        except ProposerError as exc:
            usage.error, usage.seconds = str(exc), round(time.monotonic() - started, 3)
            self._finish(usage)
            raise
        usage.seconds = round(time.monotonic() - started, 3)
        usage.input_tokens, usage.output_tokens = completion.input_tokens, completion.output_tokens
        s = self.settings
        usage.cost_usd = round((completion.input_tokens * s.price_input_per_mtok
                                + completion.output_tokens * s.price_output_per_mtok) / 1e6, 6)
        parsed = parse_ideas(completion.text, context.files, k, proposer=self.label)
        if completion.finish in ("length", "max_tokens") and parsed.rejections:
            parsed.rejections.append(IdeaRejection(0, "", f"the answer was cut off at max_tokens "
                                                          f"({s.max_tokens}); raise it"))
        usage.proposals, usage.rejected = len(parsed.proposals), [str(r) for r in parsed.rejections]
        for rejection in parsed.rejections:
            log.warning("%s: round %d: dropped %s", self.label, context.round, rejection)
        self._finish(usage)
        return parsed

    def _finish(self, usage: CallUsage) -> None:
        self.usage_log.append(usage)
        self.calls.append(usage)

    def _previous_notes(self) -> list[str]:
        records = self.calls.records()
        return list(records[-1].get("rejected", [])) if records else []

    # -- one call with retries -------------------------------------------------------------------
    def _key(self) -> str:
        name = self.settings.api_key_env
        if not name:
            return ""
        key = os.environ.get(name, "")
        if not key:
            raise ProposerError(f"the environment variable {name} is not set ([proposer.{self.name}] "
                                f"api_key_env names it as the holder of the API key)")
        return key

    def _complete(self, system: str, user: str, usage: CallUsage) -> Completion:
        s = self.settings
        key = self._key()
        url, headers, body = self._request(system, user, key)
        body = {**body, **s.extra_body, "stream": False}

        def scrub(text: str) -> str:
            return text.replace(key, "[redacted]") if key else text

        def attempt() -> Completion:
            usage.attempts += 1
            try:
                response = client.post(url, headers=headers, json=body)
            except httpx.TimeoutException as exc:
                raise _Retryable(f"no answer within timeout_s={s.timeout_s:g} "
                                 f"({type(exc).__name__})") from None
            except httpx.TransportError as exc:  # refused, reset, truncated body...
                raise _Retryable(scrub(f"{type(exc).__name__}: {exc}")) from None
            status = response.status_code
            snippet = scrub(_one_line(_error_text(response) if status >= 400 else response.text,
                                      SNIPPET_LIMIT))
            if status in (408, 429) or status >= 500:
                raise _Retryable(f"HTTP {status}: {snippet}", parse_retry_after(response.headers))
            if status >= 400:
                raise _Fatal(f"HTTP {status}: {snippet}")
            try:
                data = response.json()
            except ValueError:
                raise _Retryable(f"the response is not valid JSON (HTTP {status}, "
                                 f"{len(response.content)} bytes, starts {snippet[:80]!r})") from None
            try:
                return self._read(data)
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                raise _Fatal(f"unexpected response shape ({type(exc).__name__}: {scrub(str(exc))[:80]}); "
                             f"starts {snippet[:120]!r}") from None

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, _Retryable) and exc.retry_after is not None:
                return exc.retry_after
            step = min(s.max_backoff_s, s.backoff_s * 2 ** (state.attempt_number - 1))
            return step * random.uniform(0.5, 1.0)

        def stop(state: RetryCallState) -> bool:
            exc = state.outcome.exception() if state.outcome else None
            too_long = (isinstance(exc, _Retryable) and exc.retry_after is not None
                        and exc.retry_after > s.max_retry_after_s)
            return too_long or state.attempt_number >= s.max_attempts

        where = f"{self.name} API at {s.base_url}"
        try:
            with httpx.Client(timeout=s.timeout_s) as client:
                for trying in Retrying(retry=retry_if_exception_type(_Retryable), wait=wait, stop=stop,
                                       reraise=True, before_sleep=self._log_retry):
                    with trying:
                        return attempt()
        except _Retryable as exc:
            asked = exc.retry_after
            if asked is not None and asked > s.max_retry_after_s:
                raise ProposerError(f"{where}: the server asked to retry after {asked:g}s, more than "
                                    f"max_retry_after_s={s.max_retry_after_s:g}: {exc}") from None
            raise ProposerError(f"{where}: gave up after {usage.attempts} attempts "
                                f"(max_attempts={s.max_attempts}); last: {exc}") from None
        except _Fatal as exc:
            raise ProposerError(f"{where}: {exc}") from None
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s: attempt %d failed (%s); retrying in %.1fs", self.label, state.attempt_number,
                    exc, delay)

    # -- per API ---------------------------------------------------------------------------------
    def _request(self, system: str, user: str, key: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        raise NotImplementedError

    def _read(self, data: Any) -> Completion:
        raise NotImplementedError

    def _common(self) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {"model": s.model}
        if s.temperature >= 0:
            body["temperature"] = s.temperature
        if s.max_tokens:
            body["max_tokens"] = s.max_tokens
        return body


class OpenAIProposer(LLMProposer):
    """``POST {base_url}/chat/completions``: OpenAI and every server that speaks its protocol
    (vLLM, Ollama, llama.cpp's server, OpenRouter, Gemini's OpenAI-compatible endpoint). With
    ``api_key_env = ""`` no Authorization header is sent (local servers)."""

    name: ClassVar[str] = "openai"
    api: ClassVar[str] = "openai"
    default_base_url: ClassVar[str] = "https://api.openai.com/v1"
    default_key_env: ClassVar[str] = "OPENAI_API_KEY"

    def _request(self, system: str, user: str, key: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        headers = {**self.settings.extra_headers, "content-type": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        body = {**self._common(), "messages": [{"role": "system", "content": system},
                                               {"role": "user", "content": user}]}
        return self.settings.base_url.rstrip("/") + "/chat/completions", headers, body

    def _read(self, data: Any) -> Completion:
        choice = data["choices"][0]
        content = choice["message"].get("content") or ""
        if isinstance(content, list):  # some servers return content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        usage = data.get("usage") or {}
        return Completion(str(content), int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0), str(choice.get("finish_reason") or ""))


class AnthropicProposer(LLMProposer):
    """``POST {base_url}/v1/messages`` with ``x-api-key`` and ``anthropic-version`` headers."""

    name: ClassVar[str] = "anthropic"
    api: ClassVar[str] = "anthropic"
    default_base_url: ClassVar[str] = "https://api.anthropic.com"
    default_key_env: ClassVar[str] = "ANTHROPIC_API_KEY"

    def _request(self, system: str, user: str, key: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        headers = {**self.settings.extra_headers, "content-type": "application/json",
                   "anthropic-version": self.settings.anthropic_version}
        if key:
            headers["x-api-key"] = key
        body = {**self._common(), "system": system, "messages": [{"role": "user", "content": user}]}
        body.setdefault("max_tokens", 8192)  # required by this API
        return self.settings.base_url.rstrip("/") + "/v1/messages", headers, body

    def _read(self, data: Any) -> Completion:
        if data.get("type") == "error":
            raise ValueError(f"error object: {data.get('error')}")
        text = "".join(block.get("text", "") for block in data["content"] if block.get("type") == "text")
        usage = data.get("usage") or {}
        tokens_in = sum(int(usage.get(name) or 0) for name in
                        ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
        return Completion(text, tokens_in, int(usage.get("output_tokens") or 0),
                          str(data.get("stop_reason") or ""))


def agent_proposer(name: str, options: Mapping[str, Any], *, repo: str | Path | None = None,
                   state_dir: str | Path | None = None) -> LLMProposer | Any:
    """The agent proposer called ``name`` (one of :data:`AGENT_PROPOSERS`), built from its
    ``[proposer.<name>]`` table; what ``make_proposer`` calls for a name other than ``knobs``."""
    if name == "openai":
        return OpenAIProposer(state_dir=state_dir, **options)
    if name == "anthropic":
        return AnthropicProposer(state_dir=state_dir, **options)
    if name == "command":
        from fanout_research.research.agent_cli import CommandProposer

        return CommandProposer(repo=repo, state_dir=state_dir, **options)
    raise ConfigError(f"unknown proposer {name!r} (available: knobs, {', '.join(AGENT_PROPOSERS)})")

