"""Errors of ``surgery submit``. Each message names the value at fault and what to do."""

from __future__ import annotations


class DeployError(Exception):
    """Base class of the deployment errors."""


class InvalidImageError(DeployError, ValueError):
    """An image reference that is not pinned to a version tag or a digest."""


class WorkflowNotDeployedError(DeployError, LookupError):
    """A workflow or spec file that the cluster's ConfigMaps lack or hold in another version."""


class ClusterConfigError(DeployError):
    """No usable kubeconfig and no in-cluster service account."""


class ClusterUnreachableError(DeployError, ConnectionError):
    """The API server could not be reached (connection refused, timed out, TLS failure)."""


class ClusterPermissionError(DeployError, PermissionError):
    """The API server rejected the credentials (401) or the request (403)."""


class ClusterRequestError(DeployError):
    """Any other failed API request; the message carries the server's status and reason."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
