"""The research loop: ``Round(k=4).run()`` and ``Study(...).run(rounds=N)``.

One round: propose K edits -> validate each (no GPU spent on a bad one) -> commit each on its own
branch -> submit all K as jobs at once -> wait -> keep the best if it beats the best so far by the
threshold (the research branch fast-forwards to it), else keep nothing. Rounds are sequential;
candidates within a round are independent. Every step is logged before the next one starts, so
a study killed at any point (even ``kill -9`` while jobs run) resumes where it was: it reuses the
round's recorded proposals and branches, re-attaches to the jobs it had submitted (job names are
deterministic and submission is idempotent) and loses no result.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fanout_research import gitrepo
from fanout_research.backends.base import Backend
from fanout_research.config import FanoutConfig, load_config
from fanout_research.errors import ConfigError, FanoutError
from fanout_research.jobs import JobClient
from fanout_research.models import CodeSource, DataMount, JobResult, JobSpec, JobState, Resources
from fanout_research.research.knobs import KnobProposer, read_knobs
from fanout_research.research.proposals import Attempt, Proposal, Proposer, ProposerError, ResearchContext
from fanout_research.research.records import CandidateRecord
from fanout_research.research.studylog import RoundState, StudyLog, StudyState
from fanout_research.research.validate import BaseTree, Rejected, Validator
from fanout_research.research.workspace import Workspace
from fanout_research.study import StudyDir


class StudyError(FanoutError):
    """The study cannot go on (the baseline failed, the budget is spent...)."""


@dataclass
class CandidateView:
    """What a live display shows for one candidate."""

    name: str
    description: str
    state: str = "proposed"
    detail: str = ""
    val_bpb: float | None = None
    started_at: Any = None


Observer = Callable[[int, Sequence[CandidateView]], None]


@dataclass
class RoundOutcome:
    number: int
    base: str
    records: list[CandidateRecord]
    winner: CandidateRecord | None
    best_val_bpb: float | None


@dataclass
class StudyOutcome:
    rounds: list[RoundOutcome] = field(default_factory=list)
    stopped: str = ""  # why the study stopped early, if it did


def make_proposer(config: FanoutConfig, *, repo: Path | None = None,
                  state_dir: Path | None = None) -> Proposer:
    """``[proposer] name``: ``knobs`` (offline default), or an agent: ``openai``, ``anthropic``
    (LLM APIs over HTTP) or ``command`` (an external coding agent's CLI); see docs/agents.md."""
    name = config.proposer.name
    options = config.proposer.options_for(name)
    if name == "knobs":
        return KnobProposer(seed=config.study.seed, **options)
    from fanout_research.research.llm import AGENT_PROPOSERS, agent_proposer  # httpx only if used

    if name in AGENT_PROPOSERS:
        return agent_proposer(name, options, repo=repo, state_dir=state_dir)
    raise ConfigError(f"unknown proposer {name!r} (available: knobs, {', '.join(AGENT_PROPOSERS)})")


class Study:
    def __init__(
        self,
        repo: str | Path = ".",
        config: FanoutConfig | None = None,
        *,
        proposer: Proposer | None = None,
        backend: Backend | None = None,
        validator: Validator | None = None,
        observer: Observer | None = None,
    ) -> None:
        git_repo = gitrepo.open_repo(repo)
        self.repo = Path(git_repo.working_tree_dir).resolve()
        self.config = config or load_config(self.repo)
        settings = self.config.study
        self.tag = settings.tag
        self.study = StudyDir.for_repo(self.repo, settings.study_name)
        self.client = JobClient(self.study)
        name = self.config.backend.name
        self.backend = self.client.adopt(backend) if backend else self.client.backend(
            name, self.config.backend.options_for(name))
        self.proposer = proposer or make_proposer(self.config, repo=self.repo, state_dir=self.study.root)
        self.data_dir = self._data_dir()
        checks = self.config.validate_
        self.validator = validator or Validator(
            allowed_files=checks.allowed_files, data_dir=self.data_dir,
            dry_run_steps=checks.dry_run_steps, dry_run_timeout_s=checks.dry_run_timeout_s,
        )
        self.workspace = Workspace(self.repo, self.study, self.tag)
        self.log = StudyLog(self.study)
        self.observer = observer

    def _data_dir(self) -> Path | None:
        if not self.config.job.data_dir:
            return None
        path = Path(os.path.expanduser(self.config.job.data_dir)).resolve()
        if not (path / "manifest.json").exists():
            raise ConfigError(f"data directory {path} is not prepared: run `fanout prepare` first")
        return path

    # -- the study -------------------------------------------------------------------------------
    def run(self, rounds: int | None = None) -> StudyOutcome:
        """Run until the study has ``rounds`` finished rounds (default: [study] max_rounds, else
        one more), or the GPU-hour budget would be exceeded. A rerun resumes, never repeats."""
        state = self.log.state()
        target = rounds or self.config.study.max_rounds or state.rounds_finished + 1
        outcome = StudyOutcome()
        while (state := self.log.state()).rounds_finished < target:
            number = state.rounds_finished + 1
            reason = self._over_budget(state, number)
            if reason:
                outcome.stopped = reason
                break
            outcome.rounds.append(self.run_round(number))
        return outcome

    def _over_budget(self, state: StudyState, number: int) -> str:
        cap = self.config.study.budget_gpu_hours
        if cap is None or number in state.rounds:  # a started round is always finished
            return ""
        jobs = self.config.study.k + (0 if state.baseline else 1)
        worst = jobs * self.config.job.time_limit_s * max(1, self.config.job.gpus) / 3600
        if state.gpu_hours + worst > cap:
            return (f"budget: {state.gpu_hours:.3f} of {cap:g} GPU-hours spent, and round {number} "
                    f"could take up to {worst:.3f} more")
        return ""

    # -- one round -------------------------------------------------------------------------------
    def run_round(self, number: int, k: int | None = None) -> RoundOutcome:
        k = k or self.config.study.k
        state = self.log.state()
        current = state.rounds.get(number)
        if current is not None and current.finished:
            return self._outcome(current)
        if current is None:
            base = self.workspace.ensure_research_branch(self.config.study.branch)
            best = state.best.val_bpb if state.best else None
            self.log.round_started(number, base, best)
            current = self.log.state().rounds[number]
        if current.proposals is None:
            calls_before = len(getattr(self.proposer, "usage_log", ()))
            try:
                proposals = self.proposer.propose(self._context(state, current), k)[:k]
            except ProposerError as exc:
                raise StudyError(f"round {number}: {exc}") from None
            # What an agent proposer dropped (unparseable or inapplicable ideas) and what its calls
            # cost go into the proposals event: they belong to the call, not to one candidate.
            dropped = [str(r) for r in getattr(self.proposer, "last_rejections", ())]
            usage = [dataclasses.asdict(u) for u in getattr(self.proposer, "usage_log", ())[calls_before:]]
            if not proposals:
                why = f": {'; '.join(dropped[:3])}" if dropped else ""
                raise StudyError(f"round {number}: the proposer had no new idea{why}")
            self.log.proposals(number, proposals, dropped=dropped, usage=usage)
            current = self.log.state().rounds[number]
        return self._finish_round(current)

    def _context(self, state: StudyState, current: RoundState) -> ResearchContext:
        base = BaseTree.at(self.repo, current.base)
        files = {path: text for path in self.config.validate_.allowed_files
                 if (text := base.read(path)) is not None}
        history = tuple(
            Attempt(round=r.round, description=r.description, knobs=r.knobs, status=r.status,
                    val_bpb=r.val_bpb, reason=r.reason, base_knobs=r.base_knobs)
            for r in state.records
        )
        return ResearchContext(
            round=current.number, base_commit=current.base, files=files,
            allowed_files=tuple(self.config.validate_.allowed_files),
            best_val_bpb=current.best_before, history=history,
            program=base.read("program.md") or "", seed=self.config.study.seed,
        )

    def _finish_round(self, current: RoundState) -> RoundOutcome:
        number, base = current.number, current.base
        assert current.proposals is not None
        views = {self._name(number, i): CandidateView(self._name(number, i), p.description)
                 for i, p in enumerate(current.proposals, start=1)}
        state = self.log.state()
        need_baseline = state.baseline is None
        # Round 0 holds the baseline's attempts: a failed one is a crash, and a rerun measures
        # it again under the next name (a transient failure must not end the study for good).
        attempt = sum(1 for r in state.records if r.round == 0)
        baseline_name = self._name(0, attempt)
        if need_baseline:
            views = {baseline_name: CandidateView(baseline_name, "baseline (unmodified)"), **views}
        self._show(number, views)

        undecided = [(i, p) for i, p in enumerate(current.proposals, start=1) if i not in current.records]
        tree = BaseTree.at(self.repo, base)
        base_knobs = read_knobs(tree.read("train.py") or "")  # the parent's, once per round
        commits = self._materialize(number, tree, base_knobs, undecided, views)
        specs = [self._spec(self._name(number, i), commit, number, i) for i, commit in commits.items()]
        if need_baseline:
            specs.insert(0, self._spec(baseline_name, base, 0, attempt))
        if specs:
            self.client.submit_many(self.backend, specs)

            def on_poll(states: dict[str, JobState]) -> None:
                for name, job in states.items():
                    view = views.get(name)
                    if view is not None:
                        view.state, view.detail, view.started_at = str(job.phase), job.raw, job.started_at
                self._show(number, views)

            outcome = self.client.wait([s.name for s in specs], observer=on_poll)
            results = {r.name: r for r in outcome.results.values()}
        else:
            results = {}

        if need_baseline:
            result = results[baseline_name]
            baseline = self._record_job(number=0, index=attempt, base=base, commit=base,
                                        base_knobs=base_knobs, description="baseline (unmodified)",
                                        result=result, status="baseline" if result.succeeded else "crash")
            self.log.candidates([baseline])
            if baseline.status == "crash":  # nothing may be kept without a baseline to beat
                raise StudyError(
                    f"the baseline run {baseline_name} failed ({baseline.reason}); a rerun measures "
                    "it again, but if train.py itself is broken, fix it and start a new study "
                    "([study] tag)")
        best = self.log.state().best
        best_val = best.val_bpb if best else None

        decided: list[CandidateRecord] = []
        finished = [(i, commits[i], results[self._name(number, i)]) for i in commits]
        ranked = sorted((r.metrics.val_bpb, i) for i, _, r in finished if r.succeeded)
        threshold = self.config.study.threshold
        win = next((i for v, i in ranked[:1]
                    if best_val is None or (v < best_val and best_val - v >= threshold)), None)
        proposals = dict(enumerate(current.proposals, start=1))
        for i, commit, result in finished:
            status = "keep" if i == win else ("discard" if result.succeeded else "crash")
            record = self._record_job(number, i, base, commit, base_knobs, proposals[i].description,
                                      result, status, proposals[i])
            decided.append(record)
            views[record.name].state, views[record.name].val_bpb = status, record.val_bpb
        self.log.candidates(decided)
        self._show(number, views)

        state = self.log.state()
        current = state.rounds[number]
        winner = next((r for r in current.records.values() if r.status == "keep"), None)
        if winner is not None and winner.commit:
            tip = self.workspace.tip(self.config.study.branch)
            if tip != winner.commit and not self.workspace.advance(self.config.study.branch,
                                                                   winner.commit, base):
                raise StudyError(f"the research branch moved under the study (expected {base[:12]})")
        self.log.round_finished(number, winner.name if winner else None,
                                (state.best.val_bpb if state.best else None))
        return self._outcome(self.log.state().rounds[number])

    def _materialize(self, number: int, tree: BaseTree, base_knobs: dict[str, Any],
                     undecided: list[tuple[int, Proposal]],
                     views: dict[str, CandidateView]) -> dict[int, str]:
        """Validate and commit each candidate; rejected ones are logged and never submitted."""
        base = tree.commit

        def one(index: int, proposal: Proposal) -> tuple[int, str | None, CandidateRecord | None]:
            name, branch = self._name(number, index), self.workspace.branch_for(number, index)
            existing = self.workspace.tip(branch)
            if existing:  # validated and committed before a restart
                return index, existing, None
            views[name].state = "validating"
            self._show(number, views)
            try:
                contents = self.validator.check_static(proposal, tree)
                worktree = self.workspace.checkout(name, base, contents)
                try:
                    self.validator.check_runtime(worktree, list(contents))
                    commit = self.workspace.commit(worktree, list(contents), branch,
                                                   f"{proposal.description}\n\nfanout {name}")
                finally:
                    self.workspace.discard(name)
            except Rejected as rejected:
                views[name].state, views[name].detail = "reject", f"{rejected.step}: {rejected}"
                record = CandidateRecord(
                    study=self.study.name, round=number, candidate=index, name=name, status="reject",
                    description=proposal.description, parent=base, reason=f"{rejected.step}: {rejected}",
                    knobs=proposal.knobs, base_knobs=base_knobs, proposer=proposal.proposer,
                )
                return index, None, record
            views[name].state = "validated"
            return index, commit, None

        workers = max(1, min(len(undecided), (os.cpu_count() or 2)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            done = list(pool.map(lambda item: one(*item), undecided))
        rejected = [record for _, _, record in done if record is not None]
        if rejected:
            self.log.candidates(rejected)
        self._show(number, views)
        return {index: commit for index, commit, _ in done if commit}

    def _record_job(self, number: int, index: int, base: str, commit: str, base_knobs: dict[str, Any],
                    description: str, result: JobResult, status: str,
                    proposal: Proposal | None = None) -> CandidateRecord:
        knobs = base_knobs if commit == base else read_knobs(
            BaseTree.at(self.repo, commit).read("train.py") or "")
        metrics = result.metrics.reported()
        memory = result.metrics.peak_vram_mb
        run_s = result.run_seconds
        return CandidateRecord(
            study=self.study.name, round=number, candidate=index, name=result.name, status=status,
            description=description, parent=base, commit=commit,
            branch=None if index == 0 else self.workspace.branch_for(number, index),
            val_bpb=result.metrics.val_bpb if result.succeeded else None,
            memory_gb=memory / 1024 if memory is not None else None,
            reason=result.reason, knobs=knobs, base_knobs=base_knobs,
            proposer=proposal.proposer if proposal else "", job_slug=result.slug, run_seconds=run_s,
            gpu_hours=(run_s or 0.0) * max(1, self.config.job.gpus) / 3600, metrics=metrics,
        )

    def _spec(self, name: str, commit: str, number: int, index: int) -> JobSpec:
        job = self.config.job
        env = dict(job.env)
        if job.profile:
            env["FANOUT_PROFILE"] = job.profile
        branch = None if index == 0 else self.workspace.branch_for(number, index)
        return JobSpec(
            name=name, code=CodeSource(repo=str(self.repo), commit=commit, branch=branch),
            command=tuple(shlex.split(job.command)), env=env, time_limit_s=job.time_limit_s,
            time_budget_s=job.time_budget_s,
            resources=Resources(gpus=job.gpus, gpu_type=job.gpu_type),
            data=DataMount(source=str(self.data_dir)) if self.data_dir else None,
            labels={"study": self.study.name, "round": str(number), "candidate": str(index)},
        )

    def _name(self, number: int, index: int) -> str:
        return f"{self.tag}-r{number:02d}-c{index}"

    def _show(self, number: int, views: dict[str, CandidateView]) -> None:
        if self.observer:
            self.observer(number, list(views.values()))

    def _outcome(self, current: RoundState) -> RoundOutcome:
        records = sorted(current.records.values(), key=lambda r: r.candidate)
        winner = next((r for r in records if r.status == "keep"), None)
        best = self.log.state().best
        return RoundOutcome(current.number, current.base, records, winner,
                            best.val_bpb if best else None)


class Round:
    """One round of the study in ``repo`` (its next one), configured from its fanout.toml:
    ``Round(k=4).run()``."""

    def __init__(self, k: int | None = None, **study_options: Any) -> None:
        self.k = k
        self.study = Study(**study_options)

    def run(self) -> RoundOutcome:
        number = self.study.log.state().rounds_finished + 1
        return self.study.run_round(number, self.k)
