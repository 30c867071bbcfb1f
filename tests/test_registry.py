"""Finding backends by name: the built-in ones and third-party ones published as entry points."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fanout_research.backends.local import LocalBackend
from fanout_research.errors import ConfigError, FanoutError, UnknownBackendError
from fanout_research.registry import (
    BUILTIN_BACKENDS,
    ENTRY_POINT_GROUP,
    available_backends,
    backend_class,
    create_backend,
)
from fanout_research.study import StudyDir

PLUGIN_MODULE = "mybackend_pkg"
PLUGIN_SOURCE = textwrap.dedent("""
    class MineBackend:
        name = "mine"
        poll_interval_s = 2.0

        def __init__(self, study, *, x=0, region="eu"):
            self.study = study
            self.x = x
            self.region = region

        def options(self):
            return {"x": self.x, "region": self.region}
""")


@pytest.fixture
def study(tmp_path: Path) -> StudyDir:
    return StudyDir(name="reg", root=tmp_path / "study")


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], Path]]:
    """Make a fake installed distribution on sys.path, declaring ``entry_points`` lines."""
    site = tmp_path / "site"

    def install(entry_points: str) -> Path:
        (site / PLUGIN_MODULE).mkdir(parents=True)
        (site / PLUGIN_MODULE / "__init__.py").write_text(PLUGIN_SOURCE)
        dist_info = site / "mybackend-0.1.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: mybackend\nVersion: 0.1\n")
        (dist_info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_points}\n")
        monkeypatch.syspath_prepend(str(site))
        return site

    yield install
    sys.modules.pop(PLUGIN_MODULE, None)


def test_local_is_built_in(study: StudyDir):
    assert available_backends()["local"] == BUILTIN_BACKENDS["local"]
    assert backend_class("local") is LocalBackend
    backend = create_backend("local", study, {"slots": 3, "gpus": [], "kill_grace_s": 0.5})
    assert isinstance(backend, LocalBackend)
    assert backend.study is study
    assert (backend.slots, backend.gpus, backend.kill_grace_s) == (3, (), 0.5)


def test_unknown_backend_lists_the_available_ones(study: StudyDir):
    with pytest.raises(UnknownBackendError) as caught:
        create_backend("no-such-engine", study)
    message = str(caught.value)
    assert "no-such-engine" in message
    assert "available: " in message and "local" in message
    assert isinstance(caught.value, FanoutError)  # the CLI turns it into exit 2


def test_third_party_backend_from_an_entry_point(install_plugin, study: StudyDir):
    install_plugin("mine = mybackend_pkg:MineBackend")
    found = available_backends()
    assert found["mine"] == "mybackend_pkg:MineBackend"
    assert found["local"] == BUILTIN_BACKENDS["local"]
    assert list(found) == sorted(found)

    backend = create_backend("mine", study, {"x": 1})
    assert type(backend).__name__ == "MineBackend"
    assert type(backend).__module__ == PLUGIN_MODULE
    assert backend.study is study
    assert backend.options() == {"x": 1, "region": "eu"}


def test_error_for_unknown_name_lists_plugins_too(install_plugin, study: StudyDir):
    install_plugin("mine = mybackend_pkg:MineBackend")
    with pytest.raises(UnknownBackendError, match=r"available: kubernetes, local, mine, slurm, vessl\)"):
        backend_class("yours")


def test_builtin_cannot_be_shadowed_by_a_plugin(install_plugin, study: StudyDir):
    install_plugin("local = mybackend_pkg:MineBackend\nmine = mybackend_pkg:MineBackend")
    found = available_backends()
    assert found["local"] == BUILTIN_BACKENDS["local"]
    assert found["mine"] == "mybackend_pkg:MineBackend"  # the plugin itself was seen
    assert backend_class("local") is LocalBackend
    assert isinstance(create_backend("local", study, {"slots": 1, "gpus": []}), LocalBackend)


def test_plugin_whose_module_is_missing_is_a_one_line_error(install_plugin, study: StudyDir):
    install_plugin("broken = no_such_module_xyz:Thing")
    assert "broken" in available_backends()
    with pytest.raises(UnknownBackendError, match="backend 'broken' cannot be loaded"):
        create_backend("broken", study)


def test_plugin_whose_attribute_is_missing_is_a_one_line_error(install_plugin, study: StudyDir):
    install_plugin("typo = mybackend_pkg:NoSuchBackend")
    with pytest.raises(UnknownBackendError, match="typo"):
        create_backend("typo", study)


@pytest.mark.parametrize("name,options", [
    ("local", {"no_such_option": 1}),
    ("local", {"slots": 1, "gpus": [], "region": "eu"}),
    ("mine", {"y": 2}),
])
def test_bad_options_are_a_config_error(install_plugin, study: StudyDir, name, options):
    install_plugin("mine = mybackend_pkg:MineBackend")
    with pytest.raises(ConfigError, match=f"bad options for backend '{name}'"):
        create_backend(name, study, options)


def test_badly_typed_option_is_a_config_error(study: StudyDir):
    with pytest.raises(ConfigError):
        create_backend("local", study, {"slots": "four"})


def test_cli_lists_builtin_and_plugin_backends(install_plugin, tmp_path: Path):
    fanout = Path(sys.executable).parent / "fanout"
    site = install_plugin("mine = mybackend_pkg:MineBackend")
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run([str(fanout), "backends"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == sorted(
        [f"{name}\t{target}" for name, target in BUILTIN_BACKENDS.items()]
        + ["mine\tmybackend_pkg:MineBackend"]
    )
