"""``fanout.toml``: defaults, strict sections, one-line errors that name the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from fanout_research.config import CONFIG_FILE, DEFAULT_COMMAND, FanoutConfig, load_config
from fanout_research.errors import ConfigError, FanoutError

FULL = """\
[study]
name = "depth-sweep"
tag = "mar5"
branch = "autoresearch/mar5"
k = 8

[job]
command = "uv run train.py --fast"
time_limit_s = 600
time_budget_s = 300.5
data_dir = "/data/climbmix"
gpus = 2
gpu_type = "H100"

[job.env]
WANDB_MODE = "offline"

[backend]
name = "k8s"

[backend.local]
slots = 4
kill_grace_s = 1.5
gpus = ["0", "1"]

[backend.k8s]
namespace = "research"

[validate]
dry_run_timeout_s = 30

[proposer]
name = "llm"

[proposer.llm]
model = "some-model"
"""


def write(root: Path, text: str) -> Path:
    path = root / CONFIG_FILE
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path: Path):
    config = load_config(tmp_path)
    assert config == FanoutConfig()
    assert config.study.study_name == "default" and config.study.k == 4
    assert config.study.branch == "research" and config.study.threshold == 0.0
    assert config.job.command == DEFAULT_COMMAND == "python train.py"
    assert config.job.time_limit_s == 900.0 and config.job.time_budget_s is None
    assert config.job.gpus == 1 and config.job.env == {}
    assert config.backend.name == "local"
    assert config.backend.options_for("local") == {}
    assert load_config(None) == FanoutConfig()


def test_values_are_read(tmp_path: Path):
    write(tmp_path, FULL)
    config = load_config(tmp_path)
    assert (config.study.name, config.study.tag, config.study.branch, config.study.k) == (
        "depth-sweep", "mar5", "autoresearch/mar5", 8)
    job = config.job
    assert job.command == "uv run train.py --fast"
    assert job.time_limit_s == 600.0 and job.time_budget_s == 300.5
    assert job.data_dir == "/data/climbmix" and job.gpus == 2 and job.gpu_type == "H100"
    assert job.env == {"WANDB_MODE": "offline"}
    assert config.backend.name == "k8s"
    assert config.validate_.dry_run_timeout_s == 30 and config.validate_.allowed_files == ["train.py"]
    assert config.proposer.name == "llm"
    assert config.proposer.options_for("llm") == {"model": "some-model"}


def test_backend_tables_reach_options_for(tmp_path: Path):
    write(tmp_path, FULL)
    backend = load_config(tmp_path).backend
    assert backend.options_for("local") == {"slots": 4, "kill_grace_s": 1.5, "gpus": ["0", "1"]}
    assert backend.options_for("k8s") == {"namespace": "research"}
    assert backend.options_for("slurm") == {}
    backend.options_for("local")["slots"] = 99  # a copy: callers cannot change the config
    assert backend.options_for("local")["slots"] == 4


def test_explicit_path(tmp_path: Path):
    path = tmp_path / "elsewhere.toml"
    path.write_text('[job]\ncommand = "python other.py"\n')
    assert load_config(None, path).job.command == "python other.py"
    assert load_config(tmp_path / "repo-without-config", path).job.command == "python other.py"


def test_explicit_path_that_does_not_exist(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path, tmp_path / "missing.toml")


def assert_one_line(exc: BaseException, *parts: str) -> str:
    message = str(exc)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)
    return message


def test_invalid_toml_is_one_line_naming_the_file(tmp_path: Path):
    path = write(tmp_path, '[job]\ncommand = "python train.py"\ntime_limit_s = = 3\n')
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    message = assert_one_line(caught.value, str(path), "invalid TOML")
    assert "line 3" in message
    assert isinstance(caught.value, FanoutError)


@pytest.mark.parametrize("text,where", [
    ('[job]\ncomand = "python train.py"\n', "job.comand"),
    ("[study]\nnmae = 'x'\n", "study.nmae"),
    ("[jobs]\ncommand = 'x'\n", "jobs"),
    ("[job]\ntime_limit_s = -1\n", "job.time_limit_s"),
    ("[job]\ntime_limit_s = 'soon'\n", "job.time_limit_s"),
    ("[study]\nk = 0\n", "study.k"),
    ("[job]\nenv = { SEED = 1 }\n", "job.env.SEED"),
])
def test_invalid_settings_are_one_line_naming_file_and_key(tmp_path: Path, text: str, where: str):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert_one_line(caught.value, str(path), f": {where}: ")


def test_a_backend_entry_that_is_not_a_table(tmp_path: Path):
    write(tmp_path, '[backend]\nname = "local"\nlocal = 4\n')
    backend = load_config(tmp_path).backend
    with pytest.raises(ConfigError, match=r"\[backend.local\] in fanout.toml must be a table"):
        backend.options_for("local")
