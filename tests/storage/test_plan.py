"""Pure parts of the storage layer: shard plans, headers, row runs, index checks, Dask sizeof, pickling."""

from __future__ import annotations

import pickle

import pytest
import torch
from dask.sizeof import sizeof

import pipeline.storage  # noqa: F401  (registers the tensor sizeof)
from pipeline.storage import ShardedWriter, ShardRecord, TensorSpec, plan_shards
from pipeline.storage.header import LENGTH_BYTES, header_length, parse_header
from pipeline.storage.rows import plan_row_gather


def _spec(name: str, numel: int, dtype: torch.dtype = torch.float32) -> TensorSpec:
    return TensorSpec(name, dtype, (numel,))


def test_plan_respects_budget():
    specs = [_spec("a", 10), _spec("b", 10), _spec("c", 30), _spec("d", 1)]  # 40, 40, 120, 4 bytes

    plan = plan_shards(specs, max_shard_bytes=100)

    assert [[s.name for s in shard.tensors] for shard in plan] == [["a", "b"], ["c"], ["d"]]
    assert [shard.file for shard in plan] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    assert plan[0].offsets == ((0, 40), (40, 80))
    assert plan[1].data_bytes == 120


def test_plan_header_parses_back():
    specs = [_spec("x", 3, torch.bfloat16), TensorSpec("y", torch.int64, (2, 2)), TensorSpec("s", torch.bool, ())]

    (shard,) = plan_shards(specs, prefix="adapter", metadata={"source": "test"})

    length = header_length(shard.header[:LENGTH_BYTES], shard.file_size, "plan")
    assert (LENGTH_BYTES + length) % 8 == 0
    parsed = parse_header(shard.header[LENGTH_BYTES:], shard.file_size, "plan")
    assert parsed.metadata == {"format": "pt", "source": "test"}
    assert [(e.name, e.dtype, e.shape, e.begin, e.end) for e in parsed.entries] == [
        ("x", torch.bfloat16, (3,), 0, 6),
        ("y", torch.int64, (2, 2), 6, 38),
        ("s", torch.bool, (), 38, 39),
    ]
    assert shard.file == "adapter-00001-of-00001.safetensors"


def test_plan_rejects_bad_specs():
    with pytest.raises(ValueError) as raised:
        plan_shards([_spec("a", 1), _spec("a", 2)])
    assert str(raised.value) == "shard plan: tensor 'a' appears twice; names must be unique"

    with pytest.raises(ValueError) as raised:
        plan_shards([TensorSpec("q", torch.qint8, (2,))])
    assert str(raised.value) == (
        "shard plan: tensor 'q' has dtype torch.qint8, which safetensors cannot store; convert it first"
    )

    with pytest.raises(ValueError) as raised:
        plan_shards([_spec("a", 1)], max_shard_bytes=0)
    assert str(raised.value) == "max_shard_bytes is 0; expected a positive number of bytes"

    with pytest.raises(ValueError) as raised:
        plan_shards([_spec("a", 1)], prefix="../model")
    assert str(raised.value).startswith("shard prefix: shard file '../model-00001-of-00001.safetensors' contains '/'")


def test_write_index_requires_every_shard(tmp_path):
    writer = ShardedWriter(str(tmp_path), max_shard_bytes=4)
    plan = writer.plan_shards([_spec("a", 1), _spec("b", 1)])
    first = writer.write_shard(plan[0], {"a": torch.ones(1)})

    with pytest.raises(ValueError) as raised:
        writer.write_index(plan, [first, ShardRecord("extra.safetensors", 1, "0" * 64)])
    assert str(raised.value) == (
        f"{tmp_path}: cannot write the index: shard {plan[1].file} has no record (not written?); "
        "record extra.safetensors is not in the plan. Write every planned shard once before the index"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [plan[0].file]


@pytest.mark.parametrize(
    ("rows", "runs", "order"),
    [
        (slice(2, 5), ((2, 5),), None),
        (slice(5, 2), (), None),
        ([1, 2, 3, 7, 8], ((1, 4), (7, 9)), None),
        ([8, 7, 7, -1], ((7, 10),), [1, 0, 0, 2]),
        (slice(0, 10, 4), ((0, 1), (4, 5), (8, 9)), None),
    ],
    ids=["slice", "empty-slice", "two-runs", "unsorted", "step"],
)
def test_row_runs_are_coalesced(rows, runs, order):
    gather = plan_row_gather(rows, 10, subject="t")

    assert gather.runs == runs
    assert (gather.order.tolist() if gather.order is not None else None) == order


def test_row_selection_rejects_floats():
    with pytest.raises(IndexError) as raised:
        plan_row_gather([1.5], 10, subject="t")
    assert str(raised.value) == "t: row indices must be integers, got dtype torch.float32"


def test_dask_sizeof_counts_tensor_bytes():
    tensor = torch.zeros(1000, 250)

    assert sizeof(tensor) >= 1_000_000
    assert sizeof(tensor) < 1_001_000
    assert sizeof(torch.zeros(10, dtype=torch.float64)) >= 80
    assert sizeof(torch.empty(10**9, device="meta")) < 1000


def test_reader_and_writer_pickle_for_workers(tmp_path):
    writer = ShardedWriter(str(tmp_path / "out"), max_shard_bytes=100)
    plan = writer.plan_shards([_spec("w", 4)])
    record = pickle.loads(pickle.dumps(writer)).write_shard(pickle.loads(pickle.dumps(plan[0])), {"w": torch.ones(4)})
    writer.write_index(plan, [record])

    from pipeline.storage import open_checkpoint

    reader = pickle.loads(pickle.dumps(open_checkpoint(str(tmp_path / "out"))))
    assert torch.equal(reader.read("w"), torch.ones(4))
