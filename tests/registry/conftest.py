from tests.storage.conftest import Backend, backend, s3_client, s3_endpoint, s3_options  # noqa: F401
