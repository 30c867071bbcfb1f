"""``fanout init / prepare``: make a research repo from the template, and build its data once."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Annotated

import typer

from fanout_research import gitrepo
from fanout_research.cli import EXIT_JOB_FAILED, app, fail
from fanout_research.cli.jobs_cmds import open_context, say
from fanout_research.cli.render import ProgressView, RoundView, print_summaries
from fanout_research.models import CodeSource, DataMount, JobSpec

TEMPLATE = Path(__file__).resolve().parents[1] / "template"


def scaffold(dest: Path, tag: str | None = None) -> str:
    """Copy the template into a new git repo at ``dest`` and commit it; returns the commit."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        fail(f"{dest} already exists and is not an empty directory")
    shutil.copytree(TEMPLATE, dest, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if tag:
        config = dest / "fanout.toml"
        config.write_text(config.read_text().replace('tag = "demo"', f'tag = "{tag}"', 1))
    subprocess.run(["git", "init", "-q", "-b", "main", str(dest)], check=True)
    repo = gitrepo.open_repo(dest)
    repo.git.add("-A")
    repo.git.execute(["git", *gitrepo.identity_args(repo), "commit", "-q", "-m",
                      "fanout init: research repo from the fanout-research template"])
    return repo.head.commit.hexsha


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Where to create the research repo.")],
    tag: Annotated[str | None, typer.Option(help="Study tag (names branches and jobs).")] = None,
) -> None:
    """Create a research repo from the template: train.py, prepare.py, program.md, fanout.toml."""
    commit = scaffold(directory.expanduser(), tag)
    say(f"created {directory} at {commit[:12]}; next: cd {directory} && fanout prepare && fanout run")
    print(directory.expanduser().resolve())


def prepare_spec(config: object, study: str, repo: str, commit: str, out: Path, *, shared: bool,
                 force: bool = False) -> JobSpec:
    """The one-time data job. Where jobs share our filesystem (local, Slurm) it writes ``out``
    in place; elsewhere it writes the data volume, mounted writable for this job only (every
    candidate mounts it read-only), and skips the entrypoint's check of data that is not there yet.
    """
    data = config.data  # type: ignore[attr-defined]
    mount = None if shared else DataMount(source=str(config.job.data_dir), read_only=False)  # type: ignore[attr-defined]
    target = str(out) if mount is None else mount.path
    argv = [*shlex.split(data.command), "--out", target, "--source", data.source,
            "--vocab-size", str(data.vocab_size), *data.args, *(["--force"] if force else [])]
    return JobSpec(
        name=f"{study}-prepare-{secrets.token_hex(2)}", code=CodeSource(repo=repo, commit=commit),
        command=tuple(argv), time_limit_s=data.time_limit_s, requires_metric=False, data=mount,
        env={} if mount is None else {"FANOUT_VERIFY_DATA": "0"},
        labels={"study": study, "role": "prepare"},
    )


def data_dir_of(config_data_dir: str | None) -> Path:
    if not config_data_dir:
        fail("no data directory: set [job] data_dir in fanout.toml")
    return Path(os.path.expanduser(config_data_dir)).resolve()  # type: ignore[arg-type]


@app.command()
def prepare(
    backend: Annotated[str | None, typer.Option(help="Backend to run it on (default: fanout.toml).")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild a prepared directory whose settings differ.")] = False,
    study: Annotated[str | None, typer.Option("--study", help="Study name.")] = None,
) -> int:
    """Build the data directory once, as a one-time job through the study's backend."""
    ctx = open_context(study)
    repo = gitrepo.open_repo(Path.cwd())
    gitrepo.ensure_clean(repo)
    commit = gitrepo.resolve_commit(repo, "HEAD")
    out = data_dir_of(ctx.config.job.data_dir)
    backend_name = backend or ctx.config.backend.name
    runner = ctx.client.backend(backend_name, ctx.config.backend.options_for(backend_name))
    spec = prepare_spec(ctx.config, ctx.study.name, repo.working_tree_dir, commit, out,
                        shared=getattr(runner, "shared_filesystem", False), force=force)
    if spec.data is None:
        out.parent.mkdir(parents=True, exist_ok=True)
    where = str(out) if spec.data is None else f"the data volume {spec.data.source}"
    slug = ctx.client.submit(runner, spec)
    say(f"preparing {where} as job {slug} on backend {backend_name}")
    with ProgressView({slug: spec.name}) as view:
        outcome = ctx.client.wait([slug], observer=view.update)
    result = outcome.results[slug]
    if not result.succeeded:
        print_summaries([result], {})
        return EXIT_JOB_FAILED
    print(where)
    return 0


def print_results(state_records: list, stream: object = None) -> None:
    header = f"{'round':>5} {'cand':>4}  {'commit':7}  {'val_bpb':>9}  {'status':8}  description"
    print(header, file=stream)
    for r in state_records:
        bpb = f"{r.val_bpb:9.6f}" if r.val_bpb is not None else f"{'-':>9}"
        detail = f"  ({r.reason})" if r.status in ("crash", "reject") and r.reason else ""
        print(f"{r.round:>5} {r.candidate:>4}  {(r.commit or r.parent)[:7]}  {bpb}  {r.status:8}  "
              f"{r.description}{detail}", file=stream)


def _study(observer: object = None) -> object:
    from fanout_research.research.loop import Study

    return Study(Path.cwd(), observer=observer)  # type: ignore[arg-type]



@app.command()
def run(
    rounds: Annotated[int | None, typer.Option(help="Run until the study has this many rounds.")] = None,
) -> int:
    """Run (or resume) the study of this repo: K candidates per round, best one kept."""
    from fanout_research.research.loop import StudyError

    if rounds is not None and rounds < 1:
        fail(f"--rounds must be at least 1, not {rounds}")
    with RoundView() as view:
        study = _study(view.update)
        try:
            outcome = study.run(rounds)  # type: ignore[attr-defined]
        except StudyError as exc:
            say(f"fanout: study stopped: {exc}")
            return EXIT_JOB_FAILED
    if outcome.stopped:
        say(f"fanout: study stopped early: {outcome.stopped}")
    print_results(study.log.state().records)  # type: ignore[attr-defined]
    return 0


DEMO_SETTINGS = {  # CPU-sized: ~12 s per job, 13 jobs, two at a time on a 2-core machine
    "time_budget_s = 300": "time_budget_s = {budget:g}",
    "time_limit_s = 600": "time_limit_s = 120",
    '# profile = "cpu"': 'profile = "cpu"',
    "k = 4 ": "k = {k} ",
}


@app.command()
def demo(
    directory: Annotated[Path | None, typer.Option("--dir", help="Scratch directory (default: new).")] = None,
    rounds: Annotated[int, typer.Option(help="Rounds to run.")] = 3,
    k: Annotated[int, typer.Option(help="Candidates per round.")] = 4,
    budget: Annotated[float, typer.Option(help="Training seconds per job.")] = 8.0,
) -> int:
    """The embedded default end to end: scaffold, prepare, 3 rounds of K=4 on this machine's CPU."""
    import tempfile
    import time

    from fanout_research.research.loop import Study, StudyError
    from fanout_research.research.plot import plot_progress

    if rounds < 1 or k < 1 or budget <= 0:
        fail("--rounds and --k must be at least 1 and --budget positive")
    root = (directory or Path(tempfile.mkdtemp(prefix="fanout-demo-"))).expanduser().resolve()
    repo, data = root / "repo", root / "data"
    started = time.monotonic()
    scaffold(repo, tag="demo")
    config = repo / "fanout.toml"
    text = config.read_text()
    for old, new in DEMO_SETTINGS.items():
        text = text.replace(old, new.format(budget=budget, k=k), 1)
    text = text.replace('data_dir = "~/.cache/fanout/data/synthetic"', f'data_dir = "{data}"', 1)
    # One thread per job and a slot per core: on a CPU, two small jobs beat one with two threads.
    text += f"\n[backend.local]\nslots = {os.cpu_count() or 1}\nslots_dir = \"{root / 'slots'}\"\n"
    config.write_text(text)
    git_repo = gitrepo.open_repo(repo)
    git_repo.git.execute(["git", *gitrepo.identity_args(git_repo), "-C", str(repo), "commit", "-q",
                          "-am", "demo: CPU-sized settings"])
    say(f"demo: research repo {repo}")
    here = Path.cwd()
    os.chdir(repo)
    try:
        if prepare(backend=None, force=False, study=None) != 0:
            return EXIT_JOB_FAILED
        with RoundView() as view:
            study = Study(repo, observer=view.update)
            try:
                study.run(rounds)
            except StudyError as exc:
                say(f"fanout: demo stopped: {exc}")
                return EXIT_JOB_FAILED
    finally:
        os.chdir(here)
    records = study.log.state().records
    print_results(records)
    plot = plot_progress(records, root / "progress.png", title="fanout demo")
    wall = time.monotonic() - started
    tried = [r for r in records if r.tried]
    baseline = next(r.val_bpb for r in records if r.status == "baseline")
    best = study.log.state().best
    best_val = best.val_bpb if best else baseline
    print(f"\nwall {wall:.0f}s | baseline val_bpb {baseline:.6f} | best {best_val:.6f} "
          f"({(best_val - baseline) / baseline * 100:+.1f}%) | {len(tried)} experiments, "
          f"{len(tried) / wall * 3600:.0f}/hour | plot {plot} | results {study.log.tsv_path}")
    return 0


def _records(study: str | None = None) -> tuple[object, list]:
    """The study's context and its candidate records, read from the study log alone: no data
    directory, proposer or backend is needed to look at results."""
    from fanout_research.research.studylog import StudyLog

    ctx = open_context(study)
    return ctx, StudyLog(ctx.study).state().records


def job_rows(ctx: object) -> list[dict[str, object]]:
    """Results straight from the job ledger, for studies driven by an agent through
    ``fanout submit`` / ``fanout wait`` (no ``fanout run``, so no study log)."""
    client = ctx.client  # type: ignore[attr-defined]
    entries = [e for e in client.ledger.entries().values() if e.spec.requires_metric]
    pending = [e for e in entries if e.result is None]
    if pending:  # results of jobs nobody has waited for yet
        states = client.status(pending)
        client.collect([e for e in pending if states[e.slug].phase.final])
    rows = []
    for e in entries:
        r = e.result
        rows.append({
            "name": e.name, "slug": e.slug, "commit": e.spec.code.commit, "branch": e.spec.code.branch,
            "phase": str(r.phase) if r else "unfinished",
            "val_bpb": r.metrics.val_bpb if r and r.succeeded else None,
            "memory_gb": (r.metrics.peak_vram_mb / 1024) if r and r.metrics.peak_vram_mb else None,
            "reason": r.reason if r else "",
        })
    return rows


@app.command()
def results(
    as_json: Annotated[bool, typer.Option("--json", help="Every candidate record as JSON.")] = False,
    study: Annotated[str | None, typer.Option("--study", help="Study name.")] = None,
) -> None:
    """The study's results: every candidate, its val_bpb and whether it was kept (for a study
    driven with fanout submit/wait: every job and its val_bpb)."""
    ctx, records = _records(study)
    if records:
        if as_json:
            print(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        else:
            print_results(records)
        return
    rows = job_rows(ctx)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'job':30}  {'commit':7}  {'val_bpb':>9}  {'phase':10}  reason")
    for row in rows:
        bpb = f"{row['val_bpb']:9.6f}" if row["val_bpb"] is not None else f"{'-':>9}"
        print(f"{row['name']:30}  {str(row['commit'])[:7]}  {bpb}  {row['phase']:10}  {row['reason']}")


@app.command()
def best(
    as_json: Annotated[bool, typer.Option("--json", help="As JSON.")] = False,
    study: Annotated[str | None, typer.Option("--study", help="Study name.")] = None,
) -> int:
    """The best result so far: the commit the research branch points at (for a study driven
    with fanout submit/wait: the job with the lowest val_bpb)."""
    ctx, records = _records(study)
    if records:
        from fanout_research.research.studylog import StudyLog

        record = StudyLog(ctx.study).state().best  # type: ignore[attr-defined]
        data = record.model_dump(mode="json") if record else None
    else:
        scored = [row for row in job_rows(ctx) if row["val_bpb"] is not None]
        data = min(scored, key=lambda row: row["val_bpb"]) if scored else None  # type: ignore[arg-type,return-value]
    if data is None:
        say("no result yet")
        return EXIT_JOB_FAILED
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        label, state = data.get("description") or data.get("name"), data.get("status") or data["phase"]
        print(f"{data['commit']}  val_bpb={data['val_bpb']:.6f}  {state}  {label}")
    return 0


@app.command()
def plot(
    out: Annotated[Path | None, typer.Option(help="PNG to write.")] = None,
    study: Annotated[str | None, typer.Option("--study", help="Study name.")] = None,
) -> None:
    """Draw the running-best val_bpb over experiments as a PNG."""
    from fanout_research.research.plot import plot_progress

    ctx, records = _records(study)
    target = out or ctx.study.root / "progress.png"  # type: ignore[attr-defined]
    try:
        print(plot_progress(records, target, title=ctx.study.name))  # type: ignore[attr-defined]
    except ValueError as exc:
        fail(str(exc))


@app.command()
def prune(
    all_: Annotated[bool, typer.Option("--all", help="Also delete the kept candidates' branches.")] = False,
    study: Annotated[str | None, typer.Option("--study", help="Study name.")] = None,
) -> None:
    """Delete the study's candidate branches (kept ones stay unless --all; the research branch
    holds their commits either way)."""
    from fanout_research.research.workspace import Workspace

    ctx, records = _records(study)
    keep = set() if all_ else {r.branch for r in records if r.status == "keep" and r.branch}
    workspace = Workspace(ctx.study.repo, ctx.study, ctx.config.study.tag)  # type: ignore[attr-defined]
    for branch in workspace.prune(keep):
        print(f"deleted {branch}")
