"""Find backends by name: the built-ins, plus third-party ones published under an entry-point group.

A third-party package declares, in its ``pyproject.toml``::

    [project.entry-points."fanout_research.backends"]
    mycloud = "mycloud_fanout:MyCloudBackend"
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from fanout_research.backends.base import Backend
from fanout_research.errors import ConfigError, UnknownBackendError, first_problem
from fanout_research.study import StudyDir

ENTRY_POINT_GROUP = "fanout_research.backends"
BUILTIN_BACKENDS: dict[str, str] = {
    "kubernetes": "fanout_research.backends.kubernetes:KubernetesBackend",
    "local": "fanout_research.backends.local:LocalBackend",
    "slurm": "fanout_research.backends.slurm:SlurmBackend",
    "vessl": "fanout_research.backends.vessl:VesslBackend",
}


def available_backends() -> dict[str, str]:
    """name -> "module:attribute". Built-ins cannot be shadowed by a plugin of the same name."""
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    found.update(BUILTIN_BACKENDS)
    return dict(sorted(found.items()))


def backend_class(name: str) -> type[Backend]:
    targets = available_backends()
    if name not in targets:
        raise UnknownBackendError(
            f"unknown backend {name!r} (available: {', '.join(targets) or 'none'})"
        )
    module_name, _, attribute = targets[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise UnknownBackendError(
            f"backend {name!r} cannot be loaded from {targets[name]!r}: {exc} "
            "(is its optional extra installed?)"
        ) from None
    return cls


def create_backend(
    name: str, study: StudyDir, options: Mapping[str, Any] | None = None
) -> Backend:
    cls = backend_class(name)
    try:
        return cls(study, **dict(options or {}))  # type: ignore[call-arg]
    except ValidationError as exc:  # a backend that models its options: name the first problem
        raise ConfigError(f"bad options for backend {name!r}: {first_problem(exc)}") from None
    except (TypeError, ValueError) as exc:  # unknown or badly typed options from fanout.toml
        raise ConfigError(f"bad options for backend {name!r}: {exc}") from None
