"""Format interoperability: outputs load with safetensors and transformers; inputs of every layout open."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.storage import (
    INDEX_NAME,
    ShardedWriter,
    TensorSpec,
    TensorNotFoundError,
    copy_checkpoint,
    open_checkpoint,
)


def test_output_loads_with_safetensors_load_file(tmp_path):
    state = {f"layer.{i}.weight": torch.randn(16, 16) for i in range(5)}
    writer = ShardedWriter(str(tmp_path), max_shard_bytes=1500)
    plan = writer.plan_shards(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items())
    records = [writer.write_shard(shard, state) for shard in plan]
    writer.write_index(plan, records)

    assert [shard.file for shard in plan] == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    loaded = {}
    for shard in plan:
        loaded.update(load_file(tmp_path / shard.file))
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor)


def test_output_loads_with_transformers_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    source = tmp_path / "source.safetensors"
    save_file(state, source)
    output = tmp_path / "converted"

    # A small budget forces several shards, so loading goes through the index.
    result = copy_checkpoint(open_checkpoint(str(source)), ShardedWriter(str(output), max_shard_bytes=8000))
    config.save_pretrained(output)

    assert len(result.records) > 2
    loaded = transformers.BertModel.from_pretrained(output)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_index_follows_hugging_face_layout(tmp_path):
    state = {"b": torch.ones(100), "a": torch.zeros(100, dtype=torch.float16)}
    writer = ShardedWriter(str(tmp_path), max_shard_bytes=250)
    plan = writer.plan_shards(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items())
    writer.write_index(plan, [writer.write_shard(shard, state) for shard in plan])

    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index == {
        "metadata": {"total_size": 600},
        "weight_map": {
            "b": "model-00001-of-00002.safetensors",
            "a": "model-00002-of-00002.safetensors",
        },
    }


@pytest.mark.parametrize(
    ("file", "expected_format"),
    [("model.safetensors", "safetensors"), ("pytorch_model.bin", "torch")],
)
def test_directory_with_single_file(tmp_path, file, expected_format):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    if file.endswith(".safetensors"):
        save_file(state, tmp_path / file)
    else:
        torch.save(state, tmp_path / file)

    reader = open_checkpoint(str(tmp_path))

    assert reader.format == expected_format
    assert torch.equal(reader.read("w"), state["w"])
    assert reader.tensors["w"].shard == file


def test_legacy_torch_format(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)

    reader = open_checkpoint(str(path))

    assert torch.equal(reader.read("w"), torch.arange(4.0))


def test_unknown_tensor_name(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(1)}, path)
    reader = open_checkpoint(str(path))

    with pytest.raises(TensorNotFoundError) as raised:
        reader.read("v")
    assert str(raised.value) == f"{path}: no tensor named 'v'; the checkpoint has 1 tensors, for example ['w']"


def test_dcp_read_rows_and_copy(tmp_path):
    import torch.distributed.checkpoint as dcp

    state = {"model": {"embed": torch.randn(20, 4), "bias": torch.randn(4)}, "optimizer": {"state": {"embed": {"exp_avg": torch.randn(20, 4)}}}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    reader = open_checkpoint(str(tmp_path / "dcp"))

    assert torch.equal(reader.read_rows("model.embed", [3, 1]), state["model"]["embed"][[3, 1]])
    result = copy_checkpoint(reader, ShardedWriter(str(tmp_path / "out")))
    copied = open_checkpoint(str(tmp_path / "out"), digests=result.digests)
    assert list(copied.tensors) == ["model.embed", "model.bias", "optimizer.state.embed.exp_avg"]
    assert torch.equal(copied.read("optimizer.state.embed.exp_avg"), state["optimizer"]["state"]["embed"]["exp_avg"])


def test_torch_pickle_copies_to_safetensors(tmp_path):
    state = {"model": {"embed": torch.randn(300, 8), "bias": torch.randn(8)}, "epoch": 3}
    torch.save(state, tmp_path / "train.pt")
    reader = open_checkpoint(str(tmp_path / "train.pt"))

    result = copy_checkpoint(reader, ShardedWriter(str(tmp_path / "out"), max_shard_bytes=5000), block_bytes=1000)

    assert [record.file for record in result.records] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    copied = open_checkpoint(str(tmp_path / "out"), digests=result.digests)
    assert list(copied.tensors) == ["model.embed", "model.bias"]
    assert torch.equal(copied.read("model.embed"), state["model"]["embed"])
    assert torch.equal(copied.read("model.bias"), state["model"]["bias"])
