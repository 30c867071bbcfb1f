"""The orchestrator must run where torch is not installed: only the trainer needs it."""

from __future__ import annotations

import subprocess
import sys

BLOCK_HEAVY = (
    "import sys\n"
    "for name in ('torch', 'numpy', 'matplotlib'):\n"
    "    sys.modules[name] = None  # any import of these now raises ImportError\n"
)


def test_core_imports_and_runs_without_torch_numpy_or_matplotlib() -> None:
    code = BLOCK_HEAVY + (
        "import fanout_research.jobs, fanout_research.backends.local, fanout_research.research.loop\n"
        "import fanout_research.research.plot, fanout_research.cli.research_cmds\n"
        "from fanout_research.cli import main\n"
        "sys.exit(main(['backends']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "local\tfanout_research.backends.local:LocalBackend" in done.stdout.splitlines()


def test_the_blocker_really_blocks() -> None:
    done = subprocess.run([sys.executable, "-c", BLOCK_HEAVY + "import torch"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "import of torch halted" in done.stderr
