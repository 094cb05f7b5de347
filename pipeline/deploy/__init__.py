"""Deployment helpers: the one-off migration Job and its submission to Kubernetes.

``build_migration_job`` turns a workflow file name into the Job manifest,
``workflow_files`` lists the files the Job reads and compares them with the cluster's
ConfigMaps, and ``cluster`` talks to the API server through the ``kubernetes`` client
(the ``k8s`` extra). ``surgery submit`` joins them.
"""

from pipeline.deploy.errors import (
    ClusterConfigError,
    ClusterPermissionError,
    ClusterRequestError,
    ClusterUnreachableError,
    DeployError,
    InvalidImageError,
    WorkflowNotDeployedError,
)
from pipeline.deploy.job import build_migration_job, default_image, load_template

__all__ = [
    "ClusterConfigError",
    "ClusterPermissionError",
    "ClusterRequestError",
    "ClusterUnreachableError",
    "DeployError",
    "InvalidImageError",
    "WorkflowNotDeployedError",
    "build_migration_job",
    "default_image",
    "load_template",
]
