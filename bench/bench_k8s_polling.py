"""What polling K Kubernetes jobs costs the API server: requests per status() call as K grows.

Runs the real KubernetesBackend through the real ``kubernetes`` client against the API double on
127.0.0.1 (fanout_research.testing.k8s_double), whose pod runner runs every job as local processes,
and counts the requests the double receives.

    python bench/bench_k8s_polling.py [--max-k 64] [--polls 5]

Steady state (all K jobs running): one LIST per poll, whatever K. When jobs reach a final
condition, their results are read once: one pod LIST per poll that sees any, plus one log read per
finishing job. Both are printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fanout_research.backends.kubernetes import KubernetesBackend
from fanout_research.models import Phase, Resources
from fanout_research.study import StudyDir
from fanout_research.testing.conformance import Harness
from fanout_research.testing.k8s_double import Image, K8sApiDouble
from fanout_research.testing.repo import make_research_repo

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "fanout-trainer:bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-k", type=int, default=64)
    parser.add_argument("--polls", type=int, default=5)
    args = parser.parse_args()
    sizes = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= args.max_k]
    with tempfile.TemporaryDirectory(prefix="bench-k8s-") as tmp_name:
        tmp = Path(tmp_name)
        repo, commit = make_research_repo(tmp / "repo")
        subprocess.run(["git", "init", "-q", "--bare", str(tmp / "remote.git")], check=True)
        (tmp / "home").mkdir()
        image = Image(
            entrypoint=["bash", str(ROOT / "jobimage" / "entrypoint.sh")],
            env={
                "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                "HOME": str(tmp / "home"),
                "FANOUT_DATA_DIR": "/data",
            },
        )
        os.environ["FANOUT_STUDY_DIR"] = str(tmp / "study")
        with K8sApiDouble(namespaces=("fanout",), images={IMAGE: image}, gpus=args.max_k, workdir=tmp) as api:
            backend = KubernetesBackend(
                StudyDir.for_repo(repo, "bench"),
                image=IMAGE,
                namespace="fanout",
                kubeconfig=str(api.write_kubeconfig(tmp / "kubeconfig", namespace="fanout")),
                git_url=f"file://{tmp}/remote.git",
                startup_slack_s=0,
                log_grace_s=0,
                termination_grace_s=1,
            )
            harness = Harness(backend=backend, repo=repo, commit=commit)
            print(f"steady state: {args.polls} status() calls over K running jobs (1 GPU each)")
            print(f"{'K':>4} {'requests/poll':>14} {'ms/poll':>9} {'submit s':>9}")
            slugs: list[str] = []
            for k in sizes:
                start = time.perf_counter()
                specs = [
                    harness.spec("hang", time_limit=600, resources=Resources(gpus=1))
                    for _ in range(k - len(slugs))
                ]
                slugs += backend.submit_many(specs)
                submit_s = time.perf_counter() - start
                deadline = time.monotonic() + 120
                while not all(s.phase is Phase.RUNNING for s in backend.status(slugs).values()):
                    assert time.monotonic() < deadline, "jobs never started"
                    time.sleep(0.2)
                api.reset_requests()
                start = time.perf_counter()
                for _ in range(args.polls):
                    backend.status(slugs)
                per_poll_ms = (time.perf_counter() - start) / args.polls * 1000
                print(f"{k:>4} {api.count() / args.polls:>14.2f} {per_poll_ms:>9.1f} {submit_s:>9.2f}")
            for slug in slugs:
                backend.cancel(slug)

            k = sizes[-1]
            print(f"\nfinishing: K={k} short jobs polled every 0.25 s until all are final")
            finishing = backend.submit_many(
                [harness.spec("ok", sleep=1.0, resources=Resources(gpus=1)) for _ in range(k)]
            )
            api.reset_requests()
            per_poll: list[int] = []
            while True:
                before = api.count()
                states = backend.status(finishing)
                per_poll.append(api.count() - before)
                if all(s.phase.final for s in states.values()):
                    break
                time.sleep(0.25)
            ok = sum(1 for s in finishing if backend.result(s).succeeded)
            logs = api.count("GET", r"/log$")
            pod_lists = api.count("GET", r"/pods$")
            print(
                f"polls: {len(per_poll)}; requests: total {sum(per_poll)}, min/poll {min(per_poll)}, "
                f"max/poll {max(per_poll)}; job lists {api.count('GET', r'/jobs$')}, pod lists {pod_lists}, "
                f"log reads {logs} ({logs / k:.2f} per job); succeeded {ok}/{k}"
            )


if __name__ == "__main__":
    main()
