"""The offline default proposer: nudge one numeric constant of train.py at a time, and learn
from the ledger which nudges pay off.

It needs no model, no network and no GPU, so a study can run (and the loop can be tested) with
nothing but the trainer. Its edits are ordinary ``SearchReplace`` data like any other proposer's,
so they go through the same validation and the same worktrees.
"""

from __future__ import annotations

import ast
import functools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fanout_research.research.proposals import Attempt, Proposal, ResearchContext, SearchReplace
from fanout_research.research.pysource import parse_python

Number = int | float

# Names whose values are shares or momenta: they must stay inside [0, 1).
_UNIT_SUFFIXES = ("_RATIO", "_FRAC", "_FRACTION")
_UNIT_WORDS = ("BETA", "MOMENTUM")
# Integers up to this size move by ±1/±2 (DEPTH, MLP_RATIO, ...); larger powers of two double/halve.
_SMALL_INT = 16
_FLOAT_FACTORS = (1.25, 1.5, 2.0)
_INT_FACTORS = (1.25, 1.5, 2.0)
_LOGIT_STEPS = (0.5, 1.0)
_FROM_ZERO = (0.01, 0.1)  # a zero-valued float (no scale to multiply) moves to these
_FROM_ZERO_UNIT = (0.05, 0.1, 0.2)
_REL_TOL = 1e-6
_ABS_TOL = 1e-12


# ----------------------------------------------------------------------------- reading and writing


@dataclass(frozen=True)
class _Site:
    """Where a knob's literal sits: 1-based line, and the literal's column span (characters)."""

    lineno: int
    start: int
    end: int
    value: Number


def _literal(node: ast.expr) -> Number | None:
    """The number a ``<int or float>`` / ``-<int or float>`` literal denotes; None for anything else."""
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        sign, node = -1, node.operand
    if not isinstance(node, ast.Constant):
        return None
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return sign * value


def _char_col(line: str, byte_col: int) -> int:
    """ast columns count UTF-8 bytes; string slicing needs characters (a comment may be non-ASCII)."""
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))


def _sites(source: str) -> dict[str, _Site]:
    """Every module-level ``UPPER = <number>`` assignment; a later assignment wins, as in Python."""
    return dict(_parse_sites(source))


@functools.lru_cache(maxsize=32)
def _parse_sites(source: str) -> tuple[tuple[str, _Site], ...]:
    """Cached: a round proposes several candidates from one source, and parsing dominates."""
    tree = parse_python(source)
    lines = source.splitlines()
    sites: dict[str, _Site] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value_node = stmt.targets[0], stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None and stmt.simple:
            target, value_node = stmt.target, stmt.value
        else:
            continue
        if not isinstance(target, ast.Name) or not target.id.isupper():
            continue
        value = _literal(value_node)
        if value is None:
            sites.pop(target.id, None)  # reassigned to something else: no longer a knob
            continue
        if value_node.end_lineno != value_node.lineno:
            continue  # a literal split over lines cannot be rewritten as one line
        line = lines[value_node.lineno - 1]
        sites[target.id] = _Site(
            lineno=value_node.lineno,
            start=_char_col(line, value_node.col_offset),
            end=_char_col(line, value_node.end_col_offset or 0),
            value=value,
        )
    return tuple(sites.items())


def read_knobs(source: str) -> dict[str, int | float]:
    """Module-level ``NAME = <int or float literal>`` assignments (UPPERCASE names; a unary minus
    allowed; bools and strings excluded), in file order, via ``ast``.

    Literals only, never evaluation: a knob is what a proposer may rewrite in place, so an
    expression such as ``A = 2 * B`` is not one.
    """
    return {name: site.value for name, site in _sites(source).items()}


def format_value(value: Number) -> str:
    """The literal written to the file: ``repr`` keeps floats floats (``15.0``) and ints ints."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"a knob value must be an int or a float, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"a knob value must be finite, not {value!r}")
    return repr(value)


def _rewrite_line(line: str, edits: list[tuple[int, int, str]]) -> str:
    """Replace column spans of ``line`` right to left, then move an inline comment back to its
    column (or as close as a two-space gap allows) so aligned comment blocks stay aligned."""
    last_end = max(end for _, end, _ in edits)
    new = line
    for start, end, text in sorted(edits, reverse=True):
        new = new[:start] + text + new[end:]
    tail = line[last_end:]
    comment = tail.lstrip(" ")
    if comment.startswith("#") and len(comment) < len(tail):
        old_gap = len(tail) - len(comment)
        code_end = last_end + len(new) - len(line)
        gap = max(last_end + old_gap - code_end, min(old_gap, 2))
        new = new[:code_end] + " " * gap + comment
    return new


def set_knobs(
    source: str, values: Mapping[str, int | float], *, path: str = "train.py"
) -> list[SearchReplace]:
    """Edits that set knobs to new values: one ``SearchReplace`` per changed line (one per knob
    unless two share a line), whose ``search`` is the whole original line and whose ``replace``
    differs only in the literal, so comments and alignment survive and a reviewer sees a one-line
    diff. A line that is not unique in the file gets its neighbours as context until it is.

    Applying the edits in order and calling ``read_knobs`` gives the new values; a value equal to
    the current one yields no edit.
    """
    sites = _sites(source)
    unknown = [name for name in values if name not in sites]
    if unknown:
        raise KeyError(f"not knobs of {path}: {', '.join(unknown)} (knobs: {', '.join(sites)})")
    lines = source.splitlines()
    by_line: dict[int, list[tuple[int, int, str]]] = {}
    for name, value in values.items():
        site = sites[name]
        text = format_value(value)
        if text == lines[site.lineno - 1][site.start : site.end]:
            continue
        by_line.setdefault(site.lineno, []).append((site.start, site.end, text))

    edits: list[SearchReplace] = []
    current = source
    for lineno in sorted(by_line):
        old_line = lines[lineno - 1]
        new_line = _rewrite_line(old_line, by_line[lineno])
        search, replace = _unique_context(current, lines, lineno, old_line, new_line)
        edits.append(SearchReplace(path=path, search=search, replace=replace))
        current = current.replace(search, replace, 1)
    return edits


def _unique_context(current: str, lines: list[str], lineno: int, old: str, new: str) -> tuple[str, str]:
    """The smallest ``(search, replace)`` around line ``lineno`` that occurs once in ``current``."""
    before, after = lineno - 1, lineno  # lines[before:after] is the window, 0-based
    while True:
        window = lines[before:after]
        search = "\n".join(window)
        if current.count(search) == 1:
            break
        if before == 0 and after == len(lines):
            raise ValueError(f"line {lineno} ({old.strip()!r}) cannot be told apart from its copies")
        before, after = max(0, before - 1), min(len(lines), after + 1)
    i = lineno - 1 - before
    replace = "\n".join([*window[:i], new, *window[i + 1 :]])
    return search, replace


def apply_edits(source: str, edits: Sequence[SearchReplace]) -> str:
    """Apply search/replace edits in order, each to exactly one occurrence (as validation demands)."""
    for edit in edits:
        count = source.count(edit.search)
        if count != 1:
            raise ValueError(f"search text occurs {count} times, expected once: {edit.search!r}")
        source = source.replace(edit.search, edit.replace, 1)
    return source


# ----------------------------------------------------------------------------- moves


def _is_unit(name: str, value: Number) -> bool:
    """Shares and momenta (WARMDOWN_RATIO, ADAM_BETA2, ...) live in [0, 1]; ASPECT_RATIO = 64 does not."""
    named = name.endswith(_UNIT_SUFFIXES) or any(word in name for word in _UNIT_WORDS)
    if not named:
        return False
    if isinstance(value, float):
        return 0.0 <= value <= 1.0
    return value == 0


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _close(a: Any, b: Any) -> bool:
    numeric = (int, float)
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, numeric) or not isinstance(b, numeric):
        return a == b
    return math.isclose(a, b, rel_tol=_REL_TOL, abs_tol=_ABS_TOL)


def _round_sig(x: float, digits: int) -> float:
    return float(f"{x:.{digits}g}")


def _readable(
    x: float, current: float, taken: Sequence[Number], lo: float, hi: float, digits: int
) -> float | None:
    """``x`` rounded to as few significant digits as keep it inside [lo, hi), different from the
    current value and from moves already listed: ``0.0267`` reads better than ``0.02666...``."""
    for d in range(digits, 10):
        r = _round_sig(x, d)
        if lo <= r < hi and not _close(r, current) and not any(_close(r, t) for t in taken):
            return r
    return None


def moves(name: str, value: Number) -> list[Number]:
    """Candidate new values for one knob, smallest steps first, never equal to ``value``.

    - unit-interval knobs (``*_RATIO``/``*_FRAC`` floats, ``*BETA*``, ``*MOMENTUM*``): ±0.5 and
      ±1 in logit space, so 0.95 -> 0.97/0.98/0.92/0.88 and 0.5 -> 0.62/0.73/0.38/0.27 — always
      inside (0, 1); zero moves to 0.05/0.1/0.2;
    - small integers (≤ 16: DEPTH, MLP_RATIO): ±1, ±2, never below 1 (below 0 from 0);
    - larger powers of two (SEQ_LEN, TOTAL_BATCH_SIZE, HEAD_DIM, ASPECT_RATIO): ×2, ÷2;
    - other integers: ×/÷ 1.25, 1.5, 2, rounded, at least 1;
    - other floats (learning rates, decay, softcap): ×/÷ 1.25, 1.5, 2 at three significant
      digits; zero moves to 0.01/0.1.
    """
    out: list[Number] = []
    if _is_unit(name, value):
        v = float(value)
        if v == 0.0:
            candidates = list(_FROM_ZERO_UNIT)
        elif v >= 1.0:
            candidates = [1.0 - s for s in _FROM_ZERO_UNIT]
        else:
            logit = math.log(v / (1.0 - v))
            candidates = [1.0 / (1.0 + math.exp(-(logit + sign * step)))
                          for step in _LOGIT_STEPS for sign in (1, -1)]
        for c in candidates:
            r = _readable(c, v, out, 0.0, 1.0, digits=2)
            if r is not None:
                out.append(r)
        return out
    if isinstance(value, int):
        if abs(value) <= _SMALL_INT:
            floor = 1 if value >= 1 else (0 if value == 0 else -math.inf)
            raw = [value + 1, value - 1, value + 2, value - 2]
        elif _is_pow2(value):
            floor, raw = 1, [value * 2, value // 2]
        else:
            floor = 1 if value > 0 else -math.inf
            raw = [round(value * f) for f in _INT_FACTORS] + [round(value / f) for f in _INT_FACTORS]
        for c in raw:
            if c >= floor and c != value and c not in out:
                out.append(c)
        return out
    if value == 0.0:
        return list(_FROM_ZERO)
    for f in _FLOAT_FACTORS:
        for c in (value * f, value / f):
            r = _readable(c, value, out, -math.inf, math.inf, digits=3)
            if r is not None:
                out.append(r)
    return out


# ----------------------------------------------------------------------------- the proposer


def _effective(attempt: Attempt) -> dict[str, Any]:
    """The full setting an attempt ran: its parent's knobs overlaid with its own (which may be
    only the constants it set, for proposers that record those)."""
    return {**attempt.base_knobs, **attempt.knobs}


def _same_setting(candidate: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    return all(name in other and _close(value, other[name]) for name, value in candidate.items())


class KnobProposer:
    """Perturb train.py's numeric constants, one knob per candidate by default (up to
    ``max_changes``), steering towards directions that have paid off.

    Moves come from :func:`moves` (small steps, sensible per kind of knob). Each move belongs
    to an arm ``(knob, direction)``, direction being ``up`` or ``down`` in value. The ledger
    (``context.history``) scores the arms: an attempt whose ``base_knobs`` and ``knobs`` differ
    in a knob credits that knob's direction with a win if it was kept, a loss if discarded or
    rejected, and ``CRASH_WEIGHT`` losses if it crashed (split evenly across the knobs it
    changed). Attempts without ``base_knobs`` teach nothing, since their direction is unknown.

    Each candidate is chosen by Thompson sampling: draw ``θ ~ Beta(1 + wins, 1 + losses)`` for
    every arm that still has an untried move and take the arm with the largest draw, then a
    move of that arm at random. So a direction that was kept (DEPTH down) is drawn again often
    and keeps walking the same way from the new base; a direction that crashed is rarely drawn;
    arms never tried keep a flat prior and are explored; an arm both of whose directions lost
    (the knob is probably at a good value) fades. A candidate whose full setting equals the
    base's or any attempt's (floats within a relative 1e-6) is never proposed, nor are two
    equal candidates in one batch; with one change per candidate the moves are finite, and
    ``propose`` returns fewer than ``k`` when they run out.

    The random stream is seeded by ``seed``, ``context.seed`` and ``context.round``: the same
    context gives the same proposals, and each round draws afresh.
    """

    name = "knobs"
    CRASH_WEIGHT = 2.0
    _STATUS_WEIGHT: Mapping[str, tuple[float, float]] = {  # status -> (wins, losses)
        "keep": (1.0, 0.0),
        "discard": (0.0, 1.0),
        "reject": (0.0, 1.0),
    }

    def __init__(
        self,
        *,
        path: str = "train.py",
        seed: int = 0,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = ("SEED",),
        max_changes: int = 1,
    ) -> None:
        if max_changes < 1:
            raise ValueError(f"max_changes must be at least 1, not {max_changes}")
        self.path = path
        self.seed = seed
        self.include = tuple(include) if include is not None else None
        self.exclude = tuple(exclude)
        self.max_changes = max_changes

    # -- scoring

    def arm_scores(self, history: Sequence[Attempt]) -> dict[tuple[str, str], tuple[float, float]]:
        """``(knob, "up"|"down") -> (wins, losses)`` from the ledger, as described above."""
        scores: dict[tuple[str, str], list[float]] = {}
        for attempt in history:
            if attempt.status == "crash":
                wins, losses = 0.0, self.CRASH_WEIGHT
            elif attempt.status in self._STATUS_WEIGHT:
                wins, losses = self._STATUS_WEIGHT[attempt.status]
            else:
                continue
            if not attempt.base_knobs:
                continue
            after = _effective(attempt)
            changed: list[tuple[str, str]] = []
            for knob, old in attempt.base_knobs.items():
                new = after.get(knob)
                if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (old, new)):
                    continue
                if not _close(old, new):
                    changed.append((knob, "up" if new > old else "down"))
            for arm in changed:
                score = scores.setdefault(arm, [0.0, 0.0])
                score[0] += wins / len(changed)
                score[1] += losses / len(changed)
        return {arm: (w, lo) for arm, (w, lo) in scores.items()}

    # -- proposing

    def _knobs(self, context: ResearchContext) -> tuple[str, dict[str, Number], list[str]]:
        if self.path not in context.files:
            raise ValueError(f"{self.name} proposer: {self.path} is not among the files it was given "
                             f"({', '.join(context.files) or 'none'})")
        source = context.files[self.path]
        base = read_knobs(source)
        if self.include is not None:
            missing = [n for n in self.include if n not in base]
            if missing:
                raise ValueError(f"{self.name} proposer: include names unknown knobs of {self.path}: "
                                 f"{', '.join(missing)} (knobs: {', '.join(base)})")
            names = [n for n in base if n in self.include]
        else:
            names = list(base)
        return source, base, [n for n in names if n not in self.exclude]

    def propose(self, context: ResearchContext, k: int) -> list[Proposal]:
        """Up to ``k`` distinct, never-tried candidates; fewer when the moves run out."""
        source, base, names = self._knobs(context)
        rng = random.Random(f"knobs:{self.seed}:{context.seed}:{context.round}")
        scores = self.arm_scores(context.history)
        seen: list[Mapping[str, Any]] = [base, *(_effective(a) for a in context.history)]

        arms: dict[tuple[str, str], list[Number]] = {}
        for knob in names:
            for value in moves(knob, base[knob]):
                arms.setdefault((knob, "up" if value > base[knob] else "down"), []).append(value)
        # Single-change moves still open: the finite pool that runs out.
        pool = {arm: [v for v in values if not any(_same_setting({**base, arm[0]: v}, s) for s in seen)]
                for arm, values in arms.items()}

        def draw(candidates: list[tuple[str, str]]) -> tuple[str, str]:
            best, best_theta = candidates[0], -1.0
            for arm in candidates:
                wins, losses = scores.get(arm, (0.0, 0.0))
                theta = rng.betavariate(1.0 + wins, 1.0 + losses)
                if theta > best_theta:
                    best, best_theta = arm, theta
            return best

        proposals: list[Proposal] = []
        tries = 0
        while len(proposals) < k and tries < 50 * k + 100:
            tries += 1
            n = rng.randint(1, min(self.max_changes, len(names))) if names else 1
            change: dict[str, Number] = {}
            if n == 1:
                open_arms = [arm for arm, values in pool.items() if values]
                if not open_arms:
                    if self.max_changes == 1 or len(names) < 2:
                        break
                    continue
                arm = draw(open_arms)
                value = rng.choice(pool[arm])
                pool[arm].remove(value)
                change[arm[0]] = value
            else:
                for _ in range(n):
                    open_arms = [arm for arm in arms if arm[0] not in change]
                    if not open_arms:
                        break
                    arm = draw(open_arms)
                    change[arm[0]] = rng.choice(arms[arm])
            candidate = {**base, **change}
            if any(_same_setting(candidate, s) for s in seen):
                continue
            seen.append(candidate)
            ordered = [knob for knob in base if knob in change]
            description = ", ".join(
                f"{knob} {format_value(base[knob])} -> {format_value(change[knob])}" for knob in ordered
            )
            edits = set_knobs(source, {knob: change[knob] for knob in ordered}, path=self.path)
            proposals.append(Proposal(description=description, edits=tuple(edits), knobs=candidate,
                                      proposer=self.name))
        return proposals
