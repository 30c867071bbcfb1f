"""KubernetesBackend: one ``batch/v1`` Job per candidate, through the official ``kubernetes`` client.

The shape of a job (see ``docs/backends/kubernetes.md``):

- an init container ``fetch-code`` checks out the candidate's exact commit into an ``emptyDir``:
  from the study's git remote (option ``git_url``; the commit is pushed there first as
  ``refs/fanout/<study>/<job>``), or, for a repository without a remote, from a ``git bundle``
  delivered through the API in a ConfigMap (``binaryData``, refused above 900 KiB);
- the ``trainer`` container runs the trainer image's entrypoint (``jobimage/entrypoint.sh``) with the
  job protocol's environment and nothing of the submitter's; it copies the ``fanout-result`` line
  to the termination message, so a result survives lost logs;
- the data PVC is mounted ``readOnly`` at ``spec.data.path`` (writable only for a spec that asks,
  the data's prep job); GPUs are ``nvidia.com/gpu`` limits;
- ``podFailurePolicy``: disruptions (``DisruptionTarget``) are retried without counting, a crash of
  the trainer fails the Job at once, a commit that is not in the remote fails it at once;
  ``activeDeadlineSeconds`` is the time limit; ``ttlSecondsAfterFinished`` cleans up.

Polling costs one LIST of the study's Jobs (label ``fanout.io/study``) per ``status`` call, whatever
the number of jobs. When a Job reaches a final condition (including the early ``SuccessCriteriaMet``
/ ``FailureTarget``), its result is read once (one LIST of those Jobs' pods, one log read per job)
and kept in the study directory: deleted Jobs cannot be listed, and their logs go with their pods.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import random
import re
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException
from pydantic import BaseModel, ConfigDict, Field
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from fanout_research import gitrepo
from fanout_research.errors import BackendError, JobSpecError, UnknownJobError
from fanout_research.metrics import classify_exit, last_lines, parse_metrics, parse_result_line
from fanout_research.models import DNS_LABEL, JobResult, JobSpec, JobState, Metrics, Phase
from fanout_research.phases import Failure
from fanout_research.study import StudyDir

T = TypeVar("T")

STUDY_LABEL = "fanout.io/study"
LABEL_PREFIX = "fanout.io/"
SPEC_ANNOTATION = "fanout.io/spec"
DIGEST_ANNOTATION = "fanout.io/spec-sha256"
JOB_UID_LABEL = "batch.kubernetes.io/controller-uid"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
TRAINER = "trainer"
FETCH = "fetch-code"
CODE_MOUNT = "/workspace"
CODE_DIR = "/workspace/code"
BUNDLE_MOUNT = "/var/run/fanout/bundle"
BUNDLE_KEY = "code.bundle"
TERMINATION_LOG = "/dev/termination-log"
# A ConfigMap holds at most 1 MiB; leave room for its metadata and the base64 in the request.
MAX_BUNDLE_BYTES = 900 * 1024
SETUP_EXIT = 64  # fetch-code: the commit is not there (no retry helps); other failures are retried
LOG_CACHE_LINES = 50_000
LOG_TAIL_LINES = 40
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
API_GROUPS = {"jobs": "batch", "pods": "", "pods/log": "", "configmaps": ""}

# The init container's script: exact commit, shallow when the server allows it. Exit 64 when the
# source answers but lacks the commit (FailJob), 1 when it cannot be reached (retried).
FETCH_SCRIPT = r"""set -eu
src="${FANOUT_GIT_BUNDLE:-${FANOUT_GIT_URL:-}}"
[ -n "$src" ] || { echo "fetch-code: set FANOUT_GIT_URL or FANOUT_GIT_BUNDLE" >&2; exit 64; }
rm -rf "$FANOUT_CODE_DIR" && mkdir -p "$FANOUT_CODE_DIR" && cd "$FANOUT_CODE_DIR"
git init -q .
git fetch -q --depth 1 "$src" "$FANOUT_GIT_COMMIT" 2>/dev/null \
  || git fetch -q "$src" "+$FANOUT_GIT_REF:refs/fanout/job" 2>/dev/null \
  || git fetch -q "$src" '+refs/*:refs/fanout-source/*' \
  || { if git ls-remote "$src" >/dev/null 2>&1; then code=64; else code=1; fi
       echo "fetch-code: cannot fetch $FANOUT_GIT_COMMIT from $src" >&2; exit $code; }
git -c advice.detachedHead=false checkout -q --detach "$FANOUT_GIT_COMMIT" 2>/dev/null \
  || { echo "fetch-code: commit $FANOUT_GIT_COMMIT is not in $src (push it first)" >&2; exit 64; }
[ "$(git rev-parse HEAD)" = "$FANOUT_GIT_COMMIT" ] \
  || { echo "fetch-code: checked out $(git rev-parse HEAD), not $FANOUT_GIT_COMMIT" >&2; exit 64; }
echo "fetch-code: $FANOUT_GIT_COMMIT from $src" >&2
"""


class KubernetesOptions(BaseModel):
    """``[backend.kubernetes]`` in fanout.toml. No secrets: credentials stay in the kubeconfig."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, description="Trainer image (built from jobimage/).")
    namespace: str | None = Field(None, description="Default: the context's namespace, else 'fanout'.")
    context: str | None = Field(None, description="kubeconfig context (default: current-context).")
    kubeconfig: str | None = Field(
        None, description="kubeconfig path (default: $KUBECONFIG, ~/.kube/config)."
    )
    in_cluster: bool | None = Field(None, description="Use the pod's service account (default: auto).")
    git_url: str | None = Field(None, description="Remote the cluster clones from; else a git bundle.")
    push: bool = Field(True, description="Push each commit to git_url as refs/fanout/<study>/<job>.")
    push_url: str | None = Field(None, description="Where to push, if not git_url (ssh vs https).")
    data_pvc: str | None = Field(None, description="PVC with the prepared data (default: spec.data.source).")
    data_sub_path: str | None = Field(None, description="Directory inside the PVC (the kit's: 'data').")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    gpu_resource: str = "nvidia.com/gpu"
    gpu_type_label: str = Field("nvidia.com/gpu.product", description="Node label selecting the GPU type.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        description="Added to GPU jobs.",
    )
    service_account: str | None = Field(None, description="The jobs' service account (no token mounted).")
    priority_class: str | None = None
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every Job.")
    backoff_limit: int = Field(3, ge=0, description="Counted pod failures (disruptions are not counted).")
    ttl_seconds_after_finished: int = Field(86400, ge=0)
    startup_slack_s: float = Field(300.0, ge=0, description="Added to the time limit: pull, clone, schedule.")
    termination_grace_s: int = Field(30, ge=0, description="SIGTERM to SIGKILL when a pod is stopped.")
    log_grace_s: int = Field(10, ge=0, description="preStop pause that keeps a stopped pod's log readable.")
    request_timeout_s: float = Field(30.0, gt=0)
    api_attempts: int = Field(6, ge=1, description="Tries per API call on 429, 5xx, resets.")
    api_max_wait_s: float = Field(30.0, gt=0, description="Longest pause between tries (Retry-After too).")


def _now() -> float:
    return time.time()


def _when(stamp: str | None) -> datetime | None:
    if not stamp:
        return None
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(UTC)


def label_value(text: str) -> str:
    """Any string as a label value: at most 63 of [A-Za-z0-9._-], alphanumeric at both ends."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ApiException):
        return exc.status in TRANSIENT_STATUS
    return isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


def _conditions(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        c["type"]: c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"
    }


def final_condition(job: dict[str, Any]) -> dict[str, Any] | None:
    """The condition that settles the Job's fate, early ones included."""
    conds = _conditions(job)
    for kind in ("Failed", "Complete", "FailureTarget", "SuccessCriteriaMet"):
        if kind in conds:
            return conds[kind]
    return None


class KubernetesBackend:
    name: ClassVar[str] = "kubernetes"
    poll_interval_s: ClassVar[float] = 2.0  # one LIST per poll; the API server is shared

    def __init__(self, study: StudyDir, **options: Any) -> None:
        self.opts = KubernetesOptions.model_validate(options)
        self.study = study
        self._configure()
        self.records = study.root / self.name / self.namespace
        self.batch = client.BatchV1Api(self.api)
        self.core = client.CoreV1Api(self.api)

    def _configure(self) -> None:
        opts = self.opts
        cfg = client.Configuration()
        in_cluster = opts.in_cluster
        if in_cluster is None:
            in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not (
                opts.kubeconfig or opts.context or os.environ.get("KUBECONFIG")
            )
        namespace = opts.namespace
        try:
            if in_cluster:
                config.load_incluster_config(client_configuration=cfg)
                ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                if namespace is None and ns_file.exists():
                    namespace = ns_file.read_text().strip()
            else:
                config.load_kube_config(
                    config_file=opts.kubeconfig, context=opts.context, client_configuration=cfg
                )
                if namespace is None:
                    contexts, current = config.list_kube_config_contexts(config_file=opts.kubeconfig)
                    chosen = next((c for c in contexts if c["name"] == opts.context), current)
                    namespace = (chosen or {}).get("context", {}).get("namespace")
        except (ConfigException, OSError, TypeError) as exc:
            where = (
                "in-cluster service account" if in_cluster else f"kubeconfig {opts.kubeconfig or '(default)'}"
            )
            raise BackendError(f"kubernetes: cannot load the {where}: {exc}".replace("\n", " ")) from None
        cfg.retries = False  # every retry is ours (tenacity, below): bounded, visible, Retry-After aware
        self.in_cluster = in_cluster
        self.namespace = namespace or "fanout"
        self.host = cfg.host
        self.api = client.ApiClient(cfg)

    def options(self) -> dict[str, Any]:
        data = self.opts.model_dump()
        data["namespace"] = self.namespace
        return data

    # -- the API, with retries and one-line errors ----------------------------------------------
    def _call(self, verb: str, resource: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call the API, retrying connection errors, 429 (honouring Retry-After) and 5xx, a bounded
        number of times; 401/403 become one line naming the missing verb and resource."""
        kwargs.setdefault("_request_timeout", self.opts.request_timeout_s)
        retrying = Retrying(
            stop=stop_after_attempt(self.opts.api_attempts),
            wait=self._wait,
            retry=retry_if_exception(_transient),
            reraise=True,
        )
        try:
            return retrying(fn, *args, **kwargs)
        except ApiException as exc:
            if exc.status in (401, 403):
                raise BackendError(self._denied(verb, resource, exc)) from None
            if exc.status in TRANSIENT_STATUS:
                raise BackendError(
                    f"kubernetes: {verb} {resource} failed {self.opts.api_attempts} times, "
                    f"last with {exc.status} {exc.reason}"
                ) from None
            raise
        except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
            raise BackendError(
                f"kubernetes: API server {self.host} unreachable ({verb} {resource}, "
                f"{self.opts.api_attempts} tries): {type(exc).__name__}"
            ) from None

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = None
        if isinstance(exc, ApiException) and exc.headers:
            with contextlib.suppress(TypeError, ValueError):
                retry_after = float(exc.headers.get("Retry-After"))
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.opts.api_max_wait_s)
        backoff = 0.2 * 2 ** (state.attempt_number - 1) + random.uniform(0, 0.2)  # exponential, jittered
        return min(backoff, self.opts.api_max_wait_s)

    def _denied(self, verb: str, resource: str, exc: ApiException) -> str:
        if exc.status == 401:
            return (
                f"kubernetes: the API server at {self.host} rejected our credentials (401 Unauthorized) "
                f"when trying to {verb} {resource}; refresh the kubeconfig context "
                f"{self.opts.context or '(current)'}"
            )
        group = API_GROUPS.get(resource, "")
        return (
            f"kubernetes: forbidden (403): missing RBAC verb {verb!r} on resource {resource!r} "
            f"(apiGroup {group!r}) in namespace {self.namespace!r}; apply backends/kubernetes/rbac.yaml "
            "or grant it to this identity's Role"
        )

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        return json.loads(response.data)

    def _list_jobs(self, selector: str | None = None) -> list[dict[str, Any]]:
        response = self._call(
            "list",
            "jobs",
            self.batch.list_namespaced_job,
            self.namespace,
            label_selector=selector or f"{STUDY_LABEL}={self.study.name}",
            _preload_content=False,
        )
        return self._json(response)["items"]

    def _read_job(self, name: str) -> dict[str, Any] | None:
        try:
            response = self._call(
                "get", "jobs", self.batch.read_namespaced_job, name, self.namespace, _preload_content=False
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise self._error("get", "jobs", exc) from None
        return self._json(response)

    def _list_pods(self, selector: str) -> list[dict[str, Any]]:
        response = self._call(
            "list",
            "pods",
            self.core.list_namespaced_pod,
            self.namespace,
            label_selector=selector,
            _preload_content=False,
        )
        return self._json(response)["items"]

    def _read_log(self, pod: dict[str, Any], container: str, tail: int | None = LOG_CACHE_LINES) -> str:
        try:
            return self._call(
                "get",
                "pods/log",
                self.core.read_namespaced_pod_log,
                pod["metadata"]["name"],
                self.namespace,
                container=container,
                tail_lines=tail,
            )
        except ApiException as exc:
            if exc.status in (400, 404):  # not started yet, or already gone with its pod
                return ""
            raise self._error("get", "pods/log", exc) from None

    def _delete_job(self, name: str) -> bool:
        try:
            self._call(
                "delete",
                "jobs",
                self.batch.delete_namespaced_job,
                name,
                self.namespace,
                propagation_policy="Background",
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise self._error("delete", "jobs", exc) from None
        return True

    def _error(self, verb: str, resource: str, exc: ApiException) -> BackendError:
        message = exc.reason or ""
        with contextlib.suppress(ValueError, TypeError):
            message = json.loads(exc.body).get("message", message)
        return BackendError(
            f"kubernetes: {verb} {resource} failed: {exc.status} {message}".replace("\n", " ")
        )

    # -- records: what survives a deleted Job ----------------------------------------------------
    def _record_path(self, slug: str) -> Path:
        return self.records / f"{slug}.json"

    def _record(self, slug: str) -> dict[str, Any] | None:
        if not DNS_LABEL.match(slug):
            return None
        try:
            return json.loads(self._record_path(slug).read_text())
        except (OSError, ValueError):
            return None

    def _write_record(self, slug: str, record: dict[str, Any], log: str | None = None) -> None:
        self.records.mkdir(parents=True, exist_ok=True)
        if log is not None:
            _atomic_write(self.records / f"{slug}.log", log)
        _atomic_write(self._record_path(slug), json.dumps(record))

    # -- manifests -------------------------------------------------------------------------------
    def labels(self, spec: JobSpec) -> dict[str, str]:
        labels = {"app.kubernetes.io/managed-by": "fanout-research", "app.kubernetes.io/name": "fanout-job"}
        for key, value in {**self.opts.labels, **spec.labels}.items():
            name = label_value(key)
            if name:
                labels[LABEL_PREFIX + name] = label_value(value)
        labels[STUDY_LABEL] = label_value(self.study.name)
        return labels

    def _data_claim(self, spec: JobSpec) -> str | None:
        if spec.data is None:
            return None
        claim = self.opts.data_pvc or spec.data.source
        if not DNS_LABEL.match(claim):
            raise JobSpecError(
                f"data source {spec.data.source!r} is not a PVC name; set [backend.kubernetes] "
                "data_pvc to the PVC holding the prepared data (backends/kubernetes/data-pvc.yaml)"
            )
        return claim

    def _git_url(self, spec: JobSpec) -> str | None:
        if self.opts.git_url:
            return self.opts.git_url
        if re.match(r"^[a-z+]+://|^[^/]+@[^/]+:", spec.code.repo):  # the spec already names a remote
            return spec.code.repo
        return None

    def ref(self, spec: JobSpec) -> str:
        return f"refs/fanout/{self.study.name}/{spec.name}"

    def manifest(self, spec: JobSpec, *, bundled: bool) -> dict[str, Any]:
        """The Job for one spec. ``bundled``: the code comes from ConfigMap ``<name>-code``."""
        labels = self.labels(spec)
        env = {
            **spec.protocol_env(),
            **spec.env,
            "FANOUT_CODE_DIR": CODE_DIR,
            "FANOUT_COMMAND": shlex.join(spec.command),
            "FANOUT_TERMINATION_LOG": TERMINATION_LOG,
            "PYTHONUNBUFFERED": "1",
        }
        fetch_env = {
            "FANOUT_CODE_DIR": CODE_DIR,
            "FANOUT_GIT_COMMIT": spec.code.commit,
            "FANOUT_GIT_REF": self.ref(spec),
            "HOME": CODE_MOUNT,
        }
        volumes: list[dict[str, Any]] = [{"name": "code", "emptyDir": {}}]
        fetch_mounts = [{"name": "code", "mountPath": CODE_MOUNT}]
        if bundled:
            volumes.append({"name": "bundle", "configMap": {"name": f"{spec.name}-code"}})
            fetch_mounts.append({"name": "bundle", "mountPath": BUNDLE_MOUNT, "readOnly": True})
            fetch_env["FANOUT_GIT_BUNDLE"] = f"{BUNDLE_MOUNT}/{BUNDLE_KEY}"
        else:
            fetch_env["FANOUT_GIT_URL"] = self._git_url(spec) or ""
        mounts = [{"name": "code", "mountPath": CODE_MOUNT}]
        claim = self._data_claim(spec)
        if claim is not None and spec.data is not None:
            # Read-only for every candidate; writable only for a job that asks (the data's prep job).
            read_only = spec.data.read_only
            claim_ref = {"claimName": claim, "readOnly": read_only}
            volumes.append({"name": "data", "persistentVolumeClaim": claim_ref})
            mount = {"name": "data", "mountPath": spec.data.path, "readOnly": read_only}
            if self.opts.data_sub_path:
                mount["subPath"] = self.opts.data_sub_path
            mounts.append(mount)
        requests: dict[str, str] = {}
        limits: dict[str, str] = {}
        if spec.resources.gpus:
            limits[self.opts.gpu_resource] = str(spec.resources.gpus)
        if spec.resources.cpu:
            requests["cpu"] = f"{spec.resources.cpu:g}"
        if spec.resources.memory_gb:
            requests["memory"] = limits["memory"] = f"{math.ceil(spec.resources.memory_gb * 1024)}Mi"
        trainer: dict[str, Any] = {
            "name": TRAINER,
            "image": self.opts.image,
            "env": [{"name": k, "value": v} for k, v in env.items()],
            "volumeMounts": mounts,
            "terminationMessagePath": TERMINATION_LOG,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": {"allowPrivilegeEscalation": False},
        }
        if requests or limits:
            trainer["resources"] = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}
        if self.opts.log_grace_s:
            trainer["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", str(self.opts.log_grace_s)]}}}
        fetch: dict[str, Any] = {
            "name": FETCH,
            "image": self.opts.image,
            "command": ["/bin/sh", "-c", FETCH_SCRIPT],
            "env": [{"name": k, "value": v} for k, v in fetch_env.items()],
            "volumeMounts": fetch_mounts,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": {"allowPrivilegeEscalation": False},
        }
        if self.opts.image_pull_policy:
            trainer["imagePullPolicy"] = fetch["imagePullPolicy"] = self.opts.image_pull_policy
        pod: dict[str, Any] = {
            "restartPolicy": "Never",
            "initContainers": [fetch],
            "containers": [trainer],
            "volumes": volumes,
            "automountServiceAccountToken": False,  # candidate code gets no API credentials
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": self.opts.termination_grace_s + self.opts.log_grace_s,
        }
        node_selector = dict(self.opts.node_selector)
        if spec.resources.gpus:
            if spec.resources.gpu_type:
                node_selector[self.opts.gpu_type_label] = spec.resources.gpu_type
            if self.opts.tolerations:
                pod["tolerations"] = list(self.opts.tolerations)
        if node_selector:
            pod["nodeSelector"] = node_selector
        if self.opts.service_account:
            pod["serviceAccountName"] = self.opts.service_account
        if self.opts.priority_class:
            pod["priorityClassName"] = self.opts.priority_class
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": spec.name,
                "namespace": self.namespace,
                "labels": dict(labels),
                "annotations": {
                    SPEC_ANNOTATION: spec.model_dump_json(),
                    DIGEST_ANNOTATION: spec.digest(),
                },
            },
            "spec": {
                "backoffLimit": self.opts.backoff_limit,
                "activeDeadlineSeconds": max(1, math.ceil(spec.time_limit_s + self.opts.startup_slack_s)),
                "ttlSecondsAfterFinished": self.opts.ttl_seconds_after_finished,
                "podFailurePolicy": {
                    "rules": [
                        {
                            "action": "Ignore",
                            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                        },
                        {
                            "action": "FailJob",
                            "onExitCodes": {"containerName": TRAINER, "operator": "NotIn", "values": [0]},
                        },
                        {
                            "action": "FailJob",
                            "onExitCodes": {"containerName": FETCH, "operator": "In", "values": [SETUP_EXIT]},
                        },
                    ]
                },
                "template": {"metadata": {"labels": dict(labels)}, "spec": pod},
            },
        }

    def bundle_configmap(self, spec: JobSpec, bundle: bytes, job: dict[str, Any] | None) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": f"{spec.name}-code",
            "namespace": self.namespace,
            "labels": self.labels(spec),
        }
        if job is not None:  # owned by the Job: the garbage collector deletes it with the Job
            meta["ownerReferences"] = [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": spec.name,
                    "uid": job["metadata"]["uid"],
                    "controller": False,
                    "blockOwnerDeletion": False,
                }
            ]
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta,
            "binaryData": {BUNDLE_KEY: base64.b64encode(bundle).decode()},
        }

    def _bundle(self, spec: JobSpec) -> bytes:
        """``git bundle create`` of the commit (under its job ref), refused above what fits."""
        repo = self._repo(spec)
        ref = self.ref(spec)
        root = repo.working_tree_dir
        subprocess.run(
            ["git", "-C", root, "update-ref", ref, spec.code.commit], check=True, capture_output=True
        )
        with tempfile.TemporaryDirectory(prefix="fanout-bundle-") as tmp:
            path = Path(tmp) / BUNDLE_KEY
            done = subprocess.run(
                ["git", "-C", root, "bundle", "create", "-q", str(path), ref], capture_output=True, text=True
            )
            if done.returncode != 0:
                raise JobSpecError(
                    f"git bundle create failed for {spec.code.commit[:12]}: "
                    f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}"
                )
            data = path.read_bytes()
        if len(data) > MAX_BUNDLE_BYTES:
            raise JobSpecError(
                f"the git bundle of commit {spec.code.commit[:12]} is {len(data) // 1024} KiB, more than "
                f"the {MAX_BUNDLE_BYTES // 1024} KiB a ConfigMap can carry; set [backend.kubernetes] git_url "
                "to a remote the cluster can clone from"
            )
        return data

    def _repo(self, spec: JobSpec) -> Any:
        return gitrepo.repo_holding(spec.code.repo, spec.code.commit, "set [backend.kubernetes] git_url")

    def _push(self, specs: Sequence[JobSpec]) -> None:
        """One ``git push`` for a round: each commit as ``refs/fanout/<study>/<job>`` on the remote."""
        by_repo: dict[str, list[JobSpec]] = {}
        for spec in specs:
            by_repo.setdefault(spec.code.repo, []).append(spec)
        target = self.opts.push_url or self.opts.git_url or ""
        for repo_path, group in by_repo.items():
            root = self._repo(group[0]).working_tree_dir
            refspecs = [f"{s.code.commit}:{self.ref(s)}" for s in group]
            done = subprocess.run(
                ["git", "-C", root, "push", "-q", "-f", target, *refspecs], capture_output=True, text=True
            )
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["?"])[-1]
                raise JobSpecError(f"cannot push {len(group)} commit(s) from {repo_path} to {target}: {last}")

    # -- submit ----------------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> str:
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Sequence[JobSpec]) -> list[str]:
        """Check every spec and build every manifest before creating anything; push the round's
        commits in one ``git push``; then create the Jobs (a 409 is adopted when the spec matches)."""
        fresh: list[tuple[JobSpec, dict[str, Any], bytes | None]] = []
        for spec in specs:
            record = self._record(spec.name)
            if record is not None:
                if record["digest"] != spec.digest():
                    raise JobSpecError(
                        f"a different job named {spec.name!r} already exists in study {self.study.name!r}"
                    )
                continue
            bundle = None if self._git_url(spec) else self._bundle(spec)
            fresh.append((spec, self.manifest(spec, bundled=bundle is not None), bundle))
        to_push = [
            spec for spec, _, bundle in fresh if bundle is None and self.opts.git_url and self.opts.push
        ]
        if to_push:
            self._push(to_push)
        for spec, manifest, bundle in fresh:
            job = self._create_or_adopt(spec, manifest)
            if bundle is not None:
                self._create_bundle(spec, bundle, job)
            self._write_record(spec.name, {**_new_record(spec, job), "submitted_at": _now(), "final": None})
        return [spec.name for spec in specs]

    def _create_or_adopt(self, spec: JobSpec, manifest: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self._call(
                "create",
                "jobs",
                self.batch.create_namespaced_job,
                self.namespace,
                manifest,
                _preload_content=False,
            )
            return self._json(response)
        except ApiException as exc:
            if exc.status == 404:
                raise BackendError(
                    f"kubernetes: namespace {self.namespace!r} does not exist "
                    "(kubectl apply -k backends/kubernetes)"
                ) from None
            if exc.status != 409:
                raise self._error("create", "jobs", exc) from None
        existing = self._read_job(spec.name)  # 409: it exists (maybe our own retried create)
        if existing is None:
            raise BackendError(f"kubernetes: job {spec.name!r} exists and vanished; submit it again")
        meta = existing["metadata"]
        ours = (meta.get("labels") or {}).get(STUDY_LABEL) == label_value(self.study.name)
        if not ours or (meta.get("annotations") or {}).get(DIGEST_ANNOTATION) != spec.digest():
            raise JobSpecError(
                f"a different job named {spec.name!r} already exists in namespace "
                f"{self.namespace!r}" + ("" if ours else " (not one of this study's)")
            )
        return existing

    def _create_bundle(self, spec: JobSpec, bundle: bytes, job: dict[str, Any]) -> None:
        try:
            self._call(
                "create",
                "configmaps",
                self.core.create_namespaced_config_map,
                self.namespace,
                self.bundle_configmap(spec, bundle, job),
                _preload_content=False,
            )
        except ApiException as exc:
            if exc.status != 409:
                self._delete_job(spec.name)  # a Job whose code never comes would wait forever
                raise self._error("create", "configmaps", exc) from None
        except BackendError:
            with contextlib.suppress(BackendError, ApiException):
                self._delete_job(spec.name)
            raise

    # -- status, result, logs --------------------------------------------------------------------
    def status(self, slugs: Sequence[str]) -> dict[str, JobState]:
        wanted = list(dict.fromkeys(slugs))
        records = {slug: self._record(slug) for slug in wanted}
        open_slugs = [s for s in wanted if not (records[s] and records[s].get("final"))]
        jobs: dict[str, dict[str, Any]] = {}
        if open_slugs:
            jobs = {job["metadata"]["name"]: job for job in self._list_jobs()}  # the one call per poll
        unknown = [s for s in wanted if records[s] is None and s not in jobs]
        if unknown:
            raise UnknownJobError(unknown)
        settled = [s for s in open_slugs if s in jobs and final_condition(jobs[s]) is not None]
        if settled:
            self._finalize({s: jobs[s] for s in settled}, records)
        for slug in open_slugs:
            if slug not in jobs and slug not in settled:
                self._mark_gone(slug, records[slug] or {})
            records[slug] = self._record(slug) or records[slug]
        out: dict[str, JobState] = {}
        for slug in wanted:
            record = records[slug] or {}
            if record.get("final"):
                final = record["final"]
                out[slug] = JobState(
                    phase=Phase(final["phase"]),
                    raw=final.get("raw") or final["phase"],
                    started_at=_when(final.get("started_at")),
                )
            else:
                out[slug] = self._live_state(jobs[slug])
        return out

    @staticmethod
    def _live_state(job: dict[str, Any]) -> JobState:
        status = job.get("status") or {}
        started = _when(status.get("startTime"))
        if (job.get("spec") or {}).get("suspend"):
            return JobState(phase=Phase.PENDING, raw="suspended")
        if status.get("ready"):
            return JobState(phase=Phase.RUNNING, raw=f"running (ready={status['ready']})", started_at=started)
        failed = f", {status['failed']} failed" if status.get("failed") else ""
        return JobState(
            phase=Phase.PENDING, raw=f"pending (active={status.get('active', 0)}{failed})", started_at=started
        )

    def _mark_gone(self, slug: str, record: dict[str, Any]) -> None:
        reason = (
            "lost: the Job is gone from the cluster (deleted outside fanout, or by its TTL before "
            "its result was read)"
        )
        result = JobResult(
            slug=slug,
            name=slug,
            phase=Phase.LOST,
            failure=Failure.LOST,
            reason=reason,
            submitted_at=_from_epoch(record.get("submitted_at")),
            ended_at=datetime.now(UTC),
        )
        self._write_record(slug, {**record, "final": {**json.loads(result.model_dump_json()), "raw": "gone"}})

    def _finalize(self, jobs: dict[str, dict[str, Any]], records: dict[str, dict[str, Any] | None]) -> None:
        """Read and keep the results of Jobs that reached a final condition: one pod LIST for all of
        them, one log read each. Their pods may be about to go (deadline, TTL)."""
        uids = {job["metadata"]["uid"]: slug for slug, job in jobs.items()}
        pods = self._list_pods(f"{JOB_UID_LABEL} in ({','.join(sorted(uids))})")
        by_job: dict[str, list[dict[str, Any]]] = {}
        for pod in pods:
            slug = uids.get(pod["metadata"].get("labels", {}).get(JOB_UID_LABEL, ""))
            if slug:
                by_job.setdefault(slug, []).append(pod)
        for slug, job in jobs.items():
            spec = self._spec_of(job, records.get(slug))
            pod = _latest_pod(by_job.get(slug, []))
            result, log = self._result_from(slug, job, pod, spec)
            record = dict(records.get(slug) or _new_record(spec, job))
            record["final"] = {**json.loads(result.model_dump_json()), "raw": final_condition(job)["type"]}
            self._write_record(slug, record, log)

    @staticmethod
    def _spec_of(job: dict[str, Any], record: dict[str, Any] | None) -> JobSpec:
        if record and record.get("spec"):
            return JobSpec.model_validate(record["spec"])
        return JobSpec.model_validate_json(job["metadata"]["annotations"][SPEC_ANNOTATION])

    def _result_from(
        self, slug: str, job: dict[str, Any], pod: dict[str, Any] | None, spec: JobSpec
    ) -> tuple[JobResult, str]:
        cond = final_condition(job) or {}
        status = job.get("status") or {}
        trainer = _container_state(pod, "containerStatuses", TRAINER)
        fetch = _container_state(pod, "initContainerStatuses", FETCH)
        ran = pod is not None and (trainer.get("terminated") or trainer.get("running"))
        log = self._read_log(pod, TRAINER) if ran and pod is not None else ""
        terminated = trainer.get("terminated") or {}
        message = terminated.get("message") or ""
        metrics = parse_metrics(log or message)
        metrics.update(parse_result_line(message) or {})  # the termination message survives lost logs
        tail = last_lines(log or message, LOG_TAIL_LINES)
        exit_code = terminated.get("exitCode")
        if exit_code is None and pod is None:  # the pod is gone; the FailJob message still names the code
            found = re.search(
                rf"Container {TRAINER} for pod \S+ failed with exit code (\d+)", cond.get("message", "")
            )
            exit_code = int(found.group(1)) if found else None
        started = _when(
            terminated.get("startedAt")
            or (trainer.get("running") or {}).get("startedAt")
            or status.get("startTime")
        )
        ended = _when(
            terminated.get("finishedAt") or status.get("completionTime") or cond.get("lastTransitionTime")
        ) or datetime.now(UTC)
        failure: Failure | None
        if cond.get("reason") == "DeadlineExceeded":
            phase, failure = Phase.TIMED_OUT, Failure.TIMED_OUT
            reason = f"timed out: {cond.get('message', '')} ({job['spec'].get('activeDeadlineSeconds')} s)"
        elif cond.get("type") in ("Complete", "SuccessCriteriaMet"):
            exit_code = 0 if exit_code is None else exit_code
            phase, failure, reason = classify_exit(0, metrics, tail, spec.requires_metric)
        elif (fetch.get("terminated") or {}).get("exitCode"):
            fetch_log = self._read_log(pod, FETCH, tail=LOG_TAIL_LINES) if pod else ""
            fetch_log = fetch_log or fetch["terminated"].get("message", "")
            phase, failure = Phase.FAILED, Failure.SETUP
            reason = f"could not fetch the code: {last_lines(fetch_log, 1) or cond.get('message', '')}"
            tail = last_lines(fetch_log, LOG_TAIL_LINES)
        elif terminated.get("reason") == "OOMKilled":
            phase, failure, reason = (
                Phase.FAILED,
                Failure.OUT_OF_MEMORY,
                f"out of memory (exit code {exit_code})",
            )
        elif exit_code not in (None, 0):
            phase, failure, reason = classify_exit(exit_code, metrics, tail, spec.requires_metric)
        else:
            phase, failure = Phase.FAILED, Failure.CRASH if pod is not None else Failure.LOST
            reason = f"{cond.get('reason', 'Failed')}: {cond.get('message', '')}"
        result = JobResult(
            slug=slug,
            name=slug,
            phase=phase,
            metrics=Metrics.lenient(metrics),
            exit_code=exit_code,
            failure=failure,
            reason=reason,
            log_tail=tail,
            submitted_at=_when(job["metadata"].get("creationTimestamp")),
            started_at=started,
            ended_at=max(ended, started) if started else ended,
        )
        return result, log

    def result(self, slug: str) -> JobResult:
        state = self.status([slug])[slug]
        record = self._record(slug) or {}
        if record.get("final"):
            final = dict(record["final"])
            final.pop("raw", None)
            return JobResult.model_validate(final)
        return JobResult(
            slug=slug,
            name=slug,
            phase=state.phase,
            reason=state.raw,
            started_at=state.started_at,
            submitted_at=_from_epoch(record.get("submitted_at")),
        )

    def logs(self, slug: str, tail: int | None = None) -> str:
        record = self._record(slug)
        if record and record.get("final"):
            path = self.records / f"{slug}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            text = text or record["final"].get("log_tail", "")
        else:
            pods = self._list_pods(f"{JOB_NAME_LABEL}={slug},{STUDY_LABEL}={label_value(self.study.name)}")
            if not pods and record is None:
                if self._read_job(slug) is None:
                    raise UnknownJobError(slug)
                return ""
            pod = _latest_pod(pods)
            text = self._read_log(pod, TRAINER, tail=tail) if pod else ""
        return last_lines(text, tail) if tail is not None else text

    # -- cancel, reap ----------------------------------------------------------------------------
    def cancel(self, slug: str) -> None:
        """Delete the Job (background propagation) after keeping its log; a finished Job is left
        alone. The record says ``cancelled`` from then on, since a deleted Job cannot be listed."""
        record = self._record(slug)
        if record and record.get("final"):
            return
        job = self._read_job(slug)
        if job is None:
            if record is None:
                raise UnknownJobError(slug)
            self.status([slug])  # gone already: the status call records how
            return
        if final_condition(job) is not None:
            self._finalize({slug: job}, {slug: record})
            return
        pods = self._list_pods(f"{JOB_UID_LABEL}={job['metadata']['uid']}")
        pod = _latest_pod(pods)
        log = (
            self._read_log(pod, TRAINER)
            if pod and _container_state(pod, "containerStatuses", TRAINER).get("running")
            else ""
        )
        self._delete_job(slug)
        self._record_cancelled(slug, job, record, reason="cancelled", raw="deleted", log=log,
                               started_at=self._live_state(job).started_at)

    def _record_cancelled(self, slug: str, job: dict[str, Any], record: dict[str, Any] | None, *,
                          reason: str, raw: str, log: str | None = None,
                          started_at: datetime | None = None) -> None:
        """Keep the final word on a Job we deleted before it finished: once deleted it cannot be
        listed, so this record is what status and result read from then on."""
        result = JobResult(
            slug=slug, name=slug, phase=Phase.CANCELLED, failure=Failure.CANCELLED, reason=reason,
            log_tail=last_lines(log or "", LOG_TAIL_LINES),
            submitted_at=_when(job["metadata"].get("creationTimestamp")), started_at=started_at,
            ended_at=datetime.now(UTC),
        )
        base = record or _new_record(self._spec_of(job, record), job)
        self._write_record(slug, {**base, "final": {**json.loads(result.model_dump_json()), "raw": raw}}, log)

    def reap(self) -> list[str]:
        """Delete every Job of this study (label ``fanout.io/study``), background propagation. The
        results of finished Jobs are kept first; unfinished ones are recorded as cancelled."""
        jobs = {job["metadata"]["name"]: job for job in self._list_jobs()}
        records = {slug: self._record(slug) for slug in jobs}
        settled = {
            s: j
            for s, j in jobs.items()
            if final_condition(j) is not None and not (records[s] or {}).get("final")
        }
        if settled:
            self._finalize(settled, records)
        for slug, job in jobs.items():
            self._delete_job(slug)
            record = self._record(slug)
            if record is None or not record.get("final"):
                self._record_cancelled(slug, job, record, reason="cancelled: reaped", raw="reaped")
        return sorted(jobs)


def _new_record(spec: JobSpec, job: dict[str, Any]) -> dict[str, Any]:
    """What the backend keeps of a Job: the spec it ran, its digest, and the Job's uid."""
    return {"spec": json.loads(spec.model_dump_json()), "digest": spec.digest(),
            "uid": job["metadata"]["uid"]}


def _from_epoch(epoch: float | None) -> datetime | None:
    return datetime.fromtimestamp(epoch, UTC) if epoch else None


def _container_state(pod: dict[str, Any] | None, field: str, name: str) -> dict[str, Any]:
    for status in ((pod or {}).get("status") or {}).get(field) or []:
        if status.get("name") == name:
            return status.get("state") or {}
    return {}


def _latest_pod(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The pod whose outcome is the Job's: not a disrupted or deleted one if another exists, else
    the newest (creation timestamps have one-second resolution)."""

    def key(pod: dict[str, Any]) -> tuple[bool, bool, str, str]:
        status = pod.get("status") or {}
        disrupted = any(
            c.get("type") == "DisruptionTarget" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        return (
            not disrupted,
            "deletionTimestamp" not in pod["metadata"],
            pod["metadata"].get("creationTimestamp", ""),
            status.get("startTime") or "",
        )

    return max(pods, key=key) if pods else None


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)
