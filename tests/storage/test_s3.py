"""S3 behaviour against the moto server: ranged reads, multipart uploads, create-only writes, aborts.

Requests are counted with botocore event hooks on the real client that s3fs uses, so
the counts are the HTTP requests that reached the server.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import fsspec
import pytest
import torch

from pipeline.storage import ObjectExistsError, ShardedWriter, TensorSpec, open_checkpoint
from pipeline.storage.safetensors_reader import FIRST_READ_BYTES
from pipeline.storage.sinks import S3Sink

from tests.storage.builders import safetensors_bytes
from tests.storage.conftest import BUCKET

MIB = 2**20


class RequestLog:
    """HTTP requests sent by an s3fs filesystem, recorded from botocore's before-send event."""

    def __init__(self, fs: Any) -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        fs.s3.meta.events.register("before-send.s3", self._record)

    def _record(self, request: Any, event_name: str, **kwargs: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        headers = request.headers
        condition = headers.get("If-None-Match")
        rng = headers.get("Range")
        self.requests.append(
            (
                operation,
                rng.decode() if isinstance(rng, bytes) else rng,
                condition.decode() if isinstance(condition, bytes) else condition,
            )
        )

    def ranges(self, operation: str = "GetObject") -> list[tuple[int, int]]:
        """Byte ranges ``[start, end)`` requested by the given operation."""
        result = []
        for op, rng, _ in self.requests:
            if op == operation and rng is not None:
                start, last = rng.removeprefix("bytes=").split("-")
                result.append((int(start), int(last) + 1))
        return result

    def count(self, operation: str) -> int:
        return sum(1 for op, _, _ in self.requests if op == operation)

    def clear(self) -> None:
        self.requests.clear()


@pytest.fixture
def s3_root() -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex}"


@pytest.fixture
def s3_fs(s3_options: dict[str, Any]) -> Any:
    fs = fsspec.filesystem("s3", **s3_options)
    fs.connect()
    return fs


@pytest.fixture
def request_log(s3_fs: Any) -> RequestLog:
    log = RequestLog(s3_fs)
    yield log
    s3_fs.s3.meta.events.unregister("before-send.s3", log._record)


def _open_uploads(s3_client: Any) -> list[dict[str, Any]]:
    return s3_client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])


def test_gather_reads_only_row_runs(s3_root, s3_options, s3_fs, request_log):
    table = torch.arange(1000 * 64, dtype=torch.float32).reshape(1000, 64)
    data = safetensors_bytes({"embed": table, "other": torch.ones(3)})
    s3_fs.pipe_file(f"{s3_root}/model.safetensors", data)
    reader = open_checkpoint(f"{s3_root}/model.safetensors", s3_options)
    start = reader.shards["model.safetensors"].header.data_start
    begin = next(e.begin for e in reader.shards["model.safetensors"].header.entries if e.name == "embed")
    request_log.clear()

    rows = [500, 10, 11, 12, 501, 900, 11]
    gathered = reader.read_rows("embed", rows)

    assert torch.equal(gathered, table[rows])
    row_bytes = 64 * 4
    base = start + begin
    assert sorted(request_log.ranges()) == [
        (base + 10 * row_bytes, base + 13 * row_bytes),
        (base + 500 * row_bytes, base + 502 * row_bytes),
        (base + 900 * row_bytes, base + 901 * row_bytes),
    ]
    assert request_log.count("GetObject") == 3
    assert sum(end - begin for begin, end in request_log.ranges()) == 6 * row_bytes


def test_read_is_one_ranged_request(s3_root, s3_options, s3_fs, request_log):
    tensors = {"a": torch.randn(100, 10), "b": torch.randn(50)}
    s3_fs.pipe_file(f"{s3_root}/model.safetensors", safetensors_bytes(tensors))
    reader = open_checkpoint(f"{s3_root}/model.safetensors", s3_options)
    header = reader.shards["model.safetensors"].header
    entry = next(e for e in header.entries if e.name == "b")
    request_log.clear()

    assert torch.equal(reader.read("b"), tensors["b"])
    assert request_log.ranges() == [(header.data_start + entry.begin, header.data_start + entry.end)]


def test_open_reads_only_the_header(s3_root, s3_options, s3_fs, request_log):
    data = safetensors_bytes({"big": torch.zeros(256, 1024)})  # 1 MiB of data
    s3_fs.pipe_file(f"{s3_root}/model.safetensors", data)
    request_log.clear()

    reader = open_checkpoint(f"{s3_root}/model.safetensors", s3_options)

    assert reader.tensors["big"].shape == (256, 1024)
    assert request_log.ranges() == [(0, FIRST_READ_BYTES)]


def test_large_shard_uses_multipart_upload(s3_root, s3_options, s3_fs, s3_client, request_log):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randint(0, 2**31, (3 * MIB,), dtype=torch.int32, generator=generator),
        "b": torch.randn(MIB // 4, generator=generator).to(torch.float16),
    }
    writer = ShardedWriter(s3_root, s3_options, part_size=5 * MIB)
    (shard,) = writer.plan_shards(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items())
    assert shard.file_size > 12 * MIB

    record = writer.write_shard(shard, tensors)

    assert request_log.count("CreateMultipartUpload") == 1
    assert request_log.count("UploadPart") == 3
    completes = [r for r in request_log.requests if r[0] == "CompleteMultipartUpload"]
    assert completes == [("CompleteMultipartUpload", None, "*")]
    head = s3_client.head_object(Bucket=BUCKET, Key=s3_fs.split_path(writer.shard_url(shard.file))[1])
    assert head["ETag"].strip('"').endswith("-3")
    data = s3_fs.cat_file(writer.shard_url(shard.file))
    assert record.size == len(data) == shard.file_size
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    assert _open_uploads(s3_client) == []


def test_small_shard_put_is_conditional(s3_root, s3_options, request_log):
    writer = ShardedWriter(s3_root, s3_options)
    (shard,) = writer.plan_shards([TensorSpec("x", torch.float32, (4,))])

    writer.write_shard(shard, {"x": torch.ones(4)})

    puts = [r for r in request_log.requests if r[0] == "PutObject"]
    assert puts == [("PutObject", None, "*")]
    with pytest.raises(ObjectExistsError) as raised:
        writer.write_shard(shard, {"x": torch.zeros(4)})
    assert str(raised.value).startswith(f"{writer.shard_url(shard.file)} already exists")


@pytest.mark.parametrize("size", [1024, 6 * MIB], ids=["put", "multipart"])
def test_object_created_meanwhile_wins(s3_root, s3_fs, s3_client, size):
    url = f"{s3_root}/shard.safetensors"
    key = s3_fs.split_path(url)[1]
    sink = S3Sink(s3_fs, s3_fs.split_path(url)[0] + "/" + key, part_size=5 * MIB, url=url)
    sink.write(memoryview(b"\x01" * size))
    if size > 5 * MIB:
        assert sink.upload_id is not None

    # Another writer publishes the same key after this sink checked for it.
    s3_client.put_object(Bucket=BUCKET, Key=key, Body=b"other writer")
    with pytest.raises(ObjectExistsError) as raised:
        sink.commit()

    assert str(raised.value).startswith(f"{url} already exists")
    assert s3_client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"other writer"
    assert _open_uploads(s3_client) == []


def test_failure_mid_shard_aborts_upload(s3_root, s3_options, s3_fs, s3_client, request_log):
    writer = ShardedWriter(s3_root, s3_options, part_size=5 * MIB)
    specs = [TensorSpec("first", torch.uint8, (7 * MIB,)), TensorSpec("second", torch.uint8, (7 * MIB,))]
    (shard,) = writer.plan_shards(specs)

    def source(spec: TensorSpec) -> torch.Tensor:
        if spec.name == "second":
            raise OSError("input shard unreadable")
        return torch.full((7 * MIB,), 3, dtype=torch.uint8)

    with pytest.raises(OSError, match="input shard unreadable"):
        writer.write_shard(shard, source)

    assert request_log.count("CreateMultipartUpload") == 1
    assert request_log.count("UploadPart") == 1
    assert request_log.count("AbortMultipartUpload") == 1
    assert _open_uploads(s3_client) == []
    listed = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=s3_fs.split_path(s3_root)[1])
    assert listed.get("KeyCount", 0) == 0


def test_part_size_below_s3_minimum_rejected(s3_root, s3_options):
    writer = ShardedWriter(s3_root, s3_options, part_size=MIB)
    (shard,) = writer.plan_shards([TensorSpec("x", torch.float32, (4,))])

    with pytest.raises(ValueError) as raised:
        writer.write_shard(shard, {"x": torch.ones(4)})
    assert str(raised.value) == (
        f"part_size is {MIB} bytes; S3 requires {5 * MIB} (5 MiB) to {5 * 2**30} (5 GiB)"
    )
