"""``fanout init / prepare``: make a research repo from the template, and build its data once."""

from __future__ import annotations

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
from fanout_research.cli.render import ProgressView, print_summaries
from fanout_research.models import CodeSource, JobSpec

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
    data = ctx.config.data
    argv = [*shlex.split(data.command), "--out", str(out), "--source", data.source,
            "--vocab-size", str(data.vocab_size), *data.args, *(["--force"] if force else [])]
    backend_name = backend or ctx.config.backend.name
    runner = ctx.client.backend(backend_name, ctx.config.backend.options_for(backend_name))
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = JobSpec(
        name=f"{ctx.study.name}-prepare-{secrets.token_hex(2)}",
        code=CodeSource(repo=repo.working_tree_dir, commit=commit), command=tuple(argv),
        time_limit_s=data.time_limit_s, requires_metric=False,
        labels={"study": ctx.study.name, "role": "prepare"},
    )
    slug = ctx.client.submit(runner, spec)
    say(f"preparing {out} as job {slug} on backend {backend_name}")
    with ProgressView({slug: spec.name}) as view:
        outcome = ctx.client.wait([slug], observer=view.update)
    result = outcome.results[slug]
    if not result.succeeded:
        print_summaries([result], {})
        return EXIT_JOB_FAILED
    print(out)
    return 0
