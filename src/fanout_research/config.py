"""``fanout.toml``: a study's settings, read from the research repo's root.

Only the sections the job layer needs are modelled strictly; sections that later layers own
(``validate``, ``proposer``) are carried as tables until those layers define them.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fanout_research.errors import ConfigError, first_problem

CONFIG_FILE = "fanout.toml"
DEFAULT_COMMAND = "python train.py"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StudySettings(Section):
    name: str | None = Field(None, description="Study name (default: the tag).")
    tag: str = Field("default", description="Names the study's branches fanout/<tag>/... and jobs.")
    branch: str = Field("research", description="The research branch; only ever moves forward.")
    k: int = Field(4, ge=1, description="Candidates per round.")
    metric: Literal["val_bpb"] = "val_bpb"
    direction: Literal["minimize"] = "minimize"
    threshold: float = Field(0.0, ge=0, description="Least improvement that counts as a win.")
    max_rounds: int | None = Field(None, ge=1)
    budget_gpu_hours: float | None = Field(None, gt=0, description="Stop before exceeding this.")
    seed: int = 0

    @property
    def study_name(self) -> str:
        return self.name or self.tag


class JobSettings(Section):
    command: str = DEFAULT_COMMAND
    time_limit_s: float = Field(900.0, gt=0)
    time_budget_s: float | None = Field(None, gt=0)
    data_dir: str | None = None
    profile: str | None = Field(None, description="FANOUT_PROFILE for the trainer (default: auto).")
    env: dict[str, str] = Field(default_factory=dict)
    gpus: int = Field(1, ge=0)
    gpu_type: str | None = None


class DataSettings(Section):
    """How ``fanout prepare`` builds ``[job] data_dir`` once: ``python prepare.py --out DIR ...``."""

    command: str = "python prepare.py"
    source: str = "synthetic"
    vocab_size: int = Field(4096, ge=257)
    args: list[str] = Field(default_factory=list, description="Extra arguments for prepare.py.")
    time_limit_s: float = Field(3600.0, gt=0)


class ValidateSettings(Section):
    allowed_files: list[str] = Field(default_factory=lambda: ["train.py"])
    dry_run_steps: int = Field(2, ge=1)
    dry_run_timeout_s: float = Field(120.0, gt=0)


class PluginSettings(BaseModel):
    """``name`` picks the implementation; every other table, e.g. ``[backend.local]``, holds the
    options of one implementation, passed to it as keyword arguments."""

    model_config = ConfigDict(extra="allow")

    name: str

    def options_for(self, name: str) -> dict[str, Any]:
        extra = self.model_extra or {}
        options = extra.get(name, {})
        if not isinstance(options, dict):
            raise ConfigError(f"[{self._section}.{name}] in {CONFIG_FILE} must be a table")
        return dict(options)

    _section: str = "backend"


class BackendSettings(PluginSettings):
    name: str = "local"


class ProposerSettings(PluginSettings):
    name: str = "knobs"
    _section: str = "proposer"


class FanoutConfig(Section):
    study: StudySettings = Field(default_factory=StudySettings)
    job: JobSettings = Field(default_factory=JobSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    backend: BackendSettings = Field(default_factory=BackendSettings)
    validate_: ValidateSettings = Field(default_factory=ValidateSettings, alias="validate")
    proposer: ProposerSettings = Field(default_factory=ProposerSettings)


def load_config(repo_root: str | Path | None, path: str | Path | None = None) -> FanoutConfig:
    """The repo's ``fanout.toml`` if there is one, else the defaults."""
    file = Path(path) if path else (Path(repo_root) / CONFIG_FILE if repo_root else None)
    if file is None or not file.exists():
        if path:
            raise ConfigError(f"config file not found: {file}")
        return FanoutConfig()
    try:
        data = tomllib.loads(file.read_text())
        return FanoutConfig.model_validate(data)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}") from None
    except ValidationError as exc:
        raise ConfigError(f"{file}: {first_problem(exc)}") from None
