"""Kubernetes API calls of ``surgery submit`` through the ``kubernetes`` client.

Credentials come from a kubeconfig (``KUBECONFIG``, else ``~/.kube/config``) or, inside a
pod without one, from the pod's service account. Every failure becomes a DeployError
subclass whose message names the API server, the namespace and the next step.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.deploy.errors import (
    ClusterConfigError,
    ClusterPermissionError,
    ClusterRequestError,
    ClusterUnreachableError,
)

logger = logging.getLogger(__name__)

# Seconds to wait for the TCP connection and for the response.
REQUEST_TIMEOUT = (10, 60)
SUBMIT_ROLE = "surgery-submit"


@dataclass(frozen=True)
class Cluster:
    """An API client and where its settings came from, for error messages."""

    api_client: Any
    host: str
    # "kubeconfig /path, context NAME" or "in-cluster service account".
    origin: str


def connect(context: str | None = None) -> Cluster:
    """Load credentials the way kubectl does and return a client for them; sends no request."""
    try:
        from kubernetes import client, config
    except ImportError as e:
        raise ClusterConfigError(
            "surgery submit needs the kubernetes package; install the k8s extra: pip install 'surgery-pipeline[k8s]'"
        ) from e

    kubeconfig = os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
    use_pod_account = context is None and "KUBECONFIG" not in os.environ and not Path(kubeconfig).exists()
    if use_pod_account and os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException as e:
            raise ClusterConfigError(f"cannot use the pod's service account: {e}") from e
        return Cluster(client.ApiClient(configuration), configuration.host, "in-cluster service account")
    if use_pod_account:
        raise ClusterConfigError(
            f"no kubeconfig at {kubeconfig} and KUBECONFIG is not set; point KUBECONFIG at the "
            "cluster's kubeconfig, or run inside a pod with a service account"
        )

    try:
        contexts, current = config.list_kube_config_contexts(config_file=kubeconfig)
        if context is not None and context not in {c["name"] for c in contexts}:
            known = ", ".join(sorted(c["name"] for c in contexts)) or "none"
            raise ClusterConfigError(f"context {context!r} not found in kubeconfig {kubeconfig}; contexts: {known}")
        context_name = context or current["name"]
        api_client = config.new_client_from_config(config_file=kubeconfig, context=context_name, persist_config=False)
    except config.ConfigException as e:
        raise ClusterConfigError(f"cannot load kubeconfig {kubeconfig}: {e}; check it with: kubectl config view") from e
    host = api_client.configuration.host
    logger.info("using API server %s from kubeconfig %s, context %s", host, kubeconfig, context_name)
    return Cluster(api_client, host, f"kubeconfig {kubeconfig}, context {context_name}")


def read_config_map(cluster: Cluster, namespace: str, name: str) -> dict[str, str] | None:
    """Return the data of a ConfigMap, or None if it does not exist."""
    from kubernetes import client

    api = client.CoreV1Api(cluster.api_client)
    try:
        config_map = _request(cluster, "get", "configmaps", namespace, lambda: api.read_namespaced_config_map(
            name, namespace, _request_timeout=REQUEST_TIMEOUT
        ))
    except ClusterRequestError as e:
        if e.status == 404:
            return None
        raise
    return dict(config_map.data or {})


def create_job(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> str:
    """Create a Job from ``manifest`` and return its name.

    The server validates strictly: an unknown field in the manifest fails the request
    instead of being dropped.
    """
    from kubernetes import client

    api = client.BatchV1Api(cluster.api_client)
    # kubernetes 37.0.1 ignores _content_type and sends no Content-Type. The API server
    # then decodes the body as JSON, its first supported media type
    # (NegotiateInputSerializerForMediaType in k8s.io/apiserver), but proxies in front of
    # it may not, so the header is set here.
    job = _request(cluster, "create", "jobs", namespace, lambda: api.create_namespaced_job(
        namespace,
        manifest,
        field_validation="Strict",
        _headers={"Content-Type": "application/json"},
        _request_timeout=REQUEST_TIMEOUT,
    ))
    logger.info("created Job %s in namespace %s on %s", job.metadata.name, namespace, cluster.host)
    return job.metadata.name


def _request(cluster: Cluster, verb: str, resource: str, namespace: str, send: Callable[[], Any]) -> Any:
    import urllib3
    from kubernetes.client.exceptions import ApiException

    try:
        return send()
    except ApiException as e:
        raise _api_error(e, cluster, verb, resource, namespace) from e
    except urllib3.exceptions.HTTPError as e:
        raise ClusterUnreachableError(
            f"cannot reach the Kubernetes API server {cluster.host} ({cluster.origin}) to {verb} {resource} "
            f"in namespace {namespace!r}: {_reason(e)}. Check that the context points at a running cluster: "
            "kubectl config current-context; kubectl cluster-info"
        ) from e


def _api_error(error: Any, cluster: Cluster, verb: str, resource: str, namespace: str) -> Exception:
    status = error.status
    message = _status_message(error)
    action = f"{verb} {resource} in namespace {namespace!r} on {cluster.host} ({cluster.origin})"
    if status == 0:
        # The client reports TLS failures with status 0.
        return ClusterUnreachableError(f"cannot {action}: {message}. Check the cluster's CA and the server address in the kubeconfig")
    if status == 401:
        return ClusterPermissionError(f"the API server rejected the credentials, so cannot {action}: {message}. Log in again or refresh the kubeconfig's token")
    if status == 403:
        return ClusterPermissionError(
            f"permission denied: cannot {action}: {message}. The Role {SUBMIT_ROLE!r} in k8s/base/rbac.yaml grants what "
            f"surgery submit needs; bind it to you with: kubectl create rolebinding {SUBMIT_ROLE}-$USER "
            f"--role={SUBMIT_ROLE} --user=<your user> -n {namespace}, or inside a pod run as the service account {SUBMIT_ROLE!r}"
        )
    if status == 404 and verb == "create":
        return ClusterRequestError(
            f"cannot {action}: {message}. Is the namespace deployed? kubectl apply -k k8s/overlays/<dev|prod>", status
        )
    return ClusterRequestError(f"cannot {action}: HTTP {status}: {message}", status)


def _status_message(error: Any) -> str:
    """Return the ``message`` of a Kubernetes Status body, else the HTTP reason."""
    try:
        body = json.loads(error.body or "")
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return str(error.reason or "no reason given")


def _reason(error: Exception) -> str:
    reason = getattr(error, "reason", None)
    return str(reason or error)
