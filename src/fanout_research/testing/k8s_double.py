"""A small Kubernetes API server double, plus a pod runner that plays the Job controller and kubelet.

Why not a mock: the Kubernetes backend must be tested through the real ``kubernetes`` client over
real HTTP, so that URL building, query parameters, serialisation, error statuses and retries are the
client's own. Why not kmock (PyPI): it stores and serves objects well, but nothing in it makes a Job
*run*; the controller and kubelet below are most of the work either way, and kmock would add an
asyncio/aiohttp server to a thread-based test suite.

What it serves (JSON shapes and status codes as the real API server returns them):

- ``batch/v1`` Jobs: create (201; 409 AlreadyExists; 422 Invalid for what the real validation
  rejects and this double checks), get, list with label selectors, delete with
  ``propagationPolicy`` (Background, Foreground, and Orphan, the API default for Jobs);
- ``v1`` Pods: get, list with label selectors, delete (graceful), ``pods/log`` (``container``,
  ``tailLines``, ``limitBytes``; 400 while the container is still waiting), ``pods/eviction``
  (policy/v1, adds the ``DisruptionTarget`` condition as the real eviction API does);
- ``v1`` ConfigMaps: create, get, list, delete (owner references honoured by the garbage collector);
- 401 without the kubeconfig's bearer token; 403 ``Forbidden`` for denied (verb, resource) pairs,
  worded as RBAC words it; 404 for a namespace that does not exist;
- fault injection: 429 with ``Retry-After``, 5xx, and connection resets (before or after the
  request took effect), matched by method and path, consumed in order.

What the pod runner does, once per tick (``tick_s``):

- Job controller: sets ``startTime``; creates one pod at a time (``podReplacementPolicy: Failed``,
  the default with a pod failure policy) with exponential back-off between failures; evaluates
  ``podFailurePolicy`` rules in order with the real matching rules (only non-zero exit codes count,
  init containers included; pod conditions by type and status); counts toward ``backoffLimit``;
  enforces ``activeDeadlineSeconds`` from ``startTime``; adds ``SuccessCriteriaMet`` /
  ``FailureTarget`` first, terminates the remaining pods, and only then ``Complete`` / ``Failed``
  (the order Kubernetes >= 1.31 uses); ``ttlSecondsAfterFinished``; job-tracking finalizers.
- kubelet: "schedules" a pod when its PVCs exist, its node selector matches and enough
  ``nvidia.com/gpu`` is free; waits for ConfigMap volumes; runs init containers in order, then the
  containers, each as a local process with the pod's environment (never this process's), in a
  per-pod directory that stands in for each volume; mount paths in ``env``, ``args`` and
  ``workingDir`` are rewritten to those directories (no mount namespaces here); writes each
  container's log; reads ``terminationMessagePath`` (4096 bytes; ``FallbackToLogsOnError`` falls
  back to the last 80 lines / 2048 bytes of the log); graceful deletion runs ``preStop`` exec
  hooks, then SIGTERM to the process group, then SIGKILL after the grace period.
- garbage collector: dependents of a deleted owner are deleted (pods gracefully).

An :class:`Image` says what an image name means locally: its entrypoint and environment (the
Dockerfile's ``ENTRYPOINT`` and ``ENV``). Read-only mounts are not enforced (no mount namespaces).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

JOB_TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"
GPU_RESOURCE = "nvidia.com/gpu"
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def rfc3339(epoch: float | None = None) -> str:
    """metav1.Time: RFC 3339 at second precision, UTC."""
    moment = datetime.fromtimestamp(time.time() if epoch is None else epoch, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- label selectors ---------------------------------------------------------------------------
def _split_selector(text: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        terms.append(current.strip())
    return terms


def parse_selector(text: str | None) -> Callable[[dict[str, str]], bool]:
    """Equality- and set-based label selectors, as ``labels.Parse`` reads them. Raises ValueError."""
    checks: list[Callable[[dict[str, str]], bool]] = []
    for term in _split_selector(text or ""):
        if match := re.fullmatch(r"([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)", term):
            key, op, values = match.group(1), match.group(2), {v.strip() for v in match.group(3).split(",")}
            if op == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif match := re.fullmatch(r"([^\s!=]+)\s*(==|=|!=)\s*([^\s,]*)", term):
            key, op, value = match.groups()
            if op == "!=":
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif match := re.fullmatch(r"!\s*([^\s!=]+)", term):
            absent = match.group(1)
            checks.append(lambda labels, k=absent: k not in labels)
        elif re.fullmatch(r"[^\s!=(),]+", term):
            checks.append(lambda labels, k=term: k in labels)
        else:
            raise ValueError(f"unable to parse requirement: {term!r}")
    return lambda labels: all(check(labels) for check in checks)


# -- faults, images ----------------------------------------------------------------------------
@dataclass
class Fault:
    """One injected failure. ``action``: ``status`` (answer ``code``), ``reset`` (drop the connection
    before acting) or ``reset_after`` (act on the request, then drop the connection unanswered)."""

    method: str | None = None
    path: str | None = None  # a regular expression searched in the URL path
    action: str = "status"
    code: int = 500
    retry_after: float | None = None
    times: int = 1

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path is None or re.search(self.path, path) is not None
        )


@dataclass
class Image:
    """What an image name means to the pod runner: the Dockerfile's ENTRYPOINT, CMD and ENV."""

    entrypoint: list[str]
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class RequestRecord:
    method: str
    path: str
    query: str
    status: int
    at: float


class _ApiError(Exception):
    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details = details or {}
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            status["details"] = self.details
        return status


_RESOURCES = {  # plural -> (group, version, kind)
    "jobs": ("batch", "v1", "Job"),
    "pods": ("", "v1", "Pod"),
    "configmaps": ("", "v1", "ConfigMap"),
}


# -- the process side of a pod -----------------------------------------------------------------
@dataclass
class _Proc:
    popen: subprocess.Popen[bytes]
    container: str
    started: float
    log: Path
    term_file: Path
    term_policy: str


@dataclass
class _PodRun:
    root: Path
    stage: str = "scheduling"  # scheduling, init, running, done
    init_index: int = 0
    procs: dict[str, _Proc] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    prestop: list[subprocess.Popen[bytes]] = field(default_factory=list)
    term_sent: float | None = None
    killed: bool = False


class K8sApiDouble:
    """The API server (a thread serving HTTP on 127.0.0.1) and the pod runner (a thread ticking)."""

    def __init__(
        self,
        *,
        namespaces: tuple[str, ...] = ("default",),
        images: dict[str, Image] | None = None,
        pvcs: dict[str, Path] | None = None,
        gpus: int = 64,
        node_labels: dict[str, str] | None = None,
        token: str = "double-token",
        user: str = "system:serviceaccount:fanout:fanout-runner",
        tick_s: float = 0.02,
        backoff_base_s: float = 0.05,
        workdir: Path | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self.namespaces = set(namespaces)
        self.images = dict(images or {})
        self.pvcs = dict(pvcs or {})
        self.gpus = gpus
        self.node_labels = dict(node_labels or {})
        self.token, self.user = token, user
        self.tick_s, self.backoff_base_s = tick_s, backoff_base_s
        self.store: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in _RESOURCES}
        self.requests: list[RequestRecord] = []
        self.faults: list[Fault] = []
        self.denied: set[tuple[str, str]] = set()
        self._runs: dict[str, _PodRun] = {}  # pod uid -> its processes
        self._next_attempt: dict[str, float] = {}  # job uid -> earliest time for its next pod
        self._rv = itertools.count(1000)
        self._tmp = Path(tempfile.mkdtemp(prefix="k8s-double-", dir=workdir))
        self._stop = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self._threads = [
            threading.Thread(target=self.server.serve_forever, name="k8s-double-api", daemon=True),
            threading.Thread(target=self._run_loop, name="k8s-double-runner", daemon=True),
        ]

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> K8sApiDouble:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        with self.lock:
            for run in self._runs.values():
                for proc in run.procs.values():
                    _kill_group(proc.popen, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.popen.wait(timeout=5)
                for hook in run.prestop:
                    _kill_group(hook, signal.SIGKILL)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> K8sApiDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def write_kubeconfig(self, path: Path, context: str = "double", namespace: str = "default") -> Path:
        """A kubeconfig whose context points at this double with its bearer token."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": context,
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "double-user", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": context,
                    "context": {"cluster": "double", "user": "double-user", "namespace": namespace},
                }
            ],
        }
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        return path

    # -- test-side controls --------------------------------------------------------------------
    def inject(self, *faults: Fault) -> None:
        with self.lock:
            self.faults.extend(faults)

    def deny(self, verb: str, resource: str) -> None:
        with self.lock:
            self.denied.add((verb, resource))

    def reset_requests(self) -> None:
        with self.lock:
            self.requests.clear()

    def count(self, method: str | None = None, path_re: str | None = None) -> int:
        with self.lock:
            return sum(
                1
                for r in self.requests
                if (method is None or r.method == method) and (path_re is None or re.search(path_re, r.path))
            )

    def objects(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [
                json.loads(json.dumps(obj))
                for (ns, _), obj in self.store[resource].items()
                if namespace is None or ns == namespace
            ]

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            obj = self.store[resource].get((namespace, name))
            return json.loads(json.dumps(obj)) if obj else None

    def pods_of(self, namespace: str, job: str) -> list[dict[str, Any]]:
        return [
            p
            for p in self.objects("pods", namespace)
            if p["metadata"]["labels"].get("batch.kubernetes.io/job-name") == job
        ]

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            time.sleep(self.tick_s)

    # -- HTTP dispatch -------------------------------------------------------------------------
    def handle(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes, str | None]:
        """Returns (status, headers, body, fault) where fault is None, 'reset' or 'reset_after'."""
        parts = urlsplit(raw_path)
        path, query = parts.path, parse_qs(parts.query)
        fault = self._take_fault(method, path)
        if fault is not None and fault.action == "reset":
            self._record(method, parts, 0)
            return 0, {}, b"", "reset"
        try:
            if fault is not None and fault.action == "status":
                extra = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
                reason = {429: "TooManyRequests", 503: "ServiceUnavailable"}.get(fault.code, "InternalError")
                raise _ApiError(fault.code, reason, f"injected fault: {fault.code}", headers=extra)
            if headers.get("authorization") != f"Bearer {self.token}":
                raise _ApiError(401, "Unauthorized", "Unauthorized")
            code, payload = self._route(method, path, query, body)
            out_headers = {"Content-Type": "application/json"}
            if isinstance(payload, str):
                data, out_headers["Content-Type"] = payload.encode(), "text/plain"
            else:
                data = json.dumps(payload).encode()
        except _ApiError as err:
            code, data = err.code, json.dumps(err.body()).encode()
            out_headers = {"Content-Type": "application/json", **err.headers}
        self._record(method, parts, 0 if fault is not None and fault.action == "reset_after" else code)
        return code, out_headers, data, fault.action if fault is not None else None

    def _record(self, method: str, parts: Any, code: int) -> None:
        with self.lock:
            self.requests.append(RequestRecord(method, parts.path, parts.query, code, time.time()))

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                    return fault
        return None

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> tuple[int, Any]:
        match = re.fullmatch(
            r"/(?:api/v1|apis/(batch)/v1)/namespaces/([^/]+)/([a-z]+)(?:/([^/]+))?(?:/([a-z]+))?", path
        )
        if not match:
            if path in ("/version", "/version/"):
                return 200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0-double"}
            raise _ApiError(404, "NotFound", "the server could not find the requested resource")
        group, namespace, resource, name, sub = match.groups()
        expected_group = _RESOURCES.get(resource, ("?",))[0]
        if resource not in _RESOURCES or (group or "") != expected_group:
            raise _ApiError(404, "NotFound", "the server could not find the requested resource")
        verb = {
            "GET": "get" if name else ("watch" if _q(query, "watch") == "true" else "list"),
            "POST": "create",
            "DELETE": "delete" if name else "deletecollection",
            "PUT": "update",
            "PATCH": "patch",
        }.get(method, method.lower())
        if sub == "log" and method == "GET":
            verb = "get"
        if sub == "eviction" and method == "POST":
            verb = "create"
        rbac_resource = f"{resource}/{sub}" if sub else resource
        if (verb, rbac_resource) in self.denied:
            subject = f'{resource}.{group} "{name}"' if group else f'{resource} "{name}"'
            if not name:
                subject = f"{resource}.{group}" if group else resource
            raise _ApiError(
                403,
                "Forbidden",
                f'{subject} is forbidden: User "{self.user}" cannot {verb} resource "{rbac_resource}" '
                f'in API group "{group or ""}" in the namespace "{namespace}"',
                {"name": name or "", "group": group or "", "kind": resource},
            )
        if namespace not in self.namespaces:
            raise _ApiError(
                404,
                "NotFound",
                f'namespaces "{namespace}" not found',
                {"name": namespace, "kind": "namespaces"},
            )
        payload = json.loads(body) if body else {}
        with self.lock:
            if sub == "log" and resource == "pods" and method == "GET":
                return 200, self._pod_log(namespace, name, query)
            if sub == "eviction" and resource == "pods" and method == "POST":
                return self._evict(namespace, name)
            if sub:
                raise _ApiError(404, "NotFound", "the server could not find the requested resource")
            if method == "POST" and not name:
                return 201, self._create(resource, namespace, payload)
            if method == "GET" and name:
                return 200, self._get_or_404(resource, namespace, name)
            if method == "GET":
                return 200, self._list(resource, namespace, query)
            if method == "DELETE" and name:
                return 200, self._delete(resource, namespace, name, query, payload)
        raise _ApiError(405, "MethodNotAllowed", f"{method} is not supported on {path} by this double")

    # -- the store -----------------------------------------------------------------------------
    def _get_or_404(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        obj = self.store[resource].get((namespace, name))
        if obj is None:
            group = _RESOURCES[resource][0]
            what = f"{resource}.{group}" if group else resource
            raise _ApiError(
                404,
                "NotFound",
                f'{what} "{name}" not found',
                {"name": name, "group": group, "kind": resource},
            )
        return obj

    def _list(self, resource: str, namespace: str, query: dict[str, list[str]]) -> dict[str, Any]:
        try:
            selector = parse_selector(_q(query, "labelSelector"))
        except ValueError as exc:
            raise _ApiError(400, "BadRequest", f"unable to parse requirement: {exc}") from None
        group, version, kind = _RESOURCES[resource]
        items = [
            obj
            for (ns, _), obj in sorted(self.store[resource].items())
            if ns == namespace and selector(obj["metadata"].get("labels") or {})
        ]
        return {
            "kind": f"{kind}List",
            "apiVersion": f"{group}/{version}" if group else version,
            "metadata": {"resourceVersion": str(next(self._rv))},
            "items": items,
        }

    def _meta(self, obj: dict[str, Any], namespace: str) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        meta.update(
            namespace=namespace,
            uid=str(uuid.uuid4()),
            resourceVersion=str(next(self._rv)),
            creationTimestamp=rfc3339(),
            generation=1,
        )
        return meta

    def _create(self, resource: str, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        group, version, kind = _RESOURCES[resource]
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not name:
            raise _ApiError(
                422,
                "Invalid",
                f'{kind} in version "{version}" cannot be handled: '
                "metadata.name: Required value: name is required",
            )
        if (namespace, name) in self.store[resource]:
            what = f"{resource}.{group}" if group else resource
            raise _ApiError(
                409,
                "AlreadyExists",
                f'{what} "{name}" already exists',
                {"name": name, "group": group, "kind": resource},
            )
        if resource == "jobs":
            self._validate_job(obj)
        if resource == "configmaps":
            _validate_configmap_size(name, obj)
        _validate_labels(kind, name, meta.get("labels") or {})
        obj = json.loads(json.dumps(obj))
        obj["apiVersion"], obj["kind"] = (f"{group}/{version}" if group else version), kind
        meta = self._meta(obj, namespace)
        if resource == "jobs":
            self._default_job(obj)
        self.store[resource][(namespace, name)] = obj
        return obj

    def _validate_job(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        problems = []
        if not _NAME_RE.match(name) or len(name) > 63:
            problems.append(
                f"metadata.name: Invalid value: {name!r}: must be a DNS-1123 label of at most "
                "63 characters (it becomes a label value)"
            )
        spec = job.get("spec") or {}
        pod = (spec.get("template") or {}).get("spec") or {}
        policy = pod.get("restartPolicy")
        if policy not in ("Never", "OnFailure"):
            problems.append(
                f'spec.template.spec.restartPolicy: Unsupported value: "{policy}": '
                'supported values: "OnFailure", "Never"'
            )
        if spec.get("podFailurePolicy") and policy != "Never":
            problems.append(
                'spec.template.spec.restartPolicy: Invalid value: only "Never" is supported '
                "when podFailurePolicy is specified"
            )
        if not pod.get("containers"):
            problems.append("spec.template.spec.containers: Required value")
        deadline = spec.get("activeDeadlineSeconds")
        if deadline is not None and (not isinstance(deadline, int) or deadline <= 0):
            problems.append(f"spec.activeDeadlineSeconds: Invalid value: {deadline}: must be greater than 0")
        if spec.get("selector") and not spec.get("manualSelector"):
            problems.append("spec.selector: Invalid value: `selector` will be auto-generated")
        if problems:
            raise _ApiError(
                422,
                "Invalid",
                f'Job.batch "{name}" is invalid: ' + ", ".join(problems),
                {"name": name, "group": "batch", "kind": "Job"},
            )

    @staticmethod
    def _default_job(job: dict[str, Any]) -> None:
        spec, meta = job["spec"], job["metadata"]
        uid = meta["uid"]
        spec.setdefault("parallelism", 1)
        spec.setdefault("completions", 1)
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        spec.setdefault("manualSelector", False)
        spec.setdefault(
            "podReplacementPolicy", "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed"
        )
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        template_meta = spec["template"].setdefault("metadata", {})
        labels = template_meta.setdefault("labels", {})
        labels.update(
            {
                "batch.kubernetes.io/controller-uid": uid,
                "batch.kubernetes.io/job-name": meta["name"],
                "controller-uid": uid,
                "job-name": meta["name"],
            }
        )
        meta.setdefault("labels", {}).update(
            {
                "batch.kubernetes.io/controller-uid": uid,
                "batch.kubernetes.io/job-name": meta["name"],
                "controller-uid": uid,
                "job-name": meta["name"],
            }
        )
        for container in spec["template"]["spec"].get("containers", []) + spec["template"]["spec"].get(
            "initContainers", []
        ):
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            container.setdefault("imagePullPolicy", "IfNotPresent")
        spec["template"]["spec"].setdefault("terminationGracePeriodSeconds", 30)
        job["status"] = {}

    def _delete(
        self, resource: str, namespace: str, name: str, query: dict[str, list[str]], options: dict[str, Any]
    ) -> dict[str, Any]:
        obj = self._get_or_404(resource, namespace, name)
        propagation = _q(query, "propagationPolicy") or options.get("propagationPolicy")
        grace = _q(query, "gracePeriodSeconds") or options.get("gracePeriodSeconds")
        meta = obj["metadata"]
        group = _RESOURCES[resource][0]
        success = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"name": name, "group": group, "kind": resource, "uid": meta["uid"]},
        }
        if resource == "pods":
            self._delete_pod(obj, None if grace is None else int(grace))
            return obj
        if resource == "jobs":
            propagation = propagation or "Orphan"  # batch/v1 Jobs default to orphaning their pods
            if propagation == "Orphan":
                for pod in self._dependents("pods", meta["uid"]):
                    pod["metadata"]["ownerReferences"] = [
                        r for r in pod["metadata"].get("ownerReferences", []) if r["uid"] != meta["uid"]
                    ]
                    _drop_finalizer(pod, JOB_TRACKING_FINALIZER)
            elif propagation == "Foreground":
                meta["deletionTimestamp"] = rfc3339()
                meta.setdefault("finalizers", []).append("foregroundDeletion")
                self._collect_dependents(meta["uid"])
                return obj
        del self.store[resource][(namespace, name)]
        self._collect_dependents(meta["uid"])
        return success

    def _dependents(self, resource: str, owner_uid: str) -> list[dict[str, Any]]:
        return [
            obj
            for obj in self.store[resource].values()
            if any(r.get("uid") == owner_uid for r in obj["metadata"].get("ownerReferences", []))
        ]

    def _collect_dependents(self, owner_uid: str) -> None:
        for pod in self._dependents("pods", owner_uid):
            self._delete_pod(pod, None)
        for cm in self._dependents("configmaps", owner_uid):
            del self.store["configmaps"][(cm["metadata"]["namespace"], cm["metadata"]["name"])]

    def _delete_pod(self, pod: dict[str, Any], grace: int | None) -> None:
        meta = pod["metadata"]
        if "deletionTimestamp" in meta:
            return
        if grace is None:
            grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))
        meta["deletionTimestamp"] = rfc3339(time.time() + grace)
        meta["deletionGracePeriodSeconds"] = grace
        meta["x-deleted-at"] = time.time()  # private: stripped before serving (see _public)
        meta["resourceVersion"] = str(next(self._rv))

    def _evict(self, namespace: str, name: str) -> tuple[int, dict[str, Any]]:
        pod = self._get_or_404("pods", namespace, name)
        _set_condition(
            pod["status"], "DisruptionTarget", "True", "EvictionByEvictionAPI", "Eviction API: evicting"
        )
        self._delete_pod(pod, None)
        return 201, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    def _pod_log(self, namespace: str, name: str, query: dict[str, list[str]]) -> str:
        pod = self._get_or_404("pods", namespace, name)
        containers = [c["name"] for c in pod["spec"]["containers"]]
        inits = [c["name"] for c in pod["spec"].get("initContainers", [])]
        container = _q(query, "container") or (containers[0] if len(containers) == 1 else None)
        if container is None:
            raise _ApiError(
                400,
                "BadRequest",
                f"a container name must be specified for pod {name}, choose one of: {containers}",
            )
        if container not in containers + inits:
            raise _ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        run = self._runs.get(pod["metadata"]["uid"])
        log = run.logs.get(container) if run else None
        if log is None or not log.exists():
            raise _ApiError(
                400,
                "BadRequest",
                f'container "{container}" in pod "{name}" is waiting to start: PodInitializing',
            )
        data = log.read_bytes()
        tail = _q(query, "tailLines")
        if tail is not None:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-int(tail) :]) if int(tail) > 0 else b""
        limit = _q(query, "limitBytes")
        if limit is not None:
            data = data[: int(limit)]
        return data.decode("utf-8", errors="replace")

    # -- the runner: job controller, kubelet, garbage collector --------------------------------
    def _run_loop(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                try:
                    self._sync_jobs()
                    self._sync_pods()
                except Exception as exc:  # a bug in the double must be loud, not a hang
                    import traceback

                    traceback.print_exc()
                    raise exc
            self._stop.wait(self.tick_s)

    def _job_pods(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        uid = job["metadata"]["uid"]
        return sorted(
            (
                p
                for p in self.store["pods"].values()
                if p["metadata"]["labels"].get("batch.kubernetes.io/controller-uid") == uid
            ),
            key=lambda p: (p["metadata"]["creationTimestamp"], p["metadata"]["x-seq"]),
        )

    def _sync_jobs(self) -> None:
        now = time.time()
        for key, job in list(self.store["jobs"].items()):
            spec, status, meta = job["spec"], job["status"], job["metadata"]
            if "deletionTimestamp" in meta:  # foreground deletion: gone once its pods are
                if not self._dependents("pods", meta["uid"]):
                    del self.store["jobs"][key]
                continue
            conditions = {c["type"]: c for c in status.get("conditions", []) if c["status"] == "True"}
            if "Complete" in conditions or "Failed" in conditions:
                ttl = spec.get("ttlSecondsAfterFinished")
                finished = max(_epoch(c["lastTransitionTime"]) for c in status["conditions"])
                if ttl is not None and now >= finished + ttl:
                    del self.store["jobs"][key]
                    self._collect_dependents(meta["uid"])
                continue
            if spec.get("suspend"):
                continue
            status.setdefault("startTime", rfc3339())
            status.setdefault("x-start", now)
            pods = self._job_pods(job)
            self._account(job, pods, conditions)
            conditions = {c["type"]: c for c in status.get("conditions", []) if c["status"] == "True"}
            target = conditions.get("FailureTarget") or conditions.get("SuccessCriteriaMet")
            deadline = spec.get("activeDeadlineSeconds")
            if target is None and deadline is not None and now >= status["x-start"] + deadline:
                target = _set_condition(
                    status,
                    "FailureTarget",
                    "True",
                    "DeadlineExceeded",
                    "Job was active longer than specified deadline",
                )
            live = [p for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed")]
            if target is not None:
                for pod in live:
                    self._delete_pod(pod, None)
                if not live:
                    final = "Complete" if target["type"] == "SuccessCriteriaMet" else "Failed"
                    _set_condition(status, final, "True", target["reason"], target["message"])
                    if final == "Complete":
                        status["completionTime"] = rfc3339()
            elif not live and now >= self._next_attempt.get(meta["uid"], 0.0):
                self._create_pod(job)
            self._update_counts(job)

    def _account(self, job: dict[str, Any], pods: list[dict[str, Any]], conditions: dict[str, Any]) -> None:
        """Count each terminal pod once (dropping its finalizer), applying the pod failure policy."""
        spec, status = job["spec"], job["status"]
        for pod in pods:
            phase = pod["status"].get("phase")
            if phase not in ("Succeeded", "Failed") or JOB_TRACKING_FINALIZER not in pod["metadata"].get(
                "finalizers", []
            ):
                continue
            _drop_finalizer(pod, JOB_TRACKING_FINALIZER)
            if conditions.get("FailureTarget") or conditions.get("SuccessCriteriaMet"):
                continue
            if phase == "Succeeded":
                status["succeeded"] = status.get("succeeded", 0) + 1
                if status["succeeded"] >= spec.get("completions", 1):
                    conditions["SuccessCriteriaMet"] = _set_condition(
                        status,
                        "SuccessCriteriaMet",
                        "True",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    )
                continue
            action, message = _match_pod_failure_policy(spec.get("podFailurePolicy"), pod)
            uid = job["metadata"]["uid"]
            attempts = status.get("x-pod-failures", 0) + 1
            status["x-pod-failures"] = attempts
            self._next_attempt[uid] = time.time() + min(self.backoff_base_s * 2 ** (attempts - 1), 360.0)
            if action == "Ignore":
                continue
            status["failed"] = status.get("failed", 0) + 1
            if action == "FailJob":
                conditions["FailureTarget"] = _set_condition(
                    status, "FailureTarget", "True", "PodFailurePolicy", message
                )
            elif status["failed"] > spec.get("backoffLimit", 6):
                conditions["FailureTarget"] = _set_condition(
                    status,
                    "FailureTarget",
                    "True",
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit",
                )

    def _update_counts(self, job: dict[str, Any]) -> None:
        status = job["status"]
        pods = self._job_pods(job)
        live = [p for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed")]
        counts = {
            "active": sum(1 for p in live if "deletionTimestamp" not in p["metadata"]),
            "ready": sum(1 for p in live if _condition_true(p["status"], "Ready")),
            "terminating": sum(1 for p in live if "deletionTimestamp" in p["metadata"]),
        }
        for name, value in counts.items():
            if value or name in status:
                status[name] = value
        status.setdefault("uncountedTerminatedPods", {})
        if any(c["type"] in ("Complete", "Failed") for c in status.get("conditions", [])):
            status.pop("active", None)

    def _create_pod(self, job: dict[str, Any]) -> None:
        meta = job["metadata"]
        template = json.loads(json.dumps(job["spec"]["template"]))
        name = f"{meta['name']}-{uuid.uuid4().hex[:5]}"
        pod: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                **template.get("metadata", {}),
                "name": name,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
                "finalizers": [JOB_TRACKING_FINALIZER],
            },
            "spec": template["spec"],
            "status": {"phase": "Pending", "qosClass": "BestEffort"},
        }
        self._meta(pod, meta["namespace"])
        pod["metadata"]["x-seq"] = next(self._rv)
        self.store["pods"][(meta["namespace"], name)] = pod
        self._runs[pod["metadata"]["uid"]] = _PodRun(root=self._tmp / "pods" / name)

    # -- kubelet -------------------------------------------------------------------------------
    def _sync_pods(self) -> None:
        for key, pod in list(self.store["pods"].items()):
            run = self._runs.get(pod["metadata"]["uid"])
            if run is None:
                continue
            owners = pod["metadata"].get("ownerReferences", [])
            if any(r.get("kind") == "Job" for r in owners) and not any(
                (key[0], r["name"]) in self.store["jobs"] for r in owners if r.get("kind") == "Job"
            ):
                self._delete_pod(pod, None)  # the garbage collector, for owners deleted meanwhile
            if "deletionTimestamp" in pod["metadata"]:
                self._terminate(pod, run)
            else:
                self._advance(pod, run)
            self._reap_processes(pod, run)
            if run.stage == "done" and JOB_TRACKING_FINALIZER in pod["metadata"].get("finalizers", []):
                owner = next(((key[0], r["name"]) for r in owners if r.get("kind") == "Job"), None)
                job = self.store["jobs"].get(owner) if owner else None
                if (
                    job is None
                    or "deletionTimestamp" in job["metadata"]
                    or any(c["type"] in ("Complete", "Failed") for c in job["status"].get("conditions", []))
                ):
                    _drop_finalizer(pod, JOB_TRACKING_FINALIZER)  # nobody left to account for it
            if (
                "deletionTimestamp" in pod["metadata"]
                and run.stage == "done"
                and not run.procs
                and not pod["metadata"].get("finalizers")
            ):
                del self.store["pods"][key]

    def _advance(self, pod: dict[str, Any], run: _PodRun) -> None:
        status, spec = pod["status"], pod["spec"]
        if run.stage == "scheduling":
            reason = self._unschedulable(pod)
            if reason:
                _set_condition(status, "PodScheduled", "False", "Unschedulable", reason)
                return
            spec["nodeName"] = "double-node-0"
            _set_condition(status, "PodScheduled", "True", "", "")
            status["startTime"] = rfc3339()
            status["hostIP"] = status["podIP"] = "127.0.0.1"
            inits = spec.get("initContainers", [])
            status["initContainerStatuses"] = [_waiting(c, "PodInitializing") for c in inits]
            status["containerStatuses"] = [_waiting(c, "PodInitializing") for c in spec["containers"]]
            _set_condition(status, "Initialized", "False" if inits else "True", "", "")
            run.stage = "init" if inits else "running"
            run.root.mkdir(parents=True, exist_ok=True)
        if run.stage in ("init", "running") and not run.procs:
            missing = self._missing_volumes(pod)
            if missing:
                for cs in status["containerStatuses"]:
                    cs["state"] = {
                        "waiting": {
                            "reason": "ContainerCreating",
                            "message": f'configmap "{missing}" not found',
                        }
                    }
                return
            if run.stage == "init":
                container = spec["initContainers"][run.init_index]
                self._start(pod, run, container, status["initContainerStatuses"][run.init_index])
            else:
                for container, cs in zip(spec["containers"], status["containerStatuses"], strict=True):
                    self._start(pod, run, container, cs)
                if run.procs:
                    status["phase"] = "Running"
                    for cond in ("ContainersReady", "Ready"):
                        _set_condition(status, cond, "True", "", "")

    def _unschedulable(self, pod: dict[str, Any]) -> str | None:
        spec = pod["spec"]
        for volume in spec.get("volumes", []):
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and claim not in self.pvcs:
                return f'persistentvolumeclaim "{claim}" not found'
        for key, value in (spec.get("nodeSelector") or {}).items():
            if self.node_labels.get(key) != value:
                return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
        wanted = _gpus(pod)
        if wanted:
            used = sum(
                _gpus(p)
                for p in self.store["pods"].values()
                if p is not pod
                and p["spec"].get("nodeName")
                and p["status"].get("phase") not in ("Succeeded", "Failed")
            )
            if used + wanted > self.gpus:
                return f"0/1 nodes are available: 1 Insufficient {GPU_RESOURCE}."
        return None

    def _missing_volumes(self, pod: dict[str, Any]) -> str | None:
        namespace = pod["metadata"]["namespace"]
        for volume in pod["spec"].get("volumes", []):
            cm = volume.get("configMap")
            if cm and (namespace, cm["name"]) not in self.store["configmaps"] and not cm.get("optional"):
                return cm["name"]
        return None

    def _volume_dirs(self, pod: dict[str, Any], run: _PodRun) -> dict[str, Path]:
        dirs: dict[str, Path] = {}
        namespace = pod["metadata"]["namespace"]
        for volume in pod["spec"].get("volumes", []):
            name = volume["name"]
            if "persistentVolumeClaim" in volume:
                dirs[name] = Path(self.pvcs[volume["persistentVolumeClaim"]["claimName"]])
                continue
            path = run.root / "volumes" / name
            if not path.exists():
                path.mkdir(parents=True)
                if "configMap" in volume:
                    cm = self.store["configmaps"].get((namespace, volume["configMap"]["name"])) or {}
                    for key, text in (cm.get("data") or {}).items():
                        (path / key).write_text(text)
                    for key, blob in (cm.get("binaryData") or {}).items():
                        (path / key).write_bytes(base64.b64decode(blob))
            dirs[name] = path
        return dirs

    def _start(
        self, pod: dict[str, Any], run: _PodRun, container: dict[str, Any], cs: dict[str, Any]
    ) -> None:
        image = self.images.get(container["image"])
        if image is None:
            cs["state"] = {
                "waiting": {
                    "reason": "ErrImagePull",
                    "message": f'failed to pull image "{container["image"]}": not found',
                }
            }
            return
        volumes = self._volume_dirs(pod, run)
        mounts = {
            m["mountPath"].rstrip("/") or "/": volumes[m["name"]] for m in container.get("volumeMounts", [])
        }
        term_path = container.get("terminationMessagePath", "/dev/termination-log")
        term_file = run.root / "termination" / container["name"]
        term_file.parent.mkdir(parents=True, exist_ok=True)
        term_file.write_bytes(b"")
        mounts[term_path] = term_file

        def local_path(value: str) -> str | None:
            for mount in sorted(mounts, key=len, reverse=True):
                if value == mount or value.startswith(mount.rstrip("/") + "/"):
                    return str(mounts[mount]) + value[len(mount) :]
            return None

        def local(value: str) -> str:
            """Where a mount path appears, the directory standing in for that volume: a whole value,
            or a word of a command line (FANOUT_COMMAND reaches the container as one string)."""
            whole = local_path(value)
            if whole is not None:
                return whole
            return " ".join(local_path(word) or word for word in value.split(" ")) if " " in value else value

        env = dict(image.env)
        for item in container.get("env", []):
            env[item["name"]] = _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), item.get("value", ""))
        env = {k: local(v) for k, v in env.items()}
        if container.get("command"):
            argv = list(container["command"]) + list(container.get("args") or [])
        else:
            argv = list(image.entrypoint) + list(container.get("args") or image.cmd)
        argv = [local(_VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), a)) for a in argv]
        cwd = local(container["workingDir"]) if container.get("workingDir") else str(run.root)
        log = run.root / "logs" / f"{container['name']}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            try:
                popen = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:  # the runtime's "executable file not found": exit 128, reason Error
                cs["state"] = {
                    "terminated": {
                        "exitCode": 128,
                        "reason": "StartError",
                        "message": str(exc),
                        "startedAt": rfc3339(0),
                        "finishedAt": rfc3339(),
                    }
                }
                run.logs[container["name"]] = log
                return
        run.logs[container["name"]] = log
        run.procs[container["name"]] = _Proc(
            popen,
            container["name"],
            time.time(),
            log,
            term_file,
            container.get("terminationMessagePolicy", "File"),
        )
        cs.update(
            started=True, containerID=f"double://{popen.pid}", state={"running": {"startedAt": rfc3339()}}
        )

    def _reap_processes(self, pod: dict[str, Any], run: _PodRun) -> None:
        status, spec = pod["status"], pod["spec"]
        for name, proc in list(run.procs.items()):
            code = proc.popen.poll()
            if code is None:
                continue
            del run.procs[name]
            exit_code = 128 - code if code < 0 else code
            message = proc.term_file.read_bytes()[:4096].decode("utf-8", errors="replace")
            if not message and exit_code != 0 and proc.term_policy == "FallbackToLogsOnError":
                tail = proc.log.read_bytes().splitlines(keepends=True)[-80:]
                message = b"".join(tail)[-2048:].decode("utf-8", errors="replace")
            terminated = {
                "exitCode": exit_code,
                "reason": "Completed" if exit_code == 0 else "Error",
                "startedAt": rfc3339(proc.started),
                "finishedAt": rfc3339(),
                "containerID": f"double://{proc.popen.pid}",
            }
            if message:
                terminated["message"] = message
            statuses = (
                status["containerStatuses"] if run.stage == "running" else status["initContainerStatuses"]
            )
            for cs in statuses:
                if cs["name"] == name:
                    cs.update(state={"terminated": terminated}, ready=False, started=False)
            if run.stage == "init":
                if exit_code != 0:
                    self._finish(pod, run, "Failed")
                else:
                    run.init_index += 1
                    if run.init_index >= len(spec.get("initContainers", [])):
                        run.stage = "running"
                        _set_condition(status, "Initialized", "True", "", "")
            elif not run.procs:
                codes = [
                    cs["state"].get("terminated", {}).get("exitCode") for cs in status["containerStatuses"]
                ]
                self._finish(pod, run, "Succeeded" if all(c == 0 for c in codes) else "Failed")
        if not run.procs and run.stage in ("init", "running") and "deletionTimestamp" in pod["metadata"]:
            self._finish(pod, run, "Failed")  # deleted before or between its containers

    def _finish(self, pod: dict[str, Any], run: _PodRun, phase: str) -> None:
        for hook in run.prestop:
            _kill_group(hook, signal.SIGKILL)
        run.stage = "done"
        status = pod["status"]
        status["phase"] = phase
        for cond in ("ContainersReady", "Ready"):
            _set_condition(status, cond, "False", "PodCompleted" if phase == "Succeeded" else "PodFailed", "")
        for cs in status.get("containerStatuses", []):  # never started: still waiting (init failed)
            cs["ready"] = False

    def _terminate(self, pod: dict[str, Any], run: _PodRun) -> None:
        meta = pod["metadata"]
        if not run.procs:
            if run.stage != "done":
                if run.stage == "scheduling":
                    run.stage = "done"
                    pod["status"]["phase"] = "Failed"
                else:
                    self._finish(pod, run, "Failed")
            return
        grace = meta.get("deletionGracePeriodSeconds", 30)
        deleted_at = meta.get("x-deleted-at", time.time())
        if run.term_sent is None and not run.prestop:
            hooks = [
                c
                for c in pod["spec"]["containers"]
                if c["name"] in run.procs and ((c.get("lifecycle") or {}).get("preStop") or {}).get("exec")
            ]
            for container in hooks:
                argv = container["lifecycle"]["preStop"]["exec"]["command"]
                run.prestop.append(
                    subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
            if not run.prestop:
                run.prestop.append(subprocess.Popen(["true"]))
        if run.term_sent is None and all(h.poll() is not None for h in run.prestop):
            run.term_sent = time.time()
            for proc in run.procs.values():
                _kill_group(proc.popen, signal.SIGTERM)
        if not run.killed and time.time() >= deleted_at + grace:
            run.killed = True
            for proc in run.procs.values():
                _kill_group(proc.popen, signal.SIGKILL)


# -- helpers ---------------------------------------------------------------------------------
def _q(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def _epoch(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def _kill_group(popen: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


def _gpus(pod: dict[str, Any]) -> int:
    total = 0
    for container in pod["spec"].get("containers", []):
        limits = (container.get("resources") or {}).get("limits") or {}
        total += int(limits.get(GPU_RESOURCE, 0))
    return total


def _waiting(container: dict[str, Any], reason: str) -> dict[str, Any]:
    return {
        "name": container["name"],
        "image": container["image"],
        "imageID": "",
        "ready": False,
        "restartCount": 0,
        "started": False,
        "state": {"waiting": {"reason": reason}},
        "lastState": {},
    }


def _condition_true(status: dict[str, Any], kind: str) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in status.get("conditions", []))


def _set_condition(
    status: dict[str, Any], kind: str, value: str, reason: str, message: str
) -> dict[str, Any]:
    conditions = status.setdefault("conditions", [])
    for cond in conditions:
        if cond["type"] == kind:
            if cond["status"] != value:
                cond.update(status=value, lastTransitionTime=rfc3339())
            cond.update(reason=reason, message=message, lastProbeTime=rfc3339())
            return cond
    cond = {
        "type": kind,
        "status": value,
        "lastProbeTime": rfc3339(),
        "lastTransitionTime": rfc3339(),
        "reason": reason,
        "message": message,
    }
    conditions.append(cond)
    return cond


def _validate_configmap_size(name: str, cm: dict[str, Any]) -> None:
    size = sum(len(v.encode()) for v in (cm.get("data") or {}).values())
    size += sum(len(base64.b64decode(v)) for v in (cm.get("binaryData") or {}).values())
    if size > 1024 * 1024:
        raise _ApiError(
            422,
            "Invalid",
            f'ConfigMap "{name}" is invalid: []: Too long: may not be more than 1048576 bytes',
            {"name": name, "kind": "ConfigMap"},
        )


def _drop_finalizer(obj: dict[str, Any], name: str) -> None:
    finalizers = obj["metadata"].get("finalizers", [])
    if name in finalizers:
        finalizers.remove(name)


def _validate_labels(kind: str, name: str, labels: dict[str, str]) -> None:
    for key, value in labels.items():
        prefix, _, short = key.rpartition("/")
        if not _LABEL_NAME_RE.match(short) or len(short) > 63 or len(prefix) > 253:
            raise _ApiError(
                422,
                "Invalid",
                f'{kind} "{name}" is invalid: metadata.labels: Invalid value: '
                f'"{key}": name part must consist of alphanumeric characters',
            )
        if len(value) > 63 or not _LABEL_VALUE_RE.match(value):
            raise _ApiError(
                422,
                "Invalid",
                f'{kind} "{name}" is invalid: metadata.labels: Invalid value: '
                f'"{value}": a valid label must be an empty string or consist of '
                "alphanumeric characters, '-', '_' or '.'",
            )


def _match_pod_failure_policy(policy: dict[str, Any] | None, pod: dict[str, Any]) -> tuple[str, str]:
    """The Job controller's matching: rules in order; onExitCodes looks only at containers that
    terminated with a non-zero code (init containers too); onPodConditions by type and status."""
    if not policy:
        return "Count", ""
    status, namespace, name = pod["status"], pod["metadata"]["namespace"], pod["metadata"]["name"]
    statuses = status.get("containerStatuses", []) + status.get("initContainerStatuses", [])
    for index, rule in enumerate(policy.get("rules", [])):
        action = rule["action"]
        codes = rule.get("onExitCodes")
        if codes:
            for cs in statuses:
                if codes.get("containerName") and codes["containerName"] != cs["name"]:
                    continue
                exit_code = (cs.get("state", {}).get("terminated") or {}).get("exitCode")
                if not exit_code:
                    continue
                inside = exit_code in codes["values"]
                if inside == (codes["operator"] == "In"):
                    return action, (
                        f"Container {cs['name']} for pod {namespace}/{name} failed with exit code "
                        f"{exit_code} matching {action} rule at index {index}"
                    )
        for pattern in rule.get("onPodConditions") or []:
            for cond in status.get("conditions", []):
                if cond["type"] == pattern["type"] and cond["status"] == pattern.get("status", "True"):
                    return action, (
                        f"Pod {namespace}/{name} has condition {cond['type']} matching {action} "
                        f"rule at index {index}"
                    )
    return "Count", ""


def _public(obj: Any) -> Any:
    """Strip the double's private bookkeeping (keys starting with 'x-') before serving."""
    if isinstance(obj, dict):
        return {k: _public(v) for k, v in obj.items() if not k.startswith("x-")}
    if isinstance(obj, list):
        return [_public(v) for v in obj]
    return obj


def _handler_for(double: K8sApiDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            code, out_headers, data, fault = double.handle(self.command, self.path, headers, body)
            if fault == "reset" or fault == "reset_after":
                # SO_LINGER 0: close() sends RST, what a crashed proxy or a dying apiserver does.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                return
            if out_headers.get("Content-Type") == "application/json":
                data = json.dumps(_public(json.loads(data))).encode()
            self.send_response(code)
            for key, value in out_headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    return Handler
