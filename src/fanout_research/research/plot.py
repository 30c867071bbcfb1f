"""A study's progress as one picture: every experiment's val_bpb and the running best.

matplotlib is an optional extra (``pip install fanout-research[plot]``), so it is imported
inside the function: the loop, the CLI and the tests of everything else work without it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fanout_research.research.records import CandidateRecord

_KEEP = "#2ca02c"
_DISCARD = "#9e9e9e"
_CRASH = "#d62728"
_BASELINE = "#1f77b4"
_BEST = "#111111"


def _short(text: str, limit: int = 44) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _label_kept(fig: Any, ax: Any, gains: list[tuple[float, int, CandidateRecord]]) -> None:
    """Write kept candidates' descriptions beside their points, biggest improvements first,
    leaving out any label that would overlap one already placed or leave the axes: with many
    keeps a few readable labels beat a smudge of all of them. Up-right of the point first,
    else mirrored up-left (near the right edge)."""
    fig.canvas.draw()  # settle the layout, so label extents are final, then freeze it
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed: list[Any] = []
    for _, x, r in sorted(gains, key=lambda g: -g[0]):
        for mirrored in (False, True):
            text = ax.annotate(_short(r.description), (x, r.val_bpb), xytext=(-4 if mirrored else 4, 5),
                               textcoords="offset points", ha="right" if mirrored else "left",
                               va="bottom", fontsize=7, color="#1b5e20", rotation=-20 if mirrored else 20,
                               rotation_mode="anchor")
            box = text.get_window_extent(renderer)
            inside = (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0
                      and box.y1 <= frame.y1)
            if inside and not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            text.remove()


def plot_progress(records: Sequence[CandidateRecord], out: Path, title: str | None = None) -> Path:
    """Draw the study's progress to the PNG ``out`` and return its path.

    x is the experiment number in study order: the records with status other than ``reject``
    (rejections never ran), in the order given. The baseline is a blue diamond with a dashed
    line across; kept candidates are filled green points labelled with their description
    (as many as fit without overlapping, biggest improvements first);
    discarded ones grey points; crashed ones (no val_bpb; a baseline without one too) red
    crosses pinned to the top of the axes, so they count without distorting the scale. The
    black step line is the running best: the lowest val_bpb among the baseline and the kept
    candidates so far, i.e. the state the study actually built on (a discarded candidate that
    happened to score lower in a round that kept a better one does not move it). Faint
    vertical lines separate rounds.

    Raises ``ValueError`` when no record that ran has a val_bpb: an empty picture would only
    hide that the study has nothing to show yet.
    """
    ran = [r for r in records if r.status != "reject"]
    if not any(r.val_bpb is not None for r in ran):
        raise ValueError(
            f"nothing to plot: none of the {len(records)} records has a val_bpb "
            f"({len(ran)} ran, {len(records) - len(ran)} rejected)"
        )

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # headless; left alone if the caller already drives pyplot (a notebook)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    xs = list(range(1, len(ran) + 1))
    values = [r.val_bpb for r in ran]
    known = [v for v in values if v is not None]
    lo, hi = min(known), max(known)
    pad = (hi - lo) * 0.08 or max(abs(hi) * 0.01, 1e-3)

    fig = Figure(figsize=(11, 5.5), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    # Round separators first, so points draw over them.
    for i in range(1, len(ran)):
        if ran[i].round != ran[i - 1].round:
            ax.axvline(i + 0.5, color="#dddddd", linewidth=0.8, zorder=0)

    def pick(status: str) -> tuple[list[int], list[float]]:
        """The experiments of one status that have a val_bpb, as x and y lists."""
        px: list[int] = []
        py: list[float] = []
        for x, r in zip(xs, ran, strict=True):
            if r.status == status and r.val_bpb is not None:
                px.append(x)
                py.append(r.val_bpb)
        return px, py

    bx, by = pick("discard")
    ax.scatter(bx, by, s=22, color=_DISCARD, alpha=0.8, label=f"discarded ({len(bx)})", zorder=2)
    kx, ky = pick("keep")
    ax.scatter(kx, ky, s=46, color=_KEEP, edgecolors="#1b5e20", linewidths=0.6,
               label=f"kept ({len(kx)})", zorder=4)
    basex, basey = pick("baseline")
    baseline = basey[0] if basey else None
    if basex:
        ax.scatter(basex, basey, s=80, marker="D", color=_BASELINE, label="baseline", zorder=5)
        ax.axhline(baseline, color=_BASELINE, linestyle="--", linewidth=1.0, alpha=0.8, zorder=2,
                   label="baseline level")

    # The running best: steps down at each kept improvement, flat to the last experiment.
    best: float | None = None
    step_x: list[float] = []
    step_y: list[float] = []
    gains: list[tuple[float, int, CandidateRecord]] = []  # (improvement, x, record) of kept ones
    for x, r in zip(xs, ran, strict=True):
        if r.status == "keep" and r.val_bpb is not None:
            gains.append(((best - r.val_bpb) if best is not None else 0.0, x, r))
        if r.status in ("baseline", "keep") and r.val_bpb is not None and (best is None or r.val_bpb < best):
            best = r.val_bpb
        if best is not None:
            step_x.append(x)
            step_y.append(best)
    if step_x:
        ax.step(step_x, step_y, where="post", color=_BEST, linewidth=1.6, label="running best", zorder=3)

    ax.set_ylim(lo - pad, hi + 2.5 * pad)  # headroom for the crash row and the labels
    no_value = [x for x, r in zip(xs, ran, strict=True) if r.val_bpb is None]
    crashes = [x for x, r in zip(xs, ran, strict=True)  # a baseline without a result crashed too
               if r.val_bpb is None and r.status in ("crash", "baseline")]
    other = [x for x in no_value if x not in crashes]
    # x in data, y in axes coordinates: the crosses sit along the top edge whatever the scale.
    top = ax.get_xaxis_transform()
    if crashes:
        ax.scatter(crashes, [0.96] * len(crashes), transform=top, marker="x", s=40, color=_CRASH,
                   linewidths=1.5, label=f"crashed ({len(crashes)})", zorder=5, clip_on=False)
    if other:
        ax.scatter(other, [0.96] * len(other), transform=top, marker="x", s=30, color=_DISCARD,
                   label=f"no result ({len(other)})", zorder=5, clip_on=False)

    ax.set_xlim(0.3, len(ran) + 0.7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("experiment (study order; rejected proposals not counted)")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.grid(axis="y", color="#eeeeee", linewidth=0.8)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)  # never over data

    study = title or (f"study {ran[0].study}" if ran else "study")
    summary = f"best {best:.6f}" if best is not None else "best n/a"
    if baseline is not None and best is not None:
        change = (best - baseline) / baseline if baseline else 0.0
        summary += f" vs baseline {baseline:.6f} ({change:+.2%})"
    summary += f" · {len(ran)} experiments, {len(kx)} kept, {len(crashes)} crashed"
    ax.set_title(f"{study}\n{summary}", fontsize=11)

    _label_kept(fig, ax, gains)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
