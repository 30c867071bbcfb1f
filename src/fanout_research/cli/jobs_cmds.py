"""``fanout submit / wait / status / logs / cancel / backends``: the job layer from the shell.

Made to be driven by an agent the way cloud cookbooks drive ``submit-async.sh`` and
``wait-jobs.sh``: ``submit`` prints exactly one line on stdout (the slug), everything meant for
humans goes to stderr, and exit codes say what happened.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from fanout_research import gitrepo
from fanout_research.cli import EXIT_JOB_FAILED, EXIT_WAIT_TIMEOUT, app, fail
from fanout_research.cli.render import ProgressView, print_summaries, result_json, state_json
from fanout_research.config import FanoutConfig, load_config
from fanout_research.jobs import JobClient
from fanout_research.models import CodeSource, DataMount, JobSpec, Resources
from fanout_research.registry import available_backends
from fanout_research.study import StudyDir

StudyOption = Annotated[
    str | None,
    typer.Option("--study", help="Study name (default: [study] name in fanout.toml, else 'default')."),
]


@dataclass
class Context:
    study: StudyDir
    config: FanoutConfig
    client: JobClient


def open_context(study: str | None) -> Context:
    """The study of the research repo we are in (or of FANOUT_STUDY_DIR)."""
    repo = None
    if not os.environ.get("FANOUT_STUDY_DIR"):
        repo = gitrepo.open_repo(Path.cwd())
    config = load_config(repo.working_tree_dir if repo else None)
    name = study or config.study.study_name
    if repo is not None:
        study_dir = StudyDir.for_repo(repo.working_tree_dir, name)
    else:
        study_dir = StudyDir(name=name, root=Path(os.environ["FANOUT_STUDY_DIR"]).resolve())
    return Context(study=study_dir, config=config, client=JobClient(study_dir))


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--env expects KEY=VALUE, not {pair!r}")
        env[key] = value
    return env


@app.command()
def submit(
    rev: Annotated[str, typer.Argument(help="Commit to run (default: HEAD).")] = "HEAD",
    backend: Annotated[str | None, typer.Option(help="Backend name (default: fanout.toml).")] = None,
    name: Annotated[str | None, typer.Option(help="Job name; the same name twice is one job.")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE for the job.")] = None,
    time_limit: Annotated[float | None, typer.Option(help="Hard limit in seconds.")] = None,
    time_budget: Annotated[float | None, typer.Option(help="Training budget in seconds.")] = None,
    command: Annotated[str | None, typer.Option(help="Command to run (default: fanout.toml).")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Prepared data directory.")] = None,
    study: StudyOption = None,
) -> None:
    """Submit one job for a commit of this repo and print its slug."""
    for flag, value in (("--time-limit", time_limit), ("--time-budget", time_budget)):
        if value is not None and value <= 0:
            fail(f"{flag} must be a positive number of seconds, not {value:g}")
    ctx = open_context(study)
    repo = gitrepo.open_repo(Path.cwd())
    gitrepo.ensure_clean(repo)
    commit = gitrepo.resolve_commit(repo, rev)
    job = ctx.config.job
    backend_name = backend or ctx.config.backend.name
    runner = ctx.client.backend(backend_name, ctx.config.backend.options_for(backend_name))
    argv = shlex.split(command or job.command)
    if not argv:
        fail("the job command is empty")
    data = data_dir or job.data_dir
    try:
        spec = JobSpec(
            name=name or f"{ctx.study.name}-{commit[:8]}-{secrets.token_hex(2)}",
            code=CodeSource(repo=repo.working_tree_dir, commit=commit,
                            branch=gitrepo.branch_of(repo, commit)),
            command=tuple(argv),
            env={**job.env, **parse_env(env or [])},
            time_limit_s=time_limit or job.time_limit_s,
            time_budget_s=time_budget or job.time_budget_s,
            resources=Resources(gpus=job.gpus, gpu_type=job.gpu_type),
            data=DataMount(source=data) if data else None,
            labels={"study": ctx.study.name},
        )
    except ValidationError as exc:  # name the first problem only: one line
        fail(exc.errors()[0]["msg"].removeprefix("Value error, "))
    slug = ctx.client.submit(runner, spec)
    say(f"submitted {slug}: commit {commit[:12]} on backend {backend_name} (study {ctx.study.name})")
    print(slug, flush=True)


@app.command()
def wait(
    slugs: Annotated[list[str], typer.Argument(help="Slugs (or job names) to wait for.")],
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array on stdout.")] = False,
    cancel_on_timeout: Annotated[
        bool, typer.Option(help="Cancel jobs still running when the timeout passes.")
    ] = False,
    study: StudyOption = None,
) -> int:
    """Wait for jobs; exit 0 only if every one succeeded (1: some failed, 124: timed out)."""
    if timeout is not None and timeout < 0:
        fail(f"--timeout must not be negative, not {timeout:g}")
    ctx = open_context(study)
    entries = ctx.client.entries(slugs)
    order = [e.slug for e in entries]
    with ProgressView({e.slug: e.name for e in entries}) as view:
        outcome = ctx.client.wait(order, timeout_s=timeout, observer=view.update)
    if outcome.unfinished:
        say(f"fanout: timed out after {timeout:g}s; still unfinished: "
            + ", ".join(outcome.unfinished))
        if cancel_on_timeout:
            outcome.unfinished = ctx.client.cancel(list(outcome.unfinished))
            say("fanout: cancelled " + ", ".join(outcome.unfinished))
    if as_json:
        records = [result_json(outcome.results[s]) if s in outcome.results
                   else state_json(s, outcome.unfinished[s]) for s in order]
        print(json.dumps(records, indent=2))
    else:
        print_summaries([outcome.results[s] for s in order if s in outcome.results],
                        outcome.unfinished)
    if outcome.unfinished:
        return EXIT_WAIT_TIMEOUT
    return 0 if outcome.all_succeeded else EXIT_JOB_FAILED


@app.command()
def status(
    slugs: Annotated[list[str] | None, typer.Argument(help="Jobs to show (default: all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    study: StudyOption = None,
) -> None:
    """Show the state of a study's jobs."""
    ctx = open_context(study)
    entries = ctx.client.entries(slugs) if slugs else [
        e for e in ctx.client.ledger.entries().values() if e.slug
    ]
    live = ctx.client.status([e for e in entries if e.result is None])
    rows = []
    for entry in entries:
        result = entry.result or (
            ctx.client.collect([entry])[0] if live[entry.slug].phase.final else None
        )
        rows.append({
            "slug": entry.slug, "name": entry.name, "backend": entry.backend,
            "commit": entry.spec.code.commit[:12],
            "phase": str(result.phase if result else live[entry.slug].phase),
            "detail": (result.reason if result else live[entry.slug].raw) or "",
            "val_bpb": result.metrics.val_bpb if result else None,
        })
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        say(f"no jobs in study {ctx.study.name!r}")
    for row in rows:
        bpb = f"val_bpb={row['val_bpb']:.6f}" if row["val_bpb"] is not None else ""
        print(f"{row['slug']}  {row['phase']:<10} {row['commit']}  {bpb}  {row['detail']}".rstrip())


@app.command()
def logs(
    slug: Annotated[str, typer.Argument(help="Slug or job name.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until it ends.")] = False,
    tail: Annotated[int | None, typer.Option(help="Only the last N lines.")] = None,
    study: StudyOption = None,
) -> None:
    """Print a job's output (stdout and stderr together)."""
    if tail is not None and tail < 0:
        fail(f"--tail must not be negative, not {tail}")
    ctx = open_context(study)
    (entry,) = ctx.client.entries([slug])
    backend = ctx.client.backend_for(entry)
    text = backend.logs(entry.slug, tail=tail)
    sys.stdout.write(text + ("\n" if text and not text.endswith("\n") else ""))
    sys.stdout.flush()
    if not follow:
        return
    # Poll rather than stream: it works the same on every backend, and survives dropped streams.
    # Some backends return only a window of the newest lines (vesslctl caps at 1000), so new
    # output is found by overlapping line lists, not by a character offset.
    shown = backend.logs(entry.slug).splitlines(keepends=True)
    while True:
        final = backend.status([entry.slug])[entry.slug].phase.final
        lines = backend.logs(entry.slug).splitlines(keepends=True)
        fresh = new_lines(shown, lines)
        sys.stdout.write("".join(fresh))
        sys.stdout.flush()
        shown = lines
        if final:
            return
        time.sleep(max(0.25, backend.poll_interval_s))


def new_lines(shown: list[str], now: list[str]) -> list[str]:
    """The lines of ``now`` after what ``shown`` already printed: ``now`` either extends
    ``shown`` or is a later window of the same log; if they no longer overlap, say so."""
    if now[: len(shown)] == shown:
        return now[len(shown):]
    for overlap in range(min(len(shown), len(now)), 0, -1):
        if shown[-overlap:] == now[:overlap]:
            return now[overlap:]
    return ["[fanout: some log lines were missed]\n", *now]


@app.command()
def cancel(
    slugs: Annotated[list[str], typer.Argument(help="Slugs (or job names) to cancel.")],
    study: StudyOption = None,
) -> None:
    """Cancel jobs, queued or running; finished jobs are left as they are."""
    ctx = open_context(study)
    for slug, state in ctx.client.cancel(slugs).items():
        print(f"{slug}  {state.phase}")


@app.command()
def reap(
    study: Annotated[str | None, typer.Argument(help="Study (default: this repo's).")] = None,
) -> None:
    """Stop every job a study started, on every backend it used, and remove what the engine
    keeps of them (Kubernetes Jobs, Slurm jobs); prints the jobs it stopped."""
    ctx = open_context(study)
    stopped = ctx.client.reap()
    for name in stopped:
        print(name)
    say(f"reaped {len(stopped)} job(s) of study {ctx.study.name!r}")


@app.command("backends")
def list_backends() -> None:
    """List the backends this installation can use."""
    for name, target in available_backends().items():
        print(f"{name}\t{target}")
