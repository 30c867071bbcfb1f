"""The Kubernetes backend through the real ``kubernetes`` client, over HTTP, against the API double.

The double (``fanout_research.testing.k8s_double``) serves the batch/v1 and core/v1 API on
127.0.0.1 and plays the Job controller and kubelet: each pod's init container and trainer run as
real local processes (the trainer through ``jobimage/entrypoint.sh``, the image's entrypoint).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("kubernetes")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

from kubernetes import client as k8s  # noqa: E402

from fanout_research.backends.kubernetes import (  # noqa: E402
    STUDY_LABEL,
    KubernetesBackend,
    label_value,
)
from fanout_research.errors import BackendError, JobSpecError  # noqa: E402
from fanout_research.models import DataMount, Phase, Resources  # noqa: E402
from fanout_research.phases import Failure  # noqa: E402
from fanout_research.study import StudyDir  # noqa: E402
from fanout_research.testing.conformance import BackendConformance, Harness  # noqa: E402
from fanout_research.testing.k8s_double import Fault, Image, K8sApiDouble  # noqa: E402
from fanout_research.testing.repo import commit_files, git  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "backends" / "kubernetes"
IMAGE = "registry.example/fanout-trainer:test"
NAMESPACE = "fanout"
K8S_VERSION = "1.33.0"


def trainer_image(tmp_path: Path) -> Image:
    """The trainer image as the pod runner sees it: Dockerfile ENTRYPOINT and ENV (no tini here:
    the runner signals the whole process group, as ``tini -g`` does)."""
    home = tmp_path / "image-home"
    home.mkdir(exist_ok=True)
    path = os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
    return Image(
        entrypoint=["bash", str(ROOT / "jobimage" / "entrypoint.sh")],
        env={
            "PATH": path,
            "HOME": str(home),
            "PYTHONUNBUFFERED": "1",
            "FANOUT_DATA_DIR": "/data",
            "LANG": "C.UTF-8",
        },
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "pvc-data"
    data.mkdir()
    (data / "shard-000.bin").write_bytes(b"\0" * 16)
    return data


@pytest.fixture
def double(tmp_path: Path, data_dir: Path):
    with K8sApiDouble(
        namespaces=(NAMESPACE,),
        images={IMAGE: trainer_image(tmp_path)},
        pvcs={"fanout-data": data_dir},
        workdir=tmp_path,
    ) as api:
        yield api


@pytest.fixture
def kubeconfig(double: K8sApiDouble, tmp_path: Path) -> Path:
    return double.write_kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)


@pytest.fixture
def remote(tmp_path: Path) -> str:
    path = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(path)], check=True)
    return f"file://{path}"


def make_backend(study: StudyDir, kubeconfig: Path, **options: object) -> KubernetesBackend:
    settings: dict[str, object] = {
        "image": IMAGE,
        "kubeconfig": str(kubeconfig),
        "startup_slack_s": 0,
        "log_grace_s": 1,
        "termination_grace_s": 2,
        "api_max_wait_s": 2.0,
    }
    settings.update(options)
    return KubernetesBackend(study, **settings)


@pytest.fixture
def backend(study: StudyDir, kubeconfig: Path, remote: str) -> KubernetesBackend:
    return make_backend(study, kubeconfig, git_url=remote)


@pytest.fixture
def harness(research_repo, backend: KubernetesBackend) -> Harness:
    repo, commit = research_repo
    return Harness(backend=backend, repo=repo, commit=commit, python="python3")


# -- the contract ------------------------------------------------------------------------------
class TestKubernetesConformance(BackendConformance):
    """Code cloned by the init container from the study's git remote (pushed at submit)."""


class TestKubernetesConformanceBundle(BackendConformance):
    """Code delivered as a git bundle in a ConfigMap: a repository with no remote."""

    @pytest.fixture
    def harness(self, research_repo, study: StudyDir, kubeconfig: Path) -> Harness:
        repo, commit = research_repo
        return Harness(backend=make_backend(study, kubeconfig), repo=repo, commit=commit, python="python3")


# -- manifests and the kit validate against the Kubernetes schemas, strictly ---------------------
def validate_strict(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_generated_manifests_validate_strictly(backend: KubernetesBackend, harness: Harness) -> None:
    specs = [
        harness.spec("ok"),
        harness.spec(
            "ok",
            resources=Resources(gpus=2, gpu_type="NVIDIA-H100-80GB-HBM3", cpu=8, memory_gb=64),
            data=DataMount(source="fanout-data", path="/data"),
        ),
        harness.spec("ok", resources=Resources(gpus=0), labels={"round": "3", "weird key!": "a b/c"}),
    ]
    for spec in specs:
        for bundled in (False, True):
            validate_strict(backend.manifest(spec, bundled=bundled))
    job = backend.manifest(specs[0], bundled=True)
    job["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
    validate_strict(backend.bundle_configmap(specs[0], b"bundle", job))


def test_kit_files_validate_strictly() -> None:
    kustomization = yaml.safe_load((KIT / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in KIT.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, "every manifest in the kit is applied by the kustomization"
    kinds = []
    for name in sorted(listed):
        for doc in yaml.safe_load_all((KIT / name).read_text()):
            if doc:
                validate_strict(doc)
                kinds.append(doc["kind"])
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "Job"} <= set(
        kinds
    )


def test_rbac_is_least_privilege() -> None:
    docs = list(yaml.safe_load_all((KIT / "rbac.yaml").read_text()))
    role = next(d for d in docs if d["kind"] == "Role")
    granted = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    assert granted == {
        ("jobs", "create"),
        ("jobs", "get"),
        ("jobs", "list"),
        ("jobs", "delete"),
        ("pods", "list"),
        ("pods/log", "get"),
        ("configmaps", "create"),
    }


def test_objects_served_by_the_double_validate_strictly(harness: Harness, double: K8sApiDouble) -> None:
    """The double's JSON shapes (with status) are the real API's, as far as the schema can tell."""
    slug = harness.backend.submit(harness.spec("crash"))
    harness.wait([slug])
    for resource in ("jobs", "pods"):
        for obj in double.objects(resource, NAMESPACE):
            validate_strict(
                json.loads(
                    json.dumps(obj, default=str),
                    object_hook=lambda d: {k: v for k, v in d.items() if not k.startswith("x-")},
                )
            )


# -- what the manifest says --------------------------------------------------------------------
def test_manifest_shape(backend: KubernetesBackend, harness: Harness, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-in-the-submitter")
    spec = harness.spec(
        "ok",
        time_limit=100,
        resources=Resources(gpus=2, gpu_type="NVIDIA-A100"),
        data=DataMount(source="/somewhere/local", path="/data"),
        labels={"study": "x", "round": "2", "candidate": "1"},
    )
    with pytest.raises(JobSpecError, match="data_pvc"):
        backend.manifest(spec, bundled=False)
    backend.opts.data_pvc = "fanout-data"
    job = backend.manifest(spec, bundled=False)
    pod = job["spec"]["template"]["spec"]
    trainer, fetch = pod["containers"][0], pod["initContainers"][0]
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["FANOUT_DATA_DIR"] == "/data" and env["FANOUT_JOB_NAME"] == spec.name
    assert env["FANOUT_COMMAND"] == "python3 job.py"
    assert "OPENAI_API_KEY" not in env and "sk-secret" not in json.dumps(job)
    assert trainer["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in trainer["volumeMounts"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "fanout-data", "readOnly": True}} in pod[
        "volumes"
    ]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert trainer["terminationMessagePath"] == "/dev/termination-log"
    assert env["FANOUT_TERMINATION_LOG"] == trainer["terminationMessagePath"]
    assert job["spec"]["activeDeadlineSeconds"] == 100
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert rules[1]["onExitCodes"] == {"containerName": "trainer", "operator": "NotIn", "values": [0]}
    labels = job["metadata"]["labels"]
    assert labels[STUDY_LABEL] == "test" and labels["fanout.io/round"] == "2"
    assert labels["fanout.io/candidate"] == "1"
    assert {e["name"]: e["value"] for e in fetch["env"]}["FANOUT_GIT_COMMIT"] == spec.code.commit
    cpu_only = backend.manifest(harness.spec("ok", resources=Resources(gpus=0)), bundled=False)
    cpu_pod = cpu_only["spec"]["template"]["spec"]
    assert "resources" not in cpu_pod["containers"][0] and "tolerations" not in cpu_pod


def test_label_values_are_sanitised() -> None:
    assert label_value("a b/c") == "a-b-c"
    assert label_value("--x--") == "x"
    assert len(label_value("y" * 100)) == 63


def test_options_round_trip_without_secrets(backend: KubernetesBackend, study: StudyDir) -> None:
    options = backend.options()
    assert options["namespace"] == NAMESPACE and "token" not in json.dumps(options)
    assert KubernetesBackend(study, **options).options() == options
    with pytest.raises(ValueError, match="bogus"):
        KubernetesBackend(study, **options, bogus=1)


# -- behaviour beyond the contract ---------------------------------------------------------------
def test_data_pvc_is_mounted_for_the_trainer(harness: Harness, data_dir: Path) -> None:
    spec = harness.spec(
        "ok",
        command=("python3", "-c", "import os; print(sorted(os.listdir(os.environ['FANOUT_DATA_DIR'])))"),
        data=DataMount(source="fanout-data", path="/data"),
        requires_metric=False,
    )
    slug = harness.backend.submit(spec)
    result = harness.wait([slug])[slug]
    assert result.phase is Phase.SUCCEEDED, result
    assert "['shard-000.bin']" in harness.backend.logs(slug)


def test_evicted_pod_is_retried_not_failed(harness: Harness, double: K8sApiDouble) -> None:
    slug = harness.backend.submit(harness.spec("ok", sleep=3.0))
    harness.wait_for_phase(slug, Phase.RUNNING)
    [pod] = double.pods_of(NAMESPACE, slug)
    core = k8s.CoreV1Api(harness.backend.api)  # the real eviction API (what a node drain uses)
    core.create_namespaced_pod_eviction(
        pod["metadata"]["name"],
        NAMESPACE,
        {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod["metadata"]["name"], "namespace": NAMESPACE},
        },
    )
    result = harness.wait([slug], timeout=30)[slug]
    assert result.phase is Phase.SUCCEEDED, result
    job = double.get("jobs", NAMESPACE, slug)
    assert job is not None and not job["status"].get("failed"), "a disruption does not count as a failure"
    pods = double.pods_of(NAMESPACE, slug)
    assert len(pods) == 1 and pods[0]["metadata"]["name"] != pod["metadata"]["name"]  # evicted one is gone
    assert harness.backend.logs(slug).count("job-start") == 1  # the replacement's log


def test_plain_pod_delete_is_not_a_disruption(harness: Harness, double: K8sApiDouble) -> None:
    """As in Kubernetes: a bare DELETE adds no DisruptionTarget, so the trainer's SIGTERM exit (143)
    matches the FailJob rule. Drains and preemption go through eviction (previous test)."""
    slug = harness.backend.submit(harness.spec("hang"))
    harness.wait_for_phase(slug, Phase.RUNNING)
    [pod] = double.pods_of(NAMESPACE, slug)
    k8s.CoreV1Api(harness.backend.api).delete_namespaced_pod(pod["metadata"]["name"], NAMESPACE)
    result = harness.wait([slug], timeout=30)[slug]
    assert result.phase is Phase.FAILED and result.exit_code == 143


def test_api_faults_during_submit_and_status_are_survived(harness: Harness, double: K8sApiDouble) -> None:
    double.inject(
        Fault("POST", r"/jobs$", "status", 429, retry_after=0.5),
        Fault("POST", r"/jobs$", "status", 500),
        Fault("POST", r"/jobs$", "reset_after"),  # created, but the answer never came: retry gets 409
        Fault("GET", r"/jobs$", "status", 503),
        Fault("GET", r"/jobs$", "reset"),
        Fault("GET", r"/jobs$", "status", 429, retry_after=0.2),
    )
    slug = harness.backend.submit(harness.spec("ok", sleep=0.5))
    posts = [r for r in double.requests if r.method == "POST" and r.path.endswith("/jobs")]
    assert [r.status for r in posts] == [429, 500, 0, 409]
    assert posts[1].at - posts[0].at >= 0.45, "Retry-After is honoured"
    result = harness.wait([slug])[slug]
    assert result.phase is Phase.SUCCEEDED, result
    assert len(double.objects("jobs", NAMESPACE)) == 1, "the retried create adopted, not duplicated"
    assert harness.backend.logs(slug).count("job-start") == 1


def test_api_outage_becomes_one_line_error(harness: Harness, double: K8sApiDouble) -> None:
    double.inject(Fault("GET", r"/jobs$", "status", 503, times=100))
    slug = harness.backend.submit(harness.spec("ok"))
    harness.backend.opts.api_attempts = 3
    with pytest.raises(BackendError) as caught:
        harness.backend.status([slug])
    assert "\n" not in str(caught.value) and "503" in str(caught.value)


def test_409_adopts_the_same_spec_and_refuses_another(
    harness: Harness,
    double: K8sApiDouble,
    study: StudyDir,
    kubeconfig: Path,
    remote: str,
    tmp_path: Path,
    monkeypatch,
) -> None:
    spec = harness.spec("ok", sleep=0.5)
    slug = harness.backend.submit(spec)
    # Another machine: same study, same cluster, none of this machine's records.
    monkeypatch.setenv("FANOUT_STUDY_DIR", str(tmp_path / "elsewhere"))
    other = make_backend(StudyDir.for_repo(harness.repo, "test"), kubeconfig, git_url=remote)
    assert other.submit(spec) == slug
    assert double.count("POST", r"/jobs$") == 2 and len(double.objects("jobs", NAMESPACE)) == 1
    clash = spec.model_copy(update={"env": {**spec.env, "FANOUT_TEST_SLEEP": "9"}})
    with pytest.raises(JobSpecError, match="different job"):
        other.submit(clash)
    assert Harness(backend=other, repo=harness.repo, commit=harness.commit).wait([slug])[slug].succeeded
    assert harness.backend.logs(slug).count("job-start") == 1


def test_a_foreign_job_with_the_same_name_is_refused(harness: Harness, double: K8sApiDouble) -> None:
    spec = harness.spec("ok")
    foreign = harness.backend.manifest(spec, bundled=False)
    del foreign["metadata"]["labels"][STUDY_LABEL]
    foreign["spec"]["template"]["metadata"]["labels"].pop(STUDY_LABEL)
    k8s.BatchV1Api(harness.backend.api).create_namespaced_job(NAMESPACE, foreign)
    with pytest.raises(JobSpecError, match="not one of this study"):
        harness.backend.submit(spec)


@pytest.mark.parametrize(
    ("verb", "resource", "call"),
    [
        ("create", "jobs", "submit"),
        ("list", "jobs", "status"),
        ("get", "pods/log", "finalize"),
    ],
)
def test_forbidden_names_the_missing_verb(
    harness: Harness, double: K8sApiDouble, verb, resource, call
) -> None:
    spec = harness.spec("ok")
    if call != "submit":
        slug = harness.backend.submit(spec)
        if call == "finalize":
            double.wait_until(
                lambda: any(
                    c["type"] == "Complete"
                    for c in (double.get("jobs", NAMESPACE, slug) or {})
                    .get("status", {})
                    .get("conditions", [])
                )
            )
    double.deny(verb, resource)
    with pytest.raises(BackendError) as caught:
        harness.backend.submit(spec) if call == "submit" else harness.backend.status([spec.name])
    message = str(caught.value)
    assert "\n" not in message and f"verb {verb!r}" in message and f"resource {resource!r}" in message


def test_bad_credentials_are_one_line(
    study: StudyDir, double: K8sApiDouble, tmp_path: Path, remote: str, harness: Harness
) -> None:
    config = json.loads(double.write_kubeconfig(tmp_path / "bad").read_text())
    config["users"][0]["user"]["token"] = "wrong"
    (tmp_path / "bad").write_text(json.dumps(config))
    backend = make_backend(study, tmp_path / "bad", git_url=remote, namespace=NAMESPACE)
    with pytest.raises(BackendError, match="401 Unauthorized") as caught:
        backend.submit(harness.spec("ok"))
    assert "\n" not in str(caught.value)


def test_status_is_one_list_call_whatever_the_number_of_jobs(harness: Harness, double: K8sApiDouble) -> None:
    slugs: list[str] = []
    for size in (1, 4, 12):
        slugs += [
            harness.backend.submit(harness.spec("hang", time_limit=120)) for _ in range(size - len(slugs))
        ]
        running = list(slugs)
        double.wait_until(
            lambda running=running: all(
                double.get("jobs", NAMESPACE, s)["status"].get("ready") for s in running
            )
        )
        double.reset_requests()
        states = harness.backend.status(slugs)
        assert all(s.phase is Phase.RUNNING for s in states.values())
        assert [(r.method, r.path) for r in double.requests] == [
            ("GET", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs")
        ], f"K={size}"
    for slug in slugs:
        harness.backend.cancel(slug)


def test_termination_message_keeps_the_result_when_the_log_is_lost(
    harness: Harness,
    double: K8sApiDouble,
) -> None:
    slug = harness.backend.submit(harness.spec("json"))
    double.wait_until(
        lambda: any(
            c["type"] == "Complete"
            for c in (double.get("jobs", NAMESPACE, slug) or {}).get("status", {}).get("conditions", [])
        )
    )
    double.inject(Fault("GET", r"/log$", "status", 404, times=5))  # the node (and its logs) are gone
    result = harness.wait([slug])[slug]
    assert result.phase is Phase.SUCCEEDED and result.metrics.val_bpb == pytest.approx(1.5)


def test_a_commit_missing_from_the_remote_is_a_setup_failure_at_once(
    research_repo,
    study: StudyDir,
    kubeconfig: Path,
    remote: str,
    double: K8sApiDouble,
) -> None:
    backend = make_backend(study, kubeconfig, git_url=remote, push=False)
    repo, commit = research_repo
    harness = Harness(backend=backend, repo=repo, commit=commit, python="python3")
    slug = backend.submit(harness.spec("ok"))
    result = harness.wait([slug])[slug]
    assert result.phase is Phase.FAILED and result.failure is Failure.SETUP, result
    assert "push it first" in result.reason
    assert len(double.pods_of(NAMESPACE, slug)) == 1, "no retries: FailJob on the fetch's exit 64"


def test_a_bundle_too_big_for_a_configmap_is_refused_before_anything_is_created(
    research_repo,
    study: StudyDir,
    kubeconfig: Path,
    double: K8sApiDouble,
) -> None:
    repo, _ = research_repo
    big = commit_files(repo, {"weights.txt": os.urandom(1024 * 1024).hex()}, "big")
    backend = make_backend(study, kubeconfig)
    harness = Harness(backend=backend, repo=repo, commit=big)
    with pytest.raises(JobSpecError, match=r"KiB.*git_url"):
        backend.submit(harness.spec("ok"))
    assert double.count("POST") == 0
    assert git(repo, "status", "--porcelain") == ""


def test_reap_deletes_the_studys_jobs_and_keeps_results(harness: Harness, double: K8sApiDouble) -> None:
    done = harness.backend.submit(harness.spec("ok"))
    harness.wait([done])
    running = [harness.backend.submit(harness.spec("hang", time_limit=120)) for _ in range(2)]
    harness.wait_for_phase(running[0], Phase.RUNNING)
    assert harness.backend.reap() == sorted([done, *running])
    assert double.objects("jobs", NAMESPACE) == []
    double.wait_until(lambda: not double.objects("pods", NAMESPACE), timeout=20)  # background propagation
    states = harness.backend.status([done, *running])
    assert states[done].phase is Phase.SUCCEEDED
    assert {states[s].phase for s in running} == {Phase.CANCELLED}


def test_ttl_deleted_job_is_lost_not_unknown(
    research_repo, study: StudyDir, kubeconfig: Path, remote: str, double: K8sApiDouble
) -> None:
    backend = make_backend(study, kubeconfig, git_url=remote, ttl_seconds_after_finished=0)
    repo, commit = research_repo
    harness = Harness(backend=backend, repo=repo, commit=commit, python="python3")
    slug = backend.submit(harness.spec("ok"))
    double.wait_until(lambda: double.get("jobs", NAMESPACE, slug) is None, timeout=20)
    assert backend.status([slug])[slug].phase is Phase.LOST


def test_namespace_missing_is_one_line(
    study: StudyDir, kubeconfig: Path, remote: str, harness: Harness
) -> None:
    backend = make_backend(study, kubeconfig, git_url=remote, namespace="nowhere")
    with pytest.raises(BackendError, match="namespace 'nowhere' does not exist"):
        backend.submit(harness.spec("ok"))


def test_jobs_wait_for_free_gpus(
    research_repo, study: StudyDir, kubeconfig: Path, remote: str, double: K8sApiDouble
) -> None:
    double.gpus = 1
    backend = make_backend(study, kubeconfig, git_url=remote)
    repo, commit = research_repo
    harness = Harness(backend=backend, repo=repo, commit=commit, python="python3")
    slugs = [backend.submit(harness.spec("ok", sleep=1.0)) for _ in range(2)]
    harness.wait_for_phase(slugs[0], Phase.RUNNING)
    time.sleep(0.3)
    states = backend.status(slugs)
    assert sorted(s.phase for s in states.values()) == [Phase.PENDING, Phase.RUNNING]
    assert all(r.succeeded for r in harness.wait(slugs).values())


def test_the_prep_job_fills_the_data_volume_and_only_it_mounts_it_writable(
    tmp_path: Path, remote: str
) -> None:
    """`fanout prepare` on a cluster: the real prepare.py runs as a Job that mounts the data PVC
    writable; candidates mount the same PVC read-only."""
    from fanout_research.cli.research_cmds import prepare_spec, scaffold
    from fanout_research.config import load_config

    repo = tmp_path / "lab"
    scaffold(repo, tag="lab")
    config_file = repo / "fanout.toml"
    config_file.write_text(config_file.read_text()
                           .replace('data_dir = "~/.cache/fanout/data/synthetic"', 'data_dir = "fanout-data"')
                           .replace("vocab_size = 4096", 'vocab_size = 512\nargs = ["--docs", "300"]'))
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam",
                    "data on the cluster"], check=True)
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    volume = tmp_path / "empty-pvc"
    volume.mkdir()
    with K8sApiDouble(namespaces=(NAMESPACE,), images={IMAGE: trainer_image(tmp_path)},
                      pvcs={"fanout-data": volume}, workdir=tmp_path) as api:
        study = StudyDir.for_repo(repo, "lab")
        backend = make_backend(study, api.write_kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE),
                               git_url=remote)
        assert getattr(backend, "shared_filesystem", False) is False
        spec = prepare_spec(load_config(repo), "lab", str(repo), commit, Path("unused"), shared=False)
        assert spec.command[spec.command.index("--out") + 1] == "/data"
        pod = backend.manifest(spec, bundled=False)["spec"]["template"]["spec"]
        assert pod["volumes"][-1]["persistentVolumeClaim"] == {"claimName": "fanout-data", "readOnly": False}
        slug = backend.submit(spec)
        result = Harness(backend=backend, repo=repo, commit=commit).wait([slug], timeout=120)[slug]
        assert result.phase is Phase.SUCCEEDED, backend.logs(slug)
        assert json.loads((volume / "manifest.json").read_text())["settings"]["vocab_size"] == 512

        candidate = spec.model_copy(update={"name": "lab-r01-c1", "data": DataMount(source="fanout-data")})
        pod = backend.manifest(candidate, bundled=False)["spec"]["template"]["spec"]
        assert pod["volumes"][-1]["persistentVolumeClaim"] == {"claimName": "fanout-data", "readOnly": True}
