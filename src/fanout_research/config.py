"""``fanout.toml``: a study's settings, read from the research repo's root.

Only the sections the job layer needs are modelled strictly; sections that later layers own
(``validate``, ``proposer``) are carried as tables until those layers define them.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fanout_research.errors import ConfigError

CONFIG_FILE = "fanout.toml"
DEFAULT_COMMAND = "python train.py"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StudySettings(Section):
    name: str = "default"
    tag: str | None = None
    branch: str = "research"
    k: int = Field(4, ge=1)


class JobSettings(Section):
    command: str = DEFAULT_COMMAND
    time_limit_s: float = Field(900.0, gt=0)
    time_budget_s: float | None = Field(None, gt=0)
    data_dir: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    gpus: int = Field(1, ge=0)
    gpu_type: str | None = None


class BackendSettings(BaseModel):
    """``name`` picks the backend; every other table, e.g. ``[backend.local]``, holds one backend's
    options, passed to it as keyword arguments."""

    model_config = ConfigDict(extra="allow")

    name: str = "local"

    def options_for(self, backend: str) -> dict[str, Any]:
        extra = self.model_extra or {}
        options = extra.get(backend, {})
        if not isinstance(options, dict):
            raise ConfigError(f"[backend.{backend}] in {CONFIG_FILE} must be a table")
        return dict(options)


class FanoutConfig(Section):
    study: StudySettings = Field(default_factory=StudySettings)
    job: JobSettings = Field(default_factory=JobSettings)
    backend: BackendSettings = Field(default_factory=BackendSettings)
    validate_: dict[str, Any] = Field(default_factory=dict, alias="validate")
    proposer: dict[str, Any] = Field(default_factory=dict)


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
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{file}: {where}: {first['msg']}") from None
