"""The reader and writer contract, run unchanged on file://, memory:// and s3:// (moto)."""

from __future__ import annotations

import hashlib
import io
import json
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load as load_safetensors_bytes

from pipeline.storage import (
    INDEX_NAME,
    IntegrityError,
    ObjectExistsError,
    ShardedWriter,
    ShardWriteError,
    TensorSpec,
    copy_checkpoint,
    open_checkpoint,
)
from pipeline.storage.dtypes import SAFETENSORS_TO_TORCH

from tests.storage.builders import safetensors_bytes, sample_state, write_sharded


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """Bytes of a tensor, so that comparisons work for every dtype, NaN included."""
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def _assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert torch.equal(_bits(actual), _bits(expected))


def test_write_then_read_round_trip(backend):
    state = sample_state()
    writer, plan, records = write_sharded(backend.root, state, backend.storage_options)

    files = [shard.file for shard in plan]
    assert len(files) == 3
    assert files[0] == "model-00001-of-00003.safetensors"
    assert backend.listing() == sorted(files + [INDEX_NAME])

    index = json.loads(backend.get(INDEX_NAME))
    assert index["metadata"] == {"total_size": sum(t.nbytes for t in state.values())}
    assert index["weight_map"] == {
        spec.name: shard.file for shard in plan for spec in shard.tensors
    }

    for record in records:
        data = backend.get(record.file)
        assert record.size == len(data)
        assert record.sha256 == hashlib.sha256(data).hexdigest()
        for name, tensor in load_safetensors_bytes(data).items():
            _assert_same(tensor, state[name])

    with open_checkpoint(backend.root, backend.storage_options) as reader:
        assert list(reader.tensors) == list(state)
        for name, tensor in state.items():
            _assert_same(reader.read(name), tensor)


def test_listing_is_header_only_metadata(backend):
    state = sample_state()
    _, plan, _ = write_sharded(backend.root, state, backend.storage_options)
    reader = open_checkpoint(backend.url(INDEX_NAME), backend.storage_options)

    shard_of = {spec.name: shard.file for shard in plan for spec in shard.tensors}
    for name, info in reader.tensors.items():
        assert info.dtype == state[name].dtype
        assert info.shape == tuple(state[name].shape)
        assert info.shard == shard_of[name]
        assert info.nbytes == state[name].nbytes
    assert reader.metadata == {"format": "pt"}
    assert reader.index_metadata == {"total_size": sum(t.nbytes for t in state.values())}
    assert reader.total_nbytes == sum(t.nbytes for t in state.values())


@pytest.mark.parametrize(
    "rows",
    [
        slice(3, 10),
        slice(None, None, 5),
        slice(60, None),
        [5, 1, 1, 63, -1],
        [0, 1, 2, 40, 41],
        torch.tensor([2, 3, 4]),
        [],
    ],
    ids=["slice", "step", "tail", "unsorted-duplicates", "two-runs", "tensor", "empty"],
)
def test_read_rows_matches_indexing(backend, rows):
    state = sample_state()
    url = backend.put("one.safetensors", safetensors_bytes(state))
    reader = open_checkpoint(url, backend.storage_options)

    index = rows if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.int64)
    _assert_same(reader.read_rows("embed.weight", rows), state["embed.weight"][index])


def test_read_rows_out_of_range(backend):
    url = backend.put("one.safetensors", safetensors_bytes(sample_state()))
    reader = open_checkpoint(url, backend.storage_options)

    with pytest.raises(IndexError) as raised:
        reader.read_rows("embed.weight", [0, 64])
    assert str(raised.value) == (
        f"{url}: tensor 'embed.weight': row indices [64] are out of range for 64 rows "
        "(valid: -64 to 63)"
    )
    with pytest.raises(IndexError) as raised:
        reader.read_rows("step", [0])
    assert str(raised.value) == f"{url}: tensor 'step' is a scalar and has no rows to select"


def test_second_write_is_rejected(backend):
    state = sample_state()
    writer, plan, records = write_sharded(backend.root, state, backend.storage_options)
    before = backend.get(plan[0].file)

    with pytest.raises(ObjectExistsError) as raised:
        writer.write_shard(plan[0], state)
    url = writer.shard_url(plan[0].file)
    assert str(raised.value).startswith(f"{url} already exists; shards are written create-only")
    assert backend.get(plan[0].file) == before

    with pytest.raises(ObjectExistsError) as raised:
        writer.write_index(plan, records)
    assert str(raised.value).startswith(f"{writer.shard_url(INDEX_NAME)} already exists")
    assert backend.listing() == sorted([shard.file for shard in plan] + [INDEX_NAME])


def test_failing_source_leaves_nothing(backend):
    state = sample_state()
    writer = ShardedWriter(backend.root, backend.storage_options)
    (shard,) = writer.plan_shards(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items())
    requested = []

    def source(spec: TensorSpec) -> torch.Tensor:
        requested.append(spec.name)
        if len(requested) == 3:
            raise RuntimeError("source failed")
        return state[spec.name]

    with pytest.raises(RuntimeError, match="source failed") as raised:
        writer.write_shard(shard, source)
    assert raised.value.__notes__ == [
        f"while writing shard {shard.file} ({writer.shard_url(shard.file)}), tensor "
        f"{requested[-1]!r}; the shard was aborted"
    ]
    assert backend.listing() == []


def test_source_with_wrong_dtype_is_rejected(backend):
    state = sample_state()
    writer = ShardedWriter(backend.root, backend.storage_options)
    (shard,) = writer.plan_shards(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items())
    wrong = dict(state, **{"embed.weight": state["embed.weight"].double()})

    with pytest.raises(ShardWriteError) as raised:
        writer.write_shard(shard, wrong)
    assert str(raised.value) == (
        f"shard {shard.file}: tensor 'embed.weight': the source returned dtype torch.float64, "
        "planned torch.float32"
    )
    assert backend.listing() == []


def test_source_with_wrong_row_blocks_is_rejected(backend):
    state = {"table": torch.arange(40, dtype=torch.float32).reshape(10, 4)}
    writer = ShardedWriter(backend.root, backend.storage_options)
    (shard,) = writer.plan_shards([TensorSpec("table", torch.float32, (10, 4))])

    with pytest.raises(ShardWriteError) as raised:
        writer.write_shard(shard, lambda spec: [state["table"][:4], state["table"][4:8]])
    assert str(raised.value) == (
        f"{writer.shard_url(shard.file)}: tensor 'table' produced 128 bytes, expected 160 for "
        "shape [10, 4] x torch.float32"
    )
    assert backend.listing() == []


def test_digests_verified_on_read(backend):
    state = sample_state()
    _, plan, records = write_sharded(backend.root, state, backend.storage_options)
    digests = {record.file: record.to_json() for record in records}

    with open_checkpoint(backend.root, backend.storage_options, digests=digests) as reader:
        for name, tensor in state.items():
            _assert_same(reader.read(name), tensor)

    target = plan[1]
    data = bytearray(backend.get(target.file))
    data[-1] ^= 0xFF
    backend.fs.rm_file(backend.path(target.file))
    backend.put(target.file, bytes(data))
    actual = hashlib.sha256(data).hexdigest()

    reader = open_checkpoint(backend.root, backend.storage_options, digests=digests)
    _assert_same(reader.read(plan[0].tensors[0].name), state[plan[0].tensors[0].name])
    with pytest.raises(IntegrityError) as raised:
        reader.read(target.tensors[0].name)
    assert str(raised.value) == (
        f"shard {target.file} ({backend.url(target.file)}) failed "
        f"verification: expected sha256 {digests[target.file]['sha256']}, actual {actual}; the "
        "shard is corrupt or the manifest is stale. Copy the shard again or regenerate the manifest"
    )


def test_copy_round_trip_in_row_blocks(backend):
    state = sample_state()
    source_url = backend.put("in/model.safetensors", safetensors_bytes(state))
    writer = ShardedWriter(backend.url("out"), backend.storage_options, max_shard_bytes=1000)

    # 100-byte blocks split embed.weight (2 KiB, 32 bytes per row) into 3-row reads.
    result = copy_checkpoint(open_checkpoint(source_url, backend.storage_options), writer, block_bytes=100)

    assert result.index_url == writer.shard_url(INDEX_NAME)
    assert backend.listing("out") == sorted([r.file for r in result.records] + [INDEX_NAME])
    with open_checkpoint(backend.url("out"), backend.storage_options, digests=result.digests) as copied:
        assert list(copied.tensors) == list(open_checkpoint(source_url, backend.storage_options).tensors)
        for name, tensor in state.items():
            _assert_same(copied.read(name), tensor)


def test_every_dtype_round_trips(backend):
    generator = torch.Generator().manual_seed(1)
    state = {}
    for code, dtype in SAFETENSORS_TO_TORCH.items():
        raw = torch.randint(0, 256, (3, 2 * dtype.itemsize), dtype=torch.uint8, generator=generator)
        if dtype == torch.bool:
            raw = raw % 2
        state[f"t.{code}"] = raw.view(dtype)
    write_sharded(backend.root, state, backend.storage_options, max_shard_bytes=10**6)

    reader = open_checkpoint(backend.root, backend.storage_options)
    for name, tensor in state.items():
        _assert_same(reader.read(name), tensor)
        _assert_same(reader.read_rows(name, [2, 0]), tensor[[2, 0]])


def test_torch_pickle_with_optimizer(backend):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    url = backend.put("train.pt", buffer.getvalue())

    reader = open_checkpoint(url, backend.storage_options)
    assert reader.format == "torch"
    assert list(reader.tensors) == [
        "model.weight",
        "model.bias",
        "optimizer.state.0.step",
        "optimizer.state.0.exp_avg",
        "optimizer.state.0.exp_avg_sq",
        "optimizer.state.1.step",
        "optimizer.state.1.exp_avg",
        "optimizer.state.1.exp_avg_sq",
    ]
    _assert_same(reader.read("optimizer.state.0.exp_avg"), optimizer.state[model.weight]["exp_avg"])
    _assert_same(reader.read_rows("model.weight", [1]), model.weight.detach()[[1]])
    assert reader.objects()["optimizer.param_groups.0.lr"] == 0.001
    assert reader.objects()["optimizer.param_groups.0.params"] == [0, 1]


def test_dcp_directory_with_optimizer(backend, tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    local = tmp_path / "dcp-source"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint_id=str(local), no_dist=True)
    for file in local.iterdir():
        backend.put(f"dcp/{file.name}", file.read_bytes())

    reader = open_checkpoint(backend.url("dcp"), backend.storage_options)
    assert reader.format == "dcp"
    assert list(reader.tensors) == [
        "model.weight",
        "model.bias",
        "optimizer.state.0.momentum_buffer",
        "optimizer.state.1.momentum_buffer",
    ]
    _assert_same(reader.read("model.weight"), model.weight.detach())
    _assert_same(
        reader.read("optimizer.state.1.momentum_buffer"), optimizer.state[model.bias]["momentum_buffer"]
    )
    assert reader.objects()["optimizer.param_groups.0.lr"] == 0.1
