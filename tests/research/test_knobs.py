"""The offline knob proposer: reading and rewriting train.py's constants, proposing sensible,
never-repeated moves, and steering towards directions the ledger says paid off."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest

import fanout_research
from fanout_research.research.knobs import KnobProposer, apply_edits, moves, read_knobs, set_knobs
from fanout_research.research.proposals import Attempt, Proposal, ResearchContext, SearchReplace

TEMPLATE_TRAIN = Path(fanout_research.__file__).parent / "template" / "train.py"
SOURCE = TEMPLATE_TRAIN.read_text()
BASE = read_knobs(SOURCE)
UNIT_KNOBS = ("ADAM_BETA1", "ADAM_BETA2", "MUON_MOMENTUM", "WARMUP_RATIO", "WARMDOWN_RATIO", "FINAL_LR_FRAC")


def apply(source: str, edits: tuple[SearchReplace, ...] | list[SearchReplace]) -> str:
    """What the workspace does with a proposal's edits, written out independently of knobs.py."""
    for edit in edits:
        assert source.count(edit.search) == 1, edit.search
        source = source.replace(edit.search, edit.replace)
    return source


def context(source: str = SOURCE, *, round: int = 1, seed: int = 0, history: tuple[Attempt, ...] = ()
            ) -> ResearchContext:
    return ResearchContext(round=round, base_commit="0" * 40, files={"train.py": source},
                           allowed_files=("train.py",), best_val_bpb=1.0, history=history, seed=seed)


def attempt(base: dict, status: str, *, round: int = 1, **change: float) -> Attempt:
    """An earlier candidate that changed ``change`` relative to ``base``."""
    return Attempt(round=round, description=str(change), knobs={**base, **change}, status=status,
                   val_bpb=None if status == "crash" else 1.0, base_knobs=dict(base))


def changed(proposal: Proposal, base: dict = BASE) -> dict[str, tuple[float, float]]:
    return {k: (base[k], v) for k, v in proposal.knobs.items() if not math.isclose(v, base[k])}


# ----------------------------------------------------------------------------- read_knobs / set_knobs


def test_read_knobs_finds_the_template_constants_and_skips_strings() -> None:
    assert BASE["DEPTH"] == 8 and isinstance(BASE["DEPTH"], int)
    assert BASE["TOTAL_BATCH_SIZE"] == 524288 and isinstance(BASE["TOTAL_BATCH_SIZE"], int)
    assert BASE["MATRIX_LR"] == 0.04 and isinstance(BASE["MATRIX_LR"], float)
    assert BASE["WARMDOWN_RATIO"] == 0.5
    assert BASE["SEED"] == 1337
    for not_a_knob in ("PROFILE", "COMPILE", "PROFILES", "PEAK_FLOPS_BY_NAME", "ATTENTION", "T_START"):
        assert not_a_knob not in BASE
    assert list(BASE)[:2] == ["DEPTH", "ASPECT_RATIO"]  # file order


def test_read_knobs_literal_forms() -> None:
    source = "\n".join([
        "A = 3",
        "B = -0.5",
        "C: float = 1e-3",
        "FLAG = True",
        "NAME = 'x'",
        "lower = 4",
        "EXPR = 2 * A",
        "PAIR = (1, 2)",
        "D = 1",
        "D = None  # reassigned to a non-literal: no longer a knob",
        "if A:",
        "    NESTED = 5",
        "def f():",
        "    INNER = 6",
    ])
    assert read_knobs(source) == {"A": 3, "B": -0.5, "C": 0.001}


def test_set_knobs_round_trips_on_the_template_touching_one_line() -> None:
    edits = set_knobs(SOURCE, {"DEPTH": 10})
    assert len(edits) == 1
    assert edits[0].path == "train.py"
    assert edits[0].search == "DEPTH = 8                 # transformer blocks"
    assert edits[0].replace == "DEPTH = 10                # transformer blocks"
    new = apply(SOURCE, edits)
    assert read_knobs(new) == {**BASE, "DEPTH": 10}
    old_lines, new_lines = SOURCE.splitlines(), new.splitlines()
    assert len(old_lines) == len(new_lines)
    assert [i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)) if a != b] == [
        old_lines.index(edits[0].search)]


def test_set_knobs_several_values_keep_comments_aligned() -> None:
    values = {"TOTAL_BATCH_SIZE": 1048576, "MATRIX_LR": 0.0267, "ADAM_BETA1": 0.71, "LOGIT_SOFTCAP": 30.0}
    edits = set_knobs(SOURCE, values)
    assert len(edits) == 4
    new = apply(SOURCE, edits)
    assert read_knobs(new) == {**BASE, **values}
    assert isinstance(read_knobs(new)["LOGIT_SOFTCAP"], float)  # 30.0 stays a float literal
    lines = {line.split("=")[0].strip(): line for line in new.splitlines() if "=" in line}
    old = {line.split("=")[0].strip(): line for line in SOURCE.splitlines() if "=" in line}
    # A comment whose literal fits keeps its column; a literal that outgrows it keeps two spaces.
    assert lines["MATRIX_LR"].index("#") == old["MATRIX_LR"].index("#")
    assert lines["TOTAL_BATCH_SIZE"] == (
        "TOTAL_BATCH_SIZE = 1048576  # tokens per optimizer step (scaled by the profile batch factor)")
    assert lines["LOGIT_SOFTCAP"].endswith("# logits = cap * tanh(logits / cap)")


def test_set_knobs_same_value_yields_no_edit_and_unknown_knob_is_refused() -> None:
    assert set_knobs(SOURCE, {"DEPTH": 8}) == []
    with pytest.raises(KeyError, match="PROFILE"):
        set_knobs(SOURCE, {"PROFILE": 1})
    with pytest.raises(TypeError):
        set_knobs(SOURCE, {"DEPTH": True})


def test_set_knobs_makes_an_ambiguous_line_unique_with_context() -> None:
    source = "MAX = 1\nX = 1\nY = -2  # neg\nZ = 1\nX = 1\n"  # "X = 1" also occurs inside "MAX = 1"
    edits = set_knobs(source, {"X": 5, "Y": -3})
    new = apply(source, edits)
    assert read_knobs(new) == {"MAX": 1, "X": 5, "Y": -3, "Z": 1}
    assert new == "MAX = 1\nX = 1\nY = -3  # neg\nZ = 1\nX = 5\n"
    assert apply_edits(source, edits) == new


# ----------------------------------------------------------------------------- moves


def test_moves_per_kind_of_knob() -> None:
    assert sorted(moves("DEPTH", 8)) == [6, 7, 9, 10]
    assert sorted(moves("DEPTH", 1)) == [2, 3]
    assert sorted(moves("DEPTH", 2)) == [1, 3, 4]
    assert sorted(moves("SEQ_LEN", 2048)) == [1024, 4096]
    assert sorted(moves("TOTAL_BATCH_SIZE", 524288)) == [262144, 1048576]
    assert sorted(moves("MATRIX_LR", 0.04)) == [0.02, 0.0267, 0.032, 0.05, 0.06, 0.08]
    assert moves("WEIGHT_DECAY", 0.0) and all(v > 0 for v in moves("WEIGHT_DECAY", 0.0))
    assert all(v > 0 for v in moves("WARMUP_RATIO", 0.0))
    beta2 = moves("ADAM_BETA2", 0.95)
    assert any(v > 0.95 for v in beta2) and any(v < 0.95 for v in beta2)
    for name, value in BASE.items():
        values = moves(name, value)
        assert values, name
        assert len(set(values)) == len(values), name
        assert all(not math.isclose(v, value) for v in values), name
        assert all(isinstance(v, type(value)) for v in values) or name in UNIT_KNOBS, name


@pytest.mark.parametrize("name", UNIT_KNOBS)
@pytest.mark.parametrize("value", [0.0, 1e-4, 0.05, 0.5, 0.9, 0.99, 0.999, 0.9999, 1.0])
def test_unit_knobs_stay_in_the_unit_interval(name: str, value: float) -> None:
    values = moves(name, value)
    assert values
    assert all(0.0 <= v < 1.0 and v != value for v in values)


def test_integer_knobs_never_drop_below_one_however_far_they_walk() -> None:
    """Keep applying DEPTH-down and HEAD_DIM-down wins: the walk stops at 1, it never passes it."""
    source = SOURCE
    history: list[Attempt] = []
    for round in range(1, 30):
        proposals = KnobProposer(include=("DEPTH", "HEAD_DIM")).propose(
            context(source, round=round, history=tuple(history)), k=4)
        for p in proposals:
            assert p.knobs["DEPTH"] >= 1 and p.knobs["HEAD_DIM"] >= 1
        base = read_knobs(source)
        downs = [p for p in proposals if all(new <= old for old, new in changed(p, base).values())]
        if not downs:
            break
        history.extend(Attempt(round=round, description=p.description, knobs=p.knobs, status="keep",
                               base_knobs=base) for p in downs[:1])
        source = apply(source, downs[0].edits)
    final = read_knobs(source)
    assert final["DEPTH"] == 1 and final["HEAD_DIM"] == 1


# ----------------------------------------------------------------------------- proposing


def test_proposals_are_distinct_single_knob_edits_that_apply() -> None:
    proposals = KnobProposer().propose(context(), k=10)
    assert len(proposals) == 10
    settings = [tuple(sorted(p.knobs.items())) for p in proposals]
    assert len(set(settings)) == 10
    for p in proposals:
        assert p.proposer == "knobs"
        diff = changed(p)
        assert len(diff) == 1 and "SEED" not in diff
        ((name, (old, new)),) = diff.items()
        assert p.description == f"{name} {old!r} -> {new!r}"
        assert len(p.edits) == 1
        assert read_knobs(apply(SOURCE, p.edits)) == p.knobs  # knobs is the full, true setting


def test_several_changes_per_candidate() -> None:
    proposals = KnobProposer(max_changes=3).propose(context(), k=30)
    assert len(proposals) == 30
    sizes = Counter(len(changed(p)) for p in proposals)
    assert set(sizes) <= {1, 2, 3} and len(sizes) >= 2
    for p in proposals:
        assert read_knobs(apply(SOURCE, p.edits)) == p.knobs
        parts = p.description.split(", ")
        assert len(parts) == len(changed(p))
        assert all(re.fullmatch(r"[A-Z0-9_]+ \S+ -> \S+", part) for part in parts)


def test_same_seed_and_round_give_the_same_proposals_and_others_differ() -> None:
    def run(seed: int = 0, round: int = 1, context_seed: int = 0) -> list[str]:
        proposer = KnobProposer(seed=seed)
        return [p.description for p in proposer.propose(context(round=round, seed=context_seed), k=6)]

    assert run() == run()
    assert run(round=2) == run(round=2)
    assert run(round=2) != run(round=1)
    assert run(seed=1) != run(seed=0)
    assert run(context_seed=7) != run(context_seed=0)


def test_never_repeats_the_base_or_any_tried_setting_and_runs_out_cleanly() -> None:
    proposer = KnobProposer(include=("DEPTH", "MLP_RATIO"))
    all_moves = [("DEPTH", v) for v in moves("DEPTH", 8)] + [("MLP_RATIO", v) for v in moves("MLP_RATIO", 4)]
    assert len(all_moves) == 8
    # Tried: all but three of them, one via a float that differs only by rounding noise.
    tried = all_moves[:5]
    history = tuple(attempt(BASE, "discard", **{name: value}) for name, value in tried)
    name, value = all_moves[5]
    history += (Attempt(round=1, description="noisy", knobs={**BASE, "WARMDOWN_RATIO": 0.5000000001,
                                                             name: value},
                        status="discard", base_knobs=BASE),)
    proposals = proposer.propose(context(history=history), k=8)
    got = sorted((name, new) for p in proposals for name, (_, new) in changed(p).items())
    assert got == sorted(all_moves[6:])
    assert proposer.propose(context(history=history + tuple(attempt(BASE, "keep", **{n: v})
                                                             for n, v in all_moves[6:])), k=8) == []


def test_never_repeats_across_a_long_history_with_several_changes() -> None:
    history: list[Attempt] = []
    proposer = KnobProposer(max_changes=2)
    seen = {tuple(sorted(BASE.items()))}
    for round in range(1, 16):
        proposals = proposer.propose(context(round=round, history=tuple(history)), k=8)
        assert len(proposals) == 8
        for p in proposals:
            key = tuple(sorted(p.knobs.items()))
            assert key not in seen
            seen.add(key)
            history.append(Attempt(round=round, description=p.description, knobs=p.knobs,
                                   status="discard", base_knobs=BASE))


def test_an_exhausted_space_with_one_change_returns_fewer_than_k() -> None:
    proposer = KnobProposer(include=("DEPTH",))
    first = proposer.propose(context(), k=10)
    assert len(first) == 4
    history = tuple(Attempt(round=1, description=p.description, knobs=p.knobs, status="discard",
                            base_knobs=BASE) for p in first[:3])
    (last,) = proposer.propose(context(round=2, history=history), k=10)
    assert last.knobs not in [p.knobs for p in first[:3]]


def test_missing_file_and_unknown_include_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"model\.py is not among"):
        KnobProposer(path="model.py").propose(context(), k=2)
    with pytest.raises(ValueError, match="DEPHT"):
        KnobProposer(include=("DEPHT",)).propose(context(), k=2)
    with pytest.raises(ValueError, match="max_changes"):
        KnobProposer(max_changes=0)


# ----------------------------------------------------------------------------- learning


def learning_history() -> tuple[Attempt, ...]:
    """DEPTH went down three times and was kept each time; DEPTH up crashed twice. The attempts
    ran with another MATRIX_LR, so none of them equals a move from today's base (which would
    make the test pass by deduplication instead of by learning)."""
    earlier = {**BASE, "MATRIX_LR": 0.03}
    return (
        attempt({**earlier, "DEPTH": 12}, "keep", DEPTH=11),
        attempt({**earlier, "DEPTH": 11}, "keep", DEPTH=10),
        attempt({**earlier, "DEPTH": 10}, "keep", DEPTH=9),
        attempt({**earlier, "DEPTH": 9}, "crash", DEPTH=11),
        attempt({**earlier, "DEPTH": 10}, "crash", DEPTH=12),
    )


def depth_directions(
    history: tuple[Attempt, ...], *, include: tuple[str, ...] | None, k: int
) -> Counter[str]:
    counts: Counter[str] = Counter()
    for seed in range(200):
        for p in KnobProposer(seed=seed, include=include).propose(context(history=history), k=k):
            if "DEPTH" in changed(p):
                old, new = changed(p)["DEPTH"]
                counts["down" if new < old else "up"] += 1
    return counts


def test_arm_scores_count_wins_losses_and_crashes() -> None:
    scores = KnobProposer().arm_scores(learning_history())
    assert scores[("DEPTH", "down")] == (3.0, 0.0)
    assert scores[("DEPTH", "up")] == (0.0, 2 * KnobProposer.CRASH_WEIGHT)
    split = KnobProposer().arm_scores((attempt(BASE, "keep", DEPTH=6, MATRIX_LR=0.05),))
    assert split == {("DEPTH", "down"): (0.5, 0.0), ("MATRIX_LR", "up"): (0.5, 0.0)}
    no_direction = Attempt(round=1, description="?", knobs={"DEPTH": 6}, status="keep")  # no base_knobs
    assert KnobProposer().arm_scores((no_direction,)) == {}


def test_learns_to_repeat_kept_directions_and_avoid_crashed_ones() -> None:
    history = learning_history()
    # Among a few knobs, one proposal per seed.
    few = ("DEPTH", "MATRIX_LR", "WARMDOWN_RATIO")
    learned = depth_directions(history, include=few, k=1)
    flat = depth_directions((), include=few, k=1)
    assert learned["down"] >= 8 * max(1, learned["up"]), learned
    assert learned["down"] >= 2 * flat["down"], (learned, flat)
    assert abs(flat["down"] - flat["up"]) <= 0.5 * max(flat.values()), flat  # no bias without history
    # Among all the knobs, a round of four.
    learned = depth_directions(history, include=None, k=4)
    flat = depth_directions((), include=None, k=4)
    assert learned["down"] >= 8 * max(1, learned["up"]), learned
    assert learned["down"] >= 2 * flat["down"], (learned, flat)
