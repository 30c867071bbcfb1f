"""The template is a complete research repo that `fanout init` can copy verbatim."""

from __future__ import annotations

import tomllib

from trainer_helpers import TEMPLATE

ROOT = TEMPLATE.parents[2]


def test_template_has_the_research_repo_files() -> None:
    names = {p.name for p in TEMPLATE.iterdir()}
    assert {"train.py", "prepare.py", "program.md", "fanout.toml", "README.md",
            ".gitignore"} <= names
    assert "__init__.py" not in names  # not a package: the repo root is the job's cwd


def test_fanout_toml_restricts_proposals_to_train_py() -> None:
    config = tomllib.loads((TEMPLATE / "fanout.toml").read_text())
    assert config["validate"]["allowed_files"] == ["train.py"]
    assert config["job"]["command"] == "python train.py"
    assert config["job"]["time_budget_s"] < config["job"]["time_limit_s"]
    assert config["study"]["k"] >= 1


def test_program_md_explains_the_loop() -> None:
    text = (TEMPLATE / "program.md").read_text()
    for phrase in ("val_bpb", "train.py", "fanout submit", "fanout wait SLUG --json",
                   "FANOUT_TIME_BUDGET_S"):
        assert phrase in text


def test_examples_research_repo_is_the_template() -> None:
    link = ROOT / "examples" / "research-repo"
    assert link.is_symlink()
    assert link.resolve() == TEMPLATE.resolve()


def test_entrypoint_is_executable_bash() -> None:
    entry = ROOT / "jobimage" / "entrypoint.sh"
    assert entry.read_text().startswith("#!/usr/bin/env bash")
    assert entry.stat().st_mode & 0o111
    for dockerfile in ("Dockerfile.cuda", "Dockerfile.t4"):
        text = (ROOT / "jobimage" / dockerfile).read_text()
        assert "entrypoint.sh" in text and "ENTRYPOINT" in text
