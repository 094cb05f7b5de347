"""Fixtures for the storage tests: a moto S3 server on loopback and one backend per protocol.

The ``backend`` fixture binds the same contract tests to ``file://``, ``memory://`` and
``s3://`` (moto's ThreadedMotoServer on 127.0.0.1). The server gets dummy credentials
and an explicit endpoint, and the AWS variables are replaced for the whole session,
so no request can reach real AWS or a metadata service.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import boto3
import fsspec
import pytest
from moto.server import ThreadedMotoServer

BUCKET = "storage-tests"
REGION = "us-east-1"
DUMMY_KEY = "testing-key"
DUMMY_SECRET = "testing-secret"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", DUMMY_KEY)
        patch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET)
        patch.setenv("AWS_DEFAULT_REGION", REGION)
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("AWS_CONFIG_FILE", "/dev/null")
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        patch.delenv("AWS_PROFILE", raising=False)
        patch.delenv("AWS_SESSION_TOKEN", raising=False)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=DUMMY_KEY,
            aws_secret_access_key=DUMMY_SECRET,
        )
        client.create_bucket(Bucket=BUCKET)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3_options(s3_endpoint: str) -> dict[str, Any]:
    """fsspec storage options for the moto server."""
    return {
        "key": DUMMY_KEY,
        "secret": DUMMY_SECRET,
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": REGION},
    }


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str) -> Any:
    """A boto3 client for the moto server, for checks independent of s3fs."""
    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name=REGION,
        aws_access_key_id=DUMMY_KEY,
        aws_secret_access_key=DUMMY_SECRET,
    )


@dataclass
class Backend:
    """A fresh directory on one filesystem: its URL, storage options and fsspec handle."""

    name: str
    root: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.root, **self.storage_options)[0]

    def url(self, *names: str) -> str:
        return "/".join([self.root, *names])

    def path(self, *names: str) -> str:
        return fsspec.core.url_to_fs(self.url(*names), **self.storage_options)[1]

    def put(self, name: str, data: bytes) -> str:
        """Store ``data`` at ``name`` (relative to the root) and return its URL."""
        self.fs.makedirs(self.fs._parent(self.path(name)), exist_ok=True)
        self.fs.pipe_file(self.path(name), data)
        return self.url(name)

    def get(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self.path(name))

    def listing(self, subdir: str = "") -> list[str]:
        """File names under ``subdir``, hidden temporary files included."""
        self.fs.invalidate_cache()
        target = self.path(subdir) if subdir else self.path()
        if not self.fs.exists(target):
            return []
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.find(target, withdirs=False))


@pytest.fixture(params=["file", "memory", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Backend]:
    """One fresh, empty directory per test, on each of file://, memory:// and s3://."""
    if request.param == "file":
        yield Backend("file", f"file://{tmp_path}")
        return
    if request.param == "memory":
        root = f"memory://storage-tests/{uuid.uuid4().hex}"
        yield Backend("memory", root)
        fs = fsspec.filesystem("memory")
        if fs.exists(root):
            fs.rm(root, recursive=True)
        return
    options = request.getfixturevalue("s3_options")
    yield Backend("s3", f"s3://{BUCKET}/{uuid.uuid4().hex}", options)
